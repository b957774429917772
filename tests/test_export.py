"""GGUF export: metadata and tensors (gguf), and llama.cpp running the files (llama-cpp-python)."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from conftest import train_tiny_run
from luca import rundir
from luca.engine import NativeEngine, SamplingConfig, complete
from luca.errors import LucaError
from luca.export import _permute_rope, export_gguf, gguf_path, inspect_gguf, parse_types

gguf = pytest.importorskip("gguf")

UNICODE_AND_CODE = ("def naïve(x: int) -> str:\n\treturn f\"{x:>4}\"  # café, 数学, Ελληνικά, 🚀🦙\r\n"
                    "if a<=b and c!='d': print(\"ok\")   \n\n  12345 3.14 -7e10 <|im_end|> <|endoftext|> \u200d\n")
PROMPTS = ["def push(self, item):", "class Stack:\n    def", "The quick brown fox", "Numbers such as 12, 345"]


@pytest.fixture(scope="module")
def flavours(tiny_run, tmp_path_factory) -> dict[str, Path]:
    """Copies of the trained Llama run and small trained Qwen2 (byte tokenizer: 259 ids padded to
    320 rows) and Qwen3 runs, each exported to F16, Q8_0 and Q4_K_M once."""
    work = tmp_path_factory.mktemp("gguf")
    runs = {"llama": Path(shutil.copytree(tiny_run, work / "llama"))}
    runs["qwen2"] = train_tiny_run(work / "qwen2", work / "w2", tokenizer="byte", steps=20,
                                   overrides={"model.qkv_bias": True})
    runs["qwen3"] = train_tiny_run(work / "qwen3", work / "w3", steps=20, overrides={"model.qk_norm": True})
    types = ["f16", "q8_0", "q4_k_m"] if _has_llama_cpp() else ["f16", "q8_0"]
    for r in runs.values():
        export_gguf(r, types, progress=False)
    return runs


def _has_llama_cpp() -> bool:
    try:
        import llama_cpp  # noqa: F401
        return True
    except ImportError:
        return False


def test_metadata_tokens_and_tensors(flavours):
    for arch, run in flavours.items():
        cfg = rundir.load_model_config(run)
        tok = rundir.load_tokenizer(run)
        r = gguf.GGUFReader(str(gguf_path(run, "f16")))
        f = {k: v.contents() for k, v in r.fields.items() if not k.startswith("tokenizer.ggml.merges")}
        assert f["general.architecture"] == arch
        assert f[f"{arch}.attention.head_count_kv"] == cfg.n_kv_heads
        assert f[f"{arch}.attention.key_length"] == cfg.head_dim
        assert f[f"{arch}.context_length"] == cfg.max_seq_len
        assert f[f"{arch}.rope.freq_base"] == pytest.approx(cfg.rope_theta)
        assert f["tokenizer.ggml.model"] == "gpt2" and f["tokenizer.ggml.pre"] == "qwen2"
        tokens = f["tokenizer.ggml.tokens"]
        assert len(tokens) == cfg.vocab_size
        assert f["tokenizer.ggml.eos_token_id"] == tok.im_end_id and f["tokenizer.ggml.add_bos_token"] is False
        assert "<|im_start|>" in f["tokenizer.chat_template"]
        types = f["tokenizer.ggml.token_type"]
        assert types[tok.eot_id] == gguf.TokenType.CONTROL
        if tok.vocab_size < cfg.vocab_size:  # the byte run: rows past the tokenizer are UNUSED pads
            assert tokens[-1] == f"[PAD{cfg.vocab_size - 1}]" and types[-1] == gguf.TokenType.UNUSED
        names = {t.name for t in r.tensors}
        assert ("output.weight" in names) != cfg.tie_embeddings
        assert ("blk.0.attn_q_norm.weight" in names) == (arch == "qwen3")
        assert ("blk.0.attn_q.bias" in names) == (arch == "qwen2")
    # llama: Q/K rows permuted to GGML's interleaved RoPE layout, the rest as stored
    run = flavours["llama"]
    cfg, sd = rundir.load_model_config(run), rundir.load_state_dict(run)
    r = gguf.GGUFReader(str(gguf_path(run, "f16")))
    t = {x.name: torch.from_numpy(x.data.copy()).float() for x in r.tensors}
    q = sd["model.layers.0.self_attn.q_proj.weight"].float()
    assert torch.equal(t["blk.0.attn_q.weight"], _permute_rope(q, cfg.n_heads).half().float())
    assert torch.equal(t["blk.0.attn_v.weight"], sd["model.layers.0.self_attn.v_proj.weight"].half().float())


def test_types_and_errors(tiny_run, tmp_path):
    assert parse_types("F16, q4_k_m,f16") == ["f16", "q4_k_m"]
    with pytest.raises(LucaError, match="unknown type"):
        parse_types("q3_bogus")
    with pytest.raises(LucaError, match="no such run directory"):
        export_gguf(tmp_path / "nope", ["f16"], progress=False)
    # Q8_0 through gguf.quants alone (no llama.cpp) is a valid file too
    from luca.export import write_gguf
    p = tmp_path / "x-Q8_0.gguf"
    write_gguf(tiny_run, p, "q8_0")
    info = inspect_gguf(p)
    assert info["tensor_types"].get("Q8_0", 0) > 0 and info["bpw"] < 10


# -- llama.cpp ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def llama_cpp():
    return pytest.importorskip("llama_cpp")


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3"])
def test_f16_in_llama_cpp_matches_luca(flavours, llama_cpp, arch):
    from luca.engine_llamacpp import LlamaCppEngine
    run = flavours[arch]
    tok = rundir.load_tokenizer(run)
    ours = NativeEngine(rundir.load_model(run))  # FP32 compute on the same (BF16-stored) weights
    theirs = LlamaCppEngine(gguf_path(run, "f16"))
    # the tokenizer: llama.cpp's own tokenization of a Unicode-and-code text gives luca's ids
    assert theirs.tokenize(UNICODE_AND_CODE) == tok.encode(UNICODE_AND_CODE)
    prompts = [tok.encode(p) for p in PROMPTS]
    want, got = ours.logits(prompts), theirs.logits(prompts)
    assert (got - want).abs().max().item() <= 0.02 * max(1.0, want.abs().max().item())
    s = SamplingConfig(max_new_tokens=16, temperature=0)
    for p in prompts:
        assert [x[0] for x in theirs.generate_ids([p], s, set())] == [x[0] for x in ours.generate_ids([p], s, set())]
    # the same sampling options mean the same thing: a seed gives the same text on both engines
    # when their logits agree to within sampling noise (here: top-k 1 = greedy through the sampler)
    s = SamplingConfig(max_new_tokens=12, temperature=0.7, top_k=1, seed=3, repetition_penalty=1.3)
    assert complete(theirs, tok, prompts[0], s, set()).text == complete(ours, tok, prompts[0], s, set()).text


def test_quantized_files_load_and_generate(flavours, llama_cpp):
    from luca.engine_llamacpp import LlamaCppEngine
    run = flavours["llama"]
    tok = rundir.load_tokenizer(run)
    ids = tok.encode(PROMPTS[0])
    f16 = LlamaCppEngine(gguf_path(run, "f16")).logits([ids])[0]
    for t in ("q8_0", "q4_k_m"):
        eng = LlamaCppEngine(gguf_path(run, t))
        lg = eng.logits([ids])[0]
        assert torch.corrcoef(torch.stack([lg, f16]))[0, 1] > 0.95
        c = complete(eng, tok, ids, SamplingConfig(max_new_tokens=12, temperature=0.8, seed=1), set())
        assert c.completion_tokens == 12 and c.text
    # tiny rows (64) cannot be K-quants: the fallback is reported, naming tensors and types
    info = inspect_gguf(gguf_path(run, "q4_k_m"))
    assert info["odd_rows"] and not {"Q4_K", "Q6_K"} & set(info["tensor_types"])


def test_cli_export_and_llama_cpp_generate(tiny_run, tmp_path, llama_cpp, capsys):
    from luca.cli import main
    run = Path(shutil.copytree(tiny_run, tmp_path / "run"))
    assert main(["export", str(run), "--gguf", "f16,q4_k_m"]) == 0
    out = capsys.readouterr().out
    assert "bits/weight" in out and "Q4_K_M" in out and "fell back" in out
    assert gguf_path(run, "f16").is_file() and gguf_path(run, "q4_k_m").is_file()
    args = ["--prompt", "def push(self, item):", "--max-new-tokens", "8", "--temperature", "0"]
    assert main(["generate", str(run), "--backend", "llama.cpp", "--gguf", "f16", *args]) == 0
    a = capsys.readouterr().out
    assert main(["generate", str(run), "--backend", "native", *args]) == 0
    assert capsys.readouterr().out == a  # greedy: the same text from both engines
    # a missing type is exported on demand
    assert main(["generate", str(run), "--backend", "llama.cpp", "--gguf", "q8_0", *args]) == 0
    assert gguf_path(run, "q8_0").is_file()


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_imported_hf_checkpoint_exports_and_runs(tmp_path, llama_cpp, arch):
    """A foreign checkpoint: Llama-3-style tokenizer (eos <|end_of_text|>, no ChatML), untied head;
    Qwen3 with head_dim 24 ≠ d_model / n_heads (key_length carries it)."""
    pytest.importorskip("transformers")
    from test_import import make_hf_model
    from luca.engine_llamacpp import LlamaCppEngine
    hf = make_hf_model(tmp_path / "hf", arch, tied=False)
    res = export_gguf(hf, ["f16"], progress=False)  # an HF directory directly
    tok = rundir.load_tokenizer(hf)
    eng = LlamaCppEngine(res[0]["path"])
    f = gguf.GGUFReader(res[0]["path"]).fields
    eos = rundir.read_json(hf / "tokenizer_config.json")["eos_token"]  # the checkpoint's own eos
    assert f["tokenizer.ggml.eos_token_id"].contents() == tok.tok.token_to_id(eos)
    ids = tok.encode("héllo, wörld 12")
    assert eng.tokenize("héllo, wörld 12") == ids
    ours = NativeEngine(rundir.load_model(hf))
    want, got = ours.logits([ids]), eng.logits([ids])
    assert (got - want).abs().max().item() <= 0.02 * max(1.0, want.abs().max().item())
