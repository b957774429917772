"""Bits per byte of any text: tokenizer-agnostic, sliding-window, with a by-position curve.

What is notable:
- BPB = (sum over tokens of -log2 p(token | context)) / (UTF-8 bytes of the text), so byte-level
  and BPE models (or two BPE vocabularies) are compared on the same footing.
- Each text is one document and starts after an `<|endoftext|>` token, as documents follow one
  another in training shards; so the first token is scored too and every byte counts.
- Texts longer than the model's context are scored with a sliding window: windows of `max_len`
  tokens start every `stride` tokens and each scores only the tokens the previous one did not, so
  every token after the first window sees at least `max_len - stride` tokens of context. A text
  that fits in one window is scored in one pass (identical to full-context scoring).
- The curve buckets every prediction of every window by its position in the window (0, 1, 2-3,
  4-7, ...) and gives BPB per bucket (bits over the bytes of the tokens predicted there): how much
  a longer context helps. With overlapping windows a token is counted once in the total but may
  appear in several buckets of the curve.
- Windows of equal length are batched; the loss is the model's fused chunked cross-entropy.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch

from luca.atomic import sha256_file
from luca.errors import LucaError
from luca.evaluate.harness import default_batch_tokens, progress_bar
from luca.model import Transformer
from luca.tokenizer import Tokenizer


def read_text(p: str | Path) -> str:
    p = Path(p)
    try:
        data = p.read_bytes()
    except FileNotFoundError:
        raise LucaError(f"{p}: no such file") from None
    except IsADirectoryError:
        raise LucaError(f"{p}: is a directory, expected a text file") from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data[:e.start].count(b"\n") + 1
        raise LucaError(f"{p}:{line}: not UTF-8 (byte 0x{data[e.start]:02x} at offset {e.start})") from None


def windows(n_tokens: int, max_len: int, stride: int) -> list[tuple[int, int, int]]:
    """(begin, end, first scored target) over seq = [eot] + tokens, whose targets are seq[1:].

    A window feeds seq[begin:end] and predicts seq[begin+1:end+1]; it scores targets with index
    (in seq) from `first` to `end`, inclusive.
    """
    out, prev_end, begin = [], 0, 0
    while prev_end < n_tokens:
        end = min(begin + max_len, n_tokens)
        out.append((begin, end, prev_end + 1))
        prev_end = end
        begin += stride
    return out


def _bucket(pos: np.ndarray) -> np.ndarray:
    """0 → 0, 1 → 1, 2-3 → 2, 4-7 → 3, ...: log2 buckets of the position in the window."""
    return np.where(pos == 0, 0, np.floor(np.log2(np.maximum(pos, 1))).astype(np.int64) + 1)


@torch.inference_mode()
def bits_per_byte(model: Transformer, tok: Tokenizer, text: str, *, max_len: int | None = None,
                  stride: int | None = None, batch_tokens: int | None = None, progress: bool = False,
                  desc: str = "bpb") -> dict:
    """BPB of `text` with a sliding window; returns totals and the by-position curve."""
    L = max_len or model.cfg.max_seq_len
    stride = stride or max(1, L // 2)
    if not 0 < stride <= L:
        raise LucaError(f"bpb stride {stride} should be between 1 and the context ({L})")
    ids = tok.encode(text)
    n_bytes = len(text.encode("utf-8"))
    if not ids:
        raise LucaError("bpb: empty text")
    seq = np.array([tok.eot_id] + ids, dtype=np.int64)
    tok_bytes = np.array([len(tok.token_bytes(i)) for i in range(tok.vocab_size)], dtype=np.int64)
    wins = windows(len(ids), L, stride)
    device = next(model.parameters()).device
    batch_tokens = batch_tokens or default_batch_tokens(device)
    n_buckets = int(_bucket(np.array([L - 1]))[0]) + 1
    bits_b = np.zeros(n_buckets)
    bytes_b = np.zeros(n_buckets, dtype=np.int64)
    toks_b = np.zeros(n_buckets, dtype=np.int64)
    total_bits = 0.0
    # Windows grouped by length, so each batch is one dense tensor.
    by_len: dict[int, list[tuple[int, int, int]]] = {}
    for w in wins:
        by_len.setdefault(w[1] - w[0], []).append(w)
    with progress_bar(sum(e - b for b, e, _ in wins), desc, "tok", progress) as advance:
        for T, ws in by_len.items():
            per = max(1, batch_tokens // T)
            for i in range(0, len(ws), per):
                chunk = ws[i:i + per]
                x = torch.from_numpy(np.stack([seq[b:e] for b, e, _ in chunk])).to(device)
                y = torch.from_numpy(np.stack([seq[b + 1:e + 1] for b, e, _ in chunk])).to(device)
                nats = model(x, y, reduction="none").float().cpu().numpy()  # (B, T)
                bk = _bucket(np.arange(T))
                for row, (b, e, first) in enumerate(chunk):
                    bits = nats[row] / math.log(2)
                    total_bits += float(bits[first - 1 - b:].sum())  # each token once, in its first window
                    # The curve takes every position of every window: loss as a function of context.
                    np.add.at(bits_b, bk, bits)
                    np.add.at(bytes_b, bk, tok_bytes[seq[b + 1:e + 1]])
                    np.add.at(toks_b, bk, 1)
                advance(sum(e - b for b, e, _ in chunk))
    curve = []
    for k in range(n_buckets):
        lo = 0 if k == 0 else 1 << (k - 1)
        hi = min(L, 1 if k == 0 else 1 << k)
        if toks_b[k]:
            curve.append({"positions": [lo, hi - 1], "tokens": int(toks_b[k]), "bytes": int(bytes_b[k]),
                          "bpb": float(bits_b[k] / bytes_b[k]) if bytes_b[k] else None})
    return {"bpb": total_bits / n_bytes, "bits": total_bits, "bytes": n_bytes, "tokens": len(ids),
            "bytes_per_token": n_bytes / len(ids), "window": L, "stride": stride, "windows": len(wins),
            "curve": curve}


def bpb_file(model: Transformer, tok: Tokenizer, path: str | Path, text: str | None = None, **kw) -> dict:
    """BPB of a UTF-8 file (its `text`, when already read), with the file's path and checksum."""
    p = Path(path)
    r = bits_per_byte(model, tok, read_text(p) if text is None else text, desc=f"bpb {p.name}", **kw)
    return {"path": str(p.resolve()), "sha256": sha256_file(p), **r}
