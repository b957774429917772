"""Bad input everywhere: every outcome is a result or one clear error (LucaError → exit 2), never a
traceback or a hang.

Property-based (hypothesis) over the data readers, the tokenizer, the chat template, the eval
readers, the chat-data readers, presets and overrides, and the files of run, data and checkpoint
directories. Each test has a wall-clock limit (pytest-timeout), and example counts are tuned so the
file runs in well under a minute on 2 cores; `LUCA_FUZZ_SCALE=10` tries ten times as many.
"""
from __future__ import annotations

import io
import json
import math
import os
import shutil
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from luca.errors import LucaError

SCALE = float(os.environ.get("LUCA_FUZZ_SCALE", "1"))


def fuzz(n: int):
    return settings(max_examples=max(1, int(n * SCALE)), deadline=None, derandomize=True,
                    suppress_health_check=list(HealthCheck), database=None)


def outcome(fn, *a, **kw) -> str:
    """'ok' or 'error' (a LucaError); anything else fails the test with its traceback."""
    try:
        fn(*a, **kw)
    except LucaError as e:
        assert str(e).strip() and "\n" not in str(e).strip(), repr(str(e))
        return "error"
    return "ok"


@pytest.fixture
def scratch():
    """A fresh directory per hypothesis example (function fixtures are shared across examples)."""
    dirs = []

    def make() -> Path:
        d = Path(tempfile.mkdtemp(prefix="luca-fuzz-"))
        dirs.append(d)
        return d
    yield make
    for d in dirs:
        shutil.rmtree(d, ignore_errors=True)


# -- strategies ---------------------------------------------------------------------------------
ANY_TEXT = st.text(st.characters(codec=None, exclude_categories=()), max_size=200)  # surrogates too
JSON_SCALARS = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70),
                         st.floats(allow_nan=False, allow_infinity=False), ANY_TEXT)
JSON_VALUES = st.recursive(JSON_SCALARS, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=8), inner, max_size=4)), max_leaves=12)
FIELDS = ["text", "content", "ctx", "ctx_a", "ctx_b", "activity_label", "endings", "label", "goal", "sol1",
          "sol2", "question", "choices", "answerKey", "sentence", "option1", "option2", "answer", "stem",
          "messages", "conversations", "instruction", "input", "output", "role", "from", "value", "query",
          "response", "prompt", "completion"]
FIELD_VALUES = st.one_of(JSON_VALUES, st.text(alphabet="ab _\n", max_size=30),
                         st.lists(st.text(alphabet="ab _", max_size=6), max_size=5),
                         st.sampled_from(["A", "B", "1", "2", "0", "", " ", "a _ b"]),
                         st.integers(-3, 5),
                         st.lists(st.fixed_dictionaries({}, optional={
                             "role": st.sampled_from(["user", "assistant", "system", "tool", "", 1]),
                             "content": st.one_of(st.text(max_size=10), st.none(), st.integers()),
                             "from": st.sampled_from(["human", "gpt", "x"]), "value": st.text(max_size=5),
                             "text": st.text(max_size=5), "label": st.sampled_from(["A", "B", 1])}), max_size=4),
                         st.fixed_dictionaries({}, optional={"stem": st.text(max_size=5),
                                                             "choices": st.just([{"text": "x", "label": "A"}])}))
RECORDS = st.one_of(st.dictionaries(st.sampled_from(FIELDS), FIELD_VALUES, max_size=6), JSON_VALUES)


def _jsonl(records: list, cut: int | None) -> bytes:
    data = "".join(json.dumps(r) + "\n" for r in records).encode()
    return data if cut is None else data[:cut]


HUGE = b'{"text": "' + b"x" * 300_000 + b'"}\n'
DEEP = b"[" * 50_000 + b"\n"
FILE_BYTES = st.one_of(
    st.binary(max_size=600),
    ANY_TEXT.map(lambda t: t.encode("utf-8", "surrogatepass")),
    st.builds(_jsonl, st.lists(RECORDS, max_size=6), st.one_of(st.none(), st.integers(0, 400))),
    st.sampled_from([b"", b"\n\n", b"\xef\xbb\xbf", HUGE, HUGE[:150_000], DEEP, b"{" * 40_000,
                     b'{"text": ""}\n', b'{"text": null}\n', b'"just a string"\n', b"[1, 2]\n", b"[\n",
                     b'[{"text": "a"}, 3]', b'\x00\x00{"text": "a"}', "\ud800".encode("utf-8", "surrogatepass"),
                     b'{"text": "\\ud800 lone"}\n']))


# -- data readers -------------------------------------------------------------------------------
ENCODINGS = ["utf-8", "latin-1", "utf-16", "utf-32", "cp1252", "ascii", "utf-7", "punycode", "idna", "rot13",
             "base64", "hex", "zlib", "undefined", "unicode_escape", "nonsense"]


@st.composite
def parquet_bytes(draw) -> bytes:
    import pyarrow as pa
    import pyarrow.parquet as pq
    n = draw(st.integers(0, 5))
    kind = draw(st.sampled_from(["string", "large_string", "int", "null", "list", "dict", "binary"]))
    texts = draw(st.lists(st.one_of(st.none(), st.text(max_size=20)), min_size=n, max_size=n))
    if kind == "string":
        arr = pa.array(texts, pa.string())
    elif kind == "large_string":
        arr = pa.array(texts, pa.large_string())
    elif kind == "int":
        arr = pa.array(list(range(n)), pa.int64())
    elif kind == "null":
        arr = pa.nulls(n)
    elif kind == "list":
        arr = pa.array([[t or ""] for t in texts])
    elif kind == "dict":
        arr = pa.array([t or "" for t in texts]).dictionary_encode()
    else:
        arr = pa.array([(t or "").encode() for t in texts], pa.binary())
    name = draw(st.sampled_from(["text", "body"]))
    buf = io.BytesIO()
    pq.write_table(pa.table({name: arr}), buf)
    data = buf.getvalue()
    mode = draw(st.sampled_from(["whole", "cut", "flip"]))
    if mode == "cut":
        data = data[:draw(st.integers(0, len(data)))]
    elif mode == "flip":
        i = draw(st.integers(0, len(data) - 1))
        data = data[:i] + bytes([data[i] ^ draw(st.integers(1, 255))]) + data[i + 1:]
    return data


SPEC_OPTIONS = st.lists(st.one_of(
    st.sampled_from(ENCODINGS).map(lambda e: f"encoding={e}"),
    st.sampled_from(["strict", "replace", "ignore", ""]).map(lambda e: f"errors={e}"),
    st.sampled_from(["text", "body", "", "%00", "a&b"]).map(lambda f: f"field={f}"),
    st.sampled_from(["text", "body", ""]).map(lambda f: f"column={f}"),
    st.sampled_from(["1", "0", "-1", "nan", "inf", "1e308", "x", ""]).map(lambda w: f"weight={w}"),
    st.sampled_from(["bogus=1", "config=x", "=", "x"])), max_size=3)


@pytest.mark.timeout(120)
@fuzz(160)
@given(files=st.lists(st.tuples(st.sampled_from([".txt", ".md", ".jsonl", ".json", ".py", ".bin", ""]),
                                FILE_BYTES), min_size=1, max_size=3),
       parquet=st.lists(parquet_bytes(), max_size=1), options=SPEC_OPTIONS,
       layout=st.sampled_from(["file", "dir", "glob"]), val=st.sampled_from([0.0, 0.5, 0.99]))
def test_data_readers(scratch, files, parquet, options, layout, val):
    from luca import data as D
    root = scratch()
    src = root / "src"
    src.mkdir()
    paths = []
    for i, (ext, data) in enumerate(files):
        paths.append(src / f"f{i}{ext}")
        paths[-1].write_bytes(data)
    for i, data in enumerate(parquet):
        paths.append(src / f"p{i}.parquet")
        paths[-1].write_bytes(data)
    loc = {"file": str(paths[-1]), "dir": str(src), "glob": str(src / "*")}[layout]
    spec = loc + ("?" + "&".join(options) if options else "")
    out = root / "data"
    if outcome(D.collect, D.DataConfig(sources=[spec], val_fraction=val), out, progress=False) == "ok":
        from luca.tokenizer import byte_tokenizer
        assert outcome(D.tokenize, out, byte_tokenizer(), progress=False) == "ok"
        for split in ("train", "val"):
            list(D.iter_documents(out, split))


@pytest.mark.timeout(60)
@fuzz(40)
@given(manifest=st.one_of(JSON_VALUES, st.fixed_dictionaries({}, optional={
    "documents": JSON_VALUES, "tokens": st.one_of(JSON_VALUES, st.fixed_dictionaries({}, optional={
        "dtype": st.sampled_from(["uint16", "uint32", "float64", "nope", 3]),
        "tokenizer_checksum": JSON_VALUES, "vocab_size": JSON_VALUES,
        "train": st.one_of(JSON_VALUES, st.just({"n_tokens": 4, "shards": [{"file": "train_000.bin", "n_tokens": 4}]}),
                           st.just({"n_tokens": 4, "shards": [{"file": "../../etc/passwd", "n_tokens": 4}]})),
        "val": JSON_VALUES}))})).map(lambda m: json.dumps(m).encode()) | st.binary(max_size=50),
       docs=FILE_BYTES)
def test_data_directory_files(scratch, manifest, docs):
    """A data directory's manifest.json and documents/*.jsonl, damaged or forged."""
    from luca import data as D
    from luca.tokenizer import byte_tokenizer
    d = scratch()
    (d / "documents").mkdir()
    (d / "tokens").mkdir()
    (d / "tokens" / "train_000.bin").write_bytes(b"\x01\x00" * 4)
    (d / "manifest.json").write_bytes(manifest)
    (d / "documents" / "train.jsonl").write_bytes(docs)
    outcome(D.TokenShards, d, "train")
    outcome(lambda: list(D.iter_documents(d, "train")))
    outcome(D.tokenize, d, byte_tokenizer(), progress=False)


NASTY = {"deep": DEEP, "deep_object": b'{"text": ' + b'{"a": ' * 20_000, "huge_line": HUGE, "cut_line": HUGE[:150_000],
         "nul": b"\x00" * 100, "bad_utf8": b'{"text": "caf\xe9"}\n', "bom_only": b"\xef\xbb\xbf", "empty": b"",
         "null_field": b'{"text": null}\n', "number_field": b'{"text": 3}\n', "empty_field": b'{"text": ""}\n',
         "array": b"[1, 2, 3]", "lone_surrogate": b'{"text": "\\udc80"}\n', "utf16": "\ufeffhi".encode("utf-16"),
         "crlf": b'{"text": "a"}\r\n\r\n', "only_newlines": b"\n" * 1000}


def _parquet(corrupt: str) -> bytes:
    import pyarrow as pa
    import pyarrow.parquet as pq
    buf = io.BytesIO()
    pq.write_table(pa.table({"text": [f"document {i} " * 20 for i in range(2000)]}), buf, row_group_size=500)
    data = buf.getvalue()
    if corrupt == "page":  # a compressed data page damaged: the footer still reads
        return data[:len(data) // 2] + bytes(range(256)) + data[len(data) // 2 + 256:]
    return data[:len(data) // 2] if corrupt == "cut" else data[:-6] + b"PAR1"


@pytest.mark.timeout(120)
@pytest.mark.parametrize("name", [*NASTY, "parquet_page", "parquet_cut", "parquet_footer"])
def test_known_nasty_files(scratch, tokenizers, capsys, name):
    """Each reader on each classic bad file: a result or one clear error (exit code 2 from the CLI)."""
    from luca import data as D
    from luca.cli import main
    data = NASTY[name] if name in NASTY else _parquet(name.split("_")[1])
    exts = [".parquet"] if name.startswith("parquet") else [".jsonl", ".json", ".txt"]
    chat = pytest.importorskip("luca.finetune.chat_data")
    tasks = pytest.importorskip("luca.evaluate.tasks")
    for ext in exts:
        d = scratch()
        p = d / f"valid{ext}"
        p.write_bytes(data)
        outcome(D.collect, D.DataConfig(sources=[str(p)]), d / "out", progress=False)
        capsys.readouterr()
        code = main(["data", str(p), "--out", str(d / "cli"), "--tokenizer", "byte"])
        err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error: ")]
        assert (code, len(err)) in ((0, 0), (2, 1)), (code, err)
        outcome(chat.load_chat_data, [str(p)], tokenizers[0], 64)
        for task in tasks.TASKS:
            outcome(tasks.load_task, task, p)


# -- tokenizer and chat template ----------------------------------------------------------------
@pytest.fixture(scope="module")
def tokenizers():
    from luca.tokenizer import byte_tokenizer, train_bpe
    corpus = ["def f(x):\n    return x + 1\n", "héllo wörld, 日本語のテキスト 🙂 " * 3, "The answer is 42.\r\n"] * 30
    return [byte_tokenizer(), train_bpe(corpus, 400)]


@pytest.mark.timeout(60)
@fuzz(300)
@given(text=ANY_TEXT | st.text(max_size=2000) | st.sampled_from(["<|im_start|>", "<|endoftext|>x<|im_end|>",
                                                                  "\ud800", "a\udfffb", "\x00", "\r\n" * 50]))
def test_tokenizer_encode_never_raises_and_text_round_trips(tokenizers, text):
    valid = text.encode("utf-8", "surrogatepass").decode("utf-8", "replace") == text
    for tok in tokenizers:
        for ids in (tok.encode(text), tok.encode_batch([text])[0]):
            assert all(0 <= i < tok.vocab_size for i in ids)
            assert not set(ids) & tok.special_ids  # special-token text is plain text
            if valid:
                assert tok.decode(ids) == text
                assert tok.decode_bytes(ids) == text.encode("utf-8")
            else:  # a lone surrogate is not text: it becomes U+FFFD, as data cleaning does
                assert tok.decode(ids) == text.encode("utf-8", "surrogatepass").decode("utf-8", "replace") \
                    or "\ufffd" in tok.decode(ids)
        ids = tok.encode(text, allow_special=True)
        if valid:
            assert tok.decode(ids) == text


MESSAGE = st.one_of(
    st.fixed_dictionaries({"role": st.sampled_from(["system", "user", "assistant", "tool"]),
                           "content": ANY_TEXT}),
    st.fixed_dictionaries({}, optional={"role": st.one_of(ANY_TEXT, JSON_VALUES, st.just("user\nx")),
                                        "content": st.one_of(ANY_TEXT, JSON_VALUES),
                                        "name": ANY_TEXT}),
    JSON_VALUES)


@pytest.mark.timeout(60)
@fuzz(250)
@given(messages=st.one_of(st.lists(MESSAGE, max_size=5), JSON_VALUES), gen=st.booleans())
def test_chat_template_renders_or_says_why(tokenizers, messages, gen):
    for tok in tokenizers:
        a = outcome(tok.render_chat, messages, gen)
        b = outcome(tok.encode_chat, messages, gen)
        assert a == b
        if a == "ok":  # the ids are the rendered text, with markers as the only special tokens
            text, ids = tok.render_chat(messages, gen), tok.encode_chat(messages, gen)
            if text.encode("utf-8", "surrogatepass").decode("utf-8", "replace") == text:
                assert tok.decode(ids) == text
            n_turns = len(messages) + (not (messages and messages[0]["role"] == "system") and bool(tok.default_system))
            assert ids.count(tok.im_start_id) == n_turns + gen


@pytest.mark.timeout(60)
@fuzz(150)
@given(temperature=st.floats(0, 2), top_p=st.floats(0, 1, exclude_min=True), top_k=st.integers(0, 70),
       penalty=st.one_of(st.floats(min_value=0, exclude_min=True, allow_infinity=False),
                         st.sampled_from([5e-324, 1e-300, 1.0, 1e300, 1.7e308])),
       logits=st.lists(st.one_of(st.floats(-1e4, 1e4), st.just(0.0)), min_size=64, max_size=64),
       prev=st.lists(st.integers(0, 63), max_size=8), seed=st.integers(0, 2**64 - 1))
def test_sampling_any_valid_setting_gives_a_token(temperature, top_p, top_k, penalty, logits, prev, seed):
    """What the server passes on from a request: every valid setting samples an id, never NaN."""
    import torch

    from luca.engine import SamplingConfig, sample_next
    s = SamplingConfig(temperature=temperature, top_p=top_p, top_k=top_k, repetition_penalty=penalty, seed=seed)
    x = torch.tensor([logits])
    ids = sample_next(x, torch.tensor([prev]) if prev else None, s, torch.Generator().manual_seed(seed))
    assert ids.shape == (1,) and 0 <= int(ids[0]) < 64


# -- eval readers -------------------------------------------------------------------------------
@pytest.mark.timeout(90)
@fuzz(200)
@given(task=st.sampled_from(["hellaswag", "piqa", "arc_easy", "winogrande", "lambada_openai"]),
       body=FILE_BYTES, labels=st.one_of(st.none(), st.binary(max_size=30), st.text(alphabet="012 \n-x", max_size=12)),
       limit=st.one_of(st.none(), st.integers(-2, 3)))
def test_eval_readers(scratch, task, body, labels, limit):
    tasks = pytest.importorskip("luca.evaluate.tasks")
    d = scratch()
    p = d / "valid.jsonl"
    p.write_bytes(body)
    if labels is not None:
        lab = d / "valid-labels.lst"
        lab.write_bytes(labels if isinstance(labels, bytes) else labels.encode())
    outcome(tasks.load_task, task, p, limit=limit)
    outcome(tasks.load_task, task, None, data_dir=d)
    from luca.evaluate.bpb import read_text
    outcome(read_text, p)


@pytest.mark.timeout(60)
@fuzz(100)
@given(results=st.one_of(JSON_VALUES, st.fixed_dictionaries({"schema": st.just("luca.results"), "schema_version": st.integers(0, 3)},
                                                            optional={"tasks": JSON_VALUES, "model": JSON_VALUES,
                                                                      "results": JSON_VALUES})).map(json.dumps).map(str.encode)
       | FILE_BYTES)
def test_eval_results_files(scratch, results):
    """results.json of a run directory, damaged or forged: `luca results`/compare read it or say why."""
    report = pytest.importorskip("luca.evaluate.report")
    d = scratch()
    (d / "results.json").write_bytes(results)
    outcome(report.load_results, d)
    outcome(report.compare, [d, d])


# -- chat-data readers (fine-tuning) ------------------------------------------------------------
@pytest.mark.timeout(90)
@fuzz(150)
@given(body=FILE_BYTES, ext=st.sampled_from([".jsonl", ".json", ".txt"]),
       fmt=st.sampled_from(["", "?format=messages", "?format=alpaca", "?format=sharegpt", "?format=qa",
                            "?format=text", "?format=bogus"]))
def test_chat_data_readers(scratch, tokenizers, body, ext, fmt):
    chat = pytest.importorskip("luca.finetune.chat_data")
    d = scratch()
    p = d / f"chat{ext}"
    p.write_bytes(body)
    outcome(chat.load_chat_data, [str(p) + fmt], tokenizers[0], 64)


# -- presets, overrides, config files -----------------------------------------------------------
SECTION_KEYS = {"data": ["sources", "val_fraction", "seed", "min_chars"],
                "tokenizer": ["kind", "vocab_size", "min_frequency", "max_chars"],
                "model": ["depth", "vocab_size", "n_layers", "d_model", "n_heads", "n_kv_heads", "head_dim", "d_ff",
                          "max_seq_len", "rope_theta", "norm_eps", "qk_norm", "tie_embeddings"],
                "train": ["seq_len", "micro_batch", "batch_tokens", "max_steps", "lr", "warmup_steps", "schedule",
                          "dtype", "save_every", "max_bad_steps", "device", "seed", "grad_clip"]}
TOML_SCALARS = st.one_of(st.booleans(), st.integers(-2**63, 2**63 - 1), st.integers(-3, 70), st.integers(-1, 3),
                         st.integers(-1, 3), st.sampled_from([0.0, -1.0, 1e-300, 1e300, 0.5]),
                         st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=20),
                         st.sampled_from(["__import__('os').system('touch /tmp/pwned')", "os.system",
                                          "luca.train:evil", "!!python/object:os.system", "${HOME}", "cosine",
                                          "bf16", "cpu", "cuda:7", "byte", "bpe", "builtin:python"]))
TOML_VALUES = st.one_of(TOML_SCALARS, st.lists(TOML_SCALARS, max_size=3), st.dictionaries(st.text(max_size=5), TOML_SCALARS, max_size=2))


def _toml_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float):
        return "nan" if v != v else ("inf" if v == float("inf") else "-inf" if v == float("-inf") else repr(v))
    if isinstance(v, int):
        return str(v)
    if isinstance(v, str):
        return json.dumps(v)
    if isinstance(v, list):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    return "{" + ", ".join(f"{json.dumps(k)} = {_toml_value(x)}" for k, x in v.items()) + "}"


@st.composite
def presets(draw) -> bytes:
    kind = draw(st.sampled_from(["structured", "structured", "structured", "text", "bytes", "nasty"]))
    if kind == "bytes":
        return draw(st.binary(max_size=200))
    if kind == "text":
        return draw(st.text(alphabet='[]=."\n abc1{}#', max_size=120)).encode()
    if kind == "nasty":
        return draw(st.sampled_from([b"a = " + b"[" * 5000, b"a = " + b"{b = " * 3000, b"\xff\xfe[train]",
                                     b"[train]\nlr = nan", b"[train]\nmax_steps = inf", b'name = "../../escape"',
                                     b'name = "/abs/path"', b"name = 3", b"[[train]]\nlr = 1", b"train.lr = 1"]))
    lines = []
    tables = []
    for key in ["name", "description", *SECTION_KEYS, "bogus"]:
        how = draw(st.sampled_from(["absent", "absent", "value", "table", "table"]))
        if how == "value" or (how == "table" and key in ("name", "description")):
            lines.append(f"{key} = {_toml_value(draw(TOML_VALUES))}")
        elif how == "table":
            tables.append(f"[{key}]")
            for k in draw(st.lists(st.sampled_from(SECTION_KEYS.get(key, ["x"]) + ["unknown"]), max_size=5,
                                   unique=True)):
                tables.append(f"{k} = {_toml_value(draw(TOML_VALUES))}")
    return "\n".join(lines + tables).encode()


OVERRIDES = st.lists(st.one_of(
    st.tuples(st.sampled_from([f"{s}.{k}" for s, ks in SECTION_KEYS.items() for k in ks] + ["x", "a.b.c", ".", "model."]),
              st.one_of(st.text(max_size=12), TOML_SCALARS.map(_toml_value))).map(lambda kv: f"{kv[0]}={kv[1]}"),
    st.text(max_size=15)), max_size=4)


@pytest.mark.timeout(90)
@fuzz(250)
@given(preset=presets(), overrides=OVERRIDES)
def test_presets_and_overrides(scratch, preset, overrides):
    from luca.pipeline import resolve
    d = scratch()
    p = d / "fuzz.toml"
    p.write_bytes(preset)
    if outcome(resolve, str(p), overrides) == "ok":
        cfg = resolve(str(p), overrides)
        for section in ("data", "tokenizer", "model", "train"):
            for v in cfg[section].values():  # values are plain data: nothing was imported or run
                assert v is None or isinstance(v, (bool, int, float, str, list))
                assert not isinstance(v, float) or math.isfinite(v)
        assert Path(cfg.get("name", "x")).name == cfg.get("name", "x")  # runs/NAME stays under runs/
    assert not Path("/tmp/pwned").exists()


@pytest.mark.timeout(120)
@fuzz(25)
@given(preset=presets(), overrides=OVERRIDES)
def test_cli_exit_code_on_bad_config(scratch, capsys, preset, overrides):
    """Through `luca.cli.main`: a bad config is exit 2 with one `error:` line, never a traceback."""
    from luca.cli import main
    d = scratch()
    p = d / "fuzz.toml"
    p.write_bytes(preset)
    args = ["train", "--preset", str(p), "--data", str(d / "no-data"), "--tokenizer", "byte", "--out", str(d / "run")]
    for o in overrides:
        args += ["--set", o]
    assert main(args) == 2  # the data directory is missing even when the config is fine
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    assert not (d / "run").exists()


# -- run directory and checkpoint files ---------------------------------------------------------
@pytest.fixture(scope="module")
def small_run(tmp_path_factory):
    from conftest import train_tiny_run
    work = tmp_path_factory.mktemp("fuzz_run")
    return train_tiny_run(work / "run", work, tokenizer="byte", steps=2,
                          overrides={"train.save_every": 1, "train.eval_every": 0})


HF_KEYS = ["model_type", "vocab_size", "num_hidden_layers", "hidden_size", "num_attention_heads",
           "num_key_value_heads", "head_dim", "intermediate_size", "max_position_embeddings", "rope_theta",
           "rms_norm_eps", "tie_word_embeddings", "rope_scaling", "rope_parameters", "torch_dtype"]
HF_VALUES = st.one_of(JSON_VALUES, st.sampled_from(["llama", "qwen2", "qwen3", "gpt2"]), st.integers(-2, 70),
                      st.just({"rope_type": "yarn"}), st.floats(allow_nan=False))


@pytest.mark.timeout(120)
@fuzz(80)
@given(which=st.sampled_from(["config.json", "tokenizer.json", "tokenizer_config.json", "model.safetensors",
                              "model.safetensors.index.json", "meta.json"]),
       edit=st.one_of(st.dictionaries(st.sampled_from(HF_KEYS + ["weight_map", "step", "file", "sha256"]),
                                      HF_VALUES, max_size=4).map(lambda d: ("merge", d)),
                      st.binary(max_size=300).map(lambda b: ("bytes", b)),
                      st.integers(0, 4000).map(lambda n: ("cut", n))))
def test_run_directory_files(scratch, small_run, which, edit):
    """A run directory with one file damaged or forged: loading says what is wrong, or works."""
    from luca import rundir
    from luca.train import load_state
    d = scratch() / "run"
    shutil.copytree(small_run, d)
    target = d / ("train_state" if which == "meta.json" else "") / which
    mode, arg = edit
    if mode == "bytes":
        target.write_bytes(arg)
    elif mode == "cut":
        if target.exists():
            target.write_bytes(target.read_bytes()[:arg])
    else:
        try:
            base = json.loads(target.read_text())
        except (OSError, ValueError):
            base = {}
        if isinstance(base, dict):
            base.update(arg)
        target.write_text(json.dumps(base if isinstance(base, dict) else arg))
    outcome(rundir.load_model, d)
    outcome(rundir.load_tokenizer, d)
    outcome(load_state, d)
