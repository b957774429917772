"""Tokenizers: byte-level BPE (trained with `tokenizers`) and pure bytes, one class for both.

What is notable:
- The pre-tokenizer is Qwen2's exact split pattern (single digits, so numbers tokenize
  digit by digit), which llama.cpp knows as `tokenizer.ggml.pre = "qwen2"`; no normalizer, so
  any Unicode round-trips byte-exactly and llama.cpp tokenizes identically.
- The byte tokenizer is the same machinery with no merges: ids 0..255 are the bytes, so byte
  models are also plain Hugging Face tokenizers and GGUF exports.
- Special tokens `<|endoftext|>`, `<|im_start|>`, `<|im_end|>`. `encode` treats their text as
  plain text unless `allow_special=True`, so user input can never inject control tokens.
- Saved as `tokenizer.json` + `tokenizer_config.json` (with a ChatML chat template) that
  `transformers.PreTrainedTokenizerFast.from_pretrained(dir)` loads to the same ids.
- Foreign Hugging Face tokenizers (an imported Llama / Qwen checkpoint) load too: without
  `<|endoftext|>` the end-of-text id is the config's `eos_token`; without the ChatML markers
  `im_start_id`/`im_end_id` are None and chat rendering raises; their `tokenizer_config.json` is
  saved back unchanged; SentencePiece-style pieces (`▁`, `<0xNN>`) have their bytes too.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers, trainers
from tokenizers import Tokenizer as HFTokenizer

from luca.errors import LucaError

# Qwen2's pre-tokenizer pattern, verbatim (llama.cpp: LLAMA_VOCAB_PRE_TYPE_QWEN2).
SPLIT_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                 r"|\s*[\r\n]+|\s+(?!\S)|\s+")
GGUF_PRE = "qwen2"
EOT, IM_START, IM_END = "<|endoftext|>", "<|im_start|>", "<|im_end|>"
SPECIALS = [EOT, IM_START, IM_END]

# ChatML, the same template Qwen2 ships (with an optional default system prompt).
CHAT_TEMPLATE = (
    "{%- if messages[0]['role'] == 'system' %}"
    "{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}"
    "{%- set loop_messages = messages[1:] %}"
    "{%- else %}"
    "{%- if default_system is defined and default_system %}"
    "{{- '<|im_start|>system\\n' + default_system + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- set loop_messages = messages %}"
    "{%- endif %}"
    "{%- for message in loop_messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


def _pre_tokenizer():
    return pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(SPLIT_PATTERN), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
    ])


def _finish(tok: HFTokenizer) -> HFTokenizer:
    tok.pre_tokenizer = _pre_tokenizer()
    tok.decoder = decoders.ByteLevel()
    return tok


class Tokenizer:
    """A byte-level tokenizer (BPE or pure bytes) with luca's special tokens."""

    def __init__(self, tok: HFTokenizer, kind: str, default_system: str = "", eos_token: str | None = None,
                 source_config: dict | None = None):
        self.tok = tok
        self.kind = kind  # "bpe" or "byte"
        self.default_system = default_system
        self.source_config = source_config  # a foreign tokenizer_config.json, saved back as it was
        self.eot_id = tok.token_to_id(EOT)
        self.im_start_id = tok.token_to_id(IM_START)
        self.im_end_id = tok.token_to_id(IM_END)
        if self.eot_id is None and eos_token:
            self.eot_id = tok.token_to_id(eos_token)
        if self.eot_id is None:
            raise ValueError(f"tokenizer has neither {EOT} nor an eos_token in tokenizer_config.json")
        added = {i for i, t in tok.get_added_tokens_decoder().items() if t.special}
        self.special_ids = {i for i in (self.eot_id, self.im_start_id, self.im_end_id) if i is not None} | added
        self._special_texts = sorted({tok.id_to_token(i) for i in self.special_ids}, key=len, reverse=True)
        self._byte_level = isinstance(tok.decoder, decoders.ByteLevel)
        # A twin that never matches special tokens inside text: user input stays plain text.
        # Kept separate (not a toggled flag) so that concurrent threads cannot see the wrong mode.
        self._plain = HFTokenizer.from_str(tok.to_str())
        self._plain.encode_special_tokens = True

    @property
    def vocab_size(self) -> int:
        return self.tok.get_vocab_size(with_added_tokens=True)

    # -- encoding ---------------------------------------------------------------------------
    def encode(self, text: str, allow_special: bool = False) -> list[int]:
        """Token ids of `text`; special-token strings are plain text unless `allow_special`."""
        if not allow_special:
            return self._encode_plain(text)
        ids: list[int] = []
        for piece, special in _split_specials(text, self._special_texts):
            ids.extend([self.tok.token_to_id(piece)] if special else self._encode_plain(piece))
        return ids

    def _encode_plain(self, text: str) -> list[int]:
        if not text:
            return []
        try:
            return self._plain.encode(text, add_special_tokens=False).ids
        except TypeError:  # lone surrogates (JSON escapes) are not text: U+FFFD, as data cleaning does
            return self._plain.encode(_SURROGATE.sub("\ufffd", text), add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """Plain-text ids of many texts at once (parallel inside `tokenizers`)."""
        try:
            enc = self._plain.encode_batch_fast(texts, add_special_tokens=False)
        except TypeError:
            enc = self._plain.encode_batch_fast([_SURROGATE.sub("\ufffd", t) for t in texts], add_special_tokens=False)
        return [e.ids for e in enc]

    def decode(self, ids: Iterable[int], skip_special: bool = False) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=skip_special)

    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        """Raw bytes of the ids (specials as their text); for streaming without broken UTF-8."""
        out = bytearray()
        for i in ids:
            out += self.token_bytes(i)
        return bytes(out)

    def token_bytes(self, i: int) -> bytes:
        piece = self.tok.id_to_token(i)
        if piece is None:  # an id past the vocabulary (the model's rows are padded)
            return b""
        if i in self.special_ids:
            return piece.encode()
        if self._byte_level:
            try:
                return bytes(_UNICODE_TO_BYTE[c] for c in piece)
            except KeyError:  # an added plain-text token outside the byte alphabet
                return piece.encode()
        m = _BYTE_PIECE.fullmatch(piece)  # SentencePiece-style: byte fallback and ▁ for space
        return bytes([int(m.group(1), 16)]) if m else piece.replace("\u2581", " ").encode()

    # -- chat --------------------------------------------------------------------------------
    def _require_chatml(self) -> None:
        if self.im_start_id is None or self.im_end_id is None:
            raise ValueError(f"this tokenizer has no ChatML markers ({IM_START}, {IM_END}) for chat")

    def render_chat(self, messages: list[dict], add_generation_prompt: bool = False) -> str:
        """ChatML text, byte-identical to `apply_chat_template(..., tokenize=False)`."""
        self._require_chatml()
        check_messages(messages)
        out = []
        if messages and messages[0]["role"] == "system":
            out.append(f"{IM_START}system\n{messages[0]['content']}{IM_END}\n")
            messages = messages[1:]
        elif self.default_system:
            out.append(f"{IM_START}system\n{self.default_system}{IM_END}\n")
        for m in messages:
            out.append(f"{IM_START}{m['role']}\n{m['content']}{IM_END}\n")
        if add_generation_prompt:
            out.append(f"{IM_START}assistant\n")
        return "".join(out)

    def encode_chat(self, messages: list[dict], add_generation_prompt: bool = False) -> list[int]:
        """Ids of the rendered chat, where only the template's own markers are special tokens."""
        self._require_chatml()
        check_messages(messages)
        ids: list[int] = []
        nl = self._encode_plain("\n")
        if messages and messages[0]["role"] == "system":
            head, messages = [messages[0]], messages[1:]
        elif self.default_system:
            head = [{"role": "system", "content": self.default_system}]
        else:
            head = []
        for m in head + list(messages):
            ids += [self.im_start_id] + self._encode_plain(f"{m['role']}\n{m['content']}") + [self.im_end_id] + nl
        if add_generation_prompt:
            ids += [self.im_start_id] + self._encode_plain("assistant\n")
        return ids

    # -- files -------------------------------------------------------------------------------
    def save(self, directory: str | Path) -> None:
        from luca.atomic import write_text
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        write_text(d / "tokenizer.json", self.tok.to_str(pretty=False))
        write_text(d / "tokenizer_config.json", json.dumps(self.hf_config(), indent=2))

    def hf_config(self) -> dict:
        if self.source_config is not None:
            return dict(self.source_config)
        added = {str(self.tok.token_to_id(s)): {"content": s, "lstrip": False, "normalized": False,
                                                 "rstrip": False, "single_word": False, "special": True}
                 for s in SPECIALS}
        template = CHAT_TEMPLATE
        if self.default_system:
            template = "{%- set default_system = " + json.dumps(self.default_system) + " %}" + template
        return {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "added_tokens_decoder": added,
            "bos_token": None,
            "eos_token": IM_END,
            "pad_token": EOT,
            "unk_token": None,
            "clean_up_tokenization_spaces": False,
            "model_max_length": 1 << 30,
            "chat_template": template,
            "luca_tokenizer_kind": self.kind,
            "luca_default_system": self.default_system,
            "luca_gguf_pre": GGUF_PRE,
        }

    @classmethod
    def load(cls, directory: str | Path) -> "Tokenizer":
        d = Path(directory)
        path = d / "tokenizer.json"
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no tokenizer.json")
        try:
            tok = HFTokenizer.from_file(str(path))
        except Exception as e:  # tokenizers raises a bare Exception for a malformed file
            raise ValueError(f"{path}: not a readable tokenizer.json ({str(e)[:200]})") from None
        kind, system = "bpe", ""
        cfg_path = d / "tokenizer_config.json"
        try:
            cfg = json.loads(cfg_path.read_text(encoding="utf-8")) if cfg_path.is_file() else {}
        except RecursionError:
            cfg = None
        if not isinstance(cfg, dict):
            raise ValueError(f"{cfg_path}: not a JSON object")
        if "luca_tokenizer_kind" not in cfg and (cfg or tok.token_to_id(IM_END) is None):
            # A foreign tokenizer (Llama's, Qwen's): keep its config; without <|endoftext|> text
            # ends at its eos token.
            if "chat_template" not in cfg and (d / "chat_template.jinja").is_file():
                cfg["chat_template"] = (d / "chat_template.jinja").read_text(encoding="utf-8")
            return cls(tok, kind, "", eos_token=_token_text(cfg.get("eos_token")), source_config=cfg)
        kind = cfg.get("luca_tokenizer_kind", "bpe")
        system = cfg.get("luca_default_system", "") or ""
        return cls(tok, kind, system)


def check_messages(messages: object) -> None:
    """One clear error (LucaError) for a chat that is not a list of {role, content} strings."""
    if not isinstance(messages, (list, tuple)):
        raise LucaError(f"chat: expected a list of messages, got {type(messages).__name__}")
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise LucaError(f"chat message {i}: expected an object with role and content, got {type(m).__name__}")
        role, content = m.get("role"), m.get("content")
        if not isinstance(role, str) or not role.strip() or "\n" in role:
            raise LucaError(f"chat message {i}: role must be a non-empty one-line string, not {role!r:.60}")
        if not isinstance(content, str):
            raise LucaError(f"chat message {i}: content must be a string, not {type(content).__name__}")


_SURROGATE = re.compile("[\ud800-\udfff]")


def _token_text(t) -> str | None:
    """An HF config's token entry: a string or {"content": ...}."""
    return t.get("content") if isinstance(t, dict) else t


_BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")


def _split_specials(text: str, specials: list[str] = SPECIALS) -> Iterator[tuple[str, bool]]:
    i = 0
    while i < len(text):
        hits = [(text.find(s, i), s) for s in specials]
        hits = [(p, s) for p, s in hits if p >= 0]
        if not hits:
            yield text[i:], False
            return
        p, s = min(hits)
        if p > i:
            yield text[i:p], False
        yield s, True
        i = p + len(s)


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte → printable character map (the ByteLevel alphabet)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs)}


_BYTE_TO_UNICODE = _bytes_to_unicode()
_UNICODE_TO_BYTE = {c: b for b, c in _BYTE_TO_UNICODE.items()}


def byte_tokenizer() -> Tokenizer:
    """Pure bytes: id b is byte b; the three specials follow at 256, 257, 258."""
    vocab = {_BYTE_TO_UNICODE[b]: b for b in range(256)}
    tok = _finish(HFTokenizer(models.BPE(vocab=vocab, merges=[], fuse_unk=False, byte_fallback=False)))
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in SPECIALS])
    return Tokenizer(tok, "byte")


def train_bpe(texts: Iterable[str], vocab_size: int, min_frequency: int = 2,
              show_progress: bool = False) -> Tokenizer:
    """Train byte-level BPE on `texts` to exactly `vocab_size` ids (specials included, at 0..2)."""
    if vocab_size < 256 + len(SPECIALS):
        raise ValueError(f"vocab_size {vocab_size} is below 259 (256 bytes + specials); use the byte tokenizer")
    tok = _finish(HFTokenizer(models.BPE(fuse_unk=False, byte_fallback=False)))
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=min_frequency, show_progress=show_progress,
        special_tokens=[AddedToken(s, special=True, normalized=False) for s in SPECIALS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer=trainer)
    return Tokenizer(tok, "bpe")


@dataclass
class TokenizerConfig:
    kind: str = "bpe"  # bpe | byte
    vocab_size: int = 8192
    min_frequency: int = 2
    max_chars: int = 50_000_000  # train on at most this many characters of the training documents

    def __post_init__(self) -> None:
        if self.kind not in ("bpe", "byte"):
            raise ValueError(f"kind must be bpe or byte, got {self.kind!r}")


def build_tokenizer(cfg: TokenizerConfig, texts: Iterable[str], show_progress: bool = False) -> Tokenizer:
    """The tokenizer a config asks for: BPE trained on (a prefix of) `texts`, or bytes."""
    if cfg.kind == "byte":
        return byte_tokenizer()

    def capped() -> Iterator[str]:
        n = 0
        for t in texts:
            if n >= cfg.max_chars:
                return
            yield t
            n += len(t)

    return train_bpe(capped(), cfg.vocab_size, cfg.min_frequency, show_progress=show_progress)
