"""luca: compact language models, from corpus to chat, on a laptop CPU or on GPUs."""
from __future__ import annotations

__version__ = "0.1.0"


def run(preset: str = "nano-n1", **kw):
    """Train a preset end to end (see `luca.pipeline.run`)."""
    from luca.pipeline import run as _run
    return _run(preset, **kw)
