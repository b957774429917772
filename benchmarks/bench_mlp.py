"""The SwiGLU MLP's activation fused into its GEMMs (Triton) against cuBLAS GEMMs and separate
activation kernels, one layer at the GPT-2-small shape (12,288 tokens, d 768, F 2048): an
experiment for issue #7, not a luca code path.

What is notable:
- Unfused, SwiGLU's forward re-reads the (tokens × 2F) gate/up output that the GEMM just wrote,
  and its backward reads d h, which the GEMM before it wrote: 2 × 100 MB a layer and micro-batch.
  Here the gate/up GEMM writes silu(gate) · up beside gate and up (each tile holds both halves'
  accumulators), and the d h GEMM (d y · W_down) writes d gate and d up instead of d h, with the
  unfused path's roundings (gate, up and d h rounded to BF16, the activation in FP32 from them).
- The peers are what training runs: cuBLAS's GEMM and the compiler's SwiGLU kernel (forward),
  cuBLAS and luca's `swiglu_backward` (backward).
- Each fused kernel is swept over tile shapes, stages and warps; with tensor descriptors (TMA)
  one program per tile, or a persistent grid (1 or 2 programs per SM, loop flattened), with and
  without Triton's warp specialisation. Errors are against the unfused outputs.
- Session 11, H200, Triton 3.6 (benchmarks/results/bench_mlp_h200_s11*.json): the fused kernels
  were no faster than the unfused pair (best 0.149 against 0.145 ms a layer forward, 0.126
  against 0.122 backward): Triton's GEMM alone ran ~25% below cuBLAS at this K = 768, and
  `warp_specialize` changed nothing on Hopper. Kept to measure again with a newer Triton.
- Times are CUDA-event times of a CUDA graph of 20 calls, median of 5 replays (bench_wgrad's way).
- With `TRITON_INTERPRET=1` the kernels run on CPU tensors; the interpreter's dot mishandles
  BF16, so there the operands go through FP32 (`F32DOT`).

Run: `python3 benchmarks/bench_mlp.py [--out results.json]` (CUDA only; ~1 minute).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench_wgrad import timed  # noqa: E402

from luca import kernels  # noqa: E402

_KERNEL: dict = {}
GROUP_M = 8


def _kernels() -> dict:
    if _KERNEL:
        return _KERNEL
    import triton
    import triton.language as tl

    @triton.jit
    def gate_up_swiglu(x, s_x, w, s_w, gu, s_gu, h, s_h, M, F, K,
                       BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP: tl.constexpr,
                       F32DOT: tl.constexpr, TMA: tl.constexpr, FLAT: tl.constexpr, WS: tl.constexpr):
        """gu = x Wᵀ (W = [W_gate; W_up], (2F, K)) and h = silu(gate) · up, (BM, BN) tiles of h, the
        programs striding over them (a persistent grid when there are fewer programs than tiles)."""
        n_m, n_n = tl.cdiv(M, BM), tl.cdiv(F, BN)
        rk = tl.arange(0, BK)
        for t in tl.range(tl.program_id(0), n_m * n_n, tl.num_programs(0), flatten=FLAT, warp_specialize=WS):
            first = (t // (GROUP * n_n)) * GROUP  # GROUP row blocks at a time: the weight stays in L2
            size = tl.minimum(n_m - first, GROUP)
            pm, pn = first + (t % (GROUP * n_n)) % size, (t % (GROUP * n_n)) // size
            rm = (pm * BM + tl.arange(0, BM)).to(tl.int64)
            rn = pn * BN + tl.arange(0, BN)
            acc_g = tl.zeros((BM, BN), tl.float32)
            acc_u = tl.zeros((BM, BN), tl.float32)
            for k in range(0, K, BK):
                if TMA:  # tensor descriptors: the copy engine, out-of-bounds rows read as zeros
                    a = x.load([pm * BM, k])
                    bg = w.load([pn * BN, k]).T
                    bu = w.load([F + pn * BN, k]).T
                else:
                    km = (k + rk) < K
                    a = tl.load(x + rm[:, None] * s_x + (k + rk)[None, :], mask=(rm[:, None] < M) & km[None, :], other=0.0)
                    pg = w + rn[None, :].to(tl.int64) * s_w + (k + rk)[:, None]  # (BK, BN): W_gateᵀ's tile
                    bg = tl.load(pg, mask=km[:, None], other=0.0)
                    bu = tl.load(pg + F * s_w, mask=km[:, None], other=0.0)
                if F32DOT:
                    a, bg, bu = a.to(tl.float32), bg.to(tl.float32), bu.to(tl.float32)
                acc_g = tl.dot(a, bg, acc_g)
                acc_u = tl.dot(a, bu, acc_u)
            g = acc_g.to(tl.bfloat16)
            u = acc_u.to(tl.bfloat16)
            gf = g.to(tl.float32)
            hv = (gf * tl.sigmoid(gf) * u.to(tl.float32)).to(tl.bfloat16)
            if TMA:
                gu.store([pm * BM, pn * BN], g)
                gu.store([pm * BM, F + pn * BN], u)
                h.store([pm * BM, pn * BN], hv)
            else:
                mask = (rm < M)[:, None]
                po = gu + rm[:, None] * s_gu + rn[None, :]
                tl.store(po, g, mask=mask)
                tl.store(po + F, u, mask=mask)
                tl.store(h + rm[:, None] * s_h + rn[None, :], hv, mask=mask)

    @triton.jit
    def down_dgrad_swiglu(dy, s_dy, w, s_w, gu, s_gu, dgu, s_dgu, M, F, D,
                          BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP: tl.constexpr,
                          F32DOT: tl.constexpr, TMA: tl.constexpr, FLAT: tl.constexpr, WS: tl.constexpr):
        """d h = d y · W_down (W_down: (D, F)), rounded as a GEMM's output, then d gate and d up of
        silu(gate) · up from gu, (BM, BN) tiles of d h (programs striding as gate_up_swiglu's)."""
        n_m, n_n = tl.cdiv(M, BM), tl.cdiv(F, BN)
        rk = tl.arange(0, BK)
        for t in tl.range(tl.program_id(0), n_m * n_n, tl.num_programs(0), flatten=FLAT, warp_specialize=WS):
            first = (t // (GROUP * n_n)) * GROUP
            size = tl.minimum(n_m - first, GROUP)
            pm, pn = first + (t % (GROUP * n_n)) % size, (t % (GROUP * n_n)) // size
            rm = (pm * BM + tl.arange(0, BM)).to(tl.int64)
            rn = pn * BN + tl.arange(0, BN)
            acc = tl.zeros((BM, BN), tl.float32)
            for k in range(0, D, BK):
                if TMA:
                    a = dy.load([pm * BM, k])
                    b = w.load([k, pn * BN])
                else:
                    km = (k + rk) < D
                    a = tl.load(dy + rm[:, None] * s_dy + (k + rk)[None, :], mask=(rm[:, None] < M) & km[None, :], other=0.0)
                    b = tl.load(w + (k + rk)[:, None].to(tl.int64) * s_w + rn[None, :], mask=km[:, None], other=0.0)
                if F32DOT:
                    a, b = a.to(tl.float32), b.to(tl.float32)
                acc = tl.dot(a, b, acc)
            d = acc.to(tl.bfloat16).to(tl.float32)
            if TMA:
                g = gu.load([pm * BM, pn * BN]).to(tl.float32)
                u = gu.load([pm * BM, F + pn * BN]).to(tl.float32)
            else:
                mask = (rm < M)[:, None]
                pg = gu + rm[:, None] * s_gu + rn[None, :]
                g = tl.load(pg, mask=mask).to(tl.float32)
                u = tl.load(pg + F, mask=mask).to(tl.float32)
            sig = tl.sigmoid(g)
            dg = (d * u * sig * (1.0 + g * (1.0 - sig))).to(tl.bfloat16)
            du = (d * g * sig).to(tl.bfloat16)
            if TMA:
                dgu.store([pm * BM, pn * BN], dg)
                dgu.store([pm * BM, F + pn * BN], du)
            else:
                po = dgu + rm[:, None] * s_dgu + rn[None, :]
                tl.store(po, dg, mask=mask)
                tl.store(po + F, du, mask=mask)

    _KERNEL.update(fwd=gate_up_swiglu, bwd=down_dgrad_swiglu)
    return _KERNEL


def _rows(t: torch.Tensor) -> torch.Tensor:
    t = t.reshape(-1, t.shape[-1])
    return t if t.stride(-1) == 1 else t.contiguous()


def _desc(t: torch.Tensor, block: list[int]):
    from triton.tools.tensor_descriptor import TensorDescriptor
    return TensorDescriptor.from_tensor(t, block)


def _grid(t: torch.Tensor, M: int, BM: int, n_n: int, persist: int) -> tuple[int]:
    """One program per tile, or `persist` programs per multiprocessor (the interpreter: in all)
    striding over the tiles."""
    tiles = -(-M // BM) * n_n
    if persist:
        sms = torch.cuda.get_device_properties(t.device).multi_processor_count if t.is_cuda else 1
        return (min(tiles, persist * sms),)
    return (tiles,)


def gate_up_swiglu(x: torch.Tensor, w: torch.Tensor, cfg: tuple, tma: bool, persist: int,
                   ws: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(gu, h): gu = x @ w.T with w = [W_gate; W_up] (2F, K), and h = silu(gate) · up, both in x's
    dtype, shaped like x with last dims 2F and F."""
    BM, BN, BK, stages, warps = cfg
    x2 = _rows(x)
    M, K = x2.shape
    F = w.shape[0] // 2
    gu = torch.empty(M, 2 * F, device=x.device, dtype=x.dtype)
    h = torch.empty(M, F, device=x.device, dtype=x.dtype)
    if M:
        args = ((_desc(x2, [BM, BK]), _desc(w, [BN, BK]), _desc(gu, [BM, BN]), _desc(h, [BM, BN])) if tma
                else (x2, w, gu, h))
        _kernels()["fwd"][_grid(x, M, BM, F // BN, persist)](
            args[0], x2.stride(0), args[1], w.stride(0), args[2], gu.stride(0), args[3], h.stride(0), M, F, K,
            BM=BM, BN=BN, BK=BK, GROUP=GROUP_M, F32DOT=not x.is_cuda, TMA=tma, FLAT=persist > 0, WS=ws,
            num_stages=stages, num_warps=warps)
    return gu.view(*x.shape[:-1], 2 * F), h.view(*x.shape[:-1], F)


def down_dgrad_swiglu(dy: torch.Tensor, w: torch.Tensor, gu: torch.Tensor, cfg: tuple, tma: bool, persist: int,
                      ws: bool = False) -> torch.Tensor:
    """d gu of silu(gate) · up, from d y (…, D), the down projection's weight w (D, F) and gu (…, 2F)."""
    BM, BN, BK, stages, warps = cfg
    dy2, gu2 = _rows(dy), _rows(gu)
    M, D = dy2.shape
    F = w.shape[1]
    dgu = torch.empty(M, 2 * F, device=dy.device, dtype=gu.dtype)
    if M:
        args = ((_desc(dy2, [BM, BK]), _desc(w, [BK, BN]), _desc(gu2, [BM, BN]), _desc(dgu, [BM, BN])) if tma
                else (dy2, w, gu2, dgu))
        _kernels()["bwd"][_grid(dy, M, BM, F // BN, persist)](
            args[0], dy2.stride(0), args[1], w.stride(0), args[2], gu2.stride(0), args[3], dgu.stride(0),
            M, F, D, BM=BM, BN=BN, BK=BK, GROUP=GROUP_M, F32DOT=not dy.is_cuda, TMA=tma, FLAT=persist > 0, WS=ws,
            num_stages=stages, num_warps=warps)
    return dgu.view(gu.shape)


TOKENS, LAYERS, D, FF = 12 * 1024, 12, 768, 2048
FWD = [(128, 64, 64, 3, 8), (128, 64, 64, 4, 8), (128, 128, 64, 3, 8), (128, 64, 64, 3, 4),
       (128, 128, 64, 2, 8), (64, 128, 64, 3, 4)]
BWD = [(128, 128, 64, 3, 8), (128, 128, 64, 4, 8), (64, 128, 64, 4, 4), (128, 64, 64, 3, 4),
       (128, 128, 64, 2, 8), (64, 256, 64, 3, 8), (128, 256, 64, 3, 8)]
MODES = [(True, 0, False), (True, 1, False), (True, 1, True), (True, 2, True)]  # (descriptors, programs per SM (0: one a tile), warp specialisation)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench_mlp.py needs CUDA")
    dev, bf = torch.device("cuda"), torch.bfloat16
    torch.manual_seed(0)
    x = torch.randn(TOKENS, D, device=dev, dtype=bf)
    w = (torch.randn(2 * FF, D, device=dev) / D ** 0.5).to(bf)
    dy = torch.randn(TOKENS, D, device=dev, dtype=bf)
    wd = (torch.randn(D, FF, device=dev) / FF ** 0.5).to(bf)
    act = torch.compile(lambda gu: torch.nn.functional.silu(gu[:, :FF]) * gu[:, FF:])
    rows = []

    def row(name, ms, flops, base, err=None, cfg=None):
        rows.append({"kernel": name, "ms_layer": ms, "ms_micro_batch": ms * LAYERS,
                     "gemm_tflops": flops / ms / 1e9, "vs_unfused": ms / base if base else None,
                     "err": err, "cfg": cfg})
        print(f"{name:44s} {ms:7.4f} ms  {flops / ms / 1e9:6.0f} TFLOP/s  {ms / base if base else 1:5.3f}"
              + (f"  err {err:.3g}" if err is not None else ""), file=sys.stderr, flush=True)

    # forward
    f_flops = 2 * TOKENS * D * 2 * FF
    gu_ref = x @ w.t()
    h_ref = act(gu_ref)
    t_mm = timed(lambda: x @ w.t())
    t_act = timed(lambda: act(gu_ref))
    base = t_mm + t_act
    row("fwd cuBLAS GEMM", t_mm, f_flops, base)
    row("fwd compiled SwiGLU", t_act, f_flops, base)
    row("fwd unfused (sum)", base, f_flops, base)
    best_f = None
    for tma, persist, ws in MODES:
        for cfg in FWD:
            try:
                gu, h = gate_up_swiglu(x, w, cfg, tma=tma, persist=persist, ws=ws)
                err = max((gu.float() - gu_ref.float()).abs().max().item(), (h.float() - h_ref.float()).abs().max().item())
                t = timed(lambda: gate_up_swiglu(x, w, cfg, tma=tma, persist=persist, ws=ws))
            except Exception as e:  # a config the compiler or the GPU refuses (shared memory)
                print(f"fwd {cfg} tma={tma} persist={persist} ws={ws}: {type(e).__name__}: {str(e)[:120]}", file=sys.stderr)
                continue
            row(f"fwd fused {'tma' if tma else 'ptr'} p{persist}{' ws' if ws else ''} {cfg}", t, f_flops, base, err, list(cfg) + [tma, persist, ws])
            if best_f is None or t < best_f[0]:
                best_f = (t, cfg, tma, persist, ws)
    # backward
    b_flops = 2 * TOKENS * D * FF
    dh_ref = dy @ wd
    dgu_ref = kernels.swiglu_backward(gu_ref, dh_ref)
    t_mm = timed(lambda: dy @ wd)
    t_act = timed(lambda: kernels.swiglu_backward(gu_ref, dh_ref))
    base_b = t_mm + t_act
    row("bwd cuBLAS GEMM", t_mm, b_flops, base_b)
    row("bwd luca swiglu_backward", t_act, b_flops, base_b)
    row("bwd unfused (sum)", base_b, b_flops, base_b)
    best_b = None
    for tma, persist, ws in MODES:
        for cfg in BWD:
            try:
                dgu = down_dgrad_swiglu(dy, wd, gu_ref, cfg, tma=tma, persist=persist, ws=ws)
                err = (dgu.float() - dgu_ref.float()).abs().max().item()
                t = timed(lambda: down_dgrad_swiglu(dy, wd, gu_ref, cfg, tma=tma, persist=persist, ws=ws))
            except Exception as e:
                print(f"bwd {cfg} tma={tma} persist={persist} ws={ws}: {type(e).__name__}: {str(e)[:120]}", file=sys.stderr)
                continue
            row(f"bwd fused {'tma' if tma else 'ptr'} p{persist}{' ws' if ws else ''} {cfg}", t, b_flops, base_b, err, list(cfg) + [tma, persist, ws])
            if best_b is None or t < best_b[0]:
                best_b = (t, cfg, tma, persist, ws)
    out = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": rows,
           "best_fwd": best_f and list(best_f), "best_bwd": best_b and list(best_b),
           "saved_ms_per_micro_batch": LAYERS * ((base - best_f[0] if best_f else 0) + (base_b - best_b[0] if best_b else 0))}
    if args.out:
        Path(args.out).write_text(json.dumps(out, indent=1))
    print("| kernel | ms/layer | ms/micro-batch | GEMM TFLOP/s | vs unfused |")
    print("|---|---:|---:|---:|---:|")
    for r in rows:
        if r["cfg"] is None or r["cfg"] in ([*best_f[1], *best_f[2:]] if best_f else None,
                                            [*best_b[1], *best_b[2:]] if best_b else None):
            print(f"| {r['kernel']} | {r['ms_layer']:.4f} | {r['ms_micro_batch']:.3f} | {r['gemm_tflops']:.0f} | "
                  f"{r['vs_unfused']:.3f} |")
    print(f"saved per micro-batch (12 layers, best configs): {out['saved_ms_per_micro_batch']:.3f} ms")


if __name__ == "__main__":
    main()
