"""Matched comparisons, the GPT-2 baseline, the compression-pressure variant, the ladder's fit and
the structured diagnostics — on tiny real models and real files."""
from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path

import pytest
import torch

from conftest import make_corpus
from luca import rundir
from luca.errors import LucaError

TINY = """
[data]
sources = ["{corpus}"]
val_fraction = 0.1

[tokenizer]
kind = "byte"

[model]
vocab_size = 320
n_layers = 2
d_model = 32
n_heads = 4
n_kv_heads = 4
max_seq_len = 32
{model}

[train]
seq_len = 32
micro_batch = 4
batch_tokens = 128
max_steps = 4
lr = 3e-3
warmup_steps = 1
eval_batches = 1
save_every = 100
log_every = 1
dtype = "fp32"
{train}
{extra}
"""


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """A corpus, and LUCA_HOME (the data cache) in a temporary directory for this module."""
    d = tmp_path_factory.mktemp("compare")
    old = os.environ.get("LUCA_HOME")
    os.environ["LUCA_HOME"] = str(d / "home")
    make_corpus(d / "corpus")
    yield d
    if old is None:
        os.environ.pop("LUCA_HOME", None)
    else:
        os.environ["LUCA_HOME"] = old


def config(work: Path, name: str, model: str = "", train: str = "", extra: str = "", corpus: str = "corpus") -> str:
    p = work / f"{name}.toml"
    p.write_text(TINY.format(corpus=work / corpus, model=model, train=train, extra=extra), encoding="utf-8")
    return str(p)


# -- matching --------------------------------------------------------------------------------
def test_unmatched_configs_are_refused(work):
    from luca.compare import compare
    a = config(work, "luca_small")
    b = config(work, "gpt2_wide", model='family = "gpt2"')  # GELU 4×: more parameters than SwiGLU 8/3
    with pytest.raises(LucaError, match=r"differ by \d+\.\d% in params \(tolerance 2%\)"):
        compare([a, b], seeds=2, out=work / "refused", progress=False)
    with pytest.raises(LucaError, match="in flops"):
        compare([a, b], seeds=2, match="flops", out=work / "refused", progress=False)
    assert not (work / "refused").exists()  # refused before anything trained or was written
    r = compare([a, b], seeds=2, out=work / "dry", tolerance=0.5, dry_run=True, progress=False)
    counts = {c["label"]: c["parameters"] for c in r["configs"]}
    assert r["settings"]["spread"] == pytest.approx(max(counts.values()) / min(counts.values()) - 1)
    # GPT-2 with 4× GELU (d_ff 128) has fewer parameters than luca's SwiGLU (3 matrices of d_ff 128);
    # d_ff 176 brings it within 0.5%.
    c = config(work, "gpt2_matched", model='family = "gpt2"\nd_ff = 176')
    r = compare([a, c], seeds=2, out=work / "dry", dry_run=True, progress=False)
    assert r["settings"]["spread"] <= 0.02
    # Validation on other documents is refused too: BPB would not be comparable.
    make_corpus(work / "other", n_files=5)
    d = config(work, "other_data", corpus="other")
    with pytest.raises(LucaError, match="validate on different documents"):
        compare([a, d], seeds=1, out=work / "refused", progress=False)


# -- seeds, resume, records ------------------------------------------------------------------
def test_seed_determinism_resume_and_report(work):
    from luca.compare import compare
    a, a2 = config(work, "same"), config(work, "same_again")  # identical configs under two names
    out = work / "cmp"
    r = compare([a, a2], seeds=2, tokens=512, out=out, max_runs=3, progress=False)  # interrupted after 3 runs
    assert not r["complete"] and len(r["trained"]) == 3
    done = {f"{x['config']}/seed{x['seed']}": (out / x["run_dir"] / "model.safetensors").stat().st_mtime_ns
            for x in r["runs"] if x["status"] == "done"}
    assert len(done) == 3
    r = compare([a, a2], seeds=2, tokens=512, out=out, progress=False, diagnostics=3, by_position=1500)
    assert r["complete"] and r["trained"] == ["same_again/seed1"] and sorted(r["reused"]) == sorted(done)
    for x in r["runs"]:  # finished runs were not retrained
        key = f"{x['config']}/seed{x['seed']}"
        if key in done:
            assert (out / x["run_dir"] / "model.safetensors").stat().st_mtime_ns == done[key]
    bpb = {(x["config"], x["seed"]): x["val_bpb"] for x in r["runs"]}
    assert bpb[("same", 0)] == bpb[("same_again", 0)] and bpb[("same", 1)] == bpb[("same_again", 1)]
    assert bpb[("same", 0)] != bpb[("same", 1)]  # the seed changes the initialisation
    # Records: the JSON the tables are made from.
    j = json.loads((out / "comparison.json").read_text())
    assert j["schema_version"] == 1 and j["complete"]
    for x in j["runs"]:
        for k in ("parameters", "tokens", "flops", "val_bpb", "time_s", "run_dir", "curve", "diagnostics", "by_position"):
            assert k in x, k
        assert rundir.is_run_dir(out / x["run_dir"]) and x["tokens"] == 512
        assert set(x["diagnostics"]) == {"copy", "sort", "addition", "brackets", "recall"}
        assert x["by_position"][0]["positions"] == [0, 0]  # byte-level model through the BPB-by-position curve
    pair = j["summary"]["pairs"][0]
    assert pair["ties"] == 2 and pair["t_test_p"] == 1.0 and pair["sign_test_p"] == 1.0
    md = (out / "comparison.md").read_text()
    for s in ("## Pairs", "paired t-test p", "sign test p", "Structured diagnostics", "BPB by position", "runs/same/seed0"):
        assert s in md, s
    for png in ("validation_curves.png", "bpb_by_position.png"):
        assert (out / png).read_bytes()[:4] == b"\x89PNG"


def test_statistics_match_scipy():
    stats = pytest.importorskip("scipy.stats")
    special = pytest.importorskip("scipy.special")
    from luca.compare import betainc, paired_t_test, sign_test
    for a, b, x in ((1.5, 0.5, 0.3), (0.5, 0.5, 0.9), (10.0, 0.5, 0.99), (3.0, 7.0, 0.2)):
        assert betainc(a, b, x) == pytest.approx(float(special.betainc(a, b, x)), rel=1e-10)
    xa, xb = [1.31, 1.29, 1.35, 1.30], [1.36, 1.33, 1.37, 1.36]
    t, p = paired_t_test(xb, xa)
    ref = stats.ttest_rel(xb, xa)
    assert t == pytest.approx(ref.statistic) and p == pytest.approx(ref.pvalue, rel=1e-9)
    assert sign_test(4, 0) == pytest.approx(0.125) and sign_test(3, 1) == pytest.approx(0.625)
    assert sign_test(8, 0) == pytest.approx(2 / 256)


# -- the GPT-2-style baseline ----------------------------------------------------------------
def test_gpt2_baseline_counts_trains_and_matches_transformers(work):
    from luca.baseline import GPT2
    from luca.config import derive_model
    from luca.model import ModelConfig
    V, L, d, T, ff = 320, 2, 32, 32, 128
    m = GPT2(ModelConfig(family="gpt2", vocab_size=V, n_layers=L, d_model=d, n_heads=4, n_kv_heads=4, max_seq_len=T))
    per_layer = 2 * 2 * d + (d * 3 * d + 3 * d) + (d * d + d) + (d * ff + ff) + (ff * d + d)  # 2 LN, qkv, proj, fc, proj
    assert m.num_parameters() == V * d + T * d + L * per_layer + 2 * d  # tied head; final LN
    assert m.num_parameters(non_embedding=True) == L * per_layer + 2 * d
    assert derive_model({"depth": 4, "family": "gpt2"})["n_kv_heads"] == 4  # no GQA for GPT-2
    with pytest.raises(ValueError, match="n_kv_heads"):
        GPT2(ModelConfig(family="gpt2", n_heads=4, n_kv_heads=2))
    from luca.compare import prepare_arm, run_arm
    arm = prepare_arm("g", config(work, "gpt2_run", model='family = "gpt2"'), progress=False)
    run = work / "gpt2_run"
    rec, trained = run_arm(arm, 0, run, None, progress=False)
    assert trained and math.isfinite(rec["val_bpb"])
    assert rundir.read_json(run / "config.json")["architectures"] == ["GPT2LMHeadModel"]
    ours = rundir.load_model(run)
    assert isinstance(ours, GPT2)
    x = torch.randint(0, 256, (2, 20))
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoModelForCausalLM.from_pretrained(run, dtype=torch.float32).eval()
    with torch.no_grad():
        assert (ours(x) - hf(x).logits).abs().max().item() <= 1e-4
        from luca.model import KVCache  # the KV cache path gives the full forward's logits
        cache = KVCache(ours.cfg, 2, 20)
        stepped = torch.cat([ours(x[:, :12], cache=cache), ours(x[:, 12:], cache=cache)], 1)
        assert (stepped - ours(x)).abs().max().item() <= 1e-5
    from luca.engine import SamplingConfig, generate_ids  # the engine protocol: greedy equals HF's
    ids = arm.tok.encode("def push(self")
    ref = hf.generate(torch.tensor([ids]), max_new_tokens=10, do_sample=False, eos_token_id=None,
                      pad_token_id=arm.tok.eot_id)[0, len(ids):].tolist()
    got = [t[0] for t in generate_ids(ours, [ids], SamplingConfig(max_new_tokens=10, temperature=0), stop_ids=set())]
    assert got == ref


# -- the compression-pressure variant --------------------------------------------------------
def test_bottleneck_variant_trains_and_exports_a_plain_llama(work):
    from luca.auxiliary import AuxConfig, build_model
    from luca.compare import prepare_arm, run_arm
    from luca.model import ModelConfig, Transformer
    extra = '[aux]\nkind = "bottleneck"\ndim = 4\nahead = 3\nweight = 0.5'
    arm = prepare_arm("b", config(work, "bottleneck", extra=extra), progress=False)
    assert arm.aux.kind == "bottleneck" and arm.aux_params == 32 * 4 + 3 * (4 * 32 + 32)
    run = work / "bottleneck_run"
    rec, _ = run_arm(arm, 0, run, None, progress=False)
    hf_cfg = rundir.read_json(run / "config.json")
    assert hf_cfg["architectures"] == ["LlamaForCausalLM"]
    from safetensors import safe_open
    with safe_open(str(run / "model.safetensors"), "pt") as f:
        saved = set(f.keys())
    plain = Transformer(arm.model_cfg)
    assert saved == set(plain.state_dict()) - {"lm_head.weight"}  # no auxiliary tensor in the export
    # The checkpoint keeps the heads; its trunk (rounded to BF16 as exported) gives the exported logits.
    from luca.train import load_state
    state = load_state(run)["model"]
    assert any(k.startswith("down.") for k in state)
    trained = build_model(arm.model_cfg, arm.aux)
    trained.load_state_dict(state)
    trunk = trained.trunk.eval()
    with torch.no_grad():
        for p in trunk.parameters():
            p.copy_(p.to(torch.bfloat16).float())
        x = torch.randint(0, 256, (2, 24))
        assert (rundir.load_model(run)(x) - trunk(x)).abs().max().item() <= 1e-5
    # The objective: the logged loss is the LM loss, yet the heads' gradient reaches the blocks below the tap.
    cfg = ModelConfig(vocab_size=320, n_layers=2, d_model=32, n_heads=4, n_kv_heads=4, max_seq_len=32)
    grads = []
    for w in (0.0, 1.0):
        m = build_model(cfg, AuxConfig(kind="bottleneck", dim=4, ahead=3, weight=w))
        m.reset_parameters(seed=3)
        m.train()
        loss = m(x[:, :-1], x[:, 1:])
        loss.backward()
        assert loss.item() == pytest.approx(m.trunk(x[:, :-1], x[:, 1:]).item(), abs=1e-6)
        grads.append(m.trunk.model.layers[0].mlp.down_proj.weight.grad.clone())
    assert not torch.allclose(grads[0], grads[1])
    m.eval()  # at inference the wrapper is its trunk
    with torch.no_grad():
        assert torch.equal(m(x[:, :-1], x[:, 1:], reduction="none"), m.trunk(x[:, :-1], x[:, 1:], reduction="none"))
    mtp = build_model(cfg, AuxConfig(kind="mtp", ahead=2))
    assert mtp.offsets == [2, 3] and mtp(x[:, :-1], x[:, 1:]).requires_grad


# -- the scaling fit -------------------------------------------------------------------------
@pytest.mark.parametrize("scipy", [True, False])
def test_power_law_fit_recovers_parameters(monkeypatch, scipy):
    import numpy as np

    from luca.ladder import compute_optimal, fit_power_law, predict
    if scipy:
        pytest.importorskip("scipy.optimize")
    else:
        monkeypatch.setitem(sys.modules, "scipy.optimize", None)  # the numpy-only path
    E, A, alpha, B, beta = 0.8, 50.0, 0.34, 300.0, 0.28
    N = [1e5, 3e5, 1e6, 3e6, 1e7]
    f = fit_power_law(N, [E + A * n ** -alpha for n in N])
    tol = 1e-6 if scipy else 1e-2
    assert (f["E"], f["A"], f["alpha"]) == pytest.approx((E, A, alpha), rel=tol) and "B" not in f
    pts = [(n, d) for n in N for d in (1e6, 4e6, 1.6e7)]
    f = fit_power_law([p[0] for p in pts], [E + A * n ** -alpha + B * d ** -beta for n, d in pts], [p[1] for p in pts])
    assert (f["E"], f["A"], f["alpha"], f["B"], f["beta"]) == pytest.approx((E, A, alpha, B, beta), rel=5 * tol)
    opt = compute_optimal(f, 1e18)
    ns = np.geomspace(1e4, 1e10, 4001)  # the closed form is the minimum along 6·N·D = C
    best = ns[int(np.argmin([predict(f, n, 1e18 / 6 / n) for n in ns]))]
    assert opt["N"] == pytest.approx(best, rel=0.01) and opt["N"] * opt["D"] * 6 == pytest.approx(1e18)
    with pytest.raises(LucaError, match="at least 3 points"):
        fit_power_law([1e5, 1e6], [2.0, 1.5])


def test_ladder_and_compare_from_the_cli(work, capsys):
    from luca.cli import main
    cfg = config(work, "ladder_base")
    assert main(["ladder", cfg, "--sizes", "1,2,3", "--tokens", "256", "--out", str(work / "lad")]) == 0
    j = json.loads((work / "lad" / "ladder.json").read_text())
    assert [p["depth"] for p in j["points"]] == [1, 2, 3] and j["schema_version"] == 1
    assert j["points"][0]["non_embedding_parameters"] < j["points"][2]["non_embedding_parameters"]
    assert (work / "lad" / "ladder.png").is_file() and "Scaling ladder" in (work / "lad" / "ladder.md").read_text()
    assert main(["compare", cfg, config(work, "g", model='family = "gpt2"'), "--dry-run"]) == 2
    assert "differ by" in capsys.readouterr().err


# -- structured diagnostics ------------------------------------------------------------------
def test_synthetic_tasks_are_right_and_deterministic():
    from luca.synthetic import TASKS, check, generate, iter_documents
    for t in TASKS:
        ex = generate(t, 50, seed=1)
        assert ex == generate(t, 50, seed=1) and ex != generate(t, 50, seed=2)
        assert all(check(e) for e in ex) and all(e.prompt.endswith(" =") for e in ex)
        assert generate(t, 50, 1, split="train") != ex
    assert generate("addition", 1, 0, digits=(3, 3))[0].prompt.count("+") == 1
    docs = list(iter_documents("all", 70))
    assert len(docs) == 3 and docs[0][1].count("\n") == 32


class Oracle(torch.nn.Module):
    """A test model over bytes that answers from a table (and answers wrong on purpose for some)."""

    def __init__(self, table: dict[str, str], max_len: int = 512):
        super().__init__()
        self.table, self.w = table, torch.nn.Parameter(torch.zeros(1))
        self.cfg = type("Cfg", (), {"max_seq_len": max_len})()

    def forward(self, ids):
        out = torch.full((*ids.shape, 320), -1e9)
        for r, row in enumerate(ids.tolist()):
            text = bytes(row).decode()
            prompt = next(p for p in self.table if text.startswith(p))
            target = self.table[prompt] + "\n"
            nxt = target[len(text) - len(prompt)] if len(text) - len(prompt) < len(target) else "\n"
            out[r, -1, ord(nxt)] = 0.0
        return out


def test_diagnostics_score_a_hand_case():
    from luca.diagnostics import score
    from luca.synthetic import Example
    from luca.tokenizer import byte_tokenizer
    ex = [Example("addition", "12+30 =", "42"), Example("addition", "7+8 =", "15"),
          Example("copy", "copy abc =", "abc"), Example("recall", "recall " + "xyz:123 " * 80 + "; xyz =", "123")]
    table = {ex[0].prompt: " 42", ex[1].prompt: " 16", ex[2].prompt: " abc"}  # the second is wrong
    r = score(Oracle(table, max_len=64), byte_tokenizer(), ex)
    assert (r["correct"], r["n"], r["skipped"]) == (2, 3, 1)  # the long recall prompt does not fit 64 bytes
    assert r["accuracy"] == pytest.approx(2 / 3) and r["failures"] == [{"prompt": "7+8 =", "expected": "15", "got": "16"}]


def test_synthetic_source_trains_but_never_validates(work):
    from luca import data as D
    from luca import sources as S
    m = D.collect(D.DataConfig(sources=[str(work / "corpus"), "synthetic:addition?n=400&seed=3"], val_fraction=0.3),
                  work / "mixed", progress=False)
    assert m["sources"][1]["documents"] == 13 and m["documents"]["val"] > 0
    import re
    sums = re.compile(r"^\d+\+\d+ = \d+$", re.M)
    assert not any(sums.search(doc) for doc in D.iter_documents(work / "mixed", "val"))
    assert sum(bool(sums.search(doc)) for doc in D.iter_documents(work / "mixed", "train")) >= 13
    with pytest.raises(LucaError, match="unknown synthetic task"):
        S.parse_source("synthetic:division")
    with pytest.raises(LucaError, match="belong to synthetic"):
        S.parse_source(f"{work / 'corpus'}?n=3")
