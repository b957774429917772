"""Evaluation: six standard benchmarks scored exactly as lm-evaluation-harness 0.4 scores them, and
bits-per-byte on any text, from a run directory.

What is notable:
- `evaluate(run_dir, tasks, data_dir, bpb_files, limit)` is the one entry point (the CLI's
  `luca eval` and `luca.evaluate(...)`); it writes `results.json` and the "Results" section of
  report.md and returns the same dict.
- tasks.py reads the public files and builds lm-eval's prompts; harness.py tokenizes as lm-eval's
  `hf` backend does and scores with shared contexts, packing and no padding; bpb.py measures
  bits per byte with a sliding window; report.py keeps the records; lm_eval_adapter.py lets
  lm-eval itself drive a luca model (`--model luca`).
- FP32 by default: that is what parity with lm-eval's numbers (to 1e-6) needs.
"""
from __future__ import annotations

import sys
import time
import types
from pathlib import Path
from typing import Sequence

from luca.errors import LucaError
from luca.evaluate.tasks import DEFAULT_TASKS, TASKS, load_task, parse_tasks

__all__ = ["evaluate", "evaluate_task", "score_task", "DEFAULT_TASKS", "TASKS"]

_DTYPES = {"float32": "float32", "fp32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16"}


def evaluate_task(model, tok, name: str, file: str | Path | None = None, data_dir: str | Path | None = None,
                  limit: int | None = None, **kw) -> dict:
    """One task on a loaded model: {"metrics": {m: {"value", "stderr"}}, "n", "files", "seconds", ...}.

    Keywords as `score_task`; the time includes reading the task's file.
    """
    t0 = time.perf_counter()
    data = load_task(name, Path(file) if file else None, data_dir, limit)
    return score_task(model, tok, data, t0=t0, **kw)


def score_task(model, tok, data, *, batch_tokens: int | None = None, bootstrap_iters: int = 100_000,
               progress: bool = False, details: bool = False, max_len: int | None = None,
               t0: float | None = None) -> dict:
    """Score a loaded task (`tasks.TaskData`). `details` adds "details": per request (context,
    continuation, log-likelihood, is_greedy). `max_len`: the context (default: the model's)."""
    from luca.evaluate import harness as H
    t0 = time.perf_counter() if t0 is None else t0
    pairs = [r for d in data.docs for r in d.requests]
    encoded = H.encode_pairs(tok, pairs)
    groups = [i for i, d in enumerate(data.docs) for _ in d.requests]  # an item's choices share a tree
    scored = H.score_pairs(model, encoded, groups, max_len=max_len, batch_tokens=batch_tokens, progress=progress,
                           desc=data.task.name)
    per_doc, i = [], 0
    for d in data.docs:
        k = len(d.requests)
        per_doc.append(H.doc_metrics(data.task.kind, d.choices, d.gold, scored[i:i + k]))
        i += k
    metrics = H.aggregate(data.task.metrics, per_doc, bootstrap_iters)
    rec = {"metrics": metrics, "n": len(data.docs), "limit": data.limit, "requests": len(pairs),
           "files": data.files, "seconds": round(time.perf_counter() - t0, 3)}
    if details:
        rec["details"] = [(c, x, s.ll, s.greedy) for (c, x), s in zip(pairs, scored)]
    return rec


def evaluate(run_dir: str | Path, tasks: str | Sequence[str] | None = None, data_dir: str | Path | None = None,
             bpb_files: Sequence[str | Path] | None = None, limit: int | None = None, *,
             dtype: str = "float32", device: str = "cpu", batch_tokens: int | None = None,
             bpb_stride: int | None = None, bootstrap_iters: int = 100_000, write: bool = True,
             progress: bool = True, on_result=None) -> dict:
    """Evaluate a run directory; returns (and, with `write`, records) the results.

    `tasks`: names (or "a,b" or "name=FILE"); default: all six when `data_dir` is given.
    `limit`: the first N items of each task. `on_result(name, record)` is called as each task or
    BPB file finishes (the CLI prints from it).
    """
    import torch

    from luca import __version__, rundir
    from luca.evaluate import report as R
    from luca.evaluate.bpb import bpb_file, read_text

    run_dir = rundir.require_run_dir(run_dir)
    if dtype not in _DTYPES:
        raise LucaError(f"dtype {dtype!r} is not one of {', '.join(_DTYPES)}")
    if limit is not None and limit <= 0:
        raise LucaError(f"limit should be positive, got {limit}")
    specs = parse_tasks(tasks) if tasks is not None or data_dir is not None else []
    if not specs and not bpb_files:
        raise LucaError("nothing to evaluate: give tasks with a data directory, or BPB files")
    # Every file is read (and checked) before the model is loaded: a bad one fails at once.
    loaded = []
    for name, file in specs:
        t0 = time.perf_counter()
        loaded.append((load_task(name, file, data_dir, limit), time.perf_counter() - t0))
    texts = [(f, read_text(f)) for f in bpb_files or []]
    model = rundir.load_model(run_dir, device=device, dtype=getattr(torch, _DTYPES[dtype]))
    tok = rundir.load_tokenizer(run_dir)
    results = {"schema": R.SCHEMA, "schema_version": R.SCHEMA_VERSION, "created": rundir.timestamp(),
               "luca_version": __version__, "run_dir": str(run_dir.resolve()),
               "model": R.model_record(run_dir, model, tok, _DTYPES[dtype]),
               "settings": {"num_fewshot": 0, "limit": limit, "bootstrap_iters": bootstrap_iters,
                            "scoring": "lm-evaluation-harness 0.4 (hf backend) compatible"},
               "tasks": {}, "bpb": {}}
    for data, read_s in loaded:
        rec = score_task(model, tok, data, batch_tokens=batch_tokens, bootstrap_iters=bootstrap_iters,
                         progress=progress, t0=time.perf_counter() - read_s)
        results["tasks"][data.task.name] = rec
        if on_result:
            on_result(data.task.name, rec)
    for f, text in texts:
        t0 = time.perf_counter()
        rec = bpb_file(model, tok, f, text, stride=bpb_stride, batch_tokens=batch_tokens, progress=progress)
        rec["seconds"] = round(time.perf_counter() - t0, 3)
        results["bpb"][rec["path"]] = rec
        if on_result:
            on_result(Path(f).name, rec)
    if write:
        results = R.merge_results(run_dir, results)
        R.write_report_section(run_dir, results)
    return results


class _CallableModule(types.ModuleType):
    """`luca.evaluate(...)`: importing this package replaces the function of that name in `luca`
    (a submodule becomes its package's attribute), so the package itself is made callable."""

    def __call__(self, *args, **kw) -> dict:
        return evaluate(*args, **kw)


sys.modules[__name__].__class__ = _CallableModule
