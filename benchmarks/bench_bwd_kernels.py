"""luca's backward kernels for RoPE (on the fused q/k/v projection) and SwiGLU at the GPT-2-small
training shape (12 × 1024 tokens, 12 heads of 64, F 2048), swept over their launch settings.

What is notable:
- Both kernels only move memory: each reads its inputs once and writes the fused GEMM's gradient,
  so the figure of merit is the bandwidth they reach (bytes read + written / time), printed with
  the ms per layer and per micro-batch (× 12 layers).
- RoPE's input gradients are (B, T, H, D) in memory, the layout of the forward's q, k, v views.
- Outputs are checked equal (bitwise) to the current defaults' (luca.kernels ROPE_*, SWIGLU_*).
- Session 11, H200 (`benchmarks/results/bench_bwd_kernels_h200_s11*.json`): RoPE's kernel reached
  2.83 TB/s with 64 rows a program, 2.97 with 16 (now the default), none better; a version
  reading all heads of a few rows per program (whole rows, cos/sin once a row) was slower, 2.81 at
  best (`_allheads`, not kept). SwiGLU's runs at 3.94 TB/s (82% of the peak) whatever the setting.
- Times are CUDA-event times of a CUDA graph of 20 calls, median of 5 replays (bench_wgrad's way).

Run: `python3 benchmarks/bench_bwd_kernels.py` (CUDA only; ~1 minute).
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench_wgrad import timed  # noqa: E402

from luca import kernels  # noqa: E402
from luca.model import rope_cos_sin  # noqa: E402

B, T, H, D, FF, LAYERS = 12, 1024, 12, 64, 2048, 12
ROPE = [(bt, w) for bt in (16, 32, 64, 128) for w in (1, 2, 4, 8)]
SWIGLU = [(bm, bn, w) for bm, bn in ((32, 128), (16, 256), (64, 128), (32, 256), (64, 64), (128, 64))
          for w in (4, 8)]


def main() -> None:
    if not torch.cuda.is_available():
        raise SystemExit("bench_bwd_kernels.py needs CUDA")
    dev, bf = torch.device("cuda"), torch.bfloat16
    torch.manual_seed(0)
    rows = []
    defaults = {"rope_bwd": [kernels.ROPE_BT, kernels.ROPE_WARPS],
                "swiglu_bwd": [kernels.SWIGLU_BM, kernels.SWIGLU_BN, kernels.SWIGLU_WARPS]}
    dq, dk, dv = (torch.randn(B, T, H, D, device=dev, dtype=bf) for _ in range(3))
    pos = torch.arange(T, device=dev).expand(B, T)
    cos, sin = rope_cos_sin(pos, D, 10000.0, bf)
    ref = kernels.rope_qkv_backward(dq, dk, dv, cos, sin)
    nbytes = 2 * 3 * dq.numel() * 2  # three gradients read, the fused one written, BF16
    for bt, w in ROPE:
        kernels.ROPE_BT, kernels.ROPE_WARPS = bt, w
        out = kernels.rope_qkv_backward(dq, dk, dv, cos, sin)
        t = timed(lambda: kernels.rope_qkv_backward(dq, dk, dv, cos, sin))
        rows.append({"kernel": "rope_bwd", "cfg": [bt, w], "ms_layer": t, "ms_micro_batch": t * LAYERS,
                     "tb_s": nbytes / t / 1e9, "equal": bool(torch.equal(out, ref))})
        print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    gu = torch.randn(B * T, 2 * FF, device=dev, dtype=bf)
    dh = torch.randn(B * T, FF, device=dev, dtype=bf)
    ref = kernels.swiglu_backward(gu, dh)
    nbytes = (gu.numel() * 2 + dh.numel()) * 2
    for bm, bn, w in SWIGLU:
        kernels.SWIGLU_BM, kernels.SWIGLU_BN, kernels.SWIGLU_WARPS = bm, bn, w
        out = kernels.swiglu_backward(gu, dh)
        t = timed(lambda: kernels.swiglu_backward(gu, dh))
        rows.append({"kernel": "swiglu_bwd", "cfg": [bm, bn, w], "ms_layer": t, "ms_micro_batch": t * LAYERS,
                     "tb_s": nbytes / t / 1e9, "equal": bool(torch.equal(out, ref))})
        print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    print(f"| kernel | launch settings | ms/layer | ms/micro-batch | TB/s | equal |  ({torch.cuda.get_device_name()})")
    print("|---|---|---:|---:|---:|---|")
    for name in ("rope_bwd", "swiglu_bwd"):
        mine = sorted((r for r in rows if r["kernel"] == name), key=lambda r: r["ms_layer"])
        default = next(r for r in rows if r["kernel"] == name and r["cfg"] == defaults[name])
        for r in [default] + mine[:3]:
            print(f"| {name} | {r['cfg']}{' (default)' if r is default else ''} | {r['ms_layer']:.4f} | "
                  f"{r['ms_micro_batch']:.3f} | {r['tb_s']:.2f} | {r['equal']} |")
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], "bench_bwd_kernels.json").write_text(json.dumps(
            {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
