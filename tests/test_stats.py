"""Standard errors and paired comparisons of gain kept (evaluation/stats.py), against hand-computed values;
the answer cache of the baselines; and how bench/peers.py pools them over corpora and parses variants."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import pytest

from kvcompile.data.qa import QA
from kvcompile.evaluation import answercache, report, stats
from kvcompile.evaluation.methods import Method
from kvcompile.evaluation.run import MethodResult, compare, fill_gain_kept
from kvcompile.quality import gain_kept

REPO = Path(__file__).resolve().parent.parent

# Three questions. y = none - full = [2, 2, 1] (mean 5/3); method a: x = none - a = [1, 0, 1] (mean 2/3),
# so R = 0.4 and the residuals x - R y = [0.2, -0.8, 0.6].
NONE, FULL, A, B = [3.0, 4.0, 5.0], [1.0, 2.0, 4.0], [2.0, 4.0, 4.0], [3.0, 3.0, 4.0]


def test_linearised_values_by_hand():
    z = stats.linearised_gain(NONE, FULL, A)
    # z_i = R + (x_i - R y_i) / mean(y) = 0.4 + [0.2, -0.8, 0.6] * 3/5
    assert z == pytest.approx([0.52, -0.08, 0.76])
    assert math.fsum(z) / 3 == pytest.approx(gain_kept(NONE, FULL, A)) == pytest.approx(0.4)


def test_gain_estimate_is_the_delta_method_se():
    est = stats.gain_estimate(NONE, FULL, A)
    # sd(x - R y) = sqrt((0.04 + 0.64 + 0.36) / 2) = sqrt(0.52); SE = sqrt(0.52 / 3) / (5/3)
    assert est.mean == pytest.approx(0.4)
    assert est.se == pytest.approx(math.sqrt(0.52 / 3) / (5 / 3)) == pytest.approx(0.249800, abs=1e-6)
    assert (est.questions, est.corpora) == (3, 1)


def test_full_and_none_have_no_error():
    assert stats.gain_estimate(NONE, FULL, FULL) == stats.Estimate(1.0, 0.0, 3)
    assert stats.gain_estimate(NONE, FULL, NONE) == stats.Estimate(0.0, 0.0, 3)


def test_per_question_gain_has_the_same_mean():
    g = stats.per_question_gain(NONE, FULL, A)
    assert g == pytest.approx([0.6, 0.0, 0.6])  # x_i / mean(y)
    assert math.fsum(g) / 3 == pytest.approx(0.4)


def test_paired_difference_by_hand():
    # b: x = [0, 1, 1], also R = 0.4. z_a - z_b = (x_a - x_b) / mean(y) = [0.6, -0.6, 0].
    est = stats.paired(NONE, FULL, A, B)
    assert est.mean == pytest.approx(0.0)
    assert est.se == pytest.approx(math.sqrt(0.36 / 3))
    assert est.z == pytest.approx(0.0)
    est = stats.paired(NONE, FULL, FULL, A)  # full minus a: 1 - 0.4, with a's own SE
    assert est.mean == pytest.approx(0.6)
    assert est.se == pytest.approx(stats.gain_estimate(NONE, FULL, A).se)


def test_pooled_by_hand():
    est = stats.pooled([[1.0, 2.0, 3.0], [5.0], []])
    assert (est.mean, est.questions, est.corpora) == (pytest.approx(2.75), 4, 2)
    assert est.se == pytest.approx(math.sqrt(8.75 / 3 / 4))  # squared deviations 3.0625 + 0.5625 + 0.0625 + 5.0625


def test_pooling_normalises_each_corpus_by_its_own_full_gain():
    # Corpus 1: full gains 2 per question, the method 1. Corpus 2: full gains 0.1, the method 0.05.
    # Pooled raw NLLs would weigh corpus 1 twenty times more; per corpus both keep exactly half.
    z1 = stats.linearised_gain([2.0, 2.0], [0.0, 0.0], [1.0, 1.0])
    z2 = stats.linearised_gain([1.0, 1.0], [0.9, 0.9], [0.95, 0.95])
    est = stats.pooled([z1, z2])
    assert est.mean == pytest.approx(0.5)
    assert est.se == pytest.approx(0.0)


def test_undefined_cases_are_nan():
    assert all(math.isnan(v) for v in stats.linearised_gain([1.0, 1.0], [1.0, 2.0], [0.5, 0.5]))  # full hurts
    assert math.isnan(stats.mean_se([0.3])[1])  # one question: a mean, no error
    assert all(math.isnan(v) for v in stats.mean_se([]))
    assert stats.Estimate(float("nan"), float("nan"), 0).format() == "–"
    assert stats.Estimate(0.1234, float("nan"), 1).format() == "0.12"
    assert stats.Estimate(-0.1, 0.05, 3).format(signed=True) == "-0.10 ± 0.05"
    assert stats.Estimate(0.5, float("nan"), 1).to_json() == {"mean": 0.5, "se": None, "questions": 1, "corpora": 1}
    with pytest.raises(ValueError):
        stats.linearised_gain([1.0], [0.0, 0.0], [0.5])


# -- results of `kvcompile eval` ---------------------------------------------------------------


def result(name, kind, ratio, nlls):
    rows = [{"id": f"q{i}", "nll": v, "contains": 0.0, "exact_match": 0.0, "f1": 0.0, "ttft": 0.1,
             "tokens_per_s": 5.0} for i, v in enumerate(nlls)]
    return MethodResult(name, kind, ratio, 0.0, 0.0, 0.0, None, rows)


def eval_results():
    return [result("full", "full", 1.0, FULL), result("none", "none", 0.0, NONE),
            result("kvcompile@0.25", "pack", 0.249, A), result("rag@0.25", "rag", 0.2493, B),
            result("kvcompile@0.5", "pack", 0.5, FULL), result("rag@0.5", "rag", 0.4987, NONE)]


def test_eval_results_carry_the_se_and_compare_with_the_pack_at_the_same_ratio():
    results = eval_results()
    fill_gain_kept(results)
    by = {r.name: r for r in results}
    assert by["kvcompile@0.25"].gain_kept == pytest.approx(0.4)
    assert by["kvcompile@0.25"].gain_kept_se == pytest.approx(0.249800, abs=1e-6)
    assert by["kvcompile@0.25"].summary()["gain_kept_se"] == by["kvcompile@0.25"].gain_kept_se
    vs = report.comparisons(results)
    assert set(vs) == {"rag@0.25", "rag@0.5"}  # packs and baselines without a budget are not compared
    assert vs["rag@0.25"][0] == "kvcompile@0.25"
    assert vs["rag@0.25"][1].mean == pytest.approx(0.0) and vs["rag@0.25"][1].se == pytest.approx(math.sqrt(0.12))
    assert vs["rag@0.5"][1].mean == pytest.approx(-1.0)  # none's gain kept minus full's
    assert compare(results, by["full"], by["kvcompile@0.25"]).mean == pytest.approx(0.6)
    vs = report.comparisons(results, reference="kvcompile@0.25")
    assert set(vs) == {r.name for r in results} - {"kvcompile@0.25"}
    doc = report.to_json(results, {"title": "t"})
    assert {"method": "rag@0.25", "reference": "kvcompile@0.25", "diff": pytest.approx(0.0),
            "se": pytest.approx(math.sqrt(0.12)), "questions": 3} in doc["comparisons"]


def test_a_quantised_pack_is_compared_with_the_fp16_pack_of_its_ratio():
    results = eval_results() + [result("kvcompile[int4]@0.25", "pack", 0.249, B)]
    fill_gain_kept(results)
    vs = report.comparisons(results)
    assert vs["kvcompile[int4]@0.25"][0] == "kvcompile@0.25"
    assert vs["rag@0.25"][0] == "kvcompile@0.25"  # never the quantised one


def test_an_unknown_eval_reference_compares_nothing_and_says_so():
    from rich.console import Console

    results = eval_results()
    fill_gain_kept(results)
    assert report.comparisons(results, reference="kvcompile@0.3") == {}
    console = Console(width=200, record=True)
    console.print(report.table(results, "t", reference="kvcompile@0.3"))
    assert "'kvcompile@0.3' is not one of the methods" in console.export_text()


def test_paired_statistics_refuse_different_questions():
    results = eval_results()
    results[2].rows[0]["id"] = "other"
    with pytest.raises(ValueError, match="same questions"):
        compare(results, results[2], results[3])


def test_eval_table_shows_se_and_difference():
    from rich.console import Console

    results = eval_results()
    fill_gain_kept(results)
    console = Console(width=200, record=True)
    console.print(report.table(results, "t"))
    text = console.export_text()
    assert "0.40 ± 0.25" in text and "+0.00 ± 0.35" in text


# -- the answer cache --------------------------------------------------------------------------


class Counting(Method):
    calls = 0

    def __init__(self, shift: float = 0.0):
        Counting.calls += 1
        self.name, self.kind, self.ratio = "full", "full", 1.0
        self.kv_tokens, self.kv_bytes, self.setup_seconds = 10.0, 640.0, 0.5
        self.shift = shift

    def answer_nll(self, qa):
        Counting.calls += 1
        return len(qa.question) + self.shift

    def generate(self, qa, max_new_tokens):
        Counting.calls += 1
        return qa.question.upper()[:max_new_tokens], {"ttft": 0.1, "tokens_per_s": 5.0}


class FakeLM:
    name, fingerprint, dtype = "fake", "f" * 64, "float32"

    class device:  # noqa: N801
        type = "cpu"


def test_cached_baseline_is_not_even_made_the_second_time(tmp_path):
    from kvcompile.framing import Framing

    framing = Framing("chat", (1, 2), "Q: ", "\nA:")
    qas = [QA("a", "who?", ("x",)), QA("b", "where?", ("y",))]
    make = answercache.cached(Counting, tmp_path, FakeLM, "full", framing, context_ids=[1, 2, 3])
    Counting.calls = 0
    m = make()
    first = [(m.answer_nll(q), m.generate(q, 3)) for q in qas]
    assert Counting.calls == 1 + 4  # made once, two NLLs, two answers
    Counting.calls = 0
    tally = {}
    m = answercache.cached(Counting, tmp_path, FakeLM, "full", framing, context_ids=[1, 2, 3], tally=tally)()
    assert [(m.answer_nll(q), m.generate(q, 3)) for q in qas] == first
    assert Counting.calls == 0 and m.hits == 4 and tally == {"hits": 4}
    assert (m.name, m.kind, m.kv_tokens, m.kv_bytes) == ("full", "full", 10.0, 640.0)
    m.generate(qas[0], 5)  # another answer length: computed (the method made now), then cached
    assert Counting.calls == 2
    # Another context is another file: nothing shared.
    other = answercache.cached(Counting, tmp_path, FakeLM, "full", framing, context_ids=[1, 2, 4])()
    other.answer_nll(qas[0])
    assert other.misses == 1
    assert answercache.cached(Counting, None, FakeLM, "full", framing, context_ids=[1]) is Counting  # no cache


def test_cache_with_a_context_per_question_keys_on_it(tmp_path):
    from kvcompile.framing import Framing

    framing = Framing("chat", (1,), "Q: ", "\nA:")
    contexts = {"who?": [5, 6]}
    make = answercache.cached(Counting, tmp_path, FakeLM, "rag", framing, context_ids=[9],
                              context=lambda m, qa: contexts[qa.question])
    qa = QA("a", "who?", ("x",))
    make().answer_nll(qa)
    m = make()
    m.answer_nll(qa)
    assert m.hits == 1
    contexts["who?"] = [5, 7]  # retrieval changed: a miss
    m.answer_nll(qa)
    assert m.misses == 1


# -- bench/peers.py ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def peers():
    spec = importlib.util.spec_from_file_location("bench_peers", REPO / "bench" / "peers.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_parse_variant(peers):
    name, o = peers.parse_variant("pool5:scorer_params.pool=5,head_floor=0,context=independent")
    assert name == "pool5"
    assert o == {"scorer_params": {"pool": 5}, "head_floor": 0.0, "context": "independent"}
    assert isinstance(o["head_floor"], float)
    assert peers.parse_variant("plain:") == ("plain", {})
    for bad in ("nocolon", "x:ratio=0.5", "x:nosuchfield=1", "x:head_floor=2", "x:scorer_params.nosuch=1",
                "x y:head_floor=0", "x:head_floor"):
        with pytest.raises(SystemExit):
            peers.parse_variant(bad)


def test_aggregate_pools_corpora_and_compares(peers):
    def corpus(press_nll):
        rs = [result("full", "full", 1.0, FULL), result("none", "none", 0.0, NONE),
              result("kvcompile@0.25", "pack", 0.249, A), result("kvcompile[v]@0.25", "pack", 0.25, B),
              result("snapkv@0.25", "peer", 0.25, press_nll), result("knorm@0.25", "peer", 0.25, NONE)]
        fill_gain_kept(rs)
        return {"results": rs, "questions": 3}

    runs = [corpus(B), corpus(FULL)]
    # a press run on one corpus only, keeping all of it there, is not the best press of two corpora
    runs[1]["results"].append(result("lucky@0.25", "peer", 0.25, FULL))
    fill_gain_kept(runs[1]["results"])
    agg = peers.aggregate(runs)
    gain = {(g["family"], g["ratio"]): g for g in agg["gain_kept"]}
    assert gain[("kvcompile", 0.25)]["mean"] == pytest.approx(0.4)
    assert gain[("kvcompile", 0.25)]["questions"] == 6 and gain[("kvcompile", 0.25)]["corpora"] == 2
    assert gain[("snapkv", 0.25)]["mean"] == pytest.approx(0.7)  # 0.4 on the first corpus, 1 on the second
    assert ("full", 1.0) not in gain and ("none", 0.0) not in gain
    assert agg["best_press"] == {"0.25": "snapkv"}
    vs = {(c["method"], c["versus"]): c for c in agg["comparisons"]}
    assert vs[("kvcompile", "best press")]["reference"] == "snapkv"
    # kvcompile - snapkv: [0.6, -0.6, 0] on corpus 1 (as above), a's z - 1 = [-0.48, -1.08, -0.24] on corpus 2.
    diffs = [0.6, -0.6, 0.0, -0.48, -1.08, -0.24]
    m, se = stats.mean_se(diffs)
    assert vs[("kvcompile", "snapkv")]["mean"] == pytest.approx(m) == pytest.approx(-0.3)
    assert vs[("kvcompile", "snapkv")]["se"] == pytest.approx(se)
    assert vs[("kvcompile", "knorm")]["mean"] == pytest.approx(0.4)
    assert vs[("kvcompile[v]", "kvcompile")]["mean"] == pytest.approx(0.0)
    assert ("kvcompile", "kvcompile") not in vs
    for run in runs:
        run.update(spec="s", name="n", documents=1, tokens=10, build_s={}, capture_prefill_s=None)
    md = peers.markdown(runs, {"model": "m", "device": "CPU", "torch": "t", "threads": 1, "kvpress": "k",
                               "date": "d", "max_new_tokens": 8, "variants": {"v": {"head_floor": 0.0}}}, agg)
    assert "| **kvcompile** | 0.40 ± " in md and "| kvcompile | best press | -0.30 ± " in md


def test_merge_combines_runs_of_one_corpus_later_methods_first(peers):
    """A new default's rows beside an earlier run's presses: one run per corpus, the later run's
    method of a name replaces the earlier; runs whose baselines disagree are refused."""
    def run(spec, *methods, build=None):
        return {"spec": spec, "results": [result("full", "full", 1.0, FULL), result("none", "none", 0.0, NONE),
                                          *methods], "build_s": build or {}, "capture_prefill_s": None}

    early = run("s", result("kvcompile@0.25", "pack", 0.25, A), result("snapkv@0.25", "peer", 0.25, B),
                build={"kvcompile@0.25": 9.0})
    other = run("t", result("kvcompile@0.25", "pack", 0.25, A))
    late = run("s", result("kvcompile@0.25", "pack", 0.25, FULL), build={"kvcompile@0.25": 5.0})
    merged = peers.merge_runs([early, other, late])
    assert [m["spec"] for m in merged] == ["s", "t"]
    got = {r.name: r for r in merged[0]["results"]}
    assert sorted(got) == ["full", "kvcompile@0.25", "none", "snapkv@0.25"]
    assert [x["nll"] for x in got["kvcompile@0.25"].rows] == FULL and got["snapkv@0.25"].rows[0]["nll"] == B[0]
    assert merged[0]["build_s"] == {"kvcompile@0.25": 5.0}
    off = run("s")
    off["results"][0] = result("full", "full", 1.0, [x + 0.1 for x in FULL])
    with pytest.raises(SystemExit, match="full answers differ"):
        peers.merge_runs([early, off])


def test_unpinned_reads_the_constraints_file(peers, tmp_path):
    import importlib.metadata as md

    pins = tmp_path / "constraints.txt"
    have = md.version("torch").split("+")[0]
    pins.write_text(f"# comment\ntorch=={have}\ntransformers==0.0.1  # old\n", encoding="utf-8")
    assert peers.unpinned(pins) == {"transformers": (md.version("transformers"), "0.0.1")}
    assert "torch" not in peers.unpinned(pins, names=("torch",))


def test_press_kv_compacted_as_packs_load(peers, tiny_lm):
    import torch

    from kvcompile.ragged import RaggedKV
    from kvcompile.rope import rotaries

    rotary = rotaries(tiny_lm.model)[0]
    heads, n, dim = tiny_lm.capability.num_kv_heads, 5, tiny_lm.capability.head_dim
    g = torch.Generator().manual_seed(0)
    stored = torch.randn(heads, n, dim, generator=g)
    at = torch.stack([torch.randperm(40, generator=g)[:n].sort().values + 3 for _ in range(heads)])  # [heads, n]
    post = rotary.apply(stored.flatten(0, 1), at.flatten()).view(heads, n, dim)
    press_kv = RaggedKV.from_dense(post, torch.randn(heads, n, dim, generator=g), at)
    [kv], start = peers.compacted(tiny_lm, [press_kv])
    ranks = torch.arange(n).repeat(heads)
    assert start == n and torch.equal(kv.positions.cpu(), ranks)
    torch.testing.assert_close(kv.keys.cpu(), rotary.apply(stored.flatten(0, 1), ranks), atol=1e-5, rtol=1e-5)
    assert torch.equal(kv.values.cpu(), press_kv.values)


def test_nll_only_evaluation_generates_nothing():
    from kvcompile.evaluation.run import run_method

    Counting.calls = 0
    qas = [QA("a", "who?", ("x",)), QA("b", "where?", ("y",))]
    result = run_method(Counting, qas, "cpu", max_new_tokens=0)
    assert Counting.calls == 1 + 2  # made once, two NLLs, no answers
    assert [r["nll"] for r in result.rows] == [4.0, 6.0]
    assert all(r["prediction"] is None and r["f1"] is None and r["ttft"] is None for r in result.rows)
    s = result.summary()
    assert s["nll"] == 5.0 and math.isnan(s["contains"]) and math.isnan(s["ttft_s"])
