"""LoRA and QLoRA layers for luca's Transformer, merging, and PEFT-compatible adapter files.

What is notable:
- `apply_lora` swaps any subset of the seven projections (q, k, v, o, gate, up, down) for a
  `LoraLinear` that keeps the frozen base weight (and the Qwen2 q/k/v bias) under the same
  parameter name, so the rest of the model and its state dict are untouched.
- Scaling is α/r, or α/√r with rank-stabilised LoRA (`rslora`). A is Kaiming-uniform, B is zero
  (PEFT's defaults), so step 0 is the base model exactly. Dropout acts on the adapter's input only.
- QLoRA: the base weight is stored as 4-bit NF4 with double-quantised block scales (quantised by
  bitsandbytes, block 64) and dequantised on the fly to the compute dtype in forward and backward;
  nothing of size (out × in) outlives a layer's backward. With gradient checkpointing the
  recomputed forward keeps its dequantised weight for the backward that follows (2 dequantisations
  per step, not 3). On CUDA the dequantisation is luca's own `nf4_dequantize` under torch.compile
  (one fused kernel, bitwise equal to bitsandbytes'), elsewhere bitsandbytes'. Adapters hold FP32
  master weights (as PEFT keeps them for 4-bit bases) and compute in BF16 under autocast; the
  update is added inside the second GEMM (addmm).
- Merging: W' = W + s·B·A in float32, where W is the dequantised NF4 weight for QLoRA (the
  weights the adapter was trained against), written back as a plain BF16 run directory.
- Adapter files use PEFT's names (`adapter_model.safetensors`, `adapter_config.json`, keys
  `base_model.model.<module>.lora_A.weight`), so `peft.PeftModel.from_pretrained` on the base loads
  them too.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from luca.errors import LucaError
from luca.loss import compute_dtype
from luca.model import Transformer

# short name → (submodule of a block, HF module name)
TARGETS: dict[str, tuple[str, str]] = {
    "q": ("self_attn", "q_proj"), "k": ("self_attn", "k_proj"), "v": ("self_attn", "v_proj"),
    "o": ("self_attn", "o_proj"), "gate": ("mlp", "gate_proj"), "up": ("mlp", "up_proj"),
    "down": ("mlp", "down_proj"),
}
NF4_BLOCK = 64
NF4_BLOCK2 = 256  # block of the double-quantised scales
PEFT_PREFIX = "base_model.model."


def parse_targets(value: str | list[str]) -> list[str]:
    """'all' | 'q,k,v' | ['q_proj', 'up'] → the short names in canonical order."""
    items = [value] if isinstance(value, str) else [str(v) for v in value]
    items = [i.strip() for it in items for i in it.split(",") if i.strip()]
    if not items:
        raise LucaError("finetune.targets: empty (use 'all' or a list such as q,k,v,o)")
    if items == ["all"]:
        return list(TARGETS)
    out = set()
    for it in items:
        short = it[:-5] if it.endswith("_proj") else it
        if short not in TARGETS:
            raise LucaError(f"finetune.targets: unknown projection {it!r} (known: all, {', '.join(TARGETS)})")
        out.add(short)
    return [t for t in TARGETS if t in out]


@dataclass
class LoraSpec:
    r: int = 16
    alpha: float = 16.0
    dropout: float = 0.05
    rslora: bool = False
    targets: list[str] = field(default_factory=lambda: list(TARGETS))

    def __post_init__(self) -> None:
        if self.r <= 0:
            raise LucaError(f"finetune.lora_r: must be positive, not {self.r}")
        if self.alpha <= 0:
            raise LucaError(f"finetune.lora_alpha: must be positive, not {self.alpha}")
        if not 0 <= self.dropout < 1:
            raise LucaError(f"finetune.lora_dropout: must be in [0, 1), not {self.dropout}")
        self.targets = parse_targets(self.targets)

    @property
    def scaling(self) -> float:
        return self.alpha / (math.sqrt(self.r) if self.rslora else self.r)


def _bnb():
    try:
        import bitsandbytes.functional as bnbf
    except ImportError:
        raise LucaError("QLoRA needs bitsandbytes: pip install 'luca[qlora]'") from None
    return bnbf


def nf4_dequantize(packed: torch.Tensor, absmax_q: torch.Tensor, absmax2: torch.Tensor, code2: torch.Tensor,
                   code: torch.Tensor, offset: torch.Tensor, numel: int, dtype: torch.dtype) -> torch.Tensor:
    """bitsandbytes' NF4 (double-quantised scales) → a flat `dtype` tensor, in plain torch ops.

    Bitwise equal to `bitsandbytes.functional.dequantize_4bit`; under `torch.compile` one fused
    kernel (uint8 in, BF16 out) that needs no bitsandbytes binary. Requires numel % 64 == 0.
    """
    nb = absmax_q.numel()
    scale = code2[absmax_q.long()] * absmax2[torch.arange(nb, device=packed.device) // NF4_BLOCK2] + offset
    p = packed.view(-1)
    vals = torch.stack((code[(p >> 4).long()], code[(p & 15).long()]), dim=-1).view(nb, NF4_BLOCK)
    return (vals * scale[:, None]).to(dtype).view(numel)


_COMPILED: dict[str, object] = {}


def _compiled_dequantize():
    """`nf4_dequantize` under torch.compile (made once; None where compiling fails)."""
    if "fn" not in _COMPILED:
        try:
            _COMPILED["fn"] = torch.compile(nf4_dequantize, dynamic=False, fullgraph=True)
        except Exception:  # no compiler backend here: the caller falls back
            _COMPILED["fn"] = None
    return _COMPILED["fn"]


class _NF4Linear(torch.autograd.Function):
    """y = x · dequant(W)ᵀ without keeping W for backward, except when `layer.keep_weight`.

    Under gradient checkpointing the first forward's saved tensors are dropped anyway and the
    recomputed forward runs just before this layer's backward: keeping W there costs one layer's
    BF16 weights for a moment and saves a third dequantisation.
    """

    @staticmethod
    def forward(ctx, x, qweight, bias, layer):
        w = layer.dequantized(x.dtype)
        ctx.layer, ctx.kept = layer, layer.keep_weight
        if ctx.kept:
            ctx.save_for_backward(w)
        return F.linear(x, w, None if bias is None else bias.to(x.dtype))  # the bias rides in the GEMM

    @staticmethod
    def backward(ctx, grad):
        w = ctx.saved_tensors[0] if ctx.kept else ctx.layer.dequantized(grad.dtype)
        return grad @ w, None, None, None


class LoraLinear(nn.Module):
    """A frozen linear layer (plain or NF4) plus a trainable low-rank update s·B·A.

    `dequant` picks the NF4 path: "bnb" (bitsandbytes' kernels), "torch" (`nf4_dequantize`,
    eager) or "compiled" (`nf4_dequantize` under torch.compile); "auto" is compiled on CUDA and
    bitsandbytes elsewhere.
    """

    def __init__(self, base: nn.Linear, spec: LoraSpec, quantize: bool = False,
                 device: torch.device | str | None = None):
        super().__init__()
        self.in_features, self.out_features = base.in_features, base.out_features
        self.r, self.scaling = spec.r, spec.scaling
        device = torch.device(device) if device is not None else base.weight.device
        w = base.weight.detach()
        self.nf4 = quantize
        self.keep_weight = False  # set by `set_gradient_checkpointing`
        self.dequant = "auto"
        self._qs = None
        if quantize:
            q, st = _bnb().quantize_4bit(w.to(device), blocksize=NF4_BLOCK, compress_statistics=True,
                                         quant_type="nf4")
            self.weight_dtype = st.dtype
            # The quantisation state as buffers (they follow .to()); the base is reloaded, never saved.
            for name, t in (("weight_nf4", q.view(-1)), ("nf4_absmax", st.absmax), ("nf4_absmax2", st.state2.absmax),
                            ("nf4_code2", st.state2.code), ("nf4_code", st.code),
                            ("nf4_offset", torch.as_tensor(st.offset, dtype=torch.float32, device=q.device))):
                self.register_buffer(name, t, persistent=False)
            self.weight = None
        else:
            self.weight = nn.Parameter(w.to(device), requires_grad=False)
        self.bias = None if base.bias is None else nn.Parameter(base.bias.detach().to(device), requires_grad=False)
        self.lora_A = nn.Parameter(torch.empty(spec.r, self.in_features, device=device, dtype=torch.float32))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, spec.r, device=device, dtype=torch.float32))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # PEFT's init: the update starts at zero
        self.lora_dropout = nn.Dropout(spec.dropout) if spec.dropout > 0 else nn.Identity()

    def _quant_state(self):
        """bitsandbytes' QuantState over the buffers (rebuilt when they move)."""
        if self._qs is None or self._qs.absmax is not self.nf4_absmax:
            from bitsandbytes.functional import QuantState
            nested = QuantState(absmax=self.nf4_absmax2, code=self.nf4_code2, blocksize=NF4_BLOCK2,
                                dtype=torch.float32)
            self._qs = QuantState(absmax=self.nf4_absmax, shape=torch.Size((self.out_features, self.in_features)),
                                  code=self.nf4_code, blocksize=NF4_BLOCK, quant_type="nf4", dtype=self.weight_dtype,
                                  offset=self.nf4_offset, state2=nested)
        return self._qs

    def dequantized(self, dtype: torch.dtype) -> torch.Tensor:
        """The frozen base weight in `dtype` (dequantised from NF4 for QLoRA)."""
        if not self.nf4:
            return self.weight.to(dtype)
        numel = self.in_features * self.out_features
        if torch.compiler.is_compiling():  # inside a compiled block: traced into its graph
            return nf4_dequantize(self.weight_nf4, self.nf4_absmax, self.nf4_absmax2, self.nf4_code2, self.nf4_code,
                                  self.nf4_offset, numel, self.weight_dtype).view(self.out_features,
                                                                                   self.in_features).to(dtype)
        how = self.dequant
        if how == "auto":
            how = "compiled" if self.weight_nf4.is_cuda else "bnb"
        if numel % NF4_BLOCK:
            how = "bnb"  # a padded last block: bitsandbytes handles it
        fn = _compiled_dequantize() if how == "compiled" else nf4_dequantize if how == "torch" else None
        w = None
        if fn is not None:
            args = (self.weight_nf4, self.nf4_absmax, self.nf4_absmax2, self.nf4_code2, self.nf4_code,
                    self.nf4_offset, numel, self.weight_dtype)
            try:
                w = fn(*args)
            except Exception as e:  # compiling failed on this machine: say so once, then use bitsandbytes
                if how != "compiled":
                    raise
                _COMPILED["fn"] = None
                warnings.warn(f"compiled NF4 dequantisation failed ({type(e).__name__}: {e}); "
                              "using bitsandbytes' kernels")
        if w is None:
            w = _bnb().dequantize_4bit(self.weight_nf4.view(-1, 1), self._quant_state())
        return w.view(self.out_features, self.in_features).to(dtype)

    def delta_weight(self) -> torch.Tensor:
        return (self.lora_B.float() @ self.lora_A.float()) * self.scaling

    def merged_weight(self) -> torch.Tensor:
        """W + s·B·A in float32."""
        return self.dequantized(torch.float32) + self.delta_weight()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dt = compute_dtype(x)
        if not self.nf4:
            y = F.linear(x, self.weight, self.bias)
        else:
            y = _NF4Linear.apply(x.to(dt), self.weight_nf4, self.bias, self)
        # Autocast casts A and B (and caches the casts for the step); the update and its scale are
        # added inside the second GEMM (addmm's beta and alpha): no extra pass over (tokens × out).
        h = F.linear(self.lora_dropout(x), self.lora_A)
        out = torch.addmm(y.reshape(-1, self.out_features), h.reshape(-1, self.r), self.lora_B.t(), alpha=self.scaling)
        return out.view(*y.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        kind = "nf4" if self.nf4 else str(self.weight.dtype).replace("torch.", "")
        return f"{self.in_features}→{self.out_features}, base {kind}, r={self.r}, scaling={self.scaling:g}"


def set_gradient_checkpointing(model: Transformer, on: bool) -> None:
    """Checkpoint every block; NF4 layers then keep their dequantised weight through the recompute."""
    model.gradient_checkpointing = on
    for m in lora_modules(model).values():
        m.keep_weight = on


def compile_blocks(model: Transformer) -> None:
    """torch.compile each block (one graph, reused by all blocks): fewer, fused kernels and far
    less Python per step. Checkpointing and dropout stay exact (the recompute sees the same masks)."""
    for block in model.model.layers:
        block.compile()


def set_dequant(model: Transformer, how: str) -> None:
    if how not in ("auto", "bnb", "torch", "compiled"):
        raise ValueError(f"dequant must be auto, bnb, torch or compiled, not {how!r}")
    for m in lora_modules(model).values():
        m.dequant = how


def lora_modules(model: Transformer) -> dict[str, LoraLinear]:
    """HF-style module name (`model.layers.0.self_attn.q_proj`) → its LoraLinear."""
    return {n: m for n, m in model.named_modules() if isinstance(m, LoraLinear)}


def apply_lora(model: Transformer, spec: LoraSpec, quantize: bool = False,
               device: torch.device | str | None = None) -> Transformer:
    """Freeze `model`, replace the target projections by LoRA layers (NF4 base if `quantize`).

    With `device`, each weight is moved there one layer at a time (and quantised there), so a
    large model never sits on the device unquantised; the rest of the model follows at the end.
    """
    for p in model.parameters():
        p.requires_grad_(False)
    for block in model.model.layers:
        for short in spec.targets:
            part, name = TARGETS[short]
            parent = getattr(block, part)
            base = getattr(parent, name)
            if isinstance(base, LoraLinear):
                raise LucaError("model already has LoRA layers")
            setattr(parent, name, LoraLinear(base, spec, quantize, device))
            del base
    if device is not None:
        model.to(device)
    return model


def trainable_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts; NF4 weights count as their unquantised size."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    total += sum(m.in_features * m.out_features for m in lora_modules(model).values() if m.nf4)
    return trainable, total


@torch.no_grad()
def merge_lora(model: Transformer, dtype: torch.dtype = torch.float32) -> Transformer:
    """Replace every LoraLinear by an nn.Linear holding W + s·B·A (in place; returns the model)."""
    for name, m in lora_modules(model).items():
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        lin = nn.Linear(m.in_features, m.out_features, bias=m.bias is not None, device="meta")
        lin.weight = nn.Parameter(m.merged_weight().to(dtype), requires_grad=False)
        if m.bias is not None:
            lin.bias = nn.Parameter(m.bias.detach().to(dtype), requires_grad=False)
        setattr(parent, child, lin)
    return model


# -- adapter files (PEFT layout) ---------------------------------------------------------------
def adapter_state_dict(model: Transformer) -> dict[str, torch.Tensor]:
    out = {}
    for name, m in lora_modules(model).items():
        out[f"{PEFT_PREFIX}{name}.lora_A.weight"] = m.lora_A.detach().float().cpu().contiguous()
        out[f"{PEFT_PREFIX}{name}.lora_B.weight"] = m.lora_B.detach().float().cpu().contiguous()
    return out


def adapter_config(spec: LoraSpec, base: str) -> dict:
    """adapter_config.json as PEFT writes it for a LoRA on a causal LM."""
    return {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base,
        "r": spec.r, "lora_alpha": spec.alpha, "lora_dropout": spec.dropout, "use_rslora": spec.rslora,
        "target_modules": [TARGETS[t][1] for t in spec.targets], "bias": "none", "fan_in_fan_out": False,
        "init_lora_weights": True, "inference_mode": True, "modules_to_save": None,
        "layers_to_transform": None, "layers_pattern": None, "rank_pattern": {}, "alpha_pattern": {},
        "use_dora": False,
    }


def spec_from_adapter_config(cfg: dict, where: str) -> LoraSpec:
    if cfg.get("peft_type", "LORA") != "LORA" or cfg.get("use_dora"):
        raise LucaError(f"{where}: only plain LoRA adapters are supported")
    if cfg.get("rank_pattern") or cfg.get("alpha_pattern") or cfg.get("modules_to_save"):
        raise LucaError(f"{where}: rank/alpha patterns and modules_to_save are not supported")
    try:
        return LoraSpec(r=int(cfg["r"]), alpha=float(cfg["lora_alpha"]), dropout=float(cfg.get("lora_dropout", 0.0)),
                        rslora=bool(cfg.get("use_rslora", False)), targets=list(cfg["target_modules"]))
    except KeyError as e:
        raise LucaError(f"{where}: missing key {e.args[0]!r}") from None


def load_adapter_weights(model: Transformer, path: str | Path) -> None:
    """Copy A and B from a PEFT-layout safetensors file into the model's LoRA layers."""
    from safetensors.torch import load_file
    try:
        sd = load_file(str(path))
    except FileNotFoundError:
        raise LucaError(f"{path}: no such file") from None
    mods = lora_modules(model)
    expected = {f"{PEFT_PREFIX}{n}.lora_{ab}.weight" for n in mods for ab in "AB"}
    # PEFT may name the adapter inside the key (`.lora_A.default.weight`): accept both.
    sd = {k.replace(".default.weight", ".weight"): v for k, v in sd.items()}
    if set(sd) != expected:
        missing, extra = sorted(expected - set(sd)), sorted(set(sd) - expected)
        raise LucaError(f"{path}: adapter does not match the base model (missing {missing[:3]}, unexpected {extra[:3]})")
    with torch.no_grad():
        for n, m in mods.items():
            for ab, p in (("A", m.lora_A), ("B", m.lora_B)):
                t = sd[f"{PEFT_PREFIX}{n}.lora_{ab}.weight"]
                if t.shape != p.shape:
                    raise LucaError(f"{path}: {n}.lora_{ab} has shape {tuple(t.shape)}, the base needs {tuple(p.shape)}")
                p.copy_(t)
