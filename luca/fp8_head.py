"""The language-model head's training GEMMs in FP8 (`train.fp8_head`), with its cross-entropy kernel.

What is notable:
- At the GPT-2-small shape the head is a third of a step's GEMM work (three GEMMs of 12,288 ×
  50,304 × 768 a micro-batch). Hopper and Ada run FP8 GEMMs at about twice the BF16 rate, so the
  head's logits, d h and d W all run as `torch._scaled_mm` with per-tensor scales, as the NanoGPT
  speedrun's record runs do for their head. The trunk stays BF16.
- Operands: h and the weight in e4m3, each scaled by its own absolute maximum (h per micro-batch;
  the weight once per optimizer step when the weights are cached, `Transformer.cache_weights`).
  h's copies, row-major for the logits and transposed for d W, come from three small Triton
  kernels (`quantize_rows`: 30 µs a micro-batch at nano-n2's shape against ~160 µs of eager ops).
- The gradient of the logits, softmax − one-hot, lies in [−1, 1], so it needs no measured scale:
  the kernel writes it times 2¹⁵ in e5m2 (largest 57,344; the smallest step below 1 it keeps is
  2⁻³¹), and the mean's 1 / count and the upstream gradient ride in the GEMMs' scale instead.
- FP8 GEMMs on these chips take both operands K-major, so d h wants the gradient row-major and
  d W wants it transposed. The kernel works on tiles of FP8_BM rows and writes both layouts from
  registers: one byte each, as many bytes as the BF16 kernel's one gradient (luca/kernels.py),
  and no transpose pass.
- The logits come out of the GEMM in BF16 and the softmax is computed in FP32, as in the BF16 head.
- The gradient is encoded as e5m2 with integer arithmetic and stored as bytes: with a float8
  conversion feeding both stores, ptxas 12.9 (Triton's on Hopper) wrote foreign bytes into the
  transposed one after an FP8 GEMM had run (triton-lang/triton#11111), which made training
  non-finite in session 12 (benchmarks/debug_fp8_head.py reproduces it).
- Measured (session 13, H200): nano-n2's shape 1.495–1.504× the transformers peer against 1.41×
  with the BF16 head (benchmarks/bench_train.py); a 20M tied model's val BPB +0.10% against the BF16
  head over 4 seeds, single pass over its data (benchmarks/fp8_head_quality.py). The nano-n2
  preset turns it on; `train.fp8_head` is off otherwise.
- CPUs run the same code (torch's CPU `_scaled_mm`, Triton's interpreter with `TRITON_INTERPRET=1`):
  that is how the tests check it.
"""
from __future__ import annotations

import torch

from luca.kernels import IGNORE, available

# Rows per program, columns per tile and warps of the cross-entropy kernel: the best of seven on an H200
# (benchmarks/bench_head.py, session 12: 3.89 ms for the whole head against 4.06 with 8 warps).
FP8_BM, FP8_BLOCK, FP8_WARPS = 32, 256, 4
G_SCALE = 2.0 ** 15  # the logits' gradient times this in e5m2 (module docstring)
E4M3_MAX = 448.0
FAST_ACCUM_BACKWARD = False  # the backward GEMMs sum over 12,288 tokens or 50,304 logits: full-precision accumulation
# How the kernel makes e5m2 bytes: "bits" rounds the FP32 bits with integer arithmetic; "half" converts
# to FP16 (e5m2 is FP16's top byte) and rounds that byte (fewer instructions; twice-rounded, so about
# 0.2% of entries take the other neighbour where the value lies within an FP16 step of a midpoint).
# And where the transposed layout comes from: "kernel" stores it from registers, "copy" has the kernel
# write the row-major one alone and a second kernel copies it transposed. Session 12's profile had
# the FP8 kernel at 1.48 ms a micro-batch against the BF16 kernel's 1.01 for as many bytes:
# benchmarks/bench_head.py times the four pairs. Session 14 (H200): alone, "copy" with one row a
# program saved 0.15 ms of the head's 4.1, but in the step it ran as long (1.08 + 0.37 ms for the
# transpose, against 1.47) and the step no faster (21.54 against 21.47 ms); "half" was no faster alone.
FP8_ENCODE, FP8_TRANSPOSE = "bits", "kernel"
T_TILE = 64, 64, 4  # the transposing kernel's tile for the gradient ("copy"): token rows, vocabulary columns, warps
H_TILE = 64, 64, 4  # and for the activations (quantize_rows): token rows, model columns, warps
_KERNEL: dict = {}


def supported(device: torch.device) -> bool:
    """FP8 GEMMs: a CUDA device of compute capability 8.9 or later (Ada, Hopper, Blackwell), or
    Triton's interpreter on a CPU."""
    if not available(device):
        return False
    return device.type != "cuda" or torch.cuda.get_device_capability(device) >= (8, 9)


def _kernel():
    if _KERNEL:
        return _KERNEL["ce"]
    import triton
    import triton.language as tl

    @triton.jit
    def ce_rows_fp8(logits, stride, targets, losses, g8, gt8, N, V, G: tl.constexpr,
                    BM: tl.constexpr, BLOCK: tl.constexpr, HALF: tl.constexpr, STORE_T: tl.constexpr):
        rows = tl.program_id(0).to(tl.int64) * BM + tl.arange(0, BM)
        rmask = rows < N
        cols = tl.arange(0, BLOCK)
        t = tl.load(targets + rows, mask=rmask, other=-100)
        valid = t != -100
        t = tl.where(valid, t, 0)
        base = logits + rows[:, None] * stride
        # Pass 1: each row's online log-sum-exp (rows past N stay NaN and are never stored).
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
        # Pass 2: (softmax − one-hot) · G in e5m2, row-major and transposed.
        keep = valid.to(tl.float32) * G
        for off in range(0, V, BLOCK):
            c = off + cols
            mask = rmask[:, None] & (c < V)[None, :]
            x = tl.load(base + c[None, :], mask=mask, other=0.0).to(tl.float32)
            g = tl.exp(x - lse[:, None])
            g = tl.where(c[None, :] == t[:, None], g - 1.0, g) * keep[:, None]
            # Encode e5m2 with integer arithmetic and store bytes: with a float8 conversion feeding both
            # stores, ptxas 12.9 (which Triton uses on Hopper) corrupts the transposed one with bytes
            # the kernel never wrote (triton-lang/triton#11111; int8 stores are clean), which made
            # training non-finite from the first step in session 12. Rounding is to nearest, ties to
            # even, on the FP32 bits (the carry runs into the exponent, as a conversion's does).
            if HALF:  # FP16 shares e5m2's exponent: round its low byte away (FP8_ENCODE)
                hb = g.to(tl.float16).to(tl.int16, bitcast=True).to(tl.int32) & 0xFFFF
                q = ((hb + 0x7F + ((hb >> 8) & 1)) >> 8).to(tl.uint8)
            else:
                b = g.to(tl.int32, bitcast=True)
                a = b & 0x7FFFFFFF
                normal = ((a + 0xFFFFF + ((a >> 21) & 1)) >> 21) - 448  # FP32 exponent 127 → e5m2's 15
                tiny = (tl.abs(g) * 65536.0 + 0.5).to(tl.int32)  # below 2⁻¹⁴: multiples of 2⁻¹⁶ (4 is 2⁻¹⁴)
                q = (tl.where(a < 0x38800000, tiny, normal) | ((b >> 24) & 0x80)).to(tl.uint8)
            tl.store(g8 + rows[:, None] * V + c[None, :], q, mask=mask)
            if STORE_T:
                tl.store(gt8 + c[:, None].to(tl.int64) * N + rows[None, :], tl.trans(q),
                         mask=(c < V)[:, None] & rmask[None, :])

    @triton.jit
    def transpose_bytes(src, dst, N, V, TN: tl.constexpr, TV: tl.constexpr):
        # (N, V) bytes into (V, N), a TN × TV tile a program (FP8_TRANSPOSE = "copy"): torch's strided
        # copy reads one side a byte at a time. Integer bytes through tl.trans are clean (#11111).
        r = tl.program_id(0).to(tl.int64) * TN + tl.arange(0, TN)
        c = tl.program_id(1).to(tl.int64) * TV + tl.arange(0, TV)
        x = tl.load(src + r[:, None] * V + c[None, :], mask=(r < N)[:, None] & (c < V)[None, :])
        tl.store(dst + c[:, None] * N + r[None, :], tl.trans(x), mask=(c < V)[:, None] & (r < N)[None, :])

    @triton.jit
    def absmax_parts(x, parts, numel, BLOCK: tl.constexpr):
        # Each program's largest |x| (NaN counts as infinite, so a NaN input makes the scale infinite and
        # the logits non-finite: the step is then skipped, as with the BF16 head).
        i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        v = tl.load(x + i, mask=i < numel, other=0.0).to(tl.float32)
        a = tl.where(v == v, tl.abs(v), float("inf"))
        tl.store(parts + tl.program_id(0), tl.max(a, axis=0))

    @triton.jit
    def quantize_e4m3(x, parts, n_parts, scale, q8, numel, BLOCK: tl.constexpr, PARTS: tl.constexpr):
        # x / s in e4m3 bytes, s = max |x| / 448 from absmax_parts' partial maxima (each program reduces
        # them itself: a few KB from L2 against a third launch). Integer encoding as in ce_rows_fp8,
        # to nearest, ties to even; true division, so the bytes equal torch's (x.float() / s).to(e4m3).
        p = tl.load(parts + tl.arange(0, PARTS), mask=tl.arange(0, PARTS) < n_parts, other=0.0)
        s = tl.maximum(tl.math.div_rn(tl.max(p, axis=0), 448.0), 1e-30)
        if tl.program_id(0) == 0:
            tl.store(scale, s)
        i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        y = tl.math.div_rn(tl.load(x + i, mask=i < numel, other=0.0).to(tl.float32), s)
        b = y.to(tl.int32, bitcast=True)
        a = b & 0x7FFFFFFF
        normal = ((a + 0x7FFFF + ((a >> 20) & 1)) >> 20) - 960  # FP32 exponent 127 → e4m3's 7
        m = tl.abs(y) * 512.0  # below 2⁻⁶: multiples of 2⁻⁹ (8 is 2⁻⁶), exact in FP32
        f = m.to(tl.int32)
        rest = m - f.to(tl.float32)
        tiny = f + ((rest > 0.5) | ((rest == 0.5) & ((f & 1) == 1))).to(tl.int32)
        q = (tl.where(a < 0x3C800000, tiny, normal) | ((b >> 24) & 0x80)).to(tl.uint8)
        tl.store(q8 + i, q, mask=i < numel)

    _KERNEL["ce"], _KERNEL["t"] = ce_rows_fp8, transpose_bytes
    _KERNEL["amax"], _KERNEL["q"] = absmax_parts, quantize_e4m3
    return ce_rows_fp8


def cross_entropy_fp8(logits: torch.Tensor, targets: torch.Tensor,
                      out: tuple[torch.Tensor, torch.Tensor] | None = None) -> tuple[torch.Tensor, ...]:
    """Per-row losses (FP32, 0 where ignored) of `logits` (N, V), and (softmax − one-hot) · G_SCALE
    in e5m2 twice: (N, V) and its transpose (V, N), both contiguous (into `out` when given: the GPU
    check fills it with NaN first to see that every entry is written). Ignored rows' gradient is 0."""
    if logits.stride(1) != 1:
        raise ValueError("logits must be contiguous along the vocabulary")
    n, v = logits.shape
    losses = torch.empty(n, dtype=torch.float32, device=logits.device)
    g8, gt8 = out if out is not None else (torch.empty(n, v, dtype=torch.float8_e5m2, device=logits.device),
                                           torch.empty(v, n, dtype=torch.float8_e5m2, device=logits.device))
    if FP8_ENCODE not in ("bits", "half") or FP8_TRANSPOSE not in ("kernel", "copy"):
        raise ValueError(f"unknown FP8_ENCODE / FP8_TRANSPOSE: {FP8_ENCODE!r} / {FP8_TRANSPOSE!r}")
    if n:
        store_t = FP8_TRANSPOSE == "kernel"
        _kernel()[(-(-n // FP8_BM),)](logits, logits.stride(0), targets.contiguous(), losses, g8.view(torch.uint8),
                                      gt8.view(torch.uint8), n, v, G=G_SCALE, BM=FP8_BM, BLOCK=FP8_BLOCK,
                                      HALF=FP8_ENCODE == "half", STORE_T=store_t, num_warps=FP8_WARPS)
        if not store_t:
            transpose_bytes(g8, gt8, T_TILE)
    return losses, g8, gt8


def transpose_bytes(src: torch.Tensor, dst: torch.Tensor, tile: tuple[int, int, int]) -> None:
    """dst (V, N) = srcᵀ for a contiguous 8-bit src (N, V), by luca's tiled kernel; `tile`: rows,
    columns, warps (T_TILE, H_TILE)."""
    (n, v), (tn, tv, tw) = src.shape, tile
    _kernel()
    _KERNEL["t"][(-(-n // tn), -(-v // tv))](src.view(torch.uint8), dst.view(torch.uint8), n, v,
                                             TN=tn, TV=tv, num_warps=tw)


def to_e4m3(x: torch.Tensor, out: torch.Tensor | None = None,
            scale: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(x8, s) with x ≈ x8 · s: x in e4m3 scaled by its absolute maximum (s, FP32 of one element).
    `out` / `scale` are filled in place when given (the cached weight, refreshed inside a CUDA graph)."""
    amax = x.detach().abs().amax().float()
    # by a tensor: torch's CUDA division by a Python number multiplies by its reciprocal (1 ulp off,
    # then not quantize_rows' scale); a CUDA tensor, so a CUDA graph can hold it
    s = (amax / torch.full_like(amax, E4M3_MAX)).clamp(min=1e-30).reshape(1)
    x8 = (x.detach().float() / s).to(torch.float8_e4m3fn)
    if out is None:
        return x8, s
    out.copy_(x8)
    scale.copy_(s)
    return out, scale


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(x8, x8ᵀ, s) for a contiguous (N, D) x: x / s in e4m3 in both layouts (the logits GEMM reads x8,
    d W's reads x8ᵀ), s = max |x| / 448 (FP32, one element), for finite x the same bytes as `to_e4m3`
    (a NaN or infinity makes s infinite, so the logits and the step's loss go non-finite). Three small
    Triton kernels: the eager amax, divide, cast and transpose took ~0.15 ms per micro-batch at nano-n2's
    shape, several times their memory traffic (session 14's profile)."""
    n, d = x.shape
    x = x.detach().contiguous()
    numel = x.numel()
    x8 = torch.empty(n, d, dtype=torch.float8_e4m3fn, device=x.device)
    xt8 = torch.empty(d, n, dtype=torch.float8_e4m3fn, device=x.device)
    scale = torch.empty(1, dtype=torch.float32, device=x.device)
    if numel == 0:
        scale.fill_(1e-30)
        return x8, xt8, scale
    _kernel()
    block = max(4096, 1 << (-(-numel // 4096) - 1).bit_length())  # at most 4,096 partial maxima
    n_parts = -(-numel // block)
    parts = torch.empty(n_parts, dtype=torch.float32, device=x.device)
    _KERNEL["amax"][(n_parts,)](x, parts, numel, BLOCK=block, num_warps=8)
    _KERNEL["q"][(n_parts,)](x, parts, n_parts, scale, x8.view(torch.uint8), numel, BLOCK=block,
                             PARTS=max(16, 1 << (n_parts - 1).bit_length()), num_warps=8)
    transpose_bytes(x8, xt8, H_TILE)
    return x8, xt8, scale


class FP8Weight:
    """A head weight (V, D) in e4m3 in both layouts and its scale, refreshed once per optimizer step."""

    def __init__(self, weight: torch.Tensor):
        v, d = weight.shape
        self.w8 = torch.empty(v, d, dtype=torch.float8_e4m3fn, device=weight.device)  # logits: B = w8ᵀ
        self.wt8 = torch.empty(d, v, dtype=torch.float8_e4m3fn, device=weight.device)  # d h: B = wt8ᵀ
        self.scale = torch.ones(1, dtype=torch.float32, device=weight.device)

    @torch.no_grad()
    def refresh(self, weight: torch.Tensor) -> None:
        to_e4m3(weight, self.w8, self.scale)
        self.wt8.copy_(self.w8.t())

    @classmethod
    def of(cls, weight: torch.Tensor) -> "FP8Weight":
        made = cls(weight)
        made.refresh(weight)
        return made


def _mm(a: torch.Tensor, b: torch.Tensor, sa: torch.Tensor, sb: torch.Tensor, dtype: torch.dtype,
        fast: bool) -> torch.Tensor:
    return torch._scaled_mm(a, b, scale_a=sa, scale_b=sb, out_dtype=dtype, use_fast_accum=fast)


class _LinearCE8(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, weight, targets, mean: bool, cached, acc):
        wq = cached if cached is not None else FP8Weight.of(weight)
        h8, ht8, sh = quantize_rows(h)
        logits = _mm(h8, wq.w8.t(), sh, wq.scale, torch.bfloat16, True)
        count = (targets != IGNORE).sum().clamp(min=1)  # a tensor: reading it back would sync
        scale = (1.0 / count.float()) if mean else torch.ones((), device=h.device)
        losses, g8, gt8 = cross_entropy_fp8(logits, targets)
        del logits
        ctx.save_for_backward(ht8, sh, g8, gt8, scale)
        ctx.wq, ctx.acc = wq, acc
        ctx.dtypes = (h.dtype, weight.dtype)
        ctx.needs = (h.requires_grad, weight.requires_grad)
        return losses.sum() * scale

    @staticmethod
    def backward(ctx, grad_out):
        ht8, sh, g8, gt8, scale = ctx.saved_tensors
        wq = ctx.wq
        sg = (scale * grad_out.float() / G_SCALE).reshape(1)  # all of d loss / d logits' scale
        gh = gw = None
        if ctx.needs[0]:
            gh = _mm(g8, wq.wt8.t(), sg, wq.scale, torch.bfloat16, FAST_ACCUM_BACKWARD).to(ctx.dtypes[0])
        if ctx.needs[1]:
            dw = _mm(gt8, ht8.t(), sg, sh, torch.float32, FAST_ACCUM_BACKWARD)
            if ctx.acc is not None:
                ctx.acc.data.add_(dw)  # .data: as kernels.mm_into, the kept gradient's version stays
            else:
                gw = dw.to(ctx.dtypes[1])
        return gh, gw, None, None, None, None


@torch.compiler.disable  # eager between compiled graphs; the CUDA graph of a step holds it
def linear_cross_entropy_fp8(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                             reduction: str = "mean", cached: FP8Weight | None = None,
                             acc: torch.Tensor | None = None) -> torch.Tensor:
    """Cross-entropy of `h @ weight.T` (h: (..., D), weight: (V, D)) against `targets` (...), mean
    over counted targets or their sum, with the three GEMMs in FP8 (module docstring). `cached`:
    the weight's e4m3 copies made once per step; `acc`: the weight's kept FP32 gradient, added to."""
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be mean or sum, got {reduction!r}")
    with torch.autocast(h.device.type, enabled=False):
        return _LinearCE8.apply(h.reshape(-1, h.shape[-1]), weight, targets.reshape(-1), reduction == "mean",
                                cached, acc)
