"""Sources: what a data spec names, and readers that stream its documents or records.

What is notable:
- A source is one string, `LOCATION[?key=value&...]`: a text file (one document), a `.jsonl`/`.json`
  file (`field`), a `.parquet` file (`column`), a directory (its text files, recursively), a glob,
  `hf:NAME[:split]` (`datasets`; `save_to_disk` folders load offline; `config=` picks a dataset
  configuration), `builtin:python` (the interpreter's standard library without its tests and
  generated tables, plus the `pydoc_data` topics) or `synthetic:TASK?n=N&seed=S` (luca/synthetic.py).
  Any source takes `weight`, `encoding` and `errors`; an unknown key is an error, not a silent no-op.
- Strict UTF-8 by default: a bad byte is an error naming the file and byte offset, and the two
  ways out (`?encoding=latin-1`, `?errors=replace`). JSON errors name file:line, Parquet errors
  file:row, dataset errors spec:row.
- Two layers: record readers (`json_records`, `parquet_rows`, `hf_dataset`) that pre-training data
  (luca/data.py: one text field a record) and chat data (luca/finetune/chat_data.py: whole records)
  share, and `iter_source` / `units` that turn a source into (origin, text) documents.
"""
from __future__ import annotations

import codecs
import glob as globlib
import json
import math
import os
import sysconfig
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator
from urllib.parse import unquote

from luca.errors import LucaError

OPTION_KEYS = {"weight", "encoding", "errors", "field", "column", "config", "n", "seed"}
TEXT_EXTS = set(
    ".txt .text .md .markdown .rst .org .adoc .tex .py .pyi .pyx .c .h .cc .cpp .hpp .cu .rs .go .java .kt "
    ".scala .swift .js .mjs .ts .tsx .jsx .rb .php .pl .lua .jl .r .sh .bash .zsh .sql .html .htm .css .xml "
    ".svg .yaml .yml .toml .ini .cfg .csv .tsv .hs .ml .ex .el .vim .dart .cs .fs .m .zig .nim".split())
STRUCTURED_EXTS = {".jsonl", ".json", ".parquet"}


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
    for read in units(src):
        yield from read()


def units(src: Source) -> list[Reader]:
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
        files = walk_text_files(Path(src.location))
        if not files:
            structured = [p for p in walk(Path(src.location)) if p.suffix.lower() in STRUCTURED_EXTS]
            hint = f" (it has {len(structured)} .jsonl/.json/.parquet files: name them with a glob such " \
                   f"as '{os.path.join(src.location, '**', '*' + structured[0].suffix)}')" if structured else ""
            raise LucaError(f"{src.spec}: directory has no text files{hint}")
    else:
        matched = sorted(Path(p) for p in globlib.glob(src.location, recursive=True) if os.path.isfile(p))
        files = [p for p in matched if p.suffix.lower() in STRUCTURED_EXTS or not is_binary(p)]
        if not files:
            what = f"only binary files ({len(matched)})" if matched else "nothing"
            raise LucaError(f"{src.spec}: glob matches {what}")
    return [_file_reader(p, src) for p in files]


def walk(root: Path) -> Iterator[Path]:
    """Files under root, skipping hidden files and directories."""
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            if not name.startswith("."):
                yield Path(dirpath) / name


def walk_text_files(root: Path) -> list[Path]:
    return sorted(p for p in walk(root) if p.suffix.lower() in TEXT_EXTS and not is_binary(p))


def is_binary(path: Path) -> bool:
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
    return lambda: iter([(str(path), decode(path.read_bytes(), path, src))])


def decode(data: bytes, where: object, src: Source, offset: int = 0) -> str:
    try:
        return data.decode(src.encoding, src.errors)
    except UnicodeDecodeError as e:
        raise LucaError(f"{where}: byte {offset + e.start}: not valid {src.encoding} ({e.reason}); "
                        "pass ?encoding=latin-1 or ?errors=replace") from None
    except UnicodeError as e:  # codecs such as idna fail without a position, and under any errors=
        raise LucaError(f"{where}: not valid {src.encoding} ({e}); pass ?encoding=latin-1") from None


def json_records(path: Path, src: Source) -> Iterator[tuple[str, object]]:
    """(origin, record) of JSON lines, or of one JSON array for a .json file that holds one."""
    with open(path, "rb") as f:
        is_array = f.read(64).lstrip(codecs.BOM_UTF8).lstrip().startswith(b"[")
    if is_array and path.suffix.lower() == ".json":
        try:
            records = json.loads(decode(path.read_bytes(), path, src).lstrip("\ufeff"))
        except json.JSONDecodeError as e:
            raise LucaError(f"{path}:{e.lineno}: not valid JSON: {e.msg}") from None
        except RecursionError:
            raise LucaError(f"{path}: JSON nested too deeply") from None
        for i, rec in enumerate(records):
            yield f"{path}[{i}]", rec
        return
    for lineno, line in lines(path, src):
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
        yield f"{path}:{lineno}", rec


def _read_json(path: Path, src: Source) -> Iterator[tuple[str, str]]:
    """The `field` of each JSON record; a bare string is the text."""
    for origin, rec in json_records(path, src):
        yield origin, text_field(rec, src.field, origin)


def lines(path: Path, src: Source) -> Iterator[tuple[int, str]]:
    """(line number, text) streamed from disk; a bad byte's offset is counted from the file's start."""
    if "\n".encode(src.encoding) != b"\n":  # UTF-16 and kin can't be split at byte 0x0A: decode it whole
        yield from enumerate(decode(path.read_bytes(), path, src).split("\n"), 1)
        return
    offset = 0
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            yield lineno, decode(raw, path, src, offset)
            offset += len(raw)


def text_field(rec: object, name: str, where: str) -> str:
    if isinstance(rec, str):
        return rec  # documents/*.jsonl (one JSON string a line) reads back as a source
    if isinstance(rec, dict) and isinstance(rec.get(name), str):
        return rec[name]
    fields = ", ".join(rec) if isinstance(rec, dict) else f"a JSON {type(rec).__name__}, not an object"
    raise LucaError(f"{where}: no string field {name!r} (fields: {fields})")


def _parquet_open(path: Path):
    """(pyarrow, schema, batches(columns, batch_size)) of a Parquet file, opened once; a damaged
    file or page is a LucaError."""
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise LucaError(f"{path}: reading Parquet needs pyarrow: pip install 'luca[parquet]'") from None
    try:
        pf = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as e:
        raise LucaError(f"{path}: not a readable Parquet file ({e})") from None

    def batches(columns: list[str] | None, batch_size: int):
        it, row = pf.iter_batches(columns=columns, batch_size=batch_size), 0
        while True:
            try:  # a damaged page shows only when it is read
                batch = next(it, None)
            except (pa.ArrowException, OSError) as e:
                raise LucaError(f"{path}: row {row} on: not a readable Parquet file ({e})") from None
            if batch is None:
                return
            yield batch
            row += batch.num_rows
    return pa, pf.schema_arrow, batches


def parquet_rows(path: Path) -> Iterator[tuple[str, dict]]:
    """(origin, row as a dict) of every row of a Parquet file."""
    _, _, batches = _parquet_open(path)
    row = 0
    for batch in batches(None, 4096):
        for rec in batch.to_pylist():
            yield f"{path}:{row}", rec
            row += 1


def _read_parquet(path: Path, src: Source) -> Iterator[tuple[str, str]]:
    pa, schema, batches = _parquet_open(path)
    if src.column not in schema.names:
        raise LucaError(f"{path}: no column {src.column!r} (columns: {', '.join(schema.names)})")
    kind = schema.field(src.column).type
    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind)):
        raise LucaError(f"{path}: column {src.column!r} holds {kind}, not strings")
    row = 0
    for batch in batches([src.column], 8192):
        for text in batch.column(0).to_pylist():
            if text is None:
                raise LucaError(f"{path}:{row}: column {src.column!r} is null")
            yield f"{path}:{row}", text
            row += 1


def hf_dataset(src: Source):
    """The `datasets.Dataset` an `hf:` source names (a `save_to_disk` folder loads offline)."""
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
    return ds


def _read_hf(src: Source) -> Iterator[tuple[str, str]]:
    ds = hf_dataset(src)
    if src.field not in ds.column_names:
        raise LucaError(f"{src.spec}: no field {src.field!r} (fields: {', '.join(ds.column_names)})")
    row = 0
    for batch in ds.select_columns([src.field]).iter(batch_size=4096):
        for text in batch[src.field]:
            if not isinstance(text, str):
                raise LucaError(f"{src.spec}: row {row}: field {src.field!r} is {type(text).__name__}, not a string")
            yield f"{src.spec}:{row}", text
            row += 1
