"""The language-model head's cross-entropy, forward and backward, at the GPT-2-small training shape.

Measures, on one GPU and in one run (under a minute on an H100):
- the peer: the head GEMM and `F.cross_entropy` over its FP32-cast logits under `torch.compile`
  (luca's previous `loss_impl = "full"`, and what nanoGPT / transformers do);
- luca's fused head (`loss_impl = "fused"`, luca/kernels.py) for several tiles and warp counts;
- the three GEMMs alone (logits, d h, d W): the floor of any head that materialises logits;
- on GPUs with FP8 GEMMs, the same for luca's FP8 head (luca/fp8_head.py), several of its tiles, and
  its kernel's ways of encoding e5m2 and of making the transposed layout (also timed alone).
Each line reports ms per forward + backward (CUDA events, median of 20 after warm-up), the share
above the GEMMs' floor, and the largest error of the loss and of both gradients against an FP32
reference of the same BF16 inputs.

`python benchmarks/bench_head.py [--tokens 12288 --vocab 50304 --dim 768]`; `BENCH_SMOKE=1` runs a
tiny shape on the CPU through Triton's interpreter (checks the plumbing, measures nothing).
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
import torch.nn.functional as F  # noqa: E402

from luca import fp8_head, kernels  # noqa: E402

DEV = "cpu" if os.environ.get("BENCH_SMOKE") else "cuda"


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def timed(fn, reps: int = 20, warmup: int = 5) -> float:
    for _ in range(warmup):
        fn()
    if DEV != "cuda":
        return float("nan")
    ms = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        ms.append(a.elapsed_time(b))
    return statistics.median(ms)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=12288)
    ap.add_argument("--vocab", type=int, default=50304)
    ap.add_argument("--dim", type=int, default=768)
    ap.add_argument("--json", default="", help="also write the rows to this file")
    ap.add_argument("--copy-sweep", action="store_true",
                    help="only the FP8 head's \"copy\" pair: its kernel's tiles × the transposing kernel's tiles")
    args = ap.parse_args()
    n, v, d = (args.tokens, args.vocab, args.dim) if DEV == "cuda" else (64, 1000, 32)
    g = torch.Generator(device="cpu").manual_seed(0)
    h = (torch.randn(n, d, generator=g)).to(DEV).requires_grad_()
    w = (torch.randn(v, d, generator=g) * 0.02 * 3).to(DEV).requires_grad_()
    t = torch.randint(0, v, (n,), generator=g).to(DEV)
    t[::97] = -100  # some ignored targets, as packed fine-tuning data has
    amp = torch.autocast(DEV, dtype=torch.bfloat16)

    def grads(loss_fn):
        h.grad = w.grad = None
        with amp:
            loss = loss_fn()
        loss.backward()
        return loss.detach().float(), h.grad.float(), w.grad.float()

    # FP32 reference on the BF16-rounded inputs: what both paths approximate.
    hb, wb = h.detach().bfloat16().float().requires_grad_(), w.detach().bfloat16().float().requires_grad_()
    ref_loss = F.cross_entropy(hb @ wb.t(), t, ignore_index=-100)
    ref_loss.backward()
    ref = (ref_loss.detach(), hb.grad, wb.grad)

    def err(got):
        return [float((a - b).abs().max() / b.abs().max().clamp(min=1e-30)) for a, b in zip(got, ref)]

    def plain():
        return F.cross_entropy(F.linear(h, w).float(), t, ignore_index=-100)

    compiled = torch.compile(plain) if DEV == "cuda" else plain
    rows = []
    if args.copy_sweep:
        return copy_sweep(h, w, t, grads, err, args.json)

    def gemms():
        with torch.no_grad():
            lg = h.bfloat16() @ w.bfloat16().t()
            lg @ w.bfloat16()
            lg.t() @ h.bfloat16()
    floor = timed(gemms)
    rows.append({"path": "three GEMMs alone (floor)", "ms": floor})
    rows.append({"path": "compiled F.cross_entropy (peer)", "ms": timed(lambda: grads(compiled)), "err": err(grads(compiled))})
    # (tile, warps, programs per SM; 0: one program per row). A tile ≥ vocab keeps the row in registers.
    single = 1 << (v - 1).bit_length()
    configs = [(4096, 8, 0), (8192, 8, 0), (8192, 16, 1), (8192, 16, 2), (8192, 32, 1), (4096, 8, 4),
               (4096, 4, 8), (single, 16, 0), (single, 32, 0), (single, 32, 1)]
    for block, warps, programs in configs:
        kernels.BLOCK, kernels.WARPS, kernels.PROGRAMS = block, warps, programs

        def fused():
            return kernels.linear_cross_entropy(h, w, t)
        try:
            ms, e = timed(lambda: grads(fused)), err(grads(fused))
        except Exception as ex:  # noqa: BLE001 - a config that does not compile (registers, shared memory)
            log(f"block {block}, {warps} warps, {programs}/SM: {str(ex).splitlines()[0][:120]}")
            continue
        rows.append({"path": f"luca fused, tile {block}, {warps} warps, "
                             f"{f'{programs} programs/SM' if programs else 'a program per row'}",
                     "ms": ms, "err": e, "config": [block, warps, programs]})
    if DEV != "cuda" or fp8_head.supported(torch.device(DEV)):
        fp8_rows(rows, h, w, t, grads, err)
    peer = rows[1]["ms"]
    best = min((r for r in rows if "config" in r), key=lambda r: r["ms"])
    print(f"\nhead + cross-entropy, forward and backward: {n} tokens × {v} vocab × {d} wide, BF16, "
          f"{torch.cuda.get_device_name() if DEV == 'cuda' else 'CPU (smoke)'}\n")
    print("| path | ms | vs peer | above GEMM floor, ms | rel. err loss / dh / dW |")
    print("|---|---:|---:|---:|---|")
    for r in rows:
        e = " / ".join(f"{x:.1e}" for x in r["err"]) if "err" in r else ""
        print(f"| {r['path']} | {r['ms']:.3f} | {peer / r['ms']:.2f}× | {r['ms'] - floor:.3f} | {e} |")
    print(f"\nbest: {','.join(map(str, best['config']))}  (tile, warps, programs per SM); torch.mm out_dtype: "
          f"{kernels.MM_OUT_DTYPE and DEV == 'cuda'}")
    f8 = [r for r in rows if "fp8" in r]
    if f8:
        b8 = min(f8, key=lambda r: r["ms"])
        print(f"best FP8: {','.join(map(str, b8['fp8']))}  (rows, tile, warps; fast-accumulating backward)")
    if args.json:
        Path(args.json).write_text(json.dumps({"device": torch.cuda.get_device_name() if DEV == "cuda" else "cpu",
                                               "shape": [n, v, d], "rows": rows}, indent=1))


def fp8_rows(rows: list, h, w, t, grads, err) -> None:
    """The FP8 head (luca/fp8_head.py): its three GEMMs alone, then the whole head with the weight's
    e4m3 copies made once (as training makes them once per step) for several kernel tiles."""
    with torch.no_grad():
        wq = fp8_head.FP8Weight.of(w)
        h8, sh = fp8_head.to_e4m3(h)
        g8 = torch.zeros(h.shape[0], w.shape[0], device=h.device).to(torch.float8_e5m2)
        gt8, ht8 = g8.t().contiguous(), h8.t().contiguous()

    def gemms8(fast_bwd: bool):
        mm = fp8_head._mm
        mm(h8, wq.w8.t(), sh, wq.scale, torch.bfloat16, True)
        mm(g8, wq.wt8.t(), sh, wq.scale, torch.bfloat16, fast_bwd)
        mm(gt8, ht8.t(), sh, sh, torch.float32, fast_bwd)
    for fast in (False, True):
        rows.append({"path": f"three FP8 GEMMs alone{', fast accumulation' if fast else ''}",
                     "ms": timed(lambda: gemms8(fast))})
    configs = [(32, 256, 8), (32, 512, 8), (16, 512, 8), (32, 128, 4), (64, 256, 8), (16, 256, 4), (32, 256, 4)]
    if DEV != "cuda":
        configs = configs[:1]
    default = fp8_head.FP8_BM, fp8_head.FP8_BLOCK, fp8_head.FP8_WARPS
    for cfg in configs + [configs[0] + (True,)]:
        bm, block, warps = cfg[:3]
        fp8_head.FP8_BM, fp8_head.FP8_BLOCK, fp8_head.FP8_WARPS = bm, block, warps
        fp8_head.FAST_ACCUM_BACKWARD = len(cfg) > 3

        def head8():
            return fp8_head.linear_cross_entropy_fp8(h, w, t, cached=wq)
        try:
            ms, e = timed(lambda: grads(head8)), err(grads(head8))
        except Exception as ex:  # noqa: BLE001 - a config that does not compile
            log(f"FP8 {cfg}: {str(ex).splitlines()[0][:120]}")
            continue
        rows.append({"path": f"luca FP8 head, {bm} rows × {block}, {warps} warps"
                             f"{', fast-accumulating backward' if len(cfg) > 3 else ''}",
                     "ms": ms, "err": e, "fp8": list(cfg[:3]) + [len(cfg) > 3]})
    fp8_head.FP8_BM, fp8_head.FP8_BLOCK, fp8_head.FP8_WARPS = default
    fp8_head.FAST_ACCUM_BACKWARD = False
    # How the kernel encodes e5m2 and where the transposed layout comes from (fp8_head.FP8_ENCODE /
    # FP8_TRANSPOSE): the whole head, and the cross-entropy kernel alone on the same logits.
    with torch.no_grad():
        logits = fp8_head._mm(h8, wq.w8.t(), sh, wq.scale, torch.bfloat16, True)
    chosen = fp8_head.FP8_ENCODE, fp8_head.FP8_TRANSPOSE
    # Written row-major alone, a program's rows can be few enough that its second pass over them still
    # finds them in L2 (as the BF16 kernel's one row per program does); 32 rows × 50,304 do not fit.
    tiles = [default] + ([(1, 4096, 8), (2, 2048, 8), (4, 1024, 4)] if DEV == "cuda" else [(2, 256, 4)])
    for enc, trans, tile in [(e, "kernel", default) for e in ("bits", "half")] + \
            [(e, "copy", tl_) for e in ("bits", "half") for tl_ in tiles]:
        fp8_head.FP8_ENCODE, fp8_head.FP8_TRANSPOSE = enc, trans
        fp8_head.FP8_BM, fp8_head.FP8_BLOCK, fp8_head.FP8_WARPS = tile

        def head8():
            return fp8_head.linear_cross_entropy_fp8(h, w, t, cached=wq)
        ms, e = timed(lambda: grads(head8)), err(grads(head8))
        kernel_ms = timed(lambda: fp8_head.cross_entropy_fp8(logits, t))
        rows.append({"path": f"luca FP8 head, e5m2 by {enc}, transposed by {trans}, {tile[0]} rows × "
                             f"{tile[1]}, {tile[2]} warps (its kernel alone {kernel_ms:.3f} ms)",
                     "ms": ms, "err": e, "fp8_encode": [enc, trans, *tile], "kernel_ms": kernel_ms})
    fp8_head.FP8_ENCODE, fp8_head.FP8_TRANSPOSE = chosen
    fp8_head.FP8_BM, fp8_head.FP8_BLOCK, fp8_head.FP8_WARPS = default


def copy_sweep(h, w, t, grads, err, out: str) -> None:
    """FP8_TRANSPOSE = "copy" alone: each (rows, tile, warps) of the cross-entropy kernel with each
    (token rows, vocabulary columns, warps) of the transposing kernel; the whole head, both kernels
    together, and the transpose alone (bytes e5m2 by bits: what training would run)."""
    with torch.no_grad():
        wq = fp8_head.FP8Weight.of(w)
        h8, sh = fp8_head.to_e4m3(h)
        logits = fp8_head._mm(h8, wq.w8.t(), sh, wq.scale, torch.bfloat16, True)
    chosen = (fp8_head.FP8_ENCODE, fp8_head.FP8_TRANSPOSE, fp8_head.FP8_BM, fp8_head.FP8_BLOCK,
              fp8_head.FP8_WARPS, fp8_head.T_TILE)
    cuda = DEV == "cuda"
    kernel_tiles = [(1, 4096, 8), (1, 8192, 16), (1, 2048, 4), (1, 4096, 4), (2, 2048, 8), (2, 4096, 8)] \
        if cuda else [(2, 256, 4)]
    t_tiles = [(64, 64, 4), (128, 128, 8), (128, 64, 4), (64, 128, 4), (256, 64, 8)] if cuda else [(16, 32, 4)]
    fp8_head.FP8_ENCODE, fp8_head.FP8_TRANSPOSE = "bits", "copy"
    g8 = torch.empty(logits.shape, dtype=torch.uint8, device=logits.device)
    gt8 = torch.empty(logits.shape[::-1], dtype=torch.uint8, device=logits.device)
    rows = []
    for tile in kernel_tiles:
        for tt in t_tiles[:1] if tile != kernel_tiles[0] else t_tiles:
            fp8_head.FP8_BM, fp8_head.FP8_BLOCK, fp8_head.FP8_WARPS = tile
            fp8_head.T_TILE = tt

            def transpose():
                fp8_head.transpose_bytes(g8, gt8, tt)

            def head8():
                return fp8_head.linear_cross_entropy_fp8(h, w, t, cached=wq)
            try:
                ms, e = timed(lambda: grads(head8)), err(grads(head8))
                kernels_ms = timed(lambda: fp8_head.cross_entropy_fp8(logits, t))
                t_ms = timed(transpose)
            except Exception as ex:  # noqa: BLE001 - a tile that does not compile
                log(f"copy {tile} {tt}: {str(ex).splitlines()[0][:120]}")
                continue
            rows.append({"kernel": list(tile), "transpose": list(tt), "ms": ms, "kernels_ms": kernels_ms,
                         "transpose_ms": t_ms, "err": e})
    (fp8_head.FP8_ENCODE, fp8_head.FP8_TRANSPOSE, fp8_head.FP8_BM, fp8_head.FP8_BLOCK, fp8_head.FP8_WARPS,
     fp8_head.T_TILE) = chosen
    print(f"\nFP8 head, e5m2 by bits, transposed by copy: {h.shape[0]} tokens × {w.shape[0]} vocab, "
          f"{torch.cuda.get_device_name() if cuda else 'CPU (smoke)'}\n")
    print("| kernel rows × tile, warps | transpose tile, warps | head ms | both kernels ms | transpose ms | "
          "rel. err loss / dh / dW |")
    print("|---|---|---:|---:|---:|---|")
    for r in rows:
        k, tt = r["kernel"], r["transpose"]
        print(f"| {k[0]} × {k[1]}, {k[2]} | {tt[0]} × {tt[1]}, {tt[2]} | {r['ms']:.3f} | {r['kernels_ms']:.3f} | "
              f"{r['transpose_ms']:.3f} | {' / '.join(f'{x:.1e}' for x in r['err'])} |")
    if rows:
        b = min(rows, key=lambda r: r["kernels_ms"])
        print(f"\nbest (both kernels): {b['kernel']} {b['transpose']}")
    if out:
        Path(out).write_text(json.dumps({"device": torch.cuda.get_device_name() if cuda else "cpu",
                                         "copy_sweep": rows}, indent=1))


if __name__ == "__main__":
    main()
