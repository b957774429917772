"""luca/kernels.py: the fused head cross-entropy, run by Triton's interpreter on CPU tensors and
checked against F.cross_entropy's values and autograd gradients."""
import os

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("triton")

from luca import kernels  # noqa: E402
from luca.model import ModelConfig, Transformer  # noqa: E402


@pytest.fixture(autouse=True)
def interpreter():
    assert os.environ.get("TRITON_INTERPRET") == "1"  # tests/conftest.py, before triton is imported


def _logits(n, v, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(n, v, generator=g) * 4).to(dtype)
    t = torch.randint(0, v, (n,), generator=g)
    t[1] = t[n - 2] = -100
    return x, t


# two passes with tiles that do not divide the vocabulary; the whole row in one tile; a grid of
# fewer programs than rows, each taking every third row
@pytest.mark.parametrize("v,block,programs", [(1000, 256, 0), (257, 1024, 0), (1000, 512, 3)])
def test_rows_match_cross_entropy_and_its_gradient_fp32(v, block, programs):
    x, t = _logits(12, v, torch.float32)
    ref_x = x.clone().requires_grad_()
    ref = F.cross_entropy(ref_x, t, ignore_index=-100, reduction="none")
    (ref.sum() * 0.25).backward()
    out = x.clone()
    losses = kernels.cross_entropy_rows(out, t, torch.tensor([0.25]), block=block, num_warps=4, programs=programs)
    torch.testing.assert_close(losses, ref.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out, ref_x.grad, rtol=1e-5, atol=1e-7)
    assert losses[1] == 0 and (out[1] == 0).all() and (out[-2] == 0).all()  # ignored rows count for nothing
    assert out[0].sum().abs() < 1e-6  # a gradient row of softmax − one-hot sums to zero


@pytest.mark.parametrize("block", [256, 1024])
def test_rows_bf16_within_one_rounding_step(block):
    x, t = _logits(8, 700, torch.bfloat16, seed=1)
    ref_x = x.float().requires_grad_()
    F.cross_entropy(ref_x, t, ignore_index=-100, reduction="sum").backward()
    out = x.clone()
    losses = kernels.cross_entropy_rows(out, t, torch.ones(1), block=block, num_warps=4)
    torch.testing.assert_close(losses.sum(), F.cross_entropy(x.float(), t, reduction="sum"), rtol=1e-5, atol=1e-4)
    assert out.dtype == torch.bfloat16
    step = ref_x.grad.abs() * 2 ** -7 + 1e-30  # one BF16 step (8 significant bits)
    assert ((out.float() - ref_x.grad).abs() <= step).all()


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_linear_cross_entropy_gradients_match_autograd(reduction):
    g = torch.Generator().manual_seed(2)
    h = torch.randn(2, 9, 16, generator=g, requires_grad=True)
    w = (torch.randn(300, 16, generator=g) * 0.3).requires_grad_()
    t = torch.randint(0, 300, (2, 9), generator=g)
    t[0, :3] = -100
    loss = kernels.linear_cross_entropy(h, w, t, reduction)
    (loss * 3).backward()
    got = loss.detach(), h.grad.clone(), w.grad.clone()
    h.grad = w.grad = None
    ref = F.cross_entropy(F.linear(h, w).view(-1, 300), t.view(-1), ignore_index=-100, reduction=reduction)
    (ref * 3).backward()
    for a, b in zip(got, (ref.detach(), h.grad, w.grad)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_all_targets_ignored_gives_zero_loss_and_gradients():
    h = torch.randn(4, 8, requires_grad=True)
    w = torch.randn(50, 8, requires_grad=True)
    loss = kernels.linear_cross_entropy(h, w, torch.full((4,), -100))
    loss.backward()
    assert loss.item() == 0 and (h.grad == 0).all() and (w.grad == 0).all()


def test_fused_training_equals_full_under_bf16_autocast():
    """A tiny Transformer trained 3 AdamW steps with loss_impl = fused follows the compiled path's
    arithmetic (BF16 logits, FP32 softmax, BF16 gradient) to within BF16 noise."""
    cfg = ModelConfig(vocab_size=256, n_layers=2, d_model=32, n_heads=4, n_kv_heads=2, max_seq_len=32)
    data = torch.randint(0, 256, (3, 2, 17), generator=torch.Generator().manual_seed(3))
    curves = {}
    for impl in ("full", "fused"):
        torch.manual_seed(0)
        m = Transformer(cfg)
        m.loss_impl = impl
        opt = torch.optim.AdamW(m.parameters(), lr=3e-3)
        curve = []
        for batch in data:
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = m(batch[:, :-1], batch[:, 1:])
            loss.backward()
            opt.step()
            opt.zero_grad()
            curve.append(loss.item())
        curves[impl] = curve
    assert curves["fused"][-1] < curves["fused"][0]
    torch.testing.assert_close(torch.tensor(curves["fused"]), torch.tensor(curves["full"]), rtol=2e-2, atol=0)


def test_without_gradients_or_the_kernel_the_plain_path_runs(monkeypatch):
    """Validation (no_grad) and machines without the kernel take the plain cross-entropy."""
    cfg = ModelConfig(vocab_size=64, n_layers=1, d_model=16, n_heads=2, n_kv_heads=1, max_seq_len=16)
    m = Transformer(cfg)
    x = torch.randint(0, 64, (2, 9))
    m.loss_impl = "full"
    ref = m(x[:, :-1], x[:, 1:])
    m.loss_impl = "fused"
    with torch.no_grad():
        torch.testing.assert_close(m(x[:, :-1], x[:, 1:]), ref.detach())
    monkeypatch.delenv("TRITON_INTERPRET")
    assert not kernels.available(torch.device("cpu"))
    torch.testing.assert_close(m(x[:, :-1], x[:, 1:]), ref)


def _rope_reference(qkv, cos, sin, h, kv):
    from luca.model import apply_rope
    B, T, _ = qkv.shape
    d = qkv.shape[-1] // (h + 2 * kv)
    q, k, v = qkv.split([h * d, kv * d, kv * d], -1)
    return apply_rope(q.view(B, T, h, d), cos, sin), apply_rope(k.view(B, T, kv, d), cos, sin), v.view(B, T, kv, d)


@pytest.mark.parametrize("path", ["kernel", "fallback"])
@pytest.mark.parametrize("d", [16, 12])  # half a head 8 (a power of two) and 6 (the kernel masks its tile)
@pytest.mark.parametrize("heads", [(4, 2), (3, 3)])  # 3: the kernel's tile of all heads is masked too
def test_rope_qkv_gradient_matches_autograd(path, d, heads, monkeypatch):
    """The fused q/k/v projection's RoPE: same q, k, v as `apply_rope`; its backward (luca's kernel,
    or the plain fallback) gives autograd's gradient, from gradients in SDPA's (B, H, T, D) layout,
    with grouped k/v heads, head counts that are not a power of two, and a sequence longer than one
    kernel tile."""
    from luca.model import rope_cos_sin
    if path == "fallback":
        monkeypatch.setattr(kernels, "available", lambda device: False)
    g = torch.Generator().manual_seed(4)
    B, T, (H, KV) = 2, 70, heads
    qkv = torch.randn(B, T, (H + 2 * KV) * d, generator=g, requires_grad=True)
    cos, sin = rope_cos_sin(torch.arange(T).expand(B, T), d, 10000.0, torch.float32)
    from luca.model import RopeQKV
    got = RopeQKV.apply(qkv, cos, sin, H, KV)
    ref = _rope_reference(qkv, cos, sin, H, KV)
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    upstream = [torch.randn(x.transpose(1, 2).shape, generator=g).transpose(1, 2) for x in ref]  # SDPA's layout
    assert not upstream[0].is_contiguous()
    (dq,) = torch.autograd.grad(sum((x * u).sum() for x, u in zip(got, upstream)), qkv)
    (dref,) = torch.autograd.grad(sum((x * u).sum() for x, u in zip(ref, upstream)), qkv)
    torch.testing.assert_close(dq, dref, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("path", ["kernel", "fallback"])
def test_swiglu_gradient_matches_autograd(path, monkeypatch):
    """silu(gate) · up from the fused gate/up output, and its one-pass backward against autograd's,
    for shapes that fill no kernel tile exactly and an upstream gradient that is not contiguous."""
    if path == "fallback":
        monkeypatch.setattr(kernels, "available", lambda device: False)
    g = torch.Generator().manual_seed(5)
    gu = (torch.randn(3, 45, 2 * 150, generator=g) * 3).requires_grad_()
    dh = torch.randn(150, 3, 45, generator=g).permute(1, 2, 0)
    h = kernels.SwiGLU.apply(gu)
    gate, up = gu.chunk(2, dim=-1)
    ref = F.silu(gate) * up
    torch.testing.assert_close(h, ref, rtol=0, atol=0)
    (got,) = torch.autograd.grad((h * dh).sum(), gu)
    (want,) = torch.autograd.grad((ref * dh).sum(), gu)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_bf16_kernels_within_one_rounding_step():
    """In BF16 both backward kernels compute in FP32 and round once (the interpreter truncates)."""
    from luca.model import rope_cos_sin
    g = torch.Generator().manual_seed(6)
    gu = (torch.randn(64, 2 * 96, generator=g) * 3).to(torch.bfloat16)
    dh = torch.randn(64, 96, generator=g).to(torch.bfloat16)
    gf = gu.float().requires_grad_()
    gate, up = gf.chunk(2, dim=-1)
    (want,) = torch.autograd.grad((F.silu(gate) * up * dh.float()).sum(), gf)
    got = kernels.swiglu_backward(gu, dh).float()
    assert ((got - want).abs() <= want.abs() * 2 ** -7 + 1e-30).all()
    B, T, H, D = 2, 9, 2, 8
    cos, sin = rope_cos_sin(torch.arange(T).expand(B, T), D, 10000.0, torch.float32)
    dq, dk, dv = (torch.randn(B, T, H, D, generator=g).to(torch.bfloat16) for _ in range(3))
    qkv = torch.zeros(B, T, 3 * H * D, requires_grad=True)
    (want,) = torch.autograd.grad(sum((x * u.float()).sum() for x, u in zip(_rope_reference(qkv, cos, sin, H, H),
                                                                             (dq, dk, dv))), qkv)
    got = kernels.rope_qkv_backward(dq, dk, dv, cos, sin)
    assert got.dtype == torch.bfloat16
    assert ((got.float() - want).abs() <= want.abs() * 2 ** -7 + 1e-30).all()
