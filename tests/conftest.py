"""Shared fixtures: real tiny corpora and a real tiny trained run directory."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

# Keep tests off the user's cache and deterministic on 2 cores.
os.environ.setdefault("LUCA_HOME", str(Path(__file__).parent / ".luca_home_unused"))
# Triton kernels (luca/kernels.py) run on CPU tensors through Triton's interpreter. It must be on
# before triton is first imported (torch.compile may import it), so it is set here, for the session.
os.environ.setdefault("TRITON_INTERPRET", "1")

CORPUS_TEXT = """\
def fibonacci(n):
    \"\"\"Return the n-th Fibonacci number.\"\"\"
    a, b = 0, 1
    for _ in range(n):
        a, b = b, a + b
    return a


class Stack:
    def __init__(self):
        self.items = []

    def push(self, item):
        self.items.append(item)

    def pop(self):
        return self.items.pop()


The quick brown fox jumps over the lazy dog. A stack is a last-in, first-out collection.
Numbers such as 12, 345 and 6789 appear in text; the answer is 42.
"""


def make_corpus(directory: Path, n_files: int = 24) -> Path:
    """A small real corpus: variations of Python code and prose, one document per file."""
    directory.mkdir(parents=True, exist_ok=True)
    for i in range(n_files):
        text = CORPUS_TEXT.replace("fibonacci", f"fib_{i}").replace("42", str(40 + i))
        (directory / f"doc_{i:03d}.txt").write_text(text * (1 + i % 3), encoding="utf-8")
    return directory


def train_tiny_run(out: Path, work: Path, *, tokenizer: str = "bpe", steps: int = 30, seed: int = 0,
                   overrides: dict | None = None, until: int | None = None) -> Path:
    """Collect a corpus, train a tokenizer and a tiny model for `steps` steps; return the run dir."""
    from luca import data as D
    from luca.config import build
    from luca.model import ModelConfig
    from luca.tokenizer import TokenizerConfig, build_tokenizer
    from luca.train import TrainConfig, train

    corpus = make_corpus(work / "corpus")
    data_dir = work / "data"
    D.collect(D.DataConfig(sources=[str(corpus)], val_fraction=0.1), data_dir, progress=False)
    tok = build_tokenizer(TokenizerConfig(kind=tokenizer, vocab_size=320, min_frequency=2),
                          D.iter_documents(data_dir, "train"))
    D.tokenize(data_dir, tok, progress=False)
    vocab = -(-tok.vocab_size // 64) * 64
    mc = dict(vocab_size=vocab, n_layers=2, d_model=64, n_heads=4, n_kv_heads=2, max_seq_len=128)
    tc = dict(seq_len=64, micro_batch=4, batch_tokens=256, max_steps=steps, lr=3e-3, warmup_steps=3,
              eval_every=10, eval_batches=2, save_every=10, log_every=5, seed=seed)
    for k, v in (overrides or {}).items():
        section, _, key = k.partition(".")
        (mc if section == "model" else tc)[key] = v
    train(out, ModelConfig(**mc), build(TrainConfig, tc, "train"), data_dir, tok, progress=False, until=until)
    return out


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory) -> Path:
    """A trained tiny BPE run directory (Llama flavour), shared read-only by tests."""
    work = tmp_path_factory.mktemp("tiny_run")
    return train_tiny_run(work / "run", work)


@pytest.fixture(scope="session")
def tiny_byte_run(tmp_path_factory) -> Path:
    """A trained tiny byte-level run directory."""
    work = tmp_path_factory.mktemp("tiny_byte_run")
    return train_tiny_run(work / "run", work, tokenizer="byte")
