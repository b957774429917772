"""The model is numerically Hugging Face's Llama / Qwen2 / Qwen3, and its KV cache is exact."""
import pytest
import torch

from luca import rundir
from luca.model import KVCache, ModelConfig, Transformer
from luca.tokenizer import byte_tokenizer

FLAVOURS = {
    "llama": dict(),
    "qwen2": dict(qkv_bias=True),
    "qwen3": dict(qk_norm=True, head_dim=16),
}


def tiny(**kw) -> Transformer:
    cfg = ModelConfig(vocab_size=300, n_layers=2, d_model=64, n_heads=4, n_kv_heads=2, max_seq_len=64, **kw)
    torch.manual_seed(0)
    m = Transformer(cfg)
    with torch.no_grad():  # non-trivial norms and biases so that a wrong formula shows
        for n, p in m.named_parameters():
            if "norm" in n or n.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.1)
    return m


def bf16_roundtrip(m: Transformer) -> Transformer:
    """The run directory stores BF16: compare HF against luca with the same rounded weights."""
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(p.to(torch.bfloat16).float())
    return m


@pytest.mark.parametrize("flavour", FLAVOURS)
@pytest.mark.parametrize("tied", [True, False])
def test_hf_logits_and_greedy_match(tmp_path, flavour, tied):
    transformers = pytest.importorskip("transformers")
    m = bf16_roundtrip(tiny(tie_embeddings=tied, **FLAVOURS[flavour]))
    rundir.save_model(tmp_path, m, byte_tokenizer())
    cfg = rundir.read_json(tmp_path / "config.json")
    assert cfg["architectures"][0].lower().startswith(flavour)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    assert type(hf).__name__.lower().startswith(flavour)
    x = torch.randint(0, 300, (2, 37))
    with torch.no_grad():
        ours = m.eval()(x)
        theirs = hf(x).logits
    assert (ours - theirs).abs().max().item() <= 1e-4
    loaded = rundir.load_model(tmp_path)
    with torch.no_grad():
        assert (loaded(x) - ours).abs().max().item() <= 1e-5
    prompt = x[:1, :5]
    hf_out = hf.generate(prompt, max_new_tokens=12, do_sample=False, eos_token_id=None, pad_token_id=0)
    assert greedy(m, prompt, 12) == hf_out[0, 5:].tolist()


def greedy(m, prompt, n, cache=True):
    toks = prompt
    out = []
    kv = KVCache(m.cfg, 1, prompt.shape[1] + n) if cache else None
    with torch.no_grad():
        logits = m(toks, cache=kv)
        for _ in range(n):
            nxt = logits[:, -1].argmax(-1, keepdim=True)
            out.append(nxt.item())
            if kv is not None:
                logits = m(nxt, cache=kv)
            else:
                toks = torch.cat([toks, nxt], 1)
                logits = m(toks)
    return out


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_kv_cache_equals_full_recompute(flavour):
    m = tiny(**FLAVOURS[flavour]).eval()
    prompt = torch.randint(0, 300, (1, 7))
    assert greedy(m, prompt, 20, cache=True) == greedy(m, prompt, 20, cache=False)
    # Chunked prefill through the cache gives the same logits as one pass.
    x = torch.randint(0, 300, (2, 24))
    kv = KVCache(m.cfg, 2, 24)
    with torch.no_grad():
        full = m(x)
        parts = torch.cat([m(x[:, :10], cache=kv), m(x[:, 10:11], cache=kv), m(x[:, 11:], cache=kv)], 1)
    assert (full - parts).abs().max().item() < 1e-5


def test_doc_mask_isolates_packed_documents():
    m = tiny().eval()
    a, b = torch.randint(0, 300, (1, 9)), torch.randint(0, 300, (1, 6))
    packed = torch.cat([a, b], 1)
    doc_ids = torch.tensor([[0] * 9 + [1] * 6])
    positions = torch.cat([torch.arange(9), torch.arange(6)])[None]
    with torch.no_grad():
        out = m(packed, doc_ids=doc_ids, positions=positions)
        assert (out[:, 9:] - m(b)).abs().max().item() < 1e-5
        assert (out[:, :9] - m(a)).abs().max().item() < 1e-5


def test_chunked_loss_equals_plain_cross_entropy():
    m = tiny()
    x = torch.randint(0, 300, (2, 40))
    y = torch.randint(0, 300, (2, 40))
    y[0, :5] = -100
    from luca.loss import chunked_cross_entropy
    h = m.hidden_states(x)
    ref = torch.nn.functional.cross_entropy(m.lm_head(h).flatten(0, 1), y.flatten(), ignore_index=-100)
    got = chunked_cross_entropy(h, m.lm_head.weight, y, chunk=16)
    assert abs(ref.item() - got.item()) < 1e-5
    got.backward()
    assert m.lm_head.weight.grad is not None


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_gpu_training_switches_keep_the_function(flavour):
    """Fused q/k/v and gate/up GEMMs compute the same network from the same (HF-named) parameters;
    the BF16 residual stream changes rounding under autocast only."""
    m = tiny(**FLAVOURS[flavour])
    keys = list(m.state_dict())
    x = torch.randint(0, 300, (2, 37))
    with torch.no_grad():
        ref = m(x)
        m.set_gpu_training(True, fuse_qkv=True, bf16_residual=True)
        assert all(b.self_attn.fused and b.mlp.fused for b in m.model.layers) and m.low_precision_residual
        assert (m(x) - ref).abs().max().item() <= 1e-5
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = m(x).float()
        assert (low - ref).norm() / ref.norm() < 5e-2
    assert list(m.state_dict()) == keys
    y = torch.randint(0, 300, (2, 37))
    m(x, y).backward()
    assert all(p.grad is not None for p in m.parameters())
    m.set_gpu_training(False)
    assert not any(b.self_attn.fused or b.mlp.fused for b in m.model.layers)


@pytest.mark.parametrize("flavour", FLAVOURS)
@pytest.mark.parametrize("checkpointing", [False, True])
def test_gpu_training_switches_keep_the_gradients(flavour, checkpointing):
    """The fused GEMMs' backward (luca's RoPE and SwiGLU kernels, run by Triton's interpreter) gives
    the unfused network's FP32 gradients, also with blocks recomputed (activation checkpointing)."""
    g = torch.Generator().manual_seed(1)
    x, y = torch.randint(0, 300, (2, 37), generator=g), torch.randint(0, 300, (2, 37), generator=g)
    grads = {}
    for fused in (False, True):
        m = tiny(**FLAVOURS[flavour])
        m.set_gpu_training(fused)
        m.gradient_checkpointing = checkpointing
        m(x, y).backward()
        grads[fused] = {n: p.grad for n, p in m.named_parameters()}
    for n, want in grads[False].items():
        torch.testing.assert_close(grads[True][n], want, rtol=1e-4, atol=1e-6, msg=n)


@pytest.mark.parametrize("precision", ["fp32", "bf16-residual"])
def test_compiled_gpu_switches_give_eager_gradients(precision):
    """Compiled, the GPU training path (fused GEMMs, RoPE and SwiGLU backward kernels) gives eager's
    gradients to every parameter, in FP32 and with a BF16 residual stream under autocast. On torch
    2.11 this failed before luca's autograd functions stopped making no-op casts (kernels.cast):
    q_proj and k_proj got no gradient at all."""
    g = torch.Generator().manual_seed(3)
    x, y = torch.randint(0, 300, (2, 37), generator=g), torch.randint(0, 300, (2, 37), generator=g)
    bf16 = precision == "bf16-residual"
    out = {}
    for compiled in (False, True):
        torch._dynamo.reset()
        m = tiny()
        m.set_gpu_training(True, bf16_residual=bf16)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = (torch.compile(m) if compiled else m)(x, y)
        loss.backward()
        out[compiled] = {n: p.grad for n, p in m.named_parameters()}
    for n, want in out[False].items():
        # BF16: the compiler rounds fewer intermediates than eager does; a lost gradient is off by 100%
        err = ((out[True][n] - want).norm() / want.norm()).item()
        assert err < (3e-2 if bf16 else 1e-5), (n, err)


@pytest.mark.parametrize("fuse", [False, True])
def test_fp32_weight_gradients_equal_autocasts(fuse):
    """`wgrad32` computes the same BF16 forward and backward as autocast; only the weight gradient's
    rounding differs (on a CPU, where GEMMs cannot emit FP32, not even that: bitwise equal)."""
    x, y = torch.randint(0, 300, (2, 37)), torch.randint(0, 300, (2, 37))
    grads = {}
    for wgrad32 in (False, True):
        m = tiny(**FLAVOURS["llama"])
        m.set_gpu_training(True, fuse_qkv=fuse, wgrad32=wgrad32)
        assert all(b.mlp.wgrad32 == wgrad32 for b in m.model.layers)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = m(x, y)
        loss.backward()
        grads[wgrad32] = (loss.detach(), {n: p.grad for n, p in m.named_parameters()})
    assert torch.equal(grads[False][0], grads[True][0])
    for n, g in grads[False][1].items():
        assert grads[True][1][n].dtype == torch.float32 and torch.equal(g, grads[True][1][n]), n


def test_config_validation():
    with pytest.raises(ValueError):
        ModelConfig(n_heads=6, n_kv_heads=4)
    with pytest.raises(ValueError):
        ModelConfig.from_dict({"n_layer": 3})
