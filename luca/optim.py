"""Optimizers and learning-rate schedules.

What is notable:
- AdamW with two parameter groups: matrices decay, while norms, biases and embeddings do not.
  On CUDA the fused kernel is used.
- Muon (`train.optimizer = "muon"`, luca's own implementation of Keller Jordan's optimizer, the
  main sample-efficiency gain of the NanoGPT speedrun): the hidden layers' matrices step along
  their Nesterov momentum orthogonalised by five quintic Newton–Schulz iterations in BF16;
  embeddings, the output head, norms and biases keep AdamW, in the same optimizer object (one
  state dict, one checkpoint). Each orthogonalised update is scaled by 0.2·√max(rows, cols), which
  gives it AdamW's typical update RMS (Moonshot's "Muon is scalable"), so both share one learning
  rate, schedule and weight decay. On a GPU, matrices of one shape are orthogonalised together, as
  one batch of matrix products, and the element-wise parts run as multi-tensor (foreach) kernels:
  a step launches a few hundred kernels instead of ~50 per matrix (without a CUDA graph each launch
  costs host time; benchmarks/bench_optim.py). With `folds_clip` it takes the clip and the skip as
  device tensors, as fused AdamW does (`grad_scale`, `found_inf`: luca.step folds them in), and
  its learning rate as a tensor, so that luca.step replays its whole step as a CUDA graph (on by
  default; luca.step folds only where it will capture the step, since without the graph the
  folded step is the slower one). On an H100 a 20M model then trains at 1.29M tokens/s against 359k without the graph,
  with the same loss curve (benchmarks/results/check_gpu_train_h100_s10_muon_folded.json). Nothing
  in the step may read a device value back (a host sync is illegal in a capture):
  `_foreach_add_(tensors, scalar_tensor)` does, through `.item()`, which is why the step counts
  are added as a list (tests/test_optim.py runs the step on fake CUDA tensors and fails on any
  read-back).
- Schedules: linear warmup then cosine to `min_lr_ratio · lr`, or warmup-stable-decay (WSD:
  flat, then a linear cool-down over the last `decay_fraction` of the steps).
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    decay, no_decay = [], []
    seen: set[int] = set()
    for name, p in model.named_parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        (decay if p.dim() >= 2 and "embed" not in name else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def newton_schulz(g: torch.Tensor, steps: int = 5, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """An approximation of U·Vᵀ for g = U·S·Vᵀ (singular values pushed into roughly [0.7, 1.2]) by
    the quintic iteration of Muon, computed in `dtype` (BF16: Muon's); g is a matrix or a batch of
    them (..., rows, cols), the result has g's shape and dtype."""
    a, b, c = 3.4445, -4.7750, 2.0315
    x = g.to(dtype)
    tall = x.shape[-2] > x.shape[-1]
    if tall:  # iterate on the wide side: X·Xᵀ is then the smaller product
        x = x.mT
    x = x / (x.norm(dim=(-2, -1), keepdim=True) + 1e-7)  # spectral norm ≤ Frobenius norm ≤ 1
    for _ in range(steps):
        s = x @ x.mT
        x = a * x + (b * s + c * (s @ s)) @ x
    return (x.mT if tall else x).to(g.dtype)


class Muon(torch.optim.Optimizer):
    """Muon for groups with `muon=True`, AdamW for the others (module docstring). Groups carry
    lr, weight_decay, betas (AdamW's), momentum (Muon's) and eps.

    `folds_clip` (on by default: module docstring): once luca.step has set `grad_scale` (the
    gradients are divided by it: the clip) and `found_inf` (1: skip the step), both device tensors,
    the step applies them on the device, reads `lr` as a number or a tensor, and keeps AdamW's step
    counts on the device: nothing is read back, so a CUDA graph can hold the step. A skipped step
    leaves weights, momenta and step counts as they were."""

    def __init__(self, groups: list[dict], lr: float, betas: tuple[float, float] = (0.9, 0.95),
                 eps: float = 1e-8, momentum: float = 0.95, ns_steps: int = 5, folds_clip: bool = True):
        super().__init__(groups, dict(lr=lr, betas=betas, eps=eps, momentum=momentum, weight_decay=0.0,
                                      muon=False, ns_steps=ns_steps, capturable=False))
        self.folds_clip = folds_clip
        self.grad_scale: torch.Tensor | None = None  # set by luca.step when the clip is folded in
        self.found_inf: torch.Tensor | None = None

    @torch.no_grad()
    def step(self, closure=None):
        keep = None
        if self.folds_clip and self.grad_scale is not None:
            keep = 1 - self.found_inf  # 0 skips: every change below is multiplied by it
        if keep is not None:
            grads = [p.grad for g in self.param_groups for p in g["params"] if p.grad is not None]
            if grads:
                torch._foreach_div_(grads, self.grad_scale)
            for g in grads:  # a skipped step's gradients may hold inf/NaN; 0 · NaN would spread them
                torch.nan_to_num_(g, nan=0.0, posinf=0.0, neginf=0.0)
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if params:
                (self._muon if group["muon"] else self._adamw)(group, params, keep)

    def _muon(self, group: dict, params: list[torch.Tensor], keep: torch.Tensor | None) -> None:
        lr, wd, mom = group["lr"], group["weight_decay"], group["momentum"]
        grads = [p.grad for p in params]
        for p in params:
            if "momentum_buffer" not in self.state[p]:
                self.state[p]["momentum_buffer"] = torch.zeros_like(p)
        bufs = [self.state[p]["momentum_buffer"] for p in params]
        if keep is None:
            torch._foreach_lerp_(bufs, grads, 1 - mom)
        else:  # buf += (1 − mom)·keep·(g − buf)
            torch._foreach_add_(bufs, torch._foreach_mul(torch._foreach_sub(grads, bufs), (1 - mom) * keep))
        nesterov = torch._foreach_lerp(grads, bufs, mom)
        if wd:
            torch._foreach_mul_(params, 1 - lr * wd * (1 if keep is None else keep))
        by_shape: dict[tuple, list[int]] = {}
        for i, p in enumerate(params):
            by_shape.setdefault(tuple(p.shape), []).append(i)
        for shape, idx in by_shape.items():
            if params[0].is_cuda:  # one batch of products per shape
                updates = newton_schulz(torch.stack([nesterov[i] for i in idx]), group["ns_steps"]).unbind(0)
            else:  # a CPU's batched BF16 products ran slower than one matrix at a time (benchmarks/bench_optim.py)
                updates = [newton_schulz(nesterov[i], group["ns_steps"]) for i in idx]
            scale = -lr * 0.2 * max(shape) ** 0.5
            if keep is None and not isinstance(lr, torch.Tensor):
                torch._foreach_add_([params[i] for i in idx], updates, alpha=scale)
            else:
                torch._foreach_add_([params[i] for i in idx],
                                    torch._foreach_mul(list(updates), scale * (1 if keep is None else keep)))

    def _adamw(self, group: dict, params: list[torch.Tensor], keep: torch.Tensor | None) -> None:
        if keep is not None or isinstance(group["lr"], torch.Tensor):
            return self._adamw_on_device(group, params, keep)
        lr, wd, eps = group["lr"], group["weight_decay"], group["eps"]
        b1, b2 = group["betas"]
        for p in params:
            state = self.state[p]
            if not state:
                state.update(step=torch.zeros((), dtype=torch.float32), exp_avg=torch.zeros_like(p),
                             exp_avg_sq=torch.zeros_like(p))
            state["step"] += 1  # a CPU tensor: reading it back costs no device sync
        grads = [p.grad for p in params]
        ms, vs = [self.state[p]["exp_avg"] for p in params], [self.state[p]["exp_avg_sq"] for p in params]
        torch._foreach_lerp_(ms, grads, 1 - b1)
        torch._foreach_mul_(vs, b2)
        torch._foreach_addcmul_(vs, grads, grads, value=1 - b2)
        if wd:
            torch._foreach_mul_(params, 1 - lr * wd)
        by_step: dict[float, list[int]] = {}  # bias corrections: one per step count (all equal, usually)
        for i, p in enumerate(params):
            by_step.setdefault(float(self.state[p]["step"]), []).append(i)
        for t, idx in by_step.items():
            denom = torch._foreach_sqrt([vs[i] for i in idx])
            torch._foreach_div_(denom, math.sqrt(1 - b2 ** t))
            torch._foreach_add_(denom, eps)
            torch._foreach_addcdiv_([params[i] for i in idx], [ms[i] for i in idx], denom, value=-lr / (1 - b1 ** t))

    def _adamw_on_device(self, group: dict, params: list[torch.Tensor], keep: torch.Tensor | None) -> None:
        """The same AdamW with the step counts, bias corrections and step sizes as device tensors,
        every change multiplied by `keep` (module and class docstrings)."""
        lr, wd, eps = group["lr"], group["weight_decay"], group["eps"]
        b1, b2 = group["betas"]
        keep = keep if keep is not None else torch.ones((), device=params[0].device)
        for p in params:
            state = self.state[p]
            if not state:
                state.update(step=torch.zeros((), dtype=torch.float32, device=p.device),
                             exp_avg=torch.zeros_like(p), exp_avg_sq=torch.zeros_like(p))
            elif state["step"].device != p.device:  # a checkpoint's CPU step count
                state["step"] = state["step"].to(p.device)
        grads = [p.grad for p in params]
        steps = [self.state[p]["step"] for p in params]
        ms, vs = [self.state[p]["exp_avg"] for p in params], [self.state[p]["exp_avg_sq"] for p in params]
        # a list of the 0-dim tensor, not the tensor itself: that overload reads it back with .item()
        # (a host sync, which also breaks CUDA-graph capture: session 9's failed capture)
        torch._foreach_add_(steps, [keep] * len(steps))
        torch._foreach_add_(ms, torch._foreach_mul(torch._foreach_sub(grads, ms), (1 - b1) * keep))
        sq = torch._foreach_mul(grads, grads)
        torch._foreach_sub_(sq, vs)
        torch._foreach_mul_(sq, (1 - b2) * keep)
        torch._foreach_add_(vs, sq)
        if wd:
            torch._foreach_mul_(params, 1 - lr * wd * keep)
        # 1 − βᵗ, floored: a first step that is skipped has t = 0 (and m = 0, so its update is 0, not 0/0)
        bc1 = [torch.clamp(1 - torch.pow(b1, t), min=1e-30) for t in steps]
        bc2 = [torch.clamp(1 - torch.pow(b2, t), min=1e-30) for t in steps]
        denom = torch._foreach_sqrt(vs)
        torch._foreach_div_(denom, torch._foreach_sqrt(bc2))
        torch._foreach_add_(denom, eps)
        upd = torch._foreach_div(ms, denom)
        torch._foreach_mul_(upd, [-lr * keep / c for c in bc1])
        torch._foreach_add_(params, upd)


def muon(model: nn.Module, lr: float, weight_decay: float, betas: tuple[float, float], eps: float = 1e-8) -> Muon:
    """Muon for the matrices inside the blocks; AdamW (grouped as `param_groups`) for everything else:
    embeddings, output heads, norms, biases, auxiliary heads. A fused matrix (the GPT-2 baseline's
    c_attn, q/k/v stacked) is orthogonalised as one, where the speedrun treats q, k, v apart."""
    from luca.auxiliary import blocks_of
    hidden = {id(p) for p in blocks_of(getattr(model, "trunk", model)).parameters() if p.dim() == 2}
    groups = param_groups(model, weight_decay)
    matrices = [p for p in groups[0]["params"] if id(p) in hidden]
    groups[0]["params"] = [p for p in groups[0]["params"] if id(p) not in hidden]
    return Muon([{"params": matrices, "weight_decay": weight_decay, "muon": True}, *groups],
                lr=lr, betas=betas, eps=eps)


def adamw(model: nn.Module, lr: float, weight_decay: float, betas: tuple[float, float],
          eps: float = 1e-8, device_type: str = "cpu") -> torch.optim.AdamW:
    kw = {"fused": True} if device_type == "cuda" else {"foreach": True}
    return torch.optim.AdamW(param_groups(model, weight_decay), lr=lr, betas=betas, eps=eps, **kw)


def lr_at(step: int, max_steps: int, lr: float, warmup_steps: int, schedule: str = "cosine",
          min_lr_ratio: float = 0.1, decay_fraction: float = 0.2) -> float:
    """Learning rate for optimizer step `step` (0-based) out of `max_steps`."""
    if warmup_steps > 0 and step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    min_lr = lr * min_lr_ratio
    if schedule == "cosine":
        span = max(1, max_steps - warmup_steps)
        t = min(1.0, (step - warmup_steps) / span)
        return min_lr + 0.5 * (lr - min_lr) * (1 + math.cos(math.pi * t))
    if schedule == "wsd":
        decay_steps = max(1, int(round(max_steps * decay_fraction)))
        start = max_steps - decay_steps
        if step < start:
            return lr
        return lr - (lr - min_lr) * min(1.0, (step - start + 1) / decay_steps)
    if schedule == "constant":
        return lr
    raise ValueError(f"unknown schedule {schedule!r} (cosine, wsd, constant)")
