"""A pre-norm block's residual add + RMSNorm, forward and backward, at the GPT-2-small training shape.

Measures, on one GPU and in one run (about a minute on an H200):
- the peer: the same add and RMSNorm (Hugging Face's arithmetic) compiled by `torch.compile`, whose
  backward is inductor's mix-order reduction (d x and partial sums of d weight in one kernel) plus
  an ATen column sum of the partials;
- luca's `kernels.AddRMSNorm` (compiled forward, luca's backward kernel) for several rows per
  iteration, warps and programs per SM.
Shapes as in training: an FP32 residual stream, a BF16 branch output (the GEMM's) and a BF16 normed
output (what the next GEMM reads), with the residual's own gradient flowing in. Each line reports
ms per forward + backward (one CUDA graph replayed, CUDA events, median of 30 × 10 replays), the ratio to the peer, and the
largest error of d x, d a and d weight against an FP64 reference, relative to the largest entry.

`python benchmarks/bench_norm.py [--rows 12288 --dim 768]`; `BENCH_SMOKE=1` runs a tiny shape on
the CPU through Triton's interpreter (checks the plumbing, measures nothing).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from pathlib import Path

if os.environ.get("BENCH_SMOKE"):
    os.environ.setdefault("TRITON_INTERPRET", "1")
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from luca import kernels  # noqa: E402

DEV = "cpu" if os.environ.get("BENCH_SMOKE") else "cuda"
EPS = 1e-5


def peer(x, a, w):
    s = x + a
    xf = s.float()
    return s, (w * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + EPS)).to(s.dtype)).to(torch.bfloat16)


def ours(x, a, w):
    return kernels.AddRMSNorm.apply(x, a, w, EPS, torch.bfloat16)


def time_ms(fn, inputs, ds, dh, reps: int) -> float:
    def once():
        ins = [t.requires_grad_() for t in inputs]
        s, h = fn(*ins)
        torch.autograd.backward((s, h), (ds, dh))
    if DEV != "cuda":
        once()
        return float("nan")
    side = torch.cuda.Stream()  # warm-up (compilation, autotuning) off the capture stream, as graphs need
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            once()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()  # replayed, so that the time is the kernels', not Python's launches
    with torch.cuda.graph(graph):
        once()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(10):
            graph.replay()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 10)
    return statistics.median(times)


def errors(fn, inputs, ds, dh) -> list[float]:
    ins = [t.detach().clone().requires_grad_() for t in inputs]
    got = torch.autograd.grad(fn(*ins), ins, (ds, dh))
    ref_in = [t.detach().double().requires_grad_() for t in inputs]
    s = ref_in[0] + ref_in[1]
    h = ref_in[2] * s * torch.rsqrt(s.pow(2).mean(-1, keepdim=True) + EPS)
    want = torch.autograd.grad((s, h), ref_in, (ds.double(), dh.double()))
    return [((g.double() - w).abs().max() / w.abs().max()).item() for g, w in zip(got, want)]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=12288)
    p.add_argument("--dim", type=int, default=768)
    p.add_argument("--reps", type=int, default=30)
    p.add_argument("--configs", default="4,8,4;4,8,2;8,8,4;2,4,8;4,4,4;8,8,2;16,8,2",
                   help="rows per iteration, warps, programs per SM; ';' between configs")
    p.add_argument("--out", help="folder for bench_norm.json (default: $OUT if set)")
    args = p.parse_args()
    if os.environ.get("BENCH_SMOKE"):
        args.rows, args.dim, args.configs = 37, 48, "4,4,1;2,4,2"
    g = torch.Generator(device="cpu").manual_seed(0)
    x = (torch.randn(args.rows, args.dim, generator=g) * 3).to(DEV)
    a = torch.randn(args.rows, args.dim, generator=g).to(DEV, torch.bfloat16)
    w = (torch.rand(args.dim, generator=g) + 0.5).to(DEV)
    ds = torch.randn(args.rows, args.dim, generator=g).to(DEV)
    dh = torch.randn(args.rows, args.dim, generator=g).to(DEV, torch.bfloat16)
    compile_ = DEV == "cuda" or bool(os.environ.get("BENCH_COMPILE"))
    rows = []
    fn = torch.compile(peer) if compile_ else peer
    base = time_ms(fn, [x, a, w], ds, dh, args.reps)
    rows.append(("compiled add + RMSNorm (inductor)", base, errors(fn, [x, a, w], ds, dh)))
    fn = torch.compile(ours) if compile_ else ours
    for cfg in args.configs.split(";"):
        kernels.NORM_ROWS, kernels.NORM_WARPS, kernels.NORM_PER_SM = map(int, cfg.split(","))
        ms = time_ms(fn, [x, a, w], ds, dh, args.reps)
        rows.append((f"luca AddRMSNorm rows {kernels.NORM_ROWS}, warps {kernels.NORM_WARPS}, "
                     f"{kernels.NORM_PER_SM}/SM", ms, errors(fn, [x, a, w], ds, dh)))
    out_dir = args.out or os.environ.get("OUT")
    if out_dir:
        Path(out_dir, "bench_norm.json").write_text(json.dumps(
            {"device": torch.cuda.get_device_name() if DEV == "cuda" else "cpu", "rows": args.rows, "dim": args.dim,
             "results": [dict(name=n, ms=ms, err_dx=e[0], err_da=e[1], err_dw=e[2]) for n, ms, e in rows]}, indent=1))
    best = min(rows[1:], key=lambda r: r[1])[0]
    cfg = ",".join(best.replace("/SM", "").split("rows ")[1].replace("warps ", "").split(", "))
    if out_dir:
        Path(out_dir, "bench_norm_best.txt").write_text(cfg + "\n")
    print(f"fastest luca config (rows,warps,per SM): {cfg}")
    print(f"| add + RMSNorm fwd+bwd, {args.rows} × {args.dim} | ms | vs compiled | err dx | err da | err dw |")
    print("|---|---:|---:|---:|---:|---:|")
    for n, ms, e in rows:
        print(f"| {n} | {ms:.4f} | {base / ms:.2f}× | {e[0]:.1e} | {e[1]:.1e} | {e[2]:.1e} |")


if __name__ == "__main__":
    main()
