"""The llama.cpp backend (llama-cpp-python): GGUF files decoded with luca's sampling and streaming.

What is notable:
- Ids go in, logits come out: sampling is luca's own `sample_next` on llama.cpp's last-position
  logits, so every `SamplingConfig` option (temperature, top-k, top-p, repetition penalty, seed,
  stop ids and strings, max tokens) means exactly what it means for the native engine, and
  `stream`/`complete` work unchanged (`engine.stream(LlamaCppEngine(...), tok, ids, s)`).
- Tokenization stays luca's: the GGUF carries the same vocabulary, merges and pre-tokenizer, and the
  tests check that llama.cpp's own tokenizer gives the same ids.
- One sequence at a time (llama-cpp-python's `Llama` holds one); a batch of prompts runs prompt
  after prompt behind the same per-step `generate_ids` contract.
- `logits_all=True` keeps every position's logits (`all_logits`), for perplexity / BPB.
"""
from __future__ import annotations

import atexit
import os
import weakref
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from luca.engine import SamplingConfig, sample_next
from luca.errors import LucaError


def _llama_cpp():
    try:
        import llama_cpp
    except ImportError:
        raise LucaError("the llama.cpp backend needs llama-cpp-python: pip install 'luca[llamacpp]'") from None
    return llama_cpp


def gguf_context_length(path: str | Path) -> int:
    import gguf
    try:
        r = gguf.GGUFReader(str(path))
        arch = r.fields["general.architecture"].contents()
        return int(r.fields[f"{arch}.context_length"].contents())
    except (ValueError, KeyError, OSError) as e:
        raise LucaError(f"{path}: not a readable GGUF model file ({e})") from None


def _close(ref) -> None:
    llm = ref()
    if llm is not None:
        llm.close()


class LlamaCppEngine:
    """A GGUF model in llama.cpp, with the native engine's `generate_ids` / `logits` interface."""

    def __init__(self, path: str | Path, n_ctx: int | None = None, n_threads: int | None = None,
                 n_batch: int = 512, use_mmap: bool = True, logits_all: bool = False, verbose: bool = False):
        llama_cpp = _llama_cpp()
        self.path = Path(path)
        if not self.path.is_file():
            raise LucaError(f"{self.path}: no such GGUF file")
        if n_ctx is None:  # the model's context, capped: the KV cache is allocated up front
            n_ctx = min(gguf_context_length(self.path), 4096)
        n_threads = n_threads or os.cpu_count() or 1
        if not verbose:  # llama-cpp-python's log callback: errors only, also while loading
            from llama_cpp._logger import set_verbose
            set_verbose(False)
        from luca.export import _quiet_stderr
        with _quiet_stderr() as log:  # llama.cpp's C-side chatter; shown only if loading fails
            try:
                self.llm = llama_cpp.Llama(model_path=str(self.path), n_ctx=n_ctx, n_batch=min(n_batch, n_ctx),
                                           n_ubatch=min(n_batch, n_ctx), n_threads=n_threads,
                                           n_threads_batch=n_threads, logits_all=logits_all, use_mmap=use_mmap,
                                           verbose=verbose)
            except ValueError as e:
                err = e
            else:
                err = None
        tail = log.read_text(errors="replace")[-2000:]
        log.unlink(missing_ok=True)
        if err is not None:
            raise LucaError(f"{self.path}: llama.cpp cannot load it ({err}):\n{tail}")
        self._lib = llama_cpp
        self.n_vocab = self.llm.n_vocab()
        self.n_ctx = self.llm.n_ctx()
        self.logits_all = logits_all
        # Free the model before interpreter teardown (llama-cpp-python's __del__ fails late).
        atexit.register(_close, weakref.ref(self.llm))

    def close(self) -> None:
        self.llm.close()

    def tokenize(self, text: str, special: bool = False) -> list[int]:
        """llama.cpp's own tokenization (no BOS added)."""
        return self.llm.tokenize(text.encode("utf-8"), add_bos=False, special=special)

    def _eval(self, ids: list[int]) -> torch.Tensor:
        self.llm.eval(ids)
        ptr = self._lib.llama_get_logits_ith(self.llm.ctx, -1)
        return torch.from_numpy(np.ctypeslib.as_array(ptr, shape=(self.n_vocab,)).copy())

    def logits(self, prompts: list[list[int]]) -> torch.Tensor:
        """Next-token logits (B, V) after each prompt."""
        out = []
        for p in prompts:
            self._check(p, 0)
            self.llm.reset()
            out.append(self._eval(p))
        return torch.stack(out)

    def all_logits(self, ids: list[int]) -> np.ndarray:
        """Logits (T, V) at every position of `ids` (needs `logits_all=True`)."""
        if not self.logits_all:
            raise ValueError("all_logits needs LlamaCppEngine(..., logits_all=True)")
        self._check(ids, 0)
        self.llm.reset()
        self.llm.eval(ids)
        return np.array(self.llm.scores[:len(ids)], dtype=np.float32)

    def _check(self, prompt: list[int], extra: int) -> None:
        if not prompt:
            raise ValueError("empty prompt")
        if len(prompt) + extra > self.n_ctx:
            raise ValueError(f"prompt ({len(prompt)} tokens) + max_new_tokens ({extra}) exceeds the llama.cpp "
                             f"context ({self.n_ctx})")

    def generate_ids(self, prompts: list[list[int]], s: SamplingConfig,
                     stop_ids: set[int] | None = None) -> Iterator[list[int | None]]:
        """Yield, per step, the new id of each prompt (None once that prompt has stopped)."""
        for p in prompts:
            self._check(p, s.max_new_tokens)
        if len(prompts) == 1:
            yield from self._one(prompts[0], s, stop_ids)
            return
        runs = [[step[0] for step in self._one(p, s, stop_ids)] for p in prompts]
        for t in range(max((len(r) for r in runs), default=0)):
            yield [r[t] if t < len(r) else None for r in runs]

    def _one(self, prompt: list[int], s: SamplingConfig, stop_ids: set[int] | None) -> Iterator[list[int | None]]:
        if s.max_new_tokens == 0:
            return
        stop = set(stop_ids or ())
        gen = torch.Generator().manual_seed(s.seed) if s.seed is not None else None
        penalty = s.repetition_penalty != 1.0
        self.llm.reset()
        logits = self._eval(list(prompt))
        hist = list(prompt)
        for t in range(s.max_new_tokens):
            prev = torch.tensor([hist]) if penalty else None
            nxt = int(sample_next(logits[None], prev, s, gen)[0])
            if nxt in stop:
                yield [None]
                return
            yield [nxt]
            if t == s.max_new_tokens - 1:
                return
            hist.append(nxt)
            logits = self._eval([nxt])


# -- the backend interface the scheduler and the CLI use ----------------------------------------------
PREFERRED = ("q4_k_m", "q8_0", "f16")


def ensure_gguf(run_dir: str | Path, qtype: str | None = None, say=None) -> Path:
    """The run's GGUF of `qtype` (None: the first existing of q4_k_m, q8_0, f16, else q4_k_m),
    exported now if missing or older than the weights."""
    from luca import export, rundir
    run_dir = rundir.require_run_dir(run_dir)
    if qtype is None:
        qtype = next((t for t in PREFERRED if export.gguf_path(run_dir, t).is_file()), PREFERRED[0])
    qtype = export.parse_types(qtype)[0]
    path = export.gguf_path(run_dir, qtype)
    weights = [p for p in Path(run_dir).glob("*.safetensors")]
    newest = max((p.stat().st_mtime for p in weights), default=0.0)
    if not path.is_file() or path.stat().st_mtime < newest:
        if say:
            say(f"exporting {path.name} for llama.cpp ...")
        export.export_gguf(run_dir, [qtype], progress=False, say=say)
    return path


def load(run_dir: str | Path, qtype: str | None = None, n_ctx: int | None = None, threads: int | None = None,
         say=None) -> LlamaCppEngine:
    """A llama.cpp engine for a run directory (its GGUF exported on demand)."""
    eng = LlamaCppEngine(ensure_gguf(run_dir, qtype, say), n_ctx=n_ctx, n_threads=threads)
    eng.context_length = eng.n_ctx
    return eng


def stream(handle: LlamaCppEngine, tok, prompt_ids: list[int], s: SamplingConfig, stop_ids: set[int] | None = None):
    """`engine.stream` on a llama.cpp engine (text pieces, then a `Completion`)."""
    from luca import engine
    return engine.stream(handle, tok, prompt_ids, s, stop_ids)
