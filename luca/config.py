"""Presets and overrides: TOML sections whose keys are the fields of each stage's dataclass.

What is notable:
- A preset is `luca/presets/NAME.toml` (or any path to a .toml file) with sections such as
  `[data]`, `[tokenizer]`, `[model]`, `[train]`; a key that no dataclass field reads is an error.
- Overrides come from the command line as `section.key=value` strings, parsed with TOML's
  value syntax (so `3e-4`, `true`, `["a", "b"]` work) and falling back to a bare string.
- `[model] depth = N` is the one dial: it derives width, heads and layers (see `derive_model`).
- Nothing here can import or execute code named by a config: values are plain data.
"""
from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any, get_args, get_type_hints

from luca.errors import LucaError

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

PRESET_DIR = Path(__file__).parent / "presets"


def preset_names() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.toml"))


def load_preset(name: str) -> dict:
    p = Path(name)
    if p.suffix != ".toml":
        p = PRESET_DIR / f"{name}.toml"
    if not p.is_file():
        raise LucaError(f"unknown preset {name!r} (presets: {', '.join(preset_names())}; or a path to a .toml file)")
    try:
        return tomllib.loads(p.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise LucaError(f"{p}: {e}") from None
    except RecursionError:
        raise LucaError(f"{p}: nested too deeply") from None


def parse_value(text: str) -> Any:
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except (tomllib.TOMLDecodeError, RecursionError):
        return text


def apply_overrides(cfg: dict, overrides: list[str] | dict[str, Any]) -> dict:
    """Return a copy of `cfg` with `section.key=value` overrides applied."""
    out = {k: dict(v) if isinstance(v, dict) else v for k, v in cfg.items()}
    items = overrides.items() if isinstance(overrides, dict) else (_split_override(o) for o in overrides)
    for key, value in items:
        section, _, field = key.partition(".")
        if not field:
            raise LucaError(f"override {key!r}: expected section.key=value (e.g. train.max_steps=100)")
        table = out.setdefault(section, {})
        if not isinstance(table, dict):
            raise LucaError(f"override {key!r}: {section} is {table!r:.40} in the preset, not a [{section}] table")
        table[field] = parse_value(value) if isinstance(value, str) else value
    return out


def _split_override(o: str) -> tuple[str, str]:
    key, eq, value = o.partition("=")
    if not eq:
        raise LucaError(f"override {o!r}: expected section.key=value")
    return key.strip(), value.strip()


def build(cls: type, values: dict, section: str) -> Any:
    """Instantiate dataclass `cls` from a TOML section, checking keys and value types."""
    if not isinstance(values, dict):
        raise LucaError(f"[{section}]: expected a table of keys, not {values!r:.40}")
    hints = get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise LucaError(f"[{section}]: unknown key {unknown[0]!r} (known: {', '.join(sorted(names))})")
    kwargs = {}
    for k, v in values.items():
        kwargs[k] = _coerce(v, hints[k], f"{section}.{k}")
    try:
        return cls(**kwargs)
    except (ValueError, TypeError) as e:
        raise LucaError(f"[{section}]: {e}") from None


def _coerce(v: Any, hint: Any, where: str) -> Any:
    args = [a for a in get_args(hint) if a is not type(None)]
    if len(args) == 1 and len(get_args(hint)) == 2:  # `T | None`: TOML has no null, so a value is a T
        return None if v is None else _coerce(v, args[0], where)
    origin = getattr(hint, "__origin__", None)
    if hint is bool:
        if isinstance(v, bool):
            return v
    elif hint is int:
        if isinstance(v, int) and not isinstance(v, bool):
            return v
        if isinstance(v, float) and v.is_integer():
            return int(v)
    elif hint is float:
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            if math.isfinite(v):  # a nan or inf learning rate would poison every weight
                return float(v)
            raise LucaError(f"{where}: expected a finite number, got {v!r}")
    elif hint is str:
        if isinstance(v, str):
            return v
        return str(v)
    elif origin is list:
        if isinstance(v, str):
            v = [v]
        if isinstance(v, list):
            return [str(x) if not isinstance(x, str) else x for x in v]
    else:
        return v
    raise LucaError(f"{where}: expected {getattr(hint, '__name__', hint)}, got {v!r}")


def derive_model(section: dict) -> dict:
    """Expand the `depth` dial: d_model = 64·depth, one head per 64 dims, half as many KV heads."""
    if not isinstance(section, dict):
        raise LucaError(f"[model]: expected a table of keys, not {section!r:.40}")
    section = dict(section)
    depth = section.pop("depth", None)
    if depth is None:
        return section
    if not isinstance(depth, int) or isinstance(depth, bool) or depth < 1:
        raise LucaError(f"model.depth: expected a positive integer, got {depth!r}")
    d_model = section.get("d_model", 64 * depth)
    n_heads = section.get("n_heads", max(1, math.ceil(d_model / 64)))
    derived = {"n_layers": depth, "d_model": d_model, "n_heads": n_heads,
               "n_kv_heads": max(1, n_heads // 2) if n_heads % 2 == 0 else n_heads}
    if section.get("family") == "gpt2":  # GPT-2 has no grouped-query attention
        derived["n_kv_heads"] = n_heads
    return {**derived, **section}
