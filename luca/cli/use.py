"""`luca` commands that use run directories: generate, eval, report, lm-eval, serve, chat, persona,
task."""
from __future__ import annotations

import os
import sys
from pathlib import Path

from luca.cli import args, command, console, sampling_args, sampling_from, split_overrides
from luca.errors import LucaError


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
    sampling_args(p)


@command("generate", "stream a continuation of a prompt")
@args(_gen_args)
def cmd_generate(a, extra):
    from luca import rundir
    from luca.engine import Completion, NativeEngine, stream
    split_overrides(extra)
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
    split_overrides(extra)
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
    split_overrides(extra)
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


def passive_openmp() -> None:
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
    passive_openmp()
    from luca.serve import serve
    split_overrides(extra)
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
    sampling_args(p)
    p.set_defaults(max_new_tokens=256)


@command("chat", "chat with a run in the terminal (/system, /reset, /save, /help)")
@args(_chat_args)
def cmd_chat(a, extra):
    passive_openmp()
    from luca.api import load
    from luca.chat import chat_loop
    split_overrides(extra)
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
    split_overrides(extra)
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
    passive_openmp()
    import json as _json

    from luca.api import choose, load, run_task
    split_overrides(extra)
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

