"""The luca Transformer: one decoder-only network, read top to bottom.

What is notable:
- Pre-norm blocks: RMSNorm (computed in float32, as Hugging Face does) → attention → residual,
  RMSNorm → SwiGLU MLP → residual.
- RoPE in the "rotate half" layout with base `rope_theta`; cos/sin are computed in float32.
- Grouped-query attention (`n_kv_heads` ≤ `n_heads`) through PyTorch SDPA, so CUDA gets the
  flash / memory-efficient kernels.
- Two switches pick the family, and `config.json` names the matching Hugging Face class:
  neither → `LlamaForCausalLM`; `qkv_bias` → `Qwen2ForCausalLM`; `qk_norm` (per-head RMSNorm on
  q and k before RoPE) → `Qwen3ForCausalLM`. Module names equal Hugging Face's, so a state dict
  moves between the two without renaming. (`family = "gpt2"` names a different network, the
  GPT-2-style baseline of luca/baseline.py, which `luca compare` trains against this one.)
- Tied or untied input/output embeddings.
- Scaled initialisation: residual output projections get std / sqrt(2 · n_layers) (GPT-2).
- Packed sequences: `doc_ids` restricts attention to tokens of the same document and
  `positions` restarts RoPE positions per document (fine-tuning packs conversations this way).
- A preallocated KV cache for generation. The loss is luca/loss.py's, by `loss_impl`: "chunked"
  (the default: the full float32 logits never materialised), "full", or "fused" (luca's Triton
  kernel, luca train's default on CUDA).
- GPU training switches (`Transformer.set_gpu_training` and its kin, in luca/gpu_training.py, set
  by luca.train on CUDA): gate/up and
  q/k/v run as one GEMM each, their weights concatenated in the forward pass (the parameters and
  the checkpoint keep Hugging Face's separate names), with RoPE's and SwiGLU's backward passes in
  luca's kernels (luca/kernels.py); optionally the residual
  stream is kept in BF16 under autocast instead of FP32 (half the bytes through norms and adds).
  With gradient accumulation, `cache_weights` casts the weights to BF16 once per optimizer step for
  all its micro-batches (read only with gradients enabled, so a stale copy is never used), and
  `keep_grads` lets the weight-gradient GEMMs add into kept FP32 gradients instead of autograd
  adding each micro-batch's (1.8% of a micro-batch on an H200). With cached weights, `fold_norms`
  moves each block norm's weight into the cached weights of the fused GEMM after it, so no
  micro-batch sums the norms' weight gradients over its tokens; with kept gradients too,
  `unfold_norm_grads` recovers them once per step (1.3% on an H100).
- This module imports torch and, of luca, only luca.kernels, luca.gpu_training and luca.loss (torch
  only; Triton on use).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields

import torch
import torch.nn as nn
import torch.nn.functional as F

from luca import kernels
from luca.gpu_training import GpuTraining
from luca.loss import head_loss


@dataclass
class ModelConfig:
    vocab_size: int = 8192
    n_layers: int = 6
    d_model: int = 384
    n_heads: int = 6
    n_kv_heads: int = 2
    head_dim: int = 0  # 0: d_model // n_heads
    d_ff: int = 0  # 0: SwiGLU's 8/3 · d_model rounded up to a multiple of 64
    max_seq_len: int = 512
    rope_theta: float = 10000.0
    norm_eps: float = 1e-6
    qk_norm: bool = False
    qkv_bias: bool = False
    tie_embeddings: bool = True
    init_std: float = 0.02
    family: str = "luca"  # luca: this file | gpt2: the matched baseline of luca/baseline.py

    def __post_init__(self) -> None:
        if self.family not in ("luca", "gpt2"):
            raise ValueError(f"family must be luca or gpt2, got {self.family!r}")
        for f in ("vocab_size", "n_layers", "d_model", "n_heads", "n_kv_heads", "max_seq_len"):
            if getattr(self, f) <= 0:  # first: the derivations below divide by them
                raise ValueError(f"{f} must be positive, got {getattr(self, f)}")
        if self.head_dim == 0:
            self.head_dim = self.d_model // self.n_heads
        if self.d_ff == 0:  # GPT-2's MLP is 4 · d_model wide
            self.d_ff = 4 * self.d_model if self.family == "gpt2" else 64 * math.ceil(8 * self.d_model / 3 / 64)
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads ({self.n_heads}) must be a multiple of n_kv_heads ({self.n_kv_heads})")
        if self.head_dim % 2:
            raise ValueError(f"head_dim ({self.head_dim}) must be even for RoPE")
        for f in ("head_dim", "d_ff", "rope_theta", "norm_eps"):
            if not getattr(self, f) > 0:
                raise ValueError(f"{f} must be positive, got {getattr(self, f)}")
        if self.qk_norm and self.qkv_bias:
            raise ValueError("qk_norm (Qwen3) and qkv_bias (Qwen2) together match no Hugging Face family")

    @property
    def arch(self) -> str:
        if self.family == "gpt2":
            return "gpt2"
        return "qwen3" if self.qk_norm else "qwen2" if self.qkv_bias else "llama"

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown model config keys: {sorted(unknown)}")
        return cls(**d)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.variance_epsilon = eps

    def forward(self, x: torch.Tensor, scale: bool = True) -> torch.Tensor:
        """`scale=False`: without the weight, which the next GEMM's weights then carry (`fold_norms`)."""
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        return self.weight * x.to(dtype) if scale else x.to(dtype)


def rope_cos_sin(positions: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype):
    """cos, sin of shape (B, T, head_dim) for integer positions (B, T), computed in float32."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32) / head_dim))
    freqs = positions.float()[..., None] * inv_freq
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # x: (B, T, H, D), the projections' own layout; cos/sin: (B, T, D)
    cos, sin = cos[:, :, None], sin[:, :, None]
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


class RopeQKV(torch.autograd.Function):
    """q, k with RoPE and v, each (B, T, heads, D) in qkv's dtype, from the fused projection's output
    (B, T, (H + 2·KV)·D); the backward is luca's kernel, `kernels.rope_qkv_backward`."""

    @staticmethod
    def forward(ctx, qkv, cos, sin, n_heads: int, n_kv: int):
        B, T, _ = qkv.shape
        D = qkv.shape[-1] // (n_heads + 2 * n_kv)
        q, k, v = qkv.split([n_heads * D, n_kv * D, n_kv * D], dim=-1)
        ctx.save_for_backward(cos, sin)
        return (kernels.cast(apply_rope(q.view(B, T, n_heads, D), cos, sin), qkv.dtype),
                kernels.cast(apply_rope(k.view(B, T, n_kv, D), cos, sin), qkv.dtype), v.reshape(B, T, n_kv, D))

    @staticmethod
    def backward(ctx, dq, dk, dv):
        cos, sin = ctx.saved_tensors
        return kernels.rope_qkv_backward(dq, dk, dv, cos, sin), None, None, None, None


class _Wgrad32(torch.autograd.Function):
    """x @ w.T in the autocast dtype, as autocast computes it, except that the weight's gradient comes
    out of the GEMM in FP32 (cuBLAS accumulates in FP32 anyway) instead of being rounded to BF16 and
    then cast up to the FP32 parameter's dtype in a separate pass."""

    @staticmethod
    def forward(ctx, x, w, dtype, wb, acc, token):
        xb, wb = kernels.cast(x, dtype), (kernels.cast(w, dtype) if wb is None else wb)
        ctx.save_for_backward(xb, wb)
        ctx.acc = acc  # not saved: saving would check its version, which every add bumps
        return xb @ wb.t()

    @staticmethod
    def backward(ctx, gy):
        xb, wb = ctx.saved_tensors
        a, b = gy.reshape(-1, gy.shape[-1]).t(), xb.reshape(-1, xb.shape[-1])
        if ctx.acc is not None:  # the GEMM adds into the kept gradient; autograd gets nothing to add
            return gy @ wb, None, None, None, None, kernels.mm_into(ctx.acc, a, b)
        return gy @ wb, kernels.mm_fp32(a, b), None, None, None, None


class _EmbedInto(torch.autograd.Function):
    """The embedding lookup, whose backward scatters the rows' gradients straight into the weight's
    kept FP32 gradient (`kernels.embedding_into`, Transformer.keep_grads)."""

    @staticmethod
    def forward(ctx, ids, weight, acc, token):
        ctx.save_for_backward(ids)
        ctx.acc = acc  # as _Wgrad32's
        return F.embedding(ids, weight)

    @staticmethod
    def backward(ctx, g):
        return None, None, None, kernels.embedding_into(ctx.acc, ctx.saved_tensors[0], g)


def _lp_usable(lp: torch.Tensor | None, x: torch.Tensor) -> bool:
    """Whether a training forward on x reads the cached low-precision weight `lp` (`cache_weights`)."""
    dev = x.device.type
    return (lp is not None and torch.is_grad_enabled() and torch.is_autocast_enabled(dev)
            and torch.get_autocast_dtype(dev) == lp.dtype)


def linear(x: torch.Tensor, weight: torch.Tensor, wgrad32: bool, bias: torch.Tensor | None = None,
           cached: torch.Tensor | None = None, acc: torch.Tensor | None = None,
           token: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear; with `wgrad32` under autocast (and no bias), FP32 weight gradients from the GEMM.
    `cached`: the weight already cast to the autocast dtype (`cache_weights`), read instead of a
    new cast in a training forward. `acc`, `token`: the weight's kept gradient, which the GEMM adds
    to, and the model's `grad_token` (`keep_grads`)."""
    if wgrad32 and bias is None and weight.dtype == torch.float32 and torch.is_autocast_enabled(x.device.type):
        dtype = torch.get_autocast_dtype(x.device.type)
        use = _lp_usable(cached, x)
        into = acc is not None and token is not None and torch.is_grad_enabled()
        return _Wgrad32.apply(x, weight, dtype, cached if use else None, acc if into else None,
                              token if into else None)
    return F.linear(x, weight, bias)


def proj(m: nn.Module, x: torch.Tensor, wgrad32: bool, cached: bool = False,
         token: torch.Tensor | None = None) -> torch.Tensor:
    """A projection module applied to x: through `linear` with `wgrad32` (set only for nn.Linear),
    from its cached low-precision weight with `cached`, into its kept gradient with `token`."""
    if not wgrad32:
        return m(x)
    return linear(x, m.weight, True, m.bias, m.weight_lp if cached else None,
                  m.weight.grad if token is not None else None, token)


def kept_buffer(buf: torch.Tensor | None, part: nn.Linear) -> torch.Tensor | None:
    """A fused GEMM's kept gradient buffer (`keep_grads`), unless its parts' gradients were freed
    since (zero_grad's default): then autograd's way. `.grad` is read only when keeping, so other
    models' compiled graphs do not guard on it (it changes between micro-batches: a recompile)."""
    return buf if buf is not None and part.weight.grad is not None else None


class KVCache:
    """Preallocated keys and values for every layer: (n_layers, B, n_kv_heads, max_len, head_dim)."""

    def __init__(self, cfg: ModelConfig, batch_size: int, max_len: int, device=None, dtype=torch.float32):
        shape = (cfg.n_layers, batch_size, cfg.n_kv_heads, max_len, cfg.head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.pos = 0  # tokens already stored
        self.max_len = max_len

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        t = k.shape[2]
        self.k[layer, :, :, self.pos:self.pos + t] = k
        self.v[layer, :, :, self.pos:self.pos + t] = v
        return self.k[layer, :, :, :self.pos + t], self.v[layer, :, :, :self.pos + t]

    def reset(self) -> None:
        self.pos = 0


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.cfg, self.layer = cfg, layer
        hd = cfg.head_dim
        self.q_proj = nn.Linear(cfg.d_model, cfg.n_heads * hd, bias=cfg.qkv_bias)
        self.k_proj = nn.Linear(cfg.d_model, cfg.n_kv_heads * hd, bias=cfg.qkv_bias)
        self.v_proj = nn.Linear(cfg.d_model, cfg.n_kv_heads * hd, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(cfg.n_heads * hd, cfg.d_model, bias=False)
        if cfg.qk_norm:
            self.q_norm = RMSNorm(hd, cfg.norm_eps)
            self.k_norm = RMSNorm(hd, cfg.norm_eps)
        self.fused = False  # q, k, v as one GEMM (Transformer.set_gpu_training)
        self.wgrad32 = False  # weight gradients straight from the GEMM in FP32 (`linear`)
        self.cached = False  # the projections read weights cast once per step (Transformer.cache_weights)
        self.qkv_lp: torch.Tensor | None = None  # the fused GEMM's cached low-precision weight
        self.grad_token: torch.Tensor | None = None  # set: GEMMs add into kept gradients (Transformer.keep_grads)
        self.qkv_grad: torch.Tensor | None = None  # the fused weight's kept gradient (q, k, v's are views)
        self.fold_norm = False  # the input norm's weight folded into the fused GEMM's (Transformer.set_gpu_training)
        self.lp_folded = False  # qkv_lp holds the weights times the norm's weight (cache_weights)
        self.folded_grad: torch.Tensor | None = None  # kept gradient of those folded weights (keep_grads)

    def reads_folded(self, x: torch.Tensor) -> bool:
        """Whether this forward reads the cached weights with the norm's weight folded in: then the
        block feeds it the norm's output without its weight (Transformer.set_gpu_training)."""
        return self.fused and self.lp_folded and self.cached and _lp_usable(self.qkv_lp, x)

    def forward(self, x, cos, sin, mask=None, cache: KVCache | None = None, norm_weight=None):
        B, T, _ = x.shape
        cfg = self.cfg
        if self.fused:
            # One GEMM instead of three (and one in each backward product). Under torch.compile the
            # concatenation fuses with the weights' cast to BF16, which autocast makes anyway.
            lins = (self.q_proj, self.k_proj, self.v_proj)
            bias = torch.cat([m.bias for m in lins]) if cfg.qkv_bias else None
            w = torch.cat([m.weight for m in lins])
            # norm_weight: x is normed without its weight, so the GEMM's weights carry it (read from
            # qkv_lp; the product here is what autograd differentiates if the GEMM ever does not).
            qkv = linear(x, w if norm_weight is None else w * norm_weight, self.wgrad32, bias,
                         cached=self.qkv_lp if self.cached else None, token=self.grad_token,
                         acc=kept_buffer(self.qkv_grad if norm_weight is None else self.folded_grad, self.q_proj))
        if self.fused and not cfg.qk_norm and cache is None:
            # RoPE with a backward that writes the fused GEMM's gradient in one pass (luca/kernels.py)
            q, k, v = RopeQKV.apply(qkv, cos, sin, cfg.n_heads, cfg.n_kv_heads)
        else:
            if self.fused:
                q, k, v = qkv.split([m.out_features for m in lins], dim=-1)
            else:
                q, k, v = (proj(m, x, self.wgrad32, self.cached, self.grad_token)
                           for m in (self.q_proj, self.k_proj, self.v_proj))
            q = q.view(B, T, cfg.n_heads, cfg.head_dim)
            k = k.view(B, T, cfg.n_kv_heads, cfg.head_dim)
            v = v.view(B, T, cfg.n_kv_heads, cfg.head_dim)
            if cfg.qk_norm:
                q, k = self.q_norm(q), self.k_norm(k)
            # RoPE in the projections' (B, T, H, D) layout, then the transpose (a view) to SDPA's.
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        if cache is not None:
            k, v = cache.update(self.layer, k.to(cache.k.dtype), v.to(cache.v.dtype))
            k, v = k.to(q.dtype), v.to(q.dtype)
        if mask is None:
            # Causal; with a cache and T > 1 the new queries sit at the end of the key range.
            is_causal = T > 1 and k.shape[2] == T
            if T > 1 and not is_causal:
                mask = _causal_mask(T, k.shape[2], x.device)
        else:
            is_causal = False
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal,
                                           enable_gqa=cfg.n_kv_heads != cfg.n_heads)
        y = y.transpose(1, 2).reshape(B, T, cfg.n_heads * cfg.head_dim)
        return proj(self.o_proj, y, self.wgrad32, self.cached, self.grad_token)


def _causal_mask(t_q: int, t_k: int, device) -> torch.Tensor:
    """Boolean mask (t_q, t_k): query i (the last t_q of t_k positions) sees keys ≤ its position."""
    return torch.ones(t_q, t_k, dtype=torch.bool, device=device).tril(diagonal=t_k - t_q)


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.d_model, cfg.d_ff, bias=False)
        self.up_proj = nn.Linear(cfg.d_model, cfg.d_ff, bias=False)
        self.down_proj = nn.Linear(cfg.d_ff, cfg.d_model, bias=False)
        self.fused = False  # gate and up as one GEMM (Transformer.set_gpu_training)
        self.wgrad32 = self.cached = False  # as Attention's
        self.gate_up_lp: torch.Tensor | None = None  # the fused GEMM's cached low-precision weight
        self.grad_token: torch.Tensor | None = None  # as Attention's
        self.gate_up_grad: torch.Tensor | None = None
        self.fold_norm = self.lp_folded = False  # as Attention's
        self.folded_grad: torch.Tensor | None = None

    def reads_folded(self, x: torch.Tensor) -> bool:
        """As Attention's."""
        return self.fused and self.lp_folded and self.cached and _lp_usable(self.gate_up_lp, x)

    def forward(self, x, norm_weight=None):
        if self.fused:  # as Attention's q, k, v
            w = torch.cat([self.gate_proj.weight, self.up_proj.weight])
            gu = linear(x, w if norm_weight is None else w * norm_weight, self.wgrad32,
                        cached=self.gate_up_lp if self.cached else None, token=self.grad_token,
                        acc=kept_buffer(self.gate_up_grad if norm_weight is None else self.folded_grad, self.gate_proj))
            h = kernels.SwiGLU.apply(gu)  # its backward reads gate, up and d h once (luca/kernels.py)
        else:
            gate, up = (proj(m, x, self.wgrad32, self.cached, self.grad_token) for m in (self.gate_proj, self.up_proj))
            h = F.silu(gate) * up
        return proj(self.down_proj, h, self.wgrad32, self.cached, self.grad_token)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.self_attn = Attention(cfg, layer)
        self.post_attention_layernorm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin, mask=None, cache=None):
        n1, n2 = self.input_layernorm, self.post_attention_layernorm
        g = n1.weight if self.self_attn.reads_folded(x) else None  # folded into the GEMM's weights
        x = x + self.self_attn(n1(x, scale=g is None), cos, sin, mask, cache, norm_weight=g)
        g = n2.weight if self.mlp.reads_folded(x) else None
        return x + self.mlp(n2(x, scale=g is None), norm_weight=g)


class Backbone(nn.Module):
    """Embeddings, blocks and final norm: Hugging Face's `model.` prefix."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)


class Transformer(GpuTraining, nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        if cfg.family != "luca":
            raise ValueError(f"Transformer builds family 'luca'; family {cfg.family!r} is luca.baseline's")
        self.cfg = cfg
        self.model = Backbone(cfg)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.gradient_checkpointing = False
        self.loss_impl = "chunked"  # or "full": see the module docstring
        self.low_precision_residual = False  # the residual stream in the autocast dtype (set_gpu_training)
        self.fp8_head = False  # the fused head's GEMMs in FP8 (set_gpu_training, luca/fp8_head.py)
        self._cached_pairs: list[tuple[torch.Tensor, torch.Tensor]] = []  # (low-precision copy, weight)
        self._folded_pairs: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []  # (copy, weight, norm's weight)
        self.grad_token: torch.Tensor | None = None  # set while gradients are kept (keep_grads)
        self.init_rope()
        self.reset_parameters()

    def init_rope(self) -> None:
        """(Re)build the cos/sin tables for positions 0 … max_seq_len-1 (not saved; call after a meta-device
        build). A table read is cheap; computing cos/sin inside the compiled graph was not: the compiler
        fused it into every layer's RoPE kernel and spent ~13% of a GPU training step on it."""
        pos = torch.arange(self.cfg.max_seq_len, device="cpu")[None]
        cos, sin = rope_cos_sin(pos, self.cfg.head_dim, self.cfg.rope_theta, torch.float32)
        self.register_buffer("rope_cos", cos[0], persistent=False)
        self.register_buffer("rope_sin", sin[0], persistent=False)

    def reset_parameters(self, seed: int | None = None) -> None:
        gen = torch.Generator().manual_seed(seed) if seed is not None else None
        std = self.cfg.init_std
        for name, p in self.named_parameters():
            if name.endswith("norm.weight") or name.endswith("layernorm.weight"):
                nn.init.ones_(p)
            elif name.endswith(".bias"):
                nn.init.zeros_(p)
            else:
                s = std / math.sqrt(2 * self.cfg.n_layers) if name.endswith(("o_proj.weight", "down_proj.weight")) else std
                with torch.no_grad():
                    p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float32) * s)

    def num_parameters(self, non_embedding: bool = False) -> int:
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            n -= self.model.embed_tokens.weight.numel()
        return n

    def hidden_states(self, tokens: torch.Tensor, positions: torch.Tensor | None = None,
                      doc_ids: torch.Tensor | None = None, cache: KVCache | None = None) -> torch.Tensor:
        """Final-normed hidden states (B, T, d_model) for token ids (B, T)."""
        B, T = tokens.shape
        start = cache.pos if cache is not None else 0
        emb = self.model.embed_tokens
        if self.grads_kept and torch.is_grad_enabled() and type(emb) is nn.Embedding and emb.weight.grad is not None:
            x = _EmbedInto.apply(tokens, emb.weight, emb.weight.grad, self.grad_token)
        else:
            x = emb(tokens)
        if self.low_precision_residual and torch.is_autocast_enabled(x.device.type):
            x = x.to(torch.get_autocast_dtype(x.device.type))  # residual adds then stay in BF16
        if positions is None and start + T <= self.rope_cos.shape[0]:
            cos = self.rope_cos[start:start + T].to(x.dtype).expand(B, T, -1)
            sin = self.rope_sin[start:start + T].to(x.dtype).expand(B, T, -1)
        else:
            if positions is None:
                positions = torch.arange(start, start + T, device=tokens.device).expand(B, T)
            cos, sin = rope_cos_sin(positions, self.cfg.head_dim, self.cfg.rope_theta, x.dtype)
        mask = None
        if doc_ids is not None:
            same_doc = doc_ids[:, :, None] == doc_ids[:, None, :]
            mask = (same_doc & _causal_mask(T, T, tokens.device))[:, None]  # (B, 1, T, T)
        for block in self.model.layers:
            if self.gradient_checkpointing and self.training:
                x = torch.utils.checkpoint.checkpoint(block, x, cos, sin, mask, cache, use_reentrant=False)
            else:
                x = block(x, cos, sin, mask, cache)
        if cache is not None:
            cache.pos += T
        return self.model.norm(x)

    def forward(self, tokens: torch.Tensor, targets: torch.Tensor | None = None, *,
                positions: torch.Tensor | None = None, doc_ids: torch.Tensor | None = None,
                cache: KVCache | None = None, reduction: str = "mean") -> torch.Tensor:
        """Logits (B, T, vocab) when `targets` is None, else the cross-entropy loss.

        Targets equal to -100 are ignored. `reduction` is "mean" (over counted targets), "sum" or
        "none" (per-token losses, shape (B, T), zero where ignored).
        """
        h = self.hidden_states(tokens, positions, doc_ids, cache)
        if targets is None:
            return self.lm_head(h)
        return head_loss(self.loss_impl, h, self.lm_head, targets, reduction, self.weights_cached, self.grads_kept,
                         self.fp8_head)
