"""GPU kernels luca writes itself, in Triton: the language-model head's cross-entropy in training,
and the backward passes of RoPE (on the fused q/k/v projection) and SwiGLU.

What is notable:
- `linear_cross_entropy(h, weight, targets)` is the head GEMM and its cross-entropy for a training
  step on CUDA (`loss_impl = "fused"`, luca.train's default there). One Triton program per token
  row reads the row's BF16 logits once for the log-sum-exp and the loss, then again to overwrite
  them in place with d loss / d logits = softmax − one-hot, times the mean's 1/count (at 50,304
  logits the second read comes from memory, not L2: grids that keep fewer rows in flight, and rows
  held whole in registers, measured slower on an H100). Nothing of the (tokens × vocab) logits is written in FP32 and the
  backward pass is two GEMMs. At the GPT-2-small shape (12,288 tokens × 50,304 logits a step)
  the compiled plain cross-entropy reads the logits three times and writes them once
  (benchmarks/bench_train.py measures both).
- The arithmetic is the compiled path's: BF16 logits from the GEMM, softmax in FP32, the gradient
  rounded to BF16 for the backward GEMMs; the scale of the upstream gradient is applied to the
  small GEMM products instead of the big logits.
- Targets equal to -100 count for nothing, as in `F.cross_entropy`.
- `SwiGLU` and luca.model's `RopeQKV` (autograd functions the model uses on its fused GEMMs when
  training on CUDA): their forwards are plain torch, which the compiler fuses; their backwards are
  custom ops (`luca::rope_qkv_backward`, `luca::swiglu_backward`) that read every input once and write the
  fused GEMM's gradient, in 2-D tiles that suit any strides. The compiler's kernels for the same
  work ran far below the memory bandwidth on an H200: gathering q/k/v's gradients from SDPA's
  layout took 0.24 ms a layer (luca's: 0.04), SwiGLU's backward 0.12 ms (luca's: 0.064). Both
  compute in FP32 and round once.
- Triton is imported lazily: CPUs never need it. With `TRITON_INTERPRET=1` the same kernel runs
  on CPU tensors, which is how the tests check it against `F.cross_entropy` (the interpreter
  truncates FP32 → BF16 where a GPU rounds to nearest: one BF16 step at most).
"""
from __future__ import annotations

import os

import torch

IGNORE = -100
# The cross-entropy kernel's tile of a row, its warps, and programs per SM (0: one per row); set from
# benchmarks/bench_head.py on an H100.
BLOCK, WARPS, PROGRAMS = 8192, 8, 0
# RoPE's backward: rows of a head per program and warps; SwiGLU's backward: its (rows, columns) tile
# and warps. Set from benchmarks/bench_bwd_kernels.py on an H200 (RoPE's 16 rows: 0.0381 ms a layer
# against 64 rows' 0.0400; SwiGLU's setting was already the best).
ROPE_BT, ROPE_WARPS = 16, 4
SWIGLU_BM, SWIGLU_BN, SWIGLU_WARPS = 32, 128, 4
_KERNEL: dict = {}
MM_OUT_DTYPE = "dtype" in torch.ops.aten.mm.overloads()  # torch.mm(..., out_dtype=) exists (CUDA only)


def available(device: torch.device) -> bool:
    """Whether the fused head can run for tensors on `device` (CUDA with Triton, or the interpreter)."""
    if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        return False
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def _kernels():
    """The Triton kernels, compiled on first use (importing triton costs a second)."""
    if _KERNEL:
        return _KERNEL
    import triton
    import triton.language as tl

    @triton.jit
    def ce_rows(logits, stride, targets, losses, scale, N, V, BLOCK: tl.constexpr, SINGLE: tl.constexpr):
        cols = tl.arange(0, BLOCK)
        # Rows are strided over the programs: with fewer programs than rows (a persistent grid) fewer
        # rows are in flight, meant to keep a row in L2 between its two passes (PROGRAMS; 0 measured best).
        for row in range(tl.program_id(0).to(tl.int64), N, tl.num_programs(0)):  # int64: row · stride
            base = logits + row * stride
            t = tl.load(targets + row)
            valid = t != -100
            t = tl.where(valid, t, 0)
            g_scale = tl.load(scale) * valid.to(tl.float32)
            if SINGLE:  # the whole row in registers: one read, one write
                x = tl.load(base + cols, mask=cols < V, other=float("-inf")).to(tl.float32)
                m = tl.max(x, axis=0)
                e = tl.exp(x - m)
                s = tl.sum(e, axis=0)
                lse = m + tl.log(s)
                picked = tl.sum(tl.where(cols == t, x, 0.0), axis=0)
                g = tl.where(cols == t, e / s - 1.0, e / s) * g_scale
                tl.store(base + cols, g.to(logits.dtype.element_ty), mask=cols < V)
            else:
                # Pass 1: online log-sum-exp over the row (a running max and the sum rescaled to it).
                m = tl.max(tl.full([BLOCK], float("-inf"), tl.float32), axis=0)
                s = tl.sum(tl.zeros([BLOCK], tl.float32), axis=0)
                for off in range(0, V, BLOCK):
                    x = tl.load(base + off + cols, mask=off + cols < V, other=float("-inf")).to(tl.float32)
                    m_new = tl.maximum(m, tl.max(x, axis=0))
                    s = s * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new), axis=0)
                    m = m_new
                lse = m + tl.log(s)
                picked = tl.load(base + t).to(tl.float32)  # read before pass 2 overwrites it
                # Pass 2: the gradient, in place (rounded to nearest on a GPU).
                for off in range(0, V, BLOCK):
                    idx = off + cols
                    x = tl.load(base + idx, mask=idx < V, other=0.0).to(tl.float32)
                    g = tl.exp(x - lse)
                    g = tl.where(idx == t, g - 1.0, g) * g_scale
                    tl.store(base + idx, g.to(logits.dtype.element_ty), mask=idx < V)
            tl.store(losses + row, tl.where(valid, lse - picked, 0.0))

    @triton.jit
    def scale_(x, scale, n, BLOCK: tl.constexpr):
        """x *= scale[0] in FP32, rounded once to x's dtype."""
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        v = tl.load(x + offs, mask=offs < n).to(tl.float32) * tl.load(scale)
        tl.store(x + offs, v.to(x.dtype.element_ty), mask=offs < n)

    @triton.jit
    def rope_bwd(src, s_b, s_t, s_h, s_d, cos, sin, c_b, c_t, c_d, out, o_t, o_col, T, NH, HALF,
                 BH: tl.constexpr, BT: tl.constexpr, ROTATE: tl.constexpr):
        """One head's (BT, 2·HALF) tile of d q (or d k: ROTATE, the inverse rotation; d v: copied)
        into its columns of the fused projection's gradient."""
        t = tl.program_id(1) * BT + tl.arange(0, BT).to(tl.int64)
        b = (tl.program_id(0) // NH).to(tl.int64)
        h = (tl.program_id(0) % NH).to(tl.int64)
        d = tl.arange(0, BH)
        mask = (t < T)[:, None] & (d < HALF)[None, :]
        p = src + b * s_b + h * s_h + t[:, None] * s_t + d[None, :] * s_d
        y1 = tl.load(p, mask=mask).to(tl.float32)
        y2 = tl.load(p + HALF * s_d, mask=mask).to(tl.float32)
        if ROTATE:  # forward: x1·c1 − x2·s1, x2·c2 + x1·s2
            c = b * c_b + t[:, None] * c_t + d[None, :] * c_d
            x1 = y1 * tl.load(cos + c, mask=mask).to(tl.float32) + y2 * tl.load(sin + c + HALF * c_d, mask=mask).to(tl.float32)
            x2 = y2 * tl.load(cos + c + HALF * c_d, mask=mask).to(tl.float32) - y1 * tl.load(sin + c, mask=mask).to(tl.float32)
        else:
            x1, x2 = y1, y2
        o = out + (b * T + t[:, None]) * o_t + o_col + h * (2 * HALF) + d[None, :]
        tl.store(o, x1.to(out.dtype.element_ty), mask=mask)
        tl.store(o + HALF, x2.to(out.dtype.element_ty), mask=mask)

    @triton.jit
    def swiglu_bwd(gu, g_m, g_n, dh, d_m, d_n, out, M, F, BM: tl.constexpr, BN: tl.constexpr):
        """d (gate, up) side by side from (gate, up) and d silu(gate)·up, each element read once."""
        m = tl.program_id(0).to(tl.int64) * BM + tl.arange(0, BM)
        n = tl.program_id(1) * BN + tl.arange(0, BN)
        mask = (m < M)[:, None] & (n < F)[None, :]
        g = tl.load(gu + m[:, None] * g_m + n[None, :] * g_n, mask=mask).to(tl.float32)
        u = tl.load(gu + m[:, None] * g_m + (n[None, :] + F) * g_n, mask=mask).to(tl.float32)
        dy = tl.load(dh + m[:, None] * d_m + n[None, :] * d_n, mask=mask).to(tl.float32)
        sig = tl.sigmoid(g)
        o = out + m[:, None] * (2 * F) + n[None, :]
        tl.store(o, (dy * u * sig * (1.0 + g * (1.0 - sig))).to(out.dtype.element_ty), mask=mask)
        tl.store(o + F, (dy * g * sig).to(out.dtype.element_ty), mask=mask)

    _KERNEL.update(ce=ce_rows, scale=scale_, rope_bwd=rope_bwd, swiglu_bwd=swiglu_bwd)
    return _KERNEL


def cross_entropy_rows(logits: torch.Tensor, targets: torch.Tensor, scale: torch.Tensor,
                       block: int | None = None, num_warps: int | None = None,
                       programs: int | None = None) -> torch.Tensor:
    """Per-row losses (FP32, 0 where ignored) of `logits` (N, V), which are overwritten with
    d(sum of losses · scale)/d logits. `scale` is a one-element FP32 tensor on the same device.
    `block` ≥ V keeps a row in registers (one read); `programs` caps the grid (0: one per row)."""
    if logits.stride(1) != 1:
        raise ValueError("logits must be contiguous along the vocabulary")
    n, v = logits.shape
    block, programs = block or BLOCK, PROGRAMS if programs is None else programs
    losses = torch.empty(n, dtype=torch.float32, device=logits.device)
    if n:
        if programs and logits.is_cuda:
            programs *= torch.cuda.get_device_properties(logits.device).multi_processor_count
        _kernels()["ce"][(min(n, programs) if programs else n,)](
            logits, logits.stride(0), targets.contiguous(), losses, scale, n, v,
            BLOCK=block, SINGLE=block >= v, num_warps=num_warps or WARPS)
    return losses


def scale_(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """`x` (contiguous) times the one-element FP32 tensor `scale`, in place, computed in FP32."""
    n = x.numel()
    if n:
        _kernels()["scale"][(-(-n // 4096),)](x, scale, n, BLOCK=4096, num_warps=8)
    return x


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def mm_fp32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b of BF16 operands with an FP32 result, straight from the GEMM where torch has that
    (CUDA, torch ≥ 2.8); elsewhere the BF16 product cast up. Also used inside compiled graphs."""
    if a.is_cuda and MM_OUT_DTYPE:
        return torch.mm(a, b, out_dtype=torch.float32)
    return (a @ b).float()


_ADDMM_INTO: dict = {}  # device index → whether addmm adds BF16 operands' product to an FP32 tensor in place


def _addmm_into_ok(device: torch.device) -> bool:
    """Probe, once per device and outside any graph capture, for addmm's out_dtype overload with an
    FP32 `self` that is also `out` (torch ≥ 2.8 on CUDA)."""
    if device.index not in _ADDMM_INTO:
        if torch.cuda.is_current_stream_capturing():
            return False  # no probing inside a capture: the other path is always correct
        try:
            c = torch.zeros(8, 8, device=device)
            one = torch.ones(8, 8, device=device, dtype=torch.bfloat16)
            for _ in range(2):
                torch.addmm(c, one, one, out_dtype=torch.float32, out=c)
            _ADDMM_INTO[device.index] = bool((c == 16).all())
        except (RuntimeError, TypeError):
            _ADDMM_INTO[device.index] = False
    return _ADDMM_INTO[device.index]


# -- gradients added into kept buffers (Transformer.keep_grads) ---------------------------------------
# These two ops add into `acc` but are declared pure, on purpose: a declared mutation makes the
# compiler functionalise it, and inductor then copied the whole accumulator in every backward graph
# (session 5: 0.40 ms a micro-batch, as much as the adds saved). Declared pure they are opaque calls.
# That is safe only because nothing inside a graph reads `acc`: the optimizer reads it after the
# backward pass. Each returns a zero scalar, the gradient of the model's `grad_token`, so the call's
# result is used and the compiler keeps it. (A 0-element result would spare the zero fills, 0.06 ms a
# micro-batch, but the compiler then drops the calls: the compiled test in tests/test_step.py fails.)
# They write through `acc.data`, which leaves the tensor's version counter alone: a graph that saved
# the buffer (a compiled, checkpointed trunk whose tied embedding shares the head's gradient) checks
# that version in its backward, after the head's GEMM has already added into it.
@torch.library.custom_op("luca::mm_into", mutates_args=())
def mm_into(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """acc += a @ b (BF16 a, b; FP32 acc): on CUDA inside the GEMM (beta = 1: the epilogue reads the
    accumulator, no separate add kernel), elsewhere an add of `mm_fp32`. Returns a zero scalar."""
    acc = acc.data  # an alias whose writes leave acc's version alone (below)
    if a.is_cuda and MM_OUT_DTYPE and _addmm_into_ok(a.device):
        torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)
    else:
        acc.add_(mm_fp32(a, b))
    return acc.new_zeros(())


@mm_into.register_fake
def _(acc, a, b):
    return acc.new_empty(())


@torch.library.custom_op("luca::embedding_into", mutates_args=())
def embedding_into(acc: torch.Tensor, ids: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """acc[ids] += grad (rows; FP32 acc): the embedding's weight gradient scattered straight into
    its kept buffer, instead of a dense (vocab × d) gradient built and then added. Returns a zero scalar."""
    acc = acc.data  # as mm_into's
    acc.index_add_(0, ids.reshape(-1), grad.reshape(-1, acc.shape[1]).to(acc.dtype))
    return acc.new_zeros(())


@embedding_into.register_fake
def _(acc, ids, grad):
    return acc.new_empty(())


class _LinearCE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, weight, targets, mean: bool, dtype: torch.dtype, cached, acc):
        hb = h.to(dtype)
        wb = cached if cached is not None and cached.dtype == dtype else weight.to(dtype)
        logits = hb @ wb.t()
        count = (targets != IGNORE).sum().clamp(min=1)  # a tensor: reading it back would sync
        scale = (1.0 / count.float()) if mean else torch.ones((), device=h.device)
        losses = cross_entropy_rows(logits, targets, scale.reshape(1))
        ctx.save_for_backward(hb, wb, logits)  # logits now hold the gradient
        ctx.acc = acc  # the weight's kept FP32 gradient, added to by the GEMM; None: autograd's add
        ctx.dtypes = (h.dtype, weight.dtype)
        ctx.needs = (h.requires_grad, weight.requires_grad)
        return losses.sum() * scale

    @staticmethod
    def backward(ctx, grad_out):
        # The upstream scale (1 / micro-batches) goes onto the small operands, never the logits.
        hb, wb, g = ctx.saved_tensors
        s = grad_out.float().reshape(1)
        gh = gw = None
        if ctx.needs[0]:
            gh = scale_(g @ wb, s).to(ctx.dtypes[0])
        if ctx.needs[1] and ctx.acc is not None:
            mm_into(ctx.acc, g.t(), scale_(hb.clone(), s))
        elif ctx.needs[1]:
            gw = mm_fp32(g.t(), scale_(hb.clone(), s)).to(ctx.dtypes[1])
        return gh, gw, None, None, None, None, None


@torch.compiler.disable  # a Triton kernel between compiled graphs; the CUDA graph of a step holds it
def linear_cross_entropy(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                         reduction: str = "mean", cached: torch.Tensor | None = None,
                         acc: torch.Tensor | None = None) -> torch.Tensor:
    """Cross-entropy of `h @ weight.T` (h: (..., D), weight: (V, D)) against `targets` (...),
    mean over counted targets or their sum, with the gradient computed in the forward pass
    (module docstring). The GEMMs run in the autocast dtype when autocast is on. `cached` is the
    weight already cast to the compute dtype, read instead of a new cast; `acc`, the weight's
    kept FP32 gradient, which the weight-gradient GEMM then adds to (`mm_into`)."""
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be mean or sum, got {reduction!r}")
    if not available(h.device):  # a CUDA machine without Triton: the plain cross-entropy
        logits = torch.nn.functional.linear(h, weight).float()
        return torch.nn.functional.cross_entropy(logits.view(-1, logits.shape[-1]), targets.reshape(-1),
                                                 ignore_index=IGNORE, reduction=reduction)
    dev = h.device.type
    dtype = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else h.dtype
    with torch.autocast(dev, enabled=False):
        return _LinearCE.apply(h.reshape(-1, h.shape[-1]), weight, targets.reshape(-1),
                               reduction == "mean", dtype, cached, acc)


def cast(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """t in `dtype`, with no op at all where it already is. Every autograd function of luca's that
    the compiler traces casts through this: inside such a function's forward, torch 2.11's compiler
    (the GPU machines') dropped the gradient of an output that a no-op `.to()` had aliased. RopeQKV's
    q and k were such outputs in FP32 training and with a BF16 residual stream, so q_proj and k_proj
    got no gradient at all (found on an H200 in session 8, reproduced on a CPU with torch 2.11;
    tests/test_model.py::test_compiled_gpu_switches_give_eager_gradients fails there without this).
    Upstream: pytorch/pytorch#180642 (an alias of a returned tensor, the same TensorImpl, collected
    as an extra output of the traced forward, routes that output's gradient to the wrong slot)."""
    return t if t.dtype == dtype else t.to(dtype)


# -- the fused q/k/v projection's RoPE and SwiGLU: compiled forwards, backwards in one pass each ----
@torch.library.custom_op("luca::rope_qkv_backward", mutates_args=())
def rope_qkv_backward(dq: torch.Tensor, dk: torch.Tensor, dv: torch.Tensor, cos: torch.Tensor,
                      sin: torch.Tensor) -> torch.Tensor:
    """d (fused q/k/v projection) of shape (B, T, (H + 2·KV)·D) from the gradients of RoPE'd q, k and
    of v, each (B, T, heads, D) in any strides (SDPA's backward hands them over in its own layout):
    one kernel launch per part writes its columns, where the compiled backward gathered the three
    into one buffer in a kernel slower than the GEMMs it served."""
    B, T, H, D = dq.shape
    KV = dk.shape[2]
    out = torch.empty(B, T, (H + 2 * KV) * D, device=dq.device, dtype=dq.dtype)
    if not available(dq.device) or D % 2:
        q1, q2 = dq.float().chunk(2, -1)
        k1, k2 = dk.float().chunk(2, -1)
        c1, c2 = cos.float()[:, :, None].chunk(2, -1)
        s1, s2 = sin.float()[:, :, None].chunk(2, -1)
        parts = [q1 * c1 + q2 * s2, q2 * c2 - q1 * s1, k1 * c1 + k2 * s2, k2 * c2 - k1 * s1]
        q, k = torch.cat(parts[:2], -1), torch.cat(parts[2:], -1)
        out.copy_(torch.cat([q.flatten(2), k.flatten(2), dv.flatten(2)], -1))
        return out
    col = 0
    for g, rotate in ((dq, True), (dk, True), (dv, False)):
        nh = g.shape[2]
        _kernels()["rope_bwd"][(B * nh, _cdiv(T, ROPE_BT))](  # B·heads on the axis without CUDA's 65,535 cap
            g, *g.stride(), cos, sin, *cos.stride(), out, out.stride(1), col, T, nh,
            D // 2, BH=1 << (D // 2 - 1).bit_length(), BT=ROPE_BT, ROTATE=rotate, num_warps=ROPE_WARPS)
        col += nh * D
    return out


@rope_qkv_backward.register_fake
def _(dq, dk, dv, cos, sin):
    B, T, H, D = dq.shape
    return dq.new_empty(B, T, (H + 2 * dk.shape[2]) * D)


@torch.library.custom_op("luca::swiglu_backward", mutates_args=())
def swiglu_backward(gu: torch.Tensor, dh: torch.Tensor) -> torch.Tensor:
    """d (gate, up) of silu(gate) · up, with gate and up side by side in `gu` (..., 2F)."""
    F = dh.shape[-1]
    g2, d2 = gu.reshape(-1, 2 * F), dh.reshape(-1, F)
    out = torch.empty(gu.shape, device=gu.device, dtype=gu.dtype)
    if not available(gu.device):
        g, u = g2.float().chunk(2, -1)
        d, sig = d2.float(), torch.sigmoid(g)
        out.view(-1, 2 * F).copy_(torch.cat([d * u * sig * (1 + g * (1 - sig)), d * g * sig], -1))
        return out
    M = g2.shape[0]
    _kernels()["swiglu_bwd"][(_cdiv(M, SWIGLU_BM), _cdiv(F, SWIGLU_BN))](
        g2, *g2.stride(), d2, *d2.stride(), out, M, F, BM=SWIGLU_BM, BN=SWIGLU_BN, num_warps=SWIGLU_WARPS)
    return out


@swiglu_backward.register_fake
def _(gu, dh):
    return gu.new_empty(gu.shape)


class SwiGLU(torch.autograd.Function):
    """silu(gate) · up from the fused gate/up projection's output (..., 2F), halves side by side;
    the backward is `swiglu_backward`."""

    @staticmethod
    def forward(ctx, gu):
        gate, up = gu.chunk(2, dim=-1)
        ctx.save_for_backward(gu)
        return torch.nn.functional.silu(gate) * up

    @staticmethod
    def backward(ctx, dh):
        return swiglu_backward(ctx.saved_tensors[0], dh)
