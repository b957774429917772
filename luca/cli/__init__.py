"""The `luca` command: argument parsing, printing and exit codes; each command calls one stage.

The commands live in two modules: `make` (run, data, tokenizer, train, finetune, merge, export,
import, compare, ladder: commands that write run directories) and `use` (generate, eval, report,
lm-eval, serve, chat, persona, task: commands that read them); this module holds the registry,
the helpers they share and `main`.

Config overrides are accepted on every training command as `--section.key value` (or
`--section.key=value`, or `--set section.key=value`). A user-caused error prints one line and
exits with code 2; nothing else is printed as a traceback unless LUCA_DEBUG=1.
"""
from __future__ import annotations

import argparse
import os
import sys

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


def split_overrides(extra: list[str]) -> list[str]:
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


def sampling_args(p: argparse.ArgumentParser) -> None:
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



# -- main -----------------------------------------------------------------------------------
ORDER = ("run", "data", "tokenizer", "train", "generate", "eval", "report", "lm-eval", "finetune", "merge",
         "serve", "chat", "persona", "task", "export", "import", "compare", "ladder")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="luca", description="compact language models, end to end")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    for name in sorted(COMMANDS, key=lambda n: ORDER.index(n) if n in ORDER else len(ORDER)):
        help_, adder, _ = COMMANDS[name]
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



from luca.cli import make, use  # noqa: E402,F401  (importing them registers their commands)
