"""GGUF export for llama.cpp, and Hugging Face checkpoints in.

What is notable:
- Written with the `gguf` package, names and layout as llama.cpp's own `convert_hf_to_gguf.py`:
  architecture `llama`, `qwen2` (q/k/v bias) or `qwen3` (q/k RMSNorm) with context length, head
  counts, `key_length`/`value_length` (the head dim, which Qwen3 decouples from d_model), RoPE
  base and RMS epsilon. For `llama` the Q and K rows are permuted from Hugging Face's rotate-half
  RoPE layout to GGML's interleaved one (llama.cpp's `LlamaModel.permute`); `qwen2`/`qwen3` use
  NeoX RoPE in llama.cpp and are written unpermuted. Tied embeddings: no `output.weight` (llama.cpp
  reuses `token_embd.weight`).
- The tokenizer is a `gpt2` BPE: tokens in byte-level form, token types (specials CONTROL),
  merges, the pre-tokenizer name llama.cpp must know (`qwen2` for luca's, detected from the split
  regex for imported ones), bos/eos/pad ids and the chat template. Embedding rows past the
  tokenizer (the vocabulary rounded up to 64) become UNUSED `[PADn]` tokens.
- F32/F16/BF16 are written here; Q8_0/Q4_0 and the K-quants (Q4_K_M, Q5_K_M, Q6_K, ...) come from
  llama.cpp's own quantizer (`llama_cpp.llama_model_quantize`) run on the F16 file (Q8_0 falls
  back to `gguf.quants` without llama-cpp-python). K-quants need rows that are a multiple of
  256: tensors that llama.cpp quantized to another type instead are read back from the file and
  reported, never hidden.
- `import_hf` turns a local HF Llama / Qwen2 / Qwen3 checkpoint (safetensors, sharded or not,
  tied or untied) into a run directory: BF16 weights through `rundir`, tokenizer files copied
  unchanged.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

import torch

from luca import rundir
from luca.atomic import atomic_path
from luca.errors import LucaError
from luca.model import ModelConfig
from luca.tokenizer import SPLIT_PATTERN, Tokenizer

# name → (file suffix, llama.cpp ftype name or None when written here)
TYPES = {
    "f32": ("F32", None), "f16": ("F16", None), "bf16": ("BF16", None),
    "q8_0": ("Q8_0", "LLAMA_FTYPE_MOSTLY_Q8_0"), "q4_0": ("Q4_0", "LLAMA_FTYPE_MOSTLY_Q4_0"),
    "q4_k_s": ("Q4_K_S", "LLAMA_FTYPE_MOSTLY_Q4_K_S"), "q4_k_m": ("Q4_K_M", "LLAMA_FTYPE_MOSTLY_Q4_K_M"),
    "q5_k_s": ("Q5_K_S", "LLAMA_FTYPE_MOSTLY_Q5_K_S"), "q5_k_m": ("Q5_K_M", "LLAMA_FTYPE_MOSTLY_Q5_K_M"),
    "q6_k": ("Q6_K", "LLAMA_FTYPE_MOSTLY_Q6_K"),
}
# Llama-3's split pattern (llama.cpp: "llama-bpe").
LLAMA3_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                  r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_KNOWN_PRE = {SPLIT_PATTERN: "qwen2", LLAMA3_PATTERN: "llama-bpe"}
_NO_MERGES = "<|luca-no-merge|> <|luca-no-merge|>"  # llama.cpp needs the key; this pair never occurs


def parse_types(spec: str | list[str] | tuple[str, ...]) -> list[str]:
    names = [t.strip().lower() for t in (spec.split(",") if isinstance(spec, str) else spec) if t.strip()]
    bad = [t for t in names if t not in TYPES]
    if bad or not names:
        raise LucaError(f"--gguf: unknown type(s) {bad or spec!r} (choose from {', '.join(TYPES)})")
    return list(dict.fromkeys(names))


def gguf_path(run_dir: str | Path, qtype: str, out_dir: str | Path | None = None) -> Path:
    """Where `export_gguf` writes the file of one type: RUN/gguf/NAME-Q4_K_M.gguf."""
    run_dir = Path(run_dir).resolve()
    out = Path(out_dir) if out_dir is not None else run_dir / rundir.GGUF_DIR
    return out / f"{run_dir.name}-{TYPES[qtype][0]}.gguf"


# -- tensors ---------------------------------------------------------------------------------------
def _permute_rope(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """HF rotate-half rows → GGML interleaved rows, per head (llama.cpp's LlamaModel.permute)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


_LAYER_NAMES = {
    "input_layernorm.weight": "attn_norm.weight", "post_attention_layernorm.weight": "ffn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight", "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight", "self_attn.o_proj.weight": "attn_output.weight",
    "self_attn.q_proj.bias": "attn_q.bias", "self_attn.k_proj.bias": "attn_k.bias",
    "self_attn.v_proj.bias": "attn_v.bias", "self_attn.q_norm.weight": "attn_q_norm.weight",
    "self_attn.k_norm.weight": "attn_k_norm.weight", "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight", "mlp.down_proj.weight": "ffn_down.weight",
}


def gguf_tensors(sd: dict[str, torch.Tensor], cfg: ModelConfig) -> Iterator[tuple[str, torch.Tensor]]:
    """(GGUF name, tensor) pairs from an HF-named state dict; consumes `sd` to bound memory."""
    arch = cfg.arch
    for name in list(sd):
        t = sd.pop(name)
        if name.endswith("rotary_emb.inv_freq"):
            continue
        if name == "model.embed_tokens.weight":
            yield "token_embd.weight", t
        elif name == "model.norm.weight":
            yield "output_norm.weight", t
        elif name == "lm_head.weight":
            if not cfg.tie_embeddings:
                yield "output.weight", t
        elif name.startswith("model.layers."):
            i, _, rest = name[len("model.layers."):].partition(".")
            if rest not in _LAYER_NAMES:
                raise LucaError(f"export: tensor {name!r} has no GGUF name")
            if arch == "llama" and rest.startswith(("self_attn.q_proj.", "self_attn.k_proj.")):
                t = _permute_rope(t, cfg.n_heads if "q_proj" in rest else cfg.n_kv_heads)
            yield f"blk.{i}.{_LAYER_NAMES[rest]}", t
        else:
            raise LucaError(f"export: tensor {name!r} has no GGUF name")


# -- tokenizer -------------------------------------------------------------------------------------
def _tokenizer_files(run_dir: Path) -> tuple[dict, dict]:
    tj = rundir.read_json(run_dir / "tokenizer.json")
    p = run_dir / "tokenizer_config.json"
    return tj, (rundir.read_json(p) if p.is_file() else {})


def gguf_pre_name(tokenizer_json: dict, tokenizer_config: dict) -> str:
    """The `tokenizer.ggml.pre` llama.cpp needs for this tokenizer's split regex."""
    if tokenizer_config.get("luca_gguf_pre"):
        return tokenizer_config["luca_gguf_pre"]
    pre = tokenizer_json.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    for st in steps:
        if st.get("type") == "Split":
            pat = st.get("pattern", {}).get("Regex")
            if pat in _KNOWN_PRE:
                return _KNOWN_PRE[pat]
            raise LucaError(f"tokenizer.json: split pattern {pat!r} is not one llama.cpp knows; GGUF export "
                            f"supports Qwen2's and Llama-3's")
        if st.get("type") == "ByteLevel" and st.get("use_regex", True):
            return "gpt-2"
    raise LucaError("tokenizer.json: not a byte-level BPE tokenizer with a split pattern llama.cpp knows "
                    "(SentencePiece-style tokenizers are not supported by GGUF export)")


def gguf_vocab(tok: Tokenizer, tokenizer_json: dict, n_vocab: int) -> tuple[list[str], list[int], list[str]]:
    """Tokens, token types and merges for `n_vocab` ids (ids past the tokenizer: UNUSED pads)."""
    import gguf
    model = tokenizer_json.get("model", {})
    if model.get("type") != "BPE" or (tokenizer_json.get("decoder") or {}).get("type") != "ByteLevel":
        raise LucaError("tokenizer.json: GGUF export needs a byte-level BPE tokenizer")
    vocab = tok.tok.get_vocab(with_added_tokens=True)
    if max(vocab.values()) >= n_vocab:
        raise LucaError(f"tokenizer has ids up to {max(vocab.values())} but the model only {n_vocab} rows")
    by_id = {i: s for s, i in vocab.items()}
    added = tok.tok.get_added_tokens_decoder()
    tokens, types = [], []
    for i in range(n_vocab):
        if i not in by_id:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        elif i in tok.special_ids:
            tokens.append(by_id[i])
            types.append(gguf.TokenType.CONTROL)
        elif i in added:
            tokens.append(by_id[i])
            types.append(gguf.TokenType.USER_DEFINED)
        else:
            tokens.append(by_id[i])
            types.append(gguf.TokenType.NORMAL)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    return tokens, types, merges or [_NO_MERGES]


def _token_id(tok: Tokenizer, t) -> int | None:
    t = t.get("content") if isinstance(t, dict) else t
    return tok.tok.token_to_id(t) if t else None


# -- writing -----------------------------------------------------------------------------------------
def write_gguf(run_dir: str | Path, path: str | Path, qtype: str = "f16") -> None:
    """One GGUF file of type f32 / f16 / bf16 (or q8_0 through `gguf.quants`) from a run directory."""
    import gguf
    import numpy as np
    run_dir = rundir.require_run_dir(run_dir)
    cfg = rundir.load_model_config(run_dir)
    arch = cfg.arch
    if arch in ("llama", "qwen2") and cfg.n_heads * cfg.head_dim != cfg.d_model:
        raise LucaError(f"export: llama.cpp's {arch} needs n_heads · head_dim == d_model "
                        f"({cfg.n_heads} · {cfg.head_dim} != {cfg.d_model})")
    tok = rundir.load_tokenizer(run_dir)
    tj, tcfg = _tokenizer_files(run_dir)
    tokens, types, merges = gguf_vocab(tok, tj, cfg.vocab_size)
    ftype = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
             "bf16": gguf.LlamaFileType.MOSTLY_BF16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[qtype]

    with atomic_path(path) as tmp:
        w = gguf.GGUFWriter(str(tmp), arch)
        w.add_name(Path(run_dir).resolve().name)
        w.add_file_type(ftype)
        if qtype == "q8_0":
            w.add_quantization_version(gguf.GGML_QUANT_VERSION)
        w.add_context_length(cfg.max_seq_len)
        w.add_embedding_length(cfg.d_model)
        w.add_block_count(cfg.n_layers)
        w.add_feed_forward_length(cfg.d_ff)
        w.add_head_count(cfg.n_heads)
        w.add_head_count_kv(cfg.n_kv_heads)
        w.add_key_length(cfg.head_dim)
        w.add_value_length(cfg.head_dim)
        w.add_rope_dimension_count(cfg.head_dim)
        w.add_rope_freq_base(cfg.rope_theta)
        w.add_layer_norm_rms_eps(cfg.norm_eps)
        w.add_vocab_size(cfg.vocab_size)
        # tokenizer
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre(gguf_pre_name(tj, tcfg))
        w.add_token_list(tokens)
        w.add_token_types(types)
        w.add_token_merges(merges)
        luca_tok = "luca_tokenizer_kind" in tcfg
        eos = tok.im_end_id if luca_tok else _token_id(tok, tcfg.get("eos_token"))
        bos = tok.eot_id if luca_tok else _token_id(tok, tcfg.get("bos_token"))
        pad = tok.eot_id if luca_tok else _token_id(tok, tcfg.get("pad_token"))
        w.add_eos_token_id(eos if eos is not None else tok.eot_id)
        if bos is not None:
            w.add_bos_token_id(bos)
        if pad is not None:
            w.add_pad_token_id(pad)
        if luca_tok and tok.im_end_id is not None:
            w.add_eot_token_id(tok.im_end_id)
        # luca never prepends a BOS; llama.cpp must not either, or the ids differ.
        w.add_add_bos_token(bool(tcfg.get("add_bos_token", False)) and not luca_tok)
        w.add_add_eos_token(False)
        if isinstance(tcfg.get("chat_template"), str):
            w.add_chat_template(tcfg["chat_template"])
        # tensors
        sd = rundir.load_state_dict(run_dir)
        for name, t in gguf_tensors(sd, cfg):
            if t.dim() == 1 or qtype == "f32":
                w.add_tensor(name, t.float().numpy())
            elif qtype == "f16":
                if t.abs().max().item() > 65504:
                    raise LucaError(f"export: {name} has values beyond float16's range; export bf16 instead")
                w.add_tensor(name, t.to(torch.float16).numpy())
            elif qtype == "bf16":
                w.add_tensor(name, t.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16),
                             raw_dtype=gguf.GGMLQuantizationType.BF16)
            else:  # q8_0 without llama.cpp: rows of 32
                if t.shape[-1] % 32:
                    w.add_tensor(name, t.to(torch.float16).numpy())
                else:
                    q = gguf.quants.quantize(t.float().numpy(), gguf.GGMLQuantizationType.Q8_0)
                    w.add_tensor(name, q, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
            del t
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file(progress=False)
        w.close()


@contextmanager
def _quiet_stderr() -> Iterator[Path]:
    """Send fd 2 (llama.cpp's log) to a file while the block runs; yields that file."""
    fd, name = tempfile.mkstemp(prefix="luca-llamacpp-", suffix=".log")
    saved = os.dup(2)
    try:
        os.dup2(fd, 2)
        yield Path(name)
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(fd)


def _llama_cpp():
    try:
        import llama_cpp
    except ImportError:
        raise LucaError("this needs llama-cpp-python: pip install 'luca[llamacpp]' (see docs for the CPU "
                        "build flags)") from None
    return llama_cpp


def quantize_gguf(src: str | Path, dst: str | Path, qtype: str, threads: int | None = None) -> None:
    """llama.cpp's quantizer: `src` (an F16/BF16/F32 GGUF) → `dst` of type `qtype`."""
    import ctypes
    llama_cpp = _llama_cpp()
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, TYPES[qtype][1])
    params.nthread = threads or os.cpu_count() or 1
    try:  # llama-cpp-python's log callback: errors only (a quantization log is hundreds of lines)
        from llama_cpp._logger import set_verbose
        set_verbose(False)
    except ImportError:
        pass
    with atomic_path(dst) as tmp, _quiet_stderr() as log:
        rc = llama_cpp.llama_model_quantize(str(src).encode(), str(tmp).encode(), ctypes.byref(params))
        if rc != 0:
            tail = log.read_text(errors="replace")[-2000:]
            log.unlink()
            raise LucaError(f"{dst}: llama.cpp quantization to {qtype} failed (code {rc}):\n{tail}")
    log.unlink(missing_ok=True)


_K_TYPES = {"Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"}


def inspect_gguf(path: str | Path) -> dict:
    """Size, parameter count, bits per weight, tensor-type counts and the 2-D tensors whose rows
    are not a multiple of 256 (which K-quants cannot hold) with the type they got."""
    import gguf
    r = gguf.GGUFReader(str(path))
    size = Path(path).stat().st_size
    params, counts, odd = 0, {}, []
    for t in r.tensors:
        tname = t.tensor_type.name
        params += int(t.n_elements)
        counts[tname] = counts.get(tname, 0) + 1
        if len(t.shape) >= 2 and int(t.shape[0]) % 256:
            odd.append((t.name, int(t.shape[0]), tname))
    return {"path": str(path), "bytes": size, "params": params, "bpw": size * 8 / max(params, 1),
            "tensor_types": counts, "odd_rows": odd}


def export_gguf(run_dir: str | Path, types=("f16", "q8_0", "q4_k_m"), out_dir: str | Path | None = None,
                say: Callable[[str], None] | None = None, progress: bool = True) -> list[dict]:
    """Write RUN/gguf/NAME-F16.gguf (and the other types asked for); one dict per file.

    Each dict: type, path, bytes, params, bpw, tensor_types, fallbacks ([(tensor, row length,
    type)] of a K-quant file: tensors that got another type because rows are not multiples of 256).
    """
    types = parse_types(types)
    run_dir = rundir.require_run_dir(run_dir)
    say = say or (lambda m: None)
    needs_llama = [t for t in types if TYPES[t][1] and not (t == "q8_0" and not _has_llama_cpp())]
    if needs_llama:
        _llama_cpp()
    base = next((t for t in ("f16", "bf16", "f32") if t in types), "f16")
    base_path = gguf_path(run_dir, base, out_dir)
    keep_base = base in types
    results: list[dict] = []
    tmpdir = None
    if not keep_base:  # the F16 file quantization starts from, beside the outputs and then removed
        base_path.parent.mkdir(parents=True, exist_ok=True)
        tmpdir = tempfile.TemporaryDirectory(prefix=".luca-gguf-", dir=base_path.parent)
        base_path = Path(tmpdir.name) / base_path.name
    from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
    try:
        with Progress(SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(),
                      disable=not progress, transient=True) as bar:
            job = bar.add_task(f"writing {base_path.name}", total=None)
            write_gguf(run_dir, base_path, base)
            if keep_base:
                results.append({"type": base, **inspect_gguf(base_path), "fallbacks": []})
            for t in types:
                if t in ("f16", "bf16", "f32") and t != base:
                    p = gguf_path(run_dir, t, out_dir)
                    bar.update(job, description=f"writing {p.name}")
                    write_gguf(run_dir, p, t)
                    results.append({"type": t, **inspect_gguf(p), "fallbacks": []})
                elif TYPES[t][1]:
                    p = gguf_path(run_dir, t, out_dir)
                    bar.update(job, description=f"quantizing {p.name}")
                    if t in needs_llama:
                        quantize_gguf(base_path, p, t)
                    else:
                        write_gguf(run_dir, p, t)
                    info = inspect_gguf(p)
                    kq = TYPES[t][0].startswith(("Q4_K", "Q5_K", "Q6_K"))
                    fb = [o for o in info["odd_rows"] if kq and o[2] not in _K_TYPES] if kq else []
                    results.append({"type": t, **info, "fallbacks": fb})
                    if fb:
                        say(fallback_note(t, fb))
    finally:
        if tmpdir is not None:
            tmpdir.cleanup()
    return results


def _has_llama_cpp() -> bool:
    try:
        import llama_cpp  # noqa: F401
        return True
    except ImportError:
        return False


def fallback_note(qtype: str, fb: list[tuple[str, int, str]]) -> str:
    by: dict[tuple[int, str], list[str]] = {}
    for name, n, t in fb:
        by.setdefault((n, t), []).append(name)
    parts = [f"{len(v)} × rows of {n} → {t} ({_short(v)})" for (n, t), v in sorted(by.items())]
    return (f"{TYPES[qtype][0]}: {len(fb)} tensor(s) fell back from K-quants because their rows are not a "
            f"multiple of 256: " + "; ".join(parts))


def _short(names: list[str]) -> str:
    kinds = sorted({n.split(".", 2)[-1] if n.startswith("blk.") else n for n in names})
    return ", ".join(kinds)


def results_table(results: list[dict], title: str = "GGUF export"):
    from rich.table import Table
    t = Table(title=title)
    for c in ("type", "file", "MB", "bits/weight", "vs first", "tensor types", "fallbacks"):
        t.add_column(c, justify="right" if c in ("MB", "bits/weight", "vs first", "fallbacks") else "left")
    ref = results[0]["bytes"] if results else 1
    for r in results:
        kinds = ", ".join(f"{k}×{v}" for k, v in sorted(r["tensor_types"].items()))
        t.add_row(r["type"], Path(r["path"]).name, f"{r['bytes'] / 1e6:,.1f}", f"{r['bpw']:.2f}",
                  f"{r['bytes'] / ref:.2f}×", kinds, str(len(r["fallbacks"])))
    return t


# -- Hugging Face import -----------------------------------------------------------------------------
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".h5", ".msgpack", ".ckpt", ".onnx")


def import_hf(hf_dir: str | Path, out: str | Path, say: Callable[[str], None] | None = None) -> dict:
    """Turn a local HF Llama / Qwen2 / Qwen3 checkpoint into a luca run directory (BF16 weights)."""
    say = say or (lambda m: None)
    src, out = Path(hf_dir), Path(out)
    if not src.is_dir():
        raise LucaError(f"{src}: no such directory")
    if not (src / rundir.CONFIG).is_file():
        raise LucaError(f"{src}: not a Hugging Face model directory (no config.json)")
    if not (src / rundir.WEIGHTS).is_file() and not (src / rundir.WEIGHTS_INDEX).is_file():
        raise LucaError(f"{src}: no model.safetensors or model.safetensors.index.json (only safetensors "
                        f"checkpoints are imported)")
    if out.resolve() == src.resolve():
        raise LucaError(f"{out}: the output directory must differ from the checkpoint")
    src_cfg = rundir.read_json(src / rundir.CONFIG)
    cfg = rundir.model_config_from_hf(src_cfg, str(src / rundir.CONFIG))
    if not (src / "tokenizer.json").is_file():
        raise LucaError(f"{src}: no tokenizer.json (a fast Hugging Face tokenizer is needed)")
    tok = rundir.load_tokenizer(src)
    sd_dtypes = _safetensors_dtypes(src)
    model = rundir.load_model(src, dtype=torch.bfloat16)
    out.mkdir(parents=True, exist_ok=True)
    rundir.save_model(out, model, None)
    hf = rundir.hf_config(cfg)
    for k in ("bos_token_id", "eos_token_id", "pad_token_id"):
        if k in src_cfg:
            hf[k] = src_cfg[k]
    rundir.write_json(out / rundir.CONFIG, hf)
    copied = []
    for f in sorted(src.iterdir()):
        if f.is_file() and f.name not in (rundir.CONFIG, rundir.WEIGHTS_INDEX) and not f.name.endswith(
                _WEIGHT_SUFFIXES) and f.stat().st_size < 64 << 20:
            shutil.copyfile(f, out / f.name)
            copied.append(f.name)
    if not (out / rundir.GENERATION).is_file():
        eos = sorted(tok.special_ids & {tok.eot_id, tok.im_end_id})
        rundir.write_json(out / rundir.GENERATION, {"eos_token_id": eos, "pad_token_id": tok.eot_id})
    rundir.write_luca_toml(out, {"name": out.name, "description": f"imported from {src.resolve()}",
                                 "imported_from": str(src.resolve()), "model": cfg.to_dict()})
    params = model.num_parameters()
    note = "" if sd_dtypes == {"BF16"} else f" (source {', '.join(sorted(sd_dtypes))} rounded to BF16)"
    rundir.update_report_section(out, "Import", f"Imported from `{src.resolve()}`: {cfg.arch}, {params:,} "
                                 f"parameters, {cfg.n_layers} layers, vocab {cfg.vocab_size}{note}.")
    say(f"{cfg.arch}: {params:,} parameters{note} → {out}")
    return {"arch": cfg.arch, "parameters": params, "source_dtypes": sorted(sd_dtypes), "copied": copied,
            "run_dir": str(out)}


def _safetensors_dtypes(d: Path) -> set[str]:
    """Tensor dtypes named in the safetensors headers (without reading the weights)."""
    index = d / rundir.WEIGHTS_INDEX
    files = rundir.shard_names(index) if index.is_file() else [rundir.WEIGHTS]
    out: set[str] = set()
    for f in files:
        with open(d / Path(f).name, "rb") as fh:
            n = int.from_bytes(fh.read(8), "little")
            header = json.loads(fh.read(n))
        out |= {v["dtype"] for k, v in header.items() if k != "__metadata__"}
    return out
