"""The GPU-training switches of luca.model's Transformer, kept apart from the network they act on.

What is notable (each method's docstring has the measurements):
- `set_gpu_training`: gate/up and q/k/v as one GEMM each, FP32 weight gradients out of the GEMMs,
  optionally a BF16 residual stream, and `fold_norms`.
- `cache_weights` / `refresh_weights`: BF16 copies of the weights made once per optimizer step;
  with `fold_norms` a fused GEMM's copy carries the norm before it (bf16(W diag g)); with
  `fp8_head` the head's weight in e4m3 too.
- `keep_grads`: gradients stay allocated and the GEMMs add into them; `unfold_norm_grads` turns
  the folded GEMMs' d(W diag g) into d W and d g once per step.
- The modules hold the state these set (luca.model's Attention and MLP: `fused`, `cached`,
  `qkv_lp`, `grad_token`, `folded_grad`, ...); their forwards read it.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from luca import fp8_head as fp8


def _stacked(ws: list[torch.Tensor], dtype: torch.dtype) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """One uninitialised buffer for a fused GEMM's weights `ws` stacked by rows, and its row slices,
    one per weight."""
    buf = torch.empty(sum(w.shape[0] for w in ws), ws[0].shape[1], device=ws[0].device, dtype=dtype)
    return buf, list(buf.split([w.shape[0] for w in ws]))


def fused_gemms(block: nn.Module) -> tuple:
    """A block's two fused GEMMs, each as (module, attribute prefix of its cached copy `<p>_lp` and
    kept gradient `<p>_grad`, the projections it fuses, the norm before it)."""
    a, m = block.self_attn, block.mlp
    return ((a, "qkv", (a.q_proj, a.k_proj, a.v_proj), block.input_layernorm),
            (m, "gate_up", (m.gate_proj, m.up_proj), block.post_attention_layernorm))


class GpuTraining:
    """Mixed into luca.model.Transformer (module docstring)."""

    def set_gpu_training(self, on: bool = True, fuse_qkv: bool = True, bf16_residual: bool = False,
                         wgrad32: bool = True, fold_norms: bool = True, fp8_head: bool = False) -> None:
        """Fused gate/up and q/k/v GEMMs, optionally a BF16 residual stream under autocast (luca.train
        sets them on CUDA: benchmarks/bench_train.py). Same parameters and state dict either way.
        Projections replaced by other modules (LoRA adapters) are left unfused.

        `bf16_residual` (train.bf16_residual) is 3% faster on an H100 at the GPT-2-small shape, but
        off by default: over 8 seeds (34M parameters, 8M tokens, benchmarks/compare_gpu.py
        --ab-residual) its validation BPB was 1.9% worse on average (5 of 8 seeds, p = 0.22), over
        14 seeds of a 20M model (benchmarks/check_gpu_train.py --runs bf16-residual) +0.10% ± 0.16%
        (p = 0.54), and over 1,500 steps (~21 passes over its data) of that model +1.9% on both of 2
        seeds (H200, session 8; session 7's far worse result there was the compiler bug that
        `kernels.cast` avoids: q_proj and k_proj got no gradient).

        `wgrad32` (on): weight gradients leave the GEMMs in FP32 (`linear`), which saves a cast kernel per
        weight per step.

        `fuse_qkv` (train.fuse_qkv) fuses q/k/v too, with RoPE's backward in luca's kernel, which
        writes the three gradients straight into the fused GEMM's (left to the compiler, that
        gather cost more than the larger GEMMs saved): 1.5% faster on an H200
        (benchmarks/results/bench_train_h100.md, session 6).

        `fold_norms` (train.fold_norms): with `cache_weights`, each block's two norms give their output
        without their weight, and the fused GEMM after each reads its weights cast once per step
        already multiplied by it (y = x̂ (W diag g)ᵀ, the same product). The norms' backward then
        sums no weight gradient over the tokens: with `keep_grads` the GEMMs add d(W diag g) into
        their own buffer, and `unfold_norm_grads` turns that into d W and d g once per step, since W
        and g do not change within it. Call `cache_weights` and `keep_grads` after this.

        `fp8_head` (train.fp8_head): the head's three GEMMs in FP8 where the device has FP8 GEMMs
        (luca/fp8_head.py); elsewhere the BF16 head."""
        self.low_precision_residual = on and bf16_residual
        head = self.lm_head
        self.fp8_head = (on and fp8_head and type(head) is nn.Linear and head.bias is None
                         and fp8.supported(head.weight.device))
        for block in self.model.layers:
            a, m = block.self_attn, block.mlp
            a.fused = on and fuse_qkv and all(type(p) is nn.Linear for p in (a.q_proj, a.k_proj, a.v_proj))
            m.fused = on and all(type(p) is nn.Linear for p in (m.gate_proj, m.up_proj))
            a.wgrad32 = m.wgrad32 = on and wgrad32 and all(
                type(p) is nn.Linear for p in (a.q_proj, a.k_proj, a.v_proj, a.o_proj, m.gate_proj, m.up_proj,
                                               m.down_proj))
            a.fold_norm = a.fused and a.wgrad32 and fold_norms and not self.cfg.qkv_bias
            m.fold_norm = m.fused and m.wgrad32 and fold_norms

    def cache_weights(self, on: bool = True, dtype: torch.dtype = torch.bfloat16) -> None:
        """Copies of the projections' and the head's weights in `dtype`, made once per optimizer step
        (`refresh_weights`, which luca.step calls before a step's first micro-batch) and read by
        training forwards instead of a new cast of every weight in every micro-batch. They are read
        only with gradients enabled, i.e. inside training steps; everything else reads the FP32
        weights, so a copy made stale by the optimizer or a checkpoint load is never used."""
        self._cached_pairs, self._folded_pairs = [], []
        head = self.lm_head
        for block in self.model.layers:
            a, m = block.self_attn, block.mlp
            a.cached = m.cached = on and a.wgrad32
            lins = [a.o_proj, m.down_proj]
            for mod, prefix, parts, norm in fused_gemms(block):
                name = f"{prefix}_lp"
                setattr(mod, name, None)
                mod.lp_folded = False
                if not (mod.cached and mod.fused):
                    lins += parts
                    continue
                for p in parts:  # read through the fused buffer instead
                    p.weight_lp = None
                ws = [p.weight for p in parts]  # a fused GEMM's weight is one buffer, filled from its parts
                buf, rows = _stacked(ws, dtype)
                setattr(mod, name, buf)
                mod.lp_folded = mod.fold_norm  # then filled with the weights times the norm's (set_gpu_training)
                if mod.lp_folded:
                    self._folded_pairs += [(r, w, norm.weight) for r, w in zip(rows, ws)]
                else:
                    self._cached_pairs += list(zip(rows, ws))
            for lin in lins:
                lin.weight_lp = torch.empty_like(lin.weight, dtype=dtype) if a.cached else None
            self._cached_pairs += [(lin.weight_lp, lin.weight) for lin in lins if a.cached]
        head.weight_lp = torch.empty_like(head.weight, dtype=dtype) if on else None
        self._cached_pairs += [(head.weight_lp, head.weight)] if on else []
        head.weight_f8 = fp8.FP8Weight(head.weight) if on and self.fp8_head else None  # e4m3 copies (fp8_head)
        self.refresh_weights()

    def keep_grads(self, on: bool = True) -> None:
        """Keep every gradient allocated between steps (the optimizer zeroes them in place: luca.step)
        and let the weight-gradient GEMMs of the projections and the head add into them (cuBLAS's
        beta = 1), and the embedding's backward scatter its rows into its gradient. With gradient
        accumulation this replaces autograd's add of each new gradient to the kept one (a read and
        a write of all FP32 gradients per micro-batch) and the embedding's dense (vocab × d)
        gradient. Needs `wgrad32` for the projections; one process only (DDP and FSDP act on the
        autograd accumulation this bypasses). Call after `set_gpu_training` and `cache_weights` (a
        folded GEMM then gets its own buffer; called before, it falls back to autograd's adds).

        The GEMMs' ops return a zero scalar as the gradient of `grad_token`, an input of every
        such autograd function, so that compiled graphs keep them (luca/kernels.py says why they
        are declared pure)."""
        params = [p for p in self.parameters() if p.requires_grad]
        for p in params:
            p.grad = None
        on = on and bool(params)
        self.grad_token = torch.zeros((), device=params[0].device, requires_grad=True) if on else None
        for block in self.model.layers:
            for mod, prefix, parts, _ in fused_gemms(block):
                name = f"{prefix}_grad"
                mod.grad_token = self.grad_token if on and mod.wgrad32 else None
                setattr(mod, name, None)
                mod.folded_grad = None
                if mod.grad_token is not None and mod.fused:  # one buffer; the parts' gradients are views
                    ws = [p.weight for p in parts]
                    buf, rows = _stacked(ws, ws[0].dtype)
                    setattr(mod, name, buf.zero_())
                    for w, g in zip(ws, rows):
                        w.grad = g
                    if mod.lp_folded:  # d(W diag g), apart: unfold_norm_grads adds it to the gradients
                        mod.folded_grad = torch.zeros_like(buf)  # (without it, autograd's way: also exact)
        if on:
            for p in params:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)

    @property
    def grads_kept(self) -> bool:
        return self.grad_token is not None

    @property
    def weights_cached(self) -> bool:
        """Whether `cache_weights` is on (the head's copy is always among the cached pairs then)."""
        return bool(self._cached_pairs)

    @torch.no_grad()
    def refresh_weights(self) -> None:
        """Cast the weights into their cached copies (`cache_weights`): one multi-tensor copy, and the
        folded ones (`fold_norms`) multiplied by their norm's weight in FP32, then rounded once."""
        if self._cached_pairs:
            torch._foreach_copy_([c for c, _ in self._cached_pairs], [w for _, w in self._cached_pairs])
        for c, w, g in self._folded_pairs:
            torch.mul(w, g, out=c)
        if getattr(self.lm_head, "weight_f8", None) is not None:
            self.lm_head.weight_f8.refresh(self.lm_head.weight)

    @torch.no_grad()
    def unfold_norm_grads(self) -> None:
        """Turn what the folded GEMMs added up over a step's micro-batches, d(W diag g), into the
        gradients of W and of the norm's weight g, and zero it (`set_gpu_training`'s `fold_norms`;
        luca.step calls this after a step's last backward). Linear, so exact whatever the number of
        micro-batches: d W = d(W diag g) diag g, d g = Σ over W's rows of d(W diag g) ⊙ W."""
        for block in self.model.layers:
            for mod, _, parts, norm in fused_gemms(block):
                acc = mod.folded_grad
                if acc is None:
                    continue
                g = norm.weight
                dg = None
                for p, rows in zip(parts, acc.split([p.weight.shape[0] for p in parts])):
                    part = (rows * p.weight).sum(0)
                    dg = part if dg is None else dg.add_(part)
                    if p.weight.grad is None:
                        p.weight.grad = rows * g
                    else:
                        p.weight.grad.addcmul_(rows, g)
                if g.grad is None:
                    g.grad = dg
                else:
                    g.grad.add_(dg)
                acc.zero_()
