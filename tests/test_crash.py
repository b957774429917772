"""No lost work: SIGKILL at any moment, a full disk, NaN losses.

- Crash safety: a training process is killed with SIGKILL at chosen points inside checkpoint
  writing (half-way through the state file, before and after each rename, while old states are
  deleted) and at seeded random moments, then resumed, again and again; after every kill the
  committed checkpoint loads (its checksum verified), and the run finally ends with weights bitwise
  equal to an uninterrupted run's.
- A full disk (RLIMIT_FSIZE: writes past the limit fail with EFBIG, as ENOSPC would) or an output
  path that cannot be a directory: one clear message, exit code 2, the previous checkpoint intact.
- Numerical faults: a NaN embedding row (planted in a checkpoint) makes exactly the steps whose
  batches use that token non-finite; they are skipped and counted, and K in a row stop training
  with the last good checkpoint kept.

The training processes are forked from a fork server that has torch imported already, so a kill
and restart costs milliseconds rather than an interpreter start. Fault injection lives in the
child process of this test (it wraps os.replace, torch.save and Path.unlink there); luca has no
test hooks.
"""
from __future__ import annotations

import json
import multiprocessing as mp
import os
import random
import resource
import signal
import sys
from pathlib import Path

import pytest
import torch

from conftest import make_corpus
from luca import rundir
from luca.errors import LucaError
from luca.train import load_state

MC = dict(vocab_size=320, n_layers=2, d_model=64, n_heads=4, n_kv_heads=2, max_seq_len=32, tie_embeddings=False)
TC = dict(seq_len=32, micro_batch=2, batch_tokens=128, max_steps=14, lr=3e-3, warmup_steps=2, eval_every=0,
          eval_batches=1, save_every=1, log_every=1, seed=3, max_bad_steps=100, dtype="fp32", device="cpu")
PRESET = """
name = "crash"
[tokenizer]
kind = "byte"
[model]
vocab_size = 320
n_layers = 2
d_model = 64
n_heads = 4
n_kv_heads = 2
max_seq_len = 32
tie_embeddings = false
[train]
seq_len = 32
micro_batch = 2
batch_tokens = 128
max_steps = 14
lr = 3e-3
warmup_steps = 2
eval_every = 0
eval_batches = 1
save_every = 1
log_every = 1
seed = 3
dtype = "fp32"
device = "cpu"
"""


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """Token shards and a byte tokenizer on disk, the same for every run of this module."""
    from luca import data as D
    from luca.tokenizer import byte_tokenizer
    work = tmp_path_factory.mktemp("crash")
    D.collect(D.DataConfig(sources=[str(make_corpus(work / "corpus"))], val_fraction=0.1), work / "data",
              progress=False)
    tok = byte_tokenizer()
    D.tokenize(work / "data", tok, progress=False)
    tok.save(work / "tok")
    (work / "preset.toml").write_text(PRESET)
    return work


@pytest.fixture(scope="module")
def forks():
    ctx = mp.get_context("forkserver")
    # Imported once in the server, not in every forked child (a run's report plots its loss curve).
    ctx.set_forkserver_preload(["torch", "luca.train", "luca.cli", "luca.pipeline", "matplotlib.pyplot"])
    return ctx


# -- the child process --------------------------------------------------------------------------
def _train(run_dir: str, work: str, kill: tuple | None, overrides: dict | None = None) -> None:
    """Resume (or start) training; with `kill = (save_index, phase)`, SIGKILL itself at that point of
    the save_index-th checkpoint written by this process."""
    torch.set_num_threads(1)
    if kill is not None:
        _inject(*kill)
    from luca.model import ModelConfig
    from luca.tokenizer import Tokenizer
    from luca.train import TrainConfig, train
    train(run_dir, ModelConfig(**MC), TrainConfig(**{**TC, **(overrides or {})}), Path(work) / "data",
          Tokenizer.load(Path(work) / "tok"), resume=True, progress=False)


def _inject(save_index: int, phase: str) -> None:
    import luca.train as T
    write_state, real_replace, real_save, real_unlink = T.write_state, os.replace, torch.save, Path.unlink
    n = {"saves": 0, "replaces": 0}

    def armed() -> bool:
        return n["saves"] == save_index

    def die() -> None:
        os.kill(os.getpid(), signal.SIGKILL)

    def counting_write_state(*a, **kw):
        n["saves"] += 1
        n["replaces"] = 0
        write_state(*a, **kw)
        if armed() and phase == "after-commit":
            die()

    def replace(src, dst, *a, **kw):
        if armed():
            n["replaces"] += 1
            if phase == "before-state-rename" and n["replaces"] == 1:
                die()
            if phase == "before-meta-rename" and n["replaces"] == 2:
                die()
        real_replace(src, dst, *a, **kw)
        if armed() and phase == "after-state-rename" and n["replaces"] == 1:
            die()

    def save(obj, f, *a, **kw):
        if armed() and phase == "mid-write":
            import io
            buf = io.BytesIO()
            real_save(obj, buf, *a, **kw)
            f.write(buf.getvalue()[:len(buf.getvalue()) // 2])  # half the file reaches the disk
            f.flush()
            os.fsync(f.f.fileno() if hasattr(f, "f") else f.fileno())
            die()
        real_save(obj, f, *a, **kw)

    def unlink(self, *a, **kw):
        if armed() and phase == "while-deleting-old" and self.name.startswith("state"):
            die()
        real_unlink(self, *a, **kw)

    T.write_state = counting_write_state
    os.replace = replace
    torch.save = save
    Path.unlink = unlink


def _cli(argv: list[str], stderr_path: str, fsize_limit: int | None) -> None:
    """`luca ARGV` in this process, stderr to a file, optionally with a file-size limit (a full disk)."""
    torch.set_num_threads(1)
    if fsize_limit is not None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # writes past the limit fail with EFBIG instead
        resource.setrlimit(resource.RLIMIT_FSIZE, (fsize_limit, fsize_limit))
    fd = os.open(stderr_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    os.dup2(fd, 2)
    sys.stderr = os.fdopen(2, "w", buffering=1)
    from luca.cli import main
    os._exit(main(argv))


def _run(forks, target, *args, timeout: float = 120, kill_after: float | None = None) -> int:
    p = forks.Process(target=target, args=args)
    p.start()
    p.join(kill_after if kill_after is not None else timeout)
    if p.is_alive() and kill_after is not None:
        p.kill()  # SIGKILL
        p.join(timeout)
    if p.is_alive():
        p.kill()
        p.join()
        pytest.fail(f"{target.__name__} hung for {timeout} s")
    return p.exitcode


def _weights(run: Path) -> dict[str, torch.Tensor]:
    return load_state(run)["model"]


def _assert_committed_checkpoint_loads(run: Path, last_step: int) -> int:
    """The committed checkpoint loads and verifies; it never goes back in time. Returns its step."""
    state = load_state(run)  # raises on a checksum mismatch or a half-written file
    if state is None:
        assert last_step == 0
        return 0
    step = int(state["step"])
    assert state["meta"]["step"] == step >= last_step
    return step


# -- crash safety -------------------------------------------------------------------------------
PHASES = ["mid-write", "before-state-rename", "after-state-rename", "before-meta-rename", "after-commit",
          "while-deleting-old"]


@pytest.mark.timeout(300)
def test_sigkill_anywhere_then_resume_is_bitwise_equal(tmp_path, prepared, forks):
    ref = tmp_path / "ref"
    assert _run(forks, _train, str(ref), str(prepared), None) == 0
    run = tmp_path / "run"
    kills = [(save_index, phase) for save_index, phase in zip([1, 2, 2, 1, 3, 2], PHASES)]
    rng = random.Random(9)
    tried, step, seen_half_written = [], 0, False
    for kill in kills:  # a deterministic kill inside the save_index-th checkpoint of this process
        code = _run(forks, _train, str(run), str(prepared), kill)
        assert code == -signal.SIGKILL, (kill, code)
        tmp_files = list((run / rundir.TRAIN_STATE).glob(".state-*.tmp"))
        if kill[1] == "mid-write":
            assert tmp_files and tmp_files[0].stat().st_size > 0  # the half-written file is there ...
            seen_half_written = True
        new_step = _assert_committed_checkpoint_loads(run, step)  # ... and is not taken for a checkpoint
        if kill[1] in ("mid-write", "before-state-rename", "after-state-rename", "before-meta-rename"):
            assert new_step == step + kill[0] - 1, kill  # the interrupted checkpoint was not committed
        else:
            assert new_step == step + kill[0], kill
        step = new_step
        tried.append(kill)
    for delay in [rng.uniform(0.05, 1.5) for _ in range(6)]:  # and at random moments
        code = _run(forks, _train, str(run), str(prepared), None, kill_after=delay)
        step = _assert_committed_checkpoint_loads(run, step)
        tried.append(("random", round(delay, 3), code))
    assert _run(forks, _train, str(run), str(prepared), None) == 0
    assert seen_half_written and load_state(run)["step"] == TC["max_steps"]
    a, b = _weights(ref), _weights(run)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert (ref / rundir.WEIGHTS).read_bytes() == (run / rundir.WEIGHTS).read_bytes()
    steps = [r["step"] for r in rundir.read_metrics(run)]
    assert steps == list(range(1, TC["max_steps"] + 1))  # no step lost or logged twice
    # Nothing but the committed state is left behind once a checkpoint commits.
    assert sorted(p.name for p in (run / rundir.TRAIN_STATE).iterdir()) == \
        sorted(["meta.json", load_state(run)["meta"]["file"]])
    print(f"\nkill points tried: {len(tried)}: {tried}")


def test_damaged_checkpoint_is_refused_with_a_clear_message(tmp_path, prepared, forks):
    run = tmp_path / "run"
    assert _run(forks, _train, str(run), str(prepared), None, {"max_steps": 2}) == 0
    meta = json.loads((run / rundir.TRAIN_STATE / "meta.json").read_text())
    state_file = run / rundir.TRAIN_STATE / meta["file"]
    state_file.write_bytes(state_file.read_bytes()[:-100])  # truncated behind luca's back
    with pytest.raises(LucaError, match="checksum"):
        load_state(run)
    (run / rundir.TRAIN_STATE / "meta.json").write_text(json.dumps({**meta, "file": "../../etc/passwd"}))
    with pytest.raises(LucaError, match="not a file name inside"):
        load_state(run)
    (run / rundir.TRAIN_STATE / "meta.json").write_text('{"step": 2, "fi')
    with pytest.raises(LucaError, match="damaged"):
        load_state(run)


# -- disk full, unwritable output ---------------------------------------------------------------
def _train_cli(prepared: Path, out: Path, *extra: str) -> list[str]:
    return ["train", "--data", str(prepared / "data"), "--tokenizer", str(prepared / "tok"), "--out", str(out),
            "--preset", str(prepared / "preset.toml"), *extra]


def _one_error(stderr: Path) -> str:
    text = stderr.read_text()
    assert "Traceback" not in text, text
    lines = [line for line in text.splitlines() if line.strip()]
    assert len([line for line in lines if line.startswith("error: ")]) == 1 and lines[-1].startswith("error: "), text
    return lines[-1]


@pytest.mark.timeout(300)
def test_disk_full_gives_a_clear_error_and_keeps_the_previous_checkpoint(tmp_path, prepared, forks):
    run, err = tmp_path / "run", tmp_path / "stderr.txt"
    assert _run(forks, _cli, _train_cli(prepared, run, "--train.max_steps", "3"), str(err), None) == 0
    before = load_state(run)
    assert before["step"] == 3
    size = (run / rundir.TRAIN_STATE / before["meta"]["file"]).stat().st_size
    # Resume to step 6 with files capped below a checkpoint's size: the first save fails.
    code = _run(forks, _cli, _train_cli(prepared, run, "--resume", "--train.max_steps", "6"), str(err), size // 2)
    msg = _one_error(err)
    assert code == 2 and "cannot write the checkpoint of step 4" in msg and "File too large" in msg, msg
    assert "previous checkpoint is kept" in msg
    after = load_state(run)  # verified against its checksum
    assert after["step"] == 3 and after["meta"]["sha256"] == before["meta"]["sha256"]
    assert not list((run / rundir.TRAIN_STATE).glob(".*.tmp"))  # no debris
    # The disk has room again: the run resumes and finishes.
    assert _run(forks, _cli, _train_cli(prepared, run, "--resume", "--train.max_steps", "6"), str(err), None) == 0
    assert load_state(run)["step"] == 6
    # A cap so low that even the small files of a resume fail: still one clear line.
    code = _run(forks, _cli, _train_cli(prepared, run, "--resume", "--train.max_steps", "8"), str(err), 200)
    assert code == 2, err.read_text()
    print("\n" + msg + "\n" + _one_error(err))
    assert load_state(run)["step"] == 6


def test_output_that_cannot_be_a_directory(tmp_path, prepared, forks):
    """Tests run as root, which ignores permission bits: a file where a directory must go stands in."""
    err = tmp_path / "stderr.txt"
    blocker = tmp_path / "blocker"
    blocker.write_text("a file, not a directory")
    code = _run(forks, _cli, _train_cli(prepared, blocker / "run"), str(err), None)
    assert code == 2 and "blocker" in _one_error(err)
    run = tmp_path / "run"
    assert _run(forks, _cli, _train_cli(prepared, run, "--train.max_steps", "2"), str(err), None) == 0
    before = load_state(run)
    state_dir = run / rundir.TRAIN_STATE
    for p in state_dir.iterdir():  # train_state/ turned into a file: the next checkpoint cannot go there
        p.rename(tmp_path / p.name)
    state_dir.rmdir()
    state_dir.write_text("")
    code = _run(forks, _cli, _train_cli(prepared, run, "--train.max_steps", "3"), str(err), None)
    assert code == 2 and "train_state" in _one_error(err)
    state_dir.unlink()
    state_dir.mkdir()
    for name in ("meta.json", before["meta"]["file"]):
        (tmp_path / name).rename(state_dir / name)
    assert load_state(run)["step"] == 2


# -- numerical faults ---------------------------------------------------------------------------
def _poison(run: Path, token: int) -> None:
    """Set the input-embedding row of `token` to NaN in the committed checkpoint (re-committed)."""
    from luca.train import write_state
    state = load_state(run)
    meta = state.pop("meta")
    state["model"]["model.embed_tokens.weight"][token] = float("nan")
    write_state(run, state, int(state["step"]), {k: v for k, v in meta.items() if k not in ("step", "sha256", "file")})


def _bad_steps_expected(prepared: Path, token: int, start: int, stop: int) -> list[bool]:
    """Which steps feed `token` as an input: with its embedding row NaN, exactly those are non-finite."""
    from luca.data import TokenShards
    from luca.train import Batches
    b = Batches(TokenShards(prepared / "data", "train"), TC["seq_len"], TC["seed"])
    accum = TC["batch_tokens"] // (TC["micro_batch"] * TC["seq_len"])
    return [any(bool((b.micro_batch(s, m, 0, 1, accum, TC["micro_batch"])[:, :-1] == token).any())
                for m in range(accum)) for s in range(start, stop)]


@pytest.mark.timeout(300)
def test_nan_steps_are_skipped_counted_and_stop_training_after_k(tmp_path, prepared, forks):
    run = tmp_path / "run"
    assert _run(forks, _train, str(run), str(prepared), None, {"max_steps": 4}) == 0
    # A byte that some steps use and others do not.
    token, pattern = None, None
    for t in b"xkqzjvKQ(),:0123456789":
        pattern = _bad_steps_expected(prepared, t, 4, TC["max_steps"])
        if 2 <= sum(pattern) <= len(pattern) - 3:
            token = t
            break
    assert token is not None
    _poison(run, token)
    poisoned = load_state(run)["model"]
    assert _run(forks, _train, str(run), str(prepared), None, {"max_bad_steps": 100}) == 0
    recs = rundir.read_metrics(run)
    skipped = [recs[i]["bad_steps"] - (recs[i - 1]["bad_steps"] if i else 0) for i in range(len(recs))]
    assert skipped[4:] == [int(p) for p in pattern]  # detected at once, at exactly those steps
    assert recs[-1]["bad_steps"] == sum(pattern)
    print(f"\nNaN row for byte {token}: steps 5-{TC['max_steps']} bad as predicted: {[int(p) for p in pattern]}")
    assert json.loads((run / "train_summary.json").read_text())["bad_steps"] == sum(pattern)
    assert load_state(run)["meta"]["bad_steps"] == sum(pattern)
    final = load_state(run)["model"]
    for k, v in final.items():  # the NaN stayed in its row: no skipped step touched the weights
        rest = v[torch.arange(v.shape[0]) != token] if k == "model.embed_tokens.weight" else v
        assert torch.isfinite(rest).all(), k
    assert not torch.equal(final["model.norm.weight"], poisoned["model.norm.weight"])  # good steps trained

    # Every row NaN: every step is bad; K = 3 in a row stop training, exit code 2, checkpoint kept.
    run2, err = tmp_path / "run2", tmp_path / "stderr.txt"
    assert _run(forks, _cli, _train_cli(prepared, run2, "--train.max_steps", "4"), str(err), None) == 0
    state = load_state(run2)
    state["model"]["model.embed_tokens.weight"][:] = float("nan")
    nan_rows = state["model"]["model.embed_tokens.weight"].clone()
    from luca.train import write_state
    state.pop("meta")
    write_state(run2, state, 4, {"bad_steps": 0})
    code = _run(forks, _cli, _train_cli(prepared, run2, "--resume", "--train.max_steps", "20",
                                        "--train.max_bad_steps", "3"), str(err), None)
    msg = _one_error(err)
    assert code == 2 and "3 consecutive steps with non-finite loss" in msg and "max_bad_steps" in msg, msg
    kept = load_state(run2)
    assert 4 <= kept["step"] < 4 + 3  # no checkpoint past the stop; its weights are the pre-fault ones
    assert torch.equal(kept["model"]["model.embed_tokens.weight"].isnan(), nan_rows.isnan())
    assert torch.equal(kept["model"]["model.norm.weight"], state["model"]["model.norm.weight"])
