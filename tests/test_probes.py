"""build --auto-probes: probes written from the corpus, deterministic, recorded, reused by rebuilds."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import pytest
from conftest import set_field
from typer.testing import CliRunner

from kvcompile import probes as probes_module
from kvcompile.builder import BuildOptions
from kvcompile.cli import app
from kvcompile.corpus import Document, read_corpus
from kvcompile.errors import OptionError, PackError
from kvcompile.pack import load
from kvcompile.pipeline import build, plan
from kvcompile.probes import (
    AutoProbes,
    Chunk,
    check_count,
    choose_chunks,
    clean_question,
    prompt_ids,
    split_text,
    write_probes,
)
from kvcompile.recipe import Recipe, load_recipe

pytestmark = pytest.mark.usefixtures("torch_single_thread")

REPO = Path(__file__).resolve().parent.parent
OPTIONS = dict(ratio=0.5, chunk_size=64, context="chained")  # edits recompile from the first changed document
runner = CliRunner()


def one_error_line(result, needle: str) -> None:
    """A clean failure: non-zero exit, one 'error:' line on stderr naming ``needle``, no traceback."""
    assert result.exit_code != 0, result.output
    assert isinstance(result.exception, SystemExit), repr(result.exception)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and needle in lines[0], result.stderr
    assert "Traceback" not in result.output


def doc(path: str, text: str) -> Document:
    return Document(path, text, hashlib.sha256(text.encode()).hexdigest())


def fake_generate(lm, ids, max_new_tokens):
    """A stand-in for the model: a question that depends only on the prompt."""
    return f"Question: What is item {sum(ids) % 997}?\nmore text"


def failing_generate(lm, ids, max_new_tokens):
    raise AssertionError("a probe was generated although its source text is unchanged")


# ----------------------------------------------------------------------------- units


@pytest.mark.parametrize("value,expected", [(1, 1), (8, 8), ("3", 3), (" 12 ", 12), (1024, 1024)])
def test_check_count_accepts_positive_whole_numbers(value, expected):
    assert check_count(value) == expected


@pytest.mark.parametrize("value", [0, -1, "0", "-2", "abc", "1.5", "", "+-3", "1e3", 2.0, True, None, 1025, "5000",
                                   "٣"])
def test_check_count_refuses_anything_else(value):
    with pytest.raises(OptionError, match="--auto-probes"):
        check_count(value)


def test_split_text_cuts_at_breaks_and_keeps_every_word():
    text = "\n\n".join(f"Paragraph {i}. " + "word " * 30 for i in range(10))
    pieces = split_text(text, 200)
    assert all(len(p) <= 200 for p in pieces)
    assert " ".join(" ".join(pieces).split()) == " ".join(text.split())
    assert all(p.startswith("Paragraph") or p.startswith("word") for p in pieces)
    assert split_text("x" * 450, 200) == ["x" * 200, "x" * 200, "x" * 50]  # no break: cut hard
    assert split_text("  \n ") == []


def test_chunks_are_spread_evenly_and_deterministic():
    documents = [doc(f"d{i:02}.txt", f"Document {i} says {i * 7}.") for i in range(20)]
    chosen = choose_chunks(documents, 4)
    assert [c.document for c in chosen] == ["d02.txt", "d07.txt", "d12.txt", "d17.txt"]
    assert chosen == choose_chunks(documents, 4)
    assert len(choose_chunks(documents, 50)) == 20  # at most one probe per chunk
    assert chosen[0].sha256 == hashlib.sha256(b"Document 2 says 14.").hexdigest()


def test_few_chunks_are_split_finer_when_more_probes_are_asked():
    documents = [doc("long.txt", " ".join(f"Sentence number {i} is here." for i in range(100)))]
    assert len(choose_chunks(documents, 1)) == 1
    chosen = choose_chunks(documents, 6)
    assert len(chosen) == 6 and len({c.text for c in chosen}) == 6
    assert all(len(c.text) <= probes_module.CHUNK_CHARS // 2 for c in chosen)


@pytest.mark.parametrize("raw,expected", [
    ("What is the fee?", "What is the fee?"),
    ("  What is the fee? And more?", "What is the fee?"),
    ("Question: Who founded it?\nAnswer: Ada", "Who founded it?"),
    ("- \"How long is the link valid?\"", "How long is the link valid?"),
    ("1. Where is the warehouse", "Where is the warehouse"),
    ("\n\n", ""),
])
def test_clean_question(raw, expected):
    assert clean_question(raw) == expected


def test_prompt_shows_the_recipe_examples_or_else_its_description(tiny_lm):
    tok = tiny_lm.tokenizer
    chunk = Chunk("a.txt", "Invoices are issued on the first day of each month.")
    with_examples = tok.decode(prompt_ids(tok, load_recipe("faq"), chunk))
    assert "How do I change the email address of my account?" in with_examples
    assert "Invoices are issued on the first day" in with_examples
    assert load_recipe("faq").description[:60] not in with_examples
    bare = Recipe(name="bare", description="Questions about invoices and their due dates.", probes=())
    without = tok.decode(prompt_ids(tok, bare, chunk))
    assert "Questions about invoices and their due dates." in without
    assert "Invoices are issued on the first day" in without
    assert with_examples.rstrip().endswith("Question:")


def test_a_long_chunk_is_cut_to_a_bounded_prompt(tiny_lm):
    tok = tiny_lm.tokenizer
    short = len(prompt_ids(tok, load_recipe("qa"), Chunk("a.txt", "word")))
    long = len(prompt_ids(tok, load_recipe("qa"), Chunk("a.txt", "word " * 5000)))
    assert long - short <= probes_module.CHUNK_TOKENS + 4


def test_write_probes_records_sources_and_dedups_into_the_recipe(tiny_lm):
    documents = [doc(f"d{i}.txt", f"Text number {i}.") for i in range(4)]
    same = write_probes(tiny_lm, documents, load_recipe("qa"), 4, generate=lambda lm, ids, n: "Same question?")
    assert [p.question for p in same.probes] == ["Same question?"] * 4
    assert same.questions == ["Same question?"] and same.generated == 4
    assert [p.document for p in same.probes] == ["d0.txt", "d1.txt", "d2.txt", "d3.txt"]
    assert same.probes[1].sha256 == hashlib.sha256(b"Text number 1.").hexdigest()
    recipe = same.extend(load_recipe("qa"))
    assert recipe.probes[-1] == "Same question?" and recipe.probes[:-1] == load_recipe("qa").probes
    assert "- Same question?" in recipe.task_prompt()
    # A question the recipe already asks adds nothing.
    echo = write_probes(tiny_lm, documents[:1], load_recipe("qa"), 1,
                        generate=lambda lm, ids, n: load_recipe("qa").probes[0])
    assert echo.extend(load_recipe("qa")).probes == load_recipe("qa").probes


def test_write_probes_reuses_by_key_and_needs_weights_only_for_new_ones(tiny_lm, default_tokenizer_identity):
    documents = [doc(f"d{i}.txt", f"Text number {i}.") for i in range(3)]
    first = write_probes(tiny_lm, documents, load_recipe("qa"), 3, generate=fake_generate)
    previous = {p.key: p.question for p in first.probes}
    again = write_probes(tiny_lm, documents, load_recipe("qa"), 3, previous=previous, generate=failing_generate)
    assert again.probes == first.probes and again.generated == 0
    # Without weights (a plan): every probe from the previous pack, or None.
    assert write_probes(default_tokenizer_identity(tiny_lm), documents, load_recipe("qa"), 3,
                        previous=previous).probes == first.probes
    edited = [documents[0], doc("d1.txt", "Text number one, edited."), documents[2]]
    assert write_probes(default_tokenizer_identity(tiny_lm), edited, load_recipe("qa"), 3, previous=previous) is None
    # Another recipe's examples: other prompts, other keys.
    other = write_probes(tiny_lm, documents, load_recipe("faq"), 3, previous=previous, generate=fake_generate)
    assert other.generated == 3


@pytest.fixture
def default_tokenizer_identity():
    """A ModelIdentity-like view of a loaded model: fingerprint and tokenizer, no weights."""
    from kvcompile.models import ModelIdentity

    return lambda lm: ModelIdentity(lm.fingerprint, lm.tokenizer, lm.capability, lm.max_positions)


# ----------------------------------------------------------------------------- builds with the tiny model


@pytest.fixture(scope="module")
def auto_pack(tiny_lm, tiny_corpus, tmp_path_factory):
    """A pack of the tiny corpus with 3 auto probes written greedily by the tiny model, and its report."""
    path = tmp_path_factory.mktemp("auto") / "auto.kvpack"
    report = build([tiny_corpus], path, tiny_lm, load_recipe("qa"), BuildOptions(**OPTIONS), auto_probes=3)
    return path, report


def test_auto_probes_are_recorded_in_the_header_and_read_back(auto_pack, tiny_corpus):
    path, report = auto_pack
    header = load(path).header
    recorded = header["recipe"]["auto_probes"]
    assert header["options"]["auto_probes"] == 3
    assert recorded == report.probes.to_json() and len(recorded) == 3 and report.probes.generated == 3
    documents, _ = read_corpus([tiny_corpus])
    chunks = choose_chunks(documents, 3)
    assert [p["document"] for p in recorded] == [c.document for c in chunks]
    assert [p["sha256"] for p in recorded] == [c.sha256 for c in chunks]
    qa = load_recipe("qa")
    questions = list(dict.fromkeys(p["question"] for p in recorded if p["question"]))
    assert questions, "the tiny model wrote nothing at all"
    assert header["recipe"]["probes"] == list(qa.with_probes(questions).probes)
    assert header["recipe"]["task_prompt"] == qa.with_probes(questions).task_prompt()
    assert header["recipe"]["source"] == qa.source  # the recipe's own text is untouched


def test_auto_probes_are_deterministic(auto_pack, tiny_lm, tiny_corpus, tmp_path):
    path, report = auto_pack
    again = build([tiny_corpus], tmp_path / "again.kvpack", tiny_lm, load_recipe("qa"), BuildOptions(**OPTIONS),
                  auto_probes=3)
    assert again.probes == report.probes  # generated again, greedily: the same questions
    assert (tmp_path / "again.kvpack").read_bytes() == path.read_bytes()


def test_probes_change_the_segment_keys(auto_pack, tiny_lm, tiny_corpus, tmp_path):
    path, _ = auto_pack
    shutil.copy(path, tmp_path / "p.kvpack")
    report = build([tiny_corpus], tmp_path / "p.kvpack", tiny_lm, load_recipe("qa"), BuildOptions(**OPTIONS))
    assert report.probes is None and report.plan.counts()["reused"] == 0
    assert "auto_probes" not in load(tmp_path / "p.kvpack").header["recipe"]


def test_a_rebuild_of_an_unchanged_corpus_reuses_the_probes_without_generating(auto_pack, tiny_lm, tiny_corpus,
                                                                             tmp_path, monkeypatch):
    path, report = auto_pack
    out = tmp_path / "rebuilt.kvpack"
    shutil.copy(path, out)
    monkeypatch.setattr(probes_module, "generate_question", failing_generate)
    again = build([tiny_corpus], out, tiny_lm, load_recipe("qa"), BuildOptions(**OPTIONS), auto_probes=3)
    assert again.probes.generated == 0 and again.probes.probes == report.probes.probes
    assert again.plan.up_to_date
    assert out.read_bytes() == path.read_bytes()


def test_an_edit_outside_the_probes_sources_keeps_the_probes(auto_pack, tiny_lm, tiny_corpus, tmp_path,
                                                          monkeypatch):
    path, report = auto_pack
    sources = {p.document for p in report.probes.probes}
    corpus = tmp_path / "corpus"
    shutil.copytree(tiny_corpus, corpus)
    untouched = sorted(p.name for p in corpus.iterdir() if p.name not in sources)[-1]
    (corpus / untouched).write_text("An edited document about something else entirely.", encoding="utf-8")
    out = tmp_path / "edited.kvpack"
    shutil.copy(path, out)
    monkeypatch.setattr(probes_module, "generate_question", failing_generate)
    again = build([corpus], out, tiny_lm, load_recipe("qa"), BuildOptions(**OPTIONS), auto_probes=3)
    assert again.probes.probes == report.probes.probes
    status = dict(again.plan.status())
    assert status[untouched] == "recompiled"
    assert sum(s == "reused" for s in status.values()) == sorted(status).index(untouched)  # chained


def test_an_edit_to_a_probes_source_rewrites_that_probe_and_recompiles_everything(auto_pack, tiny_lm, tiny_corpus,
                                                                               tmp_path, monkeypatch):
    path, report = auto_pack
    source = report.probes.probes[-1].document
    corpus = tmp_path / "corpus"
    shutil.copytree(tiny_corpus, corpus)
    (corpus / source).write_text("Support moved: it now answers on weekends only.", encoding="utf-8")
    out = tmp_path / "edited.kvpack"
    shutil.copy(path, out)
    calls = []
    monkeypatch.setattr(probes_module, "generate_question",
                        lambda lm, ids, n: calls.append(ids) or "What are the new support hours?")
    again = build([corpus], out, tiny_lm, load_recipe("qa"), BuildOptions(**OPTIONS), auto_probes=3)
    assert len(calls) == 1 and again.probes.generated == 1
    assert again.probes.probes[:2] == report.probes.probes[:2]
    assert again.probes.probes[2].question == "What are the new support hours?"
    assert again.plan.counts()["reused"] == 0  # the task prompt changed: every segment's key did
    assert "What are the new support hours?" in load(out).header["recipe"]["probes"]


def test_plan_takes_the_probes_from_the_previous_pack(auto_pack, tiny_lm, tiny_corpus, default_tokenizer_identity,
                                                    tmp_path):
    path, _ = auto_pack
    identity = default_tokenizer_identity(tiny_lm)
    rebuild, _ = plan([tiny_corpus], identity, load_recipe("qa"), BuildOptions(**OPTIONS), path, auto_probes=3)
    assert rebuild.up_to_date
    rebuild, _ = plan([tiny_corpus], identity, load_recipe("qa"), BuildOptions(**OPTIONS), path)
    assert not rebuild.up_to_date  # without the auto probes: another task prompt
    corpus = tmp_path / "corpus"
    shutil.copytree(tiny_corpus, corpus)
    source = load(path).header["recipe"]["auto_probes"][0]["document"]
    (corpus / source).write_text("Edited.", encoding="utf-8")
    rebuild, _ = plan([corpus], identity, load_recipe("qa"), BuildOptions(**OPTIONS), path, auto_probes=3)
    assert not rebuild.reuse and "auto probes" in rebuild.caveat


def test_the_python_api_refuses_a_bad_count(tiny_lm, tiny_corpus, tmp_path):
    for bad in (-1, True, 2.5):
        with pytest.raises(OptionError, match="auto_probes"):
            build([tiny_corpus], tmp_path / "x.kvpack", tiny_lm, load_recipe("qa"), BuildOptions(**OPTIONS),
                  auto_probes=bad)
    assert not (tmp_path / "x.kvpack").exists()


def test_a_malformed_auto_probe_record_is_refused_at_load(auto_pack, tmp_path, rewrite_pack):
    path, _ = auto_pack
    bad = rewrite_pack(path, tmp_path / "bad.kvpack", set_field(["recipe", "auto_probes"], [{"question": 3}]))
    with pytest.raises(PackError, match="recipe.auto_probes"):
        load(bad)
    bad = rewrite_pack(path, tmp_path / "bad2.kvpack", set_field(["options", "auto_probes"], 0))
    with pytest.raises(PackError, match="options.auto_probes"):
        load(bad)


def test_a_pack_without_auto_probes_loads(tiny_pack):
    header = load(tiny_pack).header
    assert "auto_probes" not in header["recipe"] and "auto_probes" not in header["options"]


def test_reused_probes_must_agree_with_the_previous_pack(auto_pack, tmp_path, rewrite_pack, tiny_lm):
    """A recorded question that is not among the pack's own probes is not taken from it."""
    path, report = auto_pack

    def edit(header, tensors):
        header["recipe"]["auto_probes"][0]["question"] = "Injected question?"

    forged = rewrite_pack(path, tmp_path / "forged.kvpack", edit)
    recorded = probes_module.previous_probes(forged, tiny_lm.fingerprint)
    assert report.probes.probes[0].key not in recorded
    assert probes_module.previous_probes(forged, "0" * 64) == {}  # another model's pack
    assert probes_module.previous_probes(tmp_path / "missing.kvpack", tiny_lm.fingerprint) == {}


# ----------------------------------------------------------------------------- the command line


@pytest.mark.parametrize("value", ["0", "-3", "abc", "1.5", "5000"])
def test_cli_refuses_a_bad_count(value, tiny_model_dir, tiny_corpus, tmp_path):
    result = runner.invoke(app, ["build", str(tiny_corpus), "-o", str(tmp_path / "out.kvpack"), "--model",
                                 str(tiny_model_dir), "--device", "cpu", "--quiet", f"--auto-probes={value}"])
    one_error_line(result, "--auto-probes")
    assert not (tmp_path / "out.kvpack").exists()


def test_cli_refuses_a_negative_count_given_apart(tiny_model_dir, tiny_corpus, tmp_path):
    result = runner.invoke(app, ["build", str(tiny_corpus), "-o", str(tmp_path / "out.kvpack"), "--model",
                                 str(tiny_model_dir), "--quiet", "--auto-probes", "-3"])
    one_error_line(result, "--auto-probes")


def test_cli_build_and_check_with_auto_probes(tiny_model_dir, tiny_corpus, tmp_path):
    out = tmp_path / "cli.kvpack"
    common = [str(tiny_corpus), "-o", str(out), "--model", str(tiny_model_dir), "--ratio", "0.5",
              "--chunk-size", "64", "--auto-probes", "2"]
    result = runner.invoke(app, ["build", *common, "--device", "cpu", "--quiet"])
    assert result.exit_code == 0, result.output
    assert "auto probes:" in result.stderr and "2 written" in result.stderr
    assert len(load(out).header["recipe"]["auto_probes"]) == 2
    assert runner.invoke(app, ["build", *common, "--check"]).exit_code == 0
    again = runner.invoke(app, ["build", *common, "--device", "cpu", "--quiet"])
    assert again.exit_code == 0 and "0 written, 2 reused" in again.stderr


# ----------------------------------------------------------------------------- the default model


@pytest.mark.slow
def test_default_model_writes_probes_for_the_example_corpus(default_model, capsys):
    documents, _ = read_corpus([REPO / "docs" / "example-corpus"])
    written = write_probes(default_model, documents, load_recipe("faq"), 3)
    assert isinstance(written, AutoProbes) and len(written.probes) == 3 and written.generated == 3
    with capsys.disabled():
        print()
        for p in written.probes:
            print(f"  auto probe from {p.document}: {p.question!r}")
    assert sum(p.question.endswith("?") for p in written.probes) >= 2
    again = write_probes(default_model, documents, load_recipe("faq"), 3,
                         previous={p.key: p.question for p in written.probes}, generate=failing_generate)
    assert again.probes == written.probes


@pytest.mark.parametrize("scorer", ["lagkv", "stride"])
def test_auto_probes_for_a_scorer_that_never_reads_them_is_one_line(scorer, tiny_model_dir, tiny_corpus, tmp_path,
                                                                    tiny_lm):
    result = runner.invoke(app, ["build", str(tiny_corpus), "-o", str(tmp_path / "out.kvpack"), "--model",
                                 str(tiny_model_dir), "--quiet", "--auto-probes", "2", "--scorer", scorer])
    one_error_line(result, f"the {scorer} scorer does not read")
    with pytest.raises(OptionError, match="does not read"):  # the API says the same, before writing anything
        build([tiny_corpus], tmp_path / "x.kvpack", tiny_lm, load_recipe("qa"),
              BuildOptions(**{**OPTIONS, "scorer": scorer}), auto_probes=2)
    assert not (tmp_path / "out.kvpack").exists() and not (tmp_path / "x.kvpack").exists()
