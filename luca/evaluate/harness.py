"""Scoring (context, continuation) requests as lm-evaluation-harness's `hf` backend does, faster.

What is notable:
- Tokenization mirrors `lm_eval.api.model.TemplateLM._encode_pair`: trailing whitespace of the
  context moves to the continuation, the whole string is encoded and the continuation is what
  follows the context's own token count; an empty context is replaced by the prefix token
  (lm-eval's `prefix_token_id`: BOS, else EOS, which for luca's tokenizer is `<|im_end|>`).
  Inputs longer than the model's context are cut from the left exactly as `HFLM` cuts them
  (`(context + continuation)[-(max_len + 1):][:-1]`). A continuation longer than the context
  itself (a few PIQA solutions for a 256-token model), where `HFLM` stops on an assertion, is
  scored in pieces of half the context, each conditioned on the tokens just before it.
- Identical requests are scored once. The requests of one item (its choices) are merged into a
  prefix tree of tokens: every shared prefix (HellaSwag's and ARC's context, the words before
  WinoGrande's blank, common first tokens of the choices) is one set of positions, laid out in
  depth-first order; a position attends to itself and its ancestors only (node j is an ancestor
  of node i exactly when j <= i < end[j], one comparison per pair) and its RoPE position is its
  depth. So a HellaSwag item costs one context plus four endings, not four contexts: the
  context's keys and values are computed once and reused by every branch, in one forward pass.
- Trees are batched longest first, each batch's rows as long as its first tree, shorter trees
  first-fit into rows with room: sorted lengths leave almost no padding, and attention (a dense
  masked matrix on the CPU) stays as short as the trees. The last block runs its queries and MLP,
  and the LM head and log-softmax run, only at positions whose next token is scored.
- `acc`/`acc_norm`/perplexity and their standard errors follow lm-eval's `process_results` and
  aggregations: argmax of the summed log-likelihood (first maximum wins), the same divided by the
  choice's character length, `exp(-mean(ll))`, the sample standard error of the mean, and for
  perplexity its bootstrap (100,000 resamples in chunks of 1,000 seeded 0, 1, ...) reproduced
  draw for draw with NumPy's MT19937 (seeded from a one-word key, as CPython's `random.seed(i)`).
"""
from __future__ import annotations

import math
import os
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from luca.errors import LucaError
from luca.model import Transformer, apply_rope, rope_cos_sin
from luca.tokenizer import Tokenizer


@dataclass
class Scored:
    ll: float  # summed log-probability of the continuation (natural log, float32 sum)
    greedy: bool  # every continuation token is the argmax


# -- progress -----------------------------------------------------------------------------------
@contextmanager
def progress_bar(total: int, desc: str, unit: str, enabled: bool) -> Iterator:
    """A rich progress bar (rate and ETA) on stderr; yields `advance(n)`."""
    from rich.console import Console
    console = Console(stderr=True)
    if not enabled or total <= 0 or not console.is_terminal:
        yield lambda n: None
        return
    from rich.progress import (BarColumn, MofNCompleteColumn, Progress, ProgressColumn, TextColumn,
                               TimeElapsedColumn, TimeRemainingColumn)
    from rich.text import Text

    class Rate(ProgressColumn):
        def render(self, task):
            return Text(f"{task.speed or 0:,.0f} {unit}/s")

    with Progress(TextColumn(f"[bold]{desc}"), BarColumn(), MofNCompleteColumn(), Rate(), TimeElapsedColumn(),
                  TimeRemainingColumn(), console=console, transient=True) as bar:
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


# -- prefix trees -------------------------------------------------------------------------------
@dataclass
class _Tree:
    """Token paths merged on their shared prefixes, in depth-first order (one packed sequence).

    Node i is at depth `depth[i]`; its subtree is nodes i .. end[i]-1, so node i attends to node j
    exactly when j <= i < end[j] (j is i or an ancestor of i).
    """
    tokens: list[int]
    depth: list[int]
    end: list[int]
    targets: list[tuple[int, int, int]]  # (node predicting it, target token, request uid)


def _build_trees(paths: list[tuple[list[int], list[int], int]], cap: int) -> list[_Tree]:
    """Trees of the requests (input path, continuation, uid) of one group, each at most `cap` nodes.

    Paths are inserted in sorted order, so each shares with the one before it the longest prefix it
    shares with any earlier one, and node creation order is already depth-first.
    """
    trees: list[_Tree] = []
    tree, prev, prev_nodes, open_ = None, [], [], []
    for path, cont, uid in sorted(paths):
        lcp = 0
        if tree is not None:
            n = min(len(prev), len(path))
            while lcp < n and prev[lcp] == path[lcp]:
                lcp += 1
            if len(tree.tokens) + len(path) - lcp > cap:
                tree = None
        if tree is None:
            if trees and open_:
                for i in open_:
                    trees[-1].end[i] = len(trees[-1].tokens)
            tree, lcp, prev_nodes, open_ = _Tree([], [], [], []), 0, [], []
            trees.append(tree)
        for i in open_[lcp:]:  # nodes left behind: their subtrees are complete
            tree.end[i] = len(tree.tokens)
        nodes = prev_nodes[:lcp]
        for d in range(lcp, len(path)):
            nodes.append(len(tree.tokens))
            tree.tokens.append(path[d])
            tree.depth.append(d)
            tree.end.append(-1)
        open_ = nodes
        first = len(path) - len(cont)  # the node whose logits predict cont[0]
        tree.targets.extend((nodes[first + j], t, uid) for j, t in enumerate(cont))
        prev, prev_nodes = path, nodes
    if trees:
        for i in open_:
            trees[-1].end[i] = len(trees[-1].tokens)
    return trees


def _batches(trees: list[_Tree], batch_tokens: int) -> Iterator[tuple[int, list[list[_Tree]]]]:
    """(row length, rows of trees): longest trees first, rows as long as the batch's first tree,
    shorter trees first-fit into rows that still have room, so padding stays near zero."""
    order = sorted(trees, key=lambda t: -len(t.tokens))
    i = 0
    while i < len(order):
        T = len(order[i].tokens)
        n_rows = max(1, batch_tokens // T)
        rows: list[list[_Tree]] = []
        room: list[int] = []
        while i < len(order):
            n = len(order[i].tokens)
            r = next((k for k, left in enumerate(room) if left >= n), None)
            if r is None:
                if len(rows) == n_rows:
                    break
                rows.append([])
                room.append(T)
                r = len(rows) - 1
            rows[r].append(order[i])
            room[r] -= n
            i += 1
        yield T, rows


def forward_selected(model: Transformer, tokens: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor,
                     sel: torch.Tensor) -> torch.Tensor:
    """Final-normed hidden states at the flat positions `sel` (of B·T), given an attention mask
    (B, 1, T, T). Mirrors `Transformer.hidden_states` (which knows only causal and same-document
    masks), except that the last block runs its queries, MLP and norm on the selected positions
    only: its keys and values are all the other positions need from it."""
    cfg = model.cfg
    B, T = tokens.shape
    x = model.model.embed_tokens(tokens)
    cos, sin = rope_cos_sin(positions, cfg.head_dim, cfg.rope_theta, x.dtype)
    *blocks, last = model.model.layers
    for block in blocks:
        x = block(x, cos, sin, mask)
    # The last block, queries at `sel` only, laid out (B, Q) per row (padded with each row's last pick).
    row, col = sel // T, sel % T
    counts = torch.bincount(row, minlength=B)
    Q = int(counts.max())
    start = torch.cumsum(counts, 0) - counts
    slot = torch.arange(len(sel), device=sel.device) - start[row]
    qcol = torch.zeros(B, Q, dtype=torch.long, device=sel.device)
    qcol[row, slot] = col
    pad = torch.arange(Q, device=sel.device)[None, :] >= counts[:, None]
    qcol = torch.where(pad, qcol.gather(1, (counts - 1).clamp(min=0)[:, None]).expand(B, Q), qcol)
    a = last.self_attn
    h = last.input_layernorm(x)
    hq = h.gather(1, qcol[..., None].expand(B, Q, h.shape[-1]))
    q = a.q_proj(hq).view(B, Q, cfg.n_heads, cfg.head_dim)
    k = a.k_proj(h).view(B, T, cfg.n_kv_heads, cfg.head_dim)
    v = a.v_proj(h).view(B, T, cfg.n_kv_heads, cfg.head_dim)
    if cfg.qk_norm:
        q, k = a.q_norm(q), a.k_norm(k)
    qcos = cos.gather(1, qcol[..., None].expand(B, Q, cos.shape[-1]))
    qsin = sin.gather(1, qcol[..., None].expand(B, Q, sin.shape[-1]))
    q, k = apply_rope(q, qcos, qsin), apply_rope(k, cos, sin)  # (B, T, H, D), as luca.model's Attention
    q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    qmask = mask.gather(2, qcol[:, None, :, None].expand(B, 1, Q, T))
    y = F.scaled_dot_product_attention(q, k, v, attn_mask=qmask, enable_gqa=cfg.n_kv_heads != cfg.n_heads)
    xq = x.gather(1, qcol[..., None].expand(B, Q, x.shape[-1]))
    xq = xq + a.o_proj(y.transpose(1, 2).reshape(B, Q, cfg.n_heads * cfg.head_dim))
    xq = xq + last.mlp(last.post_attention_layernorm(xq))
    return model.model.norm(xq[row, slot])


def default_batch_tokens(device: torch.device | str) -> int:
    """Positions per forward pass. On the CPU small batches win: at 2,048 rows the activations of a
    small model stay in cache and the FP32 GEMMs run ~25% faster than at 8,192 (measured on nano-n1);
    a GPU wants large ones."""
    return 2048 if torch.device(device).type == "cpu" else 16384


@torch.inference_mode()
def score_pairs(model: Transformer, pairs: Sequence[tuple[list[int], list[int]]],
                groups: Sequence | None = None, *, max_len: int | None = None, batch_tokens: int | None = None,
                progress: bool = False, desc: str = "score") -> list[Scored]:
    """Log-likelihood and greediness of each continuation given its context (token ids).

    Requests with the same `groups` entry (e.g. the choices of one item) share one prefix tree;
    without `groups`, requests with the same context do.
    """
    L = max_len or model.cfg.max_seq_len
    device = next(model.parameters()).device
    batch_tokens = batch_tokens or default_batch_tokens(device)
    keys: dict[tuple[tuple[int, ...], int], int] = {}
    req_uid, uniq_group, uniq_req, owner = [], [], [], []
    for i, (ctx, cont) in enumerate(pairs):
        if not ctx or not cont:
            raise LucaError("a request has an empty context or continuation after tokenization")
        pieces = [(ctx, cont)]
        if len(cont) > L:  # lm-eval's hf backend asserts here; score it in pieces (see the docstring)
            step, whole = max(1, L // 2), list(ctx) + list(cont)
            pieces = [(whole[:len(ctx) + s], list(cont[s:s + step])) for s in range(0, len(cont), step)]
        for ctx, cont in pieces:
            owner.append(i)
            full = (list(ctx) + list(cont))[-(L + 1):]
            key = (tuple(full), len(cont))
            uid = keys.get(key)
            if uid is None:
                uid = keys[key] = len(uniq_req)
                uniq_req.append((full[:-1], list(cont), uid))
                uniq_group.append(groups[i] if groups is not None else key[0][:len(full) - len(cont)])
            req_uid.append(uid)
    if isinstance(model, Transformer):
        by_group: dict = {}
        for r, g in zip(uniq_req, uniq_group):
            by_group.setdefault(g, []).append(r)
        trees = [t for reqs in by_group.values() for t in _build_trees(reqs, L)]
    else:  # another family (luca.baseline's GPT-2): one chain per request, packed as documents
        trees = [_build_trees([r], L)[0] for r in uniq_req]

    ll = torch.zeros(len(uniq_req), dtype=torch.float32)
    n_miss = torch.zeros(len(uniq_req), dtype=torch.int64)
    with progress_bar(sum(len(t.tokens) for t in trees), desc, "tok", progress) as advance:
        for T, rows in _batches(trees, batch_tokens):
            _score_batch(model, rows, T, ll, n_miss, device)
            advance(sum(len(t.tokens) for r in rows for t in r))
    out_ll = torch.zeros(len(pairs), dtype=torch.float32)  # pieces of a long continuation add up
    out_miss = torch.zeros(len(pairs), dtype=torch.int64)
    idx = torch.tensor(req_uid, dtype=torch.long)
    out_ll.index_add_(0, torch.tensor(owner), ll[idx])
    out_miss.index_add_(0, torch.tensor(owner), n_miss[idx])
    return [Scored(float(out_ll[i]), bool(out_miss[i] == 0)) for i in range(len(pairs))]


def _score_batch(model: Transformer, rows: list[list[_Tree]], T: int, ll: torch.Tensor,
                 n_miss: torch.Tensor, device) -> None:
    B = len(rows)
    toks = np.zeros((B, T), dtype=np.int64)
    pos = np.zeros((B, T), dtype=np.int64)
    end = np.tile(np.arange(1, T + 1, dtype=np.int64), (B, 1))  # padding sees itself only
    tgt_node, tgt_ids, tgt_uid = [], [], []
    for r, row in enumerate(rows):
        off = 0
        for tree in row:
            n = len(tree.tokens)
            toks[r, off:off + n] = tree.tokens
            pos[r, off:off + n] = tree.depth
            end[r, off:off + n] = np.asarray(tree.end) + off
            base = r * T + off
            for node, t, uid in tree.targets:
                tgt_node.append(base + node)
                tgt_ids.append(t)
                tgt_uid.append(uid)
            off += n
    sel, inverse = torch.unique(torch.tensor(tgt_node), return_inverse=True)
    tokens, positions = torch.from_numpy(toks).to(device), torch.from_numpy(pos).to(device)
    if isinstance(model, Transformer):
        e = torch.from_numpy(end)
        ar = torch.arange(T)
        mask = (ar[None, None, :] <= ar[None, :, None]) & (ar[None, :, None] < e[:, None, :])  # (B, T, T)
        h = forward_selected(model, tokens, positions, mask[:, None].to(device), sel.to(device))
    else:  # chains only: each tree is a document of the packed row (its own causal attention)
        doc = torch.from_numpy(_doc_ids(end)).to(device)
        h = model.hidden_states(tokens, positions, doc).reshape(B * T, -1)[sel.to(device)]
    lp = torch.log_softmax(model.lm_head(h).float(), dim=-1).cpu()  # one row per distinct position
    tgt = torch.tensor(tgt_ids)
    tok_lp = lp[inverse, tgt]
    miss = (lp.argmax(dim=-1)[inverse] != tgt).long()
    uid = torch.tensor(tgt_uid)
    ll.index_add_(0, uid, tok_lp)
    n_miss.index_add_(0, uid, miss)


def _doc_ids(end: np.ndarray) -> np.ndarray:
    """A document id per position of rows of chains: a new one wherever a chain (or padding) starts."""
    B, T = end.shape
    starts = np.ones((B, T), dtype=bool)
    # In a chain, position t+1 continues position t exactly when t's subtree reaches past t+1.
    starts[:, 1:] = end[:, :-1] <= np.arange(1, T)[None, :]
    return np.cumsum(starts, axis=1)


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
    rows_per_draw = max(1, (1 << 16) // n)  # ~64k draws at a time stay in cache

    def resample(i: int) -> np.ndarray:
        rs = np.random.RandomState([i])
        out, done = [], 0
        while done < chunk:
            m = min(rows_per_draw, chunk - done)
            u = rs.random_sample((m, n))
            u *= n
            out.append(np.exp(-(np.take(xs, u.astype(np.intp)).sum(axis=1) / n)))  # u ≥ 0: trunc is floor
            done += m
        return np.concatenate(out)

    # Drawing the numbers is most of the time and NumPy releases the GIL while it draws: chunks run
    # on threads, and come back in order.
    with ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 1)) as pool:
        res = list(pool.map(resample, range(iters // chunk)))
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
