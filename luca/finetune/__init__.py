"""Fine-tuning: chat SFT with LoRA or QLoRA on a luca run or a Hugging Face Llama/Qwen2/Qwen3 directory.

What is notable:
- `finetune(base, data, out, cfg)` reads chat data (`chat_data`: five formats, weighted mix,
  assistant-only targets, packing), wraps the base in LoRA layers (`lora`: any of the seven
  projections; NF4 base for QLoRA), trains the adapters with AdamW and writes a run directory with
  the adapter in PEFT's layout, the tokenizer (with the optional default system prompt in its chat
  template), `luca.toml`, `metrics.jsonl`, `report.md`, `loss.png` and `finetune_summary.json`.
- `merge(run_dir)` folds the adapter into the base (dequantised NF4 for QLoRA) and writes a plain
  BF16 run directory (into the same directory by default) that every other command takes.
- The loss is the exact per-token mean over all assistant targets of an optimizer step (summed
  over its micro-batches, divided by their target count), through the model's fused chunked
  cross-entropy: full-vocabulary logits never exist. BF16 autocast; frozen base weights are held
  in BF16 (or NF4), the adapters as FP32 master weights.
- What the fine-tune cost the base: when the base is a luca run whose data directory is still
  there, validation BPB on the base's own validation shards before and after (same batches as
  training's), next to the chat validation loss before and after.
- Truncation is never silent: cut and dropped examples are counted, printed and reported.
"""
from __future__ import annotations

import dataclasses
import math
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch

from luca import rundir
from luca.errors import LucaError
from luca.finetune import chat_data as CD
from luca.finetune.lora import (LoraSpec, adapter_config, adapter_state_dict, apply_lora, compile_blocks,
                                load_adapter_weights, merge_lora, parse_targets, set_gradient_checkpointing,
                                spec_from_adapter_config, trainable_parameters)
from luca.tokenizer import CHAT_TEMPLATE, Tokenizer

__all__ = ["FinetuneConfig", "finetune", "merge", "load_finetuned", "resolve_config"]


@dataclass
class FinetuneConfig:
    data: list[str] = field(default_factory=list)  # chat data specs (see chat_data)
    lora_r: int = 16
    lora_alpha: float = 16.0
    lora_dropout: float = 0.05
    rslora: bool = False  # scale by α/√r instead of α/r
    targets: list[str] = field(default_factory=lambda: ["all"])  # all | q,k,v,o,gate,up,down
    qlora: bool = False  # base weights in 4-bit NF4 (bitsandbytes)
    seq_len: int = 1024  # capped at the base's context
    pack: bool = True
    micro_batch: int = 4
    grad_accum: int = 4
    epochs: float = 1.0
    max_steps: int = 0  # > 0: exactly this many optimizer steps (epochs ignored)
    lr: float = 2e-4
    min_lr_ratio: float = 0.0
    warmup_steps: int = 10
    schedule: str = "cosine"  # cosine | constant
    weight_decay: float = 0.0
    beta1: float = 0.9
    beta2: float = 0.999
    grad_clip: float = 1.0
    gradient_checkpointing: bool = True
    compile: bool | None = None  # torch.compile each block; None: on CUDA (2.2× the eager speed there)
    dtype: str = "bf16"  # bf16 | fp32
    system: str = ""  # default system prompt, stored in the run's chat template
    val_fraction: float = 0.02
    eval_every: int = 50
    eval_rows: int = 64  # validation rows (packed sequences) at most
    log_every: int = 5
    seed: int = 0
    device: str = "auto"
    merge: bool = False  # also write the merged BF16 model

    def __post_init__(self) -> None:
        if self.schedule not in ("cosine", "constant"):
            raise ValueError(f"schedule must be cosine or constant, got {self.schedule!r}")
        if self.dtype not in ("bf16", "fp32"):
            raise ValueError(f"dtype must be bf16 or fp32, got {self.dtype!r}")
        for f in ("seq_len", "micro_batch", "grad_accum", "eval_rows", "log_every"):
            if getattr(self, f) <= 0:
                raise ValueError(f"{f} must be positive")
        if self.epochs <= 0 and self.max_steps <= 0:
            raise ValueError("epochs or max_steps must be positive")
        if not 0 <= self.val_fraction < 1:
            raise ValueError("val_fraction must be in [0, 1)")
        self.targets = parse_targets(self.targets)

    def lora_spec(self) -> LoraSpec:
        return LoraSpec(self.lora_r, self.lora_alpha, self.lora_dropout, self.rslora, list(self.targets))


def resolve_config(preset: str | None = None, overrides: list[str] | dict | None = None,
                   **fields) -> FinetuneConfig:
    """A preset's `[finetune]` section, then `finetune.key=value` overrides, then explicit fields."""
    from luca import config as C
    raw = C.load_preset(preset) if preset else {}
    unknown = sorted(set(raw) - {"name", "description", "finetune"})
    if unknown:
        raise LucaError(f"preset {preset!r}: section [{unknown[0]}] is not a fine-tuning section "
                        f"(a fine-tuning preset has [finetune])")
    if preset and "finetune" not in raw:
        raise LucaError(f"preset {preset!r} has no [finetune] section")
    raw = C.apply_overrides(raw, overrides or [])
    bad = sorted(set(raw) - {"name", "description", "finetune"})
    if bad:
        raise LucaError(f"override section {bad[0]!r}: fine-tuning takes finetune.KEY=VALUE")
    section = dict(raw.get("finetune", {}))
    section.update({k: v for k, v in fields.items() if v is not None})
    return C.build(FinetuneConfig, section, "finetune")


# -- loading ----------------------------------------------------------------------------------
def _tokenizer(base: Path, system: str) -> Tokenizer:
    tok = rundir.load_tokenizer(base)
    if system:
        tok.default_system = system
    return tok


def _load_lora_model(base: Path, spec: LoraSpec, qlora: bool, dtype: str, device: torch.device):
    """The base in its training dtype (BF16 or FP32), wrapped in LoRA layers on `device`."""
    load_dtype = torch.bfloat16 if dtype == "bf16" else torch.float32
    model = rundir.load_model(base, device="cpu", dtype=load_dtype)
    return apply_lora(model, spec, quantize=qlora, device=device)


def load_finetuned(run_dir: str | Path, device: str | torch.device = "cpu",
                   dtype: torch.dtype = torch.float32):
    """(base + adapter model, tokenizer) of a fine-tune run, unmerged, in eval mode.

    The base is loaded (and NF4-quantised for QLoRA) exactly as in training, then cast to `dtype`.
    For generation, merge first (`merge_lora`): the engine reads plain projection weights.
    """
    run_dir = Path(run_dir)
    acfg_path = run_dir / rundir.ADAPTER_CONFIG
    acfg = rundir.read_json(acfg_path)
    spec = spec_from_adapter_config(acfg, str(acfg_path))
    ft = rundir.read_luca_toml(run_dir).get("finetune", {})
    base = Path(acfg.get("base_model_name_or_path") or "")
    if not rundir.is_run_dir(base):
        raise LucaError(f"{acfg_path}: base model {str(base)!r} is not a run or Hugging Face directory "
                        "(moved? edit base_model_name_or_path)")
    model = _load_lora_model(base, spec, bool(ft.get("qlora", False)), ft.get("dtype", "fp32"), torch.device(device))
    load_adapter_weights(model, run_dir / rundir.ADAPTER_WEIGHTS)
    model.to(dtype)
    tok = rundir.load_tokenizer(run_dir)
    system = rundir.read_json(run_dir / rundir.TOKENIZER_CONFIG).get("luca_default_system") or ""
    if system and not tok.default_system:
        tok.default_system = system  # a foreign tokenizer's config keeps it only in our key
    return model.eval(), tok


def _save_tokenizer(out: Path, tok: Tokenizer) -> None:
    """The tokenizer, with a chat template that renders exactly what training saw."""
    src = getattr(tok, "source_config", None)
    if src is not None:  # a foreign (HF) tokenizer: its own template may differ from ChatML; ours wins
        template = CHAT_TEMPLATE
        if tok.default_system:
            import json
            template = "{%- set default_system = " + json.dumps(tok.default_system) + " %}" + template
        tok.source_config = {**src, "chat_template": template, "luca_default_system": tok.default_system}
    rundir.save_tokenizer(out, tok)


# -- validation -------------------------------------------------------------------------------
@torch.no_grad()
def chat_val_loss(model, examples, rows, micro_batch: int, pad_id: int, device, autocast) -> float:
    """Mean loss (nats) over every assistant target of the validation rows."""
    was = model.training
    model.eval()
    total, count = 0.0, 0
    for i in range(0, len(rows), micro_batch):
        b = CD.collate(examples, rows[i:i + micro_batch], pad_id).to(device)
        with autocast:
            total += float(model(b.tokens, b.targets, positions=b.positions, doc_ids=b.doc_ids, reduction="sum"))
        count += b.n_targets
    model.train(was)
    return total / max(1, count)


def _base_bpb_setup(base: Path, tok: Tokenizer):
    """(shards, seq_len, n_batches, bs, byte_lens) of a luca base's validation data, or None."""
    from luca import data as D
    from luca.train import token_byte_lengths
    toml = rundir.read_luca_toml(base)
    data_dir, train = toml.get("data_dir"), toml.get("train", {})
    if not data_dir or not (Path(data_dir) / "manifest.json").is_file():
        return None
    try:
        shards = D.TokenShards(data_dir, "val")
    except LucaError:
        return None
    if shards.tokenizer_checksum != D.tokenizer_checksum(tok):
        return None
    seq_len = int(train.get("seq_len", 256))
    if shards.num_chunks(seq_len) < 1:
        return None
    vocab = rundir.load_model_config(base).vocab_size
    return (shards, seq_len, int(train.get("eval_batches", 8)), int(train.get("micro_batch", 8)),
            token_byte_lengths(tok, vocab))


def _bpb(model, setup, device, autocast) -> float:
    from luca.train import validation_bpb
    shards, seq_len, n, bs, lens = setup
    was = model.training
    bpb, _ = validation_bpb(model, shards, seq_len, n, bs, lens, device, autocast)
    model.train(was)
    return bpb


# -- training ---------------------------------------------------------------------------------
def finetune(base: str | Path, data: list[str] | None, out: str | Path, cfg: FinetuneConfig,
             progress: bool = True) -> dict:
    """Fine-tune `base` on chat `data` (or `cfg.data`) into run directory `out`; return a summary."""
    from luca.optim import adamw, lr_at
    from luca.train import StepProgress, pick_device
    t_start = time.perf_counter()
    base, out = rundir.require_run_dir(base).resolve(), Path(out)
    if out.resolve() == base:
        raise LucaError(f"{out}: the output directory must differ from the base")
    specs = list(data) if data else list(cfg.data)
    if not specs:
        raise LucaError("finetune data: no sources given (--data SPEC ...)")
    for spec in specs:  # a typo fails now, before any model is loaded
        CD.parse_chat_source(spec)
    cfg = dataclasses.replace(cfg, data=specs)
    say = _sayer(progress)
    device = pick_device(cfg.device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = True
    torch.manual_seed(cfg.seed)
    tok = _tokenizer(base, cfg.system)
    mcfg = rundir.load_model_config(base)
    seq_len = min(cfg.seq_len, mcfg.max_seq_len)
    if seq_len < cfg.seq_len:
        say(f"seq_len {cfg.seq_len} → {seq_len} (the base's context)")

    chat = CD.load_chat_data(specs, tok, seq_len, cfg.val_fraction, progress)
    totals = chat.totals()
    if progress:
        _print_data_table(chat)
    if totals["truncated"] or totals["dropped_no_target"]:
        say(f"[yellow]truncation[/]: {totals['truncated']:,} examples longer than {seq_len + 1} tokens were cut "
            f"({totals['truncated_tokens']:,} tokens dropped); {totals['dropped_no_target']:,} left with no "
            "assistant token were dropped")

    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if cfg.dtype == "bf16" else nullcontext()
    spec = cfg.lora_spec()
    model = rundir.load_model(base, device="cpu", dtype=torch.bfloat16 if cfg.dtype == "bf16" else torch.float32)
    # The base's BPB is measured before wrapping (so QLoRA's quantisation error counts as cost).
    bpb_setup = _base_bpb_setup(base, tok)
    bpb_before = _bpb(model.to(device), bpb_setup, device, autocast) if bpb_setup else None
    model = apply_lora(model, spec, quantize=cfg.qlora, device=device)
    set_gradient_checkpointing(model, cfg.gradient_checkpointing)
    if cfg.compile if cfg.compile is not None else device.type == "cuda":
        compile_blocks(model)
    n_train, n_total = trainable_parameters(model)
    say(f"{'QLoRA (NF4 base)' if cfg.qlora else 'LoRA'} r={spec.r} α={spec.alpha:g} on "
        f"{','.join(spec.targets)}: trainable parameters {n_train:,} of {n_total:,} ({100 * n_train / n_total:.2f}%)")

    # Data order: epoch e is a fresh weighted mix; its rows follow one another.
    rows_per_step = cfg.micro_batch * cfg.grad_accum
    epoch_rows: list[tuple[list, list[list[int]]]] = []

    def epoch(e: int):
        while len(epoch_rows) <= e:
            ex = CD.mix(chat, cfg.seed, len(epoch_rows))
            epoch_rows.append((ex, CD.pack(ex, seq_len, cfg.pack)))
        return epoch_rows[e]

    n_rows0 = len(epoch(0)[1])
    # By epochs, the last step may be short; with max_steps, epochs follow one another as needed.
    limit = None if cfg.max_steps > 0 else max(1, math.ceil(cfg.epochs * n_rows0))
    steps = cfg.max_steps if cfg.max_steps > 0 else math.ceil(limit / rows_per_step)

    def step_rows(step: int) -> list[list[tuple[list, list[int]]]]:
        """Micro-batches of (epoch's examples, row) for optimizer step `step`, walking the epochs."""
        g, e = step * rows_per_step, 0
        want = rows_per_step if limit is None else min(rows_per_step, limit - g)
        while g >= len(epoch(e)[1]):
            g -= len(epoch(e)[1])
            e += 1
        taken: list[tuple[list, list[int]]] = []
        while len(taken) < want:
            ex, rows = epoch(e)
            taken += [(ex, r) for r in rows[g:g + want - len(taken)]]
            e, g = e + 1, 0
        return [taken[i:i + cfg.micro_batch] for i in range(0, len(taken), cfg.micro_batch)]

    val_rows = CD.pack(chat.val, seq_len, cfg.pack)[:cfg.eval_rows]
    pad = tok.eot_id
    opt = adamw(model, cfg.lr, cfg.weight_decay, (cfg.beta1, cfg.beta2), device_type=device.type)
    params = [p for p in model.parameters() if p.requires_grad]
    val_before = chat_val_loss(model, chat.val, val_rows, cfg.micro_batch, pad, device, autocast) if val_rows else None

    out.mkdir(parents=True, exist_ok=True)
    # A merged model from an earlier fine-tune here would no longer match the new adapter.
    for f in (rundir.METRICS, rundir.REPORT, rundir.WEIGHTS, rundir.WEIGHTS_INDEX, rundir.CONFIG, rundir.GENERATION):
        (out / f).unlink(missing_ok=True)
    bar = StepProgress("finetune", progress, steps)
    t0 = time.perf_counter()
    t_log, tok_log, tokens, targets = t0, 0, 0, 0
    first_loss = last_loss = val_loss = float("nan")
    skipped = 0
    model.train()
    try:
        for step in range(steps):
            lr = lr_at(step, steps, cfg.lr, cfg.warmup_steps, cfg.schedule, cfg.min_lr_ratio)
            for gr in opt.param_groups:
                gr["lr"] = lr
            batches = [_collate(mb, pad) for mb in step_rows(step)]
            n_tgt = sum(b.n_targets for b in batches)
            loss_sum = torch.zeros((), device=device)
            for b in batches:
                b = b.to(device)
                with autocast:
                    loss = model(b.tokens, b.targets, positions=b.positions, doc_ids=b.doc_ids, reduction="sum")
                (loss / n_tgt).backward()
                loss_sum += loss.detach()
            gnorm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip if cfg.grad_clip > 0 else 1e30)
            if bool(torch.isfinite(gnorm)):
                opt.step()
            else:
                skipped += 1
                say(f"step {step + 1}: non-finite gradient; step skipped")
            opt.zero_grad(set_to_none=True)
            tokens += sum(b.n_tokens for b in batches)
            targets += n_tgt
            done = step + 1
            if done % cfg.log_every == 0 or done == steps or step == 0:
                now = time.perf_counter()
                last_loss = loss_sum.item() / n_tgt
                if step == 0:
                    first_loss = last_loss
                rec = {"step": done, "loss": round(last_loss, 6), "lr": lr, "grad_norm": round(float(gnorm), 6),
                       "tokens": tokens, "target_tokens": targets,
                       "tokens_per_s": round((tokens - tok_log) / max(1e-9, now - t_log), 1),
                       "elapsed_s": round(now - t0, 3)}
                t_log, tok_log = now, tokens
                if val_rows and cfg.eval_every > 0 and (done % cfg.eval_every == 0 or done == steps):
                    val_loss = chat_val_loss(model, chat.val, val_rows, cfg.micro_batch, pad, device, autocast)
                    rec["val_loss"] = round(val_loss, 6)
                rundir.append_metrics(out, rec)
                bar.update(done, rec)
            else:
                bar.update(done, None)
    finally:
        bar.close()
    elapsed = time.perf_counter() - t0
    if val_rows and not math.isfinite(val_loss):
        val_loss = chat_val_loss(model, chat.val, val_rows, cfg.micro_batch, pad, device, autocast)
    bpb_after = _bpb(model, bpb_setup, device, autocast) if bpb_setup else None

    # -- the run directory
    from safetensors.torch import save_file
    from luca.atomic import atomic_path
    with atomic_path(out / rundir.ADAPTER_WEIGHTS) as tmp:
        save_file(adapter_state_dict(model), str(tmp), metadata={"format": "pt"})
    rundir.write_json(out / rundir.ADAPTER_CONFIG, adapter_config(spec, str(base)))
    _save_tokenizer(out, tok)
    base_toml = rundir.read_luca_toml(base)
    record = {k: v for k, v in base_toml.items() if k not in ("finetune", "base")}
    record.update(name=out.name, base=str(base), trained_on=device.type,
                  finetune={**dataclasses.asdict(cfg), "seq_len": seq_len})
    rundir.write_luca_toml(out, record)
    summary = {
        "run_dir": str(out), "base": str(base), "method": "qlora" if cfg.qlora else "lora",
        "trainable_parameters": n_train, "parameters": n_total, "steps": steps, "seq_len": seq_len,
        "tokens": tokens, "target_tokens": targets, "time_s": round(elapsed, 2),
        "tokens_per_s": round(tokens / max(1e-9, elapsed), 1), "first_train_loss": round(first_loss, 4),
        "final_train_loss": round(last_loss, 4),
        "val_loss_before": None if val_before is None else round(val_before, 4),
        "val_loss_after": None if not val_rows else round(val_loss, 4),
        "base_val_bpb_before": None if bpb_before is None else round(bpb_before, 4),
        "base_val_bpb_after": None if bpb_after is None else round(bpb_after, 4),
        "packing_efficiency": round(sum(len(ids) - 1 for ids, _ in epoch(0)[0]) / (n_rows0 * seq_len), 4)
        if cfg.pack else None,
        "data": chat.stats, **{f"data_{k}": v for k, v in totals.items()},
        "skipped_steps": skipped, "device": str(device), "merged": None,
    }
    rundir.write_json(out / rundir.FINETUNE_SUMMARY, summary)
    _write_report(out, summary, cfg, spec)
    if cfg.merge:
        del model, opt
        summary["merged"] = str(merge(out, progress=progress))
        rundir.write_json(out / rundir.FINETUNE_SUMMARY, summary)
    summary["wall_s"] = round(time.perf_counter() - t_start, 1)
    return summary


def _collate(mb: list[tuple[list, list[int]]], pad: int) -> CD.Batch:
    """A micro-batch of (epoch's examples, row) pairs (a step may span two epochs)."""
    examples, rows = [], []
    for ex, row in mb:
        rows.append(list(range(len(examples), len(examples) + len(row))))
        examples += [ex[i] for i in row]
    return CD.collate(examples, rows, pad)


# -- merge ------------------------------------------------------------------------------------
def merge(run_dir: str | Path, out: str | Path | None = None, progress: bool = False) -> Path:
    """Fold the adapter into the base (dequantised NF4 for QLoRA); write a BF16 run directory."""
    run_dir = Path(run_dir)
    out = Path(out) if out is not None else run_dir
    if not (run_dir / rundir.ADAPTER_CONFIG).is_file():
        raise LucaError(f"{run_dir}: no {rundir.ADAPTER_CONFIG}; not a fine-tune run directory")
    t0 = time.perf_counter()
    # QLoRA's NF4 base is re-quantised on the kind of device that trained it (the same kernels).
    trained_on = rundir.read_luca_toml(run_dir).get("trained_on", "cpu")
    device = "cuda" if trained_on == "cuda" and torch.cuda.is_available() else "cpu"
    model, tok = load_finetuned(run_dir, device=device, dtype=torch.float32)
    merge_lora(model)
    model.to("cpu")
    rundir.save_model(out, model, tok)
    if out != run_dir:
        _save_tokenizer(out, tok)
        toml = rundir.read_luca_toml(run_dir)
        rundir.write_luca_toml(out, {**toml, "name": out.name})
        for f in (rundir.ADAPTER_CONFIG, rundir.ADAPTER_WEIGHTS, rundir.FINETUNE_SUMMARY):
            if (run_dir / f).is_file():  # the merged model keeps a record of what made it
                (out / f).parent.mkdir(parents=True, exist_ok=True)
                (out / f).write_bytes((run_dir / f).read_bytes())
    rundir.update_report_section(out, "Merge", f"Adapter merged into the base in float32 and written as BF16 "
                                               f"`{rundir.WEIGHTS}` ({time.perf_counter() - t0:.1f} s).\n")
    _sayer(progress)(f"merged model → {out}")
    return out


# -- report and progress ----------------------------------------------------------------------
def _write_report(out: Path, s: dict, cfg: FinetuneConfig, spec: LoraSpec) -> None:
    from luca.train import plot_loss

    def f(v, fmt="{:.4f}"):
        return "n/a" if v is None else fmt.format(v)

    rows = [("base", s["base"]),
            ("method", f"{'QLoRA (NF4 base, double-quantised scales)' if cfg.qlora else 'LoRA'}, r={spec.r}, "
                       f"α={spec.alpha:g}{' (rsLoRA)' if spec.rslora else ''}, dropout {spec.dropout:g}, "
                       f"targets {','.join(spec.targets)}"),
            ("trainable parameters", f"{s['trainable_parameters']:,} of {s['parameters']:,}"),
            ("data", f"{s['data_examples']:,} examples ({s['data_val_examples']:,} validation), "
                     f"{s['data_target_tokens']:,} target tokens of {s['data_tokens']:,}"),
            ("truncation", f"{s['data_truncated']:,} cut ({s['data_truncated_tokens']:,} tokens), "
                           f"{s['data_dropped_no_target']:,} dropped, seq_len {s['seq_len']}"),
            ("steps", f"{s['steps']} × {cfg.micro_batch}×{cfg.grad_accum} rows"
                      f"{' (packed, efficiency ' + f(s['packing_efficiency'], '{:.0%}') + ')' if cfg.pack else ''}"),
            ("time", f"{s['time_s']:.1f} s on {s['device']}, {s['tokens_per_s']:,.0f} tokens/s"),
            ("train loss", f"{f(s['first_train_loss'])} → {f(s['final_train_loss'])}"),
            ("chat validation loss", f"{f(s['val_loss_before'])} → {f(s['val_loss_after'])}"),
            ("base validation BPB", f"{f(s['base_val_bpb_before'])} → {f(s['base_val_bpb_after'])}")]
    table = "| | |\n|---|---|\n" + "\n".join(f"| {k} | {v} |" for k, v in rows)
    src = "\n".join(f"- `{d['spec']}`: weight {d['weight']:g}, {d['examples']:,} examples" for d in s["data"])
    plot = plot_loss(out)
    body = table + "\n\nData:\n" + src + (f"\n\n![loss]({rundir.LOSS_PNG})\n" if plot else "\n")
    rundir.update_report_section(out, "Fine-tuning", body)


def _print_data_table(chat: CD.ChatData) -> None:
    from rich.console import Console
    from rich.table import Table
    t = Table(title="fine-tuning data")
    for c in ("source", "weight", "examples", "val", "tokens", "targets", "cut", "dropped", "dups", "no reply"):
        t.add_column(c, justify="left" if c == "source" else "right")
    for s in chat.stats:
        t.add_row(s["spec"], f"{s['weight']:g}", f"{s['examples']:,}", f"{s['val_examples']:,}", f"{s['tokens']:,}",
                  f"{s['target_tokens']:,}", f"{s['truncated']:,}", f"{s['dropped_no_target']:,}",
                  f"{s['duplicates']:,}", f"{s['skipped_no_reply']:,}")
    Console(stderr=True).print(t)


def _sayer(enabled: bool):
    def say(msg: str) -> None:
        if enabled:
            from rich.console import Console
            Console(stderr=True, highlight=False).print(msg)
    return say


