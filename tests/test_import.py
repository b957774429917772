"""Hugging Face checkpoints in (`luca import`), foreign tokenizers, and the native engine's
int8 and batched decoding."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from luca import rundir
from luca.engine import NativeEngine, SamplingConfig, complete, complete_batch, generate_ids
from luca.export import import_hf
from luca.tokenizer import Tokenizer, byte_tokenizer

transformers = pytest.importorskip("transformers")

VOCAB = 320


def _llama3_style_tokenizer(d: Path) -> None:
    """A byte-level tokenizer with Llama-3's special tokens (no <|endoftext|>, no ChatML)."""
    from tokenizers import AddedToken
    tok = byte_tokenizer().tok
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False)
                            for s in ("<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>")])
    j = json.loads(tok.to_str())
    # drop luca's specials: a tokenizer that never heard of them
    j["added_tokens"] = [t for t in j["added_tokens"] if not t["content"].startswith(("<|endoftext", "<|im_"))]
    for i, t in enumerate(j["added_tokens"]):
        t["id"] = 256 + i
    (d / "tokenizer.json").write_text(json.dumps(j))
    (d / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|begin_of_text|>",
        "eos_token": "<|end_of_text|>", "clean_up_tokenization_spaces": False}))


def _qwen_style_tokenizer(d: Path) -> None:
    """luca's byte tokenizer under a Qwen-style tokenizer_config.json (no luca keys)."""
    tok = byte_tokenizer()
    (d / "tokenizer.json").write_text(tok.tok.to_str())
    cfg = {k: v for k, v in tok.hf_config().items() if not k.startswith("luca_")}
    (d / "tokenizer_config.json").write_text(json.dumps(cfg))


def make_hf_model(d: Path, arch: str, tied: bool, shard: str | None = None, seed: int = 0) -> Path:
    torch.manual_seed(seed)
    common = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                  tie_word_embeddings=tied, rms_norm_eps=1e-6, rope_theta=10000.0)
    if arch == "llama":
        cfg = transformers.LlamaConfig(**common)
        model = transformers.LlamaForCausalLM(cfg)
    elif arch == "qwen2":
        cfg = transformers.Qwen2Config(**common)
        model = transformers.Qwen2ForCausalLM(cfg)
    else:
        cfg = transformers.Qwen3Config(head_dim=24, **common)  # Qwen3 decouples head_dim from d_model
        model = transformers.Qwen3ForCausalLM(cfg)
    with torch.no_grad():  # random norms and biases too, so that a dropped tensor would show
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith(".bias"):
                p.copy_(torch.randn_like(p) * 0.2 + (1.0 if "norm" in name else 0.0))
    model = model.to(torch.bfloat16)  # HF checkpoints are BF16, as luca's run directories
    kw = {"max_shard_size": shard} if shard else {}
    model.save_pretrained(d, **kw)
    (_llama3_style_tokenizer if arch == "llama" else _qwen_style_tokenizer)(d)
    return d


CASES = [("llama", True, None), ("llama", False, "100KB"), ("qwen2", False, None), ("qwen2", True, "100KB"),
         ("qwen3", True, None), ("qwen3", False, "100KB")]


@pytest.mark.parametrize("arch,tied,shard", CASES)
def test_imported_logits_equal_transformers(tmp_path, arch, tied, shard):
    hf_dir = make_hf_model(tmp_path / "hf", arch, tied, shard)
    assert (hf_dir / "model.safetensors.index.json").is_file() == bool(shard)
    out = tmp_path / "run"
    info = import_hf(hf_dir, out)
    assert info["arch"] == arch and "tokenizer.json" in info["copied"]
    assert (out / "model.safetensors").is_file() and (out / "luca.toml").is_file()
    ref = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    x = torch.randint(0, VOCAB, (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = ref(x).logits
        for d in (out, hf_dir):  # the run directory, and the HF directory used directly
            got = rundir.load_model(d)(x)
            assert (got - want).abs().max().item() <= 1e-4, d
    # The run directory is itself a Hugging Face model again.
    back = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    with torch.no_grad():
        assert (back(x).logits - want).abs().max().item() <= 1e-4
    # The tokenizer files are kept as they were.
    assert (out / "tokenizer_config.json").read_text() == (hf_dir / "tokenizer_config.json").read_text()


def test_foreign_llama_tokenizer_degrades_gracefully(tmp_path):
    hf_dir = make_hf_model(tmp_path / "hf", "llama", True)
    out = tmp_path / "run"
    import_hf(hf_dir, out)
    tok = rundir.load_tokenizer(out)
    eos = tok.tok.token_to_id("<|end_of_text|>")
    assert tok.eot_id == eos and tok.im_start_id is None and tok.im_end_id is None
    assert tok.encode("<|end_of_text|>", allow_special=True) == [eos]
    assert tok.encode("<|end_of_text|>") != [eos]  # plain text stays plain
    assert tok.token_bytes(eos) == b"<|end_of_text|>" and tok.token_bytes(VOCAB + 5) == b""
    with pytest.raises(ValueError, match="ChatML"):
        tok.encode_chat([{"role": "user", "content": "hi"}])
    # generation stops at the HF eos token by default
    model = rundir.load_model(out)
    c = complete(model, tok, tok.encode("héllo"), SamplingConfig(max_new_tokens=8, temperature=0))
    assert c.completion_tokens <= 8
    # saving keeps the foreign config instead of writing luca's
    tok.save(tmp_path / "saved")
    assert json.loads((tmp_path / "saved" / "tokenizer_config.json").read_text())["eos_token"] == "<|end_of_text|>"
    # the CLI takes the imported run and the HF directory alike
    from luca.cli import main
    for d in (out, hf_dir):
        assert main(["generate", str(d), "--prompt", "ab", "--max-new-tokens", "4", "--temperature", "0"]) == 0


def test_sentencepiece_style_pieces_have_their_bytes(tmp_path):
    from tokenizers import AddedToken, decoders, models, normalizers
    from tokenizers import Tokenizer as HFTokenizer
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, "<0x0A>": 3, "<0xC3>": 4, "<0xA9>": 5, "▁": 6, "h": 7, "i": 8,
             "▁h": 9, "▁hi": 10}
    t = HFTokenizer(models.BPE(vocab=vocab, merges=[("▁", "h"), ("▁h", "i")], byte_fallback=True, unk_token="<unk>"))
    t.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    t.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    t.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in ("<unk>", "<s>", "</s>")])
    t.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "</s>", "bos_token": "<s>"}))
    tok = Tokenizer.load(tmp_path)
    assert tok.eot_id == 2
    ids = tok.encode("hi é\n")
    assert tok.decode_bytes(ids).decode() == " hi é\n"  # SentencePiece's leading space


# -- native engine: int8, BF16, batches -------------------------------------------------------------
def test_batched_greedy_equals_one_by_one(tiny_run):
    model, tok = rundir.load_model(tiny_run), rundir.load_tokenizer(tiny_run)
    prompts = [tok.encode(p) for p in ("def push(self, item):", "class ", "The quick brown fox", "a, b = 0")]
    s = SamplingConfig(max_new_tokens=20, temperature=0)
    one = [[st[0] for st in generate_ids(model, [p], s, set())] for p in prompts]
    rows: list[list] = [[] for _ in prompts]
    for step in generate_ids(model, prompts, s, set()):
        for b, t in enumerate(step):
            rows[b].append(t)
    assert rows == one
    # stop ids end each row on its own; complete_batch gives each prompt's text
    texts = complete_batch(model, tok, prompts, s)
    assert [c.text for c in texts] == [complete(model, tok, p, s).text for p in prompts]


def test_engine_matches_model_and_int8_stays_close(tiny_run):
    model, tok = rundir.load_model(tiny_run), rundir.load_tokenizer(tiny_run)
    prompts = [tok.encode("def fib_3(n):"), tok.encode("Numbers such as 12")]
    with torch.no_grad():
        ref = torch.stack([model(torch.tensor([p]))[0, -1] for p in prompts])
    assert (NativeEngine(model).logits(prompts) - ref).abs().max().item() <= 1e-4
    for eng in (NativeEngine(model, quant="int8"), NativeEngine(model, dtype="bf16"),
                NativeEngine(model, quant="int8-dynamic")):
        got = eng.logits(prompts)
        assert (got - ref).abs().max().item() <= 0.05 * ref.abs().max().item()
        assert (got.argmax(-1) == ref.argmax(-1)).all()
    int8 = NativeEngine(model, quant="int8")
    assert int8.nbytes() < 0.6 * NativeEngine(model, dtype="bf16").nbytes()
    s = SamplingConfig(max_new_tokens=12, temperature=0)
    a = complete(int8, tok, prompts[0], s, set())
    assert a.completion_tokens == 12


def test_engine_cache_follows_weight_changes(tiny_run):
    model = rundir.load_model(tiny_run)
    ids = [[5, 6, 7]]
    s = SamplingConfig(max_new_tokens=3, temperature=0)
    first = list(generate_ids(model, ids, s, set()))
    with torch.no_grad():
        model.lm_head.weight.zero_()  # every logit ties: argmax is id 0
    assert list(generate_ids(model, ids, s, set())) == [[0], [0], [0]] != first
