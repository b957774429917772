"""Structured-task diagnostics: exact-match accuracy of greedy answers on luca/synthetic.py's tasks.

What is notable:
- For each example the model sees the prompt (`... =`), decodes greedily until a newline or
  end-of-text, and scores 1 when the text before the newline, stripped, equals the answer.
- Model-agnostic decoding: a plain full forward per new token (no KV cache, no engine), on
  prompts batched by token length so no padding is needed. That works for luca's Transformer,
  the GPT-2 baseline (luca/baseline.py) and any module whose `model(ids)` returns logits, and it
  is exact: what a batch of one would give.
- Examples whose prompt plus answer do not fit the model's context are skipped and counted
  (`recall` grows with `pairs`; `fit_sizes` shrinks it to the context).
- Eval examples come from the `split="eval"` stream, training data (`synthetic:` sources) from
  `split="train"`.
- `run_diagnostics(run_dir)` scores every task and returns {task: {accuracy, correct, n, skipped,
  failures}}; `luca compare --diagnostics` adds it to each run and to the report.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch

from luca.synthetic import TASKS, Example, generate

__all__ = ["TASKS", "Example", "generate", "score", "run_diagnostics", "fit_sizes"]


@torch.inference_mode()
def greedy_answers(model, tok, prompts: Sequence[list[int]], max_new: Sequence[int], batch_size: int = 64,
                   device: torch.device | str | None = None) -> list[str]:
    """Greedy continuation text of each prompt (up to its first newline), `max_new[i]` tokens at most."""
    device = device or next(model.parameters()).device
    out = [""] * len(prompts)
    stop = {tok.eot_id} | {i for i in (tok.im_end_id,) if i is not None}
    by_len: dict[int, list[int]] = {}
    for i, p in enumerate(prompts):
        by_len.setdefault(len(p), []).append(i)
    for _, idx in sorted(by_len.items()):
        for b in range(0, len(idx), batch_size):
            rows = idx[b:b + batch_size]
            ids = torch.tensor([prompts[i] for i in rows], dtype=torch.long, device=device)
            gen: list[bytes] = [b""] * len(rows)
            live = [True] * len(rows)
            for step in range(max(max_new[i] for i in rows)):
                nxt = model(ids)[:, -1].argmax(-1)
                for r, t in enumerate(nxt.tolist()):
                    if not live[r]:
                        continue
                    if t in stop:
                        live[r] = False
                        continue
                    gen[r] += tok.token_bytes(t)
                    if b"\n" in gen[r] or step + 1 >= max_new[rows[r]]:
                        live[r] = False
                if not any(live):
                    break
                ids = torch.cat([ids, nxt[:, None]], 1)
            for r, i in enumerate(rows):
                out[i] = gen[r].decode("utf-8", errors="replace").split("\n")[0]
    return out


def score(model, tok, examples: Sequence[Example], batch_size: int = 64, keep_failures: int = 3) -> dict:
    """Exact-match accuracy of greedy answers: {accuracy, correct, n, skipped, failures}."""
    limit = model.cfg.max_seq_len
    prompts, max_new, kept = [], [], []
    for e in examples:
        p = tok.encode(e.prompt)
        m = len(tok.encode(" " + e.answer + "\n")) + 2
        if len(p) + m <= limit:
            prompts.append(p)
            max_new.append(m)
            kept.append(e)
    answers = greedy_answers(model, tok, prompts, max_new, batch_size)
    right = [a.strip() == e.answer for a, e in zip(answers, kept)]
    failures = [{"prompt": e.prompt[-80:], "expected": e.answer, "got": a.strip()}
                for a, e, ok in zip(answers, kept, right) if not ok][:keep_failures]
    n = len(kept)
    return {"accuracy": sum(right) / n if n else None, "correct": sum(right), "n": n,
            "skipped": len(examples) - n, "failures": failures}


def fit_sizes(task: str, tok, context: int) -> dict:
    """Generator sizes whose examples fit `context` tokens (only `recall` grows with the context)."""
    if task != "recall":
        return {}
    hi = 24
    while hi > 2:
        sample = generate(task, 8, seed=12345, pairs=(hi, hi))
        if max(len(tok.encode(e.text)) for e in sample) + 4 <= context:
            break
        hi = max(2, hi // 2)
    return {"pairs": (max(2, hi // 3), hi)}


def run_diagnostics(run_dir: str | Path | None = None, tasks: Sequence[str] = TASKS, n: int = 100, seed: int = 0,
                    *, model=None, tok=None, device: str | None = None, batch_size: int = 64) -> dict:
    """Score every task on a run directory (or on a given model and tokenizer)."""
    from luca import rundir
    if model is None:
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        model = rundir.load_model(run_dir, device=device)
        tok = rundir.load_tokenizer(run_dir)
    model.eval()
    out = {}
    for t in tasks:
        examples = generate(t, n, seed, split="eval", **fit_sizes(t, tok, model.cfg.max_seq_len))
        out[t] = score(model, tok, examples, batch_size)
    return out
