"""comparison.md and its plots, made from comparison.json alone (so any saved JSON can be redrawn).

What is notable:
- Tables: the configs (size, tokens, FLOPs, BPB mean ± std, time), the final BPB per seed with the
  relative difference, the pairwise statistics with a one-line verdict, then (when recorded)
  structured diagnostics and BPB by position in the context, and the run directories.
- `validation_curves.png`: validation BPB against training tokens, one thin line per run, one
  colour per config; `bpb_by_position.png`: BPB against the token's position in the context (log
  scale), mean over seeds. matplotlib is a core dependency; a plot that cannot be drawn is skipped.
- Floor 5 beside compare.py; knows no training internals.
"""
from __future__ import annotations

import math
from pathlib import Path

from luca.atomic import atomic_path, write_text

MD, CURVES_PNG, POSITION_PNG = "comparison.md", "validation_curves.png", "bpb_by_position.png"


def _f(x, digits: int = 4) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "–"
    return f"{x:.{digits}f}"


def _p(x) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "–"
    return f"{x:.2g}" if x >= 1e-4 else f"{x:.1e}"


def _sci(x: float) -> str:
    return f"{x:.3g}"


def _table(header: list[str], rows: list[list[str]]) -> str:
    return "\n".join(["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] +
                     ["| " + " | ".join(r) + " |" for r in rows])


def verdict(pair: dict) -> str:
    n = len(pair["seeds"])
    if n == 0:
        return f"{pair['a']} vs {pair['b']}: no seed finished for both yet."
    rel = pair["per_seed_relative"]
    # margins relative to the losing config's BPB: (loser − winner) / loser
    if pair["a_better"] == n:
        win, lose, margins = pair["a"], pair["b"], [r / (1 + r) for r in rel]
    elif pair["b_better"] == n:
        win, lose, margins = pair["b"], pair["a"], [-r for r in rel]
    else:
        return (f"{pair['a']} is better on {pair['a_better']}/{n} seeds, {pair['b']} on {pair['b_better']}/{n} "
                f"(mean relative difference {pair['relative']:+.2%}); paired t-test p = {_p(pair['t_test_p'])}, "
                f"sign test p = {_p(pair['sign_test_p'])}.")
    return (f"**{win}** has the lower validation BPB on all {n} seeds, by {min(margins):.2%} to {max(margins):.2%} "
            f"of {lose}'s BPB; paired t-test p = {_p(pair['t_test_p'])}, sign test p = {_p(pair['sign_test_p'])}.")


def markdown(r: dict) -> str:
    st, cfgs, summ = r["settings"], r["configs"], r["summary"]
    labels = [c["label"] for c in cfgs]
    runs = [x for x in r["runs"] if x.get("status") == "done"]
    by = {(x["config"], x["seed"]): x for x in runs}
    seeds = st["seeds"]
    toks = sorted({c["tokens"] for c in cfgs})
    lines = [f"# Comparison: {' vs '.join(labels)}", "",
             f"{len(seeds)} seeds × {len(labels)} configs, matched on **{st['match']}** (spread {st['spread']:.2%}, "
             f"tolerance {st['tolerance']:.0%}{', forced' if st['forced'] else ''}); "
             f"{' / '.join(f'{t:,}' for t in toks)} training tokens per run; data order seed "
             f"{st['data_seed'] if st['data_seed'] is not None else '= init seed'}"
             f"{' (the same for every run)' if st['data_seed'] is not None else ''}, init seeds {seeds}. "
             f"{'Complete' if r['complete'] else 'Incomplete'}: {len(runs)}/{len(labels) * len(seeds)} runs.", ""]
    rows = []
    for c in cfgs:
        s = summ["configs"][c["label"]]
        aux = "" if c["aux"] == "none" else f" + aux {c['aux']['kind']} (dim {c['aux']['dim']}, ahead {c['aux']['ahead']}, " \
                                             f"weight {c['aux']['weight']})"
        rows.append([c["label"], f"{c['family']} ({c['arch']}) {c['shape']}{aux}", f"{c['tokenizer']} {c['vocab_size']:,}",
                     f"{c['parameters']:,}", f"{c['non_embedding_parameters']:,}", f"{c['tokens']:,}", _sci(c["flops"]),
                     f"{_f(s['val_bpb_mean'])} ± {_f(s['val_bpb_std'])} (n={s['n']})", f"{_f(s['time_s_mean'], 1)} s"])
    lines += ["## Configs", "", _table(["config", "model", "tokenizer", "parameters", "non-embedding", "tokens",
                                        "training FLOPs", "val BPB (mean ± std)", "time per run"], rows), ""]
    head = ["seed"] + labels + [f"{p['b']} vs {p['a']}" for p in summ["pairs"]]
    rows = []
    for sd in seeds:
        row = [str(sd)] + [_f(by[(lab, sd)]["val_bpb"]) if (lab, sd) in by else "–" for lab in labels]
        for p in summ["pairs"]:
            a, b = by.get((p["a"], sd)), by.get((p["b"], sd))
            row.append(f"{(b['val_bpb'] - a['val_bpb']) / a['val_bpb']:+.2%}" if a and b else "–")
        rows.append(row)
    lines += ["## Final validation BPB per seed", "", _table(head, rows), ""]
    rows = [[f"{p['a']} vs {p['b']}", f"{p['mean_diff']:+.4f}" if p["seeds"] else "–",
             f"{p['relative']:+.2%}" if p["seeds"] else "–", f"{p['a_better']}/{len(p['seeds'])}",
             f"{p['b_better']}/{len(p['seeds'])}", _p(p["t_test_p"]), _p(p["sign_test_p"])] for p in summ["pairs"]]
    lines += ["## Pairs", "", "Differences are second minus first (negative: the second config has the lower BPB).", "",
              _table(["pair", "BPB difference", "relative", "seeds favouring first", "seeds favouring second",
                      "paired t-test p", "sign test p"], rows), ""]
    lines += [f"- {verdict(p)}" for p in summ["pairs"]] + [""]
    if any(x.get("curve") for x in runs):
        lines += [f"![validation BPB curves]({CURVES_PNG})", ""]
    if r.get("notes"):
        lines += ["## Notes", ""] + [f"- {n}" for n in r["notes"]] + [""]
    if any("diagnostics" in x for x in runs):
        tasks = sorted({t for x in runs for t in x.get("diagnostics", {})})
        rows = []
        for t in tasks:
            row = [t]
            for lab in labels:
                acc = [x["diagnostics"][t]["accuracy"] for x in runs if x["config"] == lab
                       and x.get("diagnostics", {}).get(t, {}).get("accuracy") is not None]
                row.append(f"{sum(acc) / len(acc):.1%}" if acc else "–")
            rows.append(row)
        lines += ["## Structured diagnostics (exact match, greedy; mean over seeds)", "", _table(["task"] + labels, rows), ""]
    if any("by_position" in x for x in runs):
        curves = mean_position_curves(runs, labels)
        keys = sorted({k for c in curves.values() for k in c})
        rows = [[f"{k[0]}–{k[1]}" if k[1] > k[0] else str(k[0])] + [_f(curves[lab].get(k)) for lab in labels] for k in keys]
        lines += ["## BPB by position in the context (validation documents; mean over seeds)", "",
                  _table(["token position"] + labels, rows), "", f"![BPB by position]({POSITION_PNG})", ""]
    rows = [[x["config"], str(x["seed"]), x["run_dir"], _f(x["val_bpb"]), f"{x['time_s']:.1f} s",
             f"{x['tokens_per_s']:,.0f}", x.get("device", "")] for x in runs]
    lines += ["## Runs", "", _table(["config", "seed", "run directory", "val BPB", "time", "tokens/s", "device"], rows), ""]
    return "\n".join(lines)


def mean_position_curves(runs: list[dict], labels: list[str]) -> dict[str, dict[tuple[int, int], float]]:
    out = {}
    for lab in labels:
        acc: dict[tuple[int, int], list[float]] = {}
        for x in runs:
            if x["config"] == lab:
                for c in x.get("by_position", []):
                    acc.setdefault(tuple(c["positions"]), []).append(c["bpb"])
        out[lab] = {k: sum(v) / len(v) for k, v in acc.items()}
    return out


def write_report(out: Path, r: dict, plots: bool = True) -> None:
    write_text(out / MD, markdown(r))
    if not plots:
        return
    runs = [x for x in r["runs"] if x.get("status") == "done"]
    labels = [c["label"] for c in r["configs"]]
    try:
        plot_curves(out / CURVES_PNG, runs, labels)
        if any("by_position" in x for x in runs):
            plot_positions(out / POSITION_PNG, mean_position_curves(runs, labels))
    except ImportError:  # matplotlib is a core dependency, but a bare GPU image may lack it: tables still stand
        pass


def _plt():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _save(fig, path: Path) -> None:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")


def plot_curves(path: Path, runs: list[dict], labels: list[str]) -> bool:
    if not any(x.get("curve") for x in runs):
        return False
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4), dpi=120)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, lab in enumerate(labels):
        first = True
        for x in runs:
            if x["config"] == lab and x.get("curve"):
                t, b = zip(*x["curve"])
                ax.plot(t, b, "-", color=colours[i % len(colours)], alpha=0.7, lw=1.2, label=lab if first else None)
                first = False
    ax.set_xlabel("training tokens")
    ax.set_ylabel("validation bits per byte")
    ax.set_title("validation BPB, one line per seed")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    _save(fig, path)
    plt.close(fig)
    return True


def plot_positions(path: Path, curves: dict[str, dict[tuple[int, int], float]]) -> None:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4), dpi=120)
    for lab, c in curves.items():
        keys = sorted(c)
        ax.plot([max(1, (k[0] + k[1]) / 2) for k in keys], [c[k] for k in keys], "o-", label=lab)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("token position in the context")
    ax.set_ylabel("bits per byte")
    ax.set_title("BPB by position (lower at long positions: the context is used)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    _save(fig, path)
    plt.close(fig)
