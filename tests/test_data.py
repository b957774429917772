"""Tests for luca.data and luca.sources: real files in tmp_path, small corpora, a byte tokenizer (fast) and a tiny BPE."""
from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import pytest

from luca import data, sources
from luca.data import DataConfig, TokenShards, collect, iter_documents, tokenize, tokenizer_checksum
from luca.sources import iter_source, parse_source
from luca.errors import LucaError
from luca.tokenizer import EOT, byte_tokenizer, train_bpe


def docs_of(spec: str) -> list[tuple[str, str]]:
    return list(iter_source(parse_source(spec)))


def write(path: Path, text: str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(text if isinstance(text, bytes) else text.encode("utf-8"))
    return path


def corpus(tmp_path: Path, n: int = 40, name: str = "c", size: int = 50) -> Path:
    d = tmp_path / name
    for i in range(n):
        write(d / f"{i:03d}.txt", f"{name} document {i} " + "x" * (size + i % 7))
    return d


# -- sources -----------------------------------------------------------------------------------
def test_text_file(tmp_path):
    p = write(tmp_path / "a.md", "# Title\n\nbody\n")
    assert docs_of(str(p)) == [(str(p), "# Title\n\nbody\n")]
    src = parse_source(f"{p}?weight=2.5&encoding=LATIN-1")
    assert (src.kind, src.weight, src.encoding) == ("file", 2.5, "iso8859-1")


def test_directory_recursive_sorted_skips_hidden_and_binary(tmp_path):
    d = tmp_path / "d"
    write(d / "b.txt", "b")
    write(d / "a" / "z.py", "z = 1")
    write(d / ".hidden" / "h.txt", "hidden")
    write(d / ".dot.txt", "dot")
    write(d / "nul.txt", b"abc\0def")
    write(d / "img.png", b"\x89PNG")
    write(d / "data.jsonl", '{"text": "j"}\n')
    got = docs_of(str(d))
    assert [t for _, t in got] == ["z = 1", "b"]  # sorted by path: a/z.py < b.txt
    assert [Path(o).name for o, _ in got] == ["z.py", "b.txt"]


def test_directory_without_text_files_says_use_a_glob(tmp_path):
    write(tmp_path / "d" / "x.jsonl", '{"text": "a"}\n')
    with pytest.raises(LucaError, match=r"no text files.*glob"):
        docs_of(str(tmp_path / "d"))


def test_glob_dispatches_by_extension(tmp_path):
    write(tmp_path / "g" / "one.txt", "one")
    write(tmp_path / "g" / "sub" / "two.txt", "two")
    write(tmp_path / "g" / "sub" / "three.jsonl", '{"text": "three"}\n')
    write(tmp_path / "g" / "skip.md", "skip")
    assert [t for _, t in docs_of(str(tmp_path / "g" / "**" / "*.txt"))] == ["one", "two"]
    assert [t for _, t in docs_of(str(tmp_path / "g" / "**" / "*.jsonl"))] == ["three"]
    # '?' is a wildcard here, not a query
    assert [t for _, t in docs_of(str(tmp_path / "g" / "on?.txt"))] == ["one"]
    with pytest.raises(LucaError, match="glob matches nothing"):
        docs_of(str(tmp_path / "g" / "*.rst"))


def test_jsonl_field_blank_lines_bom_and_bare_strings(tmp_path):
    p = write(tmp_path / "x.jsonl", '\ufeff{"body": "first", "n": 1}\n\n{"body": "sec\\nond"}\r\n"bare"\n')
    assert docs_of(f"{p}?field=body") == [(f"{p}:1", "first"), (f"{p}:3", "sec\nond"), (f"{p}:4", "bare")]
    arr = write(tmp_path / "y.json", json.dumps([{"text": "a"}, {"text": "b"}]))
    assert [t for _, t in docs_of(str(arr))] == ["a", "b"]


def test_jsonl_errors_name_file_and_line(tmp_path):
    p = write(tmp_path / "bad.jsonl", '{"text": "ok"}\n{"text": oops}\n')
    with pytest.raises(LucaError, match=rf"{p}:2: not valid JSON"):
        docs_of(str(p))
    p = write(tmp_path / "nofield.jsonl", '{"text": "ok"}\n{"body": "x", "id": 3}\n')
    with pytest.raises(LucaError, match=rf"{p}:2: no string field 'text' \(fields: body, id\)"):
        docs_of(str(p))
    p = write(tmp_path / "num.jsonl", '{"text": 5}\n')
    with pytest.raises(LucaError, match=rf"{p}:1: no string field 'text'"):
        docs_of(str(p))


def test_parquet_column(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq
    p = tmp_path / "t.parquet"
    pq.write_table(pa.table({"content": ["alpha", "beta", "gamma"], "id": [1, 2, 3]}), p)
    assert docs_of(f"{p}?column=content") == [(f"{p}:0", "alpha"), (f"{p}:1", "beta"), (f"{p}:2", "gamma")]
    with pytest.raises(LucaError, match=r"no column 'text' \(columns: content, id\)"):
        docs_of(str(p))
    with pytest.raises(LucaError, match="not strings"):
        docs_of(f"{p}?column=id")


def test_hf_local_save_to_disk(tmp_path):
    datasets = pytest.importorskip("datasets")
    d = tmp_path / "hfds"
    datasets.Dataset.from_dict({"story": ["once", "upon", "a time"]}).save_to_disk(str(d))
    assert [t for _, t in docs_of(f"hf:{d}?field=story")] == ["once", "upon", "a time"]
    dd = tmp_path / "hfdict"
    datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": ["t1", "t2"]}),
                          "validation": datasets.Dataset.from_dict({"text": ["v1"]})}).save_to_disk(str(dd))
    assert [t for _, t in docs_of(f"hf:{dd}")] == ["t1", "t2"]
    assert [t for _, t in docs_of(f"hf:{dd}:validation")] == ["v1"]
    with pytest.raises(LucaError, match="no split 'test'"):
        docs_of(f"hf:{dd}:test")
    with pytest.raises(LucaError, match=r"no field 'text' \(fields: story\)"):
        docs_of(f"hf:{d}")


def test_builtin_python_many_docs_no_tests():
    files = sources.builtin_python_files()
    assert len(files) > 300
    assert files == sorted(set(files))
    for f in files:
        parts = f.parts
        assert "site-packages" not in parts and "__pycache__" not in parts and "idle_test" not in parts
        assert not any(p.startswith("test") for p in parts[-4:-1]), f
        assert not f.name.startswith("test_")
    names = {f.name for f in files}
    assert {"os.py", "typing.py", "__init__.py", "utf_8.py", "idna.py"} <= names
    # generated tables are not prose or code worth learning; topics.py is read as prose instead
    assert not names & {"cp1252.py", "mac_roman.py", "koi8_r.py", "topics.py"}, names
    assert not any(n.startswith("_sysconfigdata") for n in names)
    topics = list(sources._read_pydoc_topics())
    assert len(topics) > 50 and topics[0][0].startswith("pydoc_data.topics:")
    assert parse_source("builtin:python").kind == "builtin"
    with pytest.raises(LucaError, match="unknown builtin"):
        parse_source("builtin:rust")


# -- encodings -----------------------------------------------------------------------------------
def test_latin1_file_error_and_two_ways_out(tmp_path):
    p = write(tmp_path / "old.txt", "caf\u00e9 au lait".encode("latin-1"))
    with pytest.raises(LucaError) as e:
        docs_of(str(p))
    msg = str(e.value)
    assert msg.startswith(f"{p}: byte 3: not valid utf-8") and "?encoding=latin-1" in msg and "?errors=replace" in msg
    assert docs_of(f"{p}?encoding=latin-1")[0][1] == "caf\u00e9 au lait"
    assert docs_of(f"{p}?errors=replace")[0][1] == "caf\ufffd au lait"


def test_latin1_jsonl_byte_offset_is_in_the_file(tmp_path):
    p = write(tmp_path / "l.jsonl", b'{"text": "a"}\n{"text": "\xe9"}\n')
    with pytest.raises(LucaError, match=rf"{p}: byte 24: not valid utf-8"):
        docs_of(str(p))
    assert docs_of(f"{p}?encoding=latin-1")[1][1] == "\u00e9"
    u16 = write(tmp_path / "u16.jsonl", '{"text": "a"}\n{"text": "\u00e9"}\n'.encode("utf-16"))
    assert [t for _, t in docs_of(f"{u16}?encoding=utf-16")] == ["a", "\u00e9"]


# -- spec errors ---------------------------------------------------------------------------------
def test_spec_errors(tmp_path):
    with pytest.raises(LucaError, match=r"nope\.txt: no such file or directory"):
        parse_source(str(tmp_path / "nope.txt"))
    p = write(tmp_path / "a.txt", "a")
    with pytest.raises(LucaError, match="unknown option 'colour'"):
        parse_source(f"{p}?colour=red")
    for bad in ("weight=0", "weight=-1", "weight=abc", "weight=inf"):
        with pytest.raises(LucaError, match="weight"):
            parse_source(f"{p}?{bad}")
    with pytest.raises(LucaError, match="unknown encoding"):
        parse_source(f"{p}?encoding=klingon")
    with pytest.raises(LucaError, match="errors must be"):
        parse_source(f"{p}?errors=ignore")


def test_empty_corpus_and_bad_config(tmp_path):
    p = write(tmp_path / "blank.txt", " \r\n\t\n\0")
    with pytest.raises(LucaError, match="blank.txt: no documents after cleaning"):
        collect(DataConfig(sources=[str(p)]), tmp_path / "out", progress=False)
    q = write(tmp_path / "short.txt", "hi")
    with pytest.raises(LucaError, match="shorter than min_chars=5"):
        collect(DataConfig(sources=[str(q)], min_chars=5), tmp_path / "out", progress=False)
    with pytest.raises(LucaError, match="val_fraction"):
        DataConfig(sources=[str(q)], val_fraction=1.0)
    with pytest.raises(LucaError, match="data sources: none"):
        collect(DataConfig(sources=[]), tmp_path / "out", progress=False)


# -- collect -------------------------------------------------------------------------------------
def test_cleaning(tmp_path):
    assert data.clean("\ufeffa\r\nb\0c \n\n ")[0] == "a\nbc"
    assert data.clean("x\ud800y")[0] == "x\ufffdy"  # a lone surrogate from a JSON escape
    assert data.clean("  keep leading\ttabs\t")[0] == "  keep leading\ttabs"


def test_collect_dedup_split_and_manifest(tmp_path):
    a = corpus(tmp_path, 30, "a")
    b = tmp_path / "b"
    write(b / "dup1.txt", (a / "000.txt").read_text() + "\r\n")  # equal after cleaning
    write(b / "dup2.txt", (a / "001.txt").read_text())
    write(b / "own.txt", "only in b")
    cfg = DataConfig(sources=[str(a), str(b)], val_fraction=0.2)
    m = collect(cfg, tmp_path / "out", progress=False)
    sa, sb = m["sources"]
    assert (sa["documents"], sa["duplicates"], sa["files"]) == (30, 0, 30)
    assert (sb["documents"], sb["duplicates"]) == (1, 2)
    assert sa["epochs"] > 0 and len(sa["sha256"]) == 64
    train = list(iter_documents(tmp_path / "out", "train"))
    val = list(iter_documents(tmp_path / "out", "val"))
    assert len(val) == m["documents"]["val"] >= 1 and len(train) == m["documents"]["train"]
    assert not set(train) & set(val)
    assert m["schema_version"] == data.SCHEMA_VERSION and m["config"]["sources"] == cfg.sources
    assert json.loads((tmp_path / "out" / "manifest.json").read_text()) == m
    # the split is by hash: the same documents land on the same side whatever the other sources
    m2 = collect(DataConfig(sources=[str(a)], val_fraction=0.2), tmp_path / "out2", progress=False)
    val2 = set(iter_documents(tmp_path / "out2", "val"))
    assert val2 == {t for t in val if t.startswith("a ")}
    assert m2["chars"]["val"] == sum(map(len, val2))


def test_deterministic_and_at_least_one_val(tmp_path):
    a = corpus(tmp_path, 5, "a")
    outs = []
    for k in range(2):
        collect(DataConfig(sources=[str(a)], val_fraction=0.001, seed=3), tmp_path / f"o{k}", progress=False)
        o = tmp_path / f"o{k}"
        outs.append((list(iter_documents(o, "train")), list(iter_documents(o, "val"))))
    assert outs[0] == outs[1]
    assert len(outs[0][1]) == 1 and len(outs[0][0]) == 4
    one = write(tmp_path / "one.txt", "single")
    m = collect(DataConfig(sources=[str(one)], val_fraction=0.5), tmp_path / "o3", progress=False)
    assert m["documents"] == {"train": 1, "val": 0}


def test_single_source_keeps_each_document_once(tmp_path):
    a = corpus(tmp_path, 50, "a")
    m = collect(DataConfig(sources=[str(a)], val_fraction=0.1, seed=7), tmp_path / "out", progress=False)
    train = list(iter_documents(tmp_path / "out", "train"))
    val = list(iter_documents(tmp_path / "out", "val"))
    assert sorted(train + val) == sorted(p.read_text() for p in a.iterdir())
    assert m["sources"][0]["epochs"] == 1.0
    assert train != sorted(train)  # shuffled by the seed


def test_weighted_mixing_shares(tmp_path):
    a, b = corpus(tmp_path, 60, "a"), corpus(tmp_path, 60, "b")
    m = collect(DataConfig(sources=[f"{a}?weight=3", f"{b}?weight=1"], val_fraction=0.0),
                tmp_path / "out", progress=False)
    train = list(iter_documents(tmp_path / "out", "train"))
    ca = sum(len(t) for t in train if t.startswith("a "))
    cb = sum(len(t) for t in train if t.startswith("b "))
    assert 2.7 < ca / cb < 3.3
    sa, sb = m["sources"]
    assert 1.4 < sa["epochs"] < 1.6 and 0.45 < sb["epochs"] < 0.55
    assert m["documents"]["val"] == 0 and m["unique_documents"]["train"] == 120
    # a repeated source repeats documents: at most ceil(epochs) copies of each
    counts = {t: train.count(t) for t in set(train) if t.startswith("a ")}
    assert max(counts.values()) == 2 and len(counts) == 60


# -- tokens --------------------------------------------------------------------------------------
def test_tokenize_round_trip_and_skip(tmp_path, monkeypatch):
    a = corpus(tmp_path, 20, "a")
    write(a / "tricky.txt", f"user text with {EOT} inside and caf\u00e9 \U0001F600")
    out = tmp_path / "out"
    collect(DataConfig(sources=[str(a)], val_fraction=0.2), out, progress=False)
    tok = byte_tokenizer()
    m = tokenize(out, tok, progress=False)
    assert m["tokens"]["dtype"] == "uint16" and m["tokens"]["tokenizer_checksum"] == tokenizer_checksum(tok)
    for split in ("train", "val"):
        docs = list(iter_documents(out, split))
        ts = TokenShards(out, split)
        ids = ts.window(0, ts.n_tokens)
        assert ids.dtype == np.int64 and ts.n_tokens == m["tokens"][split]["n_tokens"]
        assert (ids == tok.eot_id).sum() == len(docs)  # the EOT inside the text is plain bytes
        assert tok.decode(ids.tolist()) == "".join(d + EOT for d in docs)
    # done already: no encoding happens
    monkeypatch.setattr(tok, "encode_batch", lambda texts: pytest.fail("tokenized again"))
    assert tokenize(out, tok, progress=False)["tokens"] == m["tokens"]


def test_tokenize_bpe_and_retokenize_replaces_shards(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "SHARD_TOKENS", 500)
    a = corpus(tmp_path, 30, "a", size=80)
    out = tmp_path / "out"
    collect(DataConfig(sources=[str(a)], val_fraction=0.1), out, progress=False)
    m1 = tokenize(out, byte_tokenizer(), progress=False)
    n_byte_shards = len(m1["tokens"]["train"]["shards"])
    assert n_byte_shards > 2
    bpe = train_bpe(iter_documents(out, "train"), 300)
    m2 = tokenize(out, bpe, progress=False)
    assert m2["tokens"]["tokenizer_checksum"] == tokenizer_checksum(bpe) != m1["tokens"]["tokenizer_checksum"]
    assert len(m2["tokens"]["train"]["shards"]) < n_byte_shards
    on_disk = sorted(p.name for p in (out / "tokens").glob("train_*.bin"))
    assert on_disk == [s["file"] for s in m2["tokens"]["train"]["shards"]]
    ts = TokenShards(out, "train")
    docs = list(iter_documents(out, "train"))
    assert bpe.decode(ts.window(0, ts.n_tokens).tolist()) == "".join(d + EOT for d in docs)


class WideVocab:
    """A byte tokenizer that claims a vocabulary too large for uint16."""

    def __init__(self):
        self._t = byte_tokenizer()
        self.tok, self.eot_id, self.encode_batch = self._t.tok, self._t.eot_id, self._t.encode_batch
        self.vocab_size = 70_000


def test_dtype_choice(tmp_path):
    a = corpus(tmp_path, 4, "a")
    out = tmp_path / "out"
    collect(DataConfig(sources=[str(a)]), out, progress=False)
    assert tokenize(out, byte_tokenizer(), progress=False)["tokens"]["dtype"] == "uint16"
    out = tmp_path / "wide"
    collect(DataConfig(sources=[str(a)]), out, progress=False)
    m = tokenize(out, WideVocab(), progress=False)
    assert m["tokens"]["dtype"] == "uint32" and m["tokens"]["vocab_size"] == 70_000
    ts = TokenShards(out, "train")
    assert ts.dtype == np.uint32
    assert (out / "tokens" / "train_000.bin").stat().st_size == 4 * ts.n_tokens


def test_window_across_shard_boundaries(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "SHARD_TOKENS", 7)
    a = corpus(tmp_path, 6, "a", size=5)
    out = tmp_path / "out"
    collect(DataConfig(sources=[str(a)], val_fraction=0.0), out, progress=False)
    m = tokenize(out, byte_tokenizer(), progress=False)
    shards = m["tokens"]["train"]["shards"]
    assert all(s["n_tokens"] == 7 for s in shards[:-1]) and 0 < shards[-1]["n_tokens"] <= 7
    ts = TokenShards(out, "train")
    flat = np.concatenate([np.fromfile(out / "tokens" / s["file"], dtype=np.uint16) for s in shards])
    assert ts.n_tokens == len(flat)
    for start, length in [(0, 7), (5, 10), (6, 1), (7, 1), (3, 30), (ts.n_tokens - 9, 9), (ts.n_tokens, 0)]:
        assert ts.window(start, length).tolist() == flat[start:start + length].tolist()
    seq = 10
    assert ts.num_chunks(seq) == (len(flat) - 1) // seq
    last = ts.num_chunks(seq) - 1
    assert ts.chunk(last, seq).tolist() == flat[last * seq:last * seq + seq + 1].tolist()
    with pytest.raises(IndexError):
        ts.window(ts.n_tokens - 3, 4)
    clone = pickle.loads(pickle.dumps(ts))  # pickles the paths, not the mapped data
    assert len(pickle.dumps(ts)) < 2000 and clone.window(3, 30).tolist() == flat[3:33].tolist()


def test_token_shards_errors(tmp_path):
    a = corpus(tmp_path, 3, "a")
    out = tmp_path / "out"
    collect(DataConfig(sources=[str(a)]), out, progress=False)
    with pytest.raises(LucaError, match="not tokenized"):
        TokenShards(out, "train")
    m = tokenize(out, byte_tokenizer(), progress=False)
    (out / "tokens" / m["tokens"]["train"]["shards"][0]["file"]).write_bytes(b"\0\0")
    with pytest.raises(LucaError, match="missing or truncated"):
        TokenShards(out, "train")
    with pytest.raises(LucaError, match="collect the data first"):
        list(iter_documents(tmp_path / "nowhere", "train"))


def test_failed_tokenize_leaves_no_partial_state(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "SHARD_TOKENS", 100)
    monkeypatch.setattr(data, "ENCODE_BATCH_CHARS", 150)
    a = corpus(tmp_path, 10, "a")
    out = tmp_path / "out"
    collect(DataConfig(sources=[str(a)], val_fraction=0.0), out, progress=False)
    tok = byte_tokenizer()
    tokenize(out, tok, progress=False)
    calls = []

    def flaky(texts):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("disk on fire")
        return byte_tokenizer().encode_batch(texts)

    other = train_bpe(iter_documents(out, "train"), 280)
    monkeypatch.setattr(other, "encode_batch", flaky)
    with pytest.raises(RuntimeError):
        tokenize(out, other, progress=False)
    assert "tokens" not in json.loads((out / "manifest.json").read_text())  # nothing vouches for the shards
    assert not [p for p in (out / "tokens").iterdir() if p.name.endswith(".tmp")]
    with pytest.raises(LucaError, match="not tokenized"):
        TokenShards(out, "train")


def test_recollect_drops_stale_shards(tmp_path):
    a = corpus(tmp_path, 3, "a")
    out = tmp_path / "out"
    collect(DataConfig(sources=[str(a)]), out, progress=False)
    tokenize(out, byte_tokenizer(), progress=False)
    m = collect(DataConfig(sources=[str(a)]), out, progress=False)
    assert "tokens" not in m and not list((out / "tokens").glob("*.bin"))


def test_progress_bars_do_not_break(tmp_path):
    a = corpus(tmp_path, 3, "a")
    out = tmp_path / "out"
    collect(DataConfig(sources=[str(a)]), out, progress=True)
    assert tokenize(out, byte_tokenizer(), progress=True)["tokens"]["train"]["n_tokens"] > 0
