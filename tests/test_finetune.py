"""Fine-tuning: readers, exact assistant-only masks, ChatML equal to transformers', LoRA/QLoRA training,
exact merges, PEFT-compatible adapters, Qwen2 (QKV bias) bases, and the CLI."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from luca import rundir
from luca.cli import main
from luca.errors import LucaError
from luca.finetune import FinetuneConfig, finetune, load_finetuned, merge, resolve_config
from luca.finetune import chat_data as CD
from luca.finetune.lora import LoraLinear, lora_modules, merge_lora
from luca.tokenizer import byte_tokenizer

IGNORE = -100


def write_jsonl(path: Path, records: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def arithmetic_chats(n: int = 96) -> list[dict]:
    out = []
    for i in range(n):
        a, b = i % 9, (i * 7) % 11
        out.append({"messages": [{"role": "user", "content": f"What is {a} plus {b}?"},
                                 {"role": "assistant", "content": f"{a} plus {b} is {a + b}."}]})
    return out


def small_cfg(**kw) -> FinetuneConfig:
    base = dict(max_steps=30, micro_batch=4, grad_accum=1, lr=5e-3, warmup_steps=2, seq_len=96, lora_r=8,
                lora_alpha=16, eval_every=15, log_every=5, val_fraction=0.1, seed=0)
    base.update(kw)
    return FinetuneConfig(**base)


@pytest.fixture(scope="module")
def chat_file(tmp_path_factory) -> Path:
    return write_jsonl(tmp_path_factory.mktemp("chat") / "chat.jsonl", arithmetic_chats())


@pytest.fixture(scope="module")
def lora_run(tiny_run, chat_file, tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("lora") / "ft"
    s = finetune(tiny_run, [str(chat_file)], out, small_cfg(system="You are terse."), progress=False)
    return out, s


# -- masks and packing ------------------------------------------------------------------------
def test_assistant_only_mask_is_exact_by_hand():
    tok = byte_tokenizer()  # ids 0..255 are bytes; 256 <|endoftext|>, 257 <|im_start|>, 258 <|im_end|>
    S, E, NL = 257, 258, [10]
    ex = CD.Example("hand", messages=[("system", "S"), ("user", "hi<|im_end|>"), ("assistant", "yo"),
                                      ("user", "ok?"), ("assistant", "k")])
    (ids, is_t), = CD.encode_examples(tok, [ex])
    b = lambda s: list(s.encode())  # noqa: E731
    expected = ([S] + b("system\nS") + [E] + NL + [S] + b("user\nhi<|im_end|>") + [E] + NL
                + [S] + b("assistant\n") + b("yo") + [E] + NL + [S] + b("user\nok?") + [E] + NL
                + [S] + b("assistant\n") + b("k") + [E] + NL)
    assert ids.tolist() == expected  # user text that spells a marker stays plain bytes
    trained = [int(i) for i, t in zip(ids, is_t) if t]
    assert trained == b("yo") + [E] + b("k") + [E]
    # The targets of the (shifted) row: exactly those ids, at the positions that predict them.
    batch = CD.collate([(ids, is_t)], [[0]], pad_id=256)
    y = batch.targets[0].tolist()
    want = [int(ids[j + 1]) if is_t[j + 1] else IGNORE for j in range(len(ids) - 1)]
    assert y[:len(ids) - 1] == want and set(y[len(ids) - 1:]) <= {IGNORE}
    first = len([S] + b("system\nS") + [E] + NL + [S] + b("user\nhi<|im_end|>") + [E] + NL + [S] + b("assistant\n"))
    assert expected[first] == ord("y")
    assert y[first - 1] == ord("y") and y[first - 2] == IGNORE  # the header's "\n" predicts "y"; nothing before
    assert batch.n_targets == 5

    # A default system prompt is rendered where the conversation has none; plain text trains on all.
    tok.default_system = "D"
    (ids2, t2), (ids3, t3) = CD.encode_examples(tok, [CD.Example("x", messages=[("user", "a"), ("assistant", "b")]),
                                                      CD.Example("t", text="abc")])
    assert ids2.tolist()[:len(b("system\nD")) + 1] == [S] + b("system\nD")
    assert [int(i) for i, t in zip(ids2, t2) if t] == b("b") + [E]
    assert ids3.tolist() == [256] + b("abc") + [256] and t3.tolist() == [False, True, True, True, True]


def test_packing_keeps_examples_apart(tiny_run):
    tok = rundir.load_tokenizer(tiny_run)
    model = rundir.load_model(tiny_run)
    exs = [CD.Example(str(i), messages=[("user", f"question {i}"), ("assistant", "def f(x):\n    return x" * (i + 1))])
           for i in range(3)]
    enc = CD.encode_examples(tok, exs)
    width = sum(len(ids) - 1 for ids, _ in enc)
    rows = CD.pack(enc, width)
    assert rows == [[0, 1, 2]] and CD.pack(enc, width - 1) == [[0, 1], [2]]
    packed = CD.collate(enc, rows, tok.eot_id)
    assert packed.doc_ids is not None and packed.positions[0, 0] == 0
    with torch.no_grad():
        logits = model(packed.tokens, positions=packed.positions, doc_ids=packed.doc_ids)[0]
        p = 0
        for ids, _ in enc:
            alone = model(torch.tensor(ids[:-1], dtype=torch.long)[None])[0]
            assert (logits[p:p + len(ids) - 1] - alone).abs().max().item() < 1e-4  # no attention across
            assert packed.positions[0, p] == 0
            p += len(ids) - 1
    single = CD.collate(enc, CD.pack(enc, width, packed=False), tok.eot_id)
    assert single.doc_ids is None and single.tokens.shape[0] == 3
    assert single.n_targets == packed.n_targets == sum(int(t[1:].sum()) for _, t in enc)


def test_truncation_is_counted_never_silent(tmp_path, tiny_run):
    tok = rundir.load_tokenizer(tiny_run)
    f = write_jsonl(tmp_path / "long.jsonl", [
        {"question": "q " * 5, "answer": "a " * 200},  # cut, targets remain
        {"question": "x " * 300, "answer": "y"},  # the reply is cut off entirely: dropped
        {"question": "short", "answer": "fine"}])
    data = CD.load_chat_data([str(f)], tok, seq_len=64, val_fraction=0.0)
    t = data.totals()
    assert t["truncated"] == 2 and t["dropped_no_target"] == 1 and t["examples"] == 2
    assert t["truncated_tokens"] > 0
    assert all(len(ids) <= 65 for ids, _ in data.train[0])


def test_weighted_mix_shares_tokens(tmp_path, tiny_run):
    tok = rundir.load_tokenizer(tiny_run)
    a = write_jsonl(tmp_path / "a.jsonl", [{"question": f"a{i}?", "answer": "yes " * 5} for i in range(60)])
    b = write_jsonl(tmp_path / "b.jsonl", [{"question": f"b{i}?", "answer": "no " * 5} for i in range(60)])
    data = CD.load_chat_data([f"{a}?weight=3", f"{b}?weight=1"], tok, 64, val_fraction=0.0)
    ids_a = {tuple(x[0]) for x in data.train[0]}
    mixed = CD.mix(data, seed=0, epoch=0)
    tok_a = sum(len(x[0]) for x in mixed if tuple(x[0]) in ids_a)
    tok_b = sum(len(x[0]) for x in mixed) - tok_a
    assert 2.6 < tok_a / tok_b < 3.4
    assert CD.mix(data, 0, 0)[0][0].tolist() == mixed[0][0].tolist()  # seeded


# -- readers ----------------------------------------------------------------------------------
def _msgs(spec: str) -> list:
    return [(e.messages, e.text) for e in CD.read_examples(CD.parse_chat_source(spec))]


def test_readers_each_format(tmp_path):
    m = write_jsonl(tmp_path / "m.jsonl", [{"messages": [
        {"role": "system", "content": "s"}, {"role": "user", "content": [{"type": "text", "text": "u"}]},
        {"role": "assistant", "content": "a\r\nb"}]}])
    assert _msgs(str(m)) == [([("system", "s"), ("user", "u"), ("assistant", "a\nb")], None)]
    sg = write_jsonl(tmp_path / "sg.jsonl", [{"system": "sys", "conversations": [
        {"from": "human", "value": "h"}, {"from": "gpt", "value": "g"}]}])
    assert _msgs(str(sg)) == [([("system", "sys"), ("user", "h"), ("assistant", "g")], None)]
    al = tmp_path / "al.json"  # Alpaca ships as one JSON array
    al.write_text(json.dumps([{"instruction": "Do", "input": "this", "output": "done"},
                              {"instruction": "Only", "input": "", "output": "ok"}]))
    assert _msgs(str(al)) == [([("user", "Do\n\nthis"), ("assistant", "done")], None),
                              ([("user", "Only"), ("assistant", "ok")], None)]
    si = write_jsonl(tmp_path / "seed.jsonl", [{"instruction": "I", "instances": [{"input": "", "output": "o1"},
                                                                                  {"input": "x", "output": "o2"}]}])
    assert [m for m, _ in _msgs(str(si))] == [[("user", "I"), ("assistant", "o1")], [("user", "I\n\nx"), ("assistant", "o2")]]
    qa = write_jsonl(tmp_path / "gsm.jsonl", [{"question": "1+1?", "answer": "1+1=<<1+1=2>>2\n#### 2"}])
    assert _msgs(str(qa)) == [([("user", "1+1?"), ("assistant", "1+1=<<1+1=2>>2\n#### 2")], None)]
    tx = write_jsonl(tmp_path / "t.jsonl", [{"text": "plain words"}])
    txt = tmp_path / "doc.txt"
    txt.write_text("a document\n")
    assert _msgs(str(tx)) == [(None, "plain words")] and _msgs(str(txt)) == [(None, "a document")]
    # ?format= overrides detection (a messages file read as text through ?field=)
    fm = write_jsonl(tmp_path / "fm.jsonl", [{"body": "b", "question": "q", "answer": "a"}])
    assert _msgs(f"{fm}?format=text&field=body") == [(None, "b")]
    # a directory of record files: each recognised by its own keys
    d = tmp_path / "dir"
    d.mkdir()
    shutil.copy(qa, d / "a.jsonl")
    shutil.copy(m, d / "b.jsonl")
    assert len(_msgs(str(d))) == 2


def test_reader_errors_name_the_place(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "q", "answer": "a"}\n{"question": oops}\n')
    with pytest.raises(LucaError, match=r"bad.jsonl:2: not valid JSON"):
        _msgs(str(bad))
    role = write_jsonl(tmp_path / "role.jsonl", [{"messages": [{"role": "user", "content": "u"}]},
                                                 {"messages": [{"role": "tool", "content": "t"}]}])
    with pytest.raises(LucaError, match=r"role.jsonl:2: message 0 has role 'tool'"):
        _msgs(str(role))
    sg = write_jsonl(tmp_path / "sg.jsonl", [{"conversations": [{"from": "robot", "value": "x"}]}])
    with pytest.raises(LucaError, match=r"sg.jsonl:1: turn 0 is from 'robot'"):
        _msgs(str(sg))
    al = write_jsonl(tmp_path / "al.jsonl", [{"instruction": "i", "output": "o"}, {"instruction": "i", "output": 3}])
    with pytest.raises(LucaError, match=r"al.jsonl:2: no string field 'output'"):
        _msgs(str(al))
    unk = write_jsonl(tmp_path / "unk.jsonl", [{"foo": 1}])
    with pytest.raises(LucaError, match=r"unk.jsonl:1: cannot tell the format .*foo"):
        _msgs(str(unk))
    with pytest.raises(LucaError, match="unknown format 'chatml'"):
        CD.parse_chat_source(f"{unk}?format=chatml")
    with pytest.raises(LucaError, match="unknown option 'colour'.*format"):
        CD.parse_chat_source(f"{unk}?colour=red")
    with pytest.raises(LucaError, match="weight must be a number > 0"):
        CD.parse_chat_source(f"{unk}?weight=-1")
    txt = tmp_path / "t.txt"
    txt.write_text("x")
    with pytest.raises(LucaError, match="format=qa needs"):
        _msgs(f"{txt}?format=qa")
    with pytest.raises(LucaError, match="no such file"):
        CD.parse_chat_source(str(tmp_path / "missing.jsonl"))
    latin = tmp_path / "l.jsonl"
    latin.write_bytes(b'{"text": "caf\xe9"}\n')
    with pytest.raises(LucaError, match=r"l.jsonl: byte 13: not valid utf-8"):
        _msgs(str(latin))
    assert _msgs(f"{latin}?encoding=latin-1") == [(None, "café")]


def test_hf_dataset_saved_to_disk(tmp_path, tiny_run):
    datasets = pytest.importorskip("datasets")
    ds = datasets.DatasetDict({
        "train": datasets.Dataset.from_list([{"conversations": [{"from": "human", "value": f"hi {i}"},
                                                                {"from": "gpt", "value": f"hello {i}"}]}
                                             for i in range(5)]),
        "test": datasets.Dataset.from_list([{"question": "q", "answer": "a"}])})
    ds.save_to_disk(str(tmp_path / "ds"))
    got = _msgs(f"hf:{tmp_path / 'ds'}")
    assert got[0] == ([("user", "hi 0"), ("assistant", "hello 0")], None) and len(got) == 5
    assert _msgs(f"hf:{tmp_path / 'ds'}:test") == [([("user", "q"), ("assistant", "a")], None)]
    with pytest.raises(LucaError, match="no split 'dev'"):
        _msgs(f"hf:{tmp_path / 'ds'}:dev")


def test_preset_reproduces_the_reference_recipe():
    cfg = resolve_config("sft-qlora")
    assert cfg.qlora and cfg.lora_r == 16 and cfg.lora_alpha == 16 and cfg.gradient_checkpointing
    assert cfg.targets == ["q", "k", "v", "o", "gate", "up", "down"]
    sources = [CD.parse_chat_source(s) for s in cfg.data]
    assert [s.format for s in sources] == ["text", "qa", "alpaca"]
    assert [s.source.weight for s in sources] == [0.2, 0.4, 0.4]
    assert resolve_config("sft-qlora", ["finetune.lora_r=8"], qlora=False).lora_r == 8
    with pytest.raises(LucaError, match="not a fine-tuning section"):
        resolve_config("nano-n1")


# -- template ---------------------------------------------------------------------------------
def test_template_equals_transformers_apply_chat_template(lora_run):
    transformers = pytest.importorskip("transformers")
    run, _ = lora_run
    hf = transformers.PreTrainedTokenizerFast.from_pretrained(run)
    tok = rundir.load_tokenizer(run)
    assert tok.default_system == "You are terse."
    convs = [[{"role": "user", "content": "What is 2 plus 3?"}, {"role": "assistant", "content": "Five."}],
             [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "Hi"},
              {"role": "assistant", "content": "Hello there"}, {"role": "user", "content": "Bye"},
              {"role": "assistant", "content": "Goodbye"}]]
    for conv in convs:
        for gen in (False, True):
            msgs = conv[:-1] if gen else conv
            assert tok.render_chat(msgs, add_generation_prompt=gen) == \
                hf.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen)
        ex = CD.Example("c", messages=[(m["role"], m["content"]) for m in conv])
        (ids, _), = CD.encode_examples(tok, [ex])
        ref = hf.apply_chat_template(conv, tokenize=True, return_dict=False)
        assert ids.tolist() == list(ref)


# -- LoRA training, merge, PEFT ---------------------------------------------------------------
def test_lora_finetune_lowers_the_loss(lora_run):
    run, s = lora_run
    assert s["val_loss_after"] < s["val_loss_before"] - 0.5
    assert s["final_train_loss"] < s["first_train_loss"] - 0.5
    for name in (rundir.ADAPTER_WEIGHTS, rundir.ADAPTER_CONFIG, "tokenizer.json", rundir.TOKENIZER_CONFIG,
                 rundir.METRICS, rundir.REPORT, rundir.LOSS_PNG, rundir.FINETUNE_SUMMARY, rundir.LUCA_TOML):
        assert (run / name).is_file(), name
    recs = rundir.read_metrics(run)
    assert recs[-1]["step"] == 30 and any("val_loss" in r for r in recs)
    assert "Fine-tuning" in (run / rundir.REPORT).read_text()
    assert rundir.read_luca_toml(run)["finetune"]["lora_r"] == 8


def test_trainable_parameter_count_is_exact(tiny_run):
    from luca.finetune.lora import LoraSpec, apply_lora, trainable_parameters
    model = rundir.load_model(tiny_run)
    c = model.cfg
    n_total = model.num_parameters()
    apply_lora(model, LoraSpec(r=4, targets=["q", "v", "down"]))
    kv = c.n_kv_heads * c.head_dim
    per_layer = 4 * (c.d_model + c.n_heads * c.head_dim) + 4 * (c.d_model + kv) + 4 * (c.d_ff + c.d_model)
    assert trainable_parameters(model) == (c.n_layers * per_layer, n_total + c.n_layers * per_layer)


def test_merged_logits_equal_base_plus_adapter(lora_run, tmp_path):
    run, _ = lora_run
    model, _ = load_finetuned(run, dtype=torch.float32)
    mods = lora_modules(model)
    assert len(mods) == 2 * 7 and all(m.lora_B.abs().max() > 0 for m in mods.values())  # it learned something
    x = torch.randint(0, 300, (2, 40))
    with torch.no_grad():
        before = model(x)
        merge_lora(model)
        assert not lora_modules(model)
        after = model(x)
    assert (before - after).abs().max().item() <= 1e-4
    out = merge(run, tmp_path / "merged")
    assert rundir.is_run_dir(out)
    written = rundir.load_model(out)
    for k, v in model.state_dict().items():  # the file holds the float32 merge rounded once to BF16
        assert torch.equal(written.state_dict()[k], v.to(torch.bfloat16).float()), k
    assert rundir.load_tokenizer(out).default_system == "You are terse."


def test_peft_loads_the_adapter(lora_run):
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    run, s = lora_run
    hf = transformers.AutoModelForCausalLM.from_pretrained(s["base"], dtype=torch.float32)
    hf = peft.PeftModel.from_pretrained(hf, str(run / rundir.ADAPTER_DIR)).eval()
    ours, _ = load_finetuned(run, dtype=torch.float32)
    x = torch.randint(0, 300, (2, 30))
    with torch.no_grad():
        assert (hf(x).logits - ours(x)).abs().max().item() <= 1e-4


def test_qlora_trains_and_merges_on_cpu(tiny_run, chat_file, tmp_path):
    pytest.importorskip("bitsandbytes")
    out = tmp_path / "q"
    s = finetune(tiny_run, [str(chat_file)], out, small_cfg(qlora=True, max_steps=25), progress=False)
    assert s["method"] == "qlora" and s["val_loss_after"] < s["val_loss_before"] - 0.5
    model, _ = load_finetuned(out, dtype=torch.float32)
    m = next(iter(lora_modules(model).values()))
    assert m.weight is None and m.weight_nf4.dtype == torch.uint8  # the base really is 4-bit
    assert m.weight_nf4.numel() == m.in_features * m.out_features // 2
    w = rundir.load_model(tiny_run).model.layers[0].self_attn.q_proj.weight
    err = (m.dequantized(torch.float32) - w).abs().mean() / w.abs().mean()
    assert 0.01 < err < 0.15  # NF4's rounding, not a copy and not garbage
    for mod in lora_modules(model).values():  # luca's own dequantiser (the CUDA path) is bitsandbytes', bit for bit
        mod.dequant = "bnb"
        ref = mod.dequantized(torch.bfloat16)
        mod.dequant = "torch"
        assert torch.equal(mod.dequantized(torch.bfloat16), ref)
    x = torch.randint(0, 300, (2, 40))
    with torch.no_grad():
        before = model(x)
        merge_lora(model)
        assert (before - model(x)).abs().max().item() <= 1e-4
    assert main(["merge", str(out)]) == 0  # into the run directory itself
    assert rundir.is_run_dir(out)
    merged = rundir.load_model(out)
    for k, v in model.state_dict().items():
        assert torch.equal(merged.state_dict()[k], v.to(torch.bfloat16).float()), k


def test_qwen2_hf_base_with_qkv_bias(tiny_run, chat_file, tmp_path):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.Qwen2Config(vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                                   tie_word_embeddings=True)
    torch.manual_seed(0)
    hf = transformers.Qwen2ForCausalLM(cfg).eval()
    with torch.no_grad():
        for n, p in hf.named_parameters():
            if n.endswith("_proj.bias"):
                p.normal_(0, 0.5)  # make the bias matter
    base = tmp_path / "qwen2"
    hf.save_pretrained(base)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tiny_run / f, base / f)
    out = tmp_path / "ft"
    s = finetune(base, [str(chat_file)], out, small_cfg(max_steps=12, targets=["q", "k", "v"], rslora=True, merge=True),
                 progress=False)
    assert s["val_loss_after"] < s["val_loss_before"]
    acfg = rundir.read_json(out / rundir.ADAPTER_CONFIG)
    assert acfg["use_rslora"] and acfg["target_modules"] == ["q_proj", "k_proj", "v_proj"]
    model, _ = load_finetuned(out, dtype=torch.float32)
    m = model.model.layers[0].self_attn.q_proj
    assert isinstance(m, LoraLinear) and m.scaling == pytest.approx(16 / 8 ** 0.5)
    assert torch.equal(m.bias, hf.model.layers[0].self_attn.q_proj.bias.detach().to(torch.bfloat16).float())
    x = torch.randint(0, 300, (2, 30))
    with torch.no_grad():
        ours = model(x)
        merged_hf = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
        # The merged directory is a plain Qwen2 checkpoint: transformers runs it (BF16 rounding apart).
        assert (merged_hf(x).logits - ours).abs().max().item() < 0.05
        assert (merged_hf(x).logits - rundir.load_model(out)(x)).abs().max().item() <= 1e-4


# -- CLI --------------------------------------------------------------------------------------
def test_cli_finetune_merge_and_errors(tiny_run, chat_file, tmp_path, capsys):
    out = tmp_path / "cli"
    rc = main(["finetune", str(tiny_run), "--data", f"{chat_file}?weight=2", "--out", str(out), "--max-steps", "3",
               "--lora-r", "4", "--targets", "q,v", "--no-pack", "--seq-len", "64", "--merge",
               "--finetune.log_every", "1", "--set", "finetune.micro_batch=2"])
    assert rc == 0
    assert rundir.is_run_dir(out) and (out / rundir.ADAPTER_WEIGHTS).is_file()
    toml = rundir.read_luca_toml(out)["finetune"]
    assert toml["pack"] is False and toml["targets"] == ["q", "v"] and toml["micro_batch"] == 2
    assert "trainable_parameters" in capsys.readouterr().out
    assert main(["merge", str(out), "--out", str(tmp_path / "again")]) == 0
    capsys.readouterr()
    for argv, msg in [
        (["finetune", str(tiny_run), "--data", str(tmp_path / "nope.jsonl"), "--out", str(tmp_path / "x")],
         "no such file"),
        (["finetune", str(tiny_run), "--data", str(chat_file), "--out", str(tmp_path / "x"), "--targets", "q,x"],
         "unknown projection 'x'"),
        (["finetune", str(tmp_path), "--data", str(chat_file), "--out", str(tmp_path / "x")], "not a run directory"),
        (["finetune", str(tiny_run), "--out", str(tmp_path / "x")], "no sources given"),
        (["merge", str(tiny_run)], "not a fine-tune run"),
    ]:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith("error: ") and msg in err, err
