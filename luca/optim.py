"""Optimizers and learning-rate schedules.

What is notable:
- AdamW with two parameter groups: matrices decay, while norms, biases and embeddings do not.
  On CUDA the fused kernel is used.
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
