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
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers, trainers
from tokenizers import Tokenizer as HFTokenizer

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

    def __init__(self, tok: HFTokenizer, kind: str, default_system: str = ""):
        self.tok = tok
        self.kind = kind  # "bpe" or "byte"
        self.default_system = default_system
        self.eot_id = tok.token_to_id(EOT)
        self.im_start_id = tok.token_to_id(IM_START)
        self.im_end_id = tok.token_to_id(IM_END)
        if None in (self.eot_id, self.im_start_id, self.im_end_id):
            raise ValueError("tokenizer lacks luca's special tokens " + ", ".join(SPECIALS))
        self.special_ids = {self.eot_id, self.im_start_id, self.im_end_id}
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
        for piece, special in _split_specials(text):
            ids.extend([self.tok.token_to_id(piece)] if special else self._encode_plain(piece))
        return ids

    def _encode_plain(self, text: str) -> list[int]:
        return self._plain.encode(text, add_special_tokens=False).ids if text else []

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """Plain-text ids of many texts at once (parallel inside `tokenizers`)."""
        return [e.ids for e in self._plain.encode_batch_fast(texts, add_special_tokens=False)]

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
        if piece in SPECIALS:
            return piece.encode()
        return bytes(_UNICODE_TO_BYTE[c] for c in piece)

    # -- chat --------------------------------------------------------------------------------
    def render_chat(self, messages: list[dict], add_generation_prompt: bool = False) -> str:
        """ChatML text, byte-identical to `apply_chat_template(..., tokenize=False)`."""
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
        tok = HFTokenizer.from_file(str(path))
        kind, system = "bpe", ""
        cfg_path = d / "tokenizer_config.json"
        if cfg_path.is_file():
            cfg = json.loads(cfg_path.read_text())
            kind = cfg.get("luca_tokenizer_kind", "bpe")
            system = cfg.get("luca_default_system", "") or ""
        return cls(tok, kind, system)


def _split_specials(text: str) -> Iterator[tuple[str, bool]]:
    i = 0
    while i < len(text):
        hits = [(text.find(s, i), s) for s in SPECIALS]
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
