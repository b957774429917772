"""`luca` commands that make run directories: run, data, tokenizer, train, finetune, merge, export,
import, compare, ladder."""
from __future__ import annotations

import argparse
from pathlib import Path

from luca.cli import args, command, console, split_overrides
from luca.errors import LucaError


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
    s = run(a.preset, a.data, a.out, a.set + split_overrides(extra), resume=a.resume, samples=a.samples,
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
    split_overrides(extra)
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
    split_overrides(extra)
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
    cfg = resolve(a.preset, a.set + split_overrides(extra))
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
    cfg = resolve_config(a.preset, a.set + split_overrides(extra), lora_r=a.lora_r, lora_alpha=a.lora_alpha,
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
    split_overrides(extra)
    out = merge(a.run_dir, a.out)
    console().print(f"merged model → {out}")


def _export_args(p):
    p.add_argument("run_dir", help="a run directory (or a Hugging Face model directory)")
    p.add_argument("--gguf", default="f16,q8_0,q4_k_m", metavar="TYPES",
                   help="comma-separated: f32, f16, bf16, q8_0, q4_0, q4_k_s, q4_k_m, q5_k_s, q5_k_m, q6_k")
    p.add_argument("--out", default=None, help="output directory (default: RUN/gguf)")


@command("export", "write GGUF files for llama.cpp (F16, Q8_0, Q4_K_M, ...) and show size and bits per weight")
@args(_export_args)
def cmd_export(a, extra):
    from luca.export import export_gguf, results_table
    split_overrides(extra)
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
    split_overrides(extra)
    con = console()
    import_hf(a.hf_dir, a.out, say=lambda m: con.print(m, markup=False))


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
                overrides=a.set + split_overrides(extra), sources=a.data,
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
    r = ladder(a.config, a.sizes, a.tokens, a.out, seed=a.seed, overrides=a.set + split_overrides(extra),
               sources=a.data, budget=a.budget, say=lambda m: con.print(m, markup=False))
    con.print((Path(r["out"]) / "ladder.md").read_text(encoding="utf-8"), markup=False)

