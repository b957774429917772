"""luca/fp8_head.py: the head's GEMMs in FP8 and its cross-entropy kernel, run by Triton's interpreter
on CPU tensors (torch's CPU `_scaled_mm`), checked against FP32 cross-entropy and autograd.

This file is also the worker script that torchrun starts for the DDP / FSDP2 test (`__main__`)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("triton")

from luca import fp8_head  # noqa: E402
from luca.model import ModelConfig, Transformer  # noqa: E402


@pytest.fixture(autouse=True)
def interpreter():
    assert os.environ.get("TRITON_INTERPRET") == "1"  # tests/conftest.py, before triton is imported


TINY = ModelConfig(vocab_size=256, n_layers=2, d_model=32, n_heads=4, n_kv_heads=2, max_seq_len=32,
                   tie_embeddings=True)


@pytest.mark.parametrize("encode,transpose", [("bits", "kernel"), ("half", "kernel"), ("bits", "copy"),
                                              ("half", "copy")])
def test_rows_give_the_loss_and_both_layouts_of_the_fp8_gradient(encode, transpose, monkeypatch):
    monkeypatch.setattr(fp8_head, "FP8_ENCODE", encode)
    monkeypatch.setattr(fp8_head, "FP8_TRANSPOSE", transpose)
    # 40 rows: a second program of 32 with only 8 real rows; 700 logits: tiles that do not divide it
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(40, 700, generator=g) * 4).bfloat16()
    t = torch.randint(0, 700, (40,), generator=g)
    t[1] = t[37] = -100
    out = (torch.full((40, 700), float("nan")).to(torch.float8_e5m2),
           torch.full((700, 40), float("nan")).to(torch.float8_e5m2))
    losses, g8, gt8 = fp8_head.cross_entropy_fp8(x, t, out)
    assert g8 is out[0] and gt8 is out[1]
    assert g8.float().isfinite().all() and gt8.float().isfinite().all()  # every entry written, in both
    ref = F.cross_entropy(x.float(), t, ignore_index=-100, reduction="none")
    torch.testing.assert_close(losses, ref, rtol=1e-5, atol=1e-5)
    assert g8.dtype == gt8.dtype == torch.float8_e5m2 and g8.shape == (40, 700) and gt8.shape == (700, 40)
    assert torch.equal(gt8.float(), g8.float().t())  # the same values, transposed
    want = (torch.softmax(x.float(), -1) - F.one_hot(t.clamp(min=0), 700)) * (t != -100)[:, None]
    got = g8.float() / fp8_head.G_SCALE
    # the kernel's own e5m2 encoding rounds as torch's conversion does (to nearest, ties to even,
    # subnormals included): the same value, or the other neighbour where FP32 exp rounding differs
    # (or, through FP16, where the value lies within an FP16 step of a midpoint: 2⁻¹¹ of the value,
    # or 2⁻²⁵ among FP16's subnormals)
    d, a = (1e-5, 0.0) if encode == "bits" else (2 ** -11, 2 ** -25)
    ref8 = [((want * (1 + e) * fp8_head.G_SCALE + b).to(torch.float8_e5m2).float() / fp8_head.G_SCALE)
            for e in (0.0, -d, d) for b in (0.0, -a, a)]
    assert torch.stack([got == r for r in ref8]).any(0).all()
    assert (got == ref8[0]).float().mean() > (0.999 if encode == "bits" else 0.99)
    assert (got.abs() < 2 ** -14 / fp8_head.G_SCALE).any() and (got.abs() >= 0.5).any()  # both encodings ran
    assert (g8[1].float() == 0).all() and (g8[37].float() == 0).all() and losses[1] == losses[37] == 0
    picked = got[torch.arange(40), t.clamp(min=0)]
    assert (picked[t != -100] < 0).all()  # the target's entry carries the − 1


def test_quantized_rows_are_torchs_e4m3_bytes_in_both_layouts():
    # random rows of two magnitudes (several programs, a partial last one), then exact ties: the
    # subnormals' halfway points and normal ones, rounded to even as torch's conversion rounds them
    g = torch.Generator().manual_seed(0)
    ties = [448.0] + [(k + 0.5) / 512 * s for k in range(8) for s in (1, -1)] + \
        [1 + 1 / 16, 1 + 3 / 16, -(1 + 1 / 16), 2 ** -6 * (1 + 1 / 16), 0.0, -0.0]
    for x in [(torch.randn(1500, 40, generator=g) * 30).bfloat16(), torch.randn(37, 48, generator=g) * 1e-3,
              torch.tensor(ties).reshape(1, -1)]:
        x8, xt8, s = fp8_head.quantize_rows(x)
        ref8, ref_s = fp8_head.to_e4m3(x)
        assert x8.dtype == xt8.dtype == torch.float8_e4m3fn and xt8.shape == x.shape[::-1]
        assert torch.equal(s, ref_s)
        assert torch.equal(x8.view(torch.uint8), ref8.view(torch.uint8))
        assert torch.equal(xt8.view(torch.uint8), ref8.t().contiguous().view(torch.uint8))
    x = torch.randn(4, 16, generator=g)
    x[1, 3] = float("nan")  # a NaN makes the scale, and so the logits, non-finite: the step is skipped
    assert fp8_head.quantize_rows(x)[2].isinf().all()


def _problem(seed=2):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(2, 40, 32, generator=g, requires_grad=True)
    w = (torch.randn(320, 32, generator=g) * 0.3).requires_grad_()
    t = torch.randint(0, 320, (2, 40), generator=g)
    t[0, :5] = -100
    return h, w, t


def _rel(a, b):
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_loss_and_gradients_close_to_fp32_autograd(reduction):
    h, w, t = _problem()
    loss = fp8_head.linear_cross_entropy_fp8(h, w, t, reduction)
    (loss * 3).backward()
    got = loss.detach(), h.grad.clone(), w.grad.clone()
    h.grad = w.grad = None
    ref = F.cross_entropy(F.linear(h, w).view(-1, 320), t.view(-1), ignore_index=-100, reduction=reduction)
    (ref * 3).backward()
    assert _rel(got[0], ref.detach()) < 0.02  # e4m3 operands: 3 mantissa bits each
    for a, b in zip(got[1:], (h.grad, w.grad)):
        assert _rel(a, b) < 0.1
        assert F.cosine_similarity(a.flatten(), b.flatten(), 0) > 0.99


def test_cached_weight_and_kept_gradient_give_the_same_result():
    """The weight's e4m3 copies made once (FP8Weight) and the weight gradient added into a kept FP32
    buffer: the same numbers as the per-call cast and autograd's gradient."""
    h, w, t = _problem(3)
    loss = fp8_head.linear_cross_entropy_fp8(h, w, t)
    loss.backward()
    ref = loss.detach(), h.grad.clone(), w.grad.clone()
    h.grad = None
    acc = torch.ones_like(w)
    loss = fp8_head.linear_cross_entropy_fp8(h, w, t, cached=fp8_head.FP8Weight.of(w), acc=acc)
    w.grad = None
    loss.backward()
    assert w.grad is None  # went into acc instead
    assert torch.equal(loss.detach(), ref[0]) and torch.equal(h.grad, ref[1])
    torch.testing.assert_close(acc - 1, ref[2], rtol=1e-6, atol=1e-7)


def test_all_targets_ignored_gives_zero_loss_and_gradients():
    h = torch.randn(4, 16, requires_grad=True)
    w = torch.randn(48, 16, requires_grad=True)
    loss = fp8_head.linear_cross_entropy_fp8(h, w, torch.full((4,), -100))
    loss.backward()
    assert loss.item() == 0 and (h.grad == 0).all() and (w.grad == 0).all()


def test_training_with_the_fp8_head_follows_the_bf16_head():
    """A tiny tied-embedding Transformer, GPU switches on, weights cached and gradients kept as luca
    train has them on one GPU: the FP8 head's loss curve stays within 3% of the BF16 head's."""
    data = torch.randint(0, 256, (1, 4, 17), generator=torch.Generator().manual_seed(3)).expand(8, 4, 17)
    curves = {}
    for fp8 in (False, True):
        torch.manual_seed(0)
        m = Transformer(TINY)
        m.loss_impl = "fused"
        m.set_gpu_training(True, fp8_head=fp8)
        m.cache_weights()
        m.keep_grads()
        assert m.fp8_head == fp8 and (m.lm_head.weight_f8 is not None) == fp8
        opt = torch.optim.AdamW(m.parameters(), lr=1e-2)
        curve = []
        for batch in data:  # one batch again and again: the loss must fall
            m.refresh_weights()
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = m(batch[:, :-1], batch[:, 1:])
            loss.backward()
            m.unfold_norm_grads()
            opt.step()
            for p in m.parameters():
                p.grad.zero_()
            curve.append(loss.item())
        curves[fp8] = curve
    assert curves[True][-1] < curves[True][0] - 1
    torch.testing.assert_close(torch.tensor(curves[True]), torch.tensor(curves[False]), rtol=3e-2, atol=0)


def _grads(batch: torch.Tensor, fp8: bool, world: int = 1, fsdp: bool = False) -> dict:
    """One forward and backward of the tiny tied model (seed 0) with the GPU switches on, as luca.train
    builds it with more than one process (no cached weights, no kept gradients), under luca's DDP or
    FSDP2 wrapping when `world` > 1; FP32 weights, BF16 autocast. The full gradients by name."""
    from luca.distributed import Dist, wrap
    torch.manual_seed(0)
    m = Transformer(TINY)
    m.loss_impl = "fused"
    m.set_gpu_training(True, fp8_head=fp8)
    assert m.fp8_head == fp8
    dd = Dist(int(os.environ.get("RANK", 0)), world)
    model = wrap(m, dd, torch.device("cpu"), fsdp, False)
    part = batch.chunk(world)[dd.rank]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(part[:, :-1], part[:, 1:])
    loss.backward()
    return {n: (p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad).detach().clone()
            for n, p in m.named_parameters()}


@pytest.mark.parametrize("fsdp", [False, True], ids=["ddp", "fsdp"])
def test_two_processes_reduce_the_fp8_heads_gradient(fsdp, tmp_path):
    """Under torchrun (gloo, 2 processes, half the batch each) the FP8 head's gradients, which its
    autograd function returns when gradients are not kept, reach DDP's and FSDP2's reductions: both
    ranks hold the gradient of the whole batch, close to one process's FP8 gradient of it and far
    from one rank's own half."""
    batch = torch.randint(0, 256, (8, 17), generator=torch.Generator().manual_seed(5))
    torch.save(batch, tmp_path / "batch.pt")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(sys.path)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", __file__,
           str(tmp_path), json.dumps(fsdp)]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-5000:]
    ranks = [torch.load(tmp_path / f"grads{i}.pt") for i in range(2)]
    whole, half = _grads(batch, True), _grads(batch[:4], True)
    exact = _grads(batch, False)
    head = "model.embed_tokens.weight"  # tied: the head's gradient and the embedding's
    for name in whole:
        torch.testing.assert_close(ranks[0][name], ranks[1][name], rtol=0, atol=0)
        assert _rel(ranks[0][name], exact[name]) < 0.1, name
    assert _rel(ranks[0][head], whole[head]) < 0.05
    assert _rel(half[head], whole[head]) > 0.3  # what an unreduced head gradient would be


if __name__ == "__main__":  # the torchrun worker
    import torch.distributed as dist
    torch.set_num_threads(1)
    work, fsdp = Path(sys.argv[1]), json.loads(sys.argv[2])
    dist.init_process_group("gloo")
    grads = _grads(torch.load(work / "batch.pt"), True, world=2, fsdp=fsdp)
    torch.save(grads, work / f"grads{dist.get_rank()}.pt")
    dist.destroy_process_group()
