"""Data: source specs → cleaned, deduplicated, mixed documents → memory-mapped token shards.

What is notable:
- A source is one string, `LOCATION[?key=value&...]`: a text file (one document), a `.jsonl`/`.json`
  file (`field`), a `.parquet` file (`column`), a directory (its text files, recursively), a glob,
  `hf:NAME[:split]` (`datasets`; `save_to_disk` folders load offline; `config=` picks a dataset
  configuration) or `builtin:python` (the
  interpreter's standard library without its tests, plus the `pydoc_data` topics), or
  `synthetic:TASK?n=N&seed=S` (luca/synthetic.py's structured tasks; their documents are kept out
  of the validation split). Any source takes
  `weight`, `encoding` and `errors`; an unknown key is an error, not a silent no-op.
- Strict UTF-8 by default: a bad byte is an error naming the file and byte offset, and the two
  ways out (`?encoding=latin-1`, `?errors=replace`). JSON errors name file:line.
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

import codecs
import glob as globlib
import hashlib
import json
import math
import os
import random
import re
import sysconfig
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Iterator
from urllib.parse import unquote

import numpy as np

from luca.atomic import atomic_path, write_text
from luca.errors import LucaError

SCHEMA_VERSION = 1
SHARD_TOKENS = 2**28  # tokens per shard at most (512 MiB as uint16); tests monkeypatch it small
ENCODE_BATCH_CHARS = 4_000_000  # characters handed to encode_batch at once: bounds the id lists held
OPTION_KEYS = {"weight", "encoding", "errors", "field", "column", "config", "n", "seed"}
TEXT_EXTS = set(
    ".txt .text .md .markdown .rst .org .adoc .tex .py .pyi .pyx .c .h .cc .cpp .hpp .cu .rs .go .java .kt "
    ".scala .swift .js .mjs .ts .tsx .jsx .rb .php .pl .lua .jl .r .sh .bash .zsh .sql .html .htm .css .xml "
    ".svg .yaml .yml .toml .ini .cfg .csv .tsv .hs .ml .ex .el .vim .dart .cs .fs .m .zig .nim".split())
STRUCTURED_EXTS = {".jsonl", ".json", ".parquet"}
_SURROGATE = re.compile("[\ud800-\udfff]")


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


@dataclass(frozen=True)
class Source:
    spec: str  # as the user wrote it: error messages and the manifest name the source by it
    kind: str  # "file", "dir", "glob", "hf" or "builtin"
    location: str
    weight: float = 1.0
    encoding: str = "utf-8"
    errors: str = "strict"
    field: str = "text"  # JSON / hf
    column: str = "text"  # Parquet
    split: str | None = None  # hf
    config: str | None = None  # hf: the dataset's configuration name (wikitext-2-raw-v1, ...)
    n: int = 10000  # synthetic: how many examples
    seed: int = 0  # synthetic


# -- specs -------------------------------------------------------------------------------------
def parse_source(spec: str) -> Source:
    """Parse `LOCATION[?key=value&...]`; LucaError on an unknown key or a bad value."""
    if not isinstance(spec, str) or not spec.strip():
        raise LucaError(f"data source {spec!r}: empty spec")
    spec = spec.strip()
    location, opts = spec, {}
    head, sep, query = spec.rpartition("?")
    # '?' is also a glob wildcard (and may be in a file name): only a tail of key=value pairs is a query.
    if sep and query and all("=" in p for p in query.split("&")) and not os.path.exists(spec):
        location = head
        for part in query.split("&"):
            k, _, v = part.partition("=")
            k, v = unquote(k.strip()), unquote(v.strip())
            if k not in OPTION_KEYS:
                raise LucaError(f"{spec}: unknown option {k!r} (known: {', '.join(sorted(OPTION_KEYS))})")
            opts[k] = v
    kw: dict = {}
    if "weight" in opts:
        try:
            kw["weight"] = float(opts["weight"])
        except ValueError:
            kw["weight"] = math.nan
        if not (math.isfinite(kw["weight"]) and kw["weight"] > 0):
            raise LucaError(f"{spec}: weight must be a number > 0, not {opts['weight']!r}")
    if "encoding" in opts:
        try:
            info = codecs.lookup(opts["encoding"])
            "\n".encode(info.name)  # 'undefined' fails here; bytes-to-bytes codecs (base64) below
            if not info._is_text_encoding:
                raise LookupError
            kw["encoding"] = info.name
        except (LookupError, UnicodeError):
            raise LucaError(f"{spec}: unknown encoding {opts['encoding']!r} (a text encoding such as utf-8)") from None
    if "errors" in opts:
        if opts["errors"] not in ("strict", "replace"):
            raise LucaError(f"{spec}: errors must be 'strict' or 'replace', not {opts['errors']!r}")
        kw["errors"] = opts["errors"]
    for k in ("field", "column", "config"):
        if k in opts:
            if not opts[k]:
                raise LucaError(f"{spec}: option {k!r} is empty")
            kw[k] = opts[k]

    if location.startswith("synthetic:"):  # luca/synthetic.py's tasks, training-only documents
        from luca import synthetic
        task = location[len("synthetic:"):]
        if task != "all" and task not in synthetic.TASKS:
            raise LucaError(f"{spec}: unknown synthetic task {task!r} (tasks: {', '.join(synthetic.TASKS)}, all)")
        for k in ("n", "seed"):
            if k in opts:
                try:
                    kw[k] = int(opts[k])
                except ValueError:
                    raise LucaError(f"{spec}: {k} must be an integer, not {opts[k]!r}") from None
        if kw.get("n", 1) < 1:
            raise LucaError(f"{spec}: n must be ≥ 1")
        return Source(spec, "synthetic", task, **kw)
    if "n" in opts or "seed" in opts:
        raise LucaError(f"{spec}: options n and seed belong to synthetic: sources")
    if location.startswith("builtin:"):
        if location != "builtin:python":
            raise LucaError(f"{spec}: unknown builtin source (known: builtin:python)")
        return Source(spec, "builtin", location, **kw)
    if location.startswith("hf:"):
        name, split = location[3:], None
        if not Path(name).expanduser().is_dir() and ":" in name:
            name, _, split = name.rpartition(":")
        if not name:
            raise LucaError(f"{spec}: no dataset name after 'hf:'")
        return Source(spec, "hf", name, split=split or None, **kw)
    path = os.path.expanduser(location)
    if os.path.isdir(path):
        return Source(spec, "dir", path, **kw)
    if os.path.isfile(path):
        return Source(spec, "file", path, **kw)
    if globlib.has_magic(path):
        return Source(spec, "glob", path, **kw)
    raise LucaError(f"{spec}: no such file or directory")


# -- reading -----------------------------------------------------------------------------------
# A source is a list of units (a file, a dataset, the pydoc topics), each a function yielding
# (origin, text): collect's progress bar counts units without reading them first.
Reader = Callable[[], Iterator[tuple[str, str]]]


def iter_source(src: Source) -> Iterator[tuple[str, str]]:
    """(origin, raw text) of every document of `src`; origin is "file.txt" or "file.jsonl:LINE"."""
    for read in _units(src):
        yield from read()


def _units(src: Source) -> list[Reader]:
    if src.kind == "synthetic":
        from luca import synthetic
        return [lambda: synthetic.iter_documents(src.location, src.n, src.seed)]
    if src.kind == "hf":
        return [lambda: _read_hf(src)]
    if src.kind == "builtin":
        return [_file_reader(p, src) for p in builtin_python_files()] + [_read_pydoc_topics]
    if src.kind == "file":
        files = [Path(src.location)]
    elif src.kind == "dir":
        files = _walk_text_files(Path(src.location))
        if not files:
            structured = [p for p in _walk(Path(src.location)) if p.suffix.lower() in STRUCTURED_EXTS]
            hint = f" (it has {len(structured)} .jsonl/.json/.parquet files: name them with a glob such " \
                   f"as '{os.path.join(src.location, '**', '*' + structured[0].suffix)}')" if structured else ""
            raise LucaError(f"{src.spec}: directory has no text files{hint}")
    else:
        matched = sorted(Path(p) for p in globlib.glob(src.location, recursive=True) if os.path.isfile(p))
        files = [p for p in matched if p.suffix.lower() in STRUCTURED_EXTS or not _is_binary(p)]
        if not files:
            what = f"only binary files ({len(matched)})" if matched else "nothing"
            raise LucaError(f"{src.spec}: glob matches {what}")
    return [_file_reader(p, src) for p in files]


def _walk(root: Path) -> Iterator[Path]:
    """Files under root, skipping hidden files and directories."""
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            if not name.startswith("."):
                yield Path(dirpath) / name


def _walk_text_files(root: Path) -> list[Path]:
    return sorted(p for p in _walk(root) if p.suffix.lower() in TEXT_EXTS and not _is_binary(p))


def _is_binary(path: Path) -> bool:
    """A NUL byte in the first 8 KiB: how git and grep tell binary files (UTF-16 counts too)."""
    try:
        with open(path, "rb") as f:
            return b"\0" in f.read(8192)
    except OSError:
        return True


def builtin_python_files() -> list[Path]:
    """The standard library's .py files, sorted; tests, site-packages, caches and generated tables left out.

    Machine-generated tables are dropped because a few MB of hex codec maps would otherwise be what a
    small model learns first: the ~60 charmap codecs in `encodings/`, `_sysconfigdata*` and
    `pydoc_data/topics.py` (its prose is read as documents of its own by `_read_pydoc_topics`).
    """
    root = Path(sysconfig.get_paths()["stdlib"])
    skip = {"site-packages", "dist-packages", "__pycache__", "idle_test"}
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames
                             if d not in skip and not d.startswith(("test", ".")))
        out += [Path(dirpath) / f for f in filenames if f.endswith(".py") and not f.startswith("test_")
                and not f.startswith("_sysconfigdata")]
    return sorted(p for p in out if not _is_generated_table(p, root))


def _is_generated_table(path: Path, root: Path) -> bool:
    if path.relative_to(root).as_posix() == "pydoc_data/topics.py":
        return True
    if path.parent.name != "encodings":
        return False
    with open(path, "rb") as f:
        return b"Python Character Mapping Codec" in f.read(200)


def _read_pydoc_topics() -> Iterator[tuple[str, str]]:
    from pydoc_data.topics import topics
    for name in sorted(topics):
        yield f"pydoc_data.topics:{name}", topics[name]


def _file_reader(path: Path, src: Source) -> Reader:
    ext = path.suffix.lower()
    if ext in (".jsonl", ".json"):
        return lambda: _read_json(path, src)
    if ext == ".parquet":
        return lambda: _read_parquet(path, src)
    return lambda: iter([(str(path), _decode(path.read_bytes(), path, src))])


def _decode(data: bytes, where: object, src: Source, offset: int = 0) -> str:
    try:
        return data.decode(src.encoding, src.errors)
    except UnicodeDecodeError as e:
        raise LucaError(f"{where}: byte {offset + e.start}: not valid {src.encoding} ({e.reason}); "
                        "pass ?encoding=latin-1 or ?errors=replace") from None
    except UnicodeError as e:  # codecs such as idna fail without a position, and under any errors=
        raise LucaError(f"{where}: not valid {src.encoding} ({e}); pass ?encoding=latin-1") from None


def _read_json(path: Path, src: Source) -> Iterator[tuple[str, str]]:
    """JSON lines (or, for .json, one JSON array) → the `field` of each record; a bare string is the text."""
    with open(path, "rb") as f:
        is_array = f.read(64).lstrip(codecs.BOM_UTF8).lstrip().startswith(b"[")
    if is_array and path.suffix.lower() == ".json":
        try:
            records = json.loads(_decode(path.read_bytes(), path, src).lstrip("\ufeff"))
        except json.JSONDecodeError as e:
            raise LucaError(f"{path}:{e.lineno}: not valid JSON: {e.msg}") from None
        except RecursionError:
            raise LucaError(f"{path}: JSON nested too deeply") from None
        for i, rec in enumerate(records):
            yield f"{path}[{i}]", _field(rec, src.field, f"{path}[{i}]")
        return
    for lineno, line in _lines(path, src):
        if lineno == 1:
            line = line.lstrip("\ufeff")
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise LucaError(f"{path}:{lineno}: not valid JSON: {e.msg} (column {e.colno})") from None
        except RecursionError:
            raise LucaError(f"{path}:{lineno}: JSON nested too deeply") from None
        yield f"{path}:{lineno}", _field(rec, src.field, f"{path}:{lineno}")


def _lines(path: Path, src: Source) -> Iterator[tuple[int, str]]:
    """(line number, text) streamed from disk; a bad byte's offset is counted from the file's start."""
    if "\n".encode(src.encoding) != b"\n":  # UTF-16 and kin can't be split at byte 0x0A: decode it whole
        yield from enumerate(_decode(path.read_bytes(), path, src).split("\n"), 1)
        return
    offset = 0
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            yield lineno, _decode(raw, path, src, offset)
            offset += len(raw)


def _field(rec: object, name: str, where: str) -> str:
    if isinstance(rec, str):
        return rec  # documents/*.jsonl (one JSON string a line) reads back as a source
    if isinstance(rec, dict) and isinstance(rec.get(name), str):
        return rec[name]
    fields = ", ".join(rec) if isinstance(rec, dict) else f"a JSON {type(rec).__name__}, not an object"
    raise LucaError(f"{where}: no string field {name!r} (fields: {fields})")


def _read_parquet(path: Path, src: Source) -> Iterator[tuple[str, str]]:
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise LucaError(f"{path}: reading Parquet needs pyarrow: pip install 'luca[parquet]'") from None
    try:
        pf = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as e:
        raise LucaError(f"{path}: not a readable Parquet file ({e})") from None
    names = pf.schema_arrow.names
    if src.column not in names:
        raise LucaError(f"{path}: no column {src.column!r} (columns: {', '.join(names)})")
    kind = pf.schema_arrow.field(src.column).type
    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind)):
        raise LucaError(f"{path}: column {src.column!r} holds {kind}, not strings")
    row = 0
    batches = pf.iter_batches(columns=[src.column], batch_size=8192)
    while True:
        try:  # a damaged page shows only when it is read
            batch = next(batches, None)
        except (pa.ArrowException, OSError) as e:
            raise LucaError(f"{path}: row {row} on: not a readable Parquet file ({e})") from None
        if batch is None:
            return
        for text in batch.column(0).to_pylist():
            if text is None:
                raise LucaError(f"{path}:{row}: column {src.column!r} is null")
            yield f"{path}:{row}", text
            row += 1


def _read_hf(src: Source) -> Iterator[tuple[str, str]]:
    try:
        import datasets
    except ImportError:
        raise LucaError(f"{src.spec}: needs the datasets library: pip install 'luca[hf]'") from None
    local = Path(src.location).expanduser()
    try:
        if (local / "dataset_dict.json").is_file() or (local / "state.json").is_file():
            ds = datasets.load_from_disk(str(local))
            if isinstance(ds, datasets.DatasetDict):
                splits = list(ds)
                split = src.split or ("train" if "train" in ds or len(splits) != 1 else splits[0])
                if split not in ds:
                    raise LucaError(f"{src.spec}: no split {split!r} (splits: {', '.join(splits)})")
                ds = ds[split]
            elif src.split:
                raise LucaError(f"{src.spec}: {local} holds one split; drop ':{src.split}'")
        else:
            ds = datasets.load_dataset(src.location, src.config, split=src.split or "train")
    except LucaError:
        raise
    except Exception as e:  # network, missing dataset, bad split: all the user's to fix
        raise LucaError(f"{src.spec}: cannot load dataset: {type(e).__name__}: {e}") from None
    if src.field not in ds.column_names:
        raise LucaError(f"{src.spec}: no field {src.field!r} (fields: {', '.join(ds.column_names)})")
    row = 0
    for batch in ds.select_columns([src.field]).iter(batch_size=4096):
        for text in batch[src.field]:
            if not isinstance(text, str):
                raise LucaError(f"{src.spec}: row {row}: field {src.field!r} is {type(text).__name__}, not a string")
            yield f"{src.spec}:{row}", text
            row += 1


# -- cleaning, dedup, split, mixing --------------------------------------------------------------
def clean(text: str) -> tuple[str, bytes]:
    """The cleaned text and its UTF-8 bytes (which the caller hashes)."""
    text = text.replace("\r\n", "\n").replace("\0", "").rstrip()
    if text.startswith("\ufeff"):
        text = text[1:]
    try:
        return text, text.encode("utf-8")
    except UnicodeEncodeError:
        text = _SURROGATE.sub("\ufffd", text)
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
    sources = [parse_source(s) for s in sources_specs]
    units = [_units(s) for s in sources]  # lists files now: a missing or empty glob fails before reading

    seen: set[str] = set()
    docs: list[tuple[int, str, str]] = []  # (source index, sha256, text) of unique documents
    stats = []
    with _progress(progress, "collect", sum(map(len, units)), "files") as advance:
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
    with _progress(progress, "tokenize", total, "docs") as advance:
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
def _progress(enabled: bool, desc: str, total: int, unit: str) -> Iterator[Callable[[int], None]]:
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
