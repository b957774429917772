"""The matched baseline: a GPT-2-style Transformer, for `luca compare` against luca's recipe.

What is notable:
- GPT-2 exactly as Hugging Face's `GPT2LMHeadModel` computes it: pre-norm blocks with LayerNorm
  (weight and bias) → multi-head attention (one fused `c_attn` projection with bias, no GQA) →
  residual, LayerNorm → MLP `c_fc` (4 · d_model unless `d_ff` says otherwise) → GELU (tanh form,
  HF's "gelu_new") → `c_proj` → residual; learned absolute position embeddings `wpe` (so the
  context can never exceed `max_seq_len`); a final LayerNorm; tied or untied output head.
- Selected by `[model] family = "gpt2"` and read from the same `ModelConfig` as luca's model:
  `vocab_size`, `n_layers`, `d_model`, `n_heads` (= `n_kv_heads`), `d_ff`, `max_seq_len`,
  `norm_eps`, `tie_embeddings`, `init_std`. RoPE, QK-norm and `qkv_bias` mean nothing here and
  are refused when set.
- Initialisation as GPT-2 / nanoGPT: N(0, init_std) for matrices and both embeddings, zero
  biases, residual output projections scaled by 1/sqrt(2 · n_layers). It trains with the same
  AdamW and schedule as luca's model (luca/optim.py): the grouping rule there decays every matrix
  whose name lacks "embed", so `wte`/`wpe` are decayed, as nanoGPT does.
- Parameter names are HF's (`transformer.h.0.attn.c_attn.weight`, ...). HF stores those
  projections as `Conv1D` (weight shaped in × out); here they are `nn.Linear` (out × in), so
  `hf_state_dict` / `from_hf` transpose them. A run directory of the baseline is therefore a
  plain HF GPT-2 checkpoint (`config.json` names `GPT2LMHeadModel`) that
  `transformers.AutoModelForCausalLM` loads to the same logits, and `rundir.load_model` loads back.
- The same calling convention as `luca.model.Transformer` (`model(tokens)` → logits,
  `model(tokens, targets, reduction=...)` → loss through the fused chunked cross-entropy or,
  with `loss_impl = "full"` / `"fused"`, luca.loss's other paths (`head_loss`); `positions=`, `doc_ids=`, `cache=KVCache`), so the
  training loop, validation BPB, `evaluate.bpb` and the diagnostics run it unchanged; and the
  engine protocol (`generate_ids`), so `luca run`'s samples and `luca generate` work. (The
  benchmark harness of luca/evaluate and the native engine's fused kernels read luca's
  Transformer internals and do not take it.)
- Imports torch and luca.model (KVCache, the head's loss) only.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from luca.loss import head_loss
from luca.model import KVCache, ModelConfig

# Modules whose HF weights are Conv1D (in × out): transposed on the way in and out.
_CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")


def check_config(cfg: ModelConfig) -> None:
    """Refuse settings that the GPT-2 architecture cannot honour (rather than ignore them)."""
    if cfg.family != "gpt2":
        raise ValueError(f"GPT2 needs family 'gpt2', got {cfg.family!r}")
    if cfg.n_kv_heads != cfg.n_heads:
        raise ValueError(f"family gpt2 has no grouped-query attention: n_kv_heads ({cfg.n_kv_heads}) must equal "
                         f"n_heads ({cfg.n_heads})")
    if cfg.head_dim * cfg.n_heads != cfg.d_model:
        raise ValueError(f"family gpt2 needs head_dim · n_heads = d_model ({cfg.head_dim} · {cfg.n_heads} ≠ "
                         f"{cfg.d_model})")
    if cfg.qk_norm or cfg.qkv_bias:
        raise ValueError("family gpt2: qk_norm and qkv_bias do not apply (its attention always has biases)")


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.cfg, self.layer = cfg, layer
        self.c_attn = nn.Linear(cfg.d_model, 3 * cfg.d_model)
        self.c_proj = nn.Linear(cfg.d_model, cfg.d_model)

    def forward(self, x, mask=None, cache: KVCache | None = None):
        B, T, D = x.shape
        H, hd = self.cfg.n_heads, self.cfg.head_dim
        q, k, v = (t.view(B, T, H, hd).transpose(1, 2) for t in self.c_attn(x).split(D, dim=2))
        if cache is not None:
            k, v = cache.update(self.layer, k.to(cache.k.dtype), v.to(cache.v.dtype))
            k, v = k.to(q.dtype), v.to(q.dtype)
        is_causal = False
        if mask is None:
            # Causal; with a cache and T > 1 the new queries sit at the end of the key range.
            is_causal = T > 1 and k.shape[2] == T
            if T > 1 and not is_causal:
                mask = torch.ones(T, k.shape[2], dtype=torch.bool, device=x.device).tril(k.shape[2] - T)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal)
        return self.c_proj(y.transpose(1, 2).reshape(B, T, D))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.c_fc = nn.Linear(cfg.d_model, cfg.d_ff)
        self.c_proj = nn.Linear(cfg.d_ff, cfg.d_model)

    def forward(self, x):
        return self.c_proj(F.gelu(self.c_fc(x), approximate="tanh"))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps)
        self.attn = Attention(cfg, layer)
        self.ln_2 = nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, mask=None, cache=None):
        x = x + self.attn(self.ln_1(x), mask, cache)
        return x + self.mlp(self.ln_2(x))


class Trunk(nn.Module):
    """Embeddings, blocks and final norm: Hugging Face's `transformer.` prefix."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.wte = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.wpe = nn.Embedding(cfg.max_seq_len, cfg.d_model)
        self.h = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layers))
        self.ln_f = nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps)


class GPT2(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        check_config(cfg)
        self.cfg = cfg
        self.transformer = Trunk(cfg)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.transformer.wte.weight
        self.gradient_checkpointing = False
        self.loss_impl = "chunked"  # or "full" / "fused", as luca.model.Transformer
        self.reset_parameters()

    @property
    def layers(self) -> nn.ModuleList:
        return self.transformer.h

    def reset_parameters(self, seed: int | None = None) -> None:
        gen = torch.Generator().manual_seed(seed) if seed is not None else None
        std = self.cfg.init_std
        for name, p in self.named_parameters():
            if ".ln_" in name:
                nn.init.ones_(p) if name.endswith(".weight") else nn.init.zeros_(p)
            elif name.endswith(".bias"):
                nn.init.zeros_(p)
            else:
                s = std / math.sqrt(2 * self.cfg.n_layers) if name.endswith("c_proj.weight") else std
                with torch.no_grad():
                    p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float32) * s)

    def num_parameters(self, non_embedding: bool = False) -> int:
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            n -= self.transformer.wte.weight.numel() + self.transformer.wpe.weight.numel()
        return n

    def hidden_states(self, tokens: torch.Tensor, positions: torch.Tensor | None = None,
                      doc_ids: torch.Tensor | None = None, cache: KVCache | None = None) -> torch.Tensor:
        """Final-normed hidden states (B, T, d_model) for token ids (B, T)."""
        B, T = tokens.shape
        start = cache.pos if cache is not None else 0
        if positions is None:
            positions = torch.arange(start, start + T, device=tokens.device).expand(B, T)
        x = self.transformer.wte(tokens) + self.transformer.wpe(positions)
        mask = None
        if doc_ids is not None:
            same_doc = doc_ids[:, :, None] == doc_ids[:, None, :]
            causal = torch.ones(T, T, dtype=torch.bool, device=tokens.device).tril()
            mask = (same_doc & causal)[:, None]
        for block in self.transformer.h:
            if self.gradient_checkpointing and self.training:
                x = torch.utils.checkpoint.checkpoint(block, x, mask, cache, use_reentrant=False)
            else:
                x = block(x, mask, cache)
        if cache is not None:
            cache.pos += T
        return self.transformer.ln_f(x)

    def forward(self, tokens: torch.Tensor, targets: torch.Tensor | None = None, *,
                positions: torch.Tensor | None = None, doc_ids: torch.Tensor | None = None,
                cache: KVCache | None = None, reduction: str = "mean") -> torch.Tensor:
        """Logits (B, T, vocab) when `targets` is None, else the cross-entropy loss (-100 ignored)."""
        h = self.hidden_states(tokens, positions, doc_ids, cache)
        if targets is None:
            return self.lm_head(h)
        return head_loss(self.loss_impl, h, self.lm_head, targets, reduction)

    # -- generation ---------------------------------------------------------------------------
    @torch.inference_mode()
    def generate_ids(self, prompts: list[list[int]], s, stop_ids: set[int] | None = None):
        """luca.engine's engine protocol: per step, each prompt's new id (None once it stopped).

        KV-cached; the sampling rules are the engine's (`sample_next`). Prompts of different lengths
        run one after another (no padding masks here), interleaved step by step."""
        from luca.engine import sample_next  # sampling lives in the engine (floor 3); imported on use
        if len({len(p) for p in prompts}) > 1:
            its = [self.generate_ids([p], s, stop_ids) for p in prompts]
            while True:
                step = [next(it, [None])[0] for it in its]
                if all(x is None for x in step):
                    return
                yield step
        device = next(self.parameters()).device
        B, T0 = len(prompts), len(prompts[0])
        if T0 == 0:
            raise ValueError("empty prompt")
        if T0 + s.max_new_tokens > self.cfg.max_seq_len:
            raise ValueError(f"prompt ({T0} tokens) + max_new_tokens ({s.max_new_tokens}) exceeds the context "
                             f"({self.cfg.max_seq_len})")
        gen = torch.Generator(device=device).manual_seed(s.seed) if s.seed is not None else None
        cache = KVCache(self.cfg, B, T0 + s.max_new_tokens, device=device, dtype=next(self.parameters()).dtype)
        history = torch.tensor(prompts, dtype=torch.long, device=device)
        logits = self(history, cache=cache)[:, -1]
        done = torch.zeros(B, dtype=torch.bool, device=device)
        stop = torch.tensor(sorted(stop_ids or []), dtype=torch.long, device=device)
        for _ in range(s.max_new_tokens):
            nxt = sample_next(logits, history if s.repetition_penalty != 1.0 else None, s, gen)
            is_stop = torch.isin(nxt, stop) if stop.numel() else torch.zeros_like(done)
            yield [None if (done[b] or is_stop[b]) else int(nxt[b]) for b in range(B)]
            done |= is_stop
            if bool(done.all()):
                return
            history = torch.cat([history, nxt[:, None]], 1)
            logits = self(nxt[:, None], cache=cache)[:, -1]

    # -- Hugging Face GPT2LMHeadModel ---------------------------------------------------------
    def hf_config(self, tok=None) -> dict:
        cfg = self.cfg
        d = {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "vocab_size": cfg.vocab_size,
             "n_positions": cfg.max_seq_len, "n_embd": cfg.d_model, "n_layer": cfg.n_layers,
             "n_head": cfg.n_heads, "n_inner": cfg.d_ff, "activation_function": "gelu_new",
             "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0, "layer_norm_epsilon": cfg.norm_eps,
             "initializer_range": cfg.init_std, "scale_attn_weights": True,
             "scale_attn_by_inverse_layer_idx": False, "reorder_and_upcast_attn": False,
             "tie_word_embeddings": cfg.tie_embeddings, "use_cache": True, "dtype": "bfloat16"}
        if tok is not None:
            d.update(bos_token_id=tok.eot_id, eos_token_id=[i for i in (tok.im_end_id, tok.eot_id) if i is not None],
                     pad_token_id=tok.eot_id)
        return d

    def hf_state_dict(self) -> dict[str, torch.Tensor]:
        """The state dict under HF's names and layouts (Conv1D weights transposed)."""
        return {k: (v.t() if k.endswith(_CONV1D) else v) for k, v in self.state_dict().items()}

    @classmethod
    def from_hf(cls, hf: dict, sd: dict[str, torch.Tensor], where: str = "config.json") -> "GPT2":
        """A GPT2 from an HF GPT-2 config.json dict and its tensors (luca's own or GPT-2's)."""
        act = hf.get("activation_function", "gelu_new")
        if act not in ("gelu_new", "gelu_pytorch_tanh"):
            raise ValueError(f"{where}: activation_function {act!r} is not supported (gelu_new)")
        if hf.get("scale_attn_by_inverse_layer_idx") or hf.get("reorder_and_upcast_attn") \
                or hf.get("scale_attn_weights") is False:
            raise ValueError(f"{where}: GPT-2 attention variants other than the default are not supported")
        cfg = ModelConfig(family="gpt2", vocab_size=hf["vocab_size"], n_layers=hf["n_layer"], d_model=hf["n_embd"],
                          n_heads=hf["n_head"], n_kv_heads=hf["n_head"], d_ff=hf.get("n_inner") or 4 * hf["n_embd"],
                          max_seq_len=hf["n_positions"], norm_eps=hf.get("layer_norm_epsilon", 1e-5),
                          tie_embeddings=bool(hf.get("tie_word_embeddings", True)),
                          init_std=hf.get("initializer_range", 0.02))
        sd = {k: v for k, v in sd.items() if not k.endswith((".attn.bias", ".attn.masked_bias"))}  # old HF buffers
        if cfg.tie_embeddings:
            sd.pop("lm_head.weight", None)
        elif "lm_head.weight" not in sd:
            sd["lm_head.weight"] = sd["transformer.wte.weight"]
        with torch.device("meta"):
            model = cls(cfg)
        expected = set(model.state_dict()) - ({"lm_head.weight"} if cfg.tie_embeddings else set())
        missing, unexpected = expected - set(sd), set(sd) - expected
        if missing or unexpected:
            raise ValueError(f"{where}: weights do not match (missing {sorted(missing)[:4]}, "
                             f"unexpected {sorted(unexpected)[:4]})")
        model.load_state_dict({k: (v.t() if k.endswith(_CONV1D) else v).float().contiguous() for k, v in sd.items()},
                              strict=False, assign=True)
        if cfg.tie_embeddings:
            model.lm_head.weight = model.transformer.wte.weight
        return model
