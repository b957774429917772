"""The training step: the clip folded into fused AdamW equals clip_grad_norm_, skips stay skips."""
from __future__ import annotations

import copy

import pytest
import torch

from luca.model import ModelConfig, Transformer
from luca.step import BadSteps, Stepper, train_step

CFG = ModelConfig(vocab_size=256, n_layers=2, d_model=64, n_heads=4, n_kv_heads=2, max_seq_len=32)
NO_AUTOCAST = torch.autocast("cpu", enabled=False)


def _pair():
    torch.manual_seed(0)
    a = Transformer(CFG)
    a.loss_impl = "full"
    b = copy.deepcopy(a)
    return (a, torch.optim.AdamW(a.parameters(), lr=1e-2, fused=True)), \
           (b, torch.optim.AdamW(b.parameters(), lr=1e-2, fused=True))


def test_folded_clip_matches_clip_grad_norm():
    (m1, o1), (m2, o2) = _pair()
    g = torch.Generator().manual_seed(1)
    clipped = 0
    for _ in range(6):
        batches = [torch.randint(0, 256, (2, 33), generator=g) for _ in range(2)]
        l1, n1, ok1 = train_step(m1, m1, o1, batches, 0.05, NO_AUTOCAST)
        l2, n2, ok2 = train_step(m2, m2, o2, batches, 0.05, NO_AUTOCAST, fold_clip=True)
        assert bool(ok1) and bool(ok2)
        assert torch.allclose(l1, l2, rtol=1e-5) and torch.allclose(n1, n2, rtol=1e-4)
        clipped += float(n1) > 0.05
    assert clipped >= 5  # the clip was active, so the fold had something to do
    for p1, p2 in zip(m1.parameters(), m2.parameters()):
        assert (p1 - p2).abs().max().item() < 1e-5


def test_folded_clip_skips_a_non_finite_step():
    (m, opt), _ = _pair()
    batch = [torch.randint(0, 256, (2, 33))]
    train_step(m, m, opt, batch, 1.0, NO_AUTOCAST, fold_clip=True)  # moments exist from here on
    before = {k: v.clone() for k, v in m.state_dict().items()}
    moments = [opt.state[p]["exp_avg"].clone() for p in m.parameters()]
    with torch.no_grad():
        m.model.layers[0].mlp.down_proj.weight[0, 0] = float("nan")
    _, gnorm, ok = train_step(m, m, opt, batch, 1.0, NO_AUTOCAST, fold_clip=True)
    assert not bool(ok) and not torch.isfinite(gnorm)
    after = m.state_dict()
    for k, v in before.items():
        if k != "model.layers.0.mlp.down_proj.weight":
            assert torch.equal(v, after[k]), k
    assert all(torch.equal(a, opt.state[p]["exp_avg"]) for a, p in zip(moments, m.parameters()))
    bad = BadSteps(torch.device("cpu"), limit=3)
    bad.record(ok)
    assert int(bad.count) == 1 and int(bad.streak) == 1


def test_stepper_without_cuda_runs_ordinary_steps():
    (m, opt), (ref, ref_opt) = _pair()
    stepper = Stepper(m, m, opt, 1.0, NO_AUTOCAST, world=1, fsdp=False, cuda_graph=True)
    assert stepper.fold_clip and not stepper.graph_wanted  # fused AdamW, but no CUDA device
    g = torch.Generator().manual_seed(2)
    for i in range(4):
        batch = [torch.randint(0, 256, (2, 33), generator=g)]
        lr = 1e-3 * (i + 1)
        stepper(batch, lr)
        for group in ref_opt.param_groups:
            group["lr"] = lr
        train_step(ref, ref, ref_opt, batch, 1.0, NO_AUTOCAST, fold_clip=True)
        assert opt.param_groups[0]["lr"] == lr
    assert stepper.graph is None
    assert all(torch.equal(a, b) for a, b in zip(m.parameters(), ref.parameters()))


def test_a_failed_capture_falls_back_to_ordinary_steps():
    """Capture fails here (no CUDA): the step it was tried at and every later one run ordinarily."""
    (m, opt), (ref, ref_opt) = _pair()
    said = []
    stepper = Stepper(m, m, opt, 1.0, NO_AUTOCAST, world=1, fsdp=False, cuda_graph=True, say=said.append)
    stepper.graph_wanted = True  # as on one CUDA device
    g = torch.Generator().manual_seed(3)
    for i in range(5):
        batch = [torch.randint(0, 256, (2, 33), generator=g)]
        stepper(batch, 1e-3)
        for group in ref_opt.param_groups:
            group["lr"] = 1e-3
        train_step(ref, ref, ref_opt, batch, 1.0, NO_AUTOCAST, fold_clip=True)
    assert stepper.graph is None and not stepper.graph_wanted
    assert len(said) == 1 and "CUDA graph capture failed" in said[0]
    assert all(gr["capturable"] is False and isinstance(gr["lr"], float) for gr in opt.param_groups)
    assert all(torch.equal(a, b) for a, b in zip(m.parameters(), ref.parameters()))


def test_under_ddp_only_the_shared_norm_decides_a_skip():
    """A rank's own loss can be NaN with finite gradients (0/0 when none of its targets counts): alone
    the step is skipped, but under DDP ranks must agree, so only the all-reduced norm decides."""
    from luca.step import _fold_clip
    (m, opt), _ = _pair()
    m(torch.randint(0, 256, (2, 32)), torch.randint(0, 256, (2, 32))).backward()
    nan = torch.tensor(float("nan"))
    for world, taken in ((1, False), (2, True)):
        gnorm, ok = _fold_clip(m, opt, nan, 1.0, world)
        assert torch.isfinite(gnorm) and bool(ok) is taken and float(opt.found_inf) == (not taken)


def _cached_pair(fuse: bool, fold: bool = False):
    """Two copies of a tied-embedding model on the BF16 GPU path (wgrad32, head kernel under the
    interpreter); the second casts its weights once per step (`cache_weights`), folding the norms'
    weights into them with `fold` (which changes the rounding, so the tests of casting and keeping
    leave it off)."""
    torch.manual_seed(0)
    a = Transformer(CFG)
    a.loss_impl = "fused"
    a.set_gpu_training(True, fuse_qkv=fuse, fold_norms=fold)
    b = copy.deepcopy(a)
    b.cache_weights()
    return a, b


@pytest.mark.parametrize("compiled", [False, True])
def test_cached_weights_train_bitwise_as_casts_and_never_go_stale(compiled):
    """Weights cast to BF16 once per step (`cache_weights`) give bitwise the same steps as casting in
    every micro-batch (eagerly; compiled, to rounding), also after the weights are changed outside a
    step (a checkpoint load), and a forward without gradients (validation) reads the FP32 weights,
    not the copies. Compiled too: the compiler must read the copies where they are, not fold them in
    as constants."""
    for fuse in (False, True):
        torch._dynamo.reset()  # earlier tests' compiles of the same forward count toward its recompile limit
        a, b = _cached_pair(fuse)
        assert b.weights_cached and b.lm_head.weight_lp.dtype == torch.bfloat16
        autocast = torch.autocast("cpu", dtype=torch.bfloat16)
        steppers = [Stepper(torch.compile(m) if compiled else m, m,
                            torch.optim.AdamW(m.parameters(), lr=1e-2, fused=True), 1.0, autocast, 1, False, True)
                    for m in (a, b)]
        g = torch.Generator().manual_seed(5)
        for i in range(3):
            if i == 2:  # weights changed between steps: the copies must follow
                other = Transformer(CFG).state_dict()
                for m in (a, b):
                    m.load_state_dict(other)
            batches = [torch.randint(0, 256, (2, 33), generator=g) for _ in range(2)]
            la, lb = (s(batches, 1e-2)[0] for s in steppers)
            # compiled, the two graphs may fuse (and so round) differently: close, not bitwise
            torch.testing.assert_close(lb, la, rtol=1e-4 if compiled else 0, atol=0, msg=f"{fuse} {i}")
        for pa, pb in zip(a.parameters(), b.parameters()):
            torch.testing.assert_close(pb, pa, rtol=0, atol=1e-5 if compiled else 0)
        # the copies now lag the optimizer's last update: a no-grad forward must not read them
        assert not torch.equal(b.lm_head.weight_lp, b.lm_head.weight.to(torch.bfloat16))
        x = torch.randint(0, 256, (2, 33), generator=g)
        with torch.no_grad(), autocast:
            assert torch.equal(a(x[:, :-1], x[:, 1:]), b(x[:, :-1], x[:, 1:]))


@pytest.mark.parametrize("compiled", [False, True])
def test_kept_gradients_are_added_by_the_gemms_and_train_as_autograds_adds(compiled):
    """`keep_grads`: the projections' and the head's GEMMs add their weight gradients into kept FP32
    buffers and the embedding scatters into its own, instead of autograd adding each micro-batch's
    gradient. Training must match autograd's way (to rounding: the embedding's rows are added in
    another order), the buffers must stay the same tensors, zeroed between steps, and the ops must
    really run inside compiled graphs (their zero results reach `grad_token`). Also with activation
    checkpointing, where a compiled trunk saves the tied embedding's buffer that the head's GEMM
    adds into before the trunk's backward reads it."""
    for fuse, ckpt in ((False, False), (True, False), (True, True)):
        torch._dynamo.reset()  # past its recompile limit, dynamo would quietly run the later models eagerly
        a, b = _cached_pair(fuse)
        a.gradient_checkpointing = b.gradient_checkpointing = ckpt
        if ckpt:  # without cached weights: the head then reads the FP32 weight, which the trunk saved
            a.cache_weights(False)
            b.cache_weights(False)
        b.keep_grads()
        assert b.grads_kept and b.model.layers[0].mlp.grad_token is not None
        kept = {n: p.grad for n, p in b.named_parameters()}
        autocast = torch.autocast("cpu", dtype=torch.bfloat16)
        # SGD: AdamW would blow the rounding difference of a near-zero gradient up to a whole step
        steppers = [Stepper(torch.compile(m) if compiled else m, m, torch.optim.SGD(m.parameters(), lr=0.5),
                            1.0, autocast, 1, False, True) for m in (a, b)]
        g = torch.Generator().manual_seed(5)
        for i in range(3):
            batches = [torch.randint(0, 256, (2, 33), generator=g) for _ in range(3)]
            la, lb = (s(batches, 1e-2)[0] for s in steppers)
            torch.testing.assert_close(lb, la, rtol=1e-4, atol=0, msg=f"{fuse} {ckpt} {i}")
        for (n, pa), pb in zip(a.named_parameters(), b.parameters()):
            torch.testing.assert_close(pb, pa, rtol=1e-4, atol=1e-5, msg=f"{n} {ckpt}")
            assert pa.grad is None and pb.grad is kept[n] and not pb.grad.any(), n
        assert b.grad_token.grad is not None  # the ops' results flowed back: they ran
        if fuse:
            mlp = b.model.layers[0].mlp
            assert mlp.gate_proj.weight.grad.data_ptr() == mlp.gate_up_grad.data_ptr()


def test_kept_gradients_survive_a_checkpoint_load_and_being_freed():
    """Resuming (`train._restore`) with kept gradients: torch builds the optimizer state to load into
    only where no gradient exists, so the load must work around them and keep them afterwards. And
    gradients freed by a plain `zero_grad()` fall back to autograd's adds instead of vanishing."""
    from luca.distributed import full_state
    from luca.optim import adamw
    from luca.train import _restore
    x = torch.randint(0, 256, (2, 33), generator=torch.Generator().manual_seed(3))
    autocast = torch.autocast("cpu", dtype=torch.bfloat16)

    def made():
        _, m = _cached_pair(True)
        m.keep_grads()
        return m, adamw(m, 1e-2, 0.1, (0.9, 0.95))
    m, opt = made()
    with autocast:
        m(x[:, :-1], x[:, 1:]).backward()
    opt.step()
    model_state, opt_state = full_state(m, opt)
    m2, opt2 = made()
    _restore(m2, opt2, {"model": model_state, "optimizer": opt_state}, "ckpt")
    assert m2.grads_kept and all(p.grad is not None and not p.grad.any() for p in m2.parameters())
    for k, v in opt.state_dict()["state"].items():
        for name, t in v.items():
            torch.testing.assert_close(opt2.state_dict()["state"][k][name], t, rtol=0, atol=0)
    ref, _ = made()
    ref.keep_grads(False)
    ref.load_state_dict(m2.state_dict())
    m2.zero_grad()  # set_to_none: the kept buffers are no longer the gradients
    for model in (ref, m2):
        with autocast:
            model(x[:, :-1], x[:, 1:]).backward()
    for (n, p), q in zip(ref.named_parameters(), m2.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-5, atol=1e-8, msg=n)


class _Recorder(torch.optim.SGD):
    """SGD that keeps a copy of the gradients each step saw (after the clip), and of what `look()`
    returns then."""

    look = staticmethod(lambda: None)

    def step(self, closure=None):
        self.seen = [p.grad.clone() for g in self.param_groups for p in g["params"]]
        self.looked = self.look()
        return super().step(closure)


def _stale_folded_copy(m: Transformer) -> float:
    """Largest difference between a fused GEMM's cached copy and bf16(W diag g) of the weights now."""
    from luca.gpu_training import fused_gemms
    worst = 0.0
    for block in m.model.layers:
        for mod, prefix, parts, norm in fused_gemms(block):
            w = torch.cat([p.weight for p in parts]) * norm.weight
            lp = getattr(mod, f"{prefix}_lp")
            worst = max(worst, (lp.float() - w.to(torch.bfloat16).float()).abs().max().item())
    return worst


@torch.no_grad()
def _norms_away_from_one(m: Transformer) -> None:
    """Norm weights drawn from [0.5, 1.5]: at 1 a fold of them is the identity and proves nothing."""
    for n, p in m.named_parameters():
        if "norm" in n:
            p.uniform_(0.5, 1.5, generator=torch.Generator().manual_seed(len(n)))


def _folded_grads(compiled: bool, fold: bool, keep: bool, broken: str = "", ckpt: bool = False):
    """Gradients of 2 steps of 3 micro-batches each, of a fused, cached model with its norms' weights
    drawn away from 1."""
    torch._dynamo.reset()
    a, _ = _cached_pair(True, fold)
    a.gradient_checkpointing = ckpt  # the blocks' forwards run again in the backward: the fold must hold there too
    _norms_away_from_one(a)
    a.cache_weights()
    if keep:
        a.keep_grads()
    if broken == "unfold":  # the step forgets to turn d(W diag g) into d W and d g
        a.unfold_norm_grads = lambda: None
    opt = _Recorder(a.parameters(), lr=0.05)
    opt.look = (lambda: _stale_folded_copy(a)) if fold else opt.look  # before this step's update
    step = Stepper(torch.compile(a) if compiled else a, a, opt, 0.0, torch.autocast("cpu", dtype=torch.bfloat16),
                   1, False, False)
    g, seen = torch.Generator().manual_seed(7), []
    for _ in range(2):
        step([torch.randint(0, 256, (2, 33), generator=g) for _ in range(3)], 0.05)
        seen.append(opt.seen)
        assert not opt.looked, opt.looked  # the copies followed the last step's update of W and g
    return a, seen


@pytest.mark.parametrize("compiled", [False, True])
def test_norm_weights_folded_into_the_cached_gemm_weights_give_the_norms_gradients(compiled):
    """`fold_norms`: the blocks' norms give x̂ and the fused GEMMs read bf16(W diag g), cast once per
    step; with kept gradients the GEMMs add d(W diag g) into their own buffer, turned into d W and d g
    once per step (`unfold_norm_grads`), and without kept gradients autograd differentiates W diag g.
    The two ways agree to FP32 rounding (kept, also with activation checkpointing, whose recompute
    must fold as the forward did), and every parameter's gradient, norms' weights included,
    equals the unfolded model's to BF16 rounding (the fold rounds other products), over 2 steps;
    a step without the unfold is off by far more."""
    _, ref_seen = _folded_grads(compiled, fold=False, keep=True)

    def worst(seen, ref_seen=ref_seen):  # largest error of a parameter's gradient, relative to its largest entry
        return max(((s - r).abs().max() / r.abs().max()).item()
                   for step, ref_step in zip(seen, ref_seen) for s, r in zip(step, ref_step))
    runs = {}
    for keep, ckpt in ((True, False), (False, False), ("ckpt", True)):
        m, runs[keep] = _folded_grads(compiled, fold=True, keep=bool(keep), ckpt=ckpt)
        with torch.autocast("cpu", dtype=torch.bfloat16):  # only in a training forward
            assert m.model.layers[0].mlp.reads_folded(torch.zeros(1))
            with torch.no_grad():
                assert not m.model.layers[0].mlp.reads_folded(torch.zeros(1))
        assert m.model.layers[1].self_attn.lp_folded and (m.model.layers[1].self_attn.folded_grad is not None) is bool(keep)
        assert worst(runs[keep]) < 0.03, (keep, worst(runs[keep]))  # 0.012 measured
        if keep:
            assert all(p.grad is not None and not p.grad.any() for p in m.parameters())
            assert not m.model.layers[0].self_attn.folded_grad.any()  # zeroed for the next step
    assert worst(runs[True], runs[False]) < 1e-4  # the unfold is autograd's chain rule
    # compiled, the backward's recompute of x̂ may round apart from the forward's (1.8e-3 measured)
    assert worst(runs["ckpt"], runs[False]) < (1e-2 if compiled else 1e-4)
    _, seen = _folded_grads(compiled, fold=True, keep=True, broken="unfold")
    assert worst(seen) > 0.5  # 1.0: what the tolerances above rule out


def test_a_fold_never_outlives_its_fused_gemm():
    """`set_gpu_training` called again after `cache_weights` may unfuse q/k/v: the cached copy then
    goes unread, so the norm must apply its own weight again (it dropped it while the copy was read)."""
    a, _ = _cached_pair(True, True)
    _norms_away_from_one(a)
    a.cache_weights()
    ref = copy.deepcopy(a)
    ref.set_gpu_training(False)
    x = torch.randint(0, 256, (2, 32), generator=torch.Generator().manual_seed(4))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert a.model.layers[0].self_attn.reads_folded(torch.zeros(1))
        a.set_gpu_training(True, fuse_qkv=False)
        assert not a.model.layers[0].self_attn.reads_folded(torch.zeros(1))
        h, h_ref = a.hidden_states(x), ref.hidden_states(x)
    assert ((h - h_ref).abs().max() / h_ref.abs().max()).item() < 0.05
