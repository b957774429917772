"""CPU inference: luca's native engine vs transformers `generate` vs llama.cpp, one model per run.

    python benchmarks/bench_infer.py --run runs/nano-n1
    python benchmarks/bench_infer.py --random-qwen-1.5b            # Qwen2.5-1.5B shape, random weights

Every engine runs in its own subprocess (so peak RSS is its own): a 128-token prompt, then 64
greedy tokens, median of 3. Prompt tok/s = prompt tokens / time to the first new token; decode
tok/s = the remaining 63 tokens / their time. One table, with ratios against transformers; then
bits per byte of the llama.cpp F16 / Q8_0 / Q4_K_M files (and luca's own model) on a held-out text.
Goals: native decode ≥ 2× transformers; Q4_K_M file ≤ 0.35× F16; Q8_0 BPB within 1% of F16, Q4_K_M
within 5%. Timings on a shared machine are noisy: compare rows of one run, not across runs.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ENGINES = ["native-fp32", "native-bf16", "native-int8", "native-int8-dynamic", "transformers", "llama-f16",
           "llama-q8_0", "llama-q4_k_m"]


def _native(run: Path, engine: str):
    from luca.engine import NativeEngine
    kind = engine.split("-", 1)[1]
    if kind in ("fp32", "bf16"):
        return NativeEngine.load(run, dtype=kind)
    return NativeEngine.load(run, quant=kind)


# -- workers (one engine per process) ---------------------------------------------------------------
def _prompt(tok, n: int) -> list[int]:
    import pydoc_data.topics as topics
    text = "".join(topics.topics.values())
    ids = tok.encode(text[: 20 * n])
    return ids[:n]


def _heldout_text(run: Path, chars: int) -> str:
    """The run's validation documents (its data directory), else a standard-library module's source."""
    from luca import rundir
    data_dir = rundir.read_luca_toml(run).get("data_dir")
    val = Path(data_dir) / "documents" / "val.jsonl" if data_dir else None
    if val is not None and val.is_file():
        out = []
        for line in val.read_text(encoding="utf-8").splitlines():
            out.append(json.loads(line))
            if sum(map(len, out)) >= chars:
                break
        return "\n".join(out)[:chars]
    import textwrap
    return Path(textwrap.__file__).read_text(encoding="utf-8")[:chars]


def _bpb(logits_fn, tok, ids: list[int], ctx: int) -> float:
    """Bits per byte of `ids`, in non-overlapping windows of `ctx` tokens."""
    import torch
    nats, nbytes = 0.0, 0
    for i in range(0, len(ids) - 1, ctx):
        w = ids[i:i + ctx]
        if len(w) < 2:
            break
        lg = torch.as_tensor(logits_fn(w)).float()[:-1]
        tgt = torch.tensor(w[1:])
        nats += torch.nn.functional.cross_entropy(lg, tgt, reduction="sum").item()
        nbytes += sum(len(tok.token_bytes(t)) for t in w[1:])
    return nats / math.log(2) / max(nbytes, 1)


def bpb_worker(engine: str, run: Path, bpb_tokens: int) -> dict:
    """Bits per byte of one engine on the held-out text (a process of its own: llama.cpp's
    all-positions logits are large, and must not inflate the speed rows' peak RSS)."""
    import torch
    from luca import rundir
    tok = rundir.load_tokenizer(run)
    cfg = rundir.load_model_config(run)
    ids = tok.encode(_heldout_text(run, 8 * bpb_tokens))[:bpb_tokens]
    ctx = min(cfg.max_seq_len, 2048, len(ids))
    if engine.startswith("native"):
        eng = _native(run, engine)

        def fn(w):
            with torch.inference_mode():
                pos = torch.arange(len(w))[None]
                return eng.forward(torch.tensor([w]), pos, eng.new_cache(1, len(w)), 0, None, last_only=False)[0]
    else:
        from luca.engine_llamacpp import LlamaCppEngine, ensure_gguf
        eng = LlamaCppEngine(ensure_gguf(run, engine.split("-", 1)[1]), n_ctx=ctx, logits_all=True,
                             n_threads=torch.get_num_threads())
        fn = eng.all_logits
    return {"engine": engine, "bpb": _bpb(fn, tok, ids, ctx), "bpb_tokens": len(ids)}


def worker(engine: str, run: Path, n_prompt: int, n_new: int, repeats: int) -> dict:
    import torch
    from luca import rundir
    from luca.engine import SamplingConfig
    tok = rundir.load_tokenizer(run)
    cfg = rundir.load_model_config(run)
    prompt = _prompt(tok, n_prompt)
    s = SamplingConfig(max_new_tokens=n_new, temperature=0)
    size = None
    t_load = time.perf_counter()
    if engine.startswith("native"):
        eng = _native(run, engine)
        size = eng.nbytes()
        run_once = lambda: _time_steps(eng.generate_ids([prompt], s, set()))  # noqa: E731
    elif engine == "transformers":
        import transformers
        model = transformers.AutoModelForCausalLM.from_pretrained(run, dtype=torch.bfloat16).eval()
        size = sum(p.stat().st_size for p in run.glob("*.safetensors"))
        x = torch.tensor([prompt])

        def run_once():
            times = []

            class Clock(transformers.generation.streamers.BaseStreamer):
                def put(self, value):
                    times.append(time.perf_counter())

                def end(self):
                    pass
            t0 = time.perf_counter()
            with torch.inference_mode():
                model.generate(x, max_new_tokens=n_new, min_new_tokens=n_new, do_sample=False, streamer=Clock(),
                               pad_token_id=tok.eot_id)
            return t0, times[1], times[-1]  # put #0 is the prompt, #1 the first new token
    else:
        from luca.engine_llamacpp import LlamaCppEngine, ensure_gguf
        qtype = engine.split("-", 1)[1]
        path = ensure_gguf(run, qtype)
        size = path.stat().st_size
        eng = LlamaCppEngine(path, n_ctx=min(cfg.max_seq_len, 4096), n_threads=torch.get_num_threads())
        run_once = lambda: _time_steps(eng.generate_ids([prompt], s, set()))  # noqa: E731
    load_s = time.perf_counter() - t_load
    run_once()  # warm-up
    prompt_tps, decode_tps = [], []
    for _ in range(repeats):
        t0, t1, t2 = run_once()
        prompt_tps.append(len(prompt) / (t1 - t0))
        decode_tps.append((n_new - 1) / (t2 - t1))
    rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    load = os.getloadavg()[0]  # other processes on the machine during this row (1-minute average)
    return {"engine": engine, "prompt_tps": statistics.median(prompt_tps), "decode_tps": statistics.median(decode_tps),
            "rss_mb": rss_mb, "size_mb": size / 1e6 if size else None, "load_s": load_s, "load": load}


def _time_steps(steps) -> tuple[float, float, float]:
    t0 = time.perf_counter()
    t1 = None
    for _ in steps:
        if t1 is None:
            t1 = time.perf_counter()
    return t0, t1, time.perf_counter()


# -- the random Qwen2.5-1.5B-shaped run -----------------------------------------------------------------
def random_qwen_run(path: Path) -> Path:
    """Qwen2.5-1.5B's shape with random BF16 weights and luca's byte tokenizer (rows padded)."""
    import torch
    from luca import rundir
    from luca.model import ModelConfig, Transformer
    from luca.tokenizer import byte_tokenizer
    if rundir.is_run_dir(path):
        return path
    cfg = ModelConfig(vocab_size=151936, n_layers=28, d_model=1536, n_heads=12, n_kv_heads=2, d_ff=8960,
                      max_seq_len=4096, rope_theta=1e6, qkv_bias=True, tie_embeddings=True)
    with torch.device("meta"):
        model = Transformer(cfg)
    model = model.to_empty(device="cpu").to(torch.bfloat16)
    model.lm_head.weight = model.model.embed_tokens.weight
    model.reset_parameters(seed=0)
    tok = byte_tokenizer()
    rundir.save_model(path, model, tok)
    tok.save(path)
    return path


# -- driver ----------------------------------------------------------------------------------------------
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    g = ap.add_mutually_exclusive_group(required=True)
    g.add_argument("--run", type=Path, help="a trained run directory")
    g.add_argument("--random-qwen-1.5b", dest="random_qwen", action="store_true", help="a random Qwen2.5-1.5B-shaped run (cached)")
    ap.add_argument("--engines", default=",".join(ENGINES))
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--bpb-tokens", type=int, default=None, help="held-out tokens for BPB (0: skip)")
    ap.add_argument("--json", type=Path, help="also write the rows here")
    ap.add_argument("--threads", type=int, default=os.cpu_count(), help="threads for every engine")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--bpb-worker", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker or a.bpb_worker:
        import torch
        torch.set_num_threads(a.threads)
    if a.worker:
        print("RESULT " + json.dumps(worker(a.worker, a.run, a.prompt_tokens, a.new_tokens, a.repeats)))
        return
    if a.bpb_worker:
        print("RESULT " + json.dumps(bpb_worker(a.bpb_worker, a.run, a.bpb_tokens)))
        return
    if a.random_qwen:
        run = random_qwen_run(Path(tempfile.gettempdir()) / "luca-bench-random-qwen-1.5b")
        bpb_tokens = 512 if a.bpb_tokens is None else a.bpb_tokens
    else:
        run = a.run
        bpb_tokens = 4096 if a.bpb_tokens is None else a.bpb_tokens
    from luca import rundir
    rundir.require_run_dir(run)
    engines = [e for e in a.engines.split(",") if e]
    if any(e.startswith("llama") for e in engines):  # export once, up front, outside the timings
        from luca.export import export_gguf, gguf_path
        todo = [e.split("-", 1)[1] for e in engines if e.startswith("llama")]
        missing = [t for t in todo if not gguf_path(run, t).is_file()]
        if missing:
            t0 = time.perf_counter()
            for r in export_gguf(run, ["f16"] + [t for t in missing if t != "f16"], say=print):
                print(f"exported {Path(r['path']).name}: {r['bytes'] / 1e6:,.0f} MB, {r['bpw']:.2f} bits/weight")
            print(f"export took {time.perf_counter() - t0:.0f} s")
    rows = []
    for e in engines:
        r = _sub(e, ["--worker", e, "--run", str(run), "--prompt-tokens", str(a.prompt_tokens), "--threads",
                     str(a.threads), "--new-tokens", str(a.new_tokens), "--repeats", str(a.repeats)])
        if r:
            rows.append(r)
    if bpb_tokens:
        for r in rows:
            if r["engine"] != "transformers":
                b = _sub(f"{r['engine']} BPB", ["--bpb-worker", r["engine"], "--run", str(run), "--threads",
                                                str(a.threads), "--bpb-tokens", str(bpb_tokens)])
                if b:
                    r["bpb"] = b["bpb"]
    report(run, rows, a)
    if a.json:
        a.json.write_text(json.dumps(rows, indent=2))


def _sub(label: str, args: list[str]) -> dict | None:
    t0 = time.perf_counter()
    p = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True)
    line = next((x for x in p.stdout.splitlines() if x.startswith("RESULT ")), None)
    if p.returncode or line is None:
        print(f"{label}: failed (exit {p.returncode})\n{p.stderr[-2000:]}", file=sys.stderr)
        return None
    print(f"{label}: done in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    return json.loads(line[len("RESULT "):])


def report(run: Path, rows: list[dict], a) -> None:
    from rich.console import Console
    from rich.table import Table
    from luca import rundir
    cfg = rundir.load_model_config(run)
    ref = next((r for r in rows if r["engine"] == "transformers"), None)
    f16 = next((r for r in rows if r["engine"] == "llama-f16"), None)
    title = (f"{run.name}: {cfg.arch} {cfg.n_layers}L/{cfg.d_model}, vocab {cfg.vocab_size}; {a.prompt_tokens}-token "
             f"prompt, {a.new_tokens} greedy tokens, median of {a.repeats}, {a.threads} threads; load = the "
             f"machine's 1-min load average during the row")
    t = Table(title=title)
    cols = ["engine", "weights MB", "prompt tok/s", "decode tok/s", "peak RSS MB", "decode ×tf", "prompt ×tf",
            "RSS ×tf", "BPB", "BPB vs F16", "load"]
    for c in cols:
        t.add_column(c, justify="left" if c == "engine" else "right")
    md = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        ratio = (lambda k: f"{r[k] / ref[k]:.2f}×") if ref else (lambda k: "")
        bpb = f"{r['bpb']:.4f}" if r.get("bpb") is not None else ""
        dv = f"{(r['bpb'] / f16['bpb'] - 1) * 100:+.2f}%" if r.get("bpb") and f16 and f16.get("bpb") else ""
        cells = [r["engine"], f"{r['size_mb']:,.1f}" if r.get("size_mb") else "", f"{r['prompt_tps']:,.1f}",
                 f"{r['decode_tps']:,.1f}", f"{r['rss_mb']:,.0f}", ratio("decode_tps"), ratio("prompt_tps"),
                 ratio("rss_mb"), bpb, dv, f"{r.get('load', 0):.1f}"]
        t.add_row(*cells)
        md.append("| " + " | ".join(cells) + " |")
    con = Console(width=200)
    con.print(t)
    print("\n".join(md))
    by = {r["engine"]: r for r in rows}
    goals = []
    if ref:
        best = max((r for r in rows if r["engine"].startswith("native")), key=lambda r: r["decode_tps"], default=None)
        if best:
            x = best["decode_tps"] / ref["decode_tps"]
            goals.append(f"native decode ≥ 2× transformers: {best['engine']} {x:.2f}× {'PASS' if x >= 2 else 'FAIL'}")
    if "llama-q4_k_m" in by and f16:
        x = by["llama-q4_k_m"]["size_mb"] / f16["size_mb"]
        goals.append(f"Q4_K_M file ≤ 0.35× F16: {x:.3f}× {'PASS' if x <= 0.35 else 'FAIL'}")
    for e, lim in (("llama-q8_0", 1.0), ("llama-q4_k_m", 5.0)):
        if e in by and f16 and by[e].get("bpb") and f16.get("bpb"):
            d = abs(by[e]["bpb"] / f16["bpb"] - 1) * 100
            goals.append(f"{e} BPB within {lim:g}% of F16: {d:.2f}% {'PASS' if d <= lim else 'FAIL'}")
    for gline in goals:
        print(gline)


if __name__ == "__main__":
    main()
