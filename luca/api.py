"""The Python API for using a trained model: `load`, `run_task`, `choose`, personas.

What is notable:
- `load(RUN)` returns a `Model` with `generate(prompt)`, `chat(messages)` and `stream(...)`, on
  the native engine or llama.cpp (`backend="llama.cpp"`); every prompt goes through
  `Tokenizer.encode` / `encode_chat`, so user text never becomes a control token, and the ids of
  the last prompt are kept in `Model.last_prompt_ids` for inspection.
- `run_task(task, input, model=RUN, mode=...)` is a recipe per mode — a system prompt that asks
  for a format, greedy decoding, and a post-processing step that extracts what a script wants:
  `reason` (step-by-step, returns the final `Answer:` line), `code` (code only, returns the
  first fenced block), `short` (one short line), `plain` (no recipe). `raw=True` returns the
  whole reply.
- `choose(question, options, model=RUN)` scores each option by its log-likelihood as the
  assistant's reply (no sampling, so a script gets a deterministic, scored decision).
- Models named by path are cached (two at most), so a script calling `run_task` in a loop loads once.
- Floor 5: imports the scheduler (backends), engine, tokenizer and run directory below it.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, fields
from functools import lru_cache
from pathlib import Path
from typing import Iterator

from luca.errors import LucaError

_SAMPLING_ALIASES = {"max_tokens": "max_new_tokens"}


class Model:
    """A loaded run directory, ready to generate."""

    def __init__(self, backend, id: str = ""):
        self.backend = backend
        self.tok = backend.tok
        self.name = backend.name  # the engine: native | llama.cpp
        self.id = id  # the run directory's name
        self.context_length = backend.context_length
        self.last_prompt_ids: list[int] = []
        self.last = None  # the last `engine.Completion` (counts, finish reason, seconds)

    def __repr__(self) -> str:
        return f"<luca.Model {self.id!r} ({self.name}) context={self.context_length}>"

    # -- sampling ---------------------------------------------------------------------------
    def sampling(self, prompt_len: int, **kw):
        """A SamplingConfig from keyword options; `max_new_tokens` defaults to what still fits."""
        from luca.engine import SamplingConfig
        names = {f.name for f in fields(SamplingConfig)}
        kw = {_SAMPLING_ALIASES.get(k, k): v for k, v in kw.items() if v is not None}
        unknown = set(kw) - names
        if unknown:
            raise LucaError(f"sampling: unknown option(s) {sorted(unknown)} (known: {sorted(names)})")
        room = self.context_length - prompt_len
        if room <= 0:
            raise LucaError(f"prompt: {prompt_len} tokens do not fit the model's context ({self.context_length})")
        if "max_new_tokens" in kw:
            if kw["max_new_tokens"] > room:
                raise LucaError(f"sampling: prompt ({prompt_len} tokens) + max_new_tokens ({kw['max_new_tokens']}) "
                                f"exceeds the model's context ({self.context_length})")
        else:
            kw["max_new_tokens"] = min(room, SamplingConfig.max_new_tokens)
        if isinstance(kw.get("stop"), str):
            kw["stop"] = [kw["stop"]]
        try:
            return SamplingConfig(**kw)
        except (TypeError, ValueError) as e:
            raise LucaError(f"sampling: {e}") from None

    # -- generation -------------------------------------------------------------------------
    def stream_ids(self, ids: list[int], **sampling) -> Iterator[str]:
        """Text pieces for prompt ids; afterwards `self.last` holds the Completion."""
        from luca.engine import Completion
        s = self.sampling(len(ids), **sampling)
        self.last_prompt_ids = list(ids)
        for ev in self.backend.stream_fn(ids, s, {i for i in (self.tok.eot_id, self.tok.im_end_id) if i is not None}):
            if isinstance(ev, Completion):
                self.last = ev
            else:
                yield ev

    def prompt_ids(self, prompt: str | None = None, messages: list[dict] | str | None = None,
                   system: str | None = None) -> list[int]:
        """Ids of a plain prompt, or of a chat (ChatML with the generation prompt)."""
        if (prompt is None) == (messages is None):
            raise LucaError("give either prompt= or messages=")
        if prompt is not None:
            return self.tok.encode(prompt) or [self.tok.eot_id]
        try:
            return self.tok.encode_chat(_messages(messages, system), add_generation_prompt=True)
        except ValueError as e:  # a foreign tokenizer without ChatML markers
            raise LucaError(f"chat: {e}") from None

    def stream(self, prompt: str | None = None, messages: list[dict] | str | None = None,
               system: str | None = None, **sampling) -> Iterator[str]:
        """Stream a continuation of `prompt`, or the assistant's reply to `messages`."""
        return self.stream_ids(self.prompt_ids(prompt, messages, system), **sampling)

    def generate(self, prompt: str, **sampling) -> str:
        """The continuation of a plain-text prompt."""
        return "".join(self.stream(prompt=prompt, **sampling))

    def chat(self, messages: list[dict] | str, system: str | None = None, **sampling) -> str:
        """The assistant's reply to a conversation (a string is one user message)."""
        return "".join(self.stream(messages=messages, system=system, **sampling))

    # -- scoring ----------------------------------------------------------------------------
    def loglikelihoods(self, context_ids: list[int], continuations: list[list[int]]) -> list[float]:
        """Sum of log p(continuation | context) for each continuation (native engine)."""
        import torch
        model = self.backend.model
        if model is None:
            raise LucaError(f"log-likelihoods need the native engine (this model runs on {self.name})")
        if any(not c for c in continuations):
            raise LucaError("choose: an option is empty")
        seqs = [context_ids + c for c in continuations]
        T = max(len(s) for s in seqs)
        if T > self.context_length:
            raise LucaError(f"choose: question + option ({T} tokens) exceed the model's context "
                            f"({self.context_length})")
        toks = torch.zeros(len(seqs), T, dtype=torch.long)
        for i, s in enumerate(seqs):  # right padding: causal attention never lets a real token see it
            toks[i, :len(s)] = torch.tensor(s)
        with torch.inference_mode():
            logp = model(toks.to(next(model.parameters()).device)).float().log_softmax(-1).cpu()
        out = []
        n = len(context_ids)
        for i, c in enumerate(continuations):
            pos = torch.arange(n - 1, n - 1 + len(c))
            out.append(float(logp[i, pos, torch.tensor(c)].sum()))
        return out


def _messages(messages: list[dict] | str, system: str | None) -> list[dict]:
    msgs = [{"role": "user", "content": messages}] if isinstance(messages, str) else [dict(m) for m in messages]
    for m in msgs:
        if m.get("role") not in ("system", "user", "assistant") or not isinstance(m.get("content"), str):
            raise LucaError(f"messages: each message needs role system|user|assistant and string content, got {m!r}")
    if system is not None:
        msgs = [m for m in msgs if m["role"] != "system"]
        msgs.insert(0, {"role": "system", "content": system})
    return msgs


def load(run_dir: str | Path, backend: str = "native", threads: int | None = None, gguf: str | None = None) -> Model:
    """Load a run directory for generation (`backend` is "native" or "llama.cpp"; `gguf` picks
    llama.cpp's file type, e.g. "q4_k_m", exported on demand)."""
    from luca.scheduler import open_backend
    return Model(open_backend(str(run_dir), backend, threads=threads, gguf=gguf), Path(run_dir).resolve().name)


@lru_cache(maxsize=2)
def _cached(path: str, backend: str, stamp: float) -> Model:
    return load(path, backend)


def _model(model: Model | str | Path, backend: str = "native") -> Model:
    if isinstance(model, Model):
        return model
    if model is None:
        raise LucaError("model=: give a run directory or a luca.Model")
    p = Path(model).resolve()
    stamp = max((f.stat().st_mtime for f in p.glob("*.safetensors")), default=0.0)  # reload after retraining
    return _cached(str(p), backend, stamp)


# -- run_task ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Mode:
    system: str
    max_new_tokens: int


MODES = {
    "reason": Mode("You are a careful problem solver. Think step by step, writing out your reasoning. "
                   "Finish with one last line of the form 'Answer: <the answer>'.", 512),
    "code": Mode("You are an expert programmer. Reply with code only: one fenced code block, no explanation "
                 "before or after it.", 512),
    "short": Mode("Answer with a short phrase or a single word on one line. No explanation.", 32),
    "plain": Mode("", 256),
}

_ANSWER = re.compile(r"^\W*(?:final answer|answer)\s*[:：]\s*(.+?)\s*$", re.IGNORECASE | re.MULTILINE)
_FENCE = re.compile(r"```[^\n`]*\n(.*?)(?:```|\Z)", re.DOTALL)


def extract(mode: str, text: str) -> str:
    """What a script wants from a reply in `mode`: the answer line, the code, the short line."""
    if mode == "reason":
        found = _ANSWER.findall(text)
        if found:
            return found[-1].strip()
        lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
        return lines[-1] if lines else ""
    if mode == "code":
        m = _FENCE.search(text)
        return (m.group(1) if m else text).strip("\n").rstrip()
    if mode == "short":
        lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
        return lines[0].strip().strip("\"'`").rstrip(".").strip() if lines else ""
    return text.strip()


def task_messages(task: str, input: str = "", mode: str = "reason", system: str | None = None) -> list[dict]:
    """The conversation `run_task` sends: the mode's system prompt, then the task and its input."""
    if mode not in MODES:
        raise LucaError(f"mode: unknown mode {mode!r} (choose from {', '.join(MODES)})")
    sys_prompt = MODES[mode].system if system is None else system
    content = f"{task.strip()}\n\n{input.strip()}" if input and input.strip() else task.strip()
    return ([{"role": "system", "content": sys_prompt}] if sys_prompt else []) + [{"role": "user", "content": content}]


def run_task(task: str, input: str = "", model: Model | str | Path = None, mode: str = "reason",
             raw: bool = False, system: str | None = None, backend: str = "native", **sampling) -> str:
    """Run one task on a model and return the extracted result (or the whole reply with `raw`).

    Decoding is greedy unless `temperature` is given; `max_new_tokens` defaults to the mode's
    budget, cut to what fits the context.
    """
    m = _model(model, backend)
    ids = m.prompt_ids(messages=task_messages(task, input, mode, system))
    sampling = {k: v for k, v in sampling.items() if v is not None}
    sampling.setdefault("temperature", 0.0)
    if "max_new_tokens" not in sampling and "max_tokens" not in sampling:
        sampling["max_new_tokens"] = max(1, min(MODES[mode].max_new_tokens, m.context_length - len(ids)))
    text = "".join(m.stream_ids(ids, **sampling))
    return text if raw else extract(mode, text)


# -- choose ------------------------------------------------------------------------------------
@dataclass
class Choice:
    """The chosen option, its index, and every option's score (log-likelihood, higher is better)."""

    answer: str
    index: int
    scores: dict[str, float]

    def __str__(self) -> str:
        return self.answer

    def __iter__(self):  # `answer, scores = luca.choose(...)`
        return iter((self.answer, self.scores))


def choose(question: str, options: list[str], model: Model | str | Path = None, normalize: bool = False,
           format: str = "chat", system: str | None = None) -> Choice:
    """Pick the option the model finds most likely as the answer to `question`.

    The score is the sum of the option's token log-probabilities after the question (as the
    assistant's reply with `format="chat"`, or after "Question: ...\\nAnswer:" with `"plain"`);
    `normalize=True` divides by the option's length in bytes, which stops long options losing
    merely for being long. Ties go to the earlier option.
    """
    options = [str(o) for o in options]
    if len(options) < 2:
        raise LucaError("choose: give at least two options")
    if len(set(options)) != len(options):
        raise LucaError(f"choose: options repeat: {options}")
    m = _model(model)
    if format == "chat":
        ctx = m.prompt_ids(messages=question, system=system)
        conts = [m.tok.encode(o) for o in options]
    elif format == "plain":
        ctx = m.tok.encode(f"Question: {question.strip()}\nAnswer:")
        conts = [m.tok.encode(o if o[:1].isspace() else " " + o) for o in options]
    else:
        raise LucaError(f"choose: format must be chat or plain, got {format!r}")
    m.last_prompt_ids = ctx
    lls = m.loglikelihoods(ctx, conts)
    if normalize:
        lls = [ll / max(1, len(o.encode())) for ll, o in zip(lls, options)]
    best = max(range(len(options)), key=lambda i: (lls[i], -i))
    return Choice(options[best], best, dict(zip(options, lls)))


# -- persona -----------------------------------------------------------------------------------
def set_persona(run_dir: str | Path, text: str) -> None:
    """Store the default system prompt in the run directory's tokenizer_config.json ("" clears it)."""
    from luca import rundir
    rundir.require_run_dir(run_dir)
    tok = rundir.load_tokenizer(run_dir)
    tok.default_system = text.strip()
    rundir.save_tokenizer(run_dir, tok)


def get_persona(run_dir: str | Path) -> str:
    from luca import rundir
    return rundir.load_tokenizer(run_dir).default_system
