"""Two processes under torchrun (gloo, CPU) train like one process with the same global batch.

This file is also the worker script that torchrun starts (see `__main__` at the bottom).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import make_corpus
from luca import rundir

MODEL = dict(n_layers=2, d_model=64, n_heads=4, n_kv_heads=2, max_seq_len=64)
# Global batch 2 micro-batches of 4 × 32 tokens: accumulated in one process, one per rank in two.
TRAIN = dict(seq_len=32, micro_batch=4, batch_tokens=256, max_steps=6, lr=3e-3, warmup_steps=2, dtype="fp32",
             eval_every=3, eval_batches=2, save_every=3, log_every=1, seed=3)


def _run(data_dir: Path, tok_dir: Path, out: Path, overrides: dict, until: int | None = None,
         resume: bool = False) -> None:
    from luca.config import build
    from luca.model import ModelConfig
    from luca.tokenizer import Tokenizer
    from luca.train import TrainConfig, train
    tok = Tokenizer.load(tok_dir)
    mc = ModelConfig(vocab_size=-(-tok.vocab_size // 64) * 64, **MODEL)
    tc = build(TrainConfig, {**TRAIN, **overrides}, "train")
    train(out, mc, tc, data_dir, tok, resume=resume, progress=False, until=until)


def _torchrun(tmp: Path, data_dir: Path, tok_dir: Path, out: Path, overrides: dict, until: int | None) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(sys.path)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", __file__,
           str(data_dir), str(tok_dir), str(out), json.dumps(overrides), str(until or 0)]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=tmp)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-5000:]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from luca import data as D
    from luca.tokenizer import TokenizerConfig, build_tokenizer
    work = tmp_path_factory.mktemp("dist")
    data_dir, tok_dir = work / "data", work / "tok"
    D.collect(D.DataConfig(sources=[str(make_corpus(work / "corpus"))], val_fraction=0.1), data_dir, progress=False)
    tok = build_tokenizer(TokenizerConfig(kind="bpe", vocab_size=320, min_frequency=2),
                          D.iter_documents(data_dir, "train"))
    tok.save(tok_dir)
    D.tokenize(data_dir, tok, progress=False)
    single = work / "single"
    _run(data_dir, tok_dir, single, {})
    return work, data_dir, tok_dir, rundir.read_metrics(single)


def _same_curve(got: list[dict], ref: list[dict], steps: range) -> None:
    by_step = {r["step"]: r for r in got}
    assert sorted(by_step) == [r["step"] for r in got], "duplicated metrics lines: more than one rank wrote"
    for r in ref:
        if r["step"] in steps:
            g = by_step[r["step"]]
            assert g["loss"] == pytest.approx(r["loss"], rel=1e-4, abs=1e-5), r["step"]
            assert g["grad_norm"] == pytest.approx(r["grad_norm"], rel=1e-3, abs=1e-5), r["step"]
            if "val_bpb" in r:
                assert g["val_bpb"] == pytest.approx(r["val_bpb"], rel=1e-4), r["step"]


def test_ddp_two_processes_match_one(data):
    work, data_dir, tok_dir, ref = data
    out = work / "ddp"
    _torchrun(work, data_dir, tok_dir, out, {}, None)
    got = rundir.read_metrics(out)
    assert [r["step"] for r in got] == list(range(1, 7))
    _same_curve(got, ref, range(1, 7))
    assert json.loads((out / "train_state" / "meta.json").read_text())["world"] == 2
    assert (out / "model.safetensors").is_file()


def test_fsdp_checkpoint_resumes_in_one_process(data):
    work, data_dir, tok_dir, ref = data
    out = work / "fsdp"
    _torchrun(work, data_dir, tok_dir, out, {"fsdp": True}, until=3)
    meta = json.loads((out / "train_state" / "meta.json").read_text())
    assert meta["step"] == 3 and meta["world"] == 2
    assert not (out / "model.safetensors").exists()
    _same_curve(rundir.read_metrics(out), ref, range(1, 4))
    # The sharded run's checkpoint is full: one process picks it up and continues the same curve.
    _run(data_dir, tok_dir, out, {}, resume=True)
    got = rundir.read_metrics(out)
    assert [r["step"] for r in got] == list(range(1, 7))
    _same_curve(got, ref, range(1, 7))


if __name__ == "__main__":  # the torchrun worker
    d, t, o, over, until = sys.argv[1:6]
    torch.set_num_threads(1)
    _run(Path(d), Path(t), Path(o), json.loads(over), until=int(until) or None)
