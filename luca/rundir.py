"""The run directory: the one artifact every stage reads and writes.

What is notable:
- This is the only module that knows the file names inside a run directory.
- The directory is a Hugging Face model: `config.json` names `LlamaForCausalLM`,
  `Qwen2ForCausalLM` or `Qwen3ForCausalLM` (`GPT2LMHeadModel` for the GPT-2-style baseline of
  luca/baseline.py, which names its own tensors); weights are BF16 `model.safetensors` with HF's
  names (tied `lm_head` left out, as HF does); the tokenizer is `tokenizer.json` +
  `tokenizer_config.json`.
- Loading also takes HF checkpoints written by others: sharded safetensors with an index,
  tied or untied embeddings. Weights are read only from safetensors (never unpickled).
- Every write is atomic (temporary file, fsync, rename).
"""
from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

import torch

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

from luca.atomic import append_line, atomic_path, write_text
from luca.errors import LucaError
from luca.model import ModelConfig, Transformer
from luca.tokenizer import Tokenizer

CONFIG = "config.json"
WEIGHTS = "model.safetensors"
WEIGHTS_INDEX = "model.safetensors.index.json"
GENERATION = "generation_config.json"
LUCA_TOML = "luca.toml"
METRICS = "metrics.jsonl"
RESULTS = "results.json"
REPORT = "report.md"
LOSS_PNG = "loss.png"
TRAIN_STATE = "train_state"
TOKENIZER_CONFIG = "tokenizer_config.json"
# A LoRA adapter with PEFT's file names, in a subdirectory: transformers would apply an
# adapter_config.json at the top level on top of the merged weights.
ADAPTER_DIR = "adapter"
ADAPTER_WEIGHTS = f"{ADAPTER_DIR}/adapter_model.safetensors"
ADAPTER_CONFIG = f"{ADAPTER_DIR}/adapter_config.json"
FINETUNE_SUMMARY = "finetune_summary.json"
TRAIN_SUMMARY = "train_summary.json"  # train()'s summary: what report.md and `luca report` read
GGUF_DIR = "gguf"

_HF_CLASSES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}


def path(run_dir: str | Path, name: str) -> Path:
    return Path(run_dir) / name


def is_run_dir(d: str | Path) -> bool:
    d = Path(d)
    return (d / CONFIG).is_file() and ((d / WEIGHTS).is_file() or (d / WEIGHTS_INDEX).is_file())


def require_run_dir(d: str | Path) -> Path:
    d = Path(d)
    if not d.exists():
        raise LucaError(f"{d}: no such run directory")
    if not is_run_dir(d):
        raise LucaError(f"{d}: not a run directory (needs {CONFIG} and {WEIGHTS})")
    return d


# -- config.json ------------------------------------------------------------------------------
def hf_config(cfg: ModelConfig, tok: Tokenizer | None = None) -> dict:
    arch = cfg.arch
    d: dict[str, Any] = {
        "architectures": [_HF_CLASSES[arch]],
        "model_type": arch,
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.d_model,
        "intermediate_size": cfg.d_ff,
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.n_kv_heads,
        "head_dim": cfg.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": cfg.max_seq_len,
        "rms_norm_eps": cfg.norm_eps,
        "rope_theta": cfg.rope_theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
        "tie_word_embeddings": cfg.tie_embeddings,
        "initializer_range": cfg.init_std,
        "attention_dropout": 0.0,
        "use_cache": True,
        "dtype": "bfloat16",
    }
    if arch in ("llama", "qwen3"):
        d["attention_bias"] = False
    if arch == "llama":
        d["mlp_bias"] = False
    else:
        d["use_sliding_window"] = False
        d["sliding_window"] = None
        d["max_window_layers"] = cfg.n_layers
    if tok is not None:
        d["bos_token_id"] = None
        d["eos_token_id"] = [tok.im_end_id, tok.eot_id]
        d["pad_token_id"] = tok.eot_id
    return d


def model_config_from_hf(d: dict, where: str = CONFIG) -> ModelConfig:
    """ModelConfig of an HF Llama / Qwen2 / Qwen3 config.json (luca's own or a downloaded one)."""
    mt = d.get("model_type")
    if mt not in _HF_CLASSES:
        raise LucaError(f"{where}: model_type {mt!r} is not supported (llama, qwen2, qwen3)")
    rope = d.get("rope_parameters") or d.get("rope_scaling") or {}
    if rope and rope.get("rope_type", rope.get("type", "default")) not in ("default", None):
        raise LucaError(f"{where}: rope scaling {rope.get('rope_type') or rope.get('type')!r} is not supported")
    if mt == "llama" and d.get("mlp_bias"):
        raise LucaError(f"{where}: mlp_bias is not supported")
    if mt == "qwen2" and d.get("use_sliding_window"):
        raise LucaError(f"{where}: sliding-window attention is not supported")
    try:
        return ModelConfig(
            vocab_size=d["vocab_size"], n_layers=d["num_hidden_layers"], d_model=d["hidden_size"],
            n_heads=d["num_attention_heads"], n_kv_heads=d.get("num_key_value_heads") or d["num_attention_heads"],
            head_dim=d.get("head_dim") or d["hidden_size"] // d["num_attention_heads"],
            d_ff=d["intermediate_size"], max_seq_len=d.get("max_position_embeddings", 2048),
            rope_theta=float(rope.get("rope_theta", d.get("rope_theta", 10000.0))),
            norm_eps=d.get("rms_norm_eps", 1e-6),
            qk_norm=mt == "qwen3", qkv_bias=mt == "qwen2" or (mt == "llama" and bool(d.get("attention_bias"))),
            tie_embeddings=bool(d.get("tie_word_embeddings", False)),
            init_std=d.get("initializer_range", 0.02))
    except KeyError as e:
        raise LucaError(f"{where}: missing key {e.args[0]!r}") from None
    except ValueError as e:
        raise LucaError(f"{where}: {e}") from None


def read_json(p: str | Path) -> dict:
    p = Path(p)
    try:
        return json.loads(p.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise LucaError(f"{p}: no such file") from None
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
        raise LucaError(f"{p}: not valid JSON ({e})") from None


def write_json(p: str | Path, obj: Any) -> None:
    write_text(p, json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


def load_model_config(run_dir: str | Path) -> ModelConfig:
    return model_config_from_hf(read_json(Path(run_dir) / CONFIG), str(Path(run_dir) / CONFIG))


# -- weights ---------------------------------------------------------------------------------
def save_model(run_dir: str | Path, model: Transformer, tok: Tokenizer | None = None) -> None:
    """config.json + BF16 model.safetensors (+ generation_config.json when a tokenizer is given)."""
    from safetensors import SafetensorError
    from safetensors.torch import save_file
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    own = hasattr(model, "hf_state_dict")  # another HF family (luca/baseline.py's GPT-2) names its own tensors
    sd = model.hf_state_dict() if own else model.state_dict()
    sd = {k: v.detach().to("cpu", torch.bfloat16).contiguous() for k, v in sd.items()}
    if model.cfg.tie_embeddings:
        sd.pop("lm_head.weight", None)
    with atomic_path(run_dir / WEIGHTS) as tmp:
        try:
            save_file(sd, str(tmp), metadata={"format": "pt"})
        except SafetensorError as e:  # a full disk: the old file stays
            raise LucaError(f"{run_dir / WEIGHTS}: cannot write ({e})") from None
    write_json(run_dir / CONFIG, model.hf_config(tok) if own else hf_config(model.cfg, tok))
    if tok is not None:
        write_json(run_dir / GENERATION, {"bos_token_id": None, "eos_token_id": [tok.im_end_id, tok.eot_id],
                                           "pad_token_id": tok.eot_id, "do_sample": True, "temperature": 0.8,
                                           "top_k": 50, "top_p": 0.95})


def load_state_dict(run_dir: str | Path) -> dict[str, torch.Tensor]:
    """All tensors of a run or HF directory (single file or sharded with an index)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file
    run_dir = Path(run_dir)
    index = run_dir / WEIGHTS_INDEX
    files = shard_names(index) if index.is_file() else [WEIGHTS]
    sd: dict[str, torch.Tensor] = {}
    for f in files:
        p = run_dir / f
        try:
            sd.update(load_file(str(p)))
        except FileNotFoundError:
            raise LucaError(f"{p}: no such file") from None
        except (SafetensorError, OSError) as e:
            raise LucaError(f"{p}: not a readable safetensors file ({e})") from None
    return sd


def shard_names(index: Path) -> list[str]:
    """The shard files a safetensors index names: plain file names beside it (never ../x or /x)."""
    wm = read_json(index)
    wm = wm.get("weight_map") if isinstance(wm, dict) else None
    if not isinstance(wm, dict) or not all(isinstance(f, str) for f in wm.values()):
        raise LucaError(f"{index}: no weight_map of tensor names to shard files")
    files = sorted(set(wm.values()))
    for f in files:
        if Path(f).name != f or f in ("", ".", ".."):
            raise LucaError(f"{index}: shard name {f!r} leaves the directory")
    return files


def load_model(run_dir: str | Path, device: str | torch.device = "cpu",
               dtype: torch.dtype = torch.float32) -> Transformer:
    run_dir = require_run_dir(run_dir)
    hf = read_json(run_dir / CONFIG)
    if hf.get("model_type") == "gpt2":  # the baseline of `luca compare` (or any HF GPT-2)
        from luca.baseline import GPT2
        try:
            model = GPT2.from_hf(hf, load_state_dict(run_dir), str(run_dir / CONFIG))
        except (KeyError, ValueError) as e:
            raise LucaError(f"{run_dir / CONFIG}: {e}") from None
        return model.to(device=device, dtype=dtype).eval()
    cfg = model_config_from_hf(hf, str(run_dir / CONFIG))
    sd = load_state_dict(run_dir)
    # HF checkpoints may carry extra buffers (rotary inv_freq); luca recomputes those.
    sd = {k: v for k, v in sd.items() if not k.endswith("rotary_emb.inv_freq")}
    if cfg.tie_embeddings:
        sd.pop("lm_head.weight", None)
    elif "lm_head.weight" not in sd and "model.embed_tokens.weight" in sd:
        sd["lm_head.weight"] = sd["model.embed_tokens.weight"]  # untied config, tied file
    with torch.device("meta"):
        model = Transformer(cfg)
    expected = set(model.state_dict()) - ({"lm_head.weight"} if cfg.tie_embeddings else set())
    missing, unexpected = expected - set(sd), set(sd) - expected
    if missing or unexpected:
        raise LucaError(f"{run_dir}: weights do not match config.json "
                        f"(missing {sorted(missing)[:4]}, unexpected {sorted(unexpected)[:4]})")
    model.load_state_dict({k: v.to(dtype) for k, v in sd.items()}, strict=False, assign=True)
    if cfg.tie_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    model.init_rope()  # its tables were built on the meta device
    return model.to(device).eval()


# -- tokenizer -------------------------------------------------------------------------------
def save_tokenizer(run_dir: str | Path, tok: Tokenizer) -> None:
    tok.save(run_dir)


def load_tokenizer(run_dir: str | Path) -> Tokenizer:
    try:
        return Tokenizer.load(run_dir)
    except FileNotFoundError as e:
        raise LucaError(str(e)) from None
    except ValueError as e:
        raise LucaError(f"{run_dir}: {e}") from None


# -- luca.toml, metrics, report --------------------------------------------------------------
def to_toml(d: dict) -> str:
    """TOML for luca's configs: tables of scalars and lists of scalars."""
    lines: list[str] = []
    for section, body in d.items():
        if not isinstance(body, dict):
            lines.append(f"{section} = {_toml_value(body)}")
    for section, body in d.items():
        if isinstance(body, dict):
            lines.append(f"\n[{section}]")
            for k, v in body.items():
                if v is not None:
                    lines.append(f"{k} = {_toml_value(v)}")
    return "\n".join(lines).lstrip("\n") + "\n"


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        if isinstance(v, float) and not math.isfinite(v):
            return "nan" if math.isnan(v) else ("inf" if v > 0 else "-inf")
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v, ensure_ascii=False)
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    raise TypeError(f"cannot write {type(v).__name__} to TOML")


def write_luca_toml(run_dir: str | Path, config: dict) -> None:
    write_text(Path(run_dir) / LUCA_TOML, to_toml(config))


def read_luca_toml(run_dir: str | Path) -> dict:
    p = Path(run_dir) / LUCA_TOML
    if not p.is_file():
        return {}
    try:
        return tomllib.loads(p.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as e:
        raise LucaError(f"{p}: {e}") from None


def append_metrics(run_dir: str | Path, record: dict) -> None:
    append_line(Path(run_dir) / METRICS, json.dumps(record))


def read_metrics(run_dir: str | Path) -> list[dict]:
    p = Path(run_dir) / METRICS
    if not p.is_file():
        return []
    out = []
    for line in p.read_text(encoding="utf-8").splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue  # a line cut by a crash mid-write
    return out


def truncate_metrics(run_dir: str | Path, step: int) -> None:
    """Drop records past `step` (a resume replays those steps)."""
    p = Path(run_dir) / METRICS
    if p.is_file():
        keep = [json.dumps(r) for r in read_metrics(run_dir) if r.get("step", 0) <= step]
        write_text(p, "".join(line + "\n" for line in keep))


def update_report_section(run_dir: str | Path, title: str, body: str) -> None:
    """Replace (or add) the `## title` section of report.md, keeping the others."""
    p = Path(run_dir) / REPORT
    text = p.read_text(encoding="utf-8") if p.is_file() else f"# {Path(run_dir).name}\n"
    head, sections = _split_sections(text)
    sections[title] = body.strip() + "\n"
    out = head.rstrip() + "\n\n" + "\n".join(f"## {t}\n\n{b}" for t, b in sections.items())
    write_text(p, out)


def _split_sections(text: str) -> tuple[str, dict[str, str]]:
    parts = text.split("\n## ")
    sections: dict[str, str] = {}
    for part in parts[1:]:
        title, _, body = part.partition("\n")
        sections[title.strip()] = body.strip("\n") + "\n"
    return parts[0], sections


def timestamp() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")

