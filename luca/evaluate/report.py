"""Evaluation records: `results.json`, the "Results" section of report.md, and runs side by side.

What is notable:
- `results.json` carries a schema version, the model (parameters, tokens seen, tokenizer, a
  fingerprint of the weights file) and, per task, the metrics with standard errors, n, time and
  the checksum of every data file read. A new evaluation merges into the file: tasks evaluated
  again are replaced, others kept, unless the weights changed since (then they are dropped).
- `luca report RUN1 RUN2 ...` reads those files only: one table and one PNG (a bar per run for
  each task's headline metric, with its standard error).
"""
from __future__ import annotations

import math
from pathlib import Path

from luca import rundir
from luca.errors import LucaError

SCHEMA = "luca.results"
SCHEMA_VERSION = 1
HEADLINE = {"hellaswag": "acc_norm", "piqa": "acc_norm", "arc_easy": "acc_norm", "arc_challenge": "acc_norm",
            "winogrande": "acc", "lambada_openai": "acc"}
CHANCE = {"hellaswag": 0.25, "piqa": 0.5, "arc_easy": 0.25, "arc_challenge": 0.25, "winogrande": 0.5}  # ARC: ~4 choices


def weights_fingerprint(run_dir: Path) -> str:
    f = run_dir / rundir.WEIGHTS_INDEX
    f = f if f.is_file() else run_dir / rundir.WEIGHTS
    st = f.stat()
    return f"{f.name}:{st.st_size}:{st.st_mtime_ns}"


def model_record(run_dir: Path, model, tok, dtype: str) -> dict:
    """What the results are of: parameters, tokens seen (from the training record), tokenizer."""
    summary_p = run_dir / rundir.TRAIN_SUMMARY
    summary = rundir.read_json(summary_p) if summary_p.is_file() else {}
    tokens, steps = summary.get("tokens"), summary.get("steps")
    if tokens is None:
        logged = [r for r in rundir.read_metrics(run_dir) if "tokens" in r]
        if logged:
            tokens, steps = logged[-1]["tokens"], logged[-1].get("step")
    tok_json = run_dir / "tokenizer.json"
    from luca.atomic import sha256_file
    return {
        "arch": model.cfg.arch, "parameters": model.num_parameters(),
        "non_embedding_parameters": model.num_parameters(non_embedding=True),
        "n_layers": model.cfg.n_layers, "d_model": model.cfg.d_model, "max_seq_len": model.cfg.max_seq_len,
        "tokens_seen": tokens, "steps": steps, "eval_dtype": dtype,
        "weights": weights_fingerprint(run_dir),
        "tokenizer": {"kind": tok.kind, "vocab_size": tok.vocab_size,
                      "sha256": sha256_file(tok_json) if tok_json.is_file() else None},
    }


def merge_results(run_dir: Path, new: dict) -> dict:
    """Merge `new` into the run's results.json (if any) and write it atomically."""
    p = run_dir / rundir.RESULTS
    old = rundir.read_json(p) if p.is_file() else {}
    same_model = old.get("schema_version") == SCHEMA_VERSION and \
        old.get("model", {}).get("weights") == new["model"]["weights"]
    out = dict(new)
    if same_model:
        out["tasks"] = {**old.get("tasks", {}), **new["tasks"]}
        out["bpb"] = {**old.get("bpb", {}), **new["bpb"]}
    rundir.write_json(p, out)
    return out


def _fmt(v, digits: int = 4) -> str:
    if v is None:
        return "—"
    if isinstance(v, float) and (abs(v) >= 1000 or not math.isfinite(v)):
        return f"{v:,.2f}"
    return f"{v:.{digits}f}" if isinstance(v, float) else str(v)


def rows(results: dict) -> list[tuple[str, str, str, str, str]]:
    """(task, metric, value, stderr, n) rows of a results dict."""
    out = []
    for name, t in results.get("tasks", {}).items():
        for m, v in t["metrics"].items():
            out.append((name, m, _fmt(v["value"]), _fmt(v["stderr"]), f"{t['n']:,}"))
    for path, b in results.get("bpb", {}).items():
        out.append((Path(path).name, "bpb", _fmt(b["bpb"]), "—", f"{b['bytes']:,} bytes"))
    return out


def markdown(results: dict) -> str:
    m = results["model"]
    seen = f"{m['tokens_seen']:,} tokens seen" if m.get("tokens_seen") else "tokens seen unknown"
    head = (f"Evaluated {results['created']} ({m['eval_dtype']}, zero-shot, scored as lm-evaluation-harness "
            f"0.4 scores them); {m['parameters']:,} parameters, {seen}.\n\n")
    table = "| task | metric | value | stderr | n |\n|---|---|---|---|---|\n"
    table += "\n".join("| " + " | ".join(r) + " |" for r in rows(results))
    curves = ""
    for path, b in results.get("bpb", {}).items():
        pts = ", ".join(f"{c['positions'][0]}–{c['positions'][1]}: {c['bpb']:.3f}" for c in b["curve"] if c["bpb"])
        curves += f"\n\nBPB by position in the window ({Path(path).name}, window {b['window']}, stride " \
                  f"{b['stride']}): {pts}"
    return head + table + curves + "\n"


def write_report_section(run_dir: Path, results: dict) -> None:
    rundir.update_report_section(run_dir, "Results", markdown(results))


# -- several runs -------------------------------------------------------------------------------
def load_results(run_dir: str | Path) -> dict:
    p = Path(run_dir) / rundir.RESULTS
    if not Path(run_dir).is_dir():
        raise LucaError(f"{run_dir}: no such run directory")
    if not p.is_file():
        raise LucaError(f"{p}: no results (run `luca eval {run_dir} ...` first)")
    r = rundir.read_json(p)
    if not isinstance(r, dict) or r.get("schema") != SCHEMA or not isinstance(r.get("schema_version"), int):
        raise LucaError(f"{p}: not a luca results file (no schema {SCHEMA!r})")
    if r["schema_version"] > SCHEMA_VERSION:
        raise LucaError(f"{p}: schema version {r['schema_version']} is newer than this luca reads ({SCHEMA_VERSION})")
    if not _well_formed(r):
        raise LucaError(f"{p}: damaged (model, tasks or bpb entries are missing or of the wrong type)")
    return r


def _well_formed(r: dict) -> bool:
    """The fields that tables and reports read, with their types: a damaged file is an error, not a crash."""
    def num(x) -> bool:
        return isinstance(x, (int, float)) and not isinstance(x, bool)
    try:
        m = r["model"]
        ok = isinstance(m["parameters"], int) and (m.get("tokens_seen") is None or isinstance(m["tokens_seen"], int))
        for t in r.get("tasks", {}).values():
            ok = ok and isinstance(t["n"], int) and all(
                (v["value"] is None or num(v["value"])) and (v["stderr"] is None or num(v["stderr"]))
                for v in t["metrics"].values())
        for b in r.get("bpb", {}).values():
            ok = ok and num(b["bpb"]) and isinstance(b["bytes"], int)
        return bool(ok)
    except (KeyError, TypeError, AttributeError):
        return False


def compare(run_dirs: list[str | Path], png: str | Path | None = None) -> tuple[list[str], list[list[str]]]:
    """A table (header, rows) of several runs' results; also a bar chart PNG when `png` is given."""
    runs = [(Path(d), load_results(d)) for d in run_dirs]
    names = [d.name or str(d) for d, _ in runs]
    header = ["task", "metric"] + names
    keys: list[tuple[str, str]] = []
    for _, r in runs:
        for t, v in r.get("tasks", {}).items():
            keys += [(t, m) for m in v["metrics"] if (t, m) not in keys]
        keys += [(Path(p).name, "bpb") for p in r.get("bpb", {}) if (Path(p).name, "bpb") not in keys]
    table = [["parameters", ""] + [f"{r['model']['parameters']:,}" for _, r in runs],
             ["tokens seen", ""] + [f"{r['model']['tokens_seen']:,}" if r["model"].get("tokens_seen") else "—"
                                    for _, r in runs]]
    for t, m in keys:
        row = [t, m]
        for _, r in runs:
            v = _lookup(r, t, m)
            row.append("—" if v is None else _fmt(v[0]) + (f" ± {_fmt(v[1])}" if v[1] is not None else ""))
        table.append(row)
    if png is not None:
        _plot(runs, names, Path(png))
    return header, table


def _lookup(r: dict, task: str, metric: str):
    if metric == "bpb":
        for p, b in r.get("bpb", {}).items():
            if Path(p).name == task:
                return b["bpb"], None
        return None
    t = r.get("tasks", {}).get(task)
    if t is None or metric not in t["metrics"]:
        return None
    return t["metrics"][metric]["value"], t["metrics"][metric]["stderr"]


def _plot(runs, names: list[str], png: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    tasks = [t for t in HEADLINE if any(t in r.get("tasks", {}) for _, r in runs)]
    extra = sorted({t for _, r in runs for t in r.get("tasks", {})} - set(tasks))
    tasks += extra
    bpbs = sorted({Path(p).name for _, r in runs for p in r.get("bpb", {})})
    n_panels = 1 + (1 if bpbs else 0)
    width_in = max(6, 1.6 * len(tasks) * max(1, len(runs) / 2)) + 3 * (n_panels - 1)
    fig, axes = plt.subplots(1, n_panels, figsize=(width_in, 4), squeeze=False)
    width = 0.8 / max(1, len(runs))
    ax = axes[0][0]
    for k, (name, (_, r)) in enumerate(zip(names, runs)):
        xs, ys, es = [], [], []
        for i, t in enumerate(tasks):
            m = HEADLINE.get(t, "acc")
            v = _lookup(r, t, m)
            if v is not None:
                xs.append(i + (k - (len(runs) - 1) / 2) * width)
                ys.append(v[0])
                es.append(v[1] or 0.0)
        ax.bar(xs, ys, width, yerr=es, capsize=2, label=name)
    labelled = False
    for i, t in enumerate(tasks):
        if t in CHANCE:
            ax.hlines(CHANCE[t], i - 0.45, i + 0.45, colors="grey", linestyles="dashed", linewidth=1,
                      label=None if labelled else "chance")
            labelled = True
    ax.set_xticks(range(len(tasks)))
    ax.set_xticklabels([f"{t}\n({HEADLINE.get(t, 'acc')})" for t in tasks], fontsize=8)
    ax.set_ylabel("accuracy")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=8)
    ax.set_title("benchmarks (zero-shot)")
    if bpbs:
        ax = axes[0][1]
        for k, (name, (_, r)) in enumerate(zip(names, runs)):
            xs, ys = [], []
            for i, b in enumerate(bpbs):
                v = _lookup(r, b, "bpb")
                if v is not None:
                    xs.append(i + (k - (len(runs) - 1) / 2) * width)
                    ys.append(v[0])
            ax.bar(xs, ys, width, label=name)
        ax.set_xticks(range(len(bpbs)))
        ax.set_xticklabels(bpbs, fontsize=8, rotation=20)
        ax.set_ylabel("bits per byte (lower is better)")
        ax.set_title("bits per byte")
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    from luca.atomic import atomic_path
    with atomic_path(png) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
