"""Compression pressure: auxiliary predict-ahead objectives, for training only; and `build_model`.

What is notable:
- `[aux] kind = "bottleneck"` (the compression-pressure variant): the residual stream after block
  `layer` (default: half the depth) is squeezed through a `dim`-wide linear bottleneck
  (`down`: d_model → dim, no bias), and from that code alone `ahead` small heads (`up[j]`: dim →
  d_model, then an RMSNorm) must predict the tokens t+1 … t+ahead through the model's own output
  embedding. The pressure lands on the blocks below the tap: they have to keep a low-dimensional
  summary of where the text is going in the residual stream, in the spirit of the reference
  research (compressing the past into what predicts the future).
- `[aux] kind = "mtp"`: multi-token prediction from the final hidden states: head j (a d_model ×
  d_model matrix, then an RMSNorm) predicts token t+1+j, for j = 1 … ahead.
- loss = LM loss + weight · mean over heads of their cross-entropies. The value returned (and
  logged) is the LM loss alone, with the auxiliary gradient attached: `main + (w·aux −
  (w·aux).detach())`, so training logs of every variant compare directly; `last_aux` keeps the
  auxiliary loss (a device tensor, never read back here).
- The output embedding is shared read-only (detached) by the heads: the auxiliary objective shapes
  the trunk through the tap, not the unembedding. Heads are fed through the fused chunked
  cross-entropy, so no (tokens × vocab) logits are held.
- It is switched off at inference: in eval mode, or with `reduction="none"` (validation BPB,
  evaluation), the wrapper is exactly its trunk. `rundir.save_model(wrapper.trunk, ...)` exports
  a standard Llama / Qwen (or GPT-2) model; the heads live only in `train_state/` checkpoints, so
  a resumed run continues bitwise.
- The wrapper calls the trunk's own forward for the LM loss and reads its tap (block `layer`'s
  output; for mtp the last block's, through the trunk's final norm) with a forward hook: no copy of
  model.py's forward; it works on luca's Transformer and on the GPT-2 baseline alike, eager or
  under torch.compile.
- `build_model(model_cfg, aux)` is what training builds: luca's Transformer or the GPT-2 baseline
  (`model.family`), wrapped when an auxiliary objective is asked for.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn as nn

from luca.errors import LucaError
from luca.loss import chunked_cross_entropy
from luca.model import ModelConfig, RMSNorm, Transformer

KINDS = ("none", "bottleneck", "mtp")


@dataclass
class AuxConfig:
    kind: str = "none"  # none | bottleneck | mtp
    weight: float = 0.1  # loss = LM loss + weight · mean of the heads' losses
    layer: int = 0  # bottleneck: tap the residual stream after this many blocks (0: half the depth)
    dim: int = 32  # bottleneck width
    ahead: int = 4  # bottleneck: predict t+1 … t+ahead; mtp: t+2 … t+1+ahead

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"kind must be one of {', '.join(KINDS)}, got {self.kind!r}")
        if self.weight < 0:
            raise ValueError(f"weight must be ≥ 0, got {self.weight}")
        for f in ("dim", "ahead"):
            if getattr(self, f) < 1:
                raise ValueError(f"{f} must be ≥ 1, got {getattr(self, f)}")
        if self.layer < 0:
            raise ValueError(f"layer must be ≥ 0, got {self.layer}")

    def to_dict(self) -> dict:
        return asdict(self)


def build_model(model_cfg: ModelConfig, aux: AuxConfig | dict | None = None) -> nn.Module:
    """The network training builds for these configs (initialised; `reset_parameters(seed)` reseeds)."""
    if model_cfg.family == "gpt2":
        from luca.baseline import GPT2
        try:
            trunk = GPT2(model_cfg)
        except ValueError as e:
            raise LucaError(f"[model]: {e}") from None
    else:
        trunk = Transformer(model_cfg)
    aux = AuxConfig(**aux) if isinstance(aux, dict) else aux
    if aux is None or aux.kind == "none":
        return trunk
    try:
        return AuxiliaryObjective(trunk, aux)
    except ValueError as e:
        raise LucaError(f"[aux]: {e}") from None


def blocks_of(trunk: nn.Module) -> nn.ModuleList:
    return trunk.model.layers if hasattr(trunk, "model") else trunk.transformer.h


def final_norm_of(trunk: nn.Module) -> nn.Module:
    return trunk.model.norm if hasattr(trunk, "model") else trunk.transformer.ln_f


class AuxiliaryObjective(nn.Module):
    """A trunk (Transformer or GPT2) plus training-only predict-ahead heads."""

    def __init__(self, trunk: nn.Module, aux: AuxConfig):
        super().__init__()
        self.trunk, self.aux_cfg = trunk, aux
        cfg = trunk.cfg
        d = cfg.d_model
        if aux.kind == "bottleneck":
            self.layer = aux.layer or max(1, cfg.n_layers // 2)
            if self.layer > cfg.n_layers:
                raise ValueError(f"aux.layer={aux.layer} is beyond the model's {cfg.n_layers} blocks")
            self.down = nn.Linear(d, aux.dim, bias=False)
            self.heads = nn.ModuleList(nn.Linear(aux.dim, d, bias=False) for _ in range(aux.ahead))
            self.offsets = list(range(1, aux.ahead + 1))
        else:
            self.layer = cfg.n_layers  # the last block's output, then the trunk's own final norm
            self.down = None
            self.heads = nn.ModuleList(nn.Linear(d, d, bias=False) for _ in range(aux.ahead))
            self.offsets = list(range(2, aux.ahead + 2))
        self._taps: list[torch.Tensor] = []
        # A hook on a block (luca's own module): torch.compile runs it, as it does not for a hook on a
        # built-in nn.LayerNorm (GPT-2's final norm).
        blocks_of(trunk)[self.layer - 1].register_forward_hook(self._tap)
        self.norms = nn.ModuleList(RMSNorm(d, cfg.norm_eps) for _ in range(aux.ahead))
        self.last_aux: torch.Tensor | None = None
        self._reset_heads(None)

    @property
    def cfg(self) -> ModelConfig:
        return self.trunk.cfg

    # The training loop sets these on the model it built; they belong to the trunk.
    @property
    def loss_impl(self) -> str:
        return self.trunk.loss_impl

    @loss_impl.setter
    def loss_impl(self, v: str) -> None:
        self.trunk.loss_impl = v

    @property
    def gradient_checkpointing(self) -> bool:
        return self.trunk.gradient_checkpointing

    @gradient_checkpointing.setter
    def gradient_checkpointing(self, v: bool) -> None:
        self.trunk.gradient_checkpointing = v

    def _tap(self, module, inputs, output) -> None:
        if self.training:
            self._taps.append(output)

    def reset_parameters(self, seed: int | None = None) -> None:
        self.trunk.reset_parameters(seed)
        self._reset_heads(None if seed is None else seed + 1)

    def _reset_heads(self, seed: int | None) -> None:
        gen = torch.Generator().manual_seed(seed) if seed is not None else None
        mods = ([self.down] if self.down is not None else []) + list(self.heads)
        for m in mods:
            with torch.no_grad():
                m.weight.copy_(torch.randn(m.weight.shape, generator=gen) * self.cfg.init_std)
        for n in self.norms:
            nn.init.ones_(n.weight)

    def num_parameters(self, non_embedding: bool = False) -> int:
        """The exported model's count (the heads are not part of it)."""
        return self.trunk.num_parameters(non_embedding)

    def aux_parameters(self) -> int:
        return sum(p.numel() for n, p in self.named_parameters() if not n.startswith("trunk."))

    def extra_matmul_params(self) -> int:
        """Per token, the heads' readouts through the (shared) output embedding: for FLOP counts."""
        return len(self.heads) * self.cfg.vocab_size * self.cfg.d_model

    def hidden_states(self, *a, **kw) -> torch.Tensor:
        return self.trunk.hidden_states(*a, **kw)

    @property
    def lm_head(self) -> nn.Linear:
        return self.trunk.lm_head

    def forward(self, tokens: torch.Tensor, targets: torch.Tensor | None = None, *,
                reduction: str = "mean", **kw) -> torch.Tensor:
        if targets is None or not self.training or reduction == "none" or kw:
            return self.trunk(tokens, targets, reduction=reduction, **kw)
        self._taps = []
        main = self.trunk(tokens, targets, reduction=reduction)
        tap = self._taps[0]
        src = final_norm_of(self.trunk)(tap) if self.down is None else self.down(tap)
        self._taps = []
        w = self.trunk.lm_head.weight.detach()
        T = targets.shape[1]
        losses = []
        for head, norm, k in zip(self.heads, self.norms, self.offsets):
            if k > T:
                continue
            # target of position t at offset k is token t+k = targets[:, t+k-1]
            tgt = torch.nn.functional.pad(targets[:, k - 1:], (0, k - 1), value=-100)
            losses.append(chunked_cross_entropy(norm(head(src)), w, tgt, "mean"))
        if not losses:
            return main
        aux = torch.stack(losses).mean() * self.aux_cfg.weight
        self.last_aux = aux.detach()
        return main + (aux - aux.detach())
