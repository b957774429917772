"""Training throughput on one GPU: luca's nano-n2 step against transformers' LlamaForCausalLM.

One run (under 10 minutes on an H100) measures, in this order:
1. the BF16 matmul ceiling (8192³, median of timed products after warm-up);
2. the data loader on real memory-mapped shards (`--data DIR`, a luca data directory): the time to
   read, stack and pin one micro-batch, against the step time;
3. training steps at the GPT-2-small shape (12 layers, width 768, 12 heads, sequence 1024,
   micro-batch 12, vocab 50304, BF16 autocast, AdamW, grad clip 1.0) on random tokens, with
   `--accum` micro-batches per optimizer step (default 40: nano-n2's own 491,520-token step on one
   GPU; the peer accumulates the same way; `--accum 1` updates after every micro-batch), each
   variant in its own process: luca through the same `build` / `Stepper` as `luca train`
   (whole-model `torch.compile`, fused AdamW with the clip folded in and on-device step skipping,
   FlashAttention through SDPA, one GEMM each for q/k/v and gate/up, the head's cross-entropy and
   the backward passes of RoPE and SwiGLU in luca's Triton kernels, the whole step replayed as one
   CUDA graph, and the head's GEMMs in FP8 where the preset asks for it and the GPU has them),
   a few luca variants, and the peer: transformers' `LlamaForCausalLM` with SDPA
   attention, fused AdamW and `torch.compile`. Warm-up steps (and the compilation and capture)
   are excluded; each timing is a CUDA-synchronised wall clock over many steps.

MFU counts 6·N FLOPs per token for the N parameters that take part in matrix products (the tied
embedding once, as the output projection) plus 12·L·d·T for attention scores and values (forward
and backward, without a causal discount: the PaLM / nanoGPT convention), over the measured ceiling.

Modes: `python benchmarks/bench_train.py [--data DIR]` (the table);
`python benchmarks/bench_train.py --scaling [--no-optimize-ddp]` (on a machine with ≥ 2 GPUs: one
GPU, then all of them through torchrun + DDP, and the scaling efficiency); `--variant NAME` and
`--dist` are the worker modes those use. `--check-graph` trains the same model from the same seed
with and without the CUDA graph and prints how far the losses and weights drift. `BENCH_SMOKE=1` runs a tiny shape on the CPU to check the
plumbing (it measures nothing).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

SHAPE = dict(vocab_size=50304, n_layers=12, d_model=768, n_heads=12, n_kv_heads=12, max_seq_len=1024)
B, T = 12, 1024
DEV = "cuda"
# The nano-n2 preset's own GPU switches (its [train] table): the "luca" variant trains as the preset does.
PRESET = tomllib.loads((ROOT / "luca" / "presets" / "nano-n2.toml").read_text())["train"]
if os.environ.get("BENCH_SMOKE"):  # a tiny shape on the CPU: checks this script's plumbing, measures nothing
    SHAPE = dict(vocab_size=512, n_layers=2, d_model=64, n_heads=4, n_kv_heads=4, max_seq_len=64)
    B, T, DEV = 2, 64, "cpu"
VARIANTS = {  # name: (what it is, worker settings)
    "luca": ("luca train's GPU path: compiled model, fused q/k/v and gate/up GEMMs, luca's kernels, SDPA, graph",
             {}),
    "transformers": ("LlamaForCausalLM, SDPA, fused AdamW, torch.compile", {}),
    # ablations: luca with one of its GPU-path pieces taken out or added
    "luca-unfused-qkv": ("luca with q, k and v as three GEMMs (train.fuse_qkv = false)", {"fuse_qkv": False}),
    "luca-compiled-swiglu": ("luca with SwiGLU's backward left to the compiler instead of luca's kernel",
                             {"compiled_swiglu": True}),
    "luca-unfused-proj": ("luca with separate gate and up GEMMs", {"fuse": False}),
    "luca-bf16-residual": ("luca with a BF16 residual stream (train.bf16_residual)", {"bf16_residual": True}),
    "luca-fp8-head": ("luca with the head's three GEMMs in FP8 (train.fp8_head, luca/fp8_head.py)", {"fp8_head": True}),
    "luca-fp8-env": ("luca's preset with the FP8 head's kernel set by $BENCH_FP8 (encode, transpose, rows, tile, "
                     "warps, transposing tile rows, columns, warps: luca/fp8_head.py)", {"fp8_env": True}),
    "luca-blas-workspace": ("luca with cuBLAS's workspace (train.blas_workspace = true; nano-n2 has none: "
                            "luca/train.py no_blas_workspace)", {"blas_workspace": True}),
    "luca-cublaslt": ("luca with torch's BLAS backend set to cuBLASLt", {"blas": "cublaslt"}),
    "luca-bf16-head": ("luca with the head's GEMMs in BF16 (train.fp8_head = false)", {"fp8_head": False}),
    "luca-norm-weights": ("luca with the norms' weights applied by the norms, not folded into the GEMMs' "
                          "cached weights (train.fold_norms = false)", {"fold_norms": False}),
    "luca-cudagraphs": ("luca compiled with mode=reduce-overhead instead of the whole-step graph",
                        {"mode": "reduce-overhead", "graph": False}),
    "luca-eager": ("luca without torch.compile", {"compile": False}),
    "luca-bf16-wgrad": ("luca with weight gradients rounded to BF16 and cast to FP32 (autocast's way, before)",
                        {"wgrad32": False}),
    "luca-full-ce": ("luca with the compiled full-logits CE instead of its kernel (the previous default)",
                     {"loss_impl": "full"}),
    "luca-chunked": ("luca with the chunked fused-linear CE (memory-friendly path)", {"loss_impl": "chunked"}),
    "luca-cudnn": ("luca with cuDNN attention forced", {"sdpa": "cudnn"}),
    "luca-flash": ("luca with the flash SDPA kernel forced", {"sdpa": "flash"}),
    "luca-no-graph": ("luca without the CUDA graph of the whole step (train.cuda_graph = false)", {"graph": False}),
    "luca-unfolded": ("luca without the CUDA graph and with clip_grad_norm_ (the previous default)",
                      {"fold_clip": False}),
    "luca-cdt": ("luca with inductor coordinate-descent tuning", {"inductor": {"coordinate_descent_tuning": True}}),
    "luca-fusion": ("luca with inductor's aggressive fusion and combo (horizontal) kernels",
                    {"inductor": {"aggressive_fusion": True, "combo_kernels": True}}),
    "luca-flash-bf16": ("luca-bf16-residual with the flash SDPA kernel", {"sdpa": "flash", "bf16_residual": True}),
    "luca-no-mix-order": ("luca without inductor's mix-order reduction (norm weight gradients in their own pass)",
                          {"inductor": {"triton.mix_order_reduction": False}}),
    "luca-mix-split-64": ("luca with mix-order reductions split 64 rows per program (fewer partial sums)",
                          {"inductor": {"triton.mix_order_reduction_split_size": 64}}),
    "luca-mix-split-128": ("luca with mix-order reductions split 128 rows per program",
                           {"inductor": {"triton.mix_order_reduction_split_size": 128}}),
    "luca-mix-autotune": ("luca with inductor autotuning the mix-order reductions' split (norm weight-gradient partials)",
                          {"inductor": {"triton.mix_order_reduction_autotune_split_size": True}}),
    "luca-autotune": ("luca compiled with mode=max-autotune-no-cudagraphs", {"mode": "max-autotune-no-cudagraphs"}),
    "luca-triton-gemm": ("luca with inductor's Triton GEMM templates (fused epilogues) autotuned against cuBLAS",
                         {"inductor": {"max_autotune_gemm": True, "max_autotune_gemm_backends": "TRITON,ATEN"}}),
    "luca-autograd-accum": ("luca with autograd adding each micro-batch's weight gradients (train.accum_in_gemm = false)",
                            {"keep": False}),
    "luca-cast-each": ("luca casting the weights to BF16 in every micro-batch (train.cast_once = false)",
                       {"cache": False}),
}


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# -- measurements -------------------------------------------------------------------------------
def sync() -> None:
    if DEV == "cuda":
        torch.cuda.synchronize()


def matmul_ceiling(n: int = 8192, reps: int = 30) -> float:
    if DEV != "cuda":
        return 1.0
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    for _ in range(5):
        a @ b
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        a @ b
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return 2 * n ** 3 / statistics.median(times) / 1e12


def loader_time(data_dir: str, accum: int = 40, steps: int = 20) -> dict:
    """Seconds per micro-batch to read (memmap), stack and pin; the nano-n2 preset's step shape."""
    from luca.data import TokenShards
    from luca.train import Batches
    batches = Batches(TokenShards(data_dir, "train"), T, seed=0)
    pin = torch.cuda.is_available()
    batches.step_batches(0, 0, 1, accum, B, pin)
    t0 = time.perf_counter()
    for s in range(1, steps + 1):
        batches.step_batches(s, 0, 1, accum, B, pin)
    per_micro = (time.perf_counter() - t0) / (steps * accum)
    return {"loader_ms_per_micro_batch": per_micro * 1e3, "train_tokens": batches.shards.n_tokens}


def time_steps(step, warmup: int, reps: int, per_rep: int) -> dict:
    t0 = time.perf_counter()
    step(0)
    sync()
    first = time.perf_counter() - t0
    for i in range(1, warmup):
        step(i)
    sync()
    ms = []
    for r in range(reps):
        t = time.perf_counter()
        for i in range(per_rep):
            step(warmup + r * per_rep + i)
        sync()
        ms.append((time.perf_counter() - t) / per_rep * 1e3)
    return {"ms_per_step": statistics.median(ms), "ms_min": min(ms), "ms_max": max(ms), "first_step_s": first}


def profile_breakdown(step, n: int = 3, name: str = "luca") -> dict:
    """Share of GPU kernel time by kind over n steps (torch.profiler)."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CUDA if DEV == "cuda" else ProfilerActivity.CPU]) as prof:
        for i in range(n):
            step(i)
        sync()
    gaps = None
    if os.environ.get("OUT") and DEV == "cuda":
        import gzip
        import tempfile
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "trace.json")
            prof.export_chrome_trace(path)
            gaps = gpu_gaps(json.load(open(path)), n)
            with open(path, "rb") as f, gzip.open(os.path.join(os.environ["OUT"], f"trace_{name}.json.gz"), "wb") as g:
                g.writelines(f)
    kinds = {"attention": ("flash", "fmha", "attention", "sdpa"),
             "matmul": ("gemm", "nvjet", "cutlass", "sm90_xmma", "cublas", "wgmma", "mm_"),
             "optimizer": ("adam", "multi_tensor"),
             "triton (fused elementwise / reductions)": ("triton",)}
    totals = {k: 0.0 for k in kinds} | {"other": 0.0}
    top = []
    for e in prof.key_averages():
        t = getattr(e, "self_device_time_total", 0) or getattr(e, "self_cuda_time_total", 0)
        if t <= 0:
            continue
        top.append((t, e.key))
        name = e.key.lower()
        kind = next((k for k, keys in kinds.items() if any(s in name for s in keys)), "other")
        totals[kind] += t
    total = sum(totals.values()) or 1.0
    top.sort(reverse=True)
    return {"gpu_ms_per_step": total / n / 1e3, "shares": {k: round(v / total, 3) for k, v in totals.items()},
            "top_kernels": [(round(t / n / 1e3, 3), k[:110]) for t, k in top[:40]], "gaps": gaps}


def gpu_gaps(trace: dict, n: int) -> dict:
    """Idle time between consecutive GPU kernels/copies in a chrome trace, and where the largest gaps are."""
    ev = sorted((e for e in trace.get("traceEvents", []) if e.get("ph") == "X"
                 and e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset")), key=lambda e: e["ts"])
    if not ev:
        return {}
    busy_end, idle, big = ev[0]["ts"] + ev[0]["dur"], 0.0, []
    small = 0
    for a, b in zip(ev, ev[1:]):
        gap = b["ts"] - busy_end
        if gap > 0:
            idle += gap
            if gap < 5:
                small += 1
            big.append((round(gap, 1), a["name"][:60], b["name"][:60]))
        busy_end = max(busy_end, b["ts"] + b["dur"])
    big.sort(reverse=True)
    span = busy_end - ev[0]["ts"]
    return {"kernels_per_step": len(ev) / n, "span_ms_per_step": span / n / 1e3, "idle_ms_per_step": idle / n / 1e3,
            "gaps_under_5us": small / n, "largest": big[:25]}


# -- workers ------------------------------------------------------------------------------------
def flops_per_token(n_matmul_params: int) -> float:
    return 6 * n_matmul_params + 12 * SHAPE["n_layers"] * SHAPE["d_model"] * T


def random_batches(n: int, device) -> list[torch.Tensor]:
    g = torch.Generator(device="cpu").manual_seed(0)
    return [torch.randint(0, SHAPE["vocab_size"], (B, T + 1), generator=g).to(device) for _ in range(n)]


def luca_step_fn(settings: dict, device, max_accum: int = 1):
    from luca.distributed import init_distributed
    from luca.model import ModelConfig
    from luca.step import BadSteps, Stepper
    from luca.train import TrainConfig, build
    dd = init_distributed(device)
    if settings.get("compiled_swiglu"):  # read when the model's forward is traced
        from luca import kernels

        class CompiledSwiGLU:
            @staticmethod
            def apply(gu):
                gate, up = gu.chunk(2, dim=-1)
                return torch.nn.functional.silu(gate) * up
        kernels.SwiGLU = CompiledSwiGLU
    cfg = TrainConfig(seq_len=T, micro_batch=B, batch_tokens=B * T * dd.world * max_accum, lr=6e-4,
                      compile=settings.get("compile", DEV == "cuda") and "mode" not in settings,
                      loss_impl=settings.get("loss_impl", "auto"), cuda_graph=settings.get("graph", True),
                      blas_workspace=settings.get("blas_workspace", PRESET.get("blas_workspace", True)))
    raw, model, opt = build(ModelConfig(**SHAPE), cfg, device, dd)
    # Ablations: the model compiles on its first call, so switches set here still take effect.
    if DEV == "cuda":
        raw.set_gpu_training(True, fuse_qkv=settings.get("fuse_qkv", True), wgrad32=settings.get("wgrad32", True),
                             fold_norms=settings.get("fold_norms", True),
                             fp8_head=settings.get("fp8_head", PRESET.get("fp8_head", False)))
    if not settings.get("fuse", True):
        for block in raw.model.layers:
            block.self_attn.fused = block.mlp.fused = False
    if settings.get("bf16_residual"):
        raw.low_precision_residual = True
    if raw.weights_cached:  # the cached copies follow the GEMMs chosen above (or go)
        raw.cache_weights(settings.get("cache", True))
    if raw.grads_kept:  # so do the kept gradients
        raw.keep_grads(settings.get("keep", True))
    if os.environ.get("BENCH_ROPE"):  # RoPE's backward: rows per program, warps (bench_bwd_kernels.py)
        from luca import kernels
        kernels.ROPE_BT, kernels.ROPE_WARPS = map(int, os.environ["BENCH_ROPE"].split(","))
    if os.environ.get("BENCH_SWIGLU"):  # SwiGLU's backward: tile rows, columns, warps
        from luca import kernels
        kernels.SWIGLU_BM, kernels.SWIGLU_BN, kernels.SWIGLU_WARPS = map(int, os.environ["BENCH_SWIGLU"].split(","))
    if os.environ.get("BENCH_CE"):  # the head kernel's tile, warps, programs per SM (bench_head.py's "best")
        from luca import kernels
        kernels.BLOCK, kernels.WARPS, kernels.PROGRAMS = map(int, os.environ["BENCH_CE"].split(","))
    if "blas" in settings:
        torch.backends.cuda.preferred_blas_library(settings["blas"])
    if settings.get("fp8_env") and os.environ.get("BENCH_FP8"):
        from luca import fp8_head
        enc, trans, *nums = os.environ["BENCH_FP8"].split(",")
        nums = [int(x) for x in nums]
        if len(nums) not in (3, 6):
            sys.exit(f"BENCH_FP8: encode,transpose,rows,tile,warps[,t_rows,t_cols,t_warps], got {os.environ['BENCH_FP8']!r}")
        fp8_head.FP8_ENCODE, fp8_head.FP8_TRANSPOSE = enc, trans
        fp8_head.FP8_BM, fp8_head.FP8_BLOCK, fp8_head.FP8_WARPS = nums[:3]
        if len(nums) > 3:
            fp8_head.T_TILE = tuple(nums[3:6])
    for k, v in settings.get("inductor", {}).items():  # dotted keys name nested options ("triton.x")
        *path, leaf = k.split(".")
        obj = torch._inductor.config
        for part in path:
            obj = getattr(obj, part)
        setattr(obj, leaf, v)
    if "mode" in settings:
        model = torch.compile(model, mode=settings["mode"])
    autocast = torch.autocast(DEV, dtype=torch.bfloat16)
    steppers: dict[int, Stepper] = {}  # one per micro-batch count: a graph replays the count it captured
    bad = BadSteps(device, cfg.max_bad_steps)
    data = random_batches(max(8, max_accum), device)

    def step(i: int, accum: int = 1):
        if accum not in steppers:
            steppers[accum] = Stepper(model, raw, opt, 1.0, autocast, dd.world, cfg.fsdp, cfg.cuda_graph, log)
            if not settings.get("fold_clip", True):
                steppers[accum].fold_clip = steppers[accum].graph_wanted = False
        micro = [data[(i * accum + m) % len(data)] for m in range(accum)]
        _, _, ok = steppers[accum](micro, cfg.lr)
        bad.record(ok)
    return step, raw.num_parameters(), dd


def check_graph(steps: int = 12) -> dict:
    """Same seed, same data, same learning rates: the step as a CUDA graph against the step without."""
    runs, data = _graph_runs(steps, (False, True), compile_=DEV == "cuda")
    (l0, p0, _), (l1, p1, captured) = runs[False], runs[True]
    fallback = check_failed_capture(data, _device())
    return {"captured": captured, "steps": steps, "losses_eager": l0, "losses_graph": l1,
            "max_loss_diff": max(abs(a - b) for a, b in zip(l0, l1)),
            "max_weight_diff": max((a - b).abs().max().item() for a, b in zip(p0, p1)), "fallback": fallback}


def _graph_runs(steps: int, graphs: tuple, compile_: bool) -> tuple[dict, list]:
    from luca.distributed import Dist
    from luca.model import ModelConfig
    from luca.step import Stepper
    from luca.train import TrainConfig, build
    device = _device()
    data = random_batches(steps, device)
    runs = {}
    for key in graphs:  # False / "again": no graph; True: the graph; "full-ce": the graph, compiled plain CE
        torch._dynamo.reset()
        cfg = TrainConfig(seq_len=T, micro_batch=B, batch_tokens=B * T, lr=6e-4, compile=compile_, seed=7,
                          loss_impl="full" if key == "full-ce" else "auto")
        raw, model, opt = build(ModelConfig(**SHAPE), cfg, device, Dist())
        stepper = Stepper(model, raw, opt, 1.0, torch.autocast(DEV, dtype=torch.bfloat16), 1, False, bool(key), log)
        losses = []
        for i in range(steps):
            loss, gnorm, ok = stepper([data[i % len(data)]], 6e-4 * min(1.0, (i + 1) / 12))
            losses.append(float(loss))
        runs[key] = (losses, [p.detach().float().clone() for p in raw.parameters()], stepper.graph is not None)
    return runs, data


def check_graph_deterministic(steps: int = 40) -> dict:
    """With deterministic kernels (math attention, cuBLAS workspace config, no compile) two runs
    without the graph are bitwise equal; the graph's run must be bitwise equal to them too."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    torch.use_deterministic_algorithms(True)
    with sdpa_kernel([SDPBackend.MATH]):
        runs, _ = _graph_runs(steps, (False, "again", True, "full-ce"), compile_=False)
    (l0, p0, _), (la, pa, _), (l1, p1, captured) = runs[False], runs["again"], runs[True]
    lf, pf, _ = runs["full-ce"]
    diff = lambda xs, ys: max((a - b).abs().max().item() for a, b in zip(xs, ys))  # noqa: E731
    return {"captured": captured, "steps": steps, "eager_twice_equal": l0 == la and diff(p0, pa) == 0,
            "graph_equal": l0 == l1 and diff(p0, p1) == 0, "max_weight_diff_graph": diff(p0, p1),
            "max_loss_diff_graph": max(abs(a - b) for a, b in zip(l0, l1)), "losses": l0, "losses_graph": l1,
            # luca's head kernel against the compiled plain cross-entropy: not bitwise (the weight gradient
            # is rounded differently), but the same arithmetic, so the runs stay close
            "losses_full_ce": lf, "max_loss_diff_kernel_vs_full_ce": max(abs(a - b) for a, b in zip(l1, lf)),
            "max_weight_diff_kernel_vs_full_ce": diff(p1, pf)}


class _SyncsInForward(torch.nn.Module):
    """Reads its loss back (a host sync): a CUDA graph capture of it fails inside the capture."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, x, y):
        loss = self.inner(x, y)
        float(loss)
        return loss


def check_failed_capture(data: list, device, steps: int = 6) -> dict:
    """A capture that fails inside must leave training on the default stream, taking every step."""
    from luca.distributed import Dist
    from luca.model import ModelConfig
    from luca.step import Stepper
    from luca.train import TrainConfig, build
    cfg = TrainConfig(seq_len=T, micro_batch=B, batch_tokens=B * T, lr=6e-4, compile=False, seed=7)
    raw, _, opt = build(ModelConfig(**SHAPE), cfg, device, Dist())
    said: list[str] = []
    stepper = Stepper(_SyncsInForward(raw), raw, opt, 1.0, torch.autocast(DEV, dtype=torch.bfloat16), 1, False,
                      True, said.append)
    losses = [float(stepper([data[0]], 6e-4)[0]) for _ in range(steps)]  # one batch: its loss must fall
    on_default = DEV != "cuda" or torch.cuda.current_stream() == torch.cuda.default_stream()
    return {"message": said, "losses": losses, "graph": stepper.graph is not None, "on_default_stream": on_default,
            "ok": bool(said) and stepper.graph is None and on_default and all(math.isfinite(x) for x in losses)
            and losses[-1] < losses[0]}


def hf_step_fn(device, accum: int = 1):
    from transformers import LlamaConfig, LlamaForCausalLM
    from luca.optim import param_groups
    from luca.model import ModelConfig
    cfg = LlamaConfig(vocab_size=SHAPE["vocab_size"], hidden_size=SHAPE["d_model"],
                      intermediate_size=ModelConfig(**SHAPE).d_ff,
                      num_hidden_layers=SHAPE["n_layers"], num_attention_heads=SHAPE["n_heads"],
                      num_key_value_heads=SHAPE["n_kv_heads"], max_position_embeddings=T, rms_norm_eps=1e-6,
                      tie_word_embeddings=True, attn_implementation="sdpa")
    model = LlamaForCausalLM(cfg).to(device)
    model.train()
    opt = torch.optim.AdamW(param_groups(model, 0.1), lr=6e-4, betas=(0.9, 0.95), fused=DEV == "cuda")
    fwd = torch.compile(model)
    data = random_batches(max(8, accum), device)

    def step(i: int):
        for m in range(accum):
            batch = data[(i * accum + m) % len(data)]
            with torch.autocast(DEV, dtype=torch.bfloat16):
                loss = fwd(input_ids=batch[:, :-1], labels=batch[:, :-1]).loss  # HF shifts the labels itself
            (loss / accum).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
    n = sum(p.numel() for p in model.parameters())  # parameters() yields the tied matrix once
    return step, n


def _device() -> torch.device:
    if DEV != "cuda":
        return torch.device("cpu")
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    torch.cuda.set_device(device)
    torch.backends.cuda.matmul.allow_tf32 = True
    return device


def _peak_gib(device) -> float:
    return round(torch.cuda.max_memory_allocated(device) / 2 ** 30, 2) if DEV == "cuda" else 0.0


def run_variant(name: str, warmup: int, reps: int, per_rep: int, profile: bool, accum: int = 1) -> dict:
    device = _device()
    settings = VARIANTS[name][1]
    ctx = _sdpa_context(settings.get("sdpa"))
    with ctx:
        if name == "transformers":
            step, n = hf_step_fn(device, accum)
        else:
            luca_step, n, _ = luca_step_fn(settings, device, accum)
            step = lambda i: luca_step(i, accum)  # noqa: E731
        res = time_steps(step, warmup, reps, per_rep)
        if profile:
            res["profile"] = profile_breakdown(step, name=name)
    res.update(variant=name, params=n, tokens_per_step=accum * B * T, accum=accum,
               max_memory_gib=_peak_gib(device))
    if settings.get("fp8_env"):
        res["bench_fp8"] = os.environ.get("BENCH_FP8", "")
    return res


def _sdpa_context(kind):
    from contextlib import nullcontext
    if kind is None:
        return nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel
    return sdpa_kernel([{"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION}[kind]])


def run_dist(accums: list[int], warmup: int, reps: int, per_rep: int) -> list[dict]:
    """Under torchrun (or alone): luca's step with DDP; tokens/s over all ranks."""
    device = _device()
    if os.environ.get("BENCH_NO_OPTIMIZE_DDP"):  # one compiled graph instead of one per DDP bucket
        torch._dynamo.config.optimize_ddp = False
    step, n, dd = luca_step_fn({"graph": not os.environ.get("BENCH_NO_GRAPH")}, device, max(accums))
    out = []
    for accum in accums:  # one model: the compiled graphs serve every accumulation count
        res = time_steps(lambda i: step(i, accum), warmup, reps, per_rep)
        res.update(world=dd.world, accum=accum, params=n, max_memory_gib=_peak_gib(device),
                   tokens_per_s=dd.world * accum * B * T / (res["ms_per_step"] / 1e3))
        out.append(res)
    return out


# -- orchestration ------------------------------------------------------------------------------
def _worker(args: list[str], timeout: float, env: dict | None = None) -> dict:
    """Run a worker process; its last stdout line starting with RESULT is the answer."""
    try:
        r = subprocess.run(args, capture_output=True, text=True, timeout=max(10.0, timeout),
                           env={**os.environ, **(env or {})})
    except subprocess.TimeoutExpired as e:
        err = e.stderr.decode(errors="replace") if isinstance(e.stderr, bytes) else (e.stderr or "")
        log(err[-3000:])
        return {"error": f"timed out after {timeout:.0f} s"}
    lines = [ln for ln in r.stdout.splitlines() if ln.startswith("RESULT ")]
    if r.returncode != 0 or not lines:
        tail = (r.stderr or "")[-3000:]
        log(tail)
        errs = [ln for ln in tail.splitlines() if "Error" in ln or "error" in ln] or tail.strip().splitlines()
        return {"error": (errs or ["exit %d" % r.returncode])[-1][:200]}
    return json.loads(lines[-1][len("RESULT "):])


def _save(out_dir: Path | None, name: str, obj) -> None:
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / name).write_text(json.dumps(obj, indent=2))


def bench(a) -> None:
    from rich.console import Console
    from rich.table import Table
    deadline = time.time() + a.budget
    out_dir = Path(a.out) if a.out else (Path(os.environ["OUT"]) if os.environ.get("OUT") else None)
    gpu = torch.cuda.get_device_name() if DEV == "cuda" else "cpu (smoke)"
    log(f"device: {gpu}, torch {torch.__version__}")
    ceiling = matmul_ceiling()
    log(f"bf16 matmul 8192³: {ceiling:.0f} TFLOP/s")
    loader = loader_time(a.data) if a.data else None
    results = {}
    for name in a.variants.split(","):
        left = deadline - time.time()
        if left < a.min_left:
            results[name] = {"error": f"skipped: {left:.0f} s of the budget left"}
            continue
        log(f"-- {name} ({left:.0f} s left)")
        cmd = [sys.executable, __file__, "--variant", name, "--warmup", str(a.warmup), "--reps", str(a.reps),
               "--per-rep", str(a.per_rep), "--accum", str(a.accum)]
        cmd += ["--profile"] if name in a.profiled.split(",") else []
        results[name] = _worker(cmd, left - 5)
        log(json.dumps({k: v for k, v in results[name].items() if k != "profile"}))
        _save(out_dir, "bench.json", {"device": gpu, "ceiling_tflops": ceiling, "loader": loader, "results": results})

    peer = results.get("transformers", {}).get("ms_per_step")
    table = Table(title=f"training step, GPT-2-small shape (12×768, T={T}, micro-batch {B}, vocab 50304, BF16), "
                        f"{a.accum} micro-batch(es) per optimizer step, on {gpu}; "
                        f"bf16 matmul ceiling {ceiling:.0f} TFLOP/s")
    for col in ("variant", "tokens/s", "ms/micro-batch", "MFU", "vs transformers", "peak GiB", "first step s"):
        table.add_column(col, justify="left" if col == "variant" else "right")
    md = ["| variant | tokens/s | ms/micro-batch | MFU | vs transformers | peak GiB | first step s |",
          "|---|---:|---:|---:|---:|---:|---:|"]
    for name, r in results.items():
        if "ms_per_step" not in r:
            row = [name, "-", "-", "-", "-", "-", r.get("error", "")[:60]]
        else:
            tps = r["tokens_per_step"] / (r["ms_per_step"] / 1e3)
            mfu = tps * flops_per_token(r["params"]) / (ceiling * 1e12)
            ratio = f"{peer / r['ms_per_step']:.2f}×" if peer else "-"
            k = r.get("accum", 1)
            row = [name, f"{tps:,.0f}", f"{r['ms_per_step'] / k:.2f} ({r['ms_min'] / k:.2f}–{r['ms_max'] / k:.2f})",
                   f"{mfu:.1%}", ratio, f"{r['max_memory_gib']:.1f}", f"{r['first_step_s']:.0f}"]
            r.update(tokens_per_s=tps, mfu=mfu)
        table.add_row(*row)
        md.append("| " + " | ".join(row) + " |")
    con = Console(width=160)
    prof = results.get("luca", {}).get("profile")
    if prof:
        con.print(f"luca profile: GPU kernel time {prof['gpu_ms_per_step']:.2f} ms/step; shares "
                  + ", ".join(f"{k} {v:.0%}" for k, v in prof["shares"].items()))
        for t, k in prof["top_kernels"][:8]:
            con.print(f"  {t:7.3f} ms  {k}")
        gaps = prof.get("gaps") or {}
        if gaps:
            con.print(f"GPU timeline: {gaps['kernels_per_step']:.0f} kernels/step, span {gaps['span_ms_per_step']:.2f} "
                      f"ms/step, idle {gaps['idle_ms_per_step']:.2f} ms/step; largest gaps (µs): {gaps['largest'][:6]}")
    if loader:
        step_ms = results.get("luca", {}).get("ms_per_step", 0) / a.accum or None
        share = f" = {loader['loader_ms_per_micro_batch'] / step_ms:.2%} of luca's step" if step_ms else ""
        con.print(f"data loader (memmap → stack → pin, {loader['train_tokens']:,}-token shards): "
                  f"{loader['loader_ms_per_micro_batch']:.3f} ms per {B}×{T + 1} micro-batch{share} "
                  f"(and done by a prefetch thread while the GPU works)")
    con.print(f"MFU = tokens/s × (6·N + 12·L·d·T) / {ceiling:.0f} TFLOP/s; N = parameters in matrix products "
              f"({results.get('luca', {}).get('params', 0):,})")
    con.print(table)
    print("\n".join(md))
    _save(out_dir, "bench.json", {"device": gpu, "ceiling_tflops": ceiling, "loader": loader, "results": results})
    if out_dir is not None:
        (out_dir / "bench.md").write_text("\n".join(md) + "\n")


def scaling(a) -> None:
    """One GPU (with the whole-step CUDA graph, as `luca train` runs there, and without it: the step
    DDP runs), then all GPUs through torchrun + DDP; efficiency against both."""
    n = torch.cuda.device_count() if DEV == "cuda" else 2
    gpu = torch.cuda.get_device_name() if DEV == "cuda" else "cpu (smoke)"
    worker = [__file__, "--dist", "--accums", a.accums, "--warmup", str(a.warmup), "--reps", str(a.reps),
              "--per-rep", str(a.per_rep)]
    one = _worker([sys.executable, *worker], a.budget / 3)
    one_plain = _worker([sys.executable, *worker], a.budget / 3, env={"BENCH_NO_GRAPH": "1"})
    many = _worker([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}", *worker],
                   a.budget / 3)
    print(f"| micro-batches per rank per step | 1 × {gpu} tokens/s (graph / no graph) | {n} × tokens/s (DDP) | "
          f"scaling efficiency vs graph / vs no graph |")
    print("|---:|---:|---:|---:|")
    for r1, r0, rn in zip(one.get("runs", []), one_plain.get("runs", []), many.get("runs", [])):
        e1, e0 = (rn["tokens_per_s"] / (n * r["tokens_per_s"]) for r in (r1, r0))
        print(f"| {r1['accum']} | {r1['tokens_per_s']:,.0f} / {r0['tokens_per_s']:,.0f} | {rn['tokens_per_s']:,.0f} | "
              f"{e1:.1%} / {e0:.1%} |")
    for name, r in (("one", one), ("one without graph", one_plain), ("many", many)):
        if "error" in r:
            print(f"error ({name}): {r['error']}")
    out_dir = Path(os.environ["OUT"]) if os.environ.get("OUT") else None
    _save(out_dir, "scaling.json", {"device": gpu, "gpus": n, "one": one, "one_no_graph": one_plain, "many": many})


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", help="a luca data directory (token shards) for the loader measurement")
    p.add_argument("--variants", default="luca,transformers,luca-autograd-accum,luca-bf16-residual",
                   help=f"comma list of {', '.join(VARIANTS)}")
    p.add_argument("--budget", type=float, default=540, help="seconds for the whole run")
    p.add_argument("--min-left", type=float, default=75, help="skip a variant with less than this left")
    p.add_argument("--accum", type=int, default=40,
                   help="micro-batches per optimizer step (40: nano-n2's own step on one GPU; 1: an update each)")
    p.add_argument("--warmup", type=int, help="steps before timing (default 8, or 3 with --accum > 4)")
    p.add_argument("--reps", type=int, help="timed repetitions (default 5, or 3 with --accum > 4)")
    p.add_argument("--per-rep", type=int, help="steps per repetition (default 20, or 2 with --accum > 4)")
    p.add_argument("--profiled", default="luca", help="variants whose GPU kernels are profiled (comma list)")
    p.add_argument("--out", help="folder for bench.json / bench.md (default: $OUT if set)")
    p.add_argument("--variant", help=argparse.SUPPRESS)
    p.add_argument("--profile", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--dist", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--scaling", action="store_true", help="1 GPU vs all GPUs of the machine (DDP)")
    p.add_argument("--check-graph", action="store_true", help="the CUDA-graph step against the ordinary one")
    p.add_argument("--deterministic", action="store_true", help="--check-graph with deterministic kernels: bitwise")
    p.add_argument("--accums", default="1,4", help="micro-batches per rank per step, for --scaling")
    p.add_argument("--no-optimize-ddp", action="store_true",
                   help="--scaling: compile DDP as one graph (torch._dynamo.config.optimize_ddp = False)")
    a = p.parse_args()
    # a step of 40 micro-batches takes about a second on an H100: fewer of them are timed
    long_steps = (max(int(x) for x in a.accums.split(",")) if a.scaling else a.accum) > 4
    a.warmup = a.warmup if a.warmup is not None else 3 if long_steps else 8
    a.reps = a.reps if a.reps is not None else 3 if long_steps else 5
    a.per_rep = a.per_rep if a.per_rep is not None else 2 if long_steps else 20
    if a.no_optimize_ddp:
        os.environ["BENCH_NO_OPTIMIZE_DDP"] = "1"
    if a.deterministic:  # before cuBLAS starts: its deterministic mode needs a fixed workspace
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    if DEV == "cuda" and not torch.cuda.is_available():
        sys.exit("bench_train.py needs a CUDA GPU")
    if a.check_graph and a.deterministic:
        r = check_graph_deterministic()
        print(f"deterministic CUDA graph check over {r['steps']} steps: captured {r['captured']}; two runs without "
              f"the graph bitwise equal: {r['eager_twice_equal']}; the graph's run bitwise equal to them: "
              f"{r['graph_equal']} (largest weight difference {r['max_weight_diff_graph']:.2e}, loss "
              f"{r['max_loss_diff_graph']:.2e})")
        print(f"head kernel vs compiled plain CE (both with the graph): largest loss difference "
              f"{r['max_loss_diff_kernel_vs_full_ce']:.2e}, weight {r['max_weight_diff_kernel_vs_full_ce']:.2e}")
        print("losses, kernel :", " ".join(f"{x:.4f}" for x in r["losses_graph"]))
        print("losses, full CE:", " ".join(f"{x:.4f}" for x in r["losses_full_ce"]))
        _save(Path(os.environ["OUT"]) if os.environ.get("OUT") else None, "check_graph_deterministic.json", r)
    elif a.check_graph:
        r = check_graph()
        print(f"CUDA graph check: captured {r['captured']}, max loss difference {r['max_loss_diff']:.2e}, "
              f"max weight difference {r['max_weight_diff']:.2e} over {r['steps']} steps")
        print("losses eager:", " ".join(f"{x:.4f}" for x in r["losses_eager"]))
        print("losses graph:", " ".join(f"{x:.4f}" for x in r["losses_graph"]))
        fb = r["fallback"]
        print(f"capture forced to fail inside: fell back {'correctly' if fb['ok'] else 'WRONGLY'}; message "
              f"{fb['message']}; on the default stream {fb['on_default_stream']}; losses "
              + " ".join(f"{x:.4f}" for x in fb["losses"]))
        _save(Path(os.environ["OUT"]) if os.environ.get("OUT") else None, "check_graph.json", r)
    elif a.variant:
        print("RESULT " + json.dumps(run_variant(a.variant, a.warmup, a.reps, a.per_rep, a.profile, a.accum)),
              flush=True)
    elif a.dist:
        runs = run_dist([int(x) for x in a.accums.split(",")], a.warmup, a.reps, a.per_rep)
        if int(os.environ.get("RANK", 0)) == 0:
            print("RESULT " + json.dumps({"runs": runs}), flush=True)
    elif a.scaling:
        scaling(a)
    else:
        bench(a)


if __name__ == "__main__":
    main()
