"""`luca run`: corpus → tokenizer → training → validation BPB → samples, from one preset.

What is notable:
- A preset (TOML) plus `section.key=value` overrides resolve to one config; the resolved config
  is written to the run directory's `luca.toml`, so the run records what produced it.
- Documents, the tokenizer and token shards are cached under `$LUCA_HOME` (default
  `~/.cache/luca`) keyed by a hash of the config sections that produce them: a second run with
  the same data and tokenizer skips straight to training.
"""
from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path

from luca import config as C
from luca import data as D
from luca import rundir
from luca.auxiliary import AuxConfig
from luca.errors import LucaError
from luca.model import ModelConfig
from luca.tokenizer import Tokenizer, TokenizerConfig, build_tokenizer
from luca.train import TrainConfig, train

SECTIONS = {"data": D.DataConfig, "tokenizer": TokenizerConfig, "model": ModelConfig, "train": TrainConfig,
            "aux": AuxConfig}


def luca_home() -> Path:
    return Path(os.environ.get("LUCA_HOME", Path.home() / ".cache" / "luca"))


def resolve(preset: str | dict = "nano-n1", overrides: list[str] | dict | None = None,
            sources: list[str] | None = None) -> dict:
    """The full config of a run as plain sections; every key is checked against its dataclass.

    `preset` is a preset name, a path to a .toml file, or an already loaded TOML dict."""
    raw = C.apply_overrides(C.load_preset(preset) if isinstance(preset, str) else preset, overrides or [])
    check_sections(raw)
    if sources:
        raw.setdefault("data", {})["sources"] = list(sources)
    unknown = sorted(set(raw) - set(SECTIONS) - {"name", "description"})
    if unknown:
        raise LucaError(f"unknown config section [{unknown[0]}] (sections: {', '.join(SECTIONS)})")
    raw["model"] = C.derive_model(raw.get("model", {}))
    out = {k: raw[k] for k in ("name", "description") if k in raw}
    for name, cls in SECTIONS.items():
        obj = C.build(cls, raw.get(name, {}), name)
        out[name] = obj.to_dict() if hasattr(obj, "to_dict") else _asdict(obj)
    return out


def check_sections(raw: dict) -> None:
    """Sections are tables; `name` is one path component, since it names the run directory runs/NAME."""
    for k in SECTIONS:
        if not isinstance(raw.get(k, {}), dict):
            raise LucaError(f"[{k}]: expected a table of keys, not {raw[k]!r:.40}")
    for k in ("name", "description"):
        if not isinstance(raw.get(k, ""), str):
            raise LucaError(f"{k}: expected a string, not {raw[k]!r:.40}")
    name = raw.get("name")
    if name is not None and (Path(name).name != name or name in ("", ".", "..") or "\\" in name):
        raise LucaError(f"name = {name!r}: must be one path component (the run directory is runs/NAME)")


def _asdict(obj) -> dict:
    import dataclasses
    return dataclasses.asdict(obj)


def _key(*parts: dict) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]


def prepare(cfg: dict, progress: bool = True, say=print) -> tuple[Path, Tokenizer]:
    """Documents, tokenizer and shards for a resolved config (cached)."""
    data_cfg = C.build(D.DataConfig, cfg["data"], "data")
    tok_cfg = C.build(TokenizerConfig, cfg["tokenizer"], "tokenizer")
    data_dir = luca_home() / "data" / _key(cfg["data"])
    if not (data_dir / "manifest.json").is_file():
        t = time.perf_counter()
        m = D.collect(data_cfg, data_dir, progress=progress)
        say(f"data: {m['documents']['train']:,} train / {m['documents']['val']:,} val documents "
            f"in {time.perf_counter() - t:.1f} s → {data_dir}")
    tok_dir = data_dir / f"tokenizer-{_key(cfg['tokenizer'])}"
    if (tok_dir / "tokenizer.json").is_file():
        tok = Tokenizer.load(tok_dir)
    else:
        t = time.perf_counter()
        texts = D.iter_documents(data_dir, "train")
        if progress and tok_cfg.kind == "bpe":
            texts = _chars_progress(texts, min(tok_cfg.max_chars, _train_chars(data_dir)))
        tok = build_tokenizer(tok_cfg, texts, show_progress=False)
        tok.save(tok_dir)
        say(f"tokenizer: {tok.kind}, {tok.vocab_size:,} ids in {time.perf_counter() - t:.1f} s → {tok_dir}")
    t = time.perf_counter()
    m = D.tokenize(data_dir, tok, progress=progress)
    say(f"tokens: {m['tokens']['train']['n_tokens']:,} train / {m['tokens']['val']['n_tokens']:,} val "
        f"({time.perf_counter() - t:.1f} s)")
    return data_dir, tok


def _train_chars(data_dir: Path) -> int:
    m = json.loads((data_dir / "manifest.json").read_text())
    return int(m.get("chars", {}).get("train", 0)) or 1


def _chars_progress(texts, total: int):
    """Count characters fed to the BPE trainer (the merges that follow take a few seconds more)."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn, TransferSpeedColumn
    with Progress(TextColumn("[bold]tokenizer"), BarColumn(), TextColumn("{task.completed:,.0f} chars"),
                  TransferSpeedColumn(), TimeRemainingColumn(), transient=True) as bar:
        task = bar.add_task("tokenizer", total=total)
        for t in texts:
            bar.advance(task, len(t))
            yield t


def model_config_for(cfg: dict, tok: Tokenizer) -> ModelConfig:
    """The model section with vocab_size raised to the tokenizer's, rounded up to a multiple of 64."""
    m = dict(cfg["model"])
    need = -(-tok.vocab_size // 64) * 64
    if m["vocab_size"] < tok.vocab_size:
        m["vocab_size"] = need
    m["max_seq_len"] = max(m["max_seq_len"], cfg["train"]["seq_len"])
    return ModelConfig.from_dict(m)


def run(preset: str = "nano-n1", sources: list[str] | None = None, out: str | Path | None = None,
        overrides: list[str] | dict | None = None, resume: bool = False, samples: int = 3,
        progress: bool = True, say=print) -> dict:
    """Train a preset end to end and return a summary (paths, parameters, BPB, samples)."""
    t0 = time.perf_counter()
    cfg = resolve(preset, overrides, sources)
    out = Path(out) if out is not None else Path("runs") / cfg.get("name", Path(preset).stem)
    data_dir, tok = prepare(cfg, progress, say)
    model_cfg = model_config_for(cfg, tok)
    cfg["model"] = model_cfg.to_dict()
    cfg["data_dir"] = str(data_dir)
    train_cfg = C.build(TrainConfig, cfg["train"], "train")
    summary = train(out, model_cfg, train_cfg, data_dir, tok, resume=resume, progress=progress, full_config=cfg,
                    aux=cfg["aux"])
    summary["run_dir"] = str(out)
    summary["samples"] = sample_texts(out, samples) if samples else []
    summary["wall_s"] = round(time.perf_counter() - t0, 1)
    return summary


SAMPLE_PROMPTS = ["def ", "import os\n", "The ", "class ", "# "]


def sample_texts(run_dir: str | Path, n: int, max_new_tokens: int = 64) -> list[tuple[str, str]]:
    from luca.engine import SamplingConfig, complete
    model = rundir.load_model(run_dir)
    tok = rundir.load_tokenizer(run_dir)
    out = []
    for i, prompt in enumerate(SAMPLE_PROMPTS[:n]):
        ids = tok.encode(prompt)
        room = model.cfg.max_seq_len - len(ids)
        s = SamplingConfig(max_new_tokens=min(max_new_tokens, room), temperature=0.8, top_k=50, seed=i)
        out.append((prompt, complete(model, tok, ids, s).text))
    return out
