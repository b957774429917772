"""luca/optim.py's Muon: its AdamW half is AdamW, its Newton–Schulz step orthogonalises, it trains
and resumes bitwise through `luca train`."""
from __future__ import annotations

import json

import pytest
import torch

from conftest import train_tiny_run
from luca import rundir
from luca.errors import LucaError
from luca.model import ModelConfig, Transformer
from luca.optim import Muon, muon, newton_schulz


@pytest.mark.parametrize("shape", [(48, 160), (160, 48), (64, 64)])
def test_newton_schulz_gives_near_orthogonal_factors(shape):
    """U·Vᵀ of g's SVD, approximately: singular values in Muon's band around 1 (from a spread of
    ~1000 in g's), and the same singular vectors, so <result, g> is close to g's nuclear norm."""
    g = torch.Generator().manual_seed(0)
    u, _ = torch.linalg.qr(torch.randn(shape[0], min(shape), generator=g))
    v, _ = torch.linalg.qr(torch.randn(shape[1], min(shape), generator=g))
    s = torch.logspace(0, -3, min(shape))  # descending, as svdvals returns them
    m = u @ torch.diag(s) @ v.T
    x = newton_schulz(m)
    assert x.shape == m.shape and x.dtype == m.dtype
    sv = torch.linalg.svdvals(x)
    assert sv[s > 0.1].min() > 0.6 and sv.max() < 1.25  # the quintic's band; the tiniest directions lag
    assert (x * m).sum() / s.sum() > 0.85


def test_muon_step_batched_by_shape_equals_one_matrix_at_a_time():
    """The step orthogonalises same-shaped matrices as one batch and updates with multi-tensor
    kernels: the weights must be those of Muon's rule applied to each matrix on its own."""
    g = torch.Generator().manual_seed(0)
    shapes = [(48, 160), (48, 160), (160, 48), (64, 64), (48, 160)]
    ps = [torch.nn.Parameter(torch.randn(s, generator=g)) for s in shapes]
    ref = [p.detach().clone() for p in ps]
    bufs = [torch.zeros_like(p) for p in ps]
    opt = Muon([{"params": ps, "weight_decay": 0.1, "muon": True}], lr=1e-2)
    for _ in range(3):
        grads = [torch.randn(s, generator=g) for s in shapes]
        for p, gr in zip(ps, grads):
            p.grad = gr.clone()
        opt.step()
        for i, (w, gr) in enumerate(zip(ref, grads)):  # the rule, one matrix at a time
            bufs[i].lerp_(gr, 0.05)
            u = newton_schulz(gr.lerp(bufs[i], 0.95))
            w.mul_(1 - 1e-2 * 0.1).add_(u, alpha=-1e-2 * 0.2 * max(w.shape) ** 0.5)
    for p, w in zip(ps, ref):
        torch.testing.assert_close(p.detach(), w, rtol=0, atol=2e-4)
    assert not torch.equal(ps[0], ps[1])


def test_adamw_groups_step_as_torch_adamw():
    """Groups without `muon` are AdamW: the same weights as torch.optim.AdamW after a few steps."""
    torch.manual_seed(0)
    a = torch.nn.Linear(16, 8)
    b = torch.nn.Linear(16, 8)
    b.load_state_dict(a.state_dict())
    ours = Muon([{"params": list(a.parameters()), "weight_decay": 0.1}], lr=1e-2, betas=(0.9, 0.95))
    ref = torch.optim.AdamW(b.parameters(), lr=1e-2, betas=(0.9, 0.95), weight_decay=0.1, foreach=False)
    for i in range(5):
        x = torch.randn(4, 16)
        for m, opt in ((a, ours), (b, ref)):
            m(x).pow(2).sum().backward()
            opt.step()
            opt.zero_grad()
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)


def test_muon_takes_the_blocks_matrices_and_trains():
    """The blocks' matrices go to Muon, embeddings/head/norms to AdamW; a tiny model's loss falls
    and a Muon update's RMS is about AdamW's (0.2·lr), whatever the matrix's shape."""
    cfg = ModelConfig(vocab_size=256, n_layers=2, d_model=64, n_heads=4, n_kv_heads=2, max_seq_len=64)
    torch.manual_seed(0)
    m = Transformer(cfg)
    opt = muon(m, 3e-3, 0.0, (0.9, 0.95))
    names = {id(p): n for n, p in m.named_parameters()}
    muon_names = {names[id(p)] for g in opt.param_groups if g["muon"] for p in g["params"]}
    assert muon_names == {n for n, p in m.named_parameters() if ".layers." in n and p.dim() == 2}
    assert sum(len(g["params"]) for g in opt.param_groups) == len(names)
    x = torch.randint(0, 256, (4, 33), generator=torch.Generator().manual_seed(1))
    losses = []
    for i in range(12):
        before = {n: p.detach().clone() for n, p in m.named_parameters() if n in muon_names}
        loss = m(x[:, :-1], x[:, 1:])
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 1.0
    for n, p in m.named_parameters():
        if n in muon_names:
            rms = (p.detach() - before[n]).pow(2).mean().sqrt().item()
            assert 0.1 * 3e-3 < rms < 0.3 * 3e-3, (n, rms)


def test_muon_run_resumes_bitwise(tmp_path):
    """`train.optimizer = "muon"` through `luca train`: interrupted at a checkpoint and resumed, the
    weights equal the uninterrupted run's (its momentum buffers are in the checkpoint)."""
    over = {"train.optimizer": "muon"}
    full = train_tiny_run(tmp_path / "full", tmp_path / "a", steps=20, overrides=over)
    part = train_tiny_run(tmp_path / "part", tmp_path / "b", steps=20, overrides=over, until=10)
    assert json.loads((part / "train_state" / "meta.json").read_text())["step"] == 10
    from luca.config import build
    from luca.train import TrainConfig, load_state, train
    tc = dict(seq_len=64, micro_batch=4, batch_tokens=256, max_steps=20, lr=3e-3, warmup_steps=3, eval_every=10,
              eval_batches=2, save_every=10, log_every=5, seed=0, optimizer="muon")  # as train_tiny_run's
    mc = ModelConfig(vocab_size=320, n_layers=2, d_model=64, n_heads=4, n_kv_heads=2, max_seq_len=128)
    train(part, mc, build(TrainConfig, tc, "train"), tmp_path / "b" / "data", rundir.load_tokenizer(part),
          resume=True, progress=False)
    a, b = load_state(full), load_state(part)
    assert any("momentum_buffer" in s for s in a["optimizer"]["state"].values())
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    recs = rundir.read_metrics(full)
    assert recs[-1]["loss"] < recs[0]["loss"] - 0.5
    # Resuming with the other optimizer is refused before anything is loaded or written.
    before = (part / "train_state" / "meta.json").read_text()
    with pytest.raises(LucaError, match="trained with optimizer muon"):
        train(part, mc, build(TrainConfig, {**tc, "optimizer": "adamw"}, "train"), tmp_path / "b" / "data",
              rundir.load_tokenizer(part), resume=True, progress=False)
    assert (part / "train_state" / "meta.json").read_text() == before


def test_muon_with_fsdp_is_refused():
    from luca.train import TrainConfig
    with pytest.raises(ValueError, match="muon"):
        TrainConfig(optimizer="muon", fsdp=True)
    with pytest.raises(ValueError, match="optimizer"):
        TrainConfig(optimizer="sgd")


@pytest.fixture
def fp32_newton_schulz(monkeypatch):
    """Muon's Newton–Schulz in FP32 instead of BF16, for comparing two ways of computing a step:
    in BF16 a last-bit difference of its input (a clip that divides where the other multiplies)
    flips roundings that five iterations spread to ~1e-3 of an update."""
    import functools

    import luca.optim

    fp32 = functools.partial(luca.optim.newton_schulz, dtype=torch.float32)
    monkeypatch.setattr(luca.optim, "newton_schulz", fp32)


def _pair(folds: bool, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    mats = [torch.nn.Parameter(torch.randn(s, generator=g)) for s in [(24, 40), (24, 40), (40, 24)]]
    vecs = [torch.nn.Parameter(torch.randn(s, generator=g)) for s in [(40,), (7, 24)]]
    opt = Muon([{"params": mats, "weight_decay": 0.1, "muon": True}, {"params": vecs, "weight_decay": 0.05}],
               lr=1e-2, folds_clip=folds)
    return mats + vecs, opt


def _state(opt) -> list[torch.Tensor]:
    return [v.clone() for s in opt.state.values() for v in s.values()]


@pytest.mark.parametrize("lr_tensor", [False, True])
def test_muon_folded_clip_equals_the_plain_step(lr_tensor, fp32_newton_schulz):
    """With the clip and the skip folded in (luca.step's grad_scale / found_inf, `folds_clip`) and the
    learning rate a tensor (as in a CUDA graph), Muon and its AdamW half step as the plain optimizer
    does on gradients divided by the scale."""
    plain, ref = _pair(False)
    folded, opt = _pair(True)
    g = torch.Generator().manual_seed(1)
    for i in range(4):
        scale = 1.0 + i  # 1 = no clip, then clipping
        for a, b in zip(plain, folded):
            gr = torch.randn(a.shape, generator=g)
            a.grad, b.grad = gr / scale, gr.clone()
        opt.grad_scale, opt.found_inf = torch.tensor(scale), torch.tensor(0.0)
        if lr_tensor:
            for group in opt.param_groups:
                group["lr"] = torch.tensor(1e-2)
        ref.step()
        opt.step()
    for a, b in zip(plain, folded):
        torch.testing.assert_close(b.detach(), a.detach(), rtol=1e-5, atol=1e-6)
    for a, b in zip(_state(ref), _state(opt)):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("first", [True, False])
def test_muon_folded_skip_changes_nothing(first, fp32_newton_schulz):
    """found_inf = 1 (a non-finite loss or gradient) leaves weights, momenta, AdamW's moments and
    step counts exactly as they were, also when the gradients hold NaN and inf and when it is the
    very first step (step count 0: no 0/0); the next good step is then the plain optimizer's."""
    ps, opt = _pair(True)
    plain, ref = _pair(False)
    g = torch.Generator().manual_seed(2)

    def good_step():
        for a, b in zip(plain, ps):
            gr = torch.randn(a.shape, generator=g)
            a.grad, b.grad = gr.clone(), gr.clone()
        opt.grad_scale, opt.found_inf = torch.tensor(1.0), torch.tensor(0.0)
        ref.step()
        opt.step()

    if not first:
        good_step()
    before, state = [p.detach().clone() for p in ps], _state(opt)
    for p in ps:
        p.grad = torch.full_like(p, float("nan"))
        p.grad.view(-1)[0] = float("inf")
    opt.grad_scale, opt.found_inf = torch.tensor(float("nan")), torch.tensor(1.0)
    opt.step()
    for p, b in zip(ps, before):
        assert torch.equal(p.detach(), b)
    for a, b in zip(state, _state(opt)):
        assert torch.equal(a, b)
    good_step()
    for a, b in zip(plain, ps):
        torch.testing.assert_close(b.detach(), a.detach(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("lr_tensor", [False, True])
def test_muon_folded_step_reads_nothing_back_from_a_gpu(lr_tensor):
    """The folded step on (fake) CUDA tensors makes no host sync: no op reads a device scalar back
    (aten._local_scalar_dense, what .item() / float() do). Such a read stalls the GPU every step and
    is illegal inside a CUDA graph's capture. In session 9 `_foreach_add_(steps, keep)` did one (that
    overload calls .item() on its 0-dim tensor), which is why luca.step's capture of Muon failed
    on an H200. Fake tensors let a CPU check this."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.utils._python_dispatch import TorchDispatchMode

    reads = []

    class Reads(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func is torch.ops.aten._local_scalar_dense.default:
                reads.append(func)
                return 1.0
            return func(*args, **(kwargs or {}))

    with FakeTensorMode(allow_non_fake_inputs=True):
        dev = torch.device("cuda")
        mats = [torch.nn.Parameter(torch.randn(16, 24, device=dev)) for _ in range(3)]
        vecs = [torch.nn.Parameter(torch.randn(24, device=dev)) for _ in range(2)]
        for p in mats + vecs:
            p.grad = torch.randn_like(p)
        opt = Muon([{"params": mats, "weight_decay": 0.1, "muon": True}, {"params": vecs, "weight_decay": 0.0}],
                   lr=1e-3, folds_clip=True)
        opt.grad_scale, opt.found_inf = torch.ones((), device=dev), torch.zeros((), device=dev)
        if lr_tensor:
            for g in opt.param_groups:
                g["lr"] = torch.tensor(1e-3, device=dev)
        with Reads():
            opt.step()  # the first step creates the state
            opt.step()
    assert not reads


def test_muon_trains_through_the_folded_step(fp32_newton_schulz):
    """luca.step's folded path (the one a CUDA graph replays) with Muon moves the weights as the
    clip_grad_norm_ path does on a tiny model, with a clip that bites."""
    from luca.step import train_step
    cfg = ModelConfig(vocab_size=64, n_layers=2, d_model=32, n_heads=4, n_kv_heads=2, max_seq_len=16)
    x = torch.randint(0, 64, (3, 2, 17), generator=torch.Generator().manual_seed(3))
    weights = {}
    for fold in (False, True):
        torch.manual_seed(0)
        m = Transformer(cfg)
        start = [p.detach().clone() for p in m.parameters()]
        opt = muon(m, 1e-2, 0.1, (0.9, 0.95))
        opt.folds_clip = fold
        for batch in x:
            loss, gnorm, ok = train_step(m, m, opt, [batch], 0.05, torch.autocast("cpu", enabled=False),
                                         fold_clip=fold)
            assert bool(ok) and float(gnorm) > 0.05
        assert (opt.grad_scale is not None) == fold
        weights[fold] = [p.detach() - s for p, s in zip(m.parameters(), start)]
    for a, b in zip(weights[False], weights[True]):
        assert ((b - a).norm() / a.norm()).item() < 1e-4
