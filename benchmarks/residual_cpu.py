"""FP32 against BF16 residual stream over a long run on the CPU: a 4 × 128 byte-level model trained
for many passes over 300 kB of the interpreter's standard library, under BF16 autocast.

Both ways run `set_gpu_training` (fused gate/up, FP32 weight gradients from the GEMMs) through
`luca.step.Stepper`; `--switches` adds the rest of the GPU path that works on a CPU (fused q/k/v
with luca's RoPE op, BF16 weights cached once per step, gradients kept and added into by the GEMMs,
2 micro-batches per step, fused AdamW). Prints (step, train loss, val
loss) ten times per run. Session 7 ran this model, data and schedule for 3,000 steps both ways
(~10 min per run on 2 cores, from the two ad-hoc scripts this one replaces;
benchmarks/results/bench_train_h100.md): no gap, where the H200's 20M model showed a large one.
That gap was torch 2.11's compiler dropping q's and k's gradients (session 8, `kernels.cast`); the
CPU runs eagerly on torch 2.13, which has no such bug, so it could not show here.

`python benchmarks/residual_cpu.py [--steps 3000] [--switches] [--seed 1]`
"""
from __future__ import annotations

import argparse
import glob
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from luca.model import ModelConfig, Transformer  # noqa: E402
from luca.step import Stepper  # noqa: E402

T, B = 128, 16


def run(bf16: bool, steps: int, switches: bool, seed: int, data: torch.Tensor, val: torch.Tensor) -> list:
    torch.manual_seed(seed)
    m = Transformer(ModelConfig(vocab_size=256, n_layers=4, d_model=128, n_heads=4, n_kv_heads=4, max_seq_len=T))
    m.loss_impl = "full"
    m.set_gpu_training(True, fuse_qkv=switches, bf16_residual=bf16)
    if switches:
        m.cache_weights()
        m.keep_grads()
    opt = torch.optim.AdamW(m.parameters(), lr=3e-3, betas=(0.9, 0.95), weight_decay=0.1, fused=switches)
    autocast = torch.autocast("cpu", dtype=torch.bfloat16)
    stepper = Stepper(m, m, opt, 1.0, autocast, 1, False, False)
    g = torch.Generator().manual_seed(seed)
    n_micro = 2 if switches else 1
    out = []
    for s in range(steps):
        lr = 3e-3 * min(1, (s + 1) / 50) * (1 if s < 0.8 * steps else (steps - s) / (0.2 * steps))  # WSD
        micro = []
        for _ in range(n_micro):
            i = torch.randint(0, len(data) - T - 1, (B // n_micro,), generator=g)
            micro.append(torch.stack([data[j:j + T + 1] for j in i]))
        loss = stepper(micro, lr)[0] / n_micro
        if s % (steps // 10) == 0 or s == steps - 1:
            with torch.no_grad(), autocast:
                xs = torch.stack([val[k:k + T + 1] for k in range(0, len(val) - T - 1, T)][:64])
                out.append((s, round(loss.item(), 3), round(m(xs[:, :-1], xs[:, 1:]).item(), 3)))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=3000)
    ap.add_argument("--switches", action="store_true")
    ap.add_argument("--seed", type=int, default=1)
    a = ap.parse_args()
    files = sorted(glob.glob(os.path.dirname(os.__file__) + "/*.py"))[:40]
    src = b"".join(open(f, "rb").read() for f in files)
    data = torch.frombuffer(bytearray(src[:300_000]), dtype=torch.uint8).long()
    val = torch.frombuffer(bytearray(src[300_000:330_000]), dtype=torch.uint8).long()
    print(f"{a.steps * B * T / len(data):.1f} passes over {len(data):,} training bytes")
    for bf16 in (False, True):
        t = time.time()
        r = run(bf16, a.steps, a.switches, a.seed, data, val)
        print(f"{'BF16' if bf16 else 'FP32'} residual, {time.time() - t:.0f} s: (step, train loss, val loss) {r}",
              flush=True)


if __name__ == "__main__":
    main()
