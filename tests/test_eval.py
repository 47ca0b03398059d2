"""``kvcompile eval``: metrics on known inputs, the rag budget, the methods, and the command."""

from __future__ import annotations

import json
import random

import pytest
import torch
from typer.testing import CliRunner

from kvcompile.cli import app
from kvcompile.data.qa import QA
from kvcompile.evaluation.methods import RagMethod, pack_method, prefill_method
from kvcompile.evaluation.metrics import contains, exact_match, f1, normalize_answer
from kvcompile.evaluation.rag import Bm25Retriever, chunk_documents
from kvcompile.memory import PeakMemory
from kvcompile.pack import load

pytestmark = pytest.mark.usefixtures("torch_single_thread")
runner = CliRunner()


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


# -- metrics -----------------------------------------------------------------------------


@pytest.mark.parametrize("text, expected", [
    ("The  Eiffel Tower!", "eiffel tower"),
    ("an apple, a pear & the fig", "apple pear fig"),
    ("Theory of the A-team", "theory of ateam"),  # "the" inside a word stays; punctuation goes
    ("", ""),
])
def test_normalize_answer(text, expected):
    assert normalize_answer(text) == expected


def test_exact_match_takes_the_best_gold_answer():
    assert exact_match("the Normans.", ["Norsemen", "Normans"]) == 1.0
    assert exact_match("Normans of France", ["Normans"]) == 0.0


def test_f1_known_values():
    # prediction "eiffel tower in paris" vs gold "eiffel tower": P = 2/4, R = 2/2 -> F1 = 2/3
    assert f1("The Eiffel Tower in Paris", ["Eiffel Tower"]) == pytest.approx(2 / 3)
    assert f1("in 1066", ["1066", "the year 1066"]) == pytest.approx(max(2 * 0.5 * 1 / 1.5, 2 * 1 * 0.5 / 1.5))
    assert f1("nothing alike", ["Rollo"]) == 0.0
    assert f1("", [""]) == 1.0  # both empty: a match, as in SQuAD v2


def test_contains_needs_whole_words():
    assert contains("It was founded in Paris, France.", ["paris"]) == 1.0
    assert contains("Parisian cafes", ["Paris"]) == 0.0
    assert contains("anything", ["the"]) == 0.0  # an answer that normalises to nothing never matches


# -- rag ---------------------------------------------------------------------------------


def test_chunks_cover_every_token_once():
    docs = [list(range(10)), list(range(100, 103)), []]
    chunks = chunk_documents(docs, 4)
    assert [c.ids for c in chunks] == [(0, 1, 2, 3), (4, 5, 6, 7), (8, 9), (100, 101, 102)]
    assert [(c.doc, c.start) for c in chunks] == [(0, 0), (0, 4), (0, 8), (1, 0)]


def test_retrieval_never_exceeds_its_budget():
    rng = random.Random(0)
    words = ["alpha", "beta", "gamma", "delta", "norman", "rollo", "paris", "tower", "river", "king"]
    docs = [[rng.randrange(1000) for _ in range(rng.randrange(1, 300))] for _ in range(12)]
    chunks = chunk_documents(docs, 32)
    texts = [" ".join(rng.choice(words) for _ in range(len(c.ids))) for c in chunks]
    retriever = Bm25Retriever(chunks, texts)
    for budget in [0, 1, 31, 32, 33, 100, 257, 1000, 10_000]:
        for question in ["who was rollo", "the tower by the river", "zzz"]:
            got = retriever.retrieve(question, budget)
            assert sum(len(c.ids) for c in got) <= budget
            # Greedy fill: nothing left out would still fit.
            left = [c for c in chunks if c not in got]
            assert all(sum(len(c.ids) for c in got) + len(c.ids) > budget for c in left)
            assert got == sorted(got, key=lambda c: (c.doc, c.start))  # corpus order


def test_retrieval_ranks_the_matching_chunk_first():
    chunks = chunk_documents([[1] * 4, [2] * 4, [3] * 4], 4)
    retriever = Bm25Retriever(chunks, ["cats purr", "dogs bark loudly", "fish swim in the sea"])
    assert retriever.retrieve("why do dogs bark", 4) == [chunks[1]]


def test_rag_context_stays_within_the_pack_budget(tiny_lm, tiny_corpus):
    from kvcompile.builder import tokenize
    from kvcompile.corpus import read_corpus
    from kvcompile.recipe import load_recipe

    docs, _ = read_corpus([tiny_corpus])
    tk = tokenize(docs, load_recipe("qa"), tiny_lm)
    for budget in (len(tk.prefix_ids), len(tk.prefix_ids) + 20, 150, 290):
        rag = RagMethod(tiny_lm, tk.framing, tk.doc_ids, budget, chunk_tokens=16)
        for q in ("What does the lighthouse keeper do?", "Where is the bakery?"):
            ctx = rag.context(QA("q", q, ("x",)))
            assert ctx[: len(tk.prefix_ids)] == tk.prefix_ids
            assert len(ctx) <= budget


# -- methods -----------------------------------------------------------------------------


def test_full_cached_method_matches_a_pack_at_ratio_one(tiny_lm, tiny_corpus, tmp_path):
    """The 'full' baseline and a ratio-1.0 pack give the model the same context."""
    from kvcompile.builder import BuildOptions, tokenize
    from kvcompile.corpus import read_corpus
    from kvcompile.pipeline import build
    from kvcompile.recipe import load_recipe

    path = tmp_path / "full.kvpack"
    options = BuildOptions(ratio=1.0, chunk_size=64, codec="fp32", context="chained")
    build([tiny_corpus], path, tiny_lm, load_recipe("qa"), options)
    docs, _ = read_corpus([tiny_corpus])
    tk = tokenize(docs, load_recipe("qa"), tiny_lm)
    full = prefill_method(tiny_lm, tk.framing, tk.stream(), "full", "full", 1.0)
    pack = pack_method(load(path), tiny_lm)
    qa = QA("q", "What does the lighthouse keeper do?", ("keeps the light",))
    assert full.answer_nll(qa) == pytest.approx(pack.answer_nll(qa), abs=1e-4)
    assert full.generate(qa, 6)[0] == pack.generate(qa, 6)[0]
    assert full.kv_tokens == tk.total


def test_cached_method_does_not_change_its_cache(tiny_lm, tiny_pack):
    from kvcompile.framing import frame

    framing = frame(tiny_lm.tokenizer)
    ids = list(framing.prefix_ids) + list(range(100, 140))
    m = prefill_method(tiny_lm, framing, ids, "ctx", "full")
    before = [t.clone() for layer in m.session.kv for t in (layer.keys, layer.values, layer.positions)]
    qa = QA("q", "Anything?", ("yes",))
    first = m.answer_nll(qa)
    m.generate(qa, 5)
    assert m.answer_nll(qa) == first
    after = [t for layer in m.session.kv for t in (layer.keys, layer.values, layer.positions)]
    assert len(after) == len(before) and all(torch.equal(a, k) for a, k in zip(before, after))


def test_peak_memory_sees_an_allocation():
    with PeakMemory("cpu") as m:
        x = torch.ones(8_000_000)  # 32 MB
        del x
    if m.peak is None:
        pytest.skip("no glibc heap statistics on this platform")
    assert m.peak >= 30_000_000


# -- the command -------------------------------------------------------------------------


def run_eval(*args):
    result = invoke("eval", *args, "--quiet", "--json")
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def test_eval_a_pack_on_synthetic_data_prints_every_baseline(tiny_model_dir, tmp_path):
    corpus = tmp_path / "corpus"
    assert invoke("eval-corpus", "synthetic:profiles:3", "-o", corpus, "-n", 3).exit_code == 0
    pack = tmp_path / "p.kvpack"
    built = invoke("build", corpus, "-o", pack, "--model", tiny_model_dir, "--ratio", 0.5, "--chunk-size", 64, "-q")
    assert built.exit_code == 0, built.output
    data = run_eval(pack, "--qa", corpus / "questions.jsonl", "--corpus", corpus, "--max-new-tokens", 4)
    kinds = {m["kind"]: m for m in data["methods"]}
    assert set(kinds) == {"full", "rag", "none", "pack"}
    assert kinds["full"]["gain_kept"] == pytest.approx(1.0) and kinds["none"]["gain_kept"] == pytest.approx(0.0)
    for m in data["methods"]:
        assert m["questions"] == 3 and len(m["rows"]) == 3
        assert m["kv_bytes"] > 0 and m["ttft_s"] > 0
    assert kinds["rag"]["kv_tokens"] <= kinds["pack"]["kv_tokens"] + 1
    assert kinds["pack"]["kv_bytes"] < kinds["full"]["kv_bytes"]
    # Standard errors (stats.py), and rag against the pack of the same budget, paired over the questions.
    assert kinds["full"]["gain_kept_se"] == pytest.approx(0.0) and kinds["pack"]["gain_kept_se"] >= 0
    [vs] = data["comparisons"]
    assert (vs["method"], vs["reference"], vs["questions"]) == (kinds["rag"]["name"], kinds["pack"]["name"], 3)
    assert vs["diff"] == pytest.approx(kinds["rag"]["gain_kept"] - kinds["pack"]["gain_kept"])

    # Same inputs, same results (timings and memory aside).
    again = run_eval(pack, "--qa", corpus / "questions.jsonl", "--corpus", corpus, "--max-new-tokens", 4)

    def stable(d):
        return [{k: v for k, v in m.items() if k not in ("ttft_s", "tokens_per_s", "peak_memory", "setup_s", "rows")}
                | {"rows": [{k: v for k, v in r.items() if k not in ("ttft", "tokens_per_s")} for r in m["rows"]]}
                for m in d["methods"]]
    assert stable(again) == stable(data)


def test_eval_sweep_on_a_dataset_writes_json_and_plot(tiny_model_dir, tmp_path):
    out = tmp_path / "out"
    data = run_eval("--dataset", "synthetic:profiles:3", "-n", 2, "--sweep", "0.5,0.25", "--model", tiny_model_dir,
                    "--baselines", "full,none", "--max-new-tokens", 3, "--out", out, "--reference", "kvcompile@0.5")
    assert sorted(m["name"] for m in data["methods"]) == ["full", "kvcompile@0.25", "kvcompile@0.5", "none"]
    assert sorted((c["method"], c["reference"]) for c in data["comparisons"]) == [
        ("full", "kvcompile@0.5"), ("kvcompile@0.25", "kvcompile@0.5"), ("none", "kvcompile@0.5")]
    assert (out / "eval.json").is_file() and (out / "eval.png").stat().st_size > 1000
    assert sorted(p.name for p in (out / "packs").glob("*.kvpack")) == ["qa-0.25.kvpack", "qa-0.5.kvpack"]


def one_error(result, *needles):
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), result.stderr
    for n in needles:
        assert n in lines[0], lines[0]


@pytest.mark.parametrize("content, needle", [
    ("", "empty"),
    ('{"answers": ["x"]}\n', "missing or empty 'question'"),
    ('{"question": "Who?"}\n', "missing 'answers'"),
    ('{"question": "Who?", "answers": []}\n', "'answers' is empty"),
    ('{"question": "Who?", "answers": ["x"]}\nnot json\n', ":2: invalid JSON"),
])
def test_eval_rejects_bad_qa_files(tiny_pack, tmp_path, content, needle):
    qa = tmp_path / "qa.jsonl"
    qa.write_text(content, encoding="utf-8")
    one_error(invoke("eval", tiny_pack, "--qa", qa, "--baselines", ""), needle)


@pytest.mark.parametrize("args, needle", [
    ([], "give --qa FILE or --dataset NAME"),
    (["--dataset", "nope"], "unknown dataset"),
    (["--dataset", "synthetic:blobs"], "unknown synthetic set"),
    (["--dataset", "synthetic", "--baselines", "full,bm42"], "unknown baseline 'bm42'"),
    (["--dataset", "synthetic", "--sweep", "0.5,2"], "--sweep ratios must be in (0, 1]"),
    (["--dataset", "synthetic", "--sweep", "half"], "comma-separated ratios"),
])
def test_eval_rejects_bad_options(tiny_pack, args, needle):
    one_error(invoke("eval", tiny_pack, *args), needle)


def test_eval_refuses_a_corpus_the_pack_was_not_built_from(tiny_pack, tmp_path):
    corpus = tmp_path / "other"
    corpus.mkdir()
    (corpus / "a.txt").write_text("Something else entirely.", encoding="utf-8")
    qa = tmp_path / "qa.jsonl"
    qa.write_text('{"question": "What?", "answers": ["else"]}\n', encoding="utf-8")
    one_error(invoke("eval", tiny_pack, "--qa", qa, "--corpus", corpus, "-q"), "built from another corpus")


@pytest.mark.slow
def test_eval_on_a_squad_article_with_the_default_model(tmp_path):
    corpus = tmp_path / "squad"
    assert invoke("eval-corpus", "squad:Normans", "-o", corpus, "-n", 3).exit_code == 0
    pack = tmp_path / "normans.kvpack"
    assert invoke("build", corpus, "-o", pack, "-q").exit_code == 0
    data = run_eval(pack, "--qa", corpus / "questions.jsonl", "--corpus", corpus, "--max-new-tokens", 8)
    kinds = {m["kind"]: m for m in data["methods"]}
    assert set(kinds) == {"full", "rag", "none", "pack"}
    # On real text the whole article helps the gold answers: the gain the shares are relative to is real.
    assert kinds["full"]["nll"] < kinds["none"]["nll"]
