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
  rate, schedule and weight decay.
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


def newton_schulz(g: torch.Tensor, steps: int = 5) -> torch.Tensor:
    """An approximation of U·Vᵀ for g = U·S·Vᵀ (singular values pushed into roughly [0.7, 1.2]) by
    the quintic iteration of Muon, in BF16; g is 2-D, the result has g's shape and dtype."""
    a, b, c = 3.4445, -4.7750, 2.0315
    x = g.bfloat16()
    tall = x.shape[0] > x.shape[1]
    if tall:  # iterate on the wide side: X·Xᵀ is then the smaller product
        x = x.T
    x = x / (x.norm() + 1e-7)  # spectral norm ≤ Frobenius norm ≤ 1
    for _ in range(steps):
        s = x @ x.T
        x = a * x + (b * s + c * (s @ s)) @ x
    return (x.T if tall else x).to(g.dtype)


class Muon(torch.optim.Optimizer):
    """Muon for groups with `muon=True`, AdamW for the others (module docstring). Groups carry
    lr, weight_decay, betas (AdamW's), momentum (Muon's) and eps."""

    def __init__(self, groups: list[dict], lr: float, betas: tuple[float, float] = (0.9, 0.95),
                 eps: float = 1e-8, momentum: float = 0.95, ns_steps: int = 5):
        super().__init__(groups, dict(lr=lr, betas=betas, eps=eps, momentum=momentum, weight_decay=0.0,
                                      muon=False, ns_steps=ns_steps))

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            lr, wd = group["lr"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                g, state = p.grad, self.state[p]
                if group["muon"]:
                    buf = state.setdefault("momentum_buffer", torch.zeros_like(p))
                    buf.lerp_(g, 1 - group["momentum"])
                    update = newton_schulz(g.lerp(buf, group["momentum"]), group["ns_steps"])  # Nesterov
                    p.mul_(1 - lr * wd).add_(update, alpha=-lr * 0.2 * max(p.shape) ** 0.5)
                    continue
                if not state:
                    state.update(step=torch.zeros((), dtype=torch.float32), exp_avg=torch.zeros_like(p),
                                 exp_avg_sq=torch.zeros_like(p))
                b1, b2 = group["betas"]
                state["step"] += 1
                t = float(state["step"])
                state["exp_avg"].lerp_(g, 1 - b1)
                state["exp_avg_sq"].mul_(b2).addcmul_(g, g, value=1 - b2)
                denom = (state["exp_avg_sq"].sqrt() / math.sqrt(1 - b2 ** t)).add_(group["eps"])
                p.mul_(1 - lr * wd).addcdiv_(state["exp_avg"], denom, value=-lr / (1 - b1 ** t))


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
