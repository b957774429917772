"""Data: source specs → cleaned, deduplicated, mixed documents → memory-mapped token shards.

What is notable:
- Sources (luca/sources.py) are one string each: a file, a directory, a glob, `.jsonl`/`.json`
  (`field`), `.parquet` (`column`), `hf:NAME[:split]`, `builtin:python` or `synthetic:TASK`, with
  `weight`, `encoding`, `errors`; strict UTF-8 by default, errors name file:line or byte offset.
- Cleaning changes only what is noise everywhere: CRLF → LF, a leading BOM, NUL characters,
  trailing whitespace of the document, and lone surrogates (from JSON escapes; they are not text and
  no tokenizer can encode them) → U+FFFD. Exact duplicates (sha256) are dropped across all sources.
- The validation split is chosen by document hash, so it is stable as sources are added, and holds
  each unique document once. Mixing applies to training only: source i gets a share of training
  characters ∝ its weight (cycling or subsampling its documents in a seeded order); one source of
  weight 1 keeps every document exactly once.
- Token shards are flat uint16 (vocab ≤ 65536) or uint32 files, documents each followed by the
  end-of-text id, ≤ `SHARD_TOKENS` tokens per shard, written atomically and streamed batch by batch;
  the manifest records the tokenizer's checksum so that tokenizing again is a no-op.
- `TokenShards` reads a split through `np.memmap` and pickles without its maps (DataLoader workers
  reopen them), so no worker copies the corpus.
"""
from __future__ import annotations

import hashlib
import json
import random
import re
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from luca import sources as S
from luca.atomic import atomic_path, write_text
from luca.errors import LucaError

SCHEMA_VERSION = 1
SHARD_TOKENS = 2**28  # tokens per shard at most (512 MiB as uint16); tests monkeypatch it small
ENCODE_BATCH_CHARS = 4_000_000  # characters handed to encode_batch at once: bounds the id lists held
SURROGATES = re.compile("[\ud800-\udfff]")


@dataclass
class DataConfig:
    sources: list[str] = field(default_factory=lambda: ["builtin:python"])
    val_fraction: float = 0.01  # share of documents (by hash) in the validation split
    seed: int = 0  # mixing order
    min_chars: int = 1  # drop shorter documents (after cleaning)

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        if not 0 <= self.val_fraction < 1:
            raise LucaError(f"data.val_fraction: must be in [0, 1), not {self.val_fraction}")
        if self.min_chars < 0:
            raise LucaError(f"data.min_chars: must be ≥ 0, not {self.min_chars}")


# -- cleaning, dedup, split, mixing --------------------------------------------------------------
def clean(text: str) -> tuple[str, bytes]:
    """The cleaned text and its UTF-8 bytes (which the caller hashes)."""
    text = text.replace("\r\n", "\n").replace("\0", "").rstrip()
    if text.startswith("\ufeff"):
        text = text[1:]
    try:
        return text, text.encode("utf-8")
    except UnicodeEncodeError:
        text = SURROGATES.sub("\ufffd", text)
        return text, text.encode("utf-8")


def _is_val(sha: str, val_fraction: float) -> bool:
    return int(sha[:8], 16) / 2**32 < val_fraction


def collect(cfg: DataConfig, out_dir: str | Path, progress: bool = True) -> dict:
    """Read, clean, deduplicate, split and mix the sources; write documents/ and manifest.json."""
    out_dir = Path(out_dir)
    sources_specs = [cfg.sources] if isinstance(cfg.sources, str) else list(cfg.sources)
    if not sources_specs:
        raise LucaError("data sources: none given")
    cfg.validate()  # again: fields may have changed since construction
    sources = [S.parse_source(s) for s in sources_specs]
    units = [S.units(s) for s in sources]  # lists files now: a missing or empty glob fails before reading

    seen: set[str] = set()
    docs: list[tuple[int, str, str]] = []  # (source index, sha256, text) of unique documents
    stats = []
    with progress_bar(progress, "collect", sum(map(len, units)), "files") as advance:
        for i, (src, src_units) in enumerate(zip(sources, units)):
            h = hashlib.sha256()
            st = {"spec": src.spec, "weight": src.weight, "files": len(src_units), "documents": 0,
                  "duplicates": 0, "too_short": 0, "chars": 0}
            for read in src_units:
                for origin, raw in read():
                    text, data = clean(raw)
                    sha = hashlib.sha256(data).hexdigest()
                    h.update(f"{origin}\0{sha}\n".encode("utf-8", "replace"))
                    if len(text) < cfg.min_chars:
                        st["too_short"] += 1
                    elif sha in seen:
                        st["duplicates"] += 1
                    else:
                        seen.add(sha)
                        docs.append((i, sha, text))
                        st["documents"] += 1
                        st["chars"] += len(text)
                advance(1)
            st["sha256"] = h.hexdigest()
            if not st["documents"]:
                why = (f"all {st['duplicates']} documents duplicate earlier ones" if st["duplicates"]
                       else f"{st['too_short']} documents, all shorter than min_chars={cfg.min_chars}"
                       if st["too_short"] else "no documents")
                raise LucaError(f"{src.spec}: no documents after cleaning ({why})")
            stats.append(st)

    # Synthetic tasks train only: validation stays on the text ("train on structure, test on text").
    synth = [sources[i].kind == "synthetic" for i, _, _ in docs]
    val = [_is_val(sha, cfg.val_fraction) and not sy for (_, sha, _), sy in zip(docs, synth)]
    if len(docs) >= 2 and cfg.val_fraction > 0:
        # Evaluation needs a validation document and training a training one, however small the corpus.
        by_hash = sorted(range(len(docs)), key=lambda j: (synth[j], docs[j][1]))
        if not any(val):
            val[by_hash[0]] = True
        if all(val):
            val[by_hash[-1]] = False
    val_docs = [t for (_, _, t), v in zip(docs, val) if v]
    train_by_source: list[list[str]] = [[] for _ in sources]
    for (i, _, t), v in zip(docs, val):
        if not v:
            train_by_source[i].append(t)
    train_docs = _mix(train_by_source, [s.weight for s in sources], cfg.seed, stats)

    docs_dir = out_dir / "documents"
    for split, items in (("train", train_docs), ("val", val_docs)):
        with atomic_path(docs_dir / f"{split}.jsonl") as tmp, open(tmp, "w", encoding="utf-8") as f:
            for t in items:
                f.write(json.dumps(t) + "\n")  # ASCII-only lines: any reader splits them correctly
    manifest = {
        "schema_version": SCHEMA_VERSION,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "config": {**asdict(cfg), "sources": sources_specs},
        "sources": stats,
        "documents": {"train": len(train_docs), "val": len(val_docs)},
        "unique_documents": {"train": len(docs) - len(val_docs), "val": len(val_docs)},
        "chars": {"train": sum(map(len, train_docs)), "val": sum(map(len, val_docs))},
    }
    _write_manifest(out_dir, manifest)
    for old in (out_dir / "tokens").glob("*.bin"):  # shards of the old documents are stale now
        old.unlink()
    return manifest


def _mix(by_source: list[list[str]], weights: list[float], seed: int, stats: list[dict]) -> list[str]:
    """Training documents where source i supplies ∝ weight_i of the characters, in a seeded order."""
    sizes = [sum(map(len, d)) for d in by_source]
    live = [i for i, n in enumerate(sizes) if n > 0]  # a source whose documents all went to val can't mix
    total, wsum = sum(sizes), sum(weights[i] for i in live)
    out: list[str] = []
    for i, docs in enumerate(by_source):
        target = total * weights[i] / wsum if i in live else 0.0
        rng = random.Random(f"{seed}:{i}")  # str seeds hash with sha512: stable across processes
        taken, order = 0, []
        while taken < target:
            if not order:
                order = list(range(len(docs)))
                rng.shuffle(order)  # a fresh order each epoch
            n = len(docs[order[-1]])
            if taken + n / 2 > target:  # take the last document only if that lands nearer the target
                break
            out.append(docs[order.pop()])
            taken += n
        stats[i]["train_chars"] = taken
        stats[i]["epochs"] = round(taken / sizes[i], 4) if sizes[i] else 0.0
    random.Random(f"{seed}:mix").shuffle(out)
    return out


def iter_documents(data_dir: str | Path, split: str) -> Iterator[str]:
    """The documents of a split, in training order (repeats included for train)."""
    path = Path(data_dir) / "documents" / f"{split}.jsonl"
    if not path.is_file():
        raise LucaError(f"{path}: no such file; collect the data first")
    with open(path, encoding="utf-8", newline="\n") as f:
        lineno = 0
        try:
            for lineno, line in enumerate(f, 1):
                doc = json.loads(line)
                if not isinstance(doc, str):
                    raise ValueError(f"a JSON {type(doc).__name__}, not a string")
                yield doc
        except UnicodeDecodeError:
            raise LucaError(f"{path}:{lineno + 1}: not UTF-8; collect the data again") from None
        except (ValueError, RecursionError) as e:
            raise LucaError(f"{path}:{lineno}: not a document written by collect ({e}); collect again") from None


def _read_manifest(data_dir: Path) -> dict:
    path = data_dir / "manifest.json"
    if not path.is_file():
        raise LucaError(f"{path}: no such file; collect the data first")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise LucaError(f"{path}:{e.lineno}: not valid JSON: {e.msg}") from None
    except (UnicodeDecodeError, RecursionError):
        raise LucaError(f"{path}: not valid JSON") from None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("documents", {}), dict):
        raise LucaError(f"{path}: not a data manifest; collect the data again")
    return manifest


def _tokens_valid(tokens: object) -> bool:
    """Whether a manifest's `tokens` section is well formed (a damaged or forged one is not), with
    shard files named inside tokens/."""
    try:
        ok = np.dtype(tokens["dtype"]) in (np.uint16, np.uint32) and isinstance(tokens["tokenizer_checksum"], str) \
            and isinstance(tokens["vocab_size"], int)
        for split in ("train", "val"):
            for sh in tokens[split]["shards"]:
                f, n = sh["file"], sh["n_tokens"]
                ok = ok and isinstance(f, str) and Path(f).name == f and f.endswith(".bin") \
                    and isinstance(n, int) and n >= 0
        return bool(ok)
    except (KeyError, TypeError, ValueError):
        return False


def _write_manifest(data_dir: Path, manifest: dict) -> None:
    write_text(data_dir / "manifest.json", json.dumps(manifest, indent=2) + "\n")


# -- tokens --------------------------------------------------------------------------------------
def tokenizer_checksum(tokenizer) -> str:
    return hashlib.sha256(tokenizer.tok.to_str().encode("utf-8")).hexdigest()


def _shards_intact(data_dir: Path, tokens: dict) -> bool:
    size = np.dtype(tokens["dtype"]).itemsize
    for split in ("train", "val"):
        for s in tokens.get(split, {}).get("shards", []):
            p = data_dir / "tokens" / s["file"]
            if not p.is_file() or p.stat().st_size != s["n_tokens"] * size:
                return False
    return True


def tokenize(data_dir: str | Path, tokenizer, progress: bool = True) -> dict:
    """Write tokens/{split}_{k:03d}.bin for train and val; a no-op when done with this tokenizer."""
    data_dir = Path(data_dir)
    manifest = _read_manifest(data_dir)
    checksum = tokenizer_checksum(tokenizer)
    done = manifest.get("tokens")
    if _tokens_valid(done) and done["tokenizer_checksum"] == checksum and _shards_intact(data_dir, done):
        return manifest
    # Forget the old shards first: a crash half-way must not leave a manifest vouching for them.
    manifest.pop("tokens", None)
    _write_manifest(data_dir, manifest)
    dtype = np.dtype(np.uint16 if tokenizer.vocab_size <= 65536 else np.uint32)
    tokens: dict = {}
    total = sum(n for s, n in manifest.get("documents", {}).items() if s in ("train", "val") and isinstance(n, int))
    with progress_bar(progress, "tokenize", total, "docs") as advance:
        for split in ("train", "val"):
            tokens[split] = _tokenize_split(data_dir, split, tokenizer, dtype, advance)
    tokens.update(dtype=dtype.name, tokenizer_checksum=checksum, vocab_size=tokenizer.vocab_size)
    manifest["tokens"] = tokens
    _write_manifest(data_dir, manifest)
    return manifest


def _tokenize_split(data_dir: Path, split: str, tokenizer, dtype: np.dtype, advance) -> dict:
    shards = _write_shards(_token_arrays(data_dir, split, tokenizer, dtype, advance), data_dir / "tokens", split)
    keep = {s["file"] for s in shards}
    for old in (data_dir / "tokens").glob(f"{split}_*.bin"):  # beyond the new count: an older tokenization
        if old.name not in keep:
            old.unlink()
    return {"n_tokens": sum(s["n_tokens"] for s in shards), "shards": shards}


def _token_arrays(data_dir: Path, split: str, tokenizer, dtype: np.dtype, advance) -> Iterator[np.ndarray]:
    """The split's tokens, one array per batch of documents (never the whole corpus as Python ints)."""
    batch: list[str] = []
    chars = 0
    for text in iter_documents(data_dir, split):
        batch.append(text)
        chars += len(text)
        if chars >= ENCODE_BATCH_CHARS:
            yield _encode(tokenizer, batch, dtype)
            advance(len(batch))
            batch, chars = [], 0
    if batch:
        yield _encode(tokenizer, batch, dtype)
        advance(len(batch))


def _encode(tokenizer, texts: list[str], dtype: np.dtype) -> np.ndarray:
    ids = tokenizer.encode_batch(texts)
    out = np.empty(sum(map(len, ids)) + len(ids), dtype=dtype)
    pos = 0
    for seq in ids:
        out[pos:pos + len(seq)] = seq
        pos += len(seq)
        out[pos] = tokenizer.eot_id
        pos += 1
    return out


def _write_shards(arrays: Iterator[np.ndarray], directory: Path, split: str) -> list[dict]:
    """Stream arrays into shards of at most SHARD_TOKENS tokens, each renamed into place when complete."""
    shards: list[dict] = []
    pending: np.ndarray | None = np.empty(0)
    while True:
        while pending is not None and not len(pending):
            pending = next(arrays, None)
        if pending is None:
            return shards
        name, n, sha = f"{split}_{len(shards):03d}.bin", 0, hashlib.sha256()
        with atomic_path(directory / name) as tmp, open(tmp, "wb") as f:
            while pending is not None and n < SHARD_TOKENS:  # read at call time: tests monkeypatch it
                part, pending = pending[:SHARD_TOKENS - n], pending[SHARD_TOKENS - n:]
                data = part.tobytes()
                f.write(data)
                sha.update(data)
                n += len(part)
                while pending is not None and not len(pending):
                    pending = next(arrays, None)
        shards.append({"file": name, "n_tokens": n, "sha256": sha.hexdigest()})


class TokenShards:
    """Memory-mapped reader of one split's token shards, seen as one flat array."""

    def __init__(self, data_dir: str | Path, split: str):
        self.data_dir, self.split = Path(data_dir), split
        tokens = _read_manifest(self.data_dir).get("tokens")
        if not tokens:
            raise LucaError(f"{self.data_dir}: not tokenized yet; run tokenize first")
        if not _tokens_valid(tokens):
            raise LucaError(f"{self.data_dir / 'manifest.json'}: its tokens section is damaged; tokenize again")
        if split not in tokens:
            raise LucaError(f"{self.data_dir}: no split {split!r} in the token shards")
        if not _shards_intact(self.data_dir, tokens):
            raise LucaError(f"{self.data_dir / 'tokens'}: shard files are missing or truncated; tokenize again")
        self.dtype = np.dtype(tokens["dtype"])
        self.tokenizer_checksum: str = tokens["tokenizer_checksum"]
        self.vocab_size: int = tokens["vocab_size"]
        shards = [s for s in tokens[split]["shards"] if s["n_tokens"] > 0]
        self._paths = [self.data_dir / "tokens" / s["file"] for s in shards]
        self._starts = np.cumsum([0] + [s["n_tokens"] for s in shards])
        self.n_tokens: int = int(self._starts[-1])
        self._maps: list[np.memmap] | None = None

    def __getstate__(self) -> dict:
        # Pickling a memmap copies its data: send the paths and let the receiver map them again.
        return {**self.__dict__, "_maps": None}

    @property
    def maps(self) -> list[np.memmap]:
        if self._maps is None:
            self._maps = [np.memmap(p, dtype=self.dtype, mode="r") for p in self._paths]
        return self._maps

    def __len__(self) -> int:
        return self.n_tokens

    def window(self, start: int, length: int) -> np.ndarray:
        """Tokens [start, start + length) as int64, across shard boundaries."""
        if start < 0 or length < 0 or start + length > self.n_tokens:
            raise IndexError(f"window [{start}, {start + length}) outside {self.split}'s {self.n_tokens} tokens")
        out = np.empty(length, dtype=np.int64)
        k = int(np.searchsorted(self._starts, start, side="right")) - 1
        pos = 0
        while pos < length:
            lo = start + pos - int(self._starts[k])
            n = min(length - pos, int(self._starts[k + 1] - self._starts[k]) - lo)
            out[pos:pos + n] = self.maps[k][lo:lo + n]
            pos += n
            k += 1
        return out

    def num_chunks(self, seq_len: int) -> int:
        """Non-overlapping training chunks: (seq_len + 1)-token windows at stride seq_len."""
        return max(0, (self.n_tokens - 1) // seq_len)

    def chunk(self, i: int, seq_len: int) -> np.ndarray:
        return self.window(i * seq_len, seq_len + 1)


# -- progress ----------------------------------------------------------------------------------
@contextmanager
def progress_bar(enabled: bool, desc: str, total: int, unit: str) -> Iterator[Callable[[int], None]]:
    """A rich progress bar (count, rate, ETA) on stderr, or a no-op."""
    if not enabled:
        yield lambda n: None
        return
    from rich.console import Console
    from rich.progress import (BarColumn, MofNCompleteColumn, Progress, ProgressColumn, TextColumn,
                               TimeElapsedColumn, TimeRemainingColumn)
    from rich.text import Text

    class Rate(ProgressColumn):
        def render(self, task) -> Text:
            return Text(f"{task.speed:,.0f} {unit}/s" if task.speed else f"? {unit}/s")

    cols = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), Rate(),
            TimeElapsedColumn(), TimeRemainingColumn())
    with Progress(*cols, console=Console(stderr=True), transient=False) as bar:
        task = bar.add_task(desc, total=total)
        yield lambda n: bar.advance(task, n)
