"""Chat data for fine-tuning: readers of five formats, ChatML ids with assistant-only targets, packing.

What is notable:
- A source is a data spec as in `luca.data` (`file`, `dir`, glob, `hf:NAME[:split]`, with `weight`,
  `encoding`, `errors`, `field`, `config`) plus `format=messages|alpaca|sharegpt|qa|text`. Without
  `format` each file (or dataset) is recognised by the keys of its first record: `messages`
  (OpenAI), `conversations` with `from`/`value` (ShareGPT: human→user, gpt→assistant, system),
  `instruction` [+ `input`] + `output` (Alpaca; self-instruct `instances` too), `question`/`answer`
  (GSM8K; also `query`/`response`, `prompt`/`completion`|`response`) and `text` (continued
  pretraining). Text files are plain text. A directory yields its .jsonl/.json/.parquet files if it
  has any, else its text files. Errors name file:line (or dataset:row) as `luca.data` does.
- Ids are ChatML through the base's tokenizer: the template's markers are special tokens and every
  message text is plain text, so data can never inject control tokens. Rendered text equals
  transformers' `apply_chat_template` of the run directory's `tokenizer_config.json` (the default
  system prompt included). An assistant turn is tokenized as header `assistant\\n` then its content
  from a fresh token boundary, exactly what generation sees after the generation prompt.
- Targets: only assistant content and its closing `<|im_end|>` (never the header, the newline after
  `<|im_end|>`, system or user text); plain text trains on every token, framed by end-of-text ids.
- Examples longer than `seq_len + 1` tokens are cut and counted; those left with no target are
  dropped and counted. Exact duplicates are dropped. The validation split is by content hash.
- Mixing: source i supplies a share of training tokens ∝ its weight (cycling or subsampling its
  examples in a seeded order); one source of weight 1 uses every example once per epoch.
- Packing: greedy, in the mixed order, into rows of `seq_len` positions with per-example
  `doc_ids` and restarted `positions` (no attention across examples); or one example per row.
"""
from __future__ import annotations

import hashlib
import json
import os
import random
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Iterator
from urllib.parse import unquote

import numpy as np
import torch

from luca import data as D
from luca import sources as S
from luca.errors import LucaError
from luca.tokenizer import Tokenizer

FORMATS = ("messages", "alpaca", "sharegpt", "qa", "text")
CHAT_OPTION_KEYS = {"format"}
ROLES = {"system", "user", "assistant"}
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "chatgpt": "assistant", "bard": "assistant", "bing": "assistant", "model": "assistant",
                  "system": "system"}
QA_KEYS = (("question", "answer"), ("query", "response"), ("prompt", "completion"), ("prompt", "response"))
IGNORE = -100


@dataclass(frozen=True)
class ChatSource:
    source: S.Source
    format: str | None = None  # None: recognised per file by its keys

    @property
    def spec(self) -> str:
        return self.source.spec


@dataclass
class Example:
    origin: str  # "file.jsonl:12" or "hf:name:3": where errors and stats point
    messages: list[tuple[str, str]] | None = None  # (role, content)
    text: str | None = None  # plain text: every token is a target

    def key(self) -> str:
        body = json.dumps(self.messages if self.messages is not None else self.text, ensure_ascii=False)
        return hashlib.sha256(body.encode("utf-8", "replace")).hexdigest()


# -- specs --------------------------------------------------------------------------------------
def parse_chat_source(spec: str) -> ChatSource:
    """`LOCATION[?format=...&weight=...&...]`: luca.data's spec plus the `format` option."""
    if not isinstance(spec, str) or not spec.strip():
        raise LucaError(f"data source {spec!r}: empty spec")
    spec = spec.strip()
    head, sep, query = spec.rpartition("?")
    fmt = None
    inner = spec
    if sep and query and all("=" in p for p in query.split("&")) and not os.path.exists(spec):
        keep = []
        for part in query.split("&"):
            k, _, v = part.partition("=")
            if unquote(k.strip()) == "format":
                fmt = unquote(v.strip())
                if fmt not in FORMATS:
                    raise LucaError(f"{spec}: unknown format {fmt!r} (known: {', '.join(FORMATS)})")
            else:
                keep.append(part)
        inner = head + ("?" + "&".join(keep) if keep else "")
    try:
        src = S.parse_source(inner)
    except LucaError as e:
        msg = str(e)
        if "unknown option" in msg:
            msg = msg.replace("(known: ", "(known: format, ")
        raise LucaError(msg.replace(inner, spec, 1)) from None
    return ChatSource(replace(src, spec=spec), fmt)


# -- reading --------------------------------------------------------------------------------------
def read_examples(cs: ChatSource) -> Iterator[Example]:
    """Every example of a source, in file order."""
    src = cs.source
    if src.kind == "hf":
        yield from _hf_examples(cs)
        return
    if src.kind == "builtin":
        yield from _text_examples(cs, src)
        return
    if src.kind == "file":
        files = [Path(src.location)]
    elif src.kind == "dir":
        every = list(S.walk(Path(src.location)))
        files = [p for p in every if p.suffix.lower() in S.STRUCTURED_EXTS]
        if not files:
            yield from _text_examples(cs, src)
            return
    else:
        import glob as globlib
        files = sorted(Path(p) for p in globlib.glob(src.location, recursive=True) if os.path.isfile(p))
        files = [p for p in files if p.suffix.lower() in S.STRUCTURED_EXTS or not S.is_binary(p)]
        if not files:
            raise LucaError(f"{src.spec}: glob matches no text or record files")
    for p in files:
        ext = p.suffix.lower()
        if ext in (".jsonl", ".json"):
            yield from _convert_all(cs, S.json_records(p, src))
        elif ext == ".parquet":
            yield from _convert_all(cs, S.parquet_rows(p))
        else:
            if cs.format not in (None, "text"):
                raise LucaError(f"{p}: format={cs.format} needs JSON lines, JSON or Parquet records; "
                                "a plain file is text")
            yield from _text_examples(cs, replace(src, kind="file", location=str(p)))


def _text_examples(cs: ChatSource, src: S.Source) -> Iterator[Example]:
    if cs.format not in (None, "text"):
        raise LucaError(f"{src.spec}: format={cs.format} needs records (JSON lines, JSON, Parquet or hf:)")
    for origin, text in S.iter_source(src):
        yield Example(origin, text=D.clean(text)[0])


def _hf_examples(cs: ChatSource) -> Iterator[Example]:
    src = cs.source
    ds = S.hf_dataset(src)
    yield from _convert_all(cs, ((f"{src.spec}:{i}", row) for i, row in enumerate(ds)))


def detect_format(rec: object, where: str) -> str:
    """The format of a record, from its keys."""
    if isinstance(rec, str):
        return "text"
    if not isinstance(rec, dict):
        raise LucaError(f"{where}: a record is a JSON {type(rec).__name__}, not an object")
    if "messages" in rec:
        return "messages"
    if "conversations" in rec:
        turns = rec["conversations"]
        if isinstance(turns, list) and turns and isinstance(turns[0], dict) and "role" in turns[0]:
            return "messages"
        return "sharegpt"
    if "instruction" in rec and ("output" in rec or "instances" in rec):
        return "alpaca"
    if any(q in rec and a in rec for q, a in QA_KEYS):
        return "qa"
    if "text" in rec:
        return "text"
    raise LucaError(f"{where}: cannot tell the format from the keys ({', '.join(map(str, rec)) or 'none'}); "
                    f"pass ?format= one of {', '.join(FORMATS)}")


def _convert_all(cs: ChatSource, records: Iterator[tuple[str, object]]) -> Iterator[Example]:
    fmt = cs.format
    for origin, rec in records:
        if fmt is None:
            fmt = detect_format(rec, origin)
        yield from convert(rec, fmt, origin, cs.source.field)


def convert(rec: object, fmt: str, origin: str, text_field: str = "text") -> Iterator[Example]:
    """One record of format `fmt` → its examples (self-instruct records hold several)."""
    if fmt == "text":
        if isinstance(rec, dict) and isinstance(rec.get(text_field), str):
            yield Example(origin, text=D.clean(rec[text_field])[0])
        elif isinstance(rec, str):
            yield Example(origin, text=D.clean(rec)[0])
        else:
            yield Example(origin, text=S.text_field(rec, text_field, origin))
        return
    if not isinstance(rec, dict):
        raise LucaError(f"{origin}: a record is a JSON {type(rec).__name__}, not an object")
    if fmt == "messages":
        turns = rec.get("messages", rec.get("conversations"))
        if not isinstance(turns, list):
            raise LucaError(f"{origin}: no list field 'messages' (fields: {', '.join(rec)})")
        msgs = []
        for i, m in enumerate(turns):
            if not isinstance(m, dict) or "role" not in m:
                raise LucaError(f"{origin}: message {i} has no 'role'")
            role = m["role"]
            if role not in ROLES:
                raise LucaError(f"{origin}: message {i} has role {role!r} (supported: system, user, assistant)")
            msgs.append((role, _content(m.get("content"), f"{origin}: message {i}")))
        yield Example(origin, messages=msgs)
    elif fmt == "sharegpt":
        turns = rec.get("conversations")
        if not isinstance(turns, list):
            raise LucaError(f"{origin}: no list field 'conversations' (fields: {', '.join(rec)})")
        msgs = []
        if isinstance(rec.get("system"), str) and rec["system"]:
            msgs.append(("system", _tidy(rec["system"])))
        for i, m in enumerate(turns):
            if not isinstance(m, dict) or "from" not in m or "value" not in m:
                raise LucaError(f"{origin}: turn {i} needs 'from' and 'value'")
            role = SHAREGPT_ROLES.get(str(m["from"]).lower())
            if role is None:
                raise LucaError(f"{origin}: turn {i} is from {m['from']!r} (known: {', '.join(SHAREGPT_ROLES)})")
            msgs.append((role, _content(m["value"], f"{origin}: turn {i}")))
        yield Example(origin, messages=msgs)
    elif fmt == "alpaca":
        instr = _string(rec, "instruction", origin)
        if "output" in rec:
            pairs = [(rec.get("input") or "", _string(rec, "output", origin))]
        elif isinstance(rec.get("instances"), list):  # self-instruct seed tasks
            pairs = [(inst.get("input") or "", _string(inst, "output", f"{origin}: instance {j}"))
                     for j, inst in enumerate(rec["instances"])]
        else:
            raise LucaError(f"{origin}: no string field 'output' (fields: {', '.join(rec)})")
        for j, (inp, out) in enumerate(pairs):
            if not isinstance(inp, str):
                raise LucaError(f"{origin}: field 'input' is {type(inp).__name__}, not a string")
            user = f"{instr}\n\n{inp}" if inp.strip() else instr
            yield Example(origin if len(pairs) == 1 else f"{origin}#{j}", messages=[("user", user), ("assistant", out)])
    elif fmt == "qa":
        for q, a in QA_KEYS:
            if q in rec and a in rec:
                yield Example(origin, messages=[("user", _string(rec, q, origin)),
                                                ("assistant", _string(rec, a, origin))])
                return
        raise LucaError(f"{origin}: needs question/answer fields ({', '.join(f'{q}/{a}' for q, a in QA_KEYS)}); "
                        f"fields: {', '.join(rec)}")
    else:
        raise LucaError(f"{origin}: unknown format {fmt!r}")


def _string(rec: dict, key: str, origin: str) -> str:
    v = rec.get(key) if isinstance(rec, dict) else None
    if not isinstance(v, str):
        fields = ", ".join(rec) if isinstance(rec, dict) else type(rec).__name__
        raise LucaError(f"{origin}: no string field {key!r} (fields: {fields})")
    return _tidy(v)


def _tidy(s: str) -> str:
    """Only what is noise everywhere: CRLF, NUL, lone surrogates (no tokenizer can encode them)."""
    s = s.replace("\r\n", "\n").replace("\0", "")
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:
        s = D.SURROGATES.sub("\ufffd", s)
    return s


def _content(c: object, where: str) -> str:
    """A message's text: a string, or OpenAI's list of parts of type text."""
    if isinstance(c, str):
        return _tidy(c)
    if isinstance(c, list) and all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                                   for p in c):
        return _tidy("".join(p["text"] for p in c))
    raise LucaError(f"{where}: content is {type(c).__name__}, not text")


# -- ids and targets ------------------------------------------------------------------------------
def with_default_system(messages: list[tuple[str, str]], tok: Tokenizer) -> list[tuple[str, str]]:
    if tok.default_system and (not messages or messages[0][0] != "system"):
        return [("system", tok.default_system)] + list(messages)
    return list(messages)


def encode_examples(tok: Tokenizer, examples: list[Example]) -> list[tuple[np.ndarray, np.ndarray]]:
    """(ids int32, is_target bool) per example; targets are assistant content + its <|im_end|>."""
    if tok.im_start_id is None or tok.im_end_id is None:
        if any(ex.messages is not None for ex in examples):
            raise LucaError("the base's tokenizer has no ChatML markers (<|im_start|>, <|im_end|>): chat data "
                            "needs them (plain text, format=text, still works)")
    segments: list[str] = []  # plain-text pieces, tokenized in one parallel call
    plans = []
    for ex in examples:
        plan = []
        if ex.messages is None:
            plan.append(("id", tok.eot_id, False))
            plan.append(("text", len(segments), True))
            segments.append(ex.text)
            plan.append(("id", tok.eot_id, True))
        else:
            for role, content in with_default_system(ex.messages, tok):
                plan.append(("id", tok.im_start_id, False))
                if role == "assistant":
                    plan.append(("text", len(segments), False))
                    segments.append("assistant\n")
                    plan.append(("text", len(segments), True))
                    segments.append(content)
                    plan.append(("id", tok.im_end_id, True))
                else:
                    plan.append(("text", len(segments), False))
                    segments.append(f"{role}\n{content}")
                    plan.append(("id", tok.im_end_id, False))
                plan.append(("text", len(segments), False))
                segments.append("\n")
        plans.append(plan)
    enc = tok.encode_batch(segments) if segments else []
    out = []
    for plan in plans:
        ids: list[int] = []
        tgt: list[bool] = []
        for kind, v, trained in plan:
            piece = [v] if kind == "id" else enc[v]
            ids += piece
            tgt += [trained] * len(piece)
        out.append((np.asarray(ids, dtype=np.int32), np.asarray(tgt, dtype=np.bool_)))
    return out


# -- the dataset: read, dedup, split, encode, mix, pack -----------------------------------------
@dataclass
class ChatData:
    """Encoded train/val examples and per-source statistics."""
    train: list[list[tuple[np.ndarray, np.ndarray]]]  # per source
    val: list[tuple[np.ndarray, np.ndarray]]
    weights: list[float]
    stats: list[dict] = field(default_factory=list)

    def totals(self) -> dict:
        keys = ("examples", "val_examples", "duplicates", "skipped_no_reply", "truncated", "truncated_tokens",
                "dropped_no_target", "tokens", "target_tokens")
        return {k: sum(s[k] for s in self.stats) for k in keys}


def load_chat_data(specs: list[str], tok: Tokenizer, seq_len: int, val_fraction: float = 0.02,
                   progress: bool = False) -> ChatData:
    """Read every source, drop duplicates, split by hash, tokenize and cut to `seq_len + 1` tokens."""
    if not specs:
        raise LucaError("finetune data: no sources given (--data SPEC ...)")
    sources = [parse_chat_source(s) for s in specs]
    seen: set[str] = set()
    train, val, stats = [], [], []
    with D.progress_bar(progress, "read + tokenize", len(sources), "sources") as advance:
        for cs in sources:
            st = {"spec": cs.spec, "weight": cs.source.weight, "examples": 0, "val_examples": 0, "duplicates": 0,
                  "skipped_no_reply": 0, "truncated": 0, "truncated_tokens": 0, "dropped_no_target": 0,
                  "tokens": 0, "target_tokens": 0}
            kept: list[tuple[Example, bool]] = []
            for ex in read_examples(cs):
                if ex.messages is not None and not any(r == "assistant" and c for r, c in ex.messages):
                    st["skipped_no_reply"] += 1
                    continue
                if ex.text is not None and not ex.text:
                    st["skipped_no_reply"] += 1
                    continue
                k = ex.key()
                if k in seen:
                    st["duplicates"] += 1
                    continue
                seen.add(k)
                kept.append((ex, int(k[:8], 16) / 2**32 < val_fraction))
            if not kept:
                raise LucaError(f"{cs.spec}: no usable examples (all {st['duplicates']} duplicates, "
                                f"{st['skipped_no_reply']} without an assistant reply)")
            src_train = []
            for i in range(0, len(kept), 2048):
                part = kept[i:i + 2048]
                for (ex, is_val), (ids, tgt) in zip(part, encode_examples(tok, [e for e, _ in part])):
                    if len(ids) > seq_len + 1:
                        st["truncated"] += 1
                        st["truncated_tokens"] += len(ids) - (seq_len + 1)
                        ids, tgt = ids[:seq_len + 1], tgt[:seq_len + 1]
                    n_tgt = int(tgt[1:].sum())
                    if n_tgt == 0:
                        st["dropped_no_target"] += 1
                        continue
                    st["examples"] += 1
                    st["tokens"] += len(ids)
                    st["target_tokens"] += n_tgt
                    if is_val:
                        st["val_examples"] += 1
                        val.append((ids, tgt))
                    else:
                        src_train.append((ids, tgt))
            train.append(src_train)
            stats.append(st)
            advance(1)
    n_all = sum(map(len, train)) + len(val)
    if val_fraction > 0 and not val and n_all >= 2:
        # Evaluation needs one validation example however small the data: the last of the largest source.
        big = max(range(len(train)), key=lambda i: len(train[i]))
        val.append(train[big].pop())
        stats[big]["val_examples"] += 1
    if not sum(map(len, train)):
        raise LucaError("finetune data: no training examples left after the validation split")
    return ChatData(train, val, [cs.source.weight for cs in sources], stats)


def mix(data: ChatData, seed: int, epoch: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """One epoch of training examples: source i supplies ∝ weight_i of the tokens, shuffled."""
    sizes = [sum(len(ids) for ids, _ in src) for src in data.train]
    live = [i for i, n in enumerate(sizes) if n]
    total, wsum = sum(sizes), sum(data.weights[i] for i in live)
    out = []
    for i in live:
        src = data.train[i]
        target = total * data.weights[i] / wsum
        rng = random.Random(f"{seed}:{epoch}:{i}")
        taken, order = 0, []
        while taken < target:
            if not order:
                order = list(range(len(src)))
                rng.shuffle(order)
            n = len(src[order[-1]][0])
            if taken + n / 2 > target:  # take the last example only if that lands nearer the target
                break
            out.append(src[order.pop()])
            taken += n
    random.Random(f"{seed}:{epoch}:mix").shuffle(out)
    return out


def pack(examples: list[tuple[np.ndarray, np.ndarray]], seq_len: int, packed: bool = True) -> list[list[int]]:
    """Rows as lists of example indices: greedy packing into `seq_len` positions, or one per row."""
    if not packed:
        return [[i] for i in range(len(examples))]
    rows, cur, room = [], [], seq_len
    for i, (ids, _) in enumerate(examples):
        n = len(ids) - 1  # an example of n+1 ids fills n positions (inputs ids[:-1], targets ids[1:])
        if n > room and cur:
            rows.append(cur)
            cur, room = [], seq_len
        cur.append(i)
        room -= n
    if cur:
        rows.append(cur)
    return rows


@dataclass
class Batch:
    tokens: torch.Tensor  # (B, T) inputs
    targets: torch.Tensor  # (B, T), IGNORE where not trained
    positions: torch.Tensor | None
    doc_ids: torch.Tensor | None
    n_targets: int
    n_tokens: int  # real (non-padding) positions

    def to(self, device) -> "Batch":
        mv = (lambda t: None if t is None else t.to(device, non_blocking=True))
        return Batch(mv(self.tokens), mv(self.targets), mv(self.positions), mv(self.doc_ids),
                     self.n_targets, self.n_tokens)


def collate(examples: list[tuple[np.ndarray, np.ndarray]], rows: list[list[int]], pad_id: int,
            multiple: int = 8) -> Batch:
    """Tensors of some rows, padded to the longest row (rounded up to `multiple`).

    Positions restart at 0 for each example and `doc_ids` keep examples apart; padding has doc id
    -1 and no targets. When every row holds one example, plain causal attention is exact, so
    neither is passed (the fast SDPA path).
    """
    lens = [sum(len(examples[i][0]) - 1 for i in row) for row in rows]
    T = max(lens)
    T = -(-T // multiple) * multiple
    B = len(rows)
    tok = np.full((B, T), pad_id, dtype=np.int64)
    tgt = np.full((B, T), IGNORE, dtype=np.int64)
    pos = np.zeros((B, T), dtype=np.int64)
    doc = np.full((B, T), -1, dtype=np.int64)
    for b, row in enumerate(rows):
        p = 0
        for d, i in enumerate(row):
            ids, is_t = examples[i]
            n = len(ids) - 1
            tok[b, p:p + n] = ids[:-1]
            tgt[b, p:p + n] = np.where(is_t[1:], ids[1:], IGNORE)
            pos[b, p:p + n] = np.arange(n)
            doc[b, p:p + n] = d
            p += n
    multi = any(len(r) > 1 for r in rows)
    t = torch.from_numpy
    return Batch(t(tok), t(tgt), t(pos) if multi else None, t(doc) if multi else None,
                 int((tgt != IGNORE).sum()), int(sum(lens)))
