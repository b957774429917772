"""Generation with the native PyTorch engine: KV cache, sampling, streaming, stop strings.

What is notable:
- One preallocated KV cache per call; prompts of a batch are left-padded and masked, so
  several prompts decode together.
- Sampling is fused into a few tensor ops per step (repetition penalty, temperature, top-k,
  top-p) under `torch.inference_mode`; a seed makes it reproducible.
- Streaming yields text pieces only once they are complete UTF-8, and holds back any tail that
  could still become a stop string, so a stop string never leaks to the caller.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Iterator

import torch

from luca.model import KVCache, Transformer
from luca.tokenizer import Tokenizer


@dataclass
class SamplingConfig:
    max_new_tokens: int = 128
    temperature: float = 0.8  # 0 = greedy
    top_k: int = 50  # 0 = off
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    stop: list[str] = field(default_factory=list)
    seed: int | None = None

    def __post_init__(self) -> None:
        if self.max_new_tokens < 0:
            raise ValueError("max_new_tokens must be ≥ 0")
        if self.temperature < 0:
            raise ValueError("temperature must be ≥ 0")
        if not 0 < self.top_p <= 1:
            raise ValueError("top_p must be in (0, 1]")
        if self.repetition_penalty <= 0:
            raise ValueError("repetition_penalty must be > 0")


def sample_next(logits: torch.Tensor, prev: torch.Tensor | None, s: SamplingConfig,
                gen: torch.Generator | None) -> torch.Tensor:
    """Next ids (B,) from last-position logits (B, V); `prev` (B, T) are ids seen so far (or None)."""
    logits = logits.float()
    if s.repetition_penalty != 1.0 and prev is not None and prev.numel():
        seen = torch.gather(logits, 1, prev)
        seen = torch.where(seen > 0, seen / s.repetition_penalty, seen * s.repetition_penalty)
        logits = logits.scatter(1, prev, seen)
    if s.temperature == 0:
        return logits.argmax(-1)
    logits = logits / s.temperature
    if s.top_k > 0 and s.top_k < logits.shape[-1]:
        kth = torch.topk(logits, s.top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if s.top_p < 1.0:
        sorted_logits, idx = torch.sort(logits, descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop = cum - sorted_logits.softmax(-1) > s.top_p  # keep the smallest set reaching top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(1, idx, sorted_logits)
    probs = logits.softmax(-1)
    return torch.multinomial(probs, 1, generator=gen).squeeze(1)


@torch.inference_mode()
def generate_ids(model: Transformer, prompts: list[list[int]], s: SamplingConfig,
                 stop_ids: set[int] | None = None) -> Iterator[list[int | None]]:
    """Yield, per step, the new id of each prompt (None once that prompt has stopped)."""
    device = next(model.parameters()).device
    B = len(prompts)
    lens = [len(p) for p in prompts]
    if min(lens) == 0:
        raise ValueError("empty prompt")
    T0 = max(lens)
    total = T0 + s.max_new_tokens
    if total > model.cfg.max_seq_len:
        raise ValueError(f"prompt ({T0} tokens) + max_new_tokens ({s.max_new_tokens}) exceeds the context "
                         f"({model.cfg.max_seq_len})")
    gen = None
    if s.seed is not None:
        gen = torch.Generator(device=device).manual_seed(s.seed)
    dtype = next(model.parameters()).dtype
    cache = KVCache(model.cfg, B, total, device=device, dtype=dtype)
    toks = torch.zeros(B, T0, dtype=torch.long, device=device)
    valid = torch.zeros(B, total, dtype=torch.bool, device=device)
    for b, p in enumerate(prompts):  # left padding
        toks[b, T0 - len(p):] = torch.tensor(p, device=device)
        valid[b, T0 - len(p):T0] = True
    pos = (valid[:, :T0].long().cumsum(-1) - 1).clamp(min=0)
    padded = min(lens) != T0
    mask = None
    if padded:
        causal = torch.ones(T0, T0, dtype=torch.bool, device=device).tril()
        mask = (causal[None] & valid[:, None, :T0])[:, None]
        mask |= torch.eye(T0, dtype=torch.bool, device=device)[None, None]  # pad rows attend to themselves
    logits = _forward(model, toks, pos, cache, mask)
    history = toks
    done = torch.zeros(B, dtype=torch.bool, device=device)
    stop_t = torch.tensor(sorted(stop_ids or []), dtype=torch.long, device=device)
    next_pos = pos[:, -1] + 1
    for t in range(s.max_new_tokens):
        nxt = sample_next(logits[:, -1], history if s.repetition_penalty != 1.0 else None, s, gen)
        is_stop = torch.isin(nxt, stop_t) if stop_t.numel() else torch.zeros_like(done)
        out = [None if (done[b] or is_stop[b]) else int(nxt[b]) for b in range(B)]
        done |= is_stop
        yield out
        if bool(done.all()) or t == s.max_new_tokens - 1:
            return
        valid[:, T0 + t] = True
        mask = valid[:, None, None, :T0 + t + 1] if padded else None
        history = torch.cat([history, nxt[:, None]], 1) if s.repetition_penalty != 1.0 else history
        logits = _forward(model, nxt[:, None], next_pos[:, None], cache, mask)
        next_pos = next_pos + 1


def _forward(model, toks, pos, cache, mask):
    if mask is None:
        return model(toks, positions=pos, cache=cache)
    return model_forward_masked(model, toks, pos, cache, mask)


def model_forward_masked(model: Transformer, toks, pos, cache, mask):
    """Forward with an explicit attention mask (B, 1, Tq, Tk), for left-padded batches."""
    from luca.model import rope_cos_sin
    x = model.model.embed_tokens(toks)
    cos, sin = rope_cos_sin(pos, model.cfg.head_dim, model.cfg.rope_theta, x.dtype)
    for block in model.model.layers:
        x = block(x, cos, sin, mask, cache)
    cache.pos += toks.shape[1]
    return model.lm_head(model.model.norm(x))


class TextStream:
    """Turns ids into text pieces: whole UTF-8 only, stop strings cut and never emitted."""

    def __init__(self, tok: Tokenizer, stop: list[str]):
        self.tok, self.stop = tok, [x for x in stop if x]
        self.buf = b""
        self.text = ""  # decoded, not yet emitted (may hold a stop-string prefix)
        self.stopped = False

    def push(self, token_id: int) -> str:
        if self.stopped:
            return ""
        self.buf += self.tok.token_bytes(token_id)
        try:
            self.text += self.buf.decode("utf-8")
            self.buf = b""
        except UnicodeDecodeError as e:
            if e.reason != "unexpected end of data":  # invalid bytes: emit with replacement now
                self.text += self.buf.decode("utf-8", errors="replace")
                self.buf = b""
            else:
                good = self.buf[:e.start]
                self.text += good.decode("utf-8")
                self.buf = self.buf[e.start:]
        return self._emit(final=False)

    def _emit(self, final: bool) -> str:
        for st in self.stop:
            i = self.text.find(st)
            if i >= 0:
                out, self.text, self.stopped = self.text[:i], "", True
                return out
        if final or not self.stop:
            out, self.text = self.text, ""
            return out
        hold = max((k for st in self.stop for k in range(1, len(st)) if self.text.endswith(st[:k])), default=0)
        cut = len(self.text) - hold
        out, self.text = self.text[:cut], self.text[cut:]
        return out

    def flush(self) -> str:
        if self.stopped:
            return ""
        if self.buf:
            self.text += self.buf.decode("utf-8", errors="replace")
            self.buf = b""
        return self._emit(final=True)


@dataclass
class Completion:
    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str  # "stop" | "length"
    seconds: float = 0.0


def stream(model: Transformer, tok: Tokenizer, prompt_ids: list[int], s: SamplingConfig,
           stop_ids: set[int] | None = None) -> Iterator[str | Completion]:
    """Yield text pieces, then one final `Completion` (with the whole text and counts)."""
    stop_ids = {tok.eot_id, tok.im_end_id} if stop_ids is None else stop_ids
    ts = TextStream(tok, s.stop)
    pieces, n, reason = [], 0, "length"
    t0 = time.perf_counter()
    for step in generate_ids(model, [prompt_ids], s, stop_ids):
        t = step[0]
        if t is None:
            reason = "stop"
            break
        n += 1
        piece = ts.push(t)
        if piece:
            pieces.append(piece)
            yield piece
        if ts.stopped:
            reason = "stop"
            break
    tail = ts.flush()
    if tail:
        pieces.append(tail)
        yield tail
    yield Completion("".join(pieces), len(prompt_ids), n, reason, time.perf_counter() - t0)


def complete(model: Transformer, tok: Tokenizer, prompt_ids: list[int], s: SamplingConfig,
             stop_ids: set[int] | None = None) -> Completion:
    final = None
    for item in stream(model, tok, prompt_ids, s, stop_ids):
        if isinstance(item, Completion):
            final = item
    assert final is not None
    return final
