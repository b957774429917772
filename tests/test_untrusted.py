"""Untrusted files and configs: nothing is unpickled or executed, and no path leaves its directory.

- The source tree has no eval/exec/compile of strings, no pickle (or kin), no dynamic imports of
  names from data, and `torch.load` only with `weights_only=True`, only for luca's own training
  state; checked on the tokens of the code (comments and strings are not code).
- Config values that look like code or module paths are plain strings that fail validation.
- A pickle bomb is not run: not as a checkpoint (its checksum even matching), not as weights.
- Paths from files and requests stay inside their directories: a sharded-weights index naming
  `../x`, a checkpoint manifest naming `../../x`, a data manifest naming `../x.bin`, a preset whose
  `name` would put the run outside `runs/`, and URLs with `..` against the server's static files.
"""
from __future__ import annotations

import io
import json
import os
import shutil
import socket
import tokenize
from pathlib import Path

import pytest
import torch

import luca
from luca import rundir
from luca.errors import LucaError

LUCA = Path(luca.__file__).parent
MARKER = "LUCA_PWNED_MARKER"


# -- the source tree ----------------------------------------------------------------------------
BANNED_NAMES = {"eval": "eval() of a string", "exec": "exec()", "compile": "compile() of source",
                "pickle": "pickle", "cPickle": "pickle", "dill": "dill", "cloudpickle": "cloudpickle",
                "joblib": "joblib", "marshal": "marshal", "shelve": "shelve", "import_module": "dynamic import",
                "__import__": "dynamic import", "system": "os.system", "popen": "os.popen",
                "unsafe_load": "yaml.unsafe_load", "trust_remote_code": "remote code"}


def _code_tokens(path: Path) -> list[tokenize.TokenInfo]:
    with open(path, "rb") as f:
        return [t for t in tokenize.tokenize(f.readline)
                if t.type not in (tokenize.COMMENT, tokenize.NL, tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT,
                                  tokenize.ENCODING)]


def _call_args(toks: list[tokenize.TokenInfo], i: int) -> list[tokenize.TokenInfo]:
    """The tokens inside the parentheses of the call whose `(` is toks[i]."""
    depth, j = 0, i
    while j < len(toks):
        depth += toks[j].string in "([{" and toks[j].type == tokenize.OP
        depth -= toks[j].string in ")]}" and toks[j].type == tokenize.OP
        if depth == 0:
            return toks[i + 1:j]
        j += 1
    return toks[i + 1:]


def source_findings(root: Path) -> list[str]:
    out = []
    for path in sorted(root.rglob("*.py")):
        toks = _code_tokens(path)
        rel = path.relative_to(root.parent)
        for i, t in enumerate(toks):
            prev = toks[i - 1].string if i else ""
            nxt = toks[i + 1].string if i + 1 < len(toks) else ""
            where = f"{rel}:{t.start[0]}"
            if t.type != tokenize.NAME:
                continue
            name = t.string
            if name in ("eval", "exec", "compile"):
                if prev != "." and nxt == "(":  # model.eval() and torch.compile() are not eval
                    out.append(f"{where}: {BANNED_NAMES[name]}")
            elif name == "__import__":
                if not (nxt == "(" and toks[i + 2].type == tokenize.STRING):  # a constant module name is fine
                    out.append(f"{where}: {BANNED_NAMES[name]}")
            elif name == "trust_remote_code":
                if nxt == "=" and toks[i + 2].string == "True":
                    out.append(f"{where}: {BANNED_NAMES[name]}")
            elif name in BANNED_NAMES and name not in ("system", "popen", "unsafe_load"):
                out.append(f"{where}: {BANNED_NAMES[name]}")
            elif name in ("system", "popen") and prev == "." and toks[i - 2].string == "os":
                out.append(f"{where}: {BANNED_NAMES[name]}")
            elif name in ("load", "unsafe_load") and prev == "." and toks[i - 2].string == "yaml":
                args = "".join(a.string for a in _call_args(toks, i + 1))
                if name == "unsafe_load" or "SafeLoader" not in args:
                    out.append(f"{where}: yaml.load without SafeLoader")
            elif name == "load" and prev == "." and toks[i - 2].string in ("torch", "np", "numpy"):
                args = "".join(a.string for a in _call_args(toks, i + 1))
                if toks[i - 2].string == "torch" and ("weights_only=True" not in args or rel.as_posix() != "luca/train.py"):
                    out.append(f"{where}: torch.load outside luca/train.py or without weights_only=True")
                if "allow_pickle=True" in args:
                    out.append(f"{where}: np.load with allow_pickle")
            elif name == "shell" and nxt == "=" and toks[i + 2].string == "True":
                out.append(f"{where}: subprocess with shell=True")
            elif name == "jinja2" and nxt == "." and toks[i + 2].string != "sandbox":
                out.append(f"{where}: jinja2 outside its sandbox")
    return out


def test_source_tree_has_no_way_to_run_code_from_data():
    findings = source_findings(LUCA)
    assert not findings, "\n".join(findings)
    torch_loads = [f"{p.name}" for p in LUCA.rglob("*.py") if "torch.load(" in p.read_text()]
    assert torch_loads == ["train.py"]


def test_the_source_check_catches_what_it_looks_for(tmp_path):
    """The checker itself, on a planted file of every kind it must find (and two it must not)."""
    pkg = tmp_path / "luca"
    pkg.mkdir()
    (pkg / "bad.py").write_text(
        "import pickle\nimport os, yaml, torch, numpy as np, importlib, subprocess\n"
        "x = eval(cfg['expr'])\nexec(code)\nimportlib.import_module(name)\n__import__(name)\n"
        "torch.load(p)\ntorch.load(p, weights_only=False)\nnp.load(p, allow_pickle=True)\n"
        "yaml.load(s)\nos.system(cmd)\nsubprocess.run(cmd, shell=True)\nf(trust_remote_code=True)\n"
        "# eval(x) in a comment is fine\ns = 'exec(x) in a string is fine'\nmodel.eval()\n")
    found = source_findings(pkg)
    assert len(found) == 12, "\n".join(found)


# -- configs ------------------------------------------------------------------------------------
CODE_LIKE = ["__import__('os').system('touch " + MARKER + "')", "os:system", "luca.serve:create_app",
             "!!python/object/apply:os.system", "{{ cycler.__init__.__globals__.os.popen('id') }}", "${PWD}"]


@pytest.mark.parametrize("value", CODE_LIKE)
def test_config_values_are_plain_strings(tmp_path, value, monkeypatch):
    from luca.cli import main
    from luca.pipeline import resolve
    monkeypatch.chdir(tmp_path)
    for section, key in [("train", "schedule"), ("train", "device"), ("train", "lr"), ("tokenizer", "kind"),
                         ("model", "family"), ("train", "dtype"), ("model", "depth")]:
        preset = tmp_path / "evil.toml"
        preset.write_text(f"[{section}]\n{key} = {json.dumps(value)}\n")
        with pytest.raises(LucaError):
            resolve(str(preset))
        assert main(["run", "--preset", str(preset), "--out", str(tmp_path / "run")]) == 2
    # Where any string is allowed (a data source), it is a path and nothing more.
    preset = tmp_path / "evil.toml"
    preset.write_text(f"[data]\nsources = [{json.dumps(value)}]\n")
    cfg = resolve(str(preset))
    assert cfg["data"]["sources"] == [value]
    with pytest.raises(LucaError, match="no such file|unknown|empty|glob"):
        from luca import data as D
        D.collect(D.DataConfig(sources=cfg["data"]["sources"]), tmp_path / "d", progress=False)
    assert not list(tmp_path.rglob(MARKER)) and not Path(MARKER).exists()


@pytest.mark.parametrize("name", ["../escape", "/tmp/abs", "a/b", "..", ".", "", "x\\..\\y"])
def test_preset_name_cannot_move_the_run_out_of_runs(tmp_path, name):
    from luca.pipeline import resolve
    preset = tmp_path / "p.toml"
    preset.write_text(f"name = {json.dumps(name)}\n")
    with pytest.raises(LucaError, match="name"):
        resolve(str(preset))


# -- pickle bombs -------------------------------------------------------------------------------
class _Bomb:
    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return (Path.write_text, (Path(self.path), "pwned"))


def _bomb_bytes(marker: Path) -> bytes:
    buf = io.BytesIO()
    torch.save({"model": {"w": torch.zeros(2)}, "step": 1, "payload": _Bomb(str(marker))}, buf)
    return buf.getvalue()


def test_checkpoint_pickle_bomb_is_refused_even_with_a_matching_checksum(tmp_path):
    import hashlib

    from luca.train import load_state
    marker = tmp_path / MARKER
    d = tmp_path / "run" / rundir.TRAIN_STATE
    d.mkdir(parents=True)
    data = _bomb_bytes(marker)
    (d / "state-00000001-0.pt").write_bytes(data)
    (d / "meta.json").write_text(json.dumps({"step": 1, "file": "state-00000001-0.pt",
                                             "sha256": hashlib.sha256(data).hexdigest()}))
    with pytest.raises(LucaError, match="not a luca checkpoint"):
        load_state(tmp_path / "run")
    assert not marker.exists()


def test_weights_are_read_only_from_safetensors(tmp_path, tiny_run):
    marker = tmp_path / MARKER
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run, ignore=shutil.ignore_patterns("train_state"))
    (run / rundir.WEIGHTS).unlink()
    (run / "pytorch_model.bin").write_bytes(_bomb_bytes(marker))  # what transformers would unpickle
    with pytest.raises(LucaError, match="not a run directory"):
        rundir.load_model(run)
    (run / rundir.WEIGHTS).write_bytes(_bomb_bytes(marker))  # a pickle under the safetensors name
    with pytest.raises(LucaError, match="safetensors"):
        rundir.load_model(run)
    assert not marker.exists()


# -- paths that would escape ------------------------------------------------------------------------
@pytest.mark.parametrize("shard", ["../outside.safetensors", "/tmp/outside.safetensors", "sub/../../outside.safetensors",
                                   "..", "."])
def test_sharded_index_cannot_leave_the_directory(tmp_path, tiny_run, shard):
    run = tmp_path / "models" / "run"
    shutil.copytree(tiny_run, run, ignore=shutil.ignore_patterns("train_state"))
    shutil.copy(run / rundir.WEIGHTS, tmp_path / "models" / "outside.safetensors")  # a real file out there
    (run / rundir.WEIGHTS).unlink()
    from safetensors import safe_open
    with safe_open(str(tmp_path / "models" / "outside.safetensors"), "pt") as f:
        names = list(f.keys())
    (run / rundir.WEIGHTS_INDEX).write_text(json.dumps({"weight_map": {n: shard for n in names}}))
    with pytest.raises(LucaError, match="leaves the directory"):
        rundir.load_model(run)


@pytest.mark.parametrize("name", ["../../outside.pt", "/etc/passwd", "sub/x.pt", "..", ""])
def test_checkpoint_manifest_cannot_leave_train_state(tmp_path, name):
    from luca.train import load_state
    d = tmp_path / "run" / rundir.TRAIN_STATE
    d.mkdir(parents=True)
    (d / "meta.json").write_text(json.dumps({"step": 1, "file": name, "sha256": "0" * 64}))
    with pytest.raises(LucaError, match="not a file name inside"):
        load_state(tmp_path / "run")


def test_data_manifest_cannot_point_shards_outside(tmp_path):
    from luca import data as D
    from luca.tokenizer import byte_tokenizer
    (tmp_path / "corpus.txt").write_text("hello world, " * 200)
    out = tmp_path / "data"
    D.collect(D.DataConfig(sources=[str(tmp_path / "corpus.txt")], val_fraction=0.0), out, progress=False)
    D.tokenize(out, byte_tokenizer(), progress=False)
    m = json.loads((out / "manifest.json").read_text())
    shard = m["tokens"]["train"]["shards"][0]
    shutil.copy(out / "tokens" / shard["file"], tmp_path / "outside.bin")
    shard["file"] = "../../outside.bin"
    (out / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(LucaError, match="damaged"):
        D.TokenShards(out, "train")


def test_gguf_and_adapter_files_stay_in_the_run_directory(tmp_path):
    from luca.export import TYPES, gguf_path
    for name in ("run", "..", "a b", "x..y"):
        run = (tmp_path / "runs" / name)
        for q in TYPES:
            p = gguf_path(run, q)
            assert p.parent == run.resolve() / rundir.GGUF_DIR and "/" not in p.name
    for rel in (rundir.ADAPTER_WEIGHTS, rundir.ADAPTER_CONFIG):
        assert (tmp_path / rel).resolve().is_relative_to(tmp_path) and ".." not in rel


@pytest.mark.parametrize("target", ["/web/../../luca/serve.py", "/web/%2e%2e/%2e%2e/serve.py", "/web/..%2f..%2fserve.py",
                                    "/web/%2e%2e%2fserve.py", "/web//etc/passwd", "/web/..\\..\\serve.py",
                                    "/web/%00", "/../../etc/passwd", "//etc/passwd", "/web/app.js%00.html"])
def test_server_static_files_cannot_escape(served_app, target):
    data = served_app.get(target)
    status = int(data.split(b" ", 2)[1])
    assert status in (400, 404, 405), data[:300]
    assert b"def create_app" not in data and b"root:" not in data
    assert served_app.get("/web/app.js").startswith(b"HTTP/1.1 200")  # the real file is served


@pytest.fixture(scope="module")
def served_app(tiny_run):
    pytest.importorskip("fastapi")
    pytest.importorskip("uvicorn")
    from luca.serve import ServerThread, build
    app, served = build(str(tiny_run))
    with ServerThread(app) as srv:
        def get(path: str) -> bytes:
            s = socket.create_connection(("127.0.0.1", srv.port), timeout=30)
            s.sendall(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n".encode())
            out = b""
            while chunk := s.recv(65536):
                out += chunk
            s.close()
            return out
        srv.get = get
        yield srv
    served.scheduler.close()


def test_marker_never_written_anywhere():
    assert not Path(MARKER).exists() and not (Path(os.environ.get("TMPDIR", "/tmp")) / MARKER).exists()
