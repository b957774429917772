"""Training lowers the loss, resumes bitwise, writes a complete HF run directory."""
from __future__ import annotations

import json
import os

import pytest
import torch

from conftest import train_tiny_run
from luca import rundir
from luca.optim import lr_at


def test_loss_falls_and_run_dir_is_complete(tiny_run):
    recs = rundir.read_metrics(tiny_run)
    assert recs[-1]["loss"] < recs[0]["loss"] - 0.5
    for key in ("step", "loss", "lr", "grad_norm", "tokens", "tokens_per_s", "seed"):
        assert key in recs[-1]
    assert any("val_bpb" in r for r in recs)
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
                 "generation_config.json", "metrics.jsonl", "report.md", "loss.png"):
        assert (tiny_run / name).is_file(), name
    from safetensors import safe_open
    with safe_open(str(tiny_run / "model.safetensors"), "pt") as f:
        assert all(f.get_tensor(k).dtype == torch.bfloat16 for k in f.keys())
    report = (tiny_run / "report.md").read_text()
    assert "validation BPB" in report and "loss.png" in report
    assert json.loads((tiny_run / rundir.TRAIN_SUMMARY).read_text())["head"] == "chunked"  # a CPU's head


def test_fp8_head_without_fp8_gemms_runs_and_records_the_head_it_ran(tmp_path):
    over = {"train.fp8_head": True, "train.loss_impl": "fused"}
    run = train_tiny_run(tmp_path / "run", tmp_path, steps=2, overrides=over)
    summary = json.loads((run / rundir.TRAIN_SUMMARY).read_text())
    assert summary["head"] == "fused" and summary["steps"] == 2  # the CPU has no FP8 head in luca.train


@pytest.mark.parametrize("flavour", ["qwen2", "qwen3"])
def test_trained_flavours_load_in_transformers(tmp_path, flavour):
    transformers = pytest.importorskip("transformers")
    over = {"model.qkv_bias": True} if flavour == "qwen2" else {"model.qk_norm": True}
    run = train_tiny_run(tmp_path / "run", tmp_path, steps=8, overrides=over)
    hf = transformers.AutoModelForCausalLM.from_pretrained(run, dtype=torch.float32).eval()
    assert rundir.read_json(run / "config.json")["model_type"] == flavour
    ours = rundir.load_model(run)
    x = torch.randint(0, 300, (2, 30))
    with torch.no_grad():
        assert (ours(x) - hf(x).logits).abs().max().item() <= 1e-4


def test_trained_llama_greedy_matches_transformers(tiny_run):
    transformers = pytest.importorskip("transformers")
    from luca.engine import SamplingConfig, generate_ids
    hf = transformers.AutoModelForCausalLM.from_pretrained(tiny_run, dtype=torch.float32).eval()
    ours = rundir.load_model(tiny_run)
    tok = rundir.load_tokenizer(tiny_run)
    ids = tok.encode("def push(self, item):")
    ref = hf.generate(torch.tensor([ids]), max_new_tokens=16, do_sample=False, eos_token_id=None,
                      pad_token_id=tok.eot_id)[0, len(ids):].tolist()
    got = [step[0] for step in generate_ids(ours, [ids], SamplingConfig(max_new_tokens=16, temperature=0),
                                            stop_ids=set())]
    assert got == ref


def test_resume_is_bitwise_equal(tmp_path):
    full = train_tiny_run(tmp_path / "full", tmp_path / "a", steps=20)
    # Interrupted after step 10 (a checkpoint is written every 10 steps), then resumed.
    part = train_tiny_run(tmp_path / "part", tmp_path / "b", steps=20, until=10)
    assert not (part / "model.safetensors").exists()
    meta = json.loads((part / "train_state" / "meta.json").read_text())
    assert meta["step"] == 10
    from luca.config import build
    from luca.train import TrainConfig, train
    tok = rundir.load_tokenizer(part)
    from luca.model import ModelConfig
    mc = ModelConfig(vocab_size=320, n_layers=2, d_model=64, n_heads=4, n_kv_heads=2, max_seq_len=128)
    tc = dict(seq_len=64, micro_batch=4, batch_tokens=256, max_steps=20, lr=3e-3, warmup_steps=3,
              eval_every=10, eval_batches=2, save_every=10, log_every=5, seed=0)
    train(part, mc, build(TrainConfig, tc, "train"), tmp_path / "b" / "data", tok, resume=True, progress=False)
    from luca.train import load_state
    a, b = load_state(full)["model"], load_state(part)["model"]
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    # The metrics log has no duplicated steps after the resume.
    steps = [r["step"] for r in rundir.read_metrics(part)]
    assert steps == sorted(set(steps)) and steps[-1] == 20
    # Shards made with one tokenizer are refused with another: ids would stand for other strings.
    from luca.errors import LucaError
    from luca.tokenizer import byte_tokenizer
    with pytest.raises(LucaError, match="another tokenizer"):
        train(tmp_path / "other", mc, build(TrainConfig, tc, "train"), tmp_path / "b" / "data", byte_tokenizer(),
              progress=False)
    assert not (tmp_path / "other").exists()


def test_schedules():
    assert lr_at(0, 100, 1.0, 10) == pytest.approx(0.1)
    assert lr_at(9, 100, 1.0, 10) == pytest.approx(1.0)
    assert lr_at(99, 100, 1.0, 10, min_lr_ratio=0.1) == pytest.approx(0.1, abs=1e-3)
    assert lr_at(50, 100, 1.0, 10, "wsd", decay_fraction=0.2) == 1.0
    assert lr_at(99, 100, 1.0, 10, "wsd", 0.0, 0.2) == pytest.approx(0.0)


def test_nano_n2_gives_cublas_no_workspace_unless_the_environment_sizes_it(monkeypatch):
    from luca import config, train
    assert config.build(train.TrainConfig, config.load_preset("nano-n2")["train"], "train").blas_workspace is False
    assert train.TrainConfig().blas_workspace is True
    monkeypatch.setenv("CUBLASLT_WORKSPACE_SIZE", "")  # recorded, so the value set below is undone after
    monkeypatch.delenv("CUBLASLT_WORKSPACE_SIZE")
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # e.g. for deterministic cuBLAS: kept
    train.no_blas_workspace()
    assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8" and os.environ["CUBLASLT_WORKSPACE_SIZE"] == "0"
