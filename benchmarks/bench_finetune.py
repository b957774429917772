"""QLoRA fine-tuning on one GPU: luca against transformers + peft + bitsandbytes, same settings, same call.

The model is Qwen2.5-1.5B-shaped with random weights (28 layers, hidden 1536, intermediate 8960,
12 query / 2 KV heads, head 128, vocab 151,936, QKV bias, tied embeddings, RoPE θ 1e6), written
once as a BF16 checkpoint that both sides load. Settings on both sides: base weights 4-bit NF4 with
double-quantised scales (bitsandbytes), BF16 compute (autocast), LoRA r=16, α=16, dropout 0.05 on
q,k,v,o,gate,up,down, gradient checkpointing, AdamW (fused on CUDA), micro-batch 4 × 1024 random
tokens, loss on every token.

- luca: `rundir.load_model` → `luca.finetune.lora.apply_lora(quantize=True)` (the layers
  `luca finetune --qlora` trains), the model's fused chunked cross-entropy (full-vocabulary logits
  are never materialised). Variants, each its own row: `luca` (what `luca finetune --qlora` runs:
  NF4 dequantised by luca's torch.compile'd kernel on CUDA, dequantised weights kept through the
  checkpoint recompute), `luca-compile` (the same plus `--compile`: every block torch.compile'd),
  `luca-bnb` (bitsandbytes' dequant kernels, 3 dequantisations per step: the first measured path).
- peer: `AutoModelForCausalLM.from_pretrained(quantization_config=BitsAndBytesConfig(nf4, double
  quant, bf16 compute))` → `peft.prepare_model_for_kbit_training` → `get_peft_model(LoraConfig)`,
  `model(input_ids, labels)` under BF16 autocast (what `Trainer(bf16=True)` does): the usual
  QLoRA recipe.

Each side runs in its own process (so each peak-memory figure is its own), warm-up steps excluded,
CUDA-synchronised wall clock over the timed steps. Peak memory is `torch.cuda.max_memory_allocated`
from the first training step on (weights included); reserved memory is shown beside it. Each luca
row is then profiled over 2 more steps (`--no-profile` skips it): "GPU busy" is the kernels' time
over the wall clock (low: the step is bound by Python and launches), and the top kernels are listed.

    python benchmarks/bench_finetune.py            # on a GPU (H100: a few minutes)
    python benchmarks/bench_finetune.py --smoke    # a tiny shape on the CPU: checks the plumbing only

peft and bitsandbytes are not in the GPU image: install them first (e.g. from carried wheels,
`pip install --no-deps peft-*.whl bitsandbytes-*.whl`); without them the peer's row says why.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

FULL = dict(vocab_size=151936, n_layers=28, d_model=1536, n_heads=12, n_kv_heads=2, head_dim=128, d_ff=8960,
            max_seq_len=32768, rope_theta=1_000_000.0, qkv_bias=True, tie_embeddings=True)
SMOKE = dict(vocab_size=512, n_layers=2, d_model=64, n_heads=4, n_kv_heads=2, head_dim=16, d_ff=128,
             max_seq_len=256, rope_theta=1_000_000.0, qkv_bias=True, tie_embeddings=True)
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
LUCA_VARIANTS = {  # side: (what it is, settings)
    "luca": ("luca finetune --qlora: fused NF4 dequant (torch.compile'd on CUDA), weights kept through the "
             "checkpoint recompute", {"dequant": "auto", "keep": True, "compile": False}),
    "luca-compile": ("the same with --compile (each block torch.compile'd)",
                     {"dequant": "auto", "keep": True, "compile": True}),
    "luca-bnb": ("bitsandbytes' dequant kernels, dequantised 3× per step (the first measured path)",
                 {"dequant": "bnb", "keep": False, "compile": False}),
}
PEER_REFERENCE = "H100 reference for the peer: 18.46M trainable, ~10.6k tokens/s, 34.6 GiB peak"


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# -- workers ------------------------------------------------------------------------------------
def build_checkpoint(a) -> dict:
    """A random-weight BF16 checkpoint of the shape (luca writes it; both sides read it)."""
    import torch
    from luca import rundir
    from luca.model import ModelConfig, Transformer
    shape = SMOKE if a.smoke else FULL
    dev = "cuda" if torch.cuda.is_available() and not a.smoke else "cpu"
    torch.manual_seed(0)
    with torch.device(dev):  # random init on the GPU: seconds instead of a minute of CPU
        model = Transformer(ModelConfig(**shape))
    rundir.save_model(a.ckpt, model)
    return {"parameters": model.num_parameters()}


def _device(a):
    import torch
    return torch.device("cuda" if torch.cuda.is_available() and not a.smoke else "cpu")


def _batch(a, vocab: int, device):
    import torch
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, vocab, (a.micro_batch, a.seq_len + 1), generator=g).to(device)


def _time(a, step, device) -> dict:
    import resource

    import torch
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t_first = time.perf_counter()
    step()
    if cuda:
        torch.cuda.synchronize()
    first_s = time.perf_counter() - t_first
    for _ in range(a.warmup - 1):
        step()
    if cuda:
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    losses = [step() for _ in range(a.steps)]
    if cuda:
        torch.cuda.synchronize()
    dt = (time.perf_counter() - t0) / a.steps
    out = {"ms_per_step": dt * 1e3, "tokens_per_s": a.micro_batch * a.seq_len / dt, "first_step_s": first_s,
           "loss": float(losses[-1])}
    if cuda:
        out.update(peak_gib=torch.cuda.max_memory_allocated() / 2**30,
                   reserved_gib=torch.cuda.max_memory_reserved() / 2**30, device=torch.cuda.get_device_name())
    else:  # the CPU smoke: peak resident memory of the process, not comparable to a GPU figure
        out.update(peak_gib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, reserved_gib=None,
                   device="cpu")
    return out


def run_luca(a) -> dict:
    import torch
    from luca import rundir
    from luca.finetune.lora import (LoraSpec, apply_lora, compile_blocks, lora_modules, set_dequant,
                                    set_gradient_checkpointing, trainable_parameters)
    from luca.optim import adamw
    device = _device(a)
    how = LUCA_VARIANTS[a.side][1]
    t = time.perf_counter()
    model = rundir.load_model(a.ckpt, device="cpu", dtype=torch.bfloat16)
    apply_lora(model, LoraSpec(r=a.r, alpha=a.alpha, dropout=a.dropout, targets=["all"]), quantize=True,
               device=device)
    set_gradient_checkpointing(model, True)
    for m in lora_modules(model).values():
        m.keep_weight = how["keep"]
    set_dequant(model, how["dequant"])
    if how["compile"]:
        compile_blocks(model)
    model.loss_impl = "chunked"  # the fused chunked cross-entropy (the default; said here to be sure)
    model.train()
    setup_s = time.perf_counter() - t
    opt = adamw(model, 2e-4, 0.0, (0.9, 0.999), device_type=device.type)
    batch = _batch(a, model.cfg.vocab_size, device)
    x, y = batch[:, :-1], batch[:, 1:]

    def step():
        with torch.autocast(device.type, dtype=torch.bfloat16):
            loss = model(x, y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach()

    res = _time(a, step, device)
    res.update(trainable=trainable_parameters(model)[0], setup_s=setup_s)
    if a.profile:
        res["profile"] = _profile(step, device, res["ms_per_step"])
    return res


def _profile(step, device, ms_per_step: float, steps: int = 2) -> dict:
    """GPU kernel time per step against the wall clock (how busy the GPU is) and the top kernels."""
    import torch
    from torch.profiler import ProfilerActivity, profile
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=acts) as prof:
        for _ in range(steps):
            step()
        if device.type == "cuda":
            torch.cuda.synchronize()
    rows = []
    for e in prof.key_averages():
        if device.type == "cuda":  # kernels only (an op's own device time would count them twice)
            if e.device_type != torch.autograd.DeviceType.CUDA:
                continue
            us = getattr(e, "self_device_time_total", None) or getattr(e, "self_cuda_time_total", 0) or 0
        else:
            us = e.self_cpu_time_total
        if us > 0:
            rows.append((us / steps / 1e3, e.key[:90], e.count // steps))
    rows.sort(reverse=True)
    busy = sum(r[0] for r in rows) if device.type == "cuda" else None
    n_ops = sum(e.count for e in prof.key_averages() if e.key.startswith("aten::")) // steps
    return {"gpu_ms_per_step": busy, "gpu_busy": busy / ms_per_step if busy else None, "aten_ops_per_step": n_ops,
            "top": rows[:12]}


def run_peer(a) -> dict:
    import torch
    try:
        import bitsandbytes  # noqa: F401
        import peft
        import transformers
    except ImportError as e:
        return {"error": f"needs {e.name}: pip install peft bitsandbytes"}
    device = _device(a)
    t = time.perf_counter()
    q = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                        bnb_4bit_compute_dtype=torch.bfloat16)
    model = transformers.AutoModelForCausalLM.from_pretrained(
        a.ckpt, quantization_config=q, dtype=torch.bfloat16, attn_implementation="sdpa",
        device_map={"": device.index if device.type == "cuda" and device.index is not None else
                    (0 if device.type == "cuda" else "cpu")})
    model.config.use_cache = False
    model = peft.prepare_model_for_kbit_training(model, use_gradient_checkpointing=True)
    model = peft.get_peft_model(model, peft.LoraConfig(r=a.r, lora_alpha=a.alpha, lora_dropout=a.dropout,
                                                       target_modules=TARGETS, bias="none", task_type="CAUSAL_LM"))
    model.train()
    setup_s = time.perf_counter() - t
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=2e-4, weight_decay=0.0, **({"fused": True} if device.type == "cuda" else {}))
    batch = _batch(a, model.config.vocab_size, device)
    x = batch[:, :-1].contiguous()

    def step():
        with torch.autocast(device.type, dtype=torch.bfloat16):
            loss = model(input_ids=x, labels=x).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach()

    res = _time(a, step, device)
    res.update(trainable=sum(p.numel() for p in params), setup_s=setup_s,
               versions=f"transformers {transformers.__version__}, peft {peft.__version__}, "
                        f"bitsandbytes {bitsandbytes.__version__}")
    return res


# -- orchestration ------------------------------------------------------------------------------
def _worker(a, side: str, timeout: float) -> dict:
    cmd = [sys.executable, __file__, "--side", side, "--ckpt", str(a.ckpt), "--steps", str(a.steps),
           "--warmup", str(a.warmup), "--micro-batch", str(a.micro_batch), "--seq-len", str(a.seq_len),
           "--r", str(a.r), "--alpha", str(a.alpha), "--dropout", str(a.dropout)] + (["--smoke"] if a.smoke else []) \
        + ([] if a.profile and side.startswith("luca") else ["--no-profile"])
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=max(10.0, timeout))
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    lines = [ln for ln in r.stdout.splitlines() if ln.startswith("RESULT ")]
    if r.returncode != 0 or not lines:
        tail = (r.stderr or "")[-3000:]
        log(tail)
        return {"error": (tail.strip().splitlines() or [f"exit {r.returncode}"])[-1][:160]}
    return json.loads(lines[-1][len("RESULT "):])


def bench(a) -> None:
    deadline = time.time() + a.budget
    tmp = None
    if a.ckpt is None:
        tmp = Path(tempfile.mkdtemp(prefix="bench_finetune_"))
        a.ckpt = tmp / "ckpt"
    try:
        if not (Path(a.ckpt) / "model.safetensors").is_file():
            log(f"writing the random-weight checkpoint → {a.ckpt}")
            built = _worker_build(a, deadline - time.time())
            if "error" in built:
                sys.exit(f"could not build the checkpoint: {built['error']}")
        results = {}
        for side in a.sides.split(","):
            left = deadline - time.time()
            log(f"-- {side} ({left:.0f} s left)")
            results[side] = _worker(a, side, left - 5)
            log(json.dumps(results[side]))
        report(a, results)
    finally:
        if tmp is not None and not a.keep:
            shutil.rmtree(tmp, ignore_errors=True)


def _worker_build(a, timeout: float) -> dict:
    cmd = [sys.executable, __file__, "--side", "build", "--ckpt", str(a.ckpt)] + (["--smoke"] if a.smoke else [])
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=max(10.0, timeout))
    lines = [ln for ln in r.stdout.splitlines() if ln.startswith("RESULT ")]
    if r.returncode != 0 or not lines:
        log(r.stderr[-3000:])
        return {"error": (r.stderr.strip().splitlines() or [f"exit {r.returncode}"])[-1]}
    return json.loads(lines[-1][len("RESULT "):])


def report(a, results: dict) -> None:
    peer = results.get("peer", {})
    shape = "tiny smoke shape on the CPU (plumbing only)" if a.smoke else "Qwen2.5-1.5B shape"
    dev = next((r["device"] for r in results.values() if r.get("device")), "?")
    title = (f"QLoRA r={a.r} α={a.alpha:g} dropout {a.dropout:g} on 7 projections, NF4 + double quant, BF16, "
             f"grad. checkpointing, micro-batch {a.micro_batch}×{a.seq_len}, {shape}, {dev}")
    mem = "peak GiB" + (" (RSS)" if a.smoke else "")
    cols = ("side", "trainable", mem, "reserved GiB", "tokens/s", "ms/step", "memory vs peer", "speed vs peer",
            "GPU busy", "first step s", "setup s")
    rows = []
    for side, r in results.items():
        if "ms_per_step" not in r:
            rows.append((side, r.get("error", "failed")[:90], *["-"] * (len(cols) - 2)))
            continue
        has_peer = "ms_per_step" in peer and side != "peer"
        mem_ratio = r["peak_gib"] / peer["peak_gib"] if has_peer else None
        speed = r["tokens_per_s"] / peer["tokens_per_s"] if has_peer else None
        goal = not a.smoke and has_peer
        busy = (r.get("profile") or {}).get("gpu_busy")
        rows.append((side, f"{r['trainable']:,}", f"{r['peak_gib']:.2f}",
                     f"{r['reserved_gib']:.2f}" if r.get("reserved_gib") is not None else "-",
                     f"{r['tokens_per_s']:,.0f}", f"{r['ms_per_step']:.1f}",
                     "-" if mem_ratio is None else f"{mem_ratio:.2f}×" + (" ✓" if goal and mem_ratio <= 0.5 else
                                                                          " ✗" if goal else ""),
                     "-" if speed is None else f"{speed:.2f}×" + (" ✓" if goal and speed >= 1.3 else
                                                                   " ✗" if goal else ""),
                     "-" if busy is None else f"{busy:.0%}", f"{r['first_step_s']:.1f}", f"{r['setup_s']:.1f}"))
    md = ["| " + " | ".join(cols) + " |", "|---|" + "---:|" * (len(cols) - 1)] + ["| " + " | ".join(r) + " |"
                                                                                 for r in rows]
    notes = [f"goals: memory ≤ 0.50× and tokens/s ≥ 1.30× the peer's; {PEER_REFERENCE}"]
    for side, (what, _) in LUCA_VARIANTS.items():
        if side in results:
            notes.append(f"{side}: {what}")
    if peer.get("versions"):
        notes.append(f"peer: transformers + peft + bitsandbytes ({peer['versions']}), prepare_model_for_kbit_training")
    for side, r in results.items():
        prof = r.get("profile")
        if prof:
            notes.append(f"{side} profile: " + (f"GPU kernels {prof['gpu_ms_per_step']:.1f} ms of each step, "
                                                if prof.get("gpu_ms_per_step") else "")
                         + f"{prof['aten_ops_per_step']:,} aten ops per step; top: "
                         + "; ".join(f"{k} {ms:.1f} ms ×{n}" for ms, k, n in prof["top"][:6]))
    out_dir = Path(os.environ["OUT"]) if os.environ.get("OUT") else None
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "bench_finetune.json").write_text(json.dumps({"title": title, "results": results}, indent=2))
        (out_dir / "bench_finetune.md").write_text(title + "\n\n" + "\n".join(md) + "\n\n" +
                                                   "\n".join(f"- {n}" for n in notes) + "\n")
    print("\n".join(notes))
    print("\n".join(md))
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:
        print(title)
        return
    t = Table(title=title)
    for c in cols:
        t.add_column(c, justify="left" if c == "side" else "right")
    for r in rows:
        t.add_row(*r)
    Console(width=180).print(t)  # the table, last


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--smoke", action="store_true", help="tiny shape on the CPU: checks the code path, measures nothing")
    p.add_argument("--steps", type=int, default=None, help="timed steps (default 10; smoke 2)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 3; smoke 1)")
    p.add_argument("--micro-batch", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=None, help="default 1024; smoke 64")
    p.add_argument("--r", type=int, default=16)
    p.add_argument("--alpha", type=float, default=16.0)
    p.add_argument("--dropout", type=float, default=0.05)
    p.add_argument("--sides", default="luca,luca-compile,luca-bnb,peer",
                   help=f"comma-separated: {', '.join(LUCA_VARIANTS)}, peer")
    p.add_argument("--no-profile", dest="profile", action="store_false",
                   help="skip the GPU-busy share and top kernels of the luca sides (2 extra steps each)")
    p.add_argument("--ckpt", type=Path, help="checkpoint directory (written if missing; default: a temporary one)")
    p.add_argument("--keep", action="store_true", help="keep the temporary checkpoint")
    p.add_argument("--budget", type=float, default=560, help="seconds for the whole run")
    p.add_argument("--side", choices=["build", "peer", *LUCA_VARIANTS], help=argparse.SUPPRESS)
    a = p.parse_args()
    a.steps = a.steps or (2 if a.smoke else 10)
    a.warmup = max(1, a.warmup or (1 if a.smoke else 3))
    a.seq_len = a.seq_len or (64 if a.smoke else 1024)
    if a.side:
        fn = {"build": build_checkpoint, "peer": run_peer}.get(a.side, run_luca)
        res = fn(a)
        print("RESULT " + json.dumps(res), flush=True)
        return
    import torch
    if not a.smoke and not torch.cuda.is_available():
        sys.exit("bench_finetune.py needs a CUDA GPU (or --smoke for the CPU plumbing check)")
    bench(a)


if __name__ == "__main__":
    main()
