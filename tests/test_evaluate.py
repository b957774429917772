"""Evaluation: prompts, tokenization and scores as lm-evaluation-harness makes them; BPB; records; errors."""
from __future__ import annotations

import importlib.util
import json
import math
import random
import shutil
from pathlib import Path

import pytest
import torch

from luca import rundir
from luca.cli import main
from luca.errors import LucaError
from luca.evaluate import evaluate, evaluate_task
from luca.evaluate import harness as H
from luca.evaluate.bpb import bits_per_byte, windows
from luca.evaluate.tasks import TASKS, load_task

FIX = Path(__file__).parent / "fixtures" / "eval"
FILES = {"hellaswag": FIX / "hellaswag/hellaswag_val.jsonl", "piqa": FIX / "piqa/valid.jsonl",
         "arc_easy": FIX / "arc/ARC-Easy-Test.jsonl", "arc_challenge": FIX / "arc/ARC-Challenge-Test.jsonl",
         "winogrande": FIX / "winogrande/dev.jsonl", "lambada_openai": FIX / "lambada/lambada_test.jsonl"}


@pytest.fixture(scope="module")
def loaded(tiny_run):
    return rundir.load_model(tiny_run), rundir.load_tokenizer(tiny_run)


@pytest.fixture
def run_copy(tiny_run, tmp_path):
    d = tmp_path / "run"
    shutil.copytree(tiny_run, d, ignore=shutil.ignore_patterns("train_state"))
    return d


def _direct_ll(model, ctx: list[int], cont: list[int], L: int) -> tuple[float, bool]:
    """lm-eval's HFLM arithmetic for one request, one sequence, full logits."""
    inp = (ctx + cont)[-(L + 1):][:-1]
    with torch.no_grad():
        lp = torch.log_softmax(model(torch.tensor([inp])).float(), -1)[0, len(inp) - len(cont):]
    tgt = torch.tensor(cont)
    return float(lp.gather(1, tgt[:, None]).sum()), bool((lp.argmax(-1) == tgt).all())


# -- prompts ------------------------------------------------------------------------------------
def test_prompts_by_hand():
    hs = load_task("hellaswag", FILES["hellaswag"]).docs
    assert hs[0].requests[0] == ("Roof shingle removal: A man is sitting on a roof. He",
                                 " is using wrap to wrap a pair of skis.")
    # preprocess: " [title]" → ". ", other [..] removed, double spaces collapsed, ends stripped
    assert hs[1].requests[0][0] == "Home and Garden: How to clean a grill. Scrub the grates. Use a wire brush. Then"
    # (lm-eval strips before removing markers, so "[title] Eat" keeps the space the marker left)
    assert [c for _, c in hs[1].requests] == [" rinse the grates with water Let them dry.", " paint the grill blue.",
                                              "  Eat the brush.", " throw the grill away."]
    assert hs[1].gold == 0 and hs[2].requests[0][0] == "Baking cookies: A woman is in a kitchen. She"
    pq = load_task("piqa", FILES["piqa"]).docs
    assert pq[1].requests == [("Question: dresser\nAnswer:", " replace drawer with bobby pin "),
                              ("Question: dresser\nAnswer:", " finish, woodgrain with  bobby pin ")]
    assert [d.gold for d in pq] == [0, 1, 0] and pq[1].choices[1] == "finish, woodgrain with  bobby pin "
    ae = load_task("arc_easy", FILES["arc_easy"]).docs
    assert ae[1].requests[0] == ("Question: Which is a mixture?\nAnswer:", " salt water")
    assert [len(d.requests) for d in ae] == [4, 3, 5] and [d.gold for d in ae] == [0, 0, 0]
    assert load_task("arc_challenge", FILES["arc_challenge"]).docs[0].gold == 2  # number labels
    wg = load_task("winogrande", FILES["winogrande"]).docs
    assert wg[0].requests == [("Sarah was a much better surgeon than Maria so Sarah", " always got the easier cases."),
                              ("Sarah was a much better surgeon than Maria so Maria", " always got the easier cases.")]
    assert [d.gold for d in wg] == [1, 0, 0]
    lb = load_task("lambada_openai", FILES["lambada_openai"]).docs
    assert lb[2].requests == [("The cat sat on the  mat and looked at the", " dog")]


def _lm_eval_requests(tmp_path: Path, name: str, file: Path) -> list[tuple[str, str]]:
    spec = importlib.util.spec_from_file_location("eval_parity", Path(__file__).parents[1] / "benchmarks/eval_parity.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    from lm_eval.tasks import TaskManager
    d = tmp_path / name
    d.mkdir()
    bench.write_tasks(d, {name: file})
    task = TaskManager(include_path=str(d), include_defaults=False).load([f"parity_{name}"])["tasks"]
    task = next(iter(task.values()))
    if task.get_config("num_fewshot") is None:
        task.set_config(key="num_fewshot", value=0)
    task.build_all_requests(rank=0, world_size=1)
    insts = sorted(task.instances, key=lambda i: (i.doc_id, i.idx))
    return [tuple(i.arguments[:2]) for i in insts]


@pytest.mark.parametrize("name", list(FILES))
def test_prompts_equal_lm_eval(name, tmp_path):
    pytest.importorskip("lm_eval")
    ours = [r for d in load_task(name, FILES[name]).docs for r in d.requests]
    assert ours == _lm_eval_requests(tmp_path, name, FILES[name])


def test_encode_pairs_equal_lm_eval(loaded):
    pytest.importorskip("lm_eval")
    from lm_eval.api.model import TemplateLM
    _, tok = loaded
    seen = []

    class Probe(TemplateLM):  # lm-eval's own _encode_pair / empty-context rule over luca's tokenizer
        backend = "causal"
        eot_token_id = prefix_token_id = tok.im_end_id

        def tok_encode(self, s, add_special_tokens=None, **kw):
            return tok.encode(s)

        def _loglikelihood_tokens(self, reqs, **kw):
            seen.extend((c, x) for _, c, x in reqs)
            return [(0.0, False)] * len(reqs)

        def loglikelihood_rolling(self, *a, **k):
            raise NotImplementedError

        def generate_until(self, *a, **k):
            raise NotImplementedError

    class Req:
        def __init__(self, a):
            self.args = a

    pairs = [("Question: a\nAnswer:", " b c"), ("hello  ", "world"), ("x \n", " y"), ("", "alone"),
             ("", "<|im_end|>tail"), ("def f(x):", "\n    return x")]
    Probe().loglikelihood([Req(p) for p in pairs], disable_tqdm=True)
    assert H.encode_pairs(tok, pairs) == seen


# -- scoring ------------------------------------------------------------------------------------
def test_score_pairs_equals_direct_computation(loaded):
    model, tok = loaded
    L = 16  # short, so that some requests are cut from the left as HFLM cuts them
    ctx_a = tok.encode("def fib(n):\n    a, b = 0, 1\n    for _ in range(n):")
    pairs = [(ctx_a, tok.encode(" return a")), (ctx_a, tok.encode(" pass")), (ctx_a, tok.encode(" pass")),
             (ctx_a[:3], tok.encode(" x")), (ctx_a[:3], tok.encode(" y")), (ctx_a, tok.encode(" " + "z" * 10))]
    for groups, bt in ((None, 40), ([0, 0, 0, 0, 0, 0], 1000), ([0, 1, 0, 1, 2, 2], 17)):
        _check_direct(model, pairs, H.score_pairs(model, pairs, groups, max_len=L, batch_tokens=bt), L)


def test_long_continuation_in_pieces(loaded):
    model, tok = loaded
    L, ctx = 16, tok.encode("x = 1\n")
    cont = tok.encode(" y = [a + b for a, b in zip(first, second) if a > b]")
    assert len(cont) > L
    [got] = H.score_pairs(model, [(ctx, cont)], max_len=L)
    want, greedy = 0.0, True
    for s in range(0, len(cont), L // 2):  # pieces of half the context, each after the tokens before it
        ll, g = _direct_ll(model, ctx + cont[:s], cont[s:s + L // 2], L)
        want, greedy = want + ll, greedy and g
    assert got.ll == pytest.approx(want, abs=1e-4) and got.greedy == greedy


def test_score_pairs_other_family(loaded):
    """luca.baseline's GPT-2 has no tree attention: each request is its own packed document."""
    from luca.baseline import GPT2
    from luca.model import ModelConfig
    _, tok = loaded
    torch.manual_seed(0)
    gpt2 = GPT2(ModelConfig(family="gpt2", vocab_size=320, n_layers=2, d_model=32, n_heads=4, n_kv_heads=4,
                            max_seq_len=16, tie_embeddings=True)).eval()
    ctx = tok.encode("def fib(n):\n    a, b = 0, 1")
    pairs = [(ctx, tok.encode(" return a")), (ctx, tok.encode(" pass")), (ctx, tok.encode(" pass")),
             (ctx[:2], tok.encode(" x"))]
    _check_direct(gpt2, pairs, H.score_pairs(gpt2, pairs, [0, 0, 0, 1], batch_tokens=40), 16)


def _check_direct(model, pairs, got, L):
    for (c, x), s in zip(pairs, got):
        ll, greedy = _direct_ll(model, c, x, L)
        assert s.ll == pytest.approx(ll, abs=1e-4) and s.greedy == greedy
    assert got[1].ll == got[2].ll  # identical requests are scored once


def test_prefix_tree_layout():
    reqs = [([1, 2, 3], [9], 0), ([1, 2, 4, 5], [8, 7], 1), ([1, 6], [5], 2), ([1, 2], [3], 3)]
    [t] = H._build_trees(reqs, cap=100)
    assert t.tokens == [1, 2, 3, 4, 5, 6] and t.depth == [0, 1, 2, 2, 3, 1]
    assert t.end == [6, 5, 3, 5, 5, 6]  # node i's subtree is i .. end[i]-1
    assert sorted(t.targets) == [(1, 3, 3), (2, 9, 0), (3, 8, 1), (4, 7, 1), (5, 5, 2)]
    small = H._build_trees(reqs, cap=4)
    assert [x.tokens for x in small] == [[1, 2, 3], [1, 2, 4, 5], [1, 6]]
    assert [x.end for x in small] == [[3, 3, 3], [4, 4, 4, 4], [2, 2]]


def test_metrics_by_hand():
    # acc: argmax of the summed log-likelihood; acc_norm: divided by the choice's character length
    r = [H.Scored(-10.0, False), H.Scored(-12.0, False)]
    assert H.doc_metrics("multiple_choice", ["ab", "a" * 20], 1, r) == {"acc": 0.0, "acc_norm": 1.0}
    assert H.doc_metrics("multiple_choice", ["ab", "cd"], 0, [H.Scored(-1.0, 0), H.Scored(-1.0, 0)])["acc"] == 1.0
    agg = H.aggregate(["acc"], [{"acc": x} for x in (1.0, 0.0, 1.0, 1.0)])
    assert agg["acc"] == {"value": 0.75, "stderr": pytest.approx(0.25)}  # sd 0.5 (n-1), / sqrt(4)
    lls = [-1.0, -2.0, -4.0]
    assert H.perplexity(lls) == pytest.approx(math.exp(7 / 3))


def test_perplexity_stderr_is_lm_eval_bootstrap():
    lls = [-random.Random(3).random() * 9 for _ in range(37)]

    def reference(xs, iters):  # lm-eval's _bootstrap_internal: chunk i drawn by random.Random(i).choices
        res = []
        for i in range(iters // 1000):
            rnd = random.Random()
            rnd.seed(i)
            res += [math.exp(-sum(s) / len(s)) for s in (rnd.choices(xs, k=len(xs)) for _ in range(1000))]
        return H.sample_stddev(res)

    assert H.perplexity_stderr(lls, 3000) == pytest.approx(reference(lls, 3000), rel=1e-12)
    try:
        from lm_eval.api.metrics import bootstrap_stderr, perplexity
    except ImportError:
        return
    import os
    os.environ["DISABLE_MULTIPROC"] = "1"
    try:
        assert H.perplexity_stderr(lls, 2000) == pytest.approx(bootstrap_stderr(perplexity, lls, 2000), rel=1e-12)
    finally:
        del os.environ["DISABLE_MULTIPROC"]


def test_acc_hand_computed_with_tiny_model(loaded):
    model, tok = loaded
    rec = evaluate_task(model, tok, "piqa", FILES["piqa"], details=True)
    data = load_task("piqa", FILES["piqa"])
    acc, acc_norm = [], []
    for d in data.docs:
        lls = [_direct_ll(model, *H.encode_pairs(tok, [r])[0], model.cfg.max_seq_len)[0] for r in d.requests]
        pred = max(range(2), key=lambda i: (lls[i], -i))
        pred_norm = max(range(2), key=lambda i: (lls[i] / len(d.choices[i]), -i))
        acc.append(float(pred == d.gold))
        acc_norm.append(float(pred_norm == d.gold))
    assert rec["metrics"]["acc"]["value"] == pytest.approx(sum(acc) / 3)
    assert rec["metrics"]["acc_norm"]["value"] == pytest.approx(sum(acc_norm) / 3)
    assert rec["n"] == 3 and rec["requests"] == 6 and len(rec["files"]) == 2  # items + labels, with checksums


def test_lambada_greedy_and_perplexity(loaded):
    model, tok = loaded
    rec = evaluate_task(model, tok, "lambada_openai", FILES["lambada_openai"], details=True, bootstrap_iters=1000)
    lls = []
    for c, x, ll, greedy in rec["details"]:
        d_ll, d_greedy = _direct_ll(model, *H.encode_pairs(tok, [(c, x)])[0], model.cfg.max_seq_len)
        assert ll == pytest.approx(d_ll, abs=1e-4) and greedy == d_greedy
        lls.append(ll)
    assert rec["metrics"]["perplexity"]["value"] == pytest.approx(math.exp(-sum(lls) / 3))
    assert rec["metrics"]["perplexity"]["stderr"] > 0


# -- bits per byte ------------------------------------------------------------------------------
def _direct_bits(model, tok, text, first=None):
    ids = [tok.eot_id if first is None else first] + tok.encode(text)
    with torch.no_grad():
        lp = torch.log_softmax(model(torch.tensor([ids[:-1]])).float(), -1)[0]
    return -float(lp.gather(1, torch.tensor(ids[1:])[:, None]).sum()) / math.log(2)


def test_bpb_on_known_text(loaded):
    model, tok = loaded
    text = "The quick brown fox jumps over the lazy dog. Ünïcode: café, 日本.\n"
    r = bits_per_byte(model, tok, text)
    assert r["bytes"] == len(text.encode("utf-8")) and r["windows"] == 1
    assert r["bpb"] == pytest.approx(_direct_bits(model, tok, text) / r["bytes"], rel=1e-5)
    assert sum(c["bytes"] for c in r["curve"]) == r["bytes"] and sum(c["tokens"] for c in r["curve"]) == r["tokens"]
    # a text that fits is scored in one window whatever the stride: the same as full context
    assert bits_per_byte(model, tok, text, stride=3)["bpb"] == pytest.approx(r["bpb"], rel=1e-6)


def test_bpb_sliding_window(loaded):
    model, tok = loaded
    text = "def add(a, b):\n    return a + b\n" * 6
    n = len(tok.encode(text))
    assert n > 32
    # disjoint windows (stride = window) equal scoring each chunk from scratch after <eot>
    r = bits_per_byte(model, tok, text, max_len=16, stride=16)
    seq = [tok.eot_id] + tok.encode(text)
    bits = 0.0
    for b, e, first in windows(n, 16, 16):
        assert first == b + 1
        with torch.no_grad():
            lp = torch.log_softmax(model(torch.tensor([seq[b:e]])).float(), -1)[0]
        bits -= float(lp.gather(1, torch.tensor(seq[b + 1:e + 1])[:, None]).sum()) / math.log(2)
    assert r["bpb"] == pytest.approx(bits / len(text.encode()), rel=1e-5)
    # overlapping windows score every token exactly once, with at least window - stride of context
    w = windows(n, 16, 4)
    scored = [j for b, e, first in w for j in range(first, e + 1)]
    assert scored == list(range(1, n + 1)) and all(first - 1 - b >= 12 for b, e, first in w[1:])
    r2 = bits_per_byte(model, tok, text, max_len=16, stride=4)
    assert r2["curve"][0]["positions"] == [0, 0] and r2["curve"][-1]["positions"][1] == 15
    assert sum(c["tokens"] for c in r2["curve"]) == sum(e - b for b, e, _ in w)  # every prediction of every window


# -- records and the command line ---------------------------------------------------------------
def test_eval_cli_writes_results_and_report(run_copy, tmp_path, capsys):
    text = tmp_path / "t.txt"
    text.write_text("A small text to measure. " * 20, encoding="utf-8")
    assert main(["eval", str(run_copy), "--data-dir", str(FIX), "--tasks", "piqa,winogrande,lambada_openai",
                 "--limit", "2", "--bpb", str(text), "--bootstrap-iters", "1000"]) == 0
    out = capsys.readouterr().out
    assert "piqa" in out and "acc_norm" in out and "bpb" in out
    r = json.loads((run_copy / "results.json").read_text())
    assert r["schema"] == "luca.results" and r["schema_version"] == 1
    assert r["model"]["parameters"] > 0 and r["model"]["tokens_seen"] > 0 and r["model"]["tokenizer"]["kind"] == "bpe"
    assert set(r["tasks"]) == {"piqa", "winogrande", "lambada_openai"}
    piqa = r["tasks"]["piqa"]
    assert piqa["n"] == 2 and set(piqa["metrics"]) == {"acc", "acc_norm"} and len(piqa["files"][0]["sha256"]) == 64
    assert "stderr" in piqa["metrics"]["acc"] and r["tasks"]["winogrande"]["metrics"].keys() == {"acc"}
    assert list(r["bpb"].values())[0]["curve"]
    report = (run_copy / "report.md").read_text()
    assert "## Results" in report and "## Training" in report and "| piqa | acc_norm |" in report
    # a second evaluation merges: piqa kept, arc_easy added
    res = evaluate(run_copy, "arc_easy", FIX, limit=1, progress=False)
    assert {"piqa", "arc_easy"} <= set(res["tasks"]) and res["bpb"]
    png = tmp_path / "cmp.png"
    assert main(["report", str(run_copy), str(run_copy), "--png", str(png)]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "arc_easy" in capsys.readouterr().out


def test_luca_evaluate_is_callable(run_copy):
    import luca
    r = luca.evaluate(run_copy, data_dir=FIX, limit=2, write=False, progress=False, bootstrap_iters=100)
    assert set(r["tasks"]) == set(TASKS) and not (run_copy / "results.json").exists()  # all six by default
    assert r["tasks"]["arc_challenge"]["n"] == 2 and r["tasks"]["hellaswag"]["requests"] == 8


def _err(argv, capsys) -> str:
    assert main(argv) == 2
    return capsys.readouterr().err


def test_bad_input_exit_2(run_copy, tmp_path, capsys):
    r = str(run_copy)
    assert "unknown task 'hellaswog'" in _err(["eval", r, "--tasks", "hellaswog", "--data-dir", str(FIX)], capsys)
    assert "no such data directory" in _err(["eval", r, "--data-dir", str(tmp_path / "nope")], capsys)
    assert "no file for task piqa" in _err(["eval", r, "--tasks", "piqa", "--data-dir", str(tmp_path)], capsys)
    bad = tmp_path / "hs.jsonl"
    bad.write_text(json.dumps({"activity_label": "a", "ctx": "b", "endings": ["x", "y"], "label": 0}) + "\n"
                   + json.dumps({"activity_label": "a", "ctx": "b", "label": 0}) + "\n")
    assert f"{bad}:2: missing field 'endings'" in _err(["eval", r, "--tasks", f"hellaswag={bad}"], capsys)
    bad.write_text(json.dumps({"activity_label": "a", "ctx": "b", "endings": ["x", "y"], "label": 0}) + "\n{oops\n")
    assert f"{bad}:2: not valid JSON" in _err(["eval", r, "--tasks", f"hellaswag={bad}"], capsys)
    # a file of another task's schema
    assert f"{FILES['piqa']}:1: missing field 'sentence'" in _err(
        ["eval", r, "--tasks", f"winogrande={FILES['piqa']}"], capsys)
    arc = tmp_path / "arc.jsonl"
    arc.write_text(json.dumps({"question": {"stem": "q", "choices": [{"text": "a", "label": "A"},
                                                                      {"text": "b", "label": "B"}]},
                               "answerKey": "E"}) + "\n")
    assert f"{arc}:1: answerKey 'E' is not among the labels A, B" in _err(["eval", r, "--tasks", f"arc_easy={arc}"], capsys)
    pq = tmp_path / "piqa"
    pq.mkdir()
    shutil.copy(FILES["piqa"], pq / "valid.jsonl")
    assert "no labels" in _err(["eval", r, "--tasks", f"piqa={pq / 'valid.jsonl'}"], capsys)
    (pq / "valid-labels.lst").write_text("0\n1\n")
    assert "valid-labels.lst: 2 labels for 3 items" in _err(["eval", r, "--tasks", f"piqa={pq / 'valid.jsonl'}"], capsys)
    (pq / "valid-labels.lst").write_text("0\nx\n1\n")
    assert "valid-labels.lst:2: label 'x' is not an integer" in _err(
        ["eval", r, "--tasks", f"piqa={pq / 'valid.jsonl'}"], capsys)
    latin = tmp_path / "latin.txt"
    latin.write_bytes("line one\ncaf\xe9\n".encode("latin-1"))
    assert f"{latin}:2: not UTF-8" in _err(["eval", r, "--bpb", str(latin)], capsys)
    assert "no such file" in _err(["eval", r, "--bpb", str(tmp_path / "missing.txt")], capsys)
    assert "not a run directory" in _err(["eval", str(tmp_path), "--bpb", str(latin)], capsys)
    assert "no results" in _err(["report", r], capsys)
    assert "nothing to evaluate" in _err(["eval", r], capsys)


def test_winogrande_labels_file(tmp_path):
    d = tmp_path / "wg"
    d.mkdir()
    rows = [json.loads(x) for x in FILES["winogrande"].read_text().splitlines()]
    (d / "dev.jsonl").write_text("".join(json.dumps({k: v for k, v in o.items() if k != "answer"}) + "\n" for o in rows))
    (d / "dev-labels.lst").write_text("2\n1\n1\n")
    assert [x.gold for x in load_task("winogrande", d / "dev.jsonl").docs] == [1, 0, 0]
    (d / "dev-labels.lst").unlink()
    with pytest.raises(LucaError, match="dev.jsonl:1: no 'answer' field"):
        load_task("winogrande", d / "dev.jsonl")
    assert set(TASKS) == set(FILES)


# -- lm-eval adapter ----------------------------------------------------------------------------
def test_lm_eval_adapter_on_local_task(tiny_run, loaded, tmp_path):
    pytest.importorskip("lm_eval")
    import lm_eval
    from lm_eval.api.registry import get_model
    from lm_eval.tasks import TaskManager

    import luca.evaluate.lm_eval_adapter as adapter
    assert get_model("luca") is adapter.LucaLM and get_model("hf").__name__ == "HFLM"  # built-ins still there
    spec = importlib.util.spec_from_file_location("eval_parity", Path(__file__).parents[1] / "benchmarks/eval_parity.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    bench.write_tasks(tmp_path, {"piqa": FILES["piqa"], "lambada_openai": FILES["lambada_openai"]})
    out = lm_eval.simple_evaluate(model="luca", model_args=f"path={tiny_run}", tasks=["parity_piqa", "parity_lambada_openai"],
                                  task_manager=TaskManager(include_path=str(tmp_path), include_defaults=False),
                                  bootstrap_iters=1000, log_samples=False)
    model, tok = loaded
    for name in ("piqa", "lambada_openai"):
        ours = evaluate_task(model, tok, name, FILES[name], bootstrap_iters=1000)["metrics"]
        theirs = out["results"][f"parity_{name}"]
        for m, v in ours.items():
            assert theirs[f"{m},none"] == pytest.approx(v["value"], rel=1e-9)
            assert theirs[f"{m}_stderr,none"] == pytest.approx(v["stderr"], rel=1e-9)
    lm = adapter.LucaLM(path=str(tiny_run))

    class Req:
        def __init__(self, *a):
            self.args = a

    [rolling] = lm.loglikelihood_rolling([Req("def f(x):\n    return x\n" * 3)], disable_tqdm=True)
    text = "def f(x):\n    return x\n" * 3
    # one window (the text fits), conditioned on lm-eval's prefix token, <|im_end|> for luca's tokenizer
    assert rolling == pytest.approx(-_direct_bits(model, tok, text, first=tok.im_end_id) * math.log(2), rel=1e-5)
    [gen] = lm.generate_until([Req("def ", {"until": ["\n"], "max_gen_toks": 8})], disable_tqdm=True)
    assert isinstance(gen, str) and "\n" not in gen



def test_luca_lm_eval_command(tiny_run, tmp_path, capsys):
    """The documented way to run lm-eval's own command line with --model luca."""
    pytest.importorskip("lm_eval")
    spec = importlib.util.spec_from_file_location("eval_parity", Path(__file__).parents[1] / "benchmarks/eval_parity.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    bench.write_tasks(tmp_path, {"arc_easy": FILES["arc_easy"]})
    assert main(["lm-eval", "--model", "luca", "--model_args", f"path={tiny_run}", "--tasks", "parity_arc_easy",
                 "--include_path", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "parity_arc_easy" in out and "acc_norm" in out
