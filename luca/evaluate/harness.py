"""Scoring (context, continuation) requests as lm-evaluation-harness's `hf` backend does, faster.

What is notable:
- Tokenization mirrors `lm_eval.api.model.TemplateLM._encode_pair`: trailing whitespace of the
  context moves to the continuation, the whole string is encoded and the continuation is what
  follows the context's own token count; an empty context is replaced by the prefix token
  (lm-eval's `prefix_token_id`: BOS, else EOS, which for luca's tokenizer is `<|im_end|>`).
  Inputs longer than the model's context are cut from the left exactly as `HFLM` cuts them
  (`(context + continuation)[-(max_len + 1):][:-1]`).
- Identical requests are scored once. Requests that share their (truncated) context are scored
  as a tree: one copy of the context, then each continuation, with an attention mask that lets a
  continuation see the context and itself only and RoPE positions that restart per branch. So a
  HellaSwag item costs one context plus four endings, not four contexts: the context's keys and
  values are computed once and reused by every branch, inside one forward pass.
- Trees are packed into rows (best-fit decreasing by length, several items per row) and rows of
  similar length are batched, so almost no position is padding; the LM head and log-softmax run
  only on the positions whose next token is scored.
- `acc`/`acc_norm`/perplexity and their standard errors follow lm-eval's `process_results` and
  aggregations: argmax of the summed log-likelihood (first maximum wins), the same divided by the
  choice's character length, `exp(-mean(ll))`, the sample standard error of the mean, and for
  perplexity its bootstrap (100,000 resamples in chunks of 1,000 seeded 0, 1, ...) reproduced
  draw for draw with NumPy's MT19937 (seeded from a one-word key, as CPython's `random.seed(i)`).
"""
from __future__ import annotations

import math
from bisect import bisect_left, insort
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator, Sequence

import numpy as np
import torch

from luca.errors import LucaError
from luca.model import Transformer, rope_cos_sin
from luca.tokenizer import Tokenizer


@dataclass
class Scored:
    ll: float  # summed log-probability of the continuation (natural log, float32 sum)
    greedy: bool  # every continuation token is the argmax


# -- progress -----------------------------------------------------------------------------------
@contextmanager
def progress_bar(total: int, desc: str, unit: str, enabled: bool) -> Iterator:
    """A rich progress bar (rate and ETA) on stderr; yields `advance(n)`."""
    if not enabled or total <= 0:
        yield lambda n: None
        return
    from rich.console import Console
    from rich.progress import (BarColumn, MofNCompleteColumn, Progress, ProgressColumn, TextColumn,
                               TimeElapsedColumn, TimeRemainingColumn)
    from rich.text import Text

    class Rate(ProgressColumn):
        def render(self, task):
            return Text(f"{task.speed or 0:,.0f} {unit}/s")

    with Progress(TextColumn(f"[bold]{desc}"), BarColumn(), MofNCompleteColumn(), Rate(), TimeElapsedColumn(),
                  TimeRemainingColumn(), console=Console(stderr=True), transient=True) as bar:
        task = bar.add_task(desc, total=total)
        yield lambda n: bar.advance(task, n)


# -- tokenization -------------------------------------------------------------------------------
def encode_pairs(tok: Tokenizer, pairs: Sequence[tuple[str, str]],
                 prefix_id: int | None = None) -> list[tuple[list[int], list[int]]]:
    """(context ids, continuation ids) for each (context, continuation), as lm-eval's HFLM makes them."""
    prefix_id = tok.im_end_id if prefix_id is None else prefix_id
    plan, strings = [], {}
    for ctx, cont in pairs:
        if ctx == "":
            plan.append((None, cont))
            strings.setdefault(cont, None)
            continue
        n = len(ctx) - len(ctx.rstrip())
        if n:
            cont, ctx = ctx[-n:] + cont, ctx[:-n]
        if not ctx:
            raise LucaError(f"request context {pairs[len(plan)][0]!r} is only whitespace")
        plan.append((ctx, ctx + cont))
        strings.setdefault(ctx, None)
        strings.setdefault(ctx + cont, None)
    keys = list(strings)
    for k, ids in zip(keys, tok.encode_batch(keys)):
        strings[k] = ids
    out = []
    for ctx, whole in plan:
        if ctx is None:  # empty context: the prefix token conditions the continuation
            ids = strings[whole]
            out.append(([prefix_id], ids) if ids and ids[0] != prefix_id else (ids[:1], ids[1:]))
        else:
            c = strings[ctx]
            out.append((c, strings[whole][len(c):]))
    return out


# -- packing ------------------------------------------------------------------------------------
@dataclass
class _Piece:
    prefix: tuple[int, ...]
    uids: list[int]
    length: int


def _pack(pieces: list[_Piece], row_len: int) -> list[list[_Piece]]:
    """Best-fit decreasing: each piece (longest first) goes to the fullest row it still fits in."""
    rows: list[list[_Piece]] = []
    free: list[tuple[int, int]] = []  # (room left, row index), sorted
    for p in sorted(pieces, key=lambda p: -p.length):
        i = bisect_left(free, (p.length, -1))
        if i < len(free):
            room, r = free.pop(i)
            rows[r].append(p)
        else:
            rows.append([p])
            room, r = row_len, len(rows) - 1
        if room - p.length > 0:
            insort(free, (room - p.length, r))
    return rows


def forward_hidden(model: Transformer, tokens: torch.Tensor, positions: torch.Tensor,
                   mask: torch.Tensor) -> torch.Tensor:
    """Final-normed hidden states with an explicit attention mask (B, 1, T, T); mirrors
    `Transformer.hidden_states`, which only knows causal and same-document masks."""
    cfg = model.cfg
    x = model.model.embed_tokens(tokens)
    cos, sin = rope_cos_sin(positions, cfg.head_dim, cfg.rope_theta, x.dtype)
    for block in model.model.layers:
        x = block(x, cos, sin, mask)
    return model.model.norm(x)


@torch.inference_mode()
def score_pairs(model: Transformer, pairs: Sequence[tuple[list[int], list[int]]], *,
                max_len: int | None = None, row_len: int = 512, batch_tokens: int = 4096,
                progress: bool = False, desc: str = "score") -> list[Scored]:
    """Log-likelihood and greediness of each continuation given its context (token ids)."""
    L = max_len or model.cfg.max_seq_len
    device = next(model.parameters()).device
    keys: dict[tuple[tuple[int, ...], tuple[int, ...]], int] = {}
    req_uid = []
    for ctx, cont in pairs:
        if not ctx or not cont:
            raise LucaError("a request has an empty context or continuation after tokenization")
        if len(cont) > L:
            raise LucaError(f"a continuation of {len(cont)} tokens exceeds the model's context ({L})")
        full = (list(ctx) + list(cont))[-(L + 1):]
        key = (tuple(full[:len(full) - len(cont)]), tuple(cont))
        req_uid.append(keys.setdefault(key, len(keys)))
    uniq = list(keys)
    groups: dict[tuple[int, ...], list[int]] = {}
    for uid, (prefix, _) in enumerate(uniq):
        groups.setdefault(prefix, []).append(uid)
    longest = max((len(p) + len(c) - 1 for p, c in uniq), default=1)
    row_len = max(row_len, longest)
    pieces: list[_Piece] = []
    for prefix, uids in groups.items():
        cur, n = [], len(prefix)
        for uid in uids:
            extra = len(uniq[uid][1]) - 1
            if cur and n + extra > row_len:
                pieces.append(_Piece(prefix, cur, n))
                cur, n = [], len(prefix)
            cur.append(uid)
            n += extra
        pieces.append(_Piece(prefix, cur, n))
    rows = sorted(_pack(pieces, row_len), key=lambda r: -sum(p.length for p in r))

    ll = torch.zeros(len(uniq), dtype=torch.float32)
    n_miss = torch.zeros(len(uniq), dtype=torch.int64)
    total = sum(p.length for p in pieces)
    with progress_bar(total, desc, "tok", progress) as advance:
        i = 0
        while i < len(rows):
            T = sum(p.length for p in rows[i])
            B = max(1, batch_tokens // T)
            batch = rows[i:i + B]
            i += B
            _score_batch(model, batch, T, uniq, ll, n_miss, device)
            advance(sum(p.length for r in batch for p in r))
    return [Scored(float(ll[u]), bool(n_miss[u] == 0)) for u in req_uid]


def _score_batch(model: Transformer, rows: list[list[_Piece]], T: int, uniq, ll: torch.Tensor,
                 n_miss: torch.Tensor, device) -> None:
    B = len(rows)
    toks = np.zeros((B, T), dtype=np.int64)
    pos = np.zeros((B, T), dtype=np.int64)
    grp = np.tile(-1 - np.arange(T, dtype=np.int64), (B, 1))  # padding: a group of its own
    seg = np.zeros((B, T), dtype=np.int64)
    tgt_flat, tgt_ids, tgt_uid = [], [], []
    gid = 0
    for r, row in enumerate(rows):
        t = 0
        for piece in row:
            p = len(piece.prefix)
            toks[r, t:t + p] = piece.prefix
            pos[r, t:t + p] = np.arange(p)
            grp[r, t:t + p] = gid
            last = r * T + t + p - 1  # its logits predict every branch's first token
            t += p
            for k, uid in enumerate(piece.uids, 1):
                cont = uniq[uid][1]
                n = len(cont) - 1
                toks[r, t:t + n] = cont[:-1]
                pos[r, t:t + n] = np.arange(p, p + n)
                grp[r, t:t + n] = gid
                seg[r, t:t + n] = k
                tgt_flat.append(last)
                tgt_flat.extend(range(r * T + t, r * T + t + n))
                tgt_ids.extend(cont)
                tgt_uid.extend([uid] * (n + 1))
                t += n
            gid += 1
    g, s = torch.from_numpy(grp), torch.from_numpy(seg)
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    mask = (g[:, :, None] == g[:, None, :]) & causal & ((s[:, None, :] == 0) | (s[:, :, None] == s[:, None, :]))
    h = forward_hidden(model, torch.from_numpy(toks).to(device), torch.from_numpy(pos).to(device),
                       mask[:, None].to(device))
    sel = h.reshape(B * T, -1)[torch.tensor(tgt_flat, device=device)]
    lp = torch.log_softmax(model.lm_head(sel).float(), dim=-1).cpu()
    tgt = torch.tensor(tgt_ids)
    tok_lp = lp.gather(1, tgt[:, None]).squeeze(1)
    miss = (lp.argmax(dim=-1) != tgt).long()
    uid = torch.tensor(tgt_uid)
    ll.index_add_(0, uid, tok_lp)
    n_miss.index_add_(0, uid, miss)


# -- metrics ------------------------------------------------------------------------------------
def _mean(xs: Sequence[float]) -> float:
    return sum(xs) / len(xs)


def sample_stddev(xs: Sequence[float]) -> float:
    mu = _mean(xs)
    return math.sqrt(sum((x - mu) ** 2 for x in xs) / (len(xs) - 1))


def mean_stderr(xs: Sequence[float]) -> float | None:
    return sample_stddev(xs) / math.sqrt(len(xs)) if len(xs) > 1 else None


def perplexity(lls: Sequence[float]) -> float:
    return math.exp(-_mean(lls))


def perplexity_stderr(lls: Sequence[float], iters: int = 100_000) -> float | None:
    """lm-eval's `bootstrap_stderr(perplexity, lls, iters)`, vectorised, same resamples.

    lm-eval draws chunk i (of `min(1000, iters)` resamples) with `random.Random(i).choices`, which
    is `population[floor(random() * n)]`; NumPy's `RandomState([i])` seeds MT19937 the same way
    (init_by_array with the one-word key) and `random_sample` is the same 53-bit double.
    """
    if len(lls) < 2 or iters <= 0:
        return None
    xs = np.asarray(lls, dtype=np.float64)
    n = len(xs)
    chunk = min(1000, iters)
    rows_per_draw = max(1, (1 << 21) // n)  # bound memory: ~2M draws at a time
    res = []
    for i in range(iters // chunk):
        rs = np.random.RandomState([i])
        done = 0
        while done < chunk:
            m = min(rows_per_draw, chunk - done)
            idx = np.floor(rs.random_sample((m, n)) * float(n)).astype(np.int64)
            res.append(np.exp(-(xs[idx].sum(axis=1) / n)))
            done += m
    return sample_stddev(np.concatenate(res).tolist())


def doc_metrics(kind: str, choices: list[str], gold: int, results: list[Scored]) -> dict[str, float]:
    """lm-eval's `ConfigurableTask.process_results` for one document."""
    if kind == "loglikelihood":
        r = results[0]
        return {"perplexity": r.ll, "acc": int(r.greedy)}
    lls = np.array([r.ll for r in results])
    completion_len = np.array([float(len(c)) for c in choices])
    pred = int(np.argmax(lls))
    pred_norm = int(np.argmax(lls / completion_len))
    return {"acc": 1.0 if pred == gold else 0.0, "acc_norm": 1.0 if pred_norm == gold else 0.0}


def aggregate(metrics: Sequence[str], per_doc: list[dict[str, float]],
              bootstrap_iters: int = 100_000) -> dict[str, dict]:
    """{metric: {"value", "stderr"}} with lm-eval's aggregations and standard errors."""
    out = {}
    for m in metrics:
        xs = [d[m] for d in per_doc]
        if m == "perplexity":
            out[m] = {"value": perplexity(xs), "stderr": perplexity_stderr(xs, bootstrap_iters)}
        else:
            out[m] = {"value": _mean(xs), "stderr": mean_stderr(xs)}
    return out
