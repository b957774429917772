"""`luca compare`: matched experiments — every config × every seed on the same data, with statistics.

What is notable:
- Each config (a preset name or a .toml path, resolved as `luca run` resolves it, with the same
  overrides and `--data` for all) is trained once per seed. The seed varies the initialisation;
  the data order has its own seed (`data_seed`, fixed across configs and seeds by default), so
  configs with the same tokenizer, `seq_len` and `batch_tokens` see the same batches in the same
  order. `tokens` sets every config's step count (⌈tokens / batch_tokens⌉).
- Matching: the matched quantity (`params`: the exported model's parameters; `flops`: training
  FLOPs = (6 · matmul parameters per token + 6 · n_layers · seq_len · attention width) · tokens,
  Kaplan's count, heads of an [aux] objective included) must agree within `tolerance` (2%), or
  the comparison is refused before anything trains (`force` runs it anyway and says so).
- Configs must validate on the same documents (checked by fingerprint), so BPB is comparable even
  across tokenizers (byte-level vs BPE) or training mixes (text vs text + `synthetic:` tasks).
  When configs share a data directory but not a tokenizer, each tokenizer gets its own token
  shards (`by-tokenizer/`, the documents linked), so no run ever reads another's tokens.
- Records: every run keeps its run directory (`OUT/runs/LABEL/seedS/`); `comparison.json`
  (schema_version 1) is rewritten after every run and is what `comparison.md` and
  `validation_curves.png` are made from. A rerun with the same settings reuses finished runs
  (matched by a key over the resolved config) and resumes an interrupted one from its checkpoint.
- Statistics per pair of configs over the seeds both finished: mean ± sample std, the per-seed
  difference, how many seeds favour each, a paired t-test and an exact sign test (two-sided p).
  The t distribution is computed here (regularised incomplete beta), so scipy is not needed.
- Optional per run: structured-task diagnostics (luca/diagnostics.py, exact match) and the
  BPB-by-position curve of luca/evaluate/bpb.py on the validation documents ("does it use the
  context better", comparable between byte-level and BPE models).
- Floor 5: it drives pipeline (resolve, prepare), train, rundir, evaluate and diagnostics.
"""
from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
import torch.nn as nn

from luca import config as C
from luca import data as D
from luca import rundir
from luca.auxiliary import AuxConfig, build_model
from luca.compare_report import write_report
from luca.errors import LucaError
from luca.model import ModelConfig
from luca.tokenizer import Tokenizer
from luca.train import TrainConfig

SCHEMA_VERSION = 1
JSON = "comparison.json"  # beside it: comparison.md and the PNGs (compare_report.py)
MATCH = ("params", "flops")


# -- one config, prepared ---------------------------------------------------------------------
@dataclass
class Arm:
    """One config of an experiment: resolved, its data and tokenizer ready, its size counted."""
    label: str
    source: str
    cfg: dict  # the resolved config (luca.toml of its runs, less the seed)
    data_dir: Path
    tok: Tokenizer
    model_cfg: ModelConfig
    aux: AuxConfig
    params: int
    non_embedding: int
    aux_params: int
    flops_per_token: int
    steps: int
    tokens: int
    val_fp: str = ""  # fingerprint of the validation documents (set by `fingerprint_arms`)

    @property
    def flops(self) -> int:
        return self.flops_per_token * self.tokens

    def describe(self) -> dict:
        t = self.cfg["train"]
        return {"label": self.label, "source": self.source, "family": self.model_cfg.family,
                "arch": self.model_cfg.arch, "aux": self.aux.kind if self.aux.kind == "none" else self.aux.to_dict(),
                "tokenizer": self.tok.kind, "vocab_size": self.model_cfg.vocab_size,
                "shape": f"{self.model_cfg.n_layers}×{self.model_cfg.d_model}, {self.model_cfg.n_heads}/"
                         f"{self.model_cfg.n_kv_heads} heads, d_ff {self.model_cfg.d_ff}",
                "parameters": self.params, "non_embedding_parameters": self.non_embedding,
                "aux_parameters": self.aux_params, "flops_per_token": self.flops_per_token,
                "tokens": self.tokens, "flops": self.flops, "steps": self.steps, "batch_tokens": t["batch_tokens"],
                "seq_len": t["seq_len"], "lr": t["lr"], "schedule": t["schedule"], "data_dir": str(self.data_dir),
                "sources": self.cfg["data"]["sources"]}


def flops_per_token(model: nn.Module, seq_len: int) -> int:
    """Training FLOPs per token: 6 · (matmul weights + extra readouts) + 6 · layers · context · attn width."""
    matmul = sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Linear))
    matmul += model.extra_matmul_params() if hasattr(model, "extra_matmul_params") else 0
    cfg = model.cfg
    return 6 * matmul + 6 * cfg.n_layers * seq_len * cfg.n_heads * cfg.head_dim


def prepare_arm(label: str, preset: str | dict, overrides=None, sources=None, tokens: int | None = None,
                data_seed: int | None = 0, curve_points: int = 8, progress: bool = True, say=print) -> Arm:
    """Resolve a config, build its data and tokenizer (cached), and count its parameters and FLOPs."""
    from luca.pipeline import model_config_for, prepare, resolve
    cfg = resolve(preset, overrides, sources)
    t = cfg["train"]
    if tokens is not None:
        t["max_steps"] = max(1, math.ceil(tokens / t["batch_tokens"]))
    t["data_seed"] = -1 if data_seed is None else data_seed
    if curve_points > 0:  # evaluate often enough to draw a curve; evaluation runs only at log steps
        every = max(1, t["max_steps"] // curve_points)
        t["log_every"] = min(t["log_every"], every)
        t["eval_every"] = t["log_every"] * max(1, round(every / t["log_every"]))
    C.build(TrainConfig, t, "train")  # validate now, not after the first run
    data_dir, tok = prepare(cfg, progress=progress, say=say)
    model_cfg = model_config_for(cfg, tok)
    aux = C.build(AuxConfig, cfg["aux"], "aux")
    cfg["model"], cfg["aux"] = model_cfg.to_dict(), aux.to_dict()
    try:
        with torch.device("meta"):
            m = build_model(model_cfg, aux)
    except LucaError as e:
        raise LucaError(f"{label}: {e}") from None
    aux_params = m.aux_parameters() if hasattr(m, "aux_parameters") else 0
    return Arm(label, str(preset) if isinstance(preset, str) else label, cfg, data_dir, tok, model_cfg, aux,
               m.num_parameters(), m.num_parameters(True), aux_params, flops_per_token(m, t["seq_len"]),
               t["max_steps"], t["max_steps"] * t["batch_tokens"])


def separate_token_dirs(arms: Sequence[Arm]) -> None:
    """Configs sharing documents but not a tokenizer each get their own shards (one tokens/ per data dir)."""
    groups: dict[Path, set[str]] = {}
    for a in arms:
        groups.setdefault(a.data_dir, set()).add(D.tokenizer_checksum(a.tok))
    for a in arms:
        if len(groups.get(a.data_dir, ())) > 1:
            a.data_dir = _tokens_dir(a.data_dir, a.tok)


def _tokens_dir(data_dir: Path, tok: Tokenizer) -> Path:
    d = data_dir / "by-tokenizer" / D.tokenizer_checksum(tok)[:16]
    d.mkdir(parents=True, exist_ok=True)
    if not (d / "documents").exists():
        (d / "documents").symlink_to((data_dir / "documents").resolve(), target_is_directory=True)
    if not (d / "manifest.json").is_file():
        m = rundir.read_json(data_dir / "manifest.json")
        m.pop("tokens", None)
        rundir.write_json(d / "manifest.json", m)
    D.tokenize(d, tok, progress=False)
    return d


def fingerprint_arms(arms: Sequence[Arm]) -> None:
    for a in arms:
        a.val_fp = _fingerprint(a.data_dir, "val")


def _fingerprint(data_dir: Path, split: str) -> str:
    """Of the documents themselves for "val" (small); of what produced them for "train" (large)."""
    h = hashlib.sha256()
    if split == "train":
        m = rundir.read_json(data_dir / "manifest.json")
        h.update(json.dumps([m["config"], [s.get("sha256") for s in m["sources"]], m["documents"], m["chars"]],
                            sort_keys=True).encode())
        return h.hexdigest()[:16]
    for text in D.iter_documents(data_dir, split):
        h.update(hashlib.sha256(text.encode("utf-8")).digest())
    return h.hexdigest()[:16]


def run_key(arm: Arm, seed: int) -> str:
    cfg = {k: v for k, v in arm.cfg.items() if k != "data_dir"}
    blob = json.dumps([cfg, seed, D.tokenizer_checksum(arm.tok), arm.val_fp], sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def run_arm(arm: Arm, seed: int, run_dir: Path, prev: dict | None, *, progress: bool = True,
            diagnostics: int = 0, by_position: int = 0, on_start=None) -> tuple[dict, bool]:
    """Train (or reuse, or resume) one run; returns (its record, whether it trained now).

    `prev` is the run's record from an earlier call: a finished run with the same key is reused,
    an interrupted one ("running", same key) resumes from its checkpoint; anything else in
    `run_dir` is trained over from step 0. `on_start(record)` is called before training starts."""
    import shutil

    from luca.train import train
    key = run_key(arm, seed)
    rec = dict(prev) if prev and prev.get("key") == key else {}
    trained = False
    if not (rec.get("status") == "done" and rundir.is_run_dir(run_dir)):
        resume = rec.get("status") == "running"  # our own interrupted run: its checkpoint is ours
        if not resume:
            shutil.rmtree(run_dir / rundir.TRAIN_STATE, ignore_errors=True)
        if on_start:
            on_start({"config": arm.label, "seed": seed, "status": "running", "key": key, "run_dir": str(run_dir)})
        cfg = json.loads(json.dumps(arm.cfg))
        cfg["train"]["seed"] = seed
        cfg["data_dir"] = str(arm.data_dir)
        D.tokenize(arm.data_dir, arm.tok, progress=False)  # a no-op unless another tokenizer wrote its shards
        # torch.compile may reuse code traced for an earlier run's model of the same class without the
        # auxiliary objective's forward hook (not guarded on): start compiled aux runs from a clean cache.
        fresh = cfg["train"]["compile"] and arm.aux.kind != "none"
        if fresh:
            torch._dynamo.reset()
        s = train(run_dir, arm.model_cfg, C.build(TrainConfig, cfg["train"], "train"), arm.data_dir, arm.tok,
                  resume=resume, progress=progress, full_config=cfg, aux=arm.aux)
        if fresh:
            torch._dynamo.reset()
        metrics = rundir.read_metrics(run_dir)
        evals = [r for r in metrics if "val_bpb" in r]
        rec = {"config": arm.label, "seed": seed, "status": "done", "key": key, "run_dir": str(run_dir),
               "parameters": arm.params, "non_embedding_parameters": arm.non_embedding,
               "aux_parameters": arm.aux_params, "tokens": s["tokens"], "flops": arm.flops_per_token * s["tokens"],
               "val_bpb": evals[-1]["val_bpb"] if evals and evals[-1]["step"] == s["steps"] else s["val_bpb"],
               "val_loss": evals[-1].get("val_loss") if evals else None, "final_train_loss": s["final_train_loss"],
               "time_s": s["time_s"], "tokens_per_s": s["tokens_per_s"], "device": s["device"],
               "curve": [[r["tokens"], r["val_bpb"]] for r in evals]}
        trained = True
    if diagnostics and "diagnostics" not in rec:
        from luca.diagnostics import run_diagnostics
        rec["diagnostics"] = run_diagnostics(run_dir, n=diagnostics)
    if by_position and "by_position" not in rec:
        rec["by_position"] = position_curve(run_dir, arm.data_dir, arm.cfg["train"]["seq_len"], by_position)
    return rec, trained


def position_curve(run_dir: Path, data_dir: Path, context: int, max_bytes: int) -> list[dict]:
    """BPB by token position in the context over (the first `max_bytes` of) the validation documents."""
    from luca.evaluate.bpb import bits_per_byte
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model, tok = rundir.load_model(run_dir, device=device), rundir.load_tokenizer(run_dir)
    bits: dict[tuple[int, int], float] = {}
    nbytes: dict[tuple[int, int], int] = {}
    seen = 0
    for text in D.iter_documents(data_dir, "val"):
        if seen >= max_bytes:
            break
        text = text[:max_bytes - seen]
        seen += len(text.encode("utf-8"))
        for c in bits_per_byte(model, tok, text, max_len=min(context, model.cfg.max_seq_len))["curve"]:
            k = tuple(c["positions"])
            if c["bpb"] is not None:
                bits[k] = bits.get(k, 0.0) + c["bpb"] * c["bytes"]
                nbytes[k] = nbytes.get(k, 0) + c["bytes"]
    return [{"positions": list(k), "bytes": nbytes[k], "bpb": bits[k] / nbytes[k]} for k in sorted(bits) if nbytes[k]]


# -- statistics -------------------------------------------------------------------------------
def mean_std(xs: Sequence[float]) -> tuple[float, float]:
    n = len(xs)
    if n == 0:
        return float("nan"), float("nan")
    m = sum(xs) / n
    return m, (math.sqrt(sum((x - m) ** 2 for x in xs) / (n - 1)) if n > 1 else 0.0)


def _betacf(a: float, b: float, x: float) -> float:
    """Continued fraction of the incomplete beta function (Numerical Recipes' betacf)."""
    tiny = 1e-300
    qab, qap, qam = a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 300):
        m2 = 2 * m
        for aa in (m * (b - m) * x / ((qam + m2) * (a + m2)), -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))):
            d = 1.0 + aa * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + aa / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1.0) < 1e-15:
            break
    return h


def betainc(a: float, b: float, x: float) -> float:
    """The regularised incomplete beta function I_x(a, b)."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    ln = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    if x < (a + 1.0) / (a + b + 2.0):
        return math.exp(ln) * _betacf(a, b, x) / a
    return 1.0 - math.exp(ln) * _betacf(b, a, 1.0 - x) / b


def paired_t_test(a: Sequence[float], b: Sequence[float]) -> tuple[float, float]:
    """(t, two-sided p) of the paired differences a − b; NaN with fewer than two pairs."""
    d = [x - y for x, y in zip(a, b)]
    n = len(d)
    if n < 2:
        return float("nan"), float("nan")
    m, s = mean_std(d)
    if s == 0.0:
        return (math.copysign(math.inf, m), 0.0) if m else (0.0, 1.0)
    t = m / (s / math.sqrt(n))
    df = n - 1
    return t, betainc(df / 2.0, 0.5, df / (df + t * t))


def sign_test(wins: int, losses: int) -> float:
    """Exact two-sided binomial p of `wins` against `losses` (ties left out)."""
    n = wins + losses
    if n == 0:
        return 1.0
    k = min(wins, losses)
    return min(1.0, 2.0 * sum(math.comb(n, i) for i in range(k + 1)) / 2.0 ** n)


def summarize(labels: Sequence[str], runs: Sequence[dict]) -> dict:
    """Per config mean ± std of the final BPB; per pair the paired statistics over common seeds."""
    done = [r for r in runs if r.get("status") == "done"]
    by = {lab: {r["seed"]: r for r in done if r["config"] == lab} for lab in labels}
    out: dict = {"configs": {}, "pairs": []}
    for lab in labels:
        bpb = [by[lab][s]["val_bpb"] for s in sorted(by[lab])]
        m, sd = mean_std(bpb)
        tm, _ = mean_std([by[lab][s]["time_s"] for s in sorted(by[lab])])
        out["configs"][lab] = {"n": len(bpb), "val_bpb_mean": m, "val_bpb_std": sd, "val_bpb_min": min(bpb, default=None),
                               "val_bpb_max": max(bpb, default=None), "time_s_mean": tm}
    for i, a in enumerate(labels):
        for b in labels[i + 1:]:
            seeds = sorted(set(by[a]) & set(by[b]))
            xa, xb = [by[a][s]["val_bpb"] for s in seeds], [by[b][s]["val_bpb"] for s in seeds]
            rel = [(y - x) / x for x, y in zip(xa, xb)]  # > 0: b's BPB is higher, a is better
            wins_a, wins_b = sum(r > 0 for r in rel), sum(r < 0 for r in rel)
            t, p = paired_t_test(xb, xa)
            ma, mb = mean_std(xa)[0], mean_std(xb)[0]
            out["pairs"].append({"a": a, "b": b, "seeds": seeds, "mean_diff": mb - ma,
                                 "relative": (mb - ma) / ma if seeds else float("nan"),
                                 "per_seed_relative": rel, "a_better": wins_a, "b_better": wins_b,
                                 "ties": len(seeds) - wins_a - wins_b, "t": t, "t_test_p": p,
                                 "sign_test_p": sign_test(wins_a, wins_b)})
    return out


# -- the comparison ---------------------------------------------------------------------------
def compare(configs: Sequence[str | Path], seeds: int | Sequence[int] = 4, match: str = "params",
            tokens: int | None = None, out: str | Path = "comparison", *, tolerance: float = 0.02,
            force: bool = False, overrides: list[str] | dict | None = None, sources: list[str] | None = None,
            data_seed: int | None = 0, diagnostics: int = 0, by_position: int = 0, curve_points: int = 8,
            dry_run: bool = False, max_runs: int | None = None, progress: bool = True, say=print) -> dict:
    """Train every config with every seed on the same data; write comparison.json/.md and the curves.

    `seeds`: a count (seeds 0 … n−1) or the seeds themselves. `diagnostics`: examples per task of
    the structured diagnostics (0: none). `by_position`: validation bytes for the BPB-by-position
    curve (0: none). `dry_run`: prepare, count and check the match, train nothing. `max_runs`:
    train at most that many runs in this call (the rest on the next call).
    """
    if len(configs) < 2:
        raise LucaError("compare: needs at least two configs")
    if match not in MATCH:
        raise LucaError(f"compare: --match must be one of {', '.join(MATCH)}, not {match!r}")
    seed_list = list(range(seeds)) if isinstance(seeds, int) else [int(s) for s in seeds]
    if not seed_list or len(set(seed_list)) != len(seed_list):
        raise LucaError(f"compare: seeds must be a positive count or distinct integers, got {seeds!r}")
    if tokens is not None and tokens <= 0:
        raise LucaError(f"compare: tokens must be positive, got {tokens}")
    labels = _labels(configs)
    arms = [prepare_arm(lab, str(c), overrides, sources, tokens, data_seed, curve_points, progress, say)
            for lab, c in zip(labels, configs)]
    separate_token_dirs(arms)
    fingerprint_arms(arms)
    val_fp = {a.label: a.val_fp for a in arms}
    train_fp = {a.label: _fingerprint(a.data_dir, "train") for a in arms}
    notes = []
    if len(set(val_fp.values())) > 1:
        msg = "configs validate on different documents, so their BPB is not comparable: " + \
              ", ".join(f"{k} {v}" for k, v in val_fp.items())
        if not force:
            raise LucaError(f"compare: {msg} (use the same [data] sources, or --force)")
        notes.append("**forced**: " + msg)
    if len(set(train_fp.values())) > 1:
        notes.append("Training data differ between configs (same validation documents): " +
                     ", ".join(f"{a.label}: {' + '.join(a.cfg['data']['sources'])}" for a in arms))
    if len({(a.tok.kind, a.tok.vocab_size, a.cfg["train"]["seq_len"], a.cfg["train"]["batch_tokens"]) for a in arms}) > 1:
        notes.append("Configs differ in tokenizer, seq_len or batch_tokens: they do not see identical batches "
                     "(BPB is still per byte of the same validation text).")
    values = {a.label: (a.params if match == "params" else a.flops) for a in arms}
    spread = max(values.values()) / min(values.values()) - 1
    if spread > tolerance:
        listing = ", ".join(f"{k} {v:,}" for k, v in values.items())
        if not force:
            raise LucaError(f"compare: configs differ by {spread:.1%} in {match} (tolerance {tolerance:.0%}): "
                            f"{listing}; change a config, raise --tolerance, or pass --force")
        notes.append(f"**forced**: {match} differ by {spread:.1%} (tolerance {tolerance:.0%}): {listing}")
    from luca import __version__
    out = Path(out)
    result = {"schema": "luca.comparison", "schema_version": SCHEMA_VERSION, "luca_version": __version__,
              "created": rundir.timestamp(), "updated": None,
              "settings": {"match": match, "tolerance": tolerance, "spread": spread, "forced": force,
                           "seeds": seed_list, "data_seed": data_seed, "tokens": tokens, "overrides": overrides,
                           "sources": sources, "diagnostics": diagnostics, "by_position": by_position},
              "configs": [dict(a.describe(), val_fingerprint=val_fp[a.label], train_fingerprint=train_fp[a.label])
                          for a in arms],
              "notes": notes, "runs": [], "complete": False}
    if dry_run:
        return result
    old = rundir.read_json(out / JSON) if (out / JSON).is_file() else {}
    if old and old.get("schema_version") != SCHEMA_VERSION:
        raise LucaError(f"{out / JSON}: schema_version {old.get('schema_version')} is not {SCHEMA_VERSION}; "
                        f"use another --out")
    result["created"] = old.get("created", result["created"])
    prev = {(r["config"], r["seed"]): r for r in old.get("runs", [])}
    records = {(a.label, s): prev[(a.label, s)] for a in arms for s in seed_list if (a.label, s) in prev}
    trained_now, reused = [], []
    total = len(arms) * len(seed_list)
    k = 0
    for s in seed_list:  # seed-major: a half-done comparison already has complete pairs
        for a in arms:
            k += 1
            p = records.get((a.label, s))
            rel = f"runs/{a.label}/seed{s}"  # run directories are recorded relative to OUT
            run_dir = out / rel
            if not _finished(p, a, s, run_dir):
                if max_runs is not None and len(trained_now) >= max_runs:
                    continue
                say(f"compare: run {k}/{total}: {a.label}, seed {s} → {run_dir}")

            def started(r, key=(a.label, s), rel=rel):
                records[key] = dict(r, run_dir=rel)
                _write(out, result, arms, seed_list, records, plots=False)

            rec, trained = run_arm(a, s, run_dir, p, progress=progress, diagnostics=diagnostics,
                                   by_position=by_position, on_start=started)
            records[(a.label, s)] = rec = dict(rec, run_dir=rel)
            (trained_now if trained else reused).append(f"{a.label}/seed{s}")
            if rec != p:
                _write(out, result, arms, seed_list, records, plots=False)
    result = _write(out, result, arms, seed_list, records)
    result.update(trained=trained_now, reused=reused, out=str(out))
    return result


def _finished(rec: dict | None, arm: Arm, seed: int, run_dir: Path) -> bool:
    return bool(rec) and rec.get("status") == "done" and rec.get("key") == run_key(arm, seed) \
        and rundir.is_run_dir(run_dir)


def _labels(configs: Sequence[str | Path]) -> list[str]:
    stems = [Path(str(c)).stem if str(c).endswith(".toml") else str(c) for c in configs]
    return [s if stems.count(s) == 1 else f"{s}-{i + 1}" for i, s in enumerate(stems)]


def _write(out: Path, result: dict, arms: Sequence[Arm], seeds: Sequence[int], records: dict,
           plots: bool = True) -> dict:
    labels = [a.label for a in arms]
    runs = [records[(a.label, s)] for s in seeds for a in arms if (a.label, s) in records]
    result = dict(result, runs=runs, updated=rundir.timestamp(),
                  complete=all(r.get("status") == "done" for r in runs) and len(runs) == len(arms) * len(seeds))
    result["summary"] = summarize(labels, runs)
    result = _json_safe(result)
    out.mkdir(parents=True, exist_ok=True)
    rundir.write_json(out / JSON, result)
    write_report(out, result, plots)
    return result


def _json_safe(x):
    """NaN and infinities (a config with no finished run, a zero-variance t) become null: strict JSON."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _json_safe(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_json_safe(v) for v in x]
    return x
