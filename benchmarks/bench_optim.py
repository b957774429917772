"""The optimizer step alone: luca's Muon (on a GPU same-shaped matrices batched; multi-tensor
element-wise kernels) against Muon applied one matrix at a time with an op per tensor (luca's
implementation before session 7) and torch's AdamW (fused on CUDA, foreach on CPU), the peer, on
one model's real parameter set.

Reports ms per step (median after warm-up; CUDA-synchronised on a GPU) and the number of kernels a
step launches on CUDA (torch.profiler; on CPU the ATen ops dispatched, the same count's proxy).
Without a CUDA graph each launch costs host time, so on a GPU the count sets the floor of a step.

`python benchmarks/bench_optim.py [--preset nano-n2] [--device cuda]`
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from luca.config import build, derive_model, load_preset  # noqa: E402
from luca.model import ModelConfig, Transformer  # noqa: E402
from luca.optim import Muon, adamw, muon, newton_schulz  # noqa: E402


class OneAtATime(Muon):
    """Muon's rule looping over the matrices one by one, each element-wise op its own kernel (its
    AdamW part is luca's, foreach: only the matrices' handling differs)."""

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            if not group["muon"]:
                if group["params"]:
                    super()._adamw(group, group["params"])
                continue
            lr, wd = group["lr"], group["weight_decay"]
            for p in group["params"]:
                buf = self.state[p].setdefault("momentum_buffer", torch.zeros_like(p))
                buf.lerp_(p.grad, 1 - group["momentum"])
                update = newton_schulz(p.grad.lerp(buf, group["momentum"]), group["ns_steps"])
                p.mul_(1 - lr * wd).add_(update, alpha=-lr * 0.2 * max(p.shape) ** 0.5)


def measure(opt: torch.optim.Optimizer, device: torch.device, reps: int) -> tuple[float, int]:
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(3):
        opt.step()
    sync()
    ms = []
    for _ in range(reps):
        t = time.perf_counter()
        opt.step()
        sync()
        ms.append((time.perf_counter() - t) * 1e3)
    from torch.profiler import ProfilerActivity, profile
    act = ProfilerActivity.CUDA if device.type == "cuda" else ProfilerActivity.CPU
    with profile(activities=[act]) as prof:
        opt.step()
        sync()
    if device.type == "cuda":
        n = sum(1 for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA)
    else:
        n = sum(1 for e in prof.events() if e.name.startswith("aten::")
                and (e.cpu_parent is None or not e.cpu_parent.name.startswith("aten::")))
    return statistics.median(ms), n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="nano-n1")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--reps", type=int, default=10)
    a = ap.parse_args()
    device = torch.device(a.device)
    model = Transformer(build(ModelConfig, derive_model(dict(load_preset(a.preset)["model"])), "model")).to(device)
    for p in model.parameters():
        p.grad = torch.randn_like(p) * 1e-3
    luca_row = "luca Muon (" + ("batched by shape" if device.type == "cuda" else "CPU: one matrix at a time") + ", foreach)"
    kinds = {luca_row: muon(model, 1e-3, 0.1, (0.9, 0.95)),
             "Muon one matrix at a time": None,
             "torch AdamW (peer)": adamw(model, 1e-3, 0.1, (0.9, 0.95), device_type=device.type)}
    ref = muon(model, 1e-3, 0.1, (0.9, 0.95))
    kinds["Muon one matrix at a time"] = OneAtATime(ref.param_groups, lr=1e-3)
    n_mat = sum(len(g["params"]) for g in ref.param_groups if g["muon"])
    rows = [(name, *measure(opt, device, a.reps)) for name, opt in kinds.items()]
    peer = rows[-1][1]
    print(f"\noptimizer step, {a.preset} ({sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters, "
          f"{n_mat} Muon matrices), {device}\n")
    print("| optimizer | ms/step | vs AdamW | " + ("kernels" if device.type == "cuda" else "ATen ops") + "/step |")
    print("|---|---:|---:|---:|")
    for name, ms, n in rows:
        print(f"| {name} | {ms:.2f} | {ms / peer:.2f}× | {n} |")


if __name__ == "__main__":
    main()
