"""The `luca` command: argument parsing, printing and exit codes; each command calls one stage.

Config overrides are accepted on every training command as `--section.key value` (or
`--section.key=value`, or `--set section.key=value`). A user-caused error prints one line and
exits with code 2; nothing else is printed as a traceback unless LUCA_DEBUG=1.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from luca.errors import LucaError

COMMANDS: dict[str, tuple[str, object, object]] = {}  # name → (help, add_arguments, handler)


def command(name: str, help: str):
    def wrap(fn):
        COMMANDS[name] = (help, getattr(fn, "_args", lambda p: None), fn)
        return fn
    return wrap


def args(adder):
    def wrap(fn):
        fn._args = adder
        return fn
    return wrap


def console():
    from rich.console import Console
    return Console(highlight=False)


def _split_overrides(extra: list[str]) -> list[str]:
    """`--train.max_steps 100` / `--train.max_steps=100` → `train.max_steps=100`."""
    out, i = [], 0
    while i < len(extra):
        a = extra[i]
        if not a.startswith("--") or "." not in a.split("=")[0]:
            raise LucaError(f"unrecognized argument {a!r} (config overrides look like --train.max_steps 100)")
        key = a[2:]
        if "=" in key:
            out.append(key)
            i += 1
        elif i + 1 < len(extra):
            out.append(f"{key}={extra[i + 1]}")
            i += 2
        else:
            raise LucaError(f"override {a!r} needs a value")
    return out


def _sampling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--top-k", type=int, default=50)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--repetition-penalty", type=float, default=1.0)
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument("--seed", type=int, default=None)


def sampling_from(a):
    from luca.engine import SamplingConfig
    try:
        return SamplingConfig(max_new_tokens=a.max_new_tokens, temperature=a.temperature, top_k=a.top_k,
                              top_p=a.top_p, repetition_penalty=a.repetition_penalty, stop=a.stop, seed=a.seed)
    except ValueError as e:
        raise LucaError(f"sampling: {e}") from None


# -- run ------------------------------------------------------------------------------------
def _run_args(p):
    p.add_argument("--preset", default="nano-n1", help="preset name or path to a .toml file")
    p.add_argument("--data", nargs="+", metavar="SPEC", help="data sources (default: the preset's)")
    p.add_argument("--out", help="run directory (default: runs/<preset name>)")
    p.add_argument("--resume", action="store_true", help="continue from the run directory's checkpoint")
    p.add_argument("--samples", type=int, default=3)
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE")


@command("run", "data → tokenizer → train → validation BPB → samples (the main job)")
@args(_run_args)
def cmd_run(a, extra):
    from luca.pipeline import run
    con = console()
    s = run(a.preset, a.data, a.out, a.set + _split_overrides(extra), resume=a.resume, samples=a.samples,
            say=lambda m: con.print(m))
    _print_summary(con, s)
    for prompt, text in s["samples"]:
        con.rule(f"sample: {prompt!r}")
        con.print(prompt + text, markup=False)
    con.rule()
    d = Path(s["run_dir"])
    con.print(f"run directory: {d.resolve()}\n  model: {d / 'model.safetensors'}\n  report: {d / 'report.md'}"
              f"\n  loss curve: {d / 'loss.png'}\n  metrics: {d / 'metrics.jsonl'}")
    con.print(f"wall time {s['wall_s']:.1f} s")


def _print_summary(con, s: dict) -> None:
    from rich.table import Table
    t = Table(title="run")
    t.add_column("")
    t.add_column("")
    for k in ("parameters", "tokens", "time_s", "tokens_per_s", "final_train_loss", "val_bpb"):
        v = s.get(k)
        t.add_row(k, f"{v:,}" if isinstance(v, int) else str(v))
    con.print(t)


# -- data / tokenizer / train ---------------------------------------------------------------
def _data_args(p):
    p.add_argument("sources", nargs="+", metavar="SPEC")
    p.add_argument("--out", required=True, help="data directory")
    p.add_argument("--val-fraction", type=float, default=0.01)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tokenizer", help="tokenizer directory (or 'byte'): also write token shards")


@command("data", "collect, clean, deduplicate and split documents (and tokenize them)")
@args(_data_args)
def cmd_data(a, extra):
    from luca import data as D
    from luca.tokenizer import Tokenizer, byte_tokenizer
    _split_overrides(extra)
    m = D.collect(D.DataConfig(sources=a.sources, val_fraction=a.val_fraction, seed=a.seed), a.out)
    con = console()
    con.print(f"{m['documents']['train']:,} train / {m['documents']['val']:,} val documents → {a.out}")
    if a.tokenizer:
        tok = byte_tokenizer() if a.tokenizer == "byte" else Tokenizer.load(a.tokenizer)
        m = D.tokenize(a.out, tok)
        con.print(f"{m['tokens']['train']['n_tokens']:,} train / {m['tokens']['val']['n_tokens']:,} val tokens")


def _tok_args(p):
    p.add_argument("data_dir", help="a data directory from `luca data`")
    p.add_argument("--out", required=True, help="tokenizer directory")
    p.add_argument("--kind", choices=["bpe", "byte"], default="bpe")
    p.add_argument("--vocab-size", type=int, default=8192)
    p.add_argument("--max-chars", type=int, default=50_000_000)


@command("tokenizer", "train a byte-level BPE tokenizer on a data directory (or write the byte tokenizer)")
@args(_tok_args)
def cmd_tokenizer(a, extra):
    from luca import data as D
    from luca.tokenizer import TokenizerConfig, build_tokenizer
    _split_overrides(extra)
    try:
        cfg = TokenizerConfig(kind=a.kind, vocab_size=a.vocab_size, max_chars=a.max_chars)
        tok = build_tokenizer(cfg, D.iter_documents(a.data_dir, "train"), show_progress=True)
    except ValueError as e:
        raise LucaError(f"tokenizer: {e}") from None
    tok.save(a.out)
    console().print(f"{tok.kind} tokenizer, {tok.vocab_size:,} ids → {a.out}")


def _train_args(p):
    p.add_argument("--data", required=True, help="data directory from `luca data`")
    p.add_argument("--tokenizer", required=True, help="tokenizer directory from `luca tokenizer` (or 'byte')")
    p.add_argument("--out", required=True, help="run directory")
    p.add_argument("--preset", default="nano-n1")
    p.add_argument("--resume", action="store_true")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE")


@command("train", "train a model on a data directory with a tokenizer")
@args(_train_args)
def cmd_train(a, extra):
    from luca import config as C
    from luca import data as D
    from luca.pipeline import model_config_for, resolve
    from luca.tokenizer import Tokenizer, byte_tokenizer
    from luca.train import TrainConfig, train
    cfg = resolve(a.preset, a.set + _split_overrides(extra))
    if not Path(a.data).is_dir():
        raise LucaError(f"{a.data}: no such data directory")
    tok = byte_tokenizer() if a.tokenizer == "byte" else Tokenizer.load(a.tokenizer) \
        if Path(a.tokenizer, "tokenizer.json").is_file() else None
    if tok is None:
        raise LucaError(f"{a.tokenizer}: no tokenizer.json")
    D.tokenize(a.data, tok)
    model_cfg = model_config_for(cfg, tok)
    cfg["model"], cfg["data_dir"] = model_cfg.to_dict(), str(a.data)
    s = train(a.out, model_cfg, C.build(TrainConfig, cfg["train"], "train"), a.data, tok, resume=a.resume,
              full_config=cfg, aux=cfg["aux"])
    _print_summary(console(), s)


# -- generate -------------------------------------------------------------------------------
def _gen_args(p):
    p.add_argument("run_dir")
    p.add_argument("--prompt", default="", help="prompt text (default: read stdin)")
    p.add_argument("--backend", choices=["native", "llama.cpp"], default="native")
    p.add_argument("--gguf", default=None, metavar="TYPE",
                   help="llama.cpp: q4_k_m, q8_0, f16, ... (exported on demand; default: an existing one, else q4_k_m)")
    p.add_argument("--dtype", choices=["auto", "fp32", "bf16"], default="auto",
                   help="native: weight dtype (auto: fp32 for small models, else bf16)")
    p.add_argument("--quant", choices=["int8", "int8-dynamic"], default=None,
                   help="native: int8 weights (weight-only, or with fbgemm's dynamic int8 GEMM: fastest on x86)")
    _sampling_args(p)


@command("generate", "stream a continuation of a prompt")
@args(_gen_args)
def cmd_generate(a, extra):
    from luca import rundir
    from luca.engine import Completion, NativeEngine, stream
    _split_overrides(extra)
    s = sampling_from(a)
    rundir.require_run_dir(a.run_dir)
    tok = rundir.load_tokenizer(a.run_dir)
    if a.backend == "llama.cpp":
        from luca import engine_llamacpp
        model = engine_llamacpp.load(a.run_dir, a.gguf, say=lambda m: print(m, file=sys.stderr))
        context = model.n_ctx
    else:
        model = NativeEngine.load(a.run_dir, dtype=a.dtype, quant=a.quant)
        context = model.cfg.max_seq_len
    prompt = a.prompt if a.prompt else sys.stdin.read()
    ids = tok.encode(prompt) or [tok.eot_id]
    if len(ids) + s.max_new_tokens > context:
        raise LucaError(f"prompt ({len(ids)} tokens) + --max-new-tokens ({s.max_new_tokens}) exceeds the "
                        f"model's context ({context})")
    sys.stdout.write(prompt)
    final = None
    for piece in stream(model, tok, ids, s):
        if isinstance(piece, Completion):
            final = piece
        else:
            sys.stdout.write(piece)
            sys.stdout.flush()
    sys.stdout.write("\n")
    if final is not None:
        print(f"[{final.completion_tokens} tokens, {final.completion_tokens / max(final.seconds, 1e-9):.1f} tok/s, "
              f"{final.finish_reason}]", file=sys.stderr)


# -- eval / report / lm-eval ----------------------------------------------------------------
def _eval_args(p):
    p.add_argument("run_dir")
    p.add_argument("--tasks", help="comma-separated: hellaswag,piqa,arc_easy,arc_challenge,winogrande,lambada_openai "
                                   "(NAME=FILE reads that file); default: all six when --data-dir is given")
    p.add_argument("--data-dir", help="directory with the benchmark files (e.g. ../shared/data)")
    p.add_argument("--limit", type=int, help="only the first N items of each task")
    p.add_argument("--bpb", nargs="+", default=[], metavar="FILE", help="bits per byte of these UTF-8 text files")
    p.add_argument("--bpb-stride", type=int, help="sliding-window stride in tokens (default: half the context)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--batch-tokens", type=int, help="positions per forward pass (default 2048 on CPU, 16384 on GPU)")
    p.add_argument("--bootstrap-iters", type=int, default=100_000, help="resamples for the perplexity stderr")


@command("eval", "benchmarks (scored as lm-evaluation-harness scores them) and bits-per-byte of a run directory")
@args(_eval_args)
def cmd_eval(a, extra):
    from rich.table import Table

    from luca.evaluate import evaluate
    from luca.evaluate.report import rows
    _split_overrides(extra)
    con = console()

    def done(name, rec):
        if "metrics" in rec:
            ms = ", ".join(f"{m} {v['value']:.4f}" for m, v in rec["metrics"].items())
            con.print(f"{name}: {ms} (n={rec['n']:,}, {rec['seconds']:.1f} s)")
        else:
            con.print(f"{name}: {rec['bpb']:.4f} bits per byte ({rec['tokens']:,} tokens, {rec['seconds']:.1f} s)")

    r = evaluate(a.run_dir, a.tasks, a.data_dir, a.bpb or None, a.limit, dtype=a.dtype, batch_tokens=a.batch_tokens,
                 bpb_stride=a.bpb_stride, bootstrap_iters=a.bootstrap_iters, on_result=done)
    t = Table(title=f"{Path(a.run_dir).name}: results")
    for c in ("task", "metric", "value", "stderr", "n"):
        t.add_column(c, justify="left" if c in ("task", "metric") else "right")
    for row in rows(r):
        t.add_row(*row)
    con.print(t)
    con.print(f"written: {Path(a.run_dir) / 'results.json'}, {Path(a.run_dir) / 'report.md'}")


def _report_args(p):
    p.add_argument("run_dirs", nargs="+", metavar="RUN")
    p.add_argument("--png", default="report.png", help="where to write the plot (default: report.png)")


@command("report", "several runs' evaluation results side by side (a table and one PNG)")
@args(_report_args)
def cmd_report(a, extra):
    from rich.table import Table

    from luca.evaluate.report import compare
    _split_overrides(extra)
    header, table = compare(a.run_dirs, a.png)
    t = Table(title="runs side by side")
    for i, c in enumerate(header):
        t.add_column(c, justify="left" if i < 2 else "right")
    for row in table:
        t.add_row(*row)
    con = console()
    con.print(t)
    con.print(f"plot: {a.png}")


def _lm_eval_args(p):
    p.description = ("run lm-evaluation-harness's command line with model 'luca' registered; every argument is "
                     "lm-eval's, e.g. luca lm-eval --model luca --model_args path=RUN --tasks hellaswag")


@command("lm-eval", "lm-evaluation-harness with a luca run directory as --model luca (needs luca[eval])")
@args(_lm_eval_args)
def cmd_lm_eval(a, extra):
    try:
        from luca.evaluate.lm_eval_adapter import main as lm_eval_main
    except ImportError:
        raise LucaError("luca lm-eval needs lm-eval: pip install 'luca[eval]'") from None
    lm_eval_main(extra)


# -- finetune / merge -----------------------------------------------------------------------
def _finetune_args(p):
    p.add_argument("base", help="a luca run directory or a local Hugging Face Llama / Qwen2 / Qwen3 directory")
    p.add_argument("--data", nargs="+", metavar="SPEC",
                   help="chat data: FILE | DIR | GLOB | hf:NAME[:split], options ?format=messages|alpaca|sharegpt|"
                        "qa|text&weight=W (default: the preset's)")
    p.add_argument("--out", required=True, help="run directory to write (adapter, report; merged model with --merge)")
    p.add_argument("--preset", help="fine-tuning preset (sft-qlora) or a path to a .toml file")
    p.add_argument("--lora-r", type=int)
    p.add_argument("--lora-alpha", type=float)
    p.add_argument("--lora-dropout", type=float)
    p.add_argument("--rslora", action="store_true", default=None, help="scale by alpha/sqrt(r)")
    p.add_argument("--targets", help="all, or a subset of q,k,v,o,gate,up,down")
    p.add_argument("--qlora", action="store_true", default=None, help="4-bit NF4 base weights (bitsandbytes)")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="torch.compile each block (default: on CUDA)")
    p.add_argument("--merge", action="store_true", default=None, help="also write the merged BF16 model")
    p.add_argument("--system", help="default system prompt, stored in the run's chat template")
    p.add_argument("--no-pack", dest="pack", action="store_false", default=None,
                   help="one conversation per sequence instead of packing several")
    p.add_argument("--seq-len", type=int)
    p.add_argument("--epochs", type=float)
    p.add_argument("--max-steps", type=int)
    p.add_argument("--lr", type=float)
    p.add_argument("--micro-batch", type=int)
    p.add_argument("--grad-accum", type=int)
    p.add_argument("--device")
    p.add_argument("--set", action="append", default=[], metavar="finetune.KEY=VALUE")


@command("finetune", "chat fine-tuning with LoRA or QLoRA on a run or Hugging Face directory")
@args(_finetune_args)
def cmd_finetune(a, extra):
    from luca.finetune import finetune, resolve_config
    cfg = resolve_config(a.preset, a.set + _split_overrides(extra), lora_r=a.lora_r, lora_alpha=a.lora_alpha,
                         lora_dropout=a.lora_dropout, rslora=a.rslora, targets=a.targets, qlora=a.qlora,
                         compile=a.compile, merge=a.merge, system=a.system, pack=a.pack, seq_len=a.seq_len, epochs=a.epochs,
                         max_steps=a.max_steps, lr=a.lr, micro_batch=a.micro_batch, grad_accum=a.grad_accum,
                         device=a.device)
    s = finetune(a.base, a.data, a.out, cfg)
    from rich.table import Table
    t = Table(title="finetune")
    t.add_column("")
    t.add_column("")
    for k in ("method", "trainable_parameters", "steps", "tokens", "tokens_per_s", "first_train_loss",
              "final_train_loss", "val_loss_before", "val_loss_after", "base_val_bpb_before", "base_val_bpb_after",
              "data_truncated", "data_dropped_no_target"):
        v = s.get(k)
        t.add_row(k, "n/a" if v is None else f"{v:,}" if isinstance(v, int) else str(v))
    con = console()
    con.print(t)
    from luca import rundir
    d = Path(s["run_dir"])
    con.print(f"run directory: {d.resolve()}\n  adapter: {d / rundir.ADAPTER_WEIGHTS}\n  report: {d / rundir.REPORT}"
              f"\n  loss curve: {d / rundir.LOSS_PNG}" + (f"\n  merged model: {d / rundir.WEIGHTS}" if s["merged"]
                                                         else f"\n  merge with: luca merge {d}"))


def _merge_args(p):
    p.add_argument("run_dir", help="a fine-tune run directory (with adapter_config.json)")
    p.add_argument("--out", help="write the merged run here (default: into RUN itself)")


@command("merge", "fold a LoRA/QLoRA adapter into its base: a plain BF16 run directory")
@args(_merge_args)
def cmd_merge(a, extra):
    from luca.finetune import merge
    _split_overrides(extra)
    out = merge(a.run_dir, a.out)
    console().print(f"merged model → {out}")


# -- serve / chat / persona / task ------------------------------------------------------------
def _passive_openmp() -> None:
    """Idle OpenMP threads sleep instead of spinning (unless the user chose a policy).

    Decoding runs many tiny parallel regions; on a busy 2-core machine spinning threads starve
    each other (measured: 14 → 670 tokens/s for a tiny model). Must run before torch is imported.
    """
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def _serve_args(p):
    p.add_argument("run_dir")
    p.add_argument("--backend", choices=["native", "llama.cpp"], default="native")
    p.add_argument("--host", default="127.0.0.1", help="bind address (default: loopback only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", default=os.environ.get("LUCA_API_KEY"),
                   help="require 'Authorization: Bearer KEY' (default: $LUCA_API_KEY, else none)")
    p.add_argument("--gguf", default=None, help="llama.cpp: q4_k_m, q8_0, f16, ... (exported on demand)")
    p.add_argument("--scheduler", choices=["batch", "queue"], default=None,
                   help="batch: continuous batching (native's default); queue: one request at a time")
    p.add_argument("--max-batch", type=int, default=16, help="requests decoded together at most")
    p.add_argument("--max-body", type=int, default=1 << 20, help="largest request body in bytes (else 413)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")


@command("serve", "serve a run over an OpenAI-compatible HTTP API with a web chat page at /")
@args(_serve_args)
def cmd_serve(a, extra):
    _passive_openmp()
    from luca.serve import serve
    _split_overrides(extra)
    if a.max_batch < 1:
        raise LucaError("--max-batch must be ≥ 1")
    con = console()
    serve(a.run_dir, backend=a.backend, host=a.host, port=a.port, api_key=a.api_key, scheduler=a.scheduler,
          max_batch=a.max_batch, max_body=a.max_body, threads=a.threads, gguf=a.gguf,
          say=lambda m: con.print(m, markup=False))


def _chat_args(p):
    p.add_argument("run_dir")
    p.add_argument("--backend", choices=["native", "llama.cpp"], default="native")
    p.add_argument("--gguf", default=None, help="llama.cpp: q4_k_m, q8_0, f16, ... (exported on demand)")
    p.add_argument("--system", default=None, help="system prompt for this session (default: the run's persona)")
    _sampling_args(p)
    p.set_defaults(max_new_tokens=256)


@command("chat", "chat with a run in the terminal (/system, /reset, /save, /help)")
@args(_chat_args)
def cmd_chat(a, extra):
    _passive_openmp()
    from luca.api import load
    from luca.chat import chat_loop
    _split_overrides(extra)
    sampling_from(a)  # validates
    try:
        import readline  # noqa: F401  (line editing and history for input())
    except ImportError:
        pass
    model = load(a.run_dir, backend=a.backend, gguf=a.gguf)
    chat_loop(model, system=a.system, max_new_tokens=a.max_new_tokens, temperature=a.temperature, top_k=a.top_k,
              top_p=a.top_p, repetition_penalty=a.repetition_penalty, stop=a.stop, seed=a.seed)


def _persona_args(p):
    p.add_argument("run_dir")
    p.add_argument("text", nargs="?", default=None, help="the default system prompt (omit to show it)")
    p.add_argument("--clear", action="store_true", help="remove the stored persona")


@command("persona", "show or store a run's default system prompt (used by chat, serve and plain-mode tasks)")
@args(_persona_args)
def cmd_persona(a, extra):
    from luca.api import get_persona, set_persona
    _split_overrides(extra)
    if a.clear or a.text is not None:
        set_persona(a.run_dir, "" if a.clear else a.text)
    text = get_persona(a.run_dir)
    print(text if text else "(no persona)")


def _task_args(p):
    p.add_argument("run_dir")
    p.add_argument("task", nargs="?", default="", help="the instruction (the input comes from stdin)")
    p.add_argument("--mode", choices=["reason", "code", "short", "plain"], default="short")
    p.add_argument("--choose", metavar="A,B,...", help="pick one of these options by log-likelihood")
    p.add_argument("--input", metavar="FILE", help="read the input from FILE instead of stdin")
    p.add_argument("--json", action="store_true", help="print a JSON object instead of the text")
    p.add_argument("--raw", action="store_true", help="the whole reply, not the extracted result")
    p.add_argument("--exit-index", action="store_true", help="with --choose: exit with the chosen option's index")
    p.add_argument("--backend", choices=["native", "llama.cpp"], default="native")
    p.add_argument("--max-new-tokens", type=int, default=None)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=None)


@command("task", "run one task (stdin in, text or --json out), or --choose among options: a script's decision step")
@args(_task_args)
def cmd_task(a, extra):
    _passive_openmp()
    import json as _json

    from luca.api import choose, load, run_task
    _split_overrides(extra)
    if a.input:
        try:
            text = Path(a.input).read_text(encoding="utf-8")
        except OSError as e:
            raise LucaError(f"{a.input}: {e.strerror or e}") from None
    else:
        text = "" if sys.stdin is None or sys.stdin.isatty() else sys.stdin.read()
    if not a.task.strip() and not text.strip():
        raise LucaError("task: give a task argument or input on stdin")
    model = load(a.run_dir, backend="native" if a.choose else a.backend)
    if a.choose:
        options = [o.strip() for o in a.choose.split(",") if o.strip()]
        question = f"{a.task.strip()}\n\n{text.strip()}".strip()
        c = choose(question, options, model=model)
        print(_json.dumps({"answer": c.answer, "index": c.index, "scores": c.scores}) if a.json else c.answer)
        if a.exit_index:
            sys.stdout.flush()
            raise SystemExit(c.index)
        return
    out = run_task(a.task, text, model=model, mode=a.mode, raw=True, max_new_tokens=a.max_new_tokens,
                   temperature=a.temperature, seed=a.seed)
    from luca.api import extract
    result = out if a.raw else extract(a.mode, out)
    if a.json:
        last = model.last
        print(_json.dumps({"output": result, "raw": out, "mode": a.mode,
                           "finish_reason": last.finish_reason if last else None,
                           "completion_tokens": last.completion_tokens if last else 0}, ensure_ascii=False))
    else:
        print(result)


# -- export / import ------------------------------------------------------------------------
def _export_args(p):
    p.add_argument("run_dir", help="a run directory (or a Hugging Face model directory)")
    p.add_argument("--gguf", default="f16,q8_0,q4_k_m", metavar="TYPES",
                   help="comma-separated: f32, f16, bf16, q8_0, q4_0, q4_k_s, q4_k_m, q5_k_s, q5_k_m, q6_k")
    p.add_argument("--out", default=None, help="output directory (default: RUN/gguf)")


@command("export", "write GGUF files for llama.cpp (F16, Q8_0, Q4_K_M, ...) and show size and bits per weight")
@args(_export_args)
def cmd_export(a, extra):
    from luca.export import export_gguf, results_table
    _split_overrides(extra)
    con = console()
    res = export_gguf(a.run_dir, a.gguf, a.out, say=lambda m: con.print(m, markup=False))
    con.print(results_table(res))
    for r in res:
        con.print(r["path"], markup=False)


def _import_args(p):
    p.add_argument("hf_dir", help="a local Hugging Face Llama / Qwen2 / Qwen3 model directory (safetensors)")
    p.add_argument("--out", required=True, help="the run directory to create")


@command("import", "turn a local Hugging Face Llama / Qwen2 / Qwen3 checkpoint into a luca run directory")
@args(_import_args)
def cmd_import(a, extra):
    from luca.export import import_hf
    _split_overrides(extra)
    con = console()
    import_hf(a.hf_dir, a.out, say=lambda m: con.print(m, markup=False))


# -- compare / ladder -----------------------------------------------------------------------
def _int_list(text: str) -> list[int]:
    try:
        return [int(float(x)) for x in text.replace(",", " ").split()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected numbers separated by commas, got {text!r}") from None


def _compare_args(p):
    p.add_argument("configs", nargs="+", metavar="CONFIG", help="presets or .toml files (two or more)")
    p.add_argument("--seeds", type=int, default=4, help="init seeds 0..N-1 per config (default 4)")
    p.add_argument("--match", choices=["params", "flops"], default="params")
    p.add_argument("--tokens", type=lambda s: int(float(s)), help="training tokens per run (default: each config's)")
    p.add_argument("--out", default="comparison", help="output directory (rerun to resume)")
    p.add_argument("--tolerance", type=float, default=0.02, help="allowed spread of the matched quantity")
    p.add_argument("--force", action="store_true", help="run even when unmatched or validating on other data")
    p.add_argument("--data", nargs="+", metavar="SPEC", help="data sources for every config")
    p.add_argument("--data-seed", type=int, default=0, help="data-order seed shared by all runs (-1: = init seed)")
    p.add_argument("--diagnostics", type=int, nargs="?", const=100, default=0, metavar="N",
                   help="score the structured tasks, N examples each (default 100)")
    p.add_argument("--by-position", type=int, nargs="?", const=200_000, default=0, metavar="BYTES",
                   help="BPB by position in the context over BYTES of validation text (default 200000)")
    p.add_argument("--dry-run", action="store_true", help="count and check the match; train nothing")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE")


@command("compare", "train configs × seeds on the same data; statistics, comparison.md and curves")
@args(_compare_args)
def cmd_compare(a, extra):
    from rich.table import Table

    from luca.compare import compare
    con = console()
    r = compare(a.configs, a.seeds, a.match, a.tokens, a.out, tolerance=a.tolerance, force=a.force,
                overrides=a.set + _split_overrides(extra), sources=a.data,
                data_seed=None if a.data_seed < 0 else a.data_seed, diagnostics=a.diagnostics,
                by_position=a.by_position, dry_run=a.dry_run, say=lambda m: con.print(m, markup=False))
    t = Table(title="compare" + (" (dry run)" if a.dry_run else ""))
    for h in ("config", "parameters", "tokens", "FLOPs", "val BPB", "n"):
        t.add_column(h)
    for c in r["configs"]:
        s = r.get("summary", {}).get("configs", {}).get(c["label"], {})
        bpb = f"{s['val_bpb_mean']:.4f} ± {s['val_bpb_std']:.4f}" if s.get("n") else "–"
        t.add_row(c["label"], f"{c['parameters']:,}", f"{c['tokens']:,}", f"{c['flops']:.3g}", bpb, str(s.get("n", 0)))
    con.print(t)
    if a.dry_run:
        con.print(f"matched on {r['settings']['match']}: spread {r['settings']['spread']:.2%}")
        return
    from luca.compare_report import verdict
    for p in r["summary"]["pairs"]:
        con.print(verdict(p).replace("**", ""), markup=False)
    out = Path(r["out"])
    con.print(f"{out / 'comparison.md'}\n{out / 'comparison.json'}\n{out / 'validation_curves.png'}")


def _ladder_args(p):
    p.add_argument("config", help="preset or .toml file")
    p.add_argument("--sizes", type=_int_list, required=True, help="depths, e.g. 2,3,4,6")
    p.add_argument("--tokens", type=_int_list, required=True, help="training tokens, one or several, e.g. 2e6,8e6")
    p.add_argument("--budget", type=float, help="FLOPs to forecast the compute-optimal size for")
    p.add_argument("--out", default="ladder")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data", nargs="+", metavar="SPEC")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE")


@command("ladder", "train a ladder of sizes, fit L(N[, D]) = E + A/N^a (+ B/D^b), forecast")
@args(_ladder_args)
def cmd_ladder(a, extra):
    from luca.ladder import ladder
    con = console()
    r = ladder(a.config, a.sizes, a.tokens, a.out, seed=a.seed, overrides=a.set + _split_overrides(extra),
               sources=a.data, budget=a.budget, say=lambda m: con.print(m, markup=False))
    con.print((Path(r["out"]) / "ladder.md").read_text(encoding="utf-8"), markup=False)


# -- main -----------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="luca", description="compact language models, end to end")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    for name, (help_, adder, _) in COMMANDS.items():
        sp = sub.add_parser(name, help=help_, description=help_)
        adder(sp)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv:
        argv = ["run"]  # `luca` alone runs the main job
    parser = build_parser()
    a, extra = parser.parse_known_args(argv)
    if a.command is None:
        parser.print_help()
        return 2
    handler = COMMANDS[a.command][2]
    try:
        handler(a, extra)
    except LucaError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0
    except OSError as e:
        if os.environ.get("LUCA_DEBUG"):
            raise
        # An OSError here is the environment's (disk full, permission): say which file.
        where = getattr(e, "filename", None)
        print(f"error: {str(where) + ': ' if where else ''}{e.strerror or e}",
              file=sys.stderr)
        return 2
    return 0


def entry() -> None:
    sys.exit(main())


if __name__ == "__main__":
    entry()
