"""Causal attention forward and backward at nano-n2's shape on one GPU: SDPA's cuDNN and
FlashAttention-2 backends (what luca trains with: cuDNN on Hopper) against FlashAttention-4, the
`flash-attn-4` package's CuTe DSL kernels, when it is importable (it is not a luca dependency).

Shape: micro-batch 12, sequence 1024, 12 heads of 64, BF16 (`--batch/--seq/--heads/--head-dim`).
q, k, v are cut from one fused projection output (B, T, 3·H·D), as in the model: SDPA reads them
transposed to (B, H, T, D), FlashAttention-4 in place. FlashAttention-4's forward is also timed with
other tiles (`--flash4-tiles`: query rows × key rows, ":ss" for P·V from shared memory); its
backward does not depend on them. Each timing is the median over `--reps`
rounds of `--iters` calls, after warm-up (the first FlashAttention-4 call compiles its kernels), in
GPU kernel time from the profiler; forwards are training forwards (they keep the log-sum-exp),
backwards are timed as forward + backward minus forward (so a backward here also holds autograd's
gathering of the three gradients into the q/k/v tensor, which differs between the kernels; a
training step's profile, bench_train.py --profiled, is the figure to trust). TFLOP/s count the
causal half: 2·B·H·T²·D forward, 2.5× that backward. Errors are the largest differences of the
output and the three gradients from an FP32 reference, over the reference's largest entry.

`python benchmarks/bench_attention.py [--out DIR]` prints a table last and writes bench_attention.json.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch.nn.attention import SDPBackend, sdpa_kernel  # noqa: E402


def flash4():
    """FlashAttention-4's interface module, or None."""
    try:
        from flash_attn.cute import interface
        return interface if torch.cuda.get_device_capability()[0] in (9, 10) else None
    except Exception:  # not installed, or its CUDA libraries do not load here
        return None


def sdpa(backend):
    def run(q, k, v):  # (B, T, H, D) views → SDPA's (B, H, T, D) and back
        with sdpa_kernel([backend]):
            y = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                               is_causal=True)
        return y.transpose(1, 2)
    return run


def timed(fn, iters: int, reps: int) -> float:
    """GPU ms per call of `fn`: the summed durations of the kernels it launches, from the profiler's
    trace, median over `reps` rounds of `iters` calls. Kernel time, not wall time: FlashAttention-4's
    host code costs more per call than its kernels at this shape, which in training luca.step's CUDA
    graph removes (a graph of autograd's backward did not capture here)."""
    import tempfile

    from torch.profiler import ProfilerActivity, profile
    for _ in range(3):  # warm-up (and FlashAttention-4's compilation)
        fn()
    torch.cuda.synchronize()
    ms = []
    for _ in range(reps):
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(iters):
                fn()
            torch.cuda.synchronize()
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "trace.json")
            prof.export_chrome_trace(path)
            with open(path) as f:
                events = json.load(f)["traceEvents"]
        ms.append(sum(e["dur"] for e in events if e.get("ph") == "X" and e.get("cat") == "kernel") / 1e3 / iters)
    return statistics.median(ms)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch", type=int, default=12)
    ap.add_argument("--seq", type=int, default=1024)
    ap.add_argument("--heads", type=int, default=12)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--flash4-tiles", default="default,128x128,128x192,192x192,128x128:ss",
                    help="FlashAttention-4 forward tiles to try (comma list; default = the package's)")
    ap.add_argument("--out", default="")
    a = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench_attention.py measures GPU kernels: no CUDA device here")
    B, T, H, D = a.batch, a.seq, a.heads, a.head_dim
    dev = torch.device("cuda")
    torch.manual_seed(0)
    qkv = torch.randn(B, T, 3 * H * D, device=dev, dtype=torch.bfloat16, requires_grad=True)
    dy = torch.randn(B, T, H, D, device=dev, dtype=torch.bfloat16)

    def parts():
        q, k, v = qkv.view(B, T, 3, H, D).unbind(2)
        return q, k, v

    # FP32 reference on the same inputs
    q, k, v = (t.detach().float().requires_grad_() for t in parts())
    ref = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                         is_causal=True).transpose(1, 2)
    ref_grads = torch.autograd.grad(ref, (q, k, v), dy.float())

    impls = {"sdpa-cudnn": sdpa(SDPBackend.CUDNN_ATTENTION), "sdpa-flash2": sdpa(SDPBackend.FLASH_ATTENTION)}
    fa4 = flash4()
    if fa4 is not None:
        for cfg in a.flash4_tiles.split(","):  # "default" (the package's choice) or MxN[:ss]
            tile, _, mode = cfg.partition(":")
            kw = {} if tile == "default" else {"tile_mn": tuple(map(int, tile.split("x")))}
            if mode == "ss":
                kw["mma_pv_is_rs"] = False
            if not kw:
                impls["flash4"] = lambda q, k, v: fa4.flash_attn_func(q, k, v, causal=True)[0]
            else:  # forward only: the package's autograd function takes no tile
                impls[f"flash4 fwd {cfg}"] = lambda q, k, v, kw=kw: fa4._flash_attn_fwd(
                    q, k, v, causal=True, return_lse=True, **kw)[0]
    else:
        print("flash4: not available (flash-attn-4 not importable, or not Hopper/Blackwell)", file=sys.stderr)
    fwd_flop = 2 * B * H * T * T * D  # causal: half of 4·B·H·T²·D
    rows = []
    for name, fn in impls.items():
        row = {"impl": name}
        fwd_only = name.startswith("flash4 fwd")
        try:
            y = fn(*parts())
            errs = [(y.float() - ref).abs().max().item() / ref.abs().max().item()]
            if not fwd_only:
                grads = torch.autograd.grad(y, qkv, dy)[0].view(B, T, 3, H, D).unbind(2)
                errs += [(g.float() - r).abs().max().item() / r.abs().max().item() for g, r in zip(grads, ref_grads)]
            row["max_rel_err"] = dict(zip(("out", "dq", "dk", "dv"), errs))
            row["fwd_ms"] = timed(lambda: fn(*parts()), a.iters, a.reps)  # a training forward (saves the LSE)
            row["fwd_tflops"] = fwd_flop / row["fwd_ms"] / 1e9
            if fwd_only:
                rows.append(row)
                print(json.dumps(row), file=sys.stderr, flush=True)
                continue

            def fwd_bwd():
                out = fn(*parts())
                torch.autograd.grad(out, qkv, dy)
            row["fwd_bwd_ms"] = timed(fwd_bwd, a.iters, a.reps)
            row["bwd_ms"] = row["fwd_bwd_ms"] - row["fwd_ms"]
            row["bwd_tflops"] = 2.5 * fwd_flop / row["bwd_ms"] / 1e9
        except Exception as e:  # an impl that fails is reported, not fatal: the others still run
            row["error"] = f"{type(e).__name__}: {e}"[:400]
        rows.append(row)
        print(json.dumps(row), file=sys.stderr, flush=True)
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "shape": [B, T, H, D],
              "rows": rows}
    if a.out:
        Path(a.out).mkdir(parents=True, exist_ok=True)
        (Path(a.out) / "bench_attention.json").write_text(json.dumps(result, indent=2))
    base = next((r for r in rows if r["impl"] == "sdpa-cudnn" and "fwd_bwd_ms" in r), None)
    print(f"\n{result['device']}, B={B} T={T} H={H} D={D}, causal, BF16; per layer (×12 for nano-n2)")
    print(f"{'impl':<22} {'fwd ms':>8} {'bwd ms':>8} {'fwd TF/s':>9} {'bwd TF/s':>9} {'vs cuDNN':>9} "
          f"{'max rel err':>12}")
    for r in rows:
        if "error" in r:
            print(f"{r['impl']:<22} failed: {r['error']}")
            continue
        err = f"{max(r['max_rel_err'].values()):12.2e}"
        if "bwd_ms" not in r:
            print(f"{r['impl']:<22} {r['fwd_ms']:8.3f} {'-':>8} {r['fwd_tflops']:9.0f} {'-':>9} {'-':>9} {err}")
            continue
        ratio = base["fwd_bwd_ms"] / r["fwd_bwd_ms"] if base else float("nan")
        print(f"{r['impl']:<22} {r['fwd_ms']:8.3f} {r['bwd_ms']:8.3f} {r['fwd_tflops']:9.0f} {r['bwd_tflops']:9.0f} "
              f"{ratio:8.2f}× {err}")


if __name__ == "__main__":
    main()
