"""The six benchmark tasks: readers of their original public files and lm-eval's prompts.

What is notable:
- Each reader takes the format the task's authors published (and the flattened Hugging Face
  variant where one exists): HellaSwag JSONL (`ctx` or `ctx_a` + `ctx_b`), PIQA `valid.jsonl` +
  `valid-labels.lst`, AI2 ARC JSONL (`question.stem`, `question.choices`, `answerKey`; letter or
  number labels, 3-5 choices), WinoGrande JSONL (`answer` inline or a `*-labels.lst` beside the
  file), LAMBADA OpenAI JSONL (`text`, the last space-separated word is the target).
- Prompts are built exactly as lm-evaluation-harness 0.4.x builds them (zero-shot): the same
  `doc_to_text` / `doc_to_choice` / `doc_to_target`, HellaSwag's `preprocess`, WinoGrande's partial
  scoring (one context per option, the shared rest of the sentence as the continuation) and the
  `target_delimiter` " " before every multiple-choice continuation.
- A HellaSwag file with only `ctx` (no `ctx_a`/`ctx_b` split) cannot have `ctx_b` capitalised as
  lm-eval does; the prompt then uses `ctx` as it is (the parity benchmark applies the same rule).
- Every problem in a file is reported as `FILE:LINE: what is wrong` (a `LucaError`).
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path
from typing import Callable, Iterator

from luca.atomic import sha256_file
from luca.errors import LucaError

TARGET_DELIMITER = " "  # lm-eval's default target_delimiter


@dataclass
class Doc:
    """One benchmark item: the (context, continuation) requests to score and the gold index."""
    requests: list[tuple[str, str]]
    gold: int = 0
    choices: list[str] = field(default_factory=list)  # lm-eval's doc_to_choice (acc_norm lengths)


@dataclass(frozen=True)
class Task:
    name: str
    kind: str  # "multiple_choice" | "loglikelihood"
    metrics: tuple[str, ...]
    patterns: tuple[str, ...]  # where the file is looked for under --data-dir (first match wins)
    read: Callable[[Path, int | None], list[Doc]]  # (file, limit): the first `limit` items


@dataclass
class TaskData:
    task: Task
    docs: list[Doc]
    files: list[dict]  # {"path", "sha256"} of every file read
    limit: int | None = None


# -- file helpers -------------------------------------------------------------------------------
def iter_jsonl(p: Path) -> Iterator[tuple[int, dict]]:
    """(line number, object) for each non-blank line; bad JSON names the file and line."""
    try:
        f = open(p, encoding="utf-8")
    except FileNotFoundError:
        raise LucaError(f"{p}: no such file") from None
    except IsADirectoryError:
        raise LucaError(f"{p}: is a directory, expected a JSONL file") from None
    with f:
        lineno = 0
        try:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    raise LucaError(f"{p}:{lineno}: not valid JSON ({e.msg} at column {e.colno})") from None
                except RecursionError:
                    raise LucaError(f"{p}:{lineno}: JSON nested too deeply") from None
                if not isinstance(obj, dict):
                    raise LucaError(f"{p}:{lineno}: expected a JSON object, got {type(obj).__name__}")
                yield lineno, obj
        except UnicodeDecodeError as e:
            raise LucaError(f"{p}:{lineno + 1}: not UTF-8 ({e.reason})") from None


def read_labels(p: Path, n_items: int, items_file: Path) -> list[int]:
    """A `*-labels.lst` file: one integer per line, as many as items in `items_file`."""
    try:
        lines = p.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise LucaError(f"{p}: no such file") from None
    except UnicodeDecodeError as e:
        raise LucaError(f"{p}: not UTF-8 ({e.reason})") from None
    while lines and not lines[-1].strip():
        lines.pop()
    out = []
    for i, s in enumerate(lines, 1):
        try:
            out.append(int(s.strip()))
        except ValueError:
            raise LucaError(f"{p}:{i}: label {s.strip()!r} is not an integer") from None
    if len(out) != n_items:
        raise LucaError(f"{p}: {len(out)} labels for {n_items} items in {items_file.name}")
    return out


def _get(obj: dict, key: str, typ, p: Path, lineno: int):
    if key not in obj:
        raise LucaError(f"{p}:{lineno}: missing field {key!r} (has {', '.join(sorted(obj)) or 'no fields'})")
    v = obj[key]
    if not isinstance(v, typ) or isinstance(v, bool):
        want = typ.__name__ if isinstance(typ, type) else " or ".join(t.__name__ for t in typ)
        raise LucaError(f"{p}:{lineno}: field {key!r} should be {want}, got {type(v).__name__}")
    return v


def _str_list(obj: dict, key: str, p: Path, lineno: int, min_len: int = 2) -> list[str]:
    v = _get(obj, key, list, p, lineno)
    if len(v) < min_len or not all(isinstance(x, str) for x in v):
        raise LucaError(f"{p}:{lineno}: field {key!r} should be a list of at least {min_len} strings")
    return v


def _int_label(v, p: Path, lineno: int, key: str) -> int:
    if isinstance(v, bool) or not isinstance(v, (int, str)):
        raise LucaError(f"{p}:{lineno}: field {key!r} should be an integer, got {v!r}")
    try:
        return int(v)
    except ValueError:
        raise LucaError(f"{p}:{lineno}: field {key!r} should be an integer, got {v!r}") from None


def _labels_beside(p: Path) -> Path | None:
    """`valid.jsonl` → `valid-labels.lst`; `dev_reconstructed.jsonl` → `dev-labels.lst`."""
    for stem in (p.stem, p.stem.split("_")[0], p.stem.split("-")[0]):
        q = p.with_name(f"{stem}-labels.lst")
        if q.is_file():
            return q
    return None


# -- HellaSwag ----------------------------------------------------------------------------------
_BRACKETS = re.compile("\\[.*?\\]")


def hellaswag_preprocess(text: str) -> str:
    """lm-eval's `tasks/hellaswag/utils.py:preprocess` (the same steps and regex)."""
    text = text.strip()
    # Brackets are artifacts of the WikiHow part of HellaSwag.
    text = text.replace(" [title]", ". ")
    text = _BRACKETS.sub("", text)
    text = text.replace("  ", " ")
    return text


def read_hellaswag(p: Path, limit: int | None = None) -> list[Doc]:
    docs = []
    for lineno, o in islice(iter_jsonl(p), limit):
        label = _get(o, "activity_label", str, p, lineno)
        if "ctx_a" in o or "ctx_b" in o:
            ctx = _get(o, "ctx_a", str, p, lineno) + " " + _get(o, "ctx_b", str, p, lineno).capitalize()
        else:
            ctx = _get(o, "ctx", str, p, lineno)
        endings = _str_list(o, "endings", p, lineno)
        gold = _int_label(_get(o, "label", (int, str), p, lineno), p, lineno, "label")
        if not 0 <= gold < len(endings):
            raise LucaError(f"{p}:{lineno}: label {gold} is out of range for {len(endings)} endings")
        query = hellaswag_preprocess(label + ": " + ctx)
        choices = [hellaswag_preprocess(e) for e in endings]
        docs.append(Doc([(query, TARGET_DELIMITER + c) for c in choices], gold, choices))
    return docs


# -- PIQA ---------------------------------------------------------------------------------------
def read_piqa(p: Path, limit: int | None = None) -> list[Doc]:
    rows = list(iter_jsonl(p))
    labels_file = _labels_beside(p)
    inline = all("label" in o for _, o in rows) and rows
    if labels_file is None and not inline:
        raise LucaError(f"{p}: no labels (expected {p.stem}-labels.lst beside it or a 'label' field)")
    labels = read_labels(labels_file, len(rows), p) if labels_file is not None else \
        [_int_label(o["label"], p, n, "label") for n, o in rows]
    docs = []
    for (lineno, o), gold in islice(zip(rows, labels), limit):
        goal = _get(o, "goal", str, p, lineno)
        choices = [_get(o, "sol1", str, p, lineno), _get(o, "sol2", str, p, lineno)]
        if gold not in (0, 1):
            raise LucaError(f"{labels_file or p}:{lineno}: label {gold} should be 0 or 1")
        ctx = f"Question: {goal}\nAnswer:"
        docs.append(Doc([(ctx, TARGET_DELIMITER + c) for c in choices], gold, choices))
    return docs


# -- ARC ----------------------------------------------------------------------------------------
def read_arc(p: Path, limit: int | None = None) -> list[Doc]:
    docs = []
    for lineno, o in islice(iter_jsonl(p), limit):
        q = o.get("question")
        if isinstance(q, dict):  # the original AI2 schema
            stem = _get(q, "stem", str, p, lineno)
            raw = _get(q, "choices", list, p, lineno)
            if not all(isinstance(c, dict) and isinstance(c.get("text"), str) and isinstance(c.get("label"), str)
                       for c in raw):
                raise LucaError(f"{p}:{lineno}: question.choices should be a list of {{text, label}} objects")
            texts, labels = [c["text"] for c in raw], [c["label"] for c in raw]
        else:  # the Hugging Face schema: question is a string, choices {text: [...], label: [...]}
            stem = _get(o, "question", str, p, lineno)
            ch = _get(o, "choices", dict, p, lineno)
            texts, labels = _str_list(ch, "text", p, lineno), _str_list(ch, "label", p, lineno)
        if len(texts) < 2 or len(texts) != len(labels):
            raise LucaError(f"{p}:{lineno}: expected at least 2 choices with one label each")
        key = _get(o, "answerKey", str, p, lineno)
        if key not in labels:
            raise LucaError(f"{p}:{lineno}: answerKey {key!r} is not among the labels {', '.join(labels)}")
        ctx = f"Question: {stem}\nAnswer:"
        docs.append(Doc([(ctx, TARGET_DELIMITER + t) for t in texts], labels.index(key), texts))
    return docs


# -- WinoGrande ---------------------------------------------------------------------------------
def read_winogrande(p: Path, limit: int | None = None) -> list[Doc]:
    rows = list(iter_jsonl(p))
    labels_file = _labels_beside(p)
    labels = read_labels(labels_file, len(rows), p) if labels_file is not None else None
    docs = []
    for i, (lineno, o) in enumerate(rows[:limit]):
        sentence = _get(o, "sentence", str, p, lineno)
        options = [_get(o, "option1", str, p, lineno), _get(o, "option2", str, p, lineno)]
        if "_" not in sentence:
            raise LucaError(f"{p}:{lineno}: sentence has no blank '_'")
        if "answer" in o and o["answer"] not in ("", None):
            answer = _int_label(o["answer"], p, lineno, "answer")
            if labels is not None and labels[i] != answer:
                raise LucaError(f"{labels_file}:{i + 1}: label {labels[i]} contradicts answer {answer} "
                                f"in {p.name}:{lineno}")
        elif labels is not None:
            answer = labels[i]
        else:
            raise LucaError(f"{p}:{lineno}: no 'answer' field and no {p.stem.split('_')[0]}-labels.lst beside the file")
        if answer not in (1, 2):
            raise LucaError(f"{p}:{lineno}: answer {answer} should be 1 or 2")
        idx = sentence.index("_")
        target = sentence[idx + 1:].strip()
        contexts = [sentence[:idx] + opt for opt in options]
        docs.append(Doc([(c, TARGET_DELIMITER + target) for c in contexts], answer - 1, contexts))
    return docs


# -- LAMBADA ------------------------------------------------------------------------------------
def read_lambada(p: Path, limit: int | None = None) -> list[Doc]:
    docs = []
    for lineno, o in islice(iter_jsonl(p), limit):
        text = _get(o, "text", str, p, lineno)
        words = text.split(" ")
        if not words[-1]:
            raise LucaError(f"{p}:{lineno}: text ends with a space: no last word to predict")
        docs.append(Doc([(" ".join(words[:-1]), " " + words[-1])]))
    return docs


_ARC = ("arc/ARC-{s}-Test.jsonl", "ARC-{s}/ARC-{s}-Test.jsonl", "ARC-{s}-Test.jsonl", "arc_{l}/*.jsonl")
TASKS: dict[str, Task] = {t.name: t for t in [
    Task("hellaswag", "multiple_choice", ("acc", "acc_norm"),
         ("hellaswag/hellaswag_val*.jsonl", "hellaswag_val*.jsonl", "hellaswag/*.jsonl"), read_hellaswag),
    Task("piqa", "multiple_choice", ("acc", "acc_norm"),
         ("piqa/valid.jsonl", "piqa/*valid*.jsonl", "piqa_valid.jsonl"), read_piqa),
    Task("arc_easy", "multiple_choice", ("acc", "acc_norm"),
         tuple(x.format(s="Easy", l="easy") for x in _ARC), read_arc),
    Task("arc_challenge", "multiple_choice", ("acc", "acc_norm"),
         tuple(x.format(s="Challenge", l="challenge") for x in _ARC), read_arc),
    Task("winogrande", "multiple_choice", ("acc",),
         ("winogrande/dev*.jsonl", "winogrande_dev*.jsonl", "winogrande/*.jsonl"), read_winogrande),
    Task("lambada_openai", "loglikelihood", ("perplexity", "acc"),
         ("lambada/lambada_test.jsonl", "lambada_openai/*.jsonl", "lambada/*.jsonl", "lambada_test.jsonl"),
         read_lambada),
]}
DEFAULT_TASKS = list(TASKS)


def parse_tasks(spec: str | list[str] | None) -> list[tuple[str, Path | None]]:
    """`hellaswag,piqa` or `piqa=path/valid.jsonl` (a file for one task) → [(name, file or None)]."""
    if spec is None:
        return [(t, None) for t in DEFAULT_TASKS]
    items = spec.split(",") if isinstance(spec, str) else [x for s in spec for x in s.split(",")]
    out = []
    for item in (x.strip() for x in items):
        if not item:
            continue
        name, _, file = item.partition("=")
        if name not in TASKS:
            raise LucaError(f"--tasks: unknown task {name!r} (known: {', '.join(TASKS)})")
        out.append((name, Path(file) if file else None))
    if not out:
        raise LucaError("--tasks: no task named")
    return out


def find_file(task: Task, data_dir: Path) -> Path:
    if not data_dir.is_dir():
        raise LucaError(f"{data_dir}: no such data directory")
    for pat in task.patterns:
        hits = sorted(data_dir.glob(pat))
        if hits:
            return hits[0]
    raise LucaError(f"{data_dir}: no file for task {task.name} (looked for {', '.join(task.patterns)})")


def load_task(name: str, file: Path | None = None, data_dir: str | Path | None = None,
              limit: int | None = None) -> TaskData:
    """Read a task's file (given, or found under `data_dir`); keep the first `limit` items."""
    task = TASKS[name]
    if limit is not None and (not isinstance(limit, int) or limit < 1):
        raise LucaError(f"{name}: limit should be a positive number of items, got {limit!r}")
    if file is None:
        if data_dir is None:
            raise LucaError(f"{name}: no data file (give --data-dir DIR or {name}=FILE)")
        file = find_file(task, Path(data_dir))
    file = Path(file)
    if not file.is_file():
        raise LucaError(f"{file}: no such file")
    docs = task.read(file, limit)  # items past the limit are not read (nor checked)
    if not docs:
        raise LucaError(f"{file}: no items")
    files = [{"path": str(file.resolve()), "sha256": sha256_file(file)}]
    labels = _labels_beside(file) if name in ("piqa", "winogrande") else None
    if labels is not None:
        files.append({"path": str(labels.resolve()), "sha256": sha256_file(labels)})
    return TaskData(task, docs, files, limit)
