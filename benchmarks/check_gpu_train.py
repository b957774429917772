"""`luca train` and `luca finetune` end to end on one GPU: the CUDA-graph step in the real loop.

One call (a few minutes on an H100), everything built on the machine from the interpreter's own
standard library (`builtin:python`), nothing downloaded:
1. data and a 4,096-token BPE tokenizer;
2. a ~20M-parameter model (8 layers × 512) trained for `--steps` steps three ways: with the
   whole-step CUDA graph (the default), without it (`train.cuda_graph = false`), with the compiled
   plain cross-entropy instead of luca's kernel (`train.loss_impl = "full"`), and with the graph
   but interrupted halfway and resumed from its checkpoint (a fresh capture after the resume);
   each with validation, checkpoints and logging as `luca train` does them (`--runs` picks);
3. LoRA fine-tuning of the first run on synthetic arithmetic chats, with the default compile (on
   CUDA) and with `compile = false`.

It prints validation BPB, tokens/s and wall time per run: the graph must not change what is
learned (BPB within noise of the run without it, the resumed run likewise) and must not be slower.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work", default="/tmp/luca_gpu_check")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--seeds", default="3", help="comma list: each training run once per seed")
    p.add_argument("--runs", default="no-graph,again,resumed,full-ce,cast-each",
                   help="training runs beside the default one (with the graph), per seed where it applies; "
                        "also bf16-residual, unfused-qkv, autograd-accum, unfolded-norms, muon and muon-folded (per seed)")
    p.add_argument("--micro-batch", type=int, default=32,
                   help="sequences per micro-batch; below 32 the 32-sequence step accumulates micro-batches")
    p.add_argument("--lr", type=float, default=2e-3, help="peak learning rate of the training runs")
    p.add_argument("--no-finetune", action="store_true")
    p.add_argument("--kernels-only", action="store_true", help="only the kernels-against-autograd check")
    p.add_argument("--say", action="store_true", help="print the training runs' messages (graph capture, ...)")
    p.add_argument("--muon-capture", action="store_true",
                   help="only Muon's folded step: its time against the plain one, and its CUDA-graph capture")
    p.add_argument("--smoke", action="store_true", help="a tiny model for a few steps (checks the plumbing on a CPU)")
    a = p.parse_args()
    import torch

    from luca.config import build
    from luca.finetune import finetune, resolve_config
    from luca.model import ModelConfig
    from luca.train import TrainConfig, train

    if a.muon_capture:
        return muon_capture(torch, a.smoke)
    kernels_vs_autograd = kernel_check(torch)
    print("luca's GPU kernels against autograd (FP32, TF32 off): " + json.dumps(kernels_vs_autograd), flush=True)
    if a.kernels_only:
        return
    work = Path(a.work)
    data_dir = work / "data"
    t0 = time.perf_counter()
    tok, n_train = corpus("builtin:python", data_dir)
    print(f"data + tokenizer: {time.perf_counter() - t0:.1f} s; {n_train:,} training tokens, which "
          f"{a.steps} steps of 32,768 pass over {a.steps * 32768 / n_train:.1f} times", flush=True)

    mc = ModelConfig(vocab_size=4096, n_layers=8, d_model=512, n_heads=8, n_kv_heads=4, max_seq_len=512)
    tc = dict(seq_len=512, micro_batch=a.micro_batch, batch_tokens=32768, max_steps=a.steps, lr=a.lr, warmup_steps=30,
              schedule="wsd", eval_every=100, eval_batches=16, save_every=a.steps // 2, log_every=25,
              compile=True, seed=3)
    tc["log_every"] = 10
    ft_steps = 60
    if a.smoke:
        mc = ModelConfig(vocab_size=4096, n_layers=2, d_model=64, n_heads=4, n_kv_heads=2, max_seq_len=512)
        tc.update(micro_batch=2, batch_tokens=1024, max_steps=6, save_every=3, eval_every=3, eval_batches=2,
                  log_every=1, compile=False, warmup_steps=1)
        a.steps, ft_steps = 6, 4
    rows, curves, val_curves = {}, {}, {}
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"

    def save() -> None:
        """Results so far into $OUT after every run: a call cut off by its time limit keeps them."""
        if os.environ.get("OUT"):
            Path(os.environ["OUT"], "check_gpu_train.json").write_text(json.dumps(
                {"gpu": gpu, "kernels_vs_autograd": kernels_vs_autograd, "runs": rows, "loss_curves": curves,
                 "val_bpb_curves": val_curves}, indent=2))

    def run(name: str, until_half: bool = False, **over) -> None:
        torch._dynamo.reset()
        out = work / name
        name = f"{name} seed {over['seed']}" if "seed" in over else name
        cfg = build(TrainConfig, {**tc, **over}, "train")
        t = time.perf_counter()
        if until_half:
            train(out, mc, cfg, data_dir, tok, progress=a.say, until=a.steps // 2)
            torch._dynamo.reset()
            s = train(out, mc, cfg, data_dir, tok, resume=True, progress=a.say)
        else:
            s = train(out, mc, cfg, data_dir, tok, progress=a.say)
        recs = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
        late = [r["tokens_per_s"] for r in recs if r["step"] > a.steps // 3 and "val_bpb" not in r]
        curves[name] = [round(r["loss"], 3) for r in recs if "loss" in r]
        val_curves[name] = [(r["step"], r["val_bpb"]) for r in recs if "val_bpb" in r]
        rows[name] = {"val_bpb": s["val_bpb"], "final_loss": s["final_train_loss"], "wall_s": time.perf_counter() - t,
                      "tokens_per_s": sorted(late)[len(late) // 2] if late else s["tokens_per_s"],
                      "bad_steps": s["bad_steps"], "max_memory_gib": s.get("max_memory_gib")}
        print(name, json.dumps(rows[name]), flush=True)
        save()

    runs, first = set(a.runs.split(",")), int(a.seeds.split(",")[0])
    for seed in [int(x) for x in a.seeds.split(",")]:
        run("train-graph", seed=seed)
        if "no-graph" in runs:
            run("train-no-graph", cuda_graph=False, seed=seed)
        if "full-ce" in runs:  # the compiled plain cross-entropy instead of luca's kernel (luca/kernels.py)
            run("train-full-ce", loss_impl="full", seed=seed)
        if "cast-each" in runs:  # weights cast in every micro-batch, not once per step (train.cast_once)
            run("train-cast-each", cast_once=False, seed=seed)
        if "bf16-residual" in runs:  # the residual stream in BF16 (train.bf16_residual)
            run("train-bf16-residual", bf16_residual=True, seed=seed)
        if "unfused-qkv" in runs:  # q, k, v as three GEMMs, RoPE's backward compiled (train.fuse_qkv)
            run("train-unfused-qkv", fuse_qkv=False, seed=seed)
        if "fp8-head" in runs:  # the head's GEMMs in FP8 (train.fp8_head, luca/fp8_head.py)
            run("train-fp8-head", fp8_head=True, seed=seed)
        if "unfolded-norms" in runs:  # the norms apply their own weights (train.fold_norms = false)
            run("train-unfolded-norms", fold_norms=False, seed=seed)
        if "autograd-accum" in runs:  # autograd adds each micro-batch's gradients (train.accum_in_gemm)
            run("train-autograd-accum", accum_in_gemm=False, seed=seed)
        if "muon" in runs:  # Muon's plain step: without the graph luca.step does not fold its clip
            run("train-muon", optimizer="muon", cuda_graph=False, seed=seed)
        if "muon-folded" in runs:  # Muon as luca train runs it: the folded step, replayed as a CUDA graph
            run("train-muon-folded", optimizer="muon", seed=seed)
    if "again" in runs:
        run("train-no-graph-again", cuda_graph=False, seed=first)  # GPU kernels' own spread
    if "resumed" in runs:
        run("train-graph-resumed", until_half=True, seed=first)
    for name, c in curves.items():
        print(f"loss every {tc['log_every']} steps, {name}: {' '.join(map(str, c))}")

    chats = work / "chats.jsonl"
    rng = random.Random(0)
    with chats.open("w") as f:
        for _ in range(600):
            x, y = rng.randint(1, 99), rng.randint(1, 99)
            f.write(json.dumps({"messages": [{"role": "user", "content": f"What is {x} + {y}?"},
                                             {"role": "assistant", "content": f"{x} + {y} = {x + y}."}]}) + "\n")
    for name, comp in (() if a.no_finetune else (("finetune-compiled", None), ("finetune-eager", False))):
        torch._dynamo.reset()
        cfg = resolve_config(None, {"finetune.max_steps": ft_steps, "finetune.micro_batch": 16,
                                    "finetune.seq_len": 256, "finetune.eval_every": 30, "finetune.log_every": 10},
                             compile=comp)
        t = time.perf_counter()
        s = finetune(work / "train-graph", [str(chats)], work / name, cfg, progress=False)
        rows[name] = {"wall_s": time.perf_counter() - t, **{k: s.get(k) for k in
                                                              ("tokens_per_s", "val_loss_after", "final_train_loss")}}
        logged = [json.loads(x).get("tokens_per_s") for x in (work / name / "metrics.jsonl").read_text().splitlines()]
        logged = sorted(x for x in logged[len(logged) // 2:] if x)  # the second half: compiled, warm
        if logged:
            rows[name]["tokens_per_s"] = logged[len(logged) // 2]
        print(name, json.dumps(rows[name]), flush=True)

    save()
    print(f"\n| run ({gpu}) | val BPB | final loss | tokens/s | wall s |")
    print("|---|---:|---:|---:|---:|")
    for name, r in rows.items():
        bpb = f"{r['val_bpb']:.4f}" if "val_bpb" in r else f"chat val loss {r.get('val_loss_after')}"
        tps = f"{r['tokens_per_s']:,.0f}" if r.get("tokens_per_s") else "-"
        print(f"| {name} | {bpb} | {r.get('final_loss', r.get('final_train_loss'))} | {tps} | {r['wall_s']:.0f} |")
    paired(rows, [int(x) for x in a.seeds.split(",")])


def corpus(source: str, data_dir: Path):
    """(tokenizer, training tokens): `source` collected into `data_dir`, a 4,096-token BPE trained on
    it and the shards tokenized (also benchmarks/fp8_head_quality.py's data)."""
    from luca import data as D
    from luca.tokenizer import TokenizerConfig, build_tokenizer
    D.collect(D.DataConfig(sources=[source]), data_dir, progress=False)
    tok = build_tokenizer(TokenizerConfig(kind="bpe", vocab_size=4096), D.iter_documents(data_dir, "train"))
    D.tokenize(data_dir, tok, progress=False)
    return tok, D.TokenShards(data_dir, "train").n_tokens


def kernel_check(torch) -> dict:
    """The training forward and backward with luca's kernels (fused q/k/v with the RoPE-backward
    kernel, the SwiGLU-backward kernel) against plain autograd on the same weights, in FP32 with TF32
    off: the largest gradient difference relative to that gradient's largest entry."""
    from luca.model import ModelConfig, Transformer
    device = "cuda" if torch.cuda.is_available() else "cpu"
    tf32 = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    torch.manual_seed(0)
    m = Transformer(ModelConfig(vocab_size=4096, n_layers=4, d_model=512, n_heads=8, n_kv_heads=4,
                                max_seq_len=512)).to(device)
    x = torch.randint(0, 4096, (4, 513), device=device)
    grads = {}
    for fused in (False, True):
        m.set_gpu_training(fused)
        m.zero_grad(set_to_none=True)
        loss = m(x[:, :-1], x[:, 1:])
        loss.backward()
        grads[fused] = (loss.item(), [p.grad.clone() for p in m.parameters()])
    # The same fused model compiled: the compiler traces luca's autograd functions itself (torch
    # 2.11's dropped q's and k's gradients in FP32 through a no-op cast in RopeQKV: kernels.cast).
    torch._dynamo.reset()
    m.zero_grad(set_to_none=True)
    loss = torch.compile(m)(x[:, :-1], x[:, 1:])
    loss.backward()
    grads["compiled"] = (loss.item(), [p.grad.clone() for p in m.parameters()])
    torch._dynamo.reset()
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32
    rel = lambda xs, ys: max(((a - b).abs().max() / b.abs().max()).item() for a, b in zip(xs, ys))  # noqa: E731
    # In BF16 under autocast, two micro-batches: gradients added by the GEMMs into kept buffers
    # (keep_grads, the default with accumulation on one GPU) against autograd's adds.
    acc = {}
    m.set_gpu_training(True)
    for keep in (False, True):
        m.keep_grads(keep)
        m.zero_grad(set_to_none=not keep)
        for i in range(2):
            with torch.autocast(device, dtype=torch.bfloat16):
                loss = m(x[i::2, :-1], x[i::2, 1:])
            loss.backward()
        acc[keep] = [p.grad.clone() for p in m.parameters()]
    m.keep_grads(False)
    return {"loss_diff": abs(grads[True][0] - grads[False][0]), "max_rel_grad_diff": rel(grads[True][1], grads[False][1]),
            "compiled_max_rel_grad_diff": rel(grads["compiled"][1], grads[False][1]),
            "kept_grads_max_rel_diff_bf16": rel(acc[True], acc[False]), **fp8_kernel_check(torch, device)}


def fp8_kernel_check(torch, device: str) -> dict:
    """The FP8 head's kernel (luca/fp8_head.py) writes every entry of both gradient layouts, the same
    values in each: its outputs are filled with NaN first, and the logits come from an FP8 GEMM right
    before, as in training (in session 12 a float8 conversion feeding both stores left foreign bytes in
    the transposed one after such a GEMM, triton-lang/triton#11111, and not after torch.randn)."""
    from luca import fp8_head
    if not fp8_head.supported(torch.device(device)):
        return {}
    res = {}
    for n, v in ((8192, 4096), (12288, 50304), (40, 700)) if device == "cuda" else ((40, 700),):  # CPU: interpreted
        out = (torch.full((n, v), float("nan"), device=device).to(torch.float8_e5m2),
               torch.full((v, n), float("nan"), device=device).to(torch.float8_e5m2))
        t = torch.randint(0, v, (n,), device=device)
        h8, sh = fp8_head.to_e4m3(torch.randn(n, 768, device=device))
        wq = fp8_head.FP8Weight.of(torch.randn(-(-v // 16) * 16, 768, device=device) * 0.1)  # GEMMs want 16s
        x = fp8_head._mm(h8, wq.w8.t(), sh, wq.scale, torch.bfloat16, True)[:, :v]  # the kernel's launch follows
        fp8_head.cross_entropy_fp8(x, t, out)
        g8, gt8 = (o.float() for o in out)
        res[f"fp8_{n}x{v}_unwritten"] = int((~g8.isfinite()).sum() + (~gt8.isfinite()).sum())
        res[f"fp8_{n}x{v}_layouts_equal"] = bool(torch.equal(g8.t(), gt8))
    return res


def muon_capture(torch, smoke: bool = False) -> None:
    """Muon with the clip folded in (`Muon.folds_clip`): whole training steps of the 20M model with
    and without the fold (each with its own model and optimizer, as training has), then luca.step's
    capture of the folded step alone and inside train_step, printing the first failing call's
    traceback. On an H200 (session 9) the capture failed on a host sync, fixed afterwards without a
    GPU; on an H100 (session 10) both captures succeeded. On CUDA the model is compiled, as in training; `--smoke` runs
    it on the CPU, with 2 layers and micro-batches of 2, without the capture."""
    import traceback

    from luca.distributed import Dist
    from luca.model import ModelConfig
    from luca.step import _fold_clip, train_step, zero_grad
    from luca.train import TrainConfig, build
    cuda = torch.cuda.is_available() and not smoke
    dev = torch.device("cuda" if cuda else "cpu")
    rows, layers = (16, 8) if cuda else (2, 2)
    mc = ModelConfig(vocab_size=4096, n_layers=layers, d_model=512, n_heads=8, n_kv_heads=4, max_seq_len=512)
    cfg = TrainConfig(seq_len=512, micro_batch=rows, batch_tokens=4 * rows * 512, optimizer="muon", compile=cuda)
    ac = torch.autocast(dev.type, dtype=torch.bfloat16)
    batches = [torch.randint(0, 4096, (rows, 513), device=dev) for _ in range(4)]
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    setups = {}
    for fold in (False, True):
        raw, model, opt = build(mc, cfg, dev, Dist())
        opt.folds_clip = fold
        for _ in range(3):  # compile, optimizer state
            train_step(model, raw, opt, batches, 1.0, ac, 1, fold)
        setups[fold] = (raw, model, opt)
    for fold in (False, True, False, True):
        raw, model, opt = setups[fold]
        sync()
        t = time.perf_counter()
        for _ in range(5):
            train_step(model, raw, opt, batches, 1.0, ac, 1, fold)
        sync()
        print(f"train_step, folds_clip={fold}: {(time.perf_counter() - t) / 5 * 1e3:.1f} ms a step", flush=True)
    if not cuda:
        return
    raw, model, opt = setups[True]
    lr = torch.tensor(1e-3, device=dev)
    for g in opt.param_groups:
        g["lr"], g["capturable"] = lr, True
    loss = torch.zeros((), device=dev)
    for what in ("optimizer step", "train_step"):
        zero_grad(raw, opt)
        torch.cuda.synchronize()
        try:
            with torch.cuda.graph(torch.cuda.CUDAGraph(), capture_error_mode="thread_local"):
                if what == "train_step":
                    train_step(model, raw, opt, batches, 1.0, ac, 1, True)
                else:
                    _fold_clip(raw, opt, loss, 1.0, 1)
                    opt.step()
            print(f"capture of the {what}: OK", flush=True)
        except Exception:  # noqa: BLE001 - the point is the traceback
            print(f"capture of the {what} failed:", flush=True)
            traceback.print_exc(limit=15)
            return


def paired(rows: dict, seeds: list[int]) -> None:
    """Per-seed runs against the default one of the same seed: mean val BPB difference, paired t-test."""
    from luca.compare import paired_t_test
    kinds = sorted({n.rsplit(" seed ", 1)[0] for n in rows if " seed " in n} - {"train-graph"})
    for kind in kinds:
        pairs = [(rows[f"train-graph seed {s}"]["val_bpb"], rows[f"{kind} seed {s}"]["val_bpb"]) for s in seeds
                 if f"{kind} seed {s}" in rows and f"train-graph seed {s}" in rows]
        if len(pairs) < 2:
            continue
        base, other = [p[0] for p in pairs], [p[1] for p in pairs]
        diffs = [(b - g) / g for g, b in pairs]
        _, p = paired_t_test(base, other)
        print(f"{kind} vs train-graph over {len(pairs)} seeds: val BPB {sum(diffs) / len(diffs):+.2%} on average "
              f"(lower on {sum(d < 0 for d in diffs)}/{len(pairs)} seeds), paired t-test p = {p:.2g}")


if __name__ == "__main__":
    main()
