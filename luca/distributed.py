"""Many processes, one training run: process groups, model wrapping and world-size-free checkpoints.

What is notable:
- `torchrun` sets RANK / WORLD_SIZE / LOCAL_RANK; `init_distributed` joins the group (NCCL on
  CUDA, gloo on CPU) and every other function is a no-op for a single process.
- Two ways to spread a model: DDP (a full replica per rank, gradients all-reduced in buckets while
  the backward pass runs) for models that fit one device, and FSDP2 (`fully_shard` per block, then
  the root) for those that do not: parameters, gradients and optimizer state are sharded, each
  block's weights are all-gathered just before use and freed after.
- Checkpoints are world-size free: `full_state` gathers the full model and optimizer state (keyed
  by parameter name, not by position) onto the CPU, and `load_full_state` scatters it into any
  layout (one process, DDP, or FSDP2 over any number of ranks).
- `torch.compile` with FSDP2 compiles each block on its own (the FSDP hooks sit between blocks);
  without FSDP the whole model is one graph.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn

from luca.errors import LucaError


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0


def init_distributed(device: torch.device) -> Dist:
    """Join the torchrun process group if the environment names one (once per process)."""
    if not dist.is_initialized():
        if "RANK" not in os.environ or int(os.environ.get("WORLD_SIZE", "1")) < 1:
            return Dist()
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                device_id=device if device.type == "cuda" else None)
    return Dist(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)))


def pick_device(name: str) -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        return torch.device("cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise LucaError(f"train.device={name!r}: CUDA is not available on this machine")
    return torch.device(name)


def wrap(model: nn.Module, dd: Dist, device: torch.device, fsdp: bool, compile_: bool) -> nn.Module:
    """The module the training loop calls: plain, DDP or FSDP2, compiled or not."""
    if fsdp and dd.world > 1:
        from torch.distributed.fsdp import fully_shard

        from luca.auxiliary import blocks_of  # luca's blocks or the GPT-2 baseline's, under any aux wrapper
        for block in blocks_of(getattr(model, "trunk", model)):
            if compile_:
                block.compile()
            fully_shard(block)
        fully_shard(model)  # embeddings, final norm and (tied) head: the root group
        return model
    if dd.world > 1:
        from torch.nn.parallel import DistributedDataParallel as DDP
        model = DDP(model, device_ids=[device.index] if device.type == "cuda" else None,
                    gradient_as_bucket_view=True, broadcast_buffers=False)  # buffers: constant RoPE tables
        if compile_:
            # Dynamo's DDP optimizer splits the graph at every gradient bucket; one graph with DDP's
            # own hooks scaled better on 2×H200 (91.5–97.5% vs 87–88%, benchmarks/results/scaling_*).
            torch._dynamo.config.optimize_ddp = False
    return torch.compile(model) if compile_ else model


def sync_context(model: nn.Module, sync: bool):
    """Skip the gradient all-reduce / reduce-scatter on all but the last micro-batch of a step."""
    from contextlib import nullcontext
    inner = getattr(model, "_orig_mod", model)
    if hasattr(inner, "set_requires_gradient_sync"):  # FSDP2
        inner.set_requires_gradient_sync(sync)
        return nullcontext()
    if hasattr(inner, "no_sync") and not sync:  # DDP
        return inner.no_sync()
    return nullcontext()


def unwrap(model: nn.Module) -> nn.Module:
    model = getattr(model, "_orig_mod", model)
    return getattr(model, "module", model)


def local(t: torch.Tensor) -> torch.Tensor:
    """A plain tensor from a DTensor (FSDP2's gradient norm is one) or the tensor itself."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def all_mean(t: torch.Tensor, dd: Dist) -> torch.Tensor:
    if dd.world > 1:
        t = t.clone()
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        t /= dd.world
    return t


def barrier(dd: Dist) -> None:
    if dd.world > 1:
        dist.barrier()


def full_state(model: nn.Module, opt: torch.optim.Optimizer) -> tuple[dict, dict]:
    """(model, optimizer) state dicts, full and on the CPU, keyed by parameter name.

    A collective under FSDP2: every rank must call it; each gets the full state."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict
    return get_state_dict(unwrap(model), opt, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def load_full_state(model: nn.Module, opt: torch.optim.Optimizer, model_sd: dict, optim_sd: dict) -> None:
    """Load a `full_state` checkpoint into any layout (one process, DDP, FSDP2 of any world size)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict
    set_state_dict(unwrap(model), opt, model_state_dict=model_sd, optim_state_dict=optim_sd,
                   options=StateDictOptions(full_state_dict=True))
