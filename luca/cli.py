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
              full_config=cfg)
    _print_summary(console(), s)


# -- generate -------------------------------------------------------------------------------
def _gen_args(p):
    p.add_argument("run_dir")
    p.add_argument("--prompt", default="", help="prompt text (default: read stdin)")
    _sampling_args(p)


@command("generate", "stream a continuation of a prompt")
@args(_gen_args)
def cmd_generate(a, extra):
    from luca import rundir
    from luca.engine import Completion, stream
    _split_overrides(extra)
    s = sampling_from(a)
    model = rundir.load_model(a.run_dir)
    tok = rundir.load_tokenizer(a.run_dir)
    prompt = a.prompt if a.prompt else sys.stdin.read()
    ids = tok.encode(prompt) or [tok.eot_id]
    if len(ids) + s.max_new_tokens > model.cfg.max_seq_len:
        raise LucaError(f"prompt ({len(ids)} tokens) + --max-new-tokens ({s.max_new_tokens}) exceeds the "
                        f"model's context ({model.cfg.max_seq_len})")
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
