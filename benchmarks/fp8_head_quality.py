"""What the FP8 head (train.fp8_head, luca/fp8_head.py) costs in quality: matched runs on one GPU.

check_gpu_train's 20M model (8 layers × 512, vocab 4,096, tied embeddings) trained the same way
with the BF16 head and with the FP8 head, per seed, on a corpus large enough that the run sees each
token about once (the device's own Python sources, `--source`; check_gpu_train repeats the standard
library four times, which rewards memorising). Variant `fp8-bf16-forward` computes the forward
logits in BF16 and keeps the backward's two GEMMs in FP8 (patched in here, not an option of luca),
to tell the forward's share from the backward's. Prints val BPB per run and the paired differences
against the BF16 head.

Session 13 on an H200: at lr 1e-3 with 100 warm-up steps (the defaults) the FP8 head was +0.10%
over 4 seeds (+0.01, +0.01, −0.05, +0.42%). At check_gpu_train's lr 2e-3 with 30 warm-up steps
the runs spike early (gradient norms up to 10) and single seeds swing by ±10% either way, so that
setting measures chaos, not precision (6 seeds: −0.6% ± 3.2%). benchmarks/results/fp8_head_quality_*.
`python3 benchmarks/fp8_head_quality.py` (about 3 minutes on an H200)."""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import sysconfig
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def bf16_forward_patch(fp8_head, torch):
    """_LinearCE8.forward with the logits from a BF16 GEMM (h and the weight in BF16); the e4m3
    copies it saves for the backward are made as before."""
    orig = fp8_head._LinearCE8.forward

    def forward(ctx, h, weight, targets, mean, cached, acc):
        real_mm = fp8_head._mm

        def mm(a, b, sa, sb, dtype, fast):
            if dtype is torch.bfloat16 and a.shape == (h.shape[0], h.shape[1]):  # the logits' GEMM
                return h.to(torch.bfloat16) @ weight.to(torch.bfloat16).t()
            return real_mm(a, b, sa, sb, dtype, fast)
        fp8_head._mm = mm
        try:
            return orig(ctx, h, weight, targets, mean, cached, acc)
        finally:
            fp8_head._mm = real_mm
    return staticmethod(forward)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    site = sysconfig.get_paths()["purelib"]
    p.add_argument("--source", default=f"{site}/torch/**/*.py?errors=replace")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--seeds", default="1,2,3,4")
    p.add_argument("--variants", default="bf16,fp8", help="bf16, fp8, fp8-bf16-forward")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--work", default="/tmp/luca_fp8_quality")
    a = p.parse_args()
    import torch

    from check_gpu_train import corpus
    from luca import fp8_head
    from luca.config import build
    from luca.model import ModelConfig
    from luca.train import TrainConfig, train

    work, t0 = Path(a.work), time.perf_counter()
    data_dir = work / "data"
    tok, n_train = corpus(a.source, data_dir)
    print(f"data + tokenizer: {time.perf_counter() - t0:.0f} s; {n_train:,} training tokens; {a.steps} steps "
          f"of 32,768 read {a.steps * 32768 / n_train:.2f} of them", flush=True)
    mc = ModelConfig(vocab_size=4096, n_layers=8, d_model=512, n_heads=8, n_kv_heads=4, max_seq_len=512)
    tc = dict(seq_len=512, micro_batch=32, batch_tokens=32768, max_steps=a.steps, lr=a.lr, warmup_steps=a.warmup,
              schedule="wsd", eval_every=a.steps, eval_batches=32, save_every=a.steps, log_every=10, compile=True)
    plain_forward = fp8_head._LinearCE8.forward
    rows: dict[str, dict] = {}
    for seed in (int(s) for s in a.seeds.split(",")):
        for v in a.variants.split(","):
            torch._dynamo.reset()
            fp8_head._LinearCE8.forward = bf16_forward_patch(fp8_head, torch) if v == "fp8-bf16-forward" \
                else plain_forward
            cfg = build(TrainConfig, {**tc, "seed": seed, "fp8_head": v != "bf16"}, "train")
            t = time.perf_counter()
            s = train(work / f"{v}-{seed}", mc, cfg, data_dir, tok, progress=False)
            recs = [json.loads(x) for x in (work / f"{v}-{seed}" / "metrics.jsonl").read_text().splitlines()]
            rows[f"{v} {seed}"] = {"variant": v, "seed": seed, "val_bpb": s["val_bpb"],
                                   "final_loss": s["final_train_loss"], "bad_steps": s["bad_steps"],
                                   "wall_s": round(time.perf_counter() - t, 1),
                                   "losses": [round(r["loss"], 3) for r in recs if "loss" in r],
                                   "grad_norms": [round(r["grad_norm"], 3) for r in recs if "grad_norm" in r]}
            print(json.dumps(rows[f"{v} {seed}"]), flush=True)
    fp8_head._LinearCE8.forward = plain_forward
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], "fp8_head_quality.json").write_text(json.dumps(
            {"gpu": torch.cuda.get_device_name(), "n_train_tokens": n_train, "args": vars(a), "runs": rows}, indent=2))
    print(f"\n{n_train:,} training tokens, {a.steps} steps of 32,768\n")
    print("| variant | val BPB per seed | mean | vs bf16 (paired, mean) |\n|---|---|---:|---:|")
    base = {r["seed"]: r["val_bpb"] for r in rows.values() if r["variant"] == "bf16"}
    for v in a.variants.split(","):
        mine = {r["seed"]: r["val_bpb"] for r in rows.values() if r["variant"] == v}
        d = [mine[s] / base[s] - 1 for s in mine if s in base]
        rel = f"{100 * statistics.mean(d):+.2f}%" if d and v != "bf16" else "-"
        print(f"| {v} | {' '.join(f'{x:.4f}' for x in mine.values())} | {statistics.mean(mine.values()):.4f} | {rel} |")


if __name__ == "__main__":
    main()
