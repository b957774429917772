"""`luca ladder`: train a ladder of sizes, fit a scaling law, forecast loss and the compute-optimal size.

What is notable:
- Sizes are the `depth` dial (config.derive_model: d_model = 64 · depth, one head per 64 dims);
  the config's explicit shape keys are dropped so the dial decides, and a multi-head config stays
  multi-head. Every size × token budget is one run (compare.py's machinery: cached data, fixed
  data order, run directories under OUT/runs/, finished runs reused on a rerun).
- The fit is L(N, D) = E + A / N^α + B / D^β when the token budgets vary, else L(N) = E + A / N^α
  at the fixed D, with N the non-embedding parameters (Kaplan's choice: at these sizes the
  embedding would dominate the count) and L the final validation BPB. For fixed exponents the
  law is linear in (E, A, B), so the fit searches the exponents on a grid, solves the rest by
  least squares (A, B ≥ 0), and refines the grid around the best point: plain numpy,
  deterministic, no starting guess. With scipy present a final `least_squares` polish runs.
- Forecast for a budget of C FLOPs (C ≈ 6 · N · D): the compute-optimal N* = G · (C/6)^(β/(α+β)),
  G = (αA / (βB))^(1/(α+β)), D* = C / (6 N*), and the loss there. With L(N) only, the loss at
  larger sizes (same D); the optimal size needs several token budgets (`--tokens a,b`).
- Records: `ladder.json` (schema_version 1: points, fit, forecast), `ladder.md`, `ladder.png`.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

import numpy as np

from luca import config as C
from luca import rundir
from luca.atomic import atomic_path, write_text
from luca.errors import LucaError

SCHEMA_VERSION = 1
JSON, MD, PNG = "ladder.json", "ladder.md", "ladder.png"
SHAPE_KEYS = ("n_layers", "d_model", "n_heads", "n_kv_heads", "head_dim", "d_ff")


# -- the fit -----------------------------------------------------------------------------------
def _solve(cols: list[np.ndarray], y: np.ndarray) -> tuple[float, np.ndarray]:
    X = np.stack([np.ones_like(y)] + cols, axis=1)
    coef, *_ = np.linalg.lstsq(X, y, rcond=None)
    if np.any(coef[1:] < 0):  # A, B ≥ 0: a power law that rises with size is not a scaling law
        return math.inf, coef
    r = X @ coef - y
    return float(r @ r), coef


def fit_power_law(N: Sequence[float], L: Sequence[float], D: Sequence[float] | None = None) -> dict:
    """Least-squares fit of L = E + A/N^α (+ B/D^β when D varies); returns the parameters and RMSE."""
    N, L = np.asarray(N, float), np.asarray(L, float)
    two = D is not None and len(set(D)) > 1
    D = np.asarray(D, float) if D is not None else np.ones_like(N)
    need = 5 if two else 3
    if len(N) < need or len(set(N.tolist())) < (2 if two else 3):
        raise LucaError(f"ladder fit: {'L(N, D)' if two else 'L(N)'} needs at least {need} points with "
                        f"{'2' if two else '3'} or more distinct sizes, got {len(N)}")
    n0, d0 = N.min(), D.min()
    n, d = N / n0, D / d0  # scaled to ≥ 1: the grid of exponents is well conditioned

    def sse(a: float, b: float) -> tuple[float, np.ndarray]:
        cols = [n ** -a] + ([d ** -b] if two else [])
        return _solve(cols, L)

    lo, hi, k = 0.01, 3.0, 121
    ga = np.linspace(lo, hi, k)
    gb = ga if two else np.array([0.0])
    best = min(((sse(a, b)[0], a, b) for a in ga for b in gb), key=lambda t: t[0])
    step = (hi - lo) / (k - 1)
    for _ in range(6):  # zoom in around the best exponents
        ga = np.clip(np.linspace(best[1] - step, best[1] + step, 21), 1e-4, None)
        gb = np.clip(np.linspace(best[2] - step, best[2] + step, 21), 1e-4, None) if two else np.array([0.0])
        best = min([best] + [(sse(a, b)[0], a, b) for a in ga for b in gb], key=lambda t: t[0])
        step /= 10
    if not math.isfinite(best[0]):
        raise LucaError("ladder fit: no decreasing power law fits these points (does the loss fall with size?)")
    a, b = best[1], best[2]
    coef = sse(a, b)[1]
    params = np.array([coef[0], coef[1], a] + ([coef[2], b] if two else []))
    try:  # polish all parameters at once where scipy is installed
        from scipy.optimize import least_squares

        def resid(p):
            return p[0] + p[1] * n ** -p[2] + (p[3] * d ** -p[4] if two else 0) - L
        bounds = ([-np.inf, 0, 1e-4] + ([0, 1e-4] if two else []), [np.inf] * len(params))
        sol = least_squares(resid, params, bounds=bounds, xtol=1e-14, ftol=1e-14, gtol=1e-14)
        if sol.success and float(sol.fun @ sol.fun) <= best[0]:
            params = sol.x
    except ImportError:
        pass
    E, An, alpha = params[:3]
    out = {"form": "L(N, D) = E + A/N^alpha + B/D^beta" if two else "L(N) = E + A/N^alpha",
           "E": float(E), "A": float(An * n0 ** alpha), "alpha": float(alpha)}
    if two:
        Bn, beta = params[3:]
        out.update(B=float(Bn * d0 ** beta), beta=float(beta))
    pred = np.array([predict(out, x, y) for x, y in zip(N, D)])
    out["rmse"] = float(np.sqrt(np.mean((pred - L) ** 2)))
    out["points"] = len(N)
    return out


def predict(fit: dict, N: float, D: float | None = None) -> float:
    v = fit["E"] + fit["A"] * N ** -fit["alpha"]
    if "B" in fit:
        v += fit["B"] * D ** -fit["beta"]
    return float(v)


def compute_optimal(fit: dict, flops: float) -> dict:
    """The N, D minimising L(N, D) at 6 · N · D = flops, and the loss there (needs the L(N, D) fit)."""
    a, b, A, B = fit["alpha"], fit["beta"], fit["A"], fit["B"]
    G = (a * A / (b * B)) ** (1 / (a + b))
    N = G * (flops / 6) ** (b / (a + b))
    D = flops / 6 / N
    return {"flops": flops, "N": N, "D": D, "loss": predict(fit, N, D), "tokens_per_parameter": D / N}


# -- the ladder --------------------------------------------------------------------------------
def _short(n: float) -> str:
    for unit, div in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= div:
            return f"{n / div:g}{unit}"
    return f"{n:g}"


def size_config(raw: dict, depth: int, mha: bool) -> dict:
    """`raw` (a loaded TOML) with its model shape replaced by the depth dial."""
    out = {k: (dict(v) if isinstance(v, dict) else v) for k, v in raw.items()}
    model = {k: v for k, v in out.get("model", {}).items() if k not in SHAPE_KEYS + ("depth",)}
    model["depth"] = depth
    if mha:
        model["n_kv_heads"] = depth  # derive_model gives depth heads: keep them all as KV heads
    out["model"] = model
    return out


def ladder(config: str, sizes: Sequence[int], tokens: Sequence[int] | int, out: str | Path = "ladder", *,
           seed: int = 0, overrides=None, sources=None, budget: float | None = None, progress: bool = True,
           say=print) -> dict:
    """Train `config` at every depth in `sizes` for every budget in `tokens`; fit, plot and forecast."""
    from luca import __version__
    from luca.compare import prepare_arm, run_arm, separate_token_dirs, fingerprint_arms
    from luca.pipeline import resolve
    tokens = [tokens] if isinstance(tokens, int) else list(tokens)
    if not sizes or any(s < 1 for s in sizes) or not tokens or any(t < 1 for t in tokens):
        raise LucaError("ladder: --sizes and --tokens must be positive integers")
    raw = C.load_preset(config)
    base = resolve(raw, overrides, sources)["model"]
    mha = base["n_kv_heads"] == base["n_heads"]
    arms = [prepare_arm(f"d{s}-t{_short(t)}", size_config(raw, s, mha), overrides, sources, t, 0, 4, progress, say)
            for s in sorted(set(sizes)) for t in sorted(set(tokens))]
    separate_token_dirs(arms)
    fingerprint_arms(arms)
    out = Path(out)
    old = rundir.read_json(out / JSON) if (out / JSON).is_file() else {}
    prev = {p["label"]: p for p in old.get("points", [])}
    points = []
    for i, a in enumerate(arms):
        rel = f"runs/{a.label}/seed{seed}"
        say(f"ladder: {i + 1}/{len(arms)}: {a.label} ({a.params:,} parameters, {a.non_embedding:,} non-embedding, "
            f"{a.tokens:,} tokens)")
        rec, _ = run_arm(a, seed, out / rel, prev.get(a.label, {}).get("run"), progress=progress)
        points.append({"label": a.label, "depth": a.model_cfg.n_layers, "parameters": a.params,
                       "non_embedding_parameters": a.non_embedding, "tokens": a.tokens, "flops": a.flops,
                       "val_bpb": rec["val_bpb"], "run_dir": rel, "run": dict(rec, run_dir=rel)})
    result = {"schema": "luca.ladder", "schema_version": SCHEMA_VERSION, "luca_version": __version__,
              "created": rundir.timestamp(), "config": str(config), "seed": seed, "points": points}
    N = [p["non_embedding_parameters"] for p in points]
    L = [p["val_bpb"] for p in points]
    D = [p["tokens"] for p in points]
    try:
        fit = fit_power_law(N, L, D)
    except LucaError as e:
        fit, result["fit_error"] = None, str(e)
    result["fit"] = fit
    if fit:
        fc: dict = {"larger": [{"N": n, "D": max(D), "loss": predict(fit, n, max(D))}
                               for n in (2 * max(N), 4 * max(N), 10 * max(N))]}
        if budget:
            fc["budget"] = compute_optimal(fit, budget) if "B" in fit else None
            if "B" not in fit:
                fc["note"] = "the compute-optimal size needs several token budgets (--tokens a,b,...)"
        result["forecast"] = fc
    out.mkdir(parents=True, exist_ok=True)
    rundir.write_json(out / JSON, result)
    try:
        plot(out / PNG, points, fit)
    except ImportError:  # no matplotlib: the tables still stand
        pass
    write_text(out / MD, markdown(result))
    result["out"] = str(out)
    return result


def markdown(r: dict) -> str:
    lines = [f"# Scaling ladder: {r['config']}", "",
             "| run | depth | parameters | non-embedding N | tokens D | training FLOPs | val BPB |", "|---|---|---|---|---|---|---|"]
    for p in r["points"]:
        lines.append(f"| {p['run_dir']} | {p['depth']} | {p['parameters']:,} | {p['non_embedding_parameters']:,} | "
                     f"{p['tokens']:,} | {p['flops']:.3g} | {p['val_bpb']:.4f} |")
    fit = r.get("fit")
    lines.append("")
    if not fit:
        lines += [f"No fit: {r.get('fit_error')}", ""]
        return "\n".join(lines)
    law = f"{fit['E']:.4f} + {fit['A']:.4g}/N^{fit['alpha']:.3f}"
    if "B" in fit:
        law += f" + {fit['B']:.4g}/D^{fit['beta']:.3f}"
    lines += [f"Fit ({fit['points']} points, RMSE {fit['rmse']:.4f} BPB): **L = {law}** (BPB; N non-embedding "
              f"parameters, D training tokens).", "", f"![ladder]({PNG})", "", "## Forecast", ""]
    for f in r["forecast"]["larger"]:
        lines.append(f"- N = {f['N']:,.0f} at D = {f['D']:,}: {f['loss']:.4f} BPB")
    b = r["forecast"].get("budget")
    if b:
        lines.append(f"- Budget {b['flops']:.3g} FLOPs: compute-optimal N* ≈ {b['N']:,.0f} non-embedding parameters, "
                     f"D* ≈ {b['D']:,.0f} tokens ({b['tokens_per_parameter']:.1f} tokens/parameter), "
                     f"loss ≈ {b['loss']:.4f} BPB")
    elif r["forecast"].get("note"):
        lines.append(f"- Budget: {r['forecast']['note']}")
    lines += ["", "Extrapolations from a handful of small runs are rough: read the exponents, not the digits.", ""]
    return "\n".join(lines)


def plot(path: Path, points: list[dict], fit: dict | None) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4), dpi=120)
    for D in sorted({p["tokens"] for p in points}):
        pts = sorted((p["non_embedding_parameters"], p["val_bpb"]) for p in points if p["tokens"] == D)
        line = ax.plot(*zip(*pts), "o", label=f"D = {D:,} tokens")[0]
        if fit:
            xs = np.geomspace(min(x for x, _ in pts) / 1.5, max(x for x, _ in pts) * 10, 100)
            ax.plot(xs, [predict(fit, x, D) for x in xs], "-", color=line.get_color(), alpha=0.6)
    ax.set_xscale("log")
    ax.set_xlabel("non-embedding parameters N")
    ax.set_ylabel("validation bits per byte")
    ax.set_title("scaling ladder" + (f": alpha = {fit['alpha']:.3f}" if fit else ""))
    ax.grid(alpha=0.3, which="both")
    ax.legend()
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
