"""Synthetic structured tasks: seeded generators of small problems with one exact answer each.

What is notable:
- Five tasks that probe structure rather than knowledge: `copy` (repeat a random letter string),
  `sort` (sort single digits), `addition` (multi-digit integers), `brackets` (close an unbalanced
  sequence of ()[]{}<>), `recall` (find a key's value among many key:value pairs: a long context).
- One line per example, `PROMPT = ANSWER`. The prompt ends with " =" and the answer follows after
  one space, so a byte-level BPE (Qwen2's split pattern) cuts prompt and answer at the same
  boundary in training text and at test time (a prompt ending in a space would not be).
- Deterministic: examples depend only on (task, split, seed, sizes), through `random.Random` with
  a string seed (stable across processes and Python versions). Training data (`split="train"`)
  and diagnostics (`split="eval"`) draw from differently seeded streams; small problem spaces
  (1-digit sums, say) can still repeat an item across them.
- As a data source (`synthetic:TASK?n=N&seed=S` in data.py; TASK may be `all`): N examples, 32
  to a document. These documents never enter the validation split, so a corpus can add structure
  to training while validation BPB stays on the text alone ("train on structure, test on text").
- Pure Python; imports nothing of luca (floor 1). Scoring lives in luca/diagnostics.py.
"""
from __future__ import annotations

import random
import string
from dataclasses import dataclass
from typing import Callable, Iterator

TASKS = ("copy", "sort", "addition", "brackets", "recall")
PAIRS = {"(": ")", "[": "]", "{": "}", "<": ">"}
PER_DOC = 32


@dataclass(frozen=True)
class Example:
    task: str
    prompt: str  # ends with " ="
    answer: str  # the model should continue with " " + answer + "\n"

    @property
    def text(self) -> str:
        return f"{self.prompt} {self.answer}"


def _copy(rng: random.Random, length: tuple[int, int] = (4, 12)) -> tuple[str, str]:
    s = "".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(*length)))
    return f"copy {s} =", s


def _sort(rng: random.Random, length: tuple[int, int] = (3, 9)) -> tuple[str, str]:
    xs = [rng.randint(0, 9) for _ in range(rng.randint(*length))]
    return f"sort {' '.join(map(str, xs))} =", " ".join(map(str, sorted(xs)))


def _addition(rng: random.Random, digits: tuple[int, int] = (1, 4)) -> tuple[str, str]:
    a, b = (rng.randrange(10 ** rng.randint(*digits)) for _ in range(2))
    return f"{a}+{b} =", str(a + b)


def _brackets(rng: random.Random, length: tuple[int, int] = (2, 12)) -> tuple[str, str]:
    seq, stack = [], []
    for _ in range(rng.randint(*length)):
        if stack and rng.random() < 0.4:
            seq.append(PAIRS[stack.pop()])
        else:
            stack.append(rng.choice(list(PAIRS)))
            seq.append(stack[-1])
    if not stack:  # something must be left to close
        stack.append(rng.choice(list(PAIRS)))
        seq.append(stack[-1])
    return f"close {''.join(seq)} =", "".join(PAIRS[c] for c in reversed(stack))


def _recall(rng: random.Random, pairs: tuple[int, int] = (8, 24)) -> tuple[str, str]:
    n = rng.randint(*pairs)
    keys: list[str] = []
    while len(keys) < n:
        k = "".join(rng.choice(string.ascii_lowercase) for _ in range(3))
        if k not in keys:
            keys.append(k)
    values = [str(rng.randrange(100, 1000)) for _ in keys]
    q = rng.randrange(n)
    body = " ".join(f"{k}:{v}" for k, v in zip(keys, values))
    return f"recall {body} ; {keys[q]} =", values[q]


GENERATORS: dict[str, Callable[..., tuple[str, str]]] = {
    "copy": _copy, "sort": _sort, "addition": _addition, "brackets": _brackets, "recall": _recall}


def generate(task: str, n: int, seed: int = 0, split: str = "eval", **sizes: tuple[int, int]) -> list[Example]:
    """`n` examples of `task` ("all": the tasks in turn). `sizes` are the generator's (min, max) ranges."""
    if task != "all" and task not in GENERATORS:
        raise ValueError(f"unknown synthetic task {task!r} (tasks: {', '.join(TASKS)}, all)")
    rng = random.Random(f"luca-synthetic:{task}:{split}:{seed}")
    out = []
    for i in range(n):
        t = TASKS[i % len(TASKS)] if task == "all" else task
        prompt, answer = GENERATORS[t](rng, **sizes)
        out.append(Example(t, prompt, answer))
    return out


def iter_documents(task: str, n: int, seed: int = 0) -> Iterator[tuple[str, str]]:
    """(origin, text) training documents: `n` examples, PER_DOC lines to a document."""
    examples = generate(task, n, seed, split="train")
    for i in range(0, len(examples), PER_DOC):
        yield f"synthetic:{task}:{i // PER_DOC}", "\n".join(e.text for e in examples[i:i + PER_DOC]) + "\n"


def check(example: Example) -> bool:
    """Whether an example's answer is right, computed independently of its generator (for tests)."""
    p = example.prompt[:-2]  # drop " ="
    if example.task == "copy":
        return example.answer == p.split(" ", 1)[1]
    if example.task == "sort":
        return example.answer.split() == sorted(p.split()[1:])
    if example.task == "addition":
        a, b = p.split("+")
        return int(example.answer) == int(a) + int(b)
    if example.task == "brackets":
        s = p.split(" ", 1)[1] + example.answer
        stack = []
        for c in s:
            if c in PAIRS:
                stack.append(c)
            elif not stack or PAIRS[stack.pop()] != c:
                return False
        return not stack
    if example.task == "recall":
        body, key = p[len("recall "):].split(" ; ")
        return dict(kv.split(":") for kv in body.split())[key] == example.answer
    raise ValueError(example.task)
