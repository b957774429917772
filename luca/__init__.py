"""luca: compact language models, from corpus to chat, on a laptop CPU or on GPUs."""
from __future__ import annotations

__version__ = "0.1.0"


def run(preset: str = "nano-n1", **kw):
    """Train a preset end to end (see `luca.pipeline.run`)."""
    from luca.pipeline import run as _run
    return _run(preset, **kw)


def evaluate(run_dir, tasks=None, data_dir=None, bpb_files=None, limit=None, **kw) -> dict:
    """Benchmarks and bits-per-byte of a run directory (see `luca.evaluate.evaluate`).

    Once the `luca.evaluate` package is imported it takes this name; it is callable the same way.
    """
    from luca.evaluate import evaluate as _evaluate
    return _evaluate(run_dir, tasks, data_dir, bpb_files, limit, **kw)


_API = {"load", "run_task", "choose", "Model", "Choice", "set_persona", "get_persona"}


def __getattr__(name: str):
    # Lazy: `import luca` stays cheap; torch and the model load only when the API is used.
    if name in _API:
        from luca import api
        return getattr(api, name)
    raise AttributeError(f"module 'luca' has no attribute {name!r}")
