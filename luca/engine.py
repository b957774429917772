"""Generation with the native PyTorch engine: KV cache, sampling, streaming, stop strings.

What is notable:
- `NativeEngine` repacks a `Transformer` for decoding: Q/K/V and gate/up projections fused into
  one matmul each (for models up to ~1 GiB of weights; larger ones keep the model's tensors and
  cost no extra memory), one RoPE table per engine (q and k rotated together with a roll and an
  `addcmul`), grouped-query attention as one SDPA call with the query-head group folded into the
  query length (no K/V repeat, no GQA kernel), and the LM head on the last position only.
- One preallocated KV cache per call; prompts of a batch are left-padded (with their own first
  token, so the repetition penalty never sees a pad id) and masked, so several prompts decode
  together; a batch without padding needs no mask at all.
- Weights in FP32 or BF16, or int8 per output channel (symmetric): `quant="int8"` is weight-only
  through `torch._weight_int8pack_mm` with BF16 activations (a dequantising matmul where that kernel
  is missing); `quant="int8-dynamic"` uses fbgemm's int8 GEMM with activations quantized per call
  (FP32 in and out: the fastest on x86, BPB +0.1% on nano-n1, and a row's result then depends
  slightly on the other rows of its batch). The tied embedding is looked up from the int8 rows.
- Sampling is fused into a few tensor ops per step (repetition penalty, temperature, top-k,
  top-p) under `torch.inference_mode`; a seed makes it reproducible. Per step the only host work is
  one `.tolist()` of the new ids.
- `generate_ids` / `stream` / `complete` take a `Transformer` (an engine is built and cached for
  it, rebuilt when its weights change) or any engine with a `generate_ids(prompts, s, stop_ids)`
  method (`NativeEngine`, `luca.engine_llamacpp.LlamaCppEngine`).
- Streaming yields text pieces only once they are complete UTF-8, and holds back any tail that
  could still become a stop string, so a stop string never leaks to the caller.
"""
from __future__ import annotations

import time
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import torch
import torch.nn.functional as F

from luca.model import Transformer
from luca.tokenizer import Tokenizer

QUANTS = (None, "int8", "int8-dynamic")
FUSE_MAX_BYTES = 1 << 30  # above this, fusing Q/K/V and gate/up would double the weights' memory


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


_FMAX = torch.finfo(torch.float32).max


def sample_next(logits: torch.Tensor, prev: torch.Tensor | None, s: SamplingConfig,
                gen: torch.Generator | None) -> torch.Tensor:
    """Next ids (B,) from last-position logits (B, V); `prev` (B, T) are ids seen so far (or None)."""
    logits = logits.float()
    if s.repetition_penalty != 1.0 and prev is not None and prev.numel():
        seen = torch.gather(logits, 1, prev)
        seen = torch.where(seen > 0, seen / s.repetition_penalty, seen * s.repetition_penalty)
        logits = logits.scatter(1, prev, seen.nan_to_num(0.0, _FMAX, -_FMAX))  # 0 · inf: a 0 logit stays 0
    if s.temperature < 1e-6:  # 0, or so near it that dividing would overflow: greedy
        return logits.argmax(-1)
    # Clamped: an extreme penalty or temperature must not overflow to inf, and inf - inf is NaN in softmax.
    logits = (logits / s.temperature).clamp(-_FMAX, _FMAX)
    if s.top_k > 0 and s.top_k < logits.shape[-1]:
        kth = torch.topk(logits, s.top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if s.top_p < 1.0:
        sorted_logits, idx = torch.sort(logits, descending=True)
        probs = sorted_logits.softmax(-1)
        drop = probs.cumsum(-1) - probs > s.top_p  # keep the smallest set reaching top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(1, idx, sorted_logits)
    probs = logits.softmax(-1)
    return torch.multinomial(probs, 1, generator=gen).squeeze(1)


# -- weights ------------------------------------------------------------------------------------
class _Linear:
    """y = x @ W.T (+ b): a dense weight, or int8 rows with one scale per output channel.

    mode "int8": weight-only (`torch._weight_int8pack_mm`, BF16 activations); "int8-dynamic":
    fbgemm's int8 GEMM with activations quantized on the fly per call (FP32 in and out; fastest on
    x86, slightly less exact); either falls back to a dequantising matmul where its kernel is missing.
    """

    def __init__(self, w: torch.Tensor, b: torch.Tensor | None, dtype: torch.dtype, mode: str | None = None,
                 keep_rows: bool = False, k_major: bool = False):
        self.b = None if b is None else b.to(dtype)
        self.mode = mode
        self.in_features = w.shape[1]
        self.fbgemm = None
        if mode is None:
            self.w = w.to(dtype)
            if k_major:  # stored (in, out), used as its (out, in) view: see NativeEngine
                self.w = self.w.t().contiguous().t()
            return
        self.w, scale = _quantize_rows(w)
        self.scale = scale.to(dtype)
        self.packed = _int8pack_works(self.w.device, dtype)
        if mode == "int8-dynamic":
            self.fbgemm = _fbgemm_pack(self.w, scale, None if b is None else b.float())
            if self.fbgemm is not None:
                self.b = None  # inside the packed weight
                if not keep_rows:
                    self.w = self.w[:0]  # fbgemm holds its own copy

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.mode is None:
            return F.linear(x, self.w, self.b)
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        if self.fbgemm is not None:
            y = torch.ops.quantized.linear_dynamic(x2.float().contiguous(), self.fbgemm, True)
        elif self.packed and self.w.shape[0] > 4 * _ROWS:  # a vocabulary-sized head: in row blocks (faster)
            x2 = x2.contiguous()
            y = torch.cat([torch._weight_int8pack_mm(x2, self.w[i:i + _ROWS], self.scale[i:i + _ROWS])
                           for i in range(0, self.w.shape[0], _ROWS)], -1)
        elif self.packed:
            y = torch._weight_int8pack_mm(x2.contiguous(), self.w, self.scale)
        else:
            y = F.linear(x2, self.w.to(x.dtype)) * self.scale
        if self.b is not None:
            y = y + self.b
        return y.view(*shape[:-1], y.shape[-1])

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        """Rows of the weight (an embedding lookup), dequantised."""
        if self.mode is None:
            return F.embedding(ids, self.w)
        return F.embedding(ids, self.w).to(self.scale.dtype) * self.scale[ids][..., None]

    def nbytes(self) -> int:
        if self.mode is None:
            return self.w.numel() * self.w.element_size()
        n = self.w.numel() + self.scale.numel() * self.scale.element_size()
        return n + (self.scale.shape[0] * self.in_features if self.fbgemm is not None else 0)


def _quantize_rows(w: torch.Tensor, rows: int = 4096) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 per output row, and the FP32 scales; in row blocks, so that a 152k-row
    embedding needs no FP32 copies of itself (~3 GB of peak memory on a 1.5B model)."""
    q = torch.empty(w.shape, dtype=torch.int8, device=w.device)
    scale = torch.empty(w.shape[0], dtype=torch.float32, device=w.device)
    for i in range(0, w.shape[0], rows):
        b = w[i:i + rows].float()
        s = (b.abs().amax(1) / 127.0).clamp(min=1e-12)
        q[i:i + rows] = (b / s[:, None]).round_().clamp_(-127, 127)
        scale[i:i + rows] = s
    return q, scale


def _fbgemm_pack(wq: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None):
    """fbgemm's packed int8 weight (per-channel scales), or None where fbgemm is unavailable."""
    import warnings
    if wq.device.type != "cpu" or not {"fbgemm", "x86"} & set(torch.backends.quantized.supported_engines):
        return None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # quantized tensors are deprecated, the fbgemm kernels are not gone
            q = torch._make_per_channel_quantized_tensor(wq, scale.double(), torch.zeros_like(scale, dtype=torch.long), 0)
            return torch.ops.quantized.linear_prepack(q, bias)
    except (RuntimeError, AttributeError):
        return None


_ROWS = 4096  # row block of a large int8 matrix (measured: a 152k-row head runs ~1.4× faster in blocks)
_INT8PACK: dict[tuple[str, torch.dtype], bool] = {}


def _int8pack_works(device: torch.device, dtype: torch.dtype) -> bool:
    key = (str(device), dtype)
    if key not in _INT8PACK:
        try:
            w = torch.ones(8, 32, dtype=torch.int8, device=device)
            y = torch._weight_int8pack_mm(torch.ones(1, 32, dtype=dtype, device=device), w,
                                          torch.ones(8, dtype=dtype, device=device))
            _INT8PACK[key] = bool((y == 32).all())
        except (RuntimeError, AttributeError, NotImplementedError):
            _INT8PACK[key] = False
    return _INT8PACK[key]


class _Layer:
    __slots__ = ("ln1", "qkv", "q", "k", "v", "qk_norm", "o", "ln2", "gate_up", "gate", "up", "down")


_DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16,
           "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16}


def parse_dtype(name: str | torch.dtype | None) -> torch.dtype | None:
    if name is None or isinstance(name, torch.dtype):
        return name
    if name not in _DTYPES:
        raise ValueError(f"dtype must be one of {sorted(_DTYPES)}, got {name!r}")
    return _DTYPES[name]


class NativeEngine:
    """A `Transformer` repacked for decoding (see the module docstring)."""

    def __init__(self, model: Transformer, dtype: torch.dtype | str | None = None, quant: str | None = None,
                 fuse: bool | None = None, consume: bool = False):
        if quant not in QUANTS:
            raise ValueError(f"quant must be one of {QUANTS}, got {quant!r}")
        p0 = next(model.parameters())
        self.cfg, self.device = model.cfg, p0.device
        self.quant = quant
        dtype = parse_dtype(dtype) or {"int8": torch.bfloat16, "int8-dynamic": torch.float32}.get(quant, p0.dtype)
        if quant == "int8-dynamic":
            dtype = torch.float32  # fbgemm takes and gives FP32
        self.dtype = dtype
        int8 = quant
        if fuse is None:
            fuse = sum(p.numel() * p.element_size() for p in model.parameters()) <= FUSE_MAX_BYTES or int8 \
                or dtype != p0.dtype  # a converted copy is made anyway: fuse it
        self.fused = fuse
        cfg = self.cfg
        # MKL's FP32 matrix-vector product streams a weight stored (in, out) about 1.5x faster than one
        # stored (out, in) once the weights no longer sit in L2 (nano-n1 decode: 17 MB of weights per
        # token, 2.4 → 1.1 ms for its matmuls on 2 AMD EPYC cores); for BF16 the usual layout is as fast
        # or faster. Only where a copy is made anyway (fused engines).
        km = dict(k_major=fuse and dtype == torch.float32 and self.device.type == "cpu" and not int8)
        with torch.inference_mode():
            self.layers = []
            for i in range(len(model.model.layers)):
                blk = model.model.layers[i]
                a, m = blk.self_attn, blk.mlp
                L = _Layer()
                L.ln1 = blk.input_layernorm.weight.to(dtype)
                L.ln2 = blk.post_attention_layernorm.weight.to(dtype)
                bias = [a.q_proj.bias, a.k_proj.bias, a.v_proj.bias] if cfg.qkv_bias else None
                if fuse:
                    L.qkv = _Linear(torch.cat([a.q_proj.weight, a.k_proj.weight, a.v_proj.weight]),
                                    torch.cat(bias) if bias else None, dtype, int8, **km)
                    L.gate_up = _Linear(torch.cat([m.gate_proj.weight, m.up_proj.weight]), None, dtype, int8, **km)
                else:
                    L.q, L.k, L.v = (_Linear(lin.weight, lin.bias, dtype, int8)
                                     for lin in (a.q_proj, a.k_proj, a.v_proj))
                    L.gate, L.up = _Linear(m.gate_proj.weight, None, dtype, int8), _Linear(m.up_proj.weight, None,
                                                                                        dtype, int8)
                L.qk_norm = None
                if cfg.qk_norm:  # one (H + KV, head_dim) weight: q and k normed in one call
                    L.qk_norm = torch.cat([a.q_norm.weight.expand(cfg.n_heads, -1),
                                           a.k_norm.weight.expand(cfg.n_kv_heads, -1)]).to(dtype)
                L.o = _Linear(a.o_proj.weight, None, dtype, int8, **km)
                L.down = _Linear(m.down_proj.weight, None, dtype, int8, **km)
                self.layers.append(L)
                if consume:  # drop the unpacked block now: peak memory is the model + one layer
                    model.model.layers[i] = torch.nn.Identity()
                    del blk, a, m
            self.norm = model.model.norm.weight.to(dtype)
            self.embed = _Linear(model.model.embed_tokens.weight, None, dtype, int8, keep_rows=True, **km)
            self.lm_head = self.embed if cfg.tie_embeddings else _Linear(model.lm_head.weight, None, dtype, int8,
                                                                         keep_rows=False, **km)
            # RoPE table for every position (rotate-half layout; the sign of the roll folded into sin).
            hd = cfg.head_dim
            inv = 1.0 / (cfg.rope_theta ** (torch.arange(0, hd, 2, dtype=torch.float32, device=self.device) / hd))
            f = torch.arange(cfg.max_seq_len, dtype=torch.float32, device=self.device)[:, None] * inv
            emb = torch.cat([f, f], -1)
            sign = torch.cat([-torch.ones(hd // 2), torch.ones(hd // 2)]).to(self.device)
            self.cos, self.sin = emb.cos().to(dtype), (emb.sin() * sign).to(dtype)

    @classmethod
    def load(cls, run_dir: str | Path, dtype: torch.dtype | str = "auto", quant: str | None = None,
             device: str = "cpu") -> "NativeEngine":
        """An engine straight from a run (or HF) directory, without keeping the unpacked model.

        dtype "auto": FP32 up to 1 GiB of FP32 weights (small matrices run faster in FP32 on CPU),
        else BF16; int8 always computes in BF16.
        """
        from luca import rundir
        if dtype == "auto":
            cfg = rundir.load_model_config(run_dir)
            n = cfg.vocab_size * cfg.d_model * (1 if cfg.tie_embeddings else 2) + cfg.n_layers * (
                cfg.d_model * cfg.head_dim * (2 * cfg.n_heads + 2 * cfg.n_kv_heads) + 3 * cfg.d_model * cfg.d_ff)
            dtype = "fp32" if 4 * n <= FUSE_MAX_BYTES and quant is None else "bf16"
        dt = parse_dtype(dtype)
        model = rundir.load_model(run_dir, device=device, dtype=dt)
        eng = cls(model, dtype=dt, quant=quant, consume=True)
        del model
        _release_freed_memory()
        return eng

    def nbytes(self) -> int:
        n = self.embed.nbytes() + (0 if self.lm_head is self.embed else self.lm_head.nbytes())
        for L in self.layers:
            lins = [L.qkv, L.gate_up] if self.fused else [L.q, L.k, L.v, L.gate, L.up]
            n += sum(x.nbytes() for x in lins + [L.o, L.down])
        return n

    # -- forward --------------------------------------------------------------------------------
    def forward(self, toks: torch.Tensor, pos: torch.Tensor, kv: list, start: int,
                mask: torch.Tensor | None, last_only: bool = True) -> torch.Tensor:
        """Logits (B, V) of the last position (or (B, T, V)) for ids (B, T) at cache offset `start`.

        `pos` (B, T) are RoPE positions; `mask` (B, 1, 1|T, start + T) is a boolean key mask
        (True = attend) or None for a causal, unpadded batch.
        """
        cfg = self.cfg
        B, T = toks.shape
        H, KV, hd = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        G, eps = H // KV, cfg.norm_eps
        end = start + T
        x = self.embed.rows(toks)
        cos, sin = self.cos[pos][:, :, None], self.sin[pos][:, :, None]  # (B, T, 1, hd)
        if T > 1:
            # Queries are folded as (B, KV, G·T, hd), row g·T + t: the causal mask repeats per group.
            causal = torch.ones(T, end, dtype=torch.bool, device=x.device).tril(diagonal=start)
            m = causal if mask is None else (mask & causal)
            attn_mask = m.repeat(*([1] * (m.dim() - 2)), G, 1)
        else:
            attn_mask = mask
        for i, L in enumerate(self.layers):
            h = F.rms_norm(x, (x.shape[-1],), L.ln1, eps)
            if self.fused:
                qkv = L.qkv(h)
                qk, v = qkv[..., :(H + KV) * hd].view(B, T, H + KV, hd), qkv[..., (H + KV) * hd:]
            else:
                qk = torch.cat([L.q(h), L.k(h)], -1).view(B, T, H + KV, hd)
                v = L.v(h)
            if L.qk_norm is not None:
                qk = F.rms_norm(qk, (hd,), None, eps) * L.qk_norm
            qk = torch.addcmul(qk * cos, qk.roll(hd // 2, -1), sin)
            q, k = qk[:, :, :H], qk[:, :, H:]
            kc, vc = kv[i]
            kc[:, :, start:end] = k.transpose(1, 2)
            vc[:, :, start:end] = v.view(B, T, KV, hd).transpose(1, 2)
            q = q.reshape(B, T, KV, G, hd).permute(0, 2, 3, 1, 4).reshape(B, KV, G * T, hd)
            y = F.scaled_dot_product_attention(q, kc[:, :, :end], vc[:, :, :end], attn_mask=attn_mask)
            y = y.view(B, KV, G, T, hd).permute(0, 3, 1, 2, 4).reshape(B, T, H * hd)
            x = x + L.o(y)
            h = F.rms_norm(x, (x.shape[-1],), L.ln2, eps)
            if self.fused:
                g, u = L.gate_up(h).chunk(2, -1)
            else:
                g, u = L.gate(h), L.up(h)
            x = x + L.down(F.silu(g) * u)
        if last_only:
            x = x[:, -1]
        return self.lm_head(F.rms_norm(x, (x.shape[-1],), self.norm, eps)).float()

    def new_cache(self, batch: int, length: int) -> list:
        cfg = self.cfg
        shape = (batch, cfg.n_kv_heads, length, cfg.head_dim)
        return [(torch.empty(shape, dtype=self.dtype, device=self.device),
                 torch.empty(shape, dtype=self.dtype, device=self.device)) for _ in self.layers]

    @torch.inference_mode()
    def logits(self, prompts: list[list[int]]) -> torch.Tensor:
        """Next-token logits (B, V) after each prompt (left-padded batch)."""
        toks, pos, valid, T0 = self._pad(prompts, 0)
        mask = None if all(len(p) == T0 for p in prompts) else self._prefill_mask(valid, T0)
        return self.forward(toks, pos, self.new_cache(len(prompts), T0), 0, mask)

    # -- generation -----------------------------------------------------------------------------
    def _pad(self, prompts: list[list[int]], extra: int):
        B, lens = len(prompts), [len(p) for p in prompts]
        if not prompts or min(lens) == 0:
            raise ValueError("empty prompt")
        T0 = max(lens)
        if T0 + extra > self.cfg.max_seq_len:
            raise ValueError(f"prompt ({T0} tokens) + max_new_tokens ({extra}) exceeds the context "
                             f"({self.cfg.max_seq_len})")
        # Left padding with the row's own first token: harmless to the repetition penalty.
        rows = [[p[0]] * (T0 - len(p)) + list(p) for p in prompts]
        toks = torch.tensor(rows, dtype=torch.long, device=self.device)
        valid = torch.zeros(B, T0 + extra, dtype=torch.bool, device=self.device)
        for b, n in enumerate(lens):
            valid[b, T0 - n:] = True
        pos = (valid[:, :T0].long().cumsum(-1) - 1).clamp(min=0)
        return toks, pos, valid, T0

    @staticmethod
    def _prefill_mask(valid: torch.Tensor, T0: int) -> torch.Tensor:
        mask = valid[:, None, None, :T0].expand(-1, 1, T0, T0).clone()
        mask |= torch.eye(T0, dtype=torch.bool, device=valid.device)  # pad rows attend to themselves
        return mask

    @torch.inference_mode()
    def generate_ids(self, prompts: list[list[int]], s: SamplingConfig,
                     stop_ids: set[int] | None = None) -> Iterator[list[int | None]]:
        """Yield, per step, the new id of each prompt (None once that prompt has stopped)."""
        B = len(prompts)
        toks, pos, valid, T0 = self._pad(prompts, s.max_new_tokens)
        if s.max_new_tokens == 0:
            return
        total = T0 + s.max_new_tokens
        padded = not bool(valid[:, 0].all())
        gen = torch.Generator(device=self.device).manual_seed(s.seed) if s.seed is not None else None
        kv = self.new_cache(B, total)
        logits = self.forward(toks, pos, kv, 0, self._prefill_mask(valid, T0) if padded else None)
        penalty = s.repetition_penalty != 1.0
        hist = torch.empty(B, total, dtype=torch.long, device=self.device)
        hist[:, :T0] = toks
        stop = set(stop_ids or ())
        done = [False] * B
        next_pos = pos[:, -1:] + 1
        for t in range(s.max_new_tokens):
            nxt = sample_next(logits, hist[:, :T0 + t] if penalty else None, s, gen)
            out: list[int | None] = []
            for b, i in enumerate(nxt.tolist()):
                if done[b] or i in stop:
                    done[b] = True
                    out.append(None)
                else:
                    out.append(i)
            yield out
            if all(done) or t == s.max_new_tokens - 1:
                return
            hist[:, T0 + t] = nxt
            mask = valid[:, None, None, :T0 + t + 1] if padded else None
            logits = self.forward(nxt[:, None], next_pos, kv, T0 + t, mask)
            next_pos = next_pos + 1


def _release_freed_memory() -> None:
    """Give freed heap pages back to the OS (glibc keeps tensors below its mmap threshold)."""
    try:
        import ctypes
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


_ENGINES: "weakref.WeakKeyDictionary[Transformer, tuple[tuple, NativeEngine]]" = weakref.WeakKeyDictionary()


def engine_for(model: Transformer) -> NativeEngine:
    """The cached engine of a model, rebuilt when its parameters were modified or replaced."""
    try:
        key = tuple((p.data_ptr(), p._version, p.dtype, str(p.device)) for p in model.parameters())
    except RuntimeError:  # inference tensors carry no version counter: rebuild every time
        return NativeEngine(model)
    hit = _ENGINES.get(model)
    if hit is not None and hit[0] == key:
        return hit[1]
    eng = NativeEngine(model)
    _ENGINES[model] = (key, eng)
    return eng


def generate_ids(model, prompts: list[list[int]], s: SamplingConfig,
                 stop_ids: set[int] | None = None) -> Iterator[list[int | None]]:
    """Yield, per step, the new id of each prompt (None once that prompt has stopped).

    `model` is a `Transformer` or an engine (anything with a `generate_ids` method).
    """
    eng = engine_for(model) if isinstance(model, Transformer) else model
    return eng.generate_ids(prompts, s, stop_ids)


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


def default_stop_ids(tok: Tokenizer) -> set[int]:
    return {i for i in (tok.eot_id, tok.im_end_id) if i is not None}


def stream(model, tok: Tokenizer, prompt_ids: list[int], s: SamplingConfig,
           stop_ids: set[int] | None = None) -> Iterator[str | Completion]:
    """Yield text pieces, then one final `Completion` (with the whole text and counts).

    `model` is a `Transformer` or an engine (`NativeEngine`, `LlamaCppEngine`).
    """
    stop_ids = default_stop_ids(tok) if stop_ids is None else stop_ids
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


def complete(model, tok: Tokenizer, prompt_ids: list[int], s: SamplingConfig,
             stop_ids: set[int] | None = None) -> Completion:
    final = None
    for item in stream(model, tok, prompt_ids, s, stop_ids):
        if isinstance(item, Completion):
            final = item
    assert final is not None
    return final


def complete_batch(model, tok: Tokenizer, prompts: list[list[int]], s: SamplingConfig,
                   stop_ids: set[int] | None = None) -> list[Completion]:
    """Several prompts decoded together in one batch (stop strings applied per prompt)."""
    stop_ids = default_stop_ids(tok) if stop_ids is None else stop_ids
    streams = [TextStream(tok, s.stop) for _ in prompts]
    texts: list[list[str]] = [[] for _ in prompts]
    counts, reasons = [0] * len(prompts), ["length"] * len(prompts)
    t0 = time.perf_counter()
    for step in generate_ids(model, prompts, s, stop_ids):
        for b, t in enumerate(step):
            ts = streams[b]
            if reasons[b] == "stop":
                continue
            if t is None or ts.stopped:
                reasons[b] = "stop"
                continue
            counts[b] += 1
            texts[b].append(ts.push(t))
            if ts.stopped:
                reasons[b] = "stop"
        if all(r == "stop" for r in reasons):
            break
    dt = time.perf_counter() - t0
    return [Completion("".join(texts[b]) + streams[b].flush(), len(p), counts[b], reasons[b], dt)
            for b, p in enumerate(prompts)]
