"""Many generation requests on one model: a scheduler thread, continuous batching, backends.

What is notable:
- `BatchScheduler` (native engine): continuous batching over a slotted KV cache. New requests are
  prefilled together (right-padded, plain causal attention: a padded key is never seen by a real
  query) and then join the running batch; every decode step advances all active rows with one
  forward pass; a finished or cancelled row leaves at once and the last row moves into its slot,
  so the active rows are always slots 0..n-1 (views, not gathers). Each row has its own sampling
  settings, seed generator, stop strings (`engine.TextStream`) and token budget.
- `QueueScheduler` (any backend): first come, first served, one request at a time, through a
  backend's `stream` function. It is the fair-queue baseline that `benchmarks/bench_serve.py`
  measures the batched scheduler against, and what the llama.cpp backend uses.
- Requests deliver events to a sink callable (pieces of text, then one `engine.Completion`, or an
  exception); `SyncHandle` turns that into an iterator, `serve.py` into an asyncio queue.
  `Request.cancel()` stops generation at the next step (client disconnects do this).
- `open_backend(run, "native" | "llama.cpp")` is the one place that knows the backends. The
  llama.cpp one needs `luca.engine_llamacpp` to offer `load(run_dir)` and
  `stream(handle, tok, prompt_ids, sampling, stop_ids)` with `engine.stream`'s contract.
- Sits between `engine.py` (floor 3) and its consumers `serve.py` / `api.py`.
"""
from __future__ import annotations

import queue
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import torch

from luca.engine import Completion, SamplingConfig, TextStream, sample_next
from luca.errors import LucaError
from luca.model import Transformer, rope_cos_sin
from luca.tokenizer import Tokenizer

Sink = Callable[[Any], None]


class Request:
    """One generation request: prompt ids, sampling, and where its events go."""

    def __init__(self, prompt_ids: list[int], sampling: SamplingConfig, stop_ids: set[int], sink: Sink):
        self.prompt_ids, self.sampling, self.stop_ids, self.sink = list(prompt_ids), sampling, stop_ids, sink
        self.cancelled = threading.Event()
        self.submitted = time.perf_counter()

    def cancel(self) -> None:
        self.cancelled.set()


class SyncHandle:
    """Iterate a request's events from ordinary (non-async) code: text pieces, then a Completion."""

    def __init__(self):
        self.q: queue.Queue = queue.Queue()
        self.request: Request | None = None

    def sink(self, ev: Any) -> None:
        self.q.put(ev)

    def __iter__(self) -> Iterator[str | Completion]:
        try:
            while True:
                ev = self.q.get()
                if isinstance(ev, BaseException):
                    raise ev
                yield ev
                if isinstance(ev, Completion):
                    return
        finally:  # the consumer stopped early (break, exception): stop generating
            if self.request is not None:
                self.request.cancel()


class _Scheduler:
    """A worker thread fed by a list of pending requests."""

    name = "base"

    def __init__(self):
        self._pending: deque[Request] = deque()
        self._cv = threading.Condition()
        self._closed = False
        self.counters = {"requests": 0, "cancelled": 0, "completion_tokens": 0, "prompt_tokens": 0, "peak_active": 0}
        self._thread = threading.Thread(target=self._loop, name=f"luca-{self.name}", daemon=True)
        self._thread.start()

    def submit(self, prompt_ids: list[int], sampling: SamplingConfig, stop_ids: set[int], sink: Sink) -> Request:
        r = Request(prompt_ids, sampling, stop_ids, sink)
        with self._cv:
            if self._closed:
                raise RuntimeError("scheduler is closed")
            self._pending.append(r)
            self._cv.notify()
        return r

    def stream(self, prompt_ids: list[int], sampling: SamplingConfig, stop_ids: set[int]) -> SyncHandle:
        h = SyncHandle()
        h.request = self.submit(prompt_ids, sampling, stop_ids, h.sink)
        return h

    def close(self) -> None:
        with self._cv:
            self._closed = True
            self._cv.notify()
        self._thread.join(timeout=10)

    def stats(self) -> dict:
        return {"scheduler": self.name, "waiting": len(self._pending), **self.counters}

    def _next_pending(self, block: bool) -> Request | None:
        with self._cv:
            while block and not self._pending and not self._closed:
                self._cv.wait()
            return self._pending.popleft() if self._pending else None

    def _loop(self) -> None:
        raise NotImplementedError

    def _account(self, r: Request, c: Completion) -> None:
        self.counters["requests"] += 1
        self.counters["cancelled"] += c.finish_reason == "cancelled"
        self.counters["prompt_tokens"] += c.prompt_tokens
        self.counters["completion_tokens"] += c.completion_tokens


def _emit(r: Request, ev: Any) -> None:
    try:
        r.sink(ev)
    except Exception:  # the consumer is gone (closed event loop): nothing more to send
        r.cancel()


# -- fair queue (any backend) -------------------------------------------------------------------
class QueueScheduler(_Scheduler):
    """FIFO, one request at a time, through `stream_fn(prompt_ids, sampling, stop_ids)`."""

    name = "queue"

    def __init__(self, stream_fn: Callable[[list[int], SamplingConfig, set[int]], Iterator[str | Completion]]):
        self.stream_fn = stream_fn
        super().__init__()

    def _loop(self) -> None:
        while True:
            r = self._next_pending(block=True)
            if r is None:
                return  # closed
            if r.cancelled.is_set():
                continue
            gen = self.stream_fn(r.prompt_ids, r.sampling, r.stop_ids)
            try:
                self.counters["peak_active"] = 1
                for ev in gen:
                    if r.cancelled.is_set():
                        self.counters["cancelled"] += 1
                        break
                    if isinstance(ev, Completion):
                        self._account(r, ev)
                    _emit(r, ev)
            except Exception as e:  # a bad request must not take the worker down
                _emit(r, e)
            finally:
                gen.close()


# -- continuous batching (native engine) --------------------------------------------------------
class SlotCache:
    """Keys and values per slot: (n_layers, slots, n_kv_heads, length, head_dim), grown on demand.

    Duck-types `model.KVCache` for `Attention.forward`: before each forward the scheduler says
    which rows are computed (`prefill(start, m, T)` or `decode(n, lens)`), and `update` writes the
    new keys there and returns the keys those rows attend over.
    """

    def __init__(self, cfg, device, dtype, slots: int = 4, length: int = 128):
        self.cfg, self.device, self.dtype = cfg, device, dtype
        self.max_len = cfg.max_seq_len
        self.k = self.v = None
        self._alloc(slots, min(length, self.max_len))
        self.pos = 0  # unused: every row has its own length
        self._mode: tuple = ()

    def _alloc(self, slots: int, length: int) -> None:
        c = self.cfg
        shape = (c.n_layers, slots, c.n_kv_heads, length, c.head_dim)
        k = torch.zeros(shape, device=self.device, dtype=self.dtype)
        v = torch.zeros(shape, device=self.device, dtype=self.dtype)
        if self.k is not None:
            s, L = self.k.shape[1], self.k.shape[3]
            k[:, :s, :, :L] = self.k
            v[:, :s, :, :L] = self.v
        self.k, self.v = k, v

    def ensure(self, slots: int, length: int) -> None:
        s, L = self.k.shape[1], self.k.shape[3]
        if slots <= s and length <= L:
            return
        while s < slots:
            s *= 2
        while L < length:
            L = min(2 * L, self.max_len)
        self._alloc(s, L)

    def move(self, src: int, dst: int) -> None:
        self.k[:, dst] = self.k[:, src]
        self.v[:, dst] = self.v[:, src]

    def prefill(self, start: int, m: int, T: int) -> None:
        self._mode = ("prefill", start, m, T)

    def decode(self, n: int, lens: torch.Tensor, kv_len: int) -> None:
        self._mode = ("decode", n, lens, kv_len, torch.arange(n, device=self.device))

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        if self._mode[0] == "prefill":
            _, a, m, T = self._mode
            self.k[layer, a:a + m, :, :T] = k
            self.v[layer, a:a + m, :, :T] = v
            return self.k[layer, a:a + m, :, :T], self.v[layer, a:a + m, :, :T]
        _, n, lens, kv_len, rows = self._mode
        self.k[layer, :n][rows, :, lens] = k[:, :, 0]
        self.v[layer, :n][rows, :, lens] = v[:, :, 0]
        return self.k[layer, :n, :, :kv_len], self.v[layer, :n, :, :kv_len]


@dataclass
class _Row:
    req: Request
    ts: TextStream
    gen: torch.Generator | None
    length: int  # tokens in the cache
    last: int = -1  # the sampled id still to be fed
    n: int = 0  # completion tokens
    pieces: list = field(default_factory=list)
    history: list = field(default_factory=list)
    t0: float = 0.0


class BatchScheduler(_Scheduler):
    """Continuous batching of up to `max_batch` requests on a native `Transformer`."""

    name = "batch"

    def __init__(self, model: Transformer, tok: Tokenizer, max_batch: int = 16, prefill_tokens: int = 2048):
        self.model, self.tok = model, tok
        self.max_batch, self.prefill_tokens = max_batch, prefill_tokens
        p = next(model.parameters())
        self.device = p.device
        self.cache = SlotCache(model.cfg, p.device, p.dtype)
        self.rows: list[_Row] = []
        super().__init__()

    def stats(self) -> dict:
        return {**super().stats(), "active": len(self.rows), "max_batch": self.max_batch}

    def submit(self, prompt_ids: list[int], sampling: SamplingConfig, stop_ids: set[int], sink: Sink) -> Request:
        ctx = self.model.cfg.max_seq_len
        if not prompt_ids:
            raise ValueError("empty prompt")
        if len(prompt_ids) + sampling.max_new_tokens > ctx:
            raise ValueError(f"prompt ({len(prompt_ids)} tokens) + max_new_tokens ({sampling.max_new_tokens}) "
                             f"exceeds the context ({ctx})")
        return super().submit(prompt_ids, sampling, stop_ids, sink)

    def _loop(self) -> None:
        torch.set_grad_enabled(False)
        while True:
            with self._cv:
                while not self.rows and not self._pending and not self._closed:
                    self._cv.wait()
                if self._closed:
                    for r in [row.req for row in self.rows] + list(self._pending):
                        _emit(r, RuntimeError("server shutting down"))
                    return
                new = self._admit()
            try:
                with torch.inference_mode():
                    if new:
                        self._prefill(new)
                    self._drop_cancelled()
                    if self.rows:
                        self._decode()
            except Exception as e:  # fail the requests in flight, keep serving the next ones
                for row in self.rows + [x for x in new if x not in self.rows]:
                    _emit(row.req, e)
                self.rows = []

    def _admit(self) -> list[_Row]:
        """Pending requests that join now (called with the lock held)."""
        out, longest = [], 0
        while self._pending and len(self.rows) + len(out) < self.max_batch:
            r = self._pending[0]
            if r.cancelled.is_set():
                self._pending.popleft()
                continue
            L = max(longest, len(r.prompt_ids))
            if out and L * (len(out) + 1) > self.prefill_tokens:
                break
            self._pending.popleft()
            try:
                gen = torch.Generator(device=self.device).manual_seed(r.sampling.seed) \
                    if r.sampling.seed is not None else None
            except (RuntimeError, ValueError, OverflowError) as e:  # fail this request, not the worker
                _emit(r, ValueError(f"seed: {e}"))
                continue
            longest = L
            out.append(_Row(r, TextStream(self.tok, r.sampling.stop), gen, len(r.prompt_ids),
                            history=list(r.prompt_ids), t0=time.perf_counter()))
        return out

    def _forward(self, toks: torch.Tensor, pos: torch.Tensor, mask, last: torch.Tensor) -> torch.Tensor:
        m = self.model
        x = m.model.embed_tokens(toks)
        cos, sin = rope_cos_sin(pos, m.cfg.head_dim, m.cfg.rope_theta, x.dtype)
        for block in m.model.layers:
            x = block(x, cos, sin, mask, self.cache)
        x = x[torch.arange(x.shape[0], device=x.device), last]  # each row's last real position
        return m.lm_head(m.model.norm(x))

    def _prefill(self, new: list[_Row]) -> None:
        for row in new:
            if row.req.sampling.max_new_tokens == 0:
                self._finish(row, "length", active=False)
        new = [r for r in new if r.req.sampling.max_new_tokens > 0]
        if not new:
            return
        a, m = len(self.rows), len(new)
        T = max(r.length for r in new)
        self.cache.ensure(a + m, max(r.length + 1 for r in new))
        toks = torch.zeros(m, T, dtype=torch.long)
        for i, r in enumerate(new):  # right padding: causal attention keeps pads out of real rows
            toks[i, :r.length] = torch.tensor(r.req.prompt_ids)
        toks = toks.to(self.device)
        pos = torch.arange(T, device=self.device).expand(m, T)
        last = torch.tensor([r.length - 1 for r in new], device=self.device)
        self.cache.prefill(a, m, T)
        logits = self._forward(toks, pos, None, last)
        self.rows.extend(new)
        self.counters["peak_active"] = max(self.counters["peak_active"], len(self.rows))
        self._advance(logits, first=a)

    def _decode(self) -> None:
        n = len(self.rows)
        lens = torch.tensor([r.length for r in self.rows], device=self.device)
        kv_len = int(lens.max()) + 1
        self.cache.ensure(n, kv_len)
        toks = torch.tensor([[r.last] for r in self.rows], device=self.device)
        mask = None
        if int(lens.min()) + 1 != kv_len:  # rows of unequal length: hide each row's stale tail
            mask = (torch.arange(kv_len, device=self.device)[None] <= lens[:, None])[:, None, None]
        self.cache.decode(n, lens, kv_len)
        logits = self._forward(toks, lens[:, None], mask, torch.zeros(n, dtype=torch.long, device=self.device))
        for r in self.rows:
            r.length += 1
        self._advance(logits, first=0)

    def _advance(self, logits: torch.Tensor, first: int) -> None:
        """Sample the next id of rows[first:] from `logits` and stream it; finish the rows that end."""
        done = []
        greedy = None  # one argmax for all plain greedy rows
        for i, row in enumerate(self.rows[first:], start=first):
            s = row.req.sampling
            prev = torch.tensor([row.history], device=self.device) if s.repetition_penalty != 1.0 else None
            if s.temperature == 0 and prev is None:
                if greedy is None:
                    greedy = logits.float().argmax(-1).tolist()
                t = greedy[i - first]
            else:
                t = int(sample_next(logits[i - first:i - first + 1], prev, s, row.gen)[0])
            if t in row.req.stop_ids:
                done.append((i, "stop"))
                continue
            row.n += 1
            row.last = t
            if prev is not None:
                row.history.append(t)
            piece = row.ts.push(t)
            if piece:
                row.pieces.append(piece)
                _emit(row.req, piece)
            if row.ts.stopped:
                done.append((i, "stop"))
            elif row.n >= s.max_new_tokens:
                done.append((i, "length"))
        for i, reason in reversed(done):  # from the back so earlier indices stay valid
            self._finish(self.rows[i], reason, index=i)

    def _drop_cancelled(self) -> None:
        for i in reversed(range(len(self.rows))):
            if self.rows[i].req.cancelled.is_set():
                self._finish(self.rows[i], "cancelled", index=i)

    def _finish(self, row: _Row, reason: str, index: int | None = None, active: bool = True) -> None:
        if reason != "cancelled":
            tail = row.ts.flush()
            if tail:
                row.pieces.append(tail)
                _emit(row.req, tail)
        c = Completion("".join(row.pieces), len(row.req.prompt_ids), row.n, reason, time.perf_counter() - row.t0)
        self._account(row.req, c)
        _emit(row.req, c)
        if active and index is not None:
            last = len(self.rows) - 1
            if index != last:  # keep active rows contiguous: the last one takes the freed slot
                self.cache.move(last, index)
                self.rows[index] = self.rows[last]
            self.rows.pop()


# -- backends ----------------------------------------------------------------------------------
@dataclass
class Backend:
    """What serving needs from an engine: a tokenizer, a context length and a way to generate."""

    name: str
    tok: Tokenizer
    context_length: int
    stream_fn: Callable[[list[int], SamplingConfig, set[int]], Iterator[str | Completion]]
    model: Transformer | None = None  # native only: batching and log-likelihoods

    def scheduler(self, kind: str | None = None, max_batch: int = 16) -> _Scheduler:
        """"batch" (continuous batching, native only; the default there) or "queue" (FIFO, one at a time)."""
        kind = kind or ("batch" if self.model is not None else "queue")
        if kind not in ("batch", "queue"):
            raise LucaError(f"--scheduler: unknown scheduler {kind!r} (batch, queue)")
        if self.model is None:
            if kind == "batch":
                raise LucaError(f"--scheduler batch: the {self.name} backend has no batched decoding; use queue")
            return QueueScheduler(self.stream_fn)
        # The native queue is the batch scheduler admitting one request at a time: the same
        # kernels, so comparing the two measures the scheduling policy and nothing else.
        sch = BatchScheduler(self.model, self.tok, max_batch=max_batch if kind == "batch" else 1)
        sch.name = kind
        return sch


BACKENDS = ("native", "llama.cpp")


def open_backend(run_dir: str, backend: str = "native", threads: int | None = None,
                 gguf: str | None = None, say: Callable[[str], None] | None = None) -> Backend:
    """Load a run directory for generation with the named engine (`gguf`: llama.cpp's file type)."""
    from luca import rundir
    if threads:
        torch.set_num_threads(threads)
    if backend == "native":
        from luca import engine
        model = rundir.load_model(run_dir)
        tok = rundir.load_tokenizer(run_dir)
        return Backend("native", tok, model.cfg.max_seq_len,
                       lambda ids, s, stop: engine.stream(model, tok, ids, s, stop), model)
    if backend == "llama.cpp":
        try:
            from luca import engine_llamacpp as L
        except ImportError as e:
            raise LucaError(f"--backend llama.cpp: the llama.cpp engine is not available ({e})") from None
        tok = rundir.load_tokenizer(run_dir)
        handle = L.load(run_dir, gguf, threads=threads, say=say)
        trained = rundir.load_model_config(run_dir).max_seq_len
        ctx = min(int(getattr(handle, "context_length", None) or trained), trained)  # llama.cpp rounds n_ctx up
        return Backend("llama.cpp", tok, ctx, lambda ids, s, stop: L.stream(handle, tok, ids, s, stop))
    raise LucaError(f"--backend: unknown backend {backend!r} (choose from {', '.join(BACKENDS)})")
