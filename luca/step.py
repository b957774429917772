"""The training step: forward and backward over a step's micro-batches, clip, update, skip.

What is notable:
- No host syncs on a GPU: loss, gradient norm and the "step was taken" flag stay device tensors.
  A step with a non-finite loss or gradient is skipped inside the fused AdamW kernel (its
  `found_inf` input) and counted on the device by `BadSteps`, which is read at log and save steps.
- With fused AdamW the clip is folded into the update: the kernel divides the gradients by its
  `grad_scale` input, set to max(1, ‖g‖ / clip) on the device, which saves a pass over the
  gradients; Muon reads the same two tensors (`folds_clip`, on by default) where `Stepper` will
  capture the step (one CUDA device with `cuda_graph`); elsewhere (CPU AdamW, FSDP2 across ranks,
  Muon without the graph) it is `clip_grad_norm_`.
- `Stepper` runs steps as `luca train` does. On one CUDA device, after two ordinary steps (which
  compile the model and create the optimizer state), it captures the whole step in one CUDA graph
  and replays it: the same kernels on the same memory, launched with one call. At the GPT-2-small
  shape the CPU needs about as long to launch a step's ~700 kernels as the H100 needs to run
  them, so without the graph the GPU waits ~1 ms a step (benchmarks/bench_train.py). If capture
  fails the step runs ordinarily and the graph is not tried again.
"""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch

from luca import rundir
from luca.distributed import local, sync_context
from luca.errors import LucaError

WARMUP_STEPS = 2  # ordinary steps before the capture: compile the graphs, create AdamW's state


def train_step(model: torch.nn.Module, raw: torch.nn.Module, opt: torch.optim.Optimizer,
               micro_batches: list[torch.Tensor], grad_clip: float, autocast, world: int = 1,
               fold_clip: bool = False):
    """Forward, backward, clip and update over one step's micro-batches (each (B, T+1) token ids).

    Returns device tensors (summed micro-batch loss, gradient norm, whether the step was taken)
    without reading anything back when the optimizer is fused; otherwise `ok` is read to skip.
    `fold_clip` (fused AdamW, no FSDP) clips through the kernel's `grad_scale`."""
    accum = len(micro_batches)
    for m in raw.modules():  # weights cast once per step for all its micro-batches (luca/model.py)
        if getattr(m, "weights_cached", False):
            m.refresh_weights()
    loss_sum = torch.zeros((), device=micro_batches[0].device)
    for i, batch in enumerate(micro_batches):
        with sync_context(model, i == accum - 1):
            with autocast:
                loss = model(batch[:, :-1], batch[:, 1:])
            (loss / accum).backward()
        loss_sum += loss.detach()
    for m in raw.modules():  # the GEMMs' d(W diag g) into d W and d g (luca/model.py, fold_norms)
        if hasattr(m, "unfold_norm_grads"):
            m.unfold_norm_grads()
    if fold_clip:
        gnorm, ok = _fold_clip(raw, opt, loss_sum, grad_clip, world)
        opt.step()
    else:
        gnorm = local(torch.nn.utils.clip_grad_norm_(raw.parameters(), grad_clip if grad_clip > 0 else 1e30))
        ok = _taken(gnorm, loss_sum, world)
        if all(g.get("fused") for g in opt.param_groups):
            opt.found_inf = (~ok).float()  # the fused kernel leaves weights and moments alone when set
            opt.step()
        elif bool(ok):
            opt.step()
    zero_grad(raw, opt)
    return loss_sum, gnorm, ok


def zero_grad(raw: torch.nn.Module, opt: torch.optim.Optimizer) -> None:
    """Free the gradients, or zero them in place where the model keeps them (`keep_grads`: its GEMMs
    add into them, so they must stay where they are)."""
    opt.zero_grad(set_to_none=not any(getattr(m, "grads_kept", False) for m in raw.modules()))


def _taken(gnorm: torch.Tensor, loss_sum: torch.Tensor, world: int) -> torch.Tensor:
    """Whether the step is taken. Gradients are all-reduced, so the norm is the same on every rank; a
    rank's own loss is not, and ranks must agree on the skip. A non-finite loss makes non-finite
    gradients anyway, except one with no counted target (0/0), which alone is skipped."""
    return torch.isfinite(gnorm) if world > 1 else torch.isfinite(gnorm) & torch.isfinite(loss_sum)


def _fold_clip(raw: torch.nn.Module, opt: torch.optim.Optimizer, loss_sum: torch.Tensor, grad_clip: float,
               world: int):
    """Set fused AdamW's grad_scale (the clip) and found_inf (the skip) on the device."""
    grads = [p.grad for p in raw.parameters() if p.grad is not None]
    gnorm = torch.nn.utils.get_total_norm(grads, 2.0, foreach=True)
    ok = _taken(gnorm, loss_sum, world)
    # clip_grad_norm_'s factor is clip / (norm + 1e-6), applied when below 1; the kernel divides.
    scale = torch.clamp((gnorm + 1e-6) / grad_clip, min=1.0) if grad_clip > 0 else torch.ones_like(gnorm)
    if getattr(opt, "grad_scale", None) is None:
        opt.grad_scale, opt.found_inf = scale, (~ok).float()
    else:  # the same tensors every step: a captured graph reads them where they are
        opt.grad_scale.copy_(scale)
        opt.found_inf.copy_(~ok)
    return gnorm, ok


class Stepper:
    """Calls `train_step`, or replays it as one CUDA graph where that is possible (module docstring)."""

    def __init__(self, model: torch.nn.Module, raw: torch.nn.Module, opt: torch.optim.Optimizer, grad_clip: float,
                 autocast, world: int, fsdp: bool, cuda_graph: bool, say: Callable[[str], None] = lambda m: None):
        self.model, self.raw, self.opt, self.grad_clip, self.autocast, self.world = \
            model, raw, opt, grad_clip, autocast, world
        device = next(raw.parameters()).device
        graph = cuda_graph and device.type == "cuda" and world == 1
        # Fused AdamW reads the clip and the skip from device tensors at no cost; Muon can
        # (folds_clip), but its folded step only pays inside the graph: without one it is slower
        # (~14% of an optimizer step on a 2-core CPU).
        fused = all(g.get("fused") for g in opt.param_groups) or (getattr(opt, "folds_clip", False) and graph)
        self.fold_clip = fused and not (fsdp and world > 1)  # FSDP2's sharded norms need clip_grad_norm_
        self.graph_wanted = graph and self.fold_clip
        self.say, self.calls, self.graph = say, 0, None
        self.static: list[torch.Tensor] = []
        self.lr: torch.Tensor | None = None
        self.out = None

    def __call__(self, micro_batches: list[torch.Tensor], lr: float):
        self.calls += 1
        if self.graph is None and self.graph_wanted and self.calls > WARMUP_STEPS:
            self._capture(micro_batches)
        if self.graph is None or not self._fits(micro_batches):
            for g in self.opt.param_groups:
                g["lr"] = lr
            return train_step(self.model, self.raw, self.opt, micro_batches, self.grad_clip, self.autocast,
                              self.world, self.fold_clip)
        for s, b in zip(self.static, micro_batches):
            s.copy_(b, non_blocking=True)
        self.lr.fill_(lr)
        for g in self.opt.param_groups:
            g["lr"] = lr  # for the optimizer's state dict; the graph reads self.lr
        self.graph.replay()
        return self.out

    def _fits(self, micro_batches: list[torch.Tensor]) -> bool:
        """The graph replays the micro-batch count and shapes it was captured with, nothing else."""
        return len(micro_batches) == len(self.static) and all(
            s.shape == b.shape and s.dtype == b.dtype for s, b in zip(self.static, micro_batches))

    def _capture(self, micro_batches: list[torch.Tensor]) -> None:
        self.graph_wanted = False  # one try
        opt = self.opt
        saved = [(g["lr"], g.get("capturable", False)) for g in opt.param_groups]
        stream = torch.cuda.current_stream() if torch.cuda.is_available() else None
        try:
            dev = micro_batches[0].device
            self.lr = torch.tensor(float(saved[0][0]), device=dev)
            self.static = [b.clone() for b in micro_batches]
            for g in opt.param_groups:
                g["lr"], g["capturable"] = self.lr, True  # the kernel reads lr from device memory
            zero_grad(self.raw, opt)  # gradients are then allocated (and kept) in the graph's pool unless kept already
            torch.cuda.synchronize(dev)
            torch.cuda.empty_cache()  # the eager steps' cached blocks: the graph takes its own pool
            graph = torch.cuda.CUDAGraph()
            # thread_local: the data loader's thread pins the next batch meanwhile, which a global
            # capture forbids (it failed about 1 capture in 20 on an H100).
            with torch.cuda.graph(graph, capture_error_mode="thread_local"):
                self.out = train_step(self.model, self.raw, opt, self.static, self.grad_clip, self.autocast,
                                      self.world, fold_clip=True)
            self.graph = graph
        except Exception as e:  # noqa: BLE001 - any op that cannot be captured: run steps ordinarily
            self.say(f"CUDA graph capture failed ({str(e).strip().splitlines()[0][:160]}); "
                     f"training continues without it")
            self.out, self.static, self.lr = None, [], None
            if stream is not None:  # a capture that failed inside leaves its side stream current
                torch.cuda.set_stream(stream)
            zero_grad(self.raw, opt)
        for g, (lr, cap) in zip(opt.param_groups, saved):
            g["lr"], g["capturable"] = lr, cap


class BadSteps:
    """Skipped-step counters kept on the device; `check` reads them back (a host sync)."""

    def __init__(self, device: torch.device, limit: int, total: int = 0):
        self.streak = torch.zeros((), dtype=torch.int64, device=device)
        self.worst = torch.zeros((), dtype=torch.int64, device=device)
        self.count = torch.zeros((), dtype=torch.int64, device=device)
        self.limit, self.total = limit, total

    def record(self, ok: torch.Tensor) -> None:
        self.streak = torch.where(ok, 0, self.streak + 1)
        self.worst = torch.maximum(self.worst, self.streak)
        self.count += (~ok).long()

    def check(self, step: int, run_dir: Path, say) -> None:
        new, worst, streak = (int(v) for v in torch.stack([self.count, self.worst, self.streak]).tolist())
        if new:
            self.total += new
            self.count.zero_()
            say(f"step {step}: {new} step(s) with non-finite loss or gradient skipped ({streak} in a row now)")
        if worst >= self.limit:
            raise LucaError(f"training stopped at step {step}: {worst} consecutive steps with non-finite loss or "
                            f"gradients (train.max_bad_steps); the last good checkpoint is kept in "
                            f"{run_dir / rundir.TRAIN_STATE}")
        self.worst.copy_(self.streak)
