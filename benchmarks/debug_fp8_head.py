"""Why does training with the FP8 head (train.fp8_head) go non-finite on a GPU? A diagnostic, not a benchmark.

Session 12, H200: check_gpu_train's 20M model with fp8_head = true gives NaN gradient norms from the
first step, although the kernel check (check_gpu_train --kernels-only) finds both FP8 gradient
layouts fully written on random logits. This builds check_gpu_train's data and model, trains a few
eager steps with the head's pieces recomputed and checked after each forward (h, the e4m3 copies,
the logits, g8 and its transpose gt8) and the parameters whose gradients are non-finite listed
before each zeroing. Session 12's output: benchmarks/results/fp8_nonfinite_debug_h200_s12.log
(gt8 non-finite on real data, g8 finite; the tied embedding's gradient non-finite).
`python3 benchmarks/debug_fp8_head.py` (about a minute on an H200)."""
import json, os, sys, time
from pathlib import Path
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import torch
from luca import data as D, fp8_head
from luca.config import build
from luca.errors import LucaError
from luca.model import ModelConfig
from luca.tokenizer import TokenizerConfig, build_tokenizer
from luca.train import TrainConfig, train

work = Path("/tmp/dbg"); data_dir = work / "data"
D.collect(D.DataConfig(sources=["builtin:python"]), data_dir, progress=False)
tok = build_tokenizer(TokenizerConfig(kind="bpe", vocab_size=4096), D.iter_documents(data_dir, "train"))
D.tokenize(data_dir, tok, progress=False)
mc = ModelConfig(vocab_size=4096, n_layers=8, d_model=512, n_heads=8, n_kv_heads=4, max_seq_len=512)
steps = int(os.environ.get("STEPS", 300))
tc = dict(seq_len=512, micro_batch=16, batch_tokens=32768, max_steps=steps, lr=2e-3, warmup_steps=30,
          schedule="wsd", eval_every=100, eval_batches=16, save_every=steps // 2, log_every=1, compile=True, seed=1)
CHECK = {"on": False, "n": 0}
orig_fwd, orig_bwd = fp8_head._LinearCE8.forward, fp8_head._LinearCE8.backward

def fwd(ctx, h, weight, targets, mean, cached, acc):
    out = orig_fwd(ctx, h, weight, targets, mean, cached, acc)
    if CHECK["on"] and CHECK["n"] < 12:
        CHECK["n"] += 1
        wq = cached or fp8_head.FP8Weight.of(weight)
        h8, sh = fp8_head.to_e4m3(h.reshape(-1, h.shape[-1]))
        lg = fp8_head._mm(h8, wq.w8.t(), sh, wq.scale, torch.bfloat16, True)
        _, g8, gt8 = fp8_head.cross_entropy_fp8(lg, targets.reshape(-1))
        print("  logits finite", bool(lg.isfinite().all()), "absmax", lg.float().abs().max().item())
        print(f"  fwd {CHECK['n']}: h finite {bool(h.isfinite().all())} amax {h.float().abs().max().item():.3g} sh {sh.item():.3g}"
              f" h8 nan {bool(h8.float().isnan().any())} w scale {wq.scale.item() if wq else -1:.3g}"
              f" w8 nan {bool(wq.w8.float().isnan().any()) if wq else '-'} wt8 nan {bool(wq.wt8.float().isnan().any()) if wq else '-'}"
              f" g8 nonfinite {bool((~g8.float().isfinite()).any())} gt8 nonfinite {bool((~gt8.float().isfinite()).any())}"
              f" loss {out.item():.4f}", flush=True)
    return out

def bwd(ctx, grad_out):
    res = orig_bwd(ctx, grad_out)
    if CHECK["on"] and CHECK["n"] < 12:
        gh = res[0]
        acc = ctx.acc
        print(f"  bwd: grad_out {grad_out.item():.3g} gh finite {bool(gh.isfinite().all()) if gh is not None else '-'}"
              f" acc finite {bool(acc.isfinite().all()) if acc is not None else '-'}", flush=True)
    return res
fp8_head._LinearCE8.forward, fp8_head._LinearCE8.backward = staticmethod(fwd), staticmethod(bwd)

def run(name, **over):
    torch._dynamo.reset()
    cfg = build(TrainConfig, {**tc, **over}, "train")
    t = time.perf_counter()
    try:
        s = train(work / name, mc, cfg, data_dir, tok, progress=False)
        res = f"ok val_bpb {s['val_bpb']}"
    except LucaError as e:
        res = f"FAILED {e}"[:200]
    recs = [json.loads(x) for x in (work / name / "metrics.jsonl").read_text().splitlines()] if (work / name / "metrics.jsonl").exists() else []
    print(name, res, f"{time.perf_counter()-t:.0f}s", "losses", [round(r.get("loss", -1), 3) for r in recs[:12]],
          "gnorm", [round(r.get("grad_norm", -1), 3) for r in recs[:12] if "grad_norm" in r][:12], flush=True)

import luca.step as ST
orig_zero = ST.zero_grad
def zg(raw, opt):
    bad = [n for n, p in raw.named_parameters() if p.grad is not None and not p.grad.isfinite().all()]
    print("   nonfinite grads:", bad[:8], len(bad), flush=True)
    return orig_zero(raw, opt)
ST.zero_grad = zg
CHECK["on"] = True
for name, over in [("eager", {}), ("no-keep", {"accum_in_gemm": False}), ("no-cast", {"cast_once": False}),
                   ("untied-none", {"accum_in_gemm": False, "cast_once": False})]:
    CHECK["n"] = 10
    print("==", name, flush=True)
    run(name, fp8_head=True, cuda_graph=False, compile=False, max_steps=2, **over)
