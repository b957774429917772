"""Why training with the FP8 head (train.fp8_head) went non-finite on an H200: a diagnostic, not a benchmark.

Session 12: the 20M model of check_gpu_train gave NaN gradient norms from the first step with
fp8_head = true. The transposed gradient gt8 held non-finite entries on real data, although a kernel
check on random logits (from torch.randn) found every entry written. Session 13 found the cause in
triton-lang/triton#11111: when a float8 conversion feeds both a row-major and a transposed store,
ptxas 12.9 (which Triton uses on Hopper) corrupts the transposed store with bytes the kernel never
wrote; 8-bit integer stores are clean. luca/fp8_head.py now encodes e5m2 with integer arithmetic
and stores bytes.

This runs session 12's kernel (the float8 conversion, kept below) and the shipped one on the same
logits, each made by an FP8 GEMM as in training (h @ wᵀ with torch._scaled_mm) and each into
NaN-prefilled outputs, and counts per layout the non-finite entries and those that differ from
the other layout, for each of the shipped kernel's ways (FP8_ENCODE / FP8_TRANSPOSE). Then it counts
the g8 (row-major) bytes where each differs from session 12's kernel ("half" rounds twice: a few),
and the bytes where the activations' e4m3 copies from luca's kernels (quantize_rows) differ from torch's.
`python3 benchmarks/debug_fp8_head.py` (under a minute on an H200)."""
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import torch
import triton
import triton.language as tl

from luca import fp8_head


@triton.jit
def session12_kernel(logits, stride, targets, losses, g8, gt8, N, V, G: tl.constexpr,
                     BM: tl.constexpr, BLOCK: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * BM + tl.arange(0, BM)
    rmask = rows < N
    cols = tl.arange(0, BLOCK)
    t = tl.load(targets + rows, mask=rmask, other=-100)
    valid = t != -100
    t = tl.where(valid, t, 0)
    base = logits + rows[:, None] * stride
    m = tl.full([BM], float("-inf"), tl.float32)
    s = tl.zeros([BM], tl.float32)
    for off in range(0, V, BLOCK):
        c = off + cols
        mask = rmask[:, None] & (c < V)[None, :]
        x = tl.load(base + c[None, :], mask=mask, other=float("-inf")).to(tl.float32)
        m_new = tl.maximum(m, tl.max(x, axis=1))
        s = s * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new[:, None]), axis=1)
        m = m_new
    lse = m + tl.log(s)
    picked = tl.load(logits + rows * stride + t, mask=rmask, other=0.0).to(tl.float32)
    tl.store(losses + rows, tl.where(valid, lse - picked, 0.0), mask=rmask)
    keep = valid.to(tl.float32) * G
    for off in range(0, V, BLOCK):
        c = off + cols
        mask = rmask[:, None] & (c < V)[None, :]
        x = tl.load(base + c[None, :], mask=mask, other=0.0).to(tl.float32)
        g = tl.exp(x - lse[:, None])
        g = tl.where(c[None, :] == t[:, None], g - 1.0, g) * keep[:, None]
        b = g.to(tl.int32, bitcast=True)
        b = (b + 0xFFFFF + ((b >> 21) & 1)) & -0x200000
        g = b.to(tl.float32, bitcast=True)
        tl.store(g8 + rows[:, None] * V + c[None, :], g.to(g8.dtype.element_ty), mask=mask)
        tl.store(gt8 + c[:, None].to(tl.int64) * N + rows[None, :], tl.trans(g).to(gt8.dtype.element_ty),
                 mask=(c < V)[:, None] & rmask[None, :])


def main() -> None:
    dev = torch.device("cuda")
    res = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__}
    rows = []
    for n, v, d in ((8192, 4096, 512), (12288, 50304, 768)):
        torch.manual_seed(0)
        h = torch.randn(n, d, device=dev).bfloat16()
        w = (torch.randn(v, d, device=dev) * d ** -0.5).bfloat16()
        t = torch.randint(0, v, (n,), device=dev)
        wq = fp8_head.FP8Weight.of(w)
        h8, sh = fp8_head.to_e4m3(h)
        outs = {}
        kinds = ["session 12 (float8 conversion)"] + [f"shipped, {e} / {tr}" for e in ("bits", "half")
                                                      for tr in ("kernel", "copy")]
        for name in kinds:
            torch.cuda.synchronize()
            g8 = torch.full((n, v), float("nan"), device=dev).to(torch.float8_e5m2)
            gt8 = torch.full((v, n), float("nan"), device=dev).to(torch.float8_e5m2)
            logits = fp8_head._mm(h8, wq.w8.t(), sh, wq.scale, torch.bfloat16, True)  # right before, as in training
            if name.startswith("session"):
                losses = torch.empty(n, device=dev)
                session12_kernel[(-(-n // fp8_head.FP8_BM),)](
                    logits, logits.stride(0), t, losses, g8, gt8, n, v, G=fp8_head.G_SCALE, BM=fp8_head.FP8_BM,
                    BLOCK=fp8_head.FP8_BLOCK, num_warps=fp8_head.FP8_WARPS)
            else:  # luca/fp8_head.py's FP8_ENCODE / FP8_TRANSPOSE
                fp8_head.FP8_ENCODE, fp8_head.FP8_TRANSPOSE = name.split(", ")[1].split(" / ")
                fp8_head.cross_entropy_fp8(logits, t, (g8, gt8))
                fp8_head.FP8_ENCODE, fp8_head.FP8_TRANSPOSE = "bits", "kernel"
            torch.cuda.synchronize()
            a, b = g8.view(torch.uint8), gt8.view(torch.uint8)
            outs[name] = a
            rows.append({"shape": f"{n}x{v}", "kernel": name,
                         "g8 non-finite": int((~g8.float().isfinite()).sum()),
                         "gt8 non-finite": int((~gt8.float().isfinite()).sum()),
                         "gt8 bytes differing from g8": int((a.t() != b).sum())})
            print(json.dumps(rows[-1]), flush=True)
        # The activations' e4m3 copies from luca's kernels (fp8_head.quantize_rows, session 14) against
        # torch's conversion, right after an FP8 GEMM too; a few huge rows put most entries in subnormals.
        for scaled in (False, True):
            x = h.clone()
            if scaled:
                x[:4] *= 1e4
            fp8_head._mm(h8, wq.w8.t(), sh, wq.scale, torch.bfloat16, True)
            x8, xt8, s8 = fp8_head.quantize_rows(x)
            ref8, ref_s = fp8_head.to_e4m3(x)
            torch.cuda.synchronize()
            r = ref8.view(torch.uint8)
            res[f"quantize_rows vs to_e4m3, {n}x{d}{', 4 rows x1e4' if scaled else ''}: bytes differing "
                f"(x8, x8ᵀ), scale equal"] = [int((x8.view(torch.uint8) != r).sum()),
                                              int((xt8.view(torch.uint8) != r.t()).sum()), bool(torch.equal(s8, ref_s))]
        first = outs[kinds[0]]
        for name in kinds[1:]:
            res[f"g8 bytes differing from session 12's, {name}, {n}x{v}"] = int((outs[name] != first).sum())
    res["rows"] = rows
    print(json.dumps({k: v for k, v in res.items() if k != "rows"}))
    print("\n| shape | kernel | g8 non-finite | gt8 non-finite | gt8 ≠ g8ᵀ (bytes) |\n|---|---|---:|---:|---:|")
    for r in rows:
        print(f"| {r['shape']} | {r['kernel']} | {r['g8 non-finite']} | {r['gt8 non-finite']} | "
              f"{r['gt8 bytes differing from g8']} |")


if __name__ == "__main__":
    main()
