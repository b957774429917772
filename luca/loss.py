"""The language-model head's cross-entropy, three ways (`Transformer.loss_impl`; shared with luca.baseline).

What is notable:
- "chunked" (the default: CPUs, fine-tuning): the loss in chunks of tokens, so the full
  (tokens × vocab) float32 logits are never materialised; for "mean" and "sum" the gradients are
  computed chunk by chunk inside the forward pass (a fused linear cross-entropy), so nothing is
  recomputed in the backward pass.
- "full": all logits and a plain cross-entropy, which `torch.compile` fuses into few kernels.
- "fused" (luca train's default on CUDA): the head GEMM with luca's own Triton cross-entropy
  kernel, which writes the logits' gradient over them in the forward pass (luca/kernels.py); with
  `fp8`, its three GEMMs in FP8 (luca/fp8_head.py).
"""
from __future__ import annotations

from contextlib import nullcontext

import torch
import torch.nn as nn
import torch.nn.functional as F

from luca import fp8_head, kernels


def head_loss(impl: str, h: torch.Tensor, head: nn.Linear, targets: torch.Tensor, reduction: str,
              cached: bool = False, into: bool = False, fp8: bool = False) -> torch.Tensor:
    """The cross-entropy of the head's logits by `loss_impl` (module docstring).
    `cached`: the kernel reads the head's weight cast once per step (Transformer.cache_weights);
    `into`: its GEMM adds the weight's gradient into the kept `.grad` (Transformer.keep_grads);
    `fp8`: the fused head's GEMMs in FP8 (luca/fp8_head.py; Transformer.set_gpu_training)."""
    if reduction != "none":
        if impl == "fused" and torch.is_grad_enabled() and type(head) is nn.Linear and head.bias is None:
            if torch.is_autocast_enabled(h.device.type):  # cast here, where the compiler fuses it with the norm
                h = h.to(torch.get_autocast_dtype(h.device.type))
            if fp8:
                return fp8_head.linear_cross_entropy_fp8(h, head.weight, targets, reduction,
                                                         getattr(head, "weight_f8", None) if cached else None,
                                                         head.weight.grad if into else None)
            return kernels.linear_cross_entropy(h, head.weight, targets, reduction,
                                                head.weight_lp if cached else None,
                                                head.weight.grad if into else None)
        if impl in ("full", "fused"):
            logits = head(h).float()
            return F.cross_entropy(logits.view(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=-100,
                                   reduction=reduction)
    return chunked_cross_entropy(h, head.weight, targets, reduction)


@torch.compiler.disable  # a Python loop over chunks: run it eagerly between compiled graphs
def chunked_cross_entropy(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                          reduction: str = "mean", chunk: int = 1024) -> torch.Tensor:
    """Cross-entropy of `h @ weight.T` against targets (-100 ignored), never holding all logits.

    For "mean" and "sum" the gradients with respect to `h` and `weight` are computed chunk by chunk
    inside the forward pass (a fused linear cross-entropy), so peak memory holds one chunk of
    float32 logits instead of (tokens × vocab), and nothing is recomputed in the backward pass.
    """
    B, T, D = h.shape
    flat_h, flat_t = h.reshape(-1, D), targets.reshape(-1)
    dtype = compute_dtype(h)
    if reduction == "none" or not (torch.is_grad_enabled() and (h.requires_grad or weight.requires_grad)):
        with torch.no_grad() if not torch.is_grad_enabled() else nullcontext():
            parts = [F.cross_entropy(F.linear(flat_h[i:i + chunk].to(dtype), weight.to(dtype)).float(),
                                     flat_t[i:i + chunk], ignore_index=-100, reduction="none")
                     for i in range(0, flat_h.shape[0], chunk)]
        losses = torch.cat(parts)
        if reduction == "none":
            return losses.view(B, T)
        total = losses.sum()
        return total if reduction == "sum" else total / (flat_t != -100).sum().clamp(min=1)
    return _FusedLinearCE.apply(flat_h, weight, flat_t, reduction == "mean", chunk, dtype)


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype x's products run in: autocast's where it is on, else x's own."""
    dev = x.device.type
    try:
        return torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else x.dtype
    except RuntimeError:  # a device without autocast (meta)
        return x.dtype


class _FusedLinearCE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, weight, targets, mean: bool, chunk: int, dtype: torch.dtype):
        n = h.shape[0]
        # The mean's scale stays a tensor: reading the count back would stall the GPU every step.
        count = (targets != -100).sum().clamp(min=1)
        scale = 1.0 / count.float() if mean else torch.ones((), device=h.device)
        w = weight.to(dtype)
        grad_h = torch.empty_like(h) if h.requires_grad else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if weight.requires_grad else None
        total = torch.zeros((), dtype=torch.float32, device=h.device)
        with torch.autocast(h.device.type, enabled=False):
            for i in range(0, n, chunk):
                hc, tc = h[i:i + chunk].to(dtype), targets[i:i + chunk]
                logits = (hc @ w.t()).float()
                valid = tc != -100
                safe_t = torch.where(valid, tc, 0)
                lse = torch.logsumexp(logits, dim=-1)
                picked = logits.gather(1, safe_t[:, None]).squeeze(1)
                total += torch.where(valid, lse - picked, 0.0).sum()
                # d loss / d logits = softmax - onehot, zero on ignored rows, times the mean's scale
                g = torch.exp(logits - lse[:, None])
                g[torch.arange(g.shape[0], device=g.device), safe_t] -= 1.0
                g *= (valid.float() * scale)[:, None]
                g = g.to(dtype)
                if grad_h is not None:
                    grad_h[i:i + chunk] = (g @ w).to(h.dtype)
                if grad_w is not None:
                    grad_w += (g.t() @ hc).float()
        ctx.save_for_backward(grad_h if grad_h is not None else torch.empty(0),
                              grad_w if grad_w is not None else torch.empty(0))
        ctx.has = (grad_h is not None, grad_w is not None)
        ctx.weight_dtype = weight.dtype
        return total * scale

    @staticmethod
    def backward(ctx, grad_out):
        grad_h, grad_w = ctx.saved_tensors
        gh = grad_h * grad_out.to(grad_h.dtype) if ctx.has[0] else None
        gw = (grad_w * grad_out).to(ctx.weight_dtype) if ctx.has[1] else None
        return gh, gw, None, None, None, None
