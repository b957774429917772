"""The weight-gradient GEMMs of one micro-batch at the GPT-2-small shape, one layer at a time (as
training runs them) against all 12 layers' in one batched GEMM: how much a deferred, batched weight
gradient could gain before anyone builds one.

What is notable:
- Each GEMM is what luca's kept-gradient path runs: d W (out × in, FP32) += d yᵀ · x over the
  micro-batch's 12,288 tokens, BF16 operands, through luca.kernels.mm_into (cuBLAS with beta = 1);
  the batched form is `torch.baddbmm(..., out_dtype=float32)` over 12 stacked layers.
- The 768-wide outputs (o_proj 768 × 768, down_proj 768 × 2048) give cuBLAS 36–96 output tiles for
  132 SMs: less than a wave, hence split-K and the low rates the step's profile shows.
- Times are CUDA-event times of a CUDA graph of 20 replays (no launch gaps), median of 5.
- Prints a table: ms per micro-batch for all 12 layers each way, TFLOP/s, and the ratio.

Run: `python3 benchmarks/bench_wgrad.py` (CUDA only; ~30 s).
"""
from __future__ import annotations

import json
import os
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from luca import kernels  # noqa: E402

TOKENS, LAYERS, D, FF = 12 * 1024, 12, 768, 2048
SHAPES = {  # name: (out, in) of the weight
    "q/k/v (fused)": (3 * D, D),
    "o_proj": (D, D),
    "gate/up (fused)": (2 * FF, D),
    "down_proj": (D, FF),
}


def timed(fn, reps: int = 20) -> float:
    """ms per call: a CUDA graph of `reps` calls, replayed 5 times, median."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(reps):
            fn()
    out = []
    for _ in range(5):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        g.replay()
        b.record()
        torch.cuda.synchronize()
        out.append(a.elapsed_time(b) / reps)
    return statistics.median(out)


def main() -> None:
    if not torch.cuda.is_available():
        raise SystemExit("bench_wgrad.py needs CUDA")
    dev = torch.device("cuda")
    rows = []
    for name, (o, i) in SHAPES.items():
        dy = torch.randn(LAYERS, TOKENS, o, device=dev, dtype=torch.bfloat16)
        x = torch.randn(LAYERS, TOKENS, i, device=dev, dtype=torch.bfloat16)
        acc = torch.zeros(LAYERS, o, i, device=dev)

        def one_by_one():  # luca's kept-gradient op, as training calls it
            for layer in range(LAYERS):
                kernels.mm_into(acc[layer], dy[layer].t(), x[layer])

        def batched():
            torch.baddbmm(acc, dy.transpose(1, 2), x, out_dtype=torch.float32, out=acc)
        flops = 2 * LAYERS * TOKENS * o * i
        t1 = timed(one_by_one)
        tb = timed(batched)
        rows.append({"gemm": name, "out_x_in": f"{o}x{i}", "one_by_one_ms": t1, "batched_ms": tb,
                     "one_by_one_tflops": flops / t1 / 1e9, "batched_tflops": flops / tb / 1e9})
        del dy, x, acc
    total1 = sum(r["one_by_one_ms"] for r in rows)
    totalb = sum(r["batched_ms"] for r in rows)
    print(f"weight-gradient GEMMs of one micro-batch ({TOKENS} tokens, {LAYERS} layers), {torch.cuda.get_device_name()}")
    print("| GEMM (all layers) | out × in | one by one ms | TFLOP/s | batched ms | TFLOP/s | batched / one by one |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['gemm']} | {r['out_x_in']} | {r['one_by_one_ms']:.3f} | {r['one_by_one_tflops']:.0f} | "
              f"{r['batched_ms']:.3f} | {r['batched_tflops']:.0f} | "
              f"{r['batched_ms'] / r['one_by_one_ms']:.2f}× |")
    print(f"| all | | {total1:.3f} | | {totalb:.3f} | | {totalb / total1:.2f}× |")
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], "bench_wgrad.json").write_text(json.dumps(
            {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
