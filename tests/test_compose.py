"""Several packs answered as one context (issue 14, composition at load)."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from typer.testing import CliRunner

import kvcompile
from kvcompile.builder import BuildOptions
from kvcompile.cli import app
from kvcompile.errors import ModelMismatchError, OptionError
from kvcompile.models import load_model, make_tiny_model
from kvcompile.pipeline import build
from kvcompile.recipe import load_recipe

pytestmark = pytest.mark.usefixtures("torch_single_thread")
QUESTION = "Where do orders ship from?"
QA = load_recipe("qa")


@pytest.fixture(scope="module")
def halves(tiny_corpus, tmp_path_factory):
    """The tiny corpus split in two folders, in corpus order: (billing, history) and the rest."""
    root = tmp_path_factory.mktemp("halves")
    a, b = root / "a", root / "b"
    for name in sorted(p.name for p in tiny_corpus.iterdir()):
        dst = a if name < "password" else b
        dst.mkdir(exist_ok=True)
        shutil.copy(tiny_corpus / name, dst / name)
    return a, b


def _build(lm, folders, path, **options):
    build(list(folders), path, lm, QA, BuildOptions(chunk_size=64, codec="fp32", **options))
    return kvcompile.load(path)


def test_two_packs_at_ratio_one_are_the_pack_of_the_union(tiny_lm, halves, tmp_path):
    """Independent documents, every token kept: packs A and B composed answer exactly as the
    pack built from A and B together (the framing is A's, the same as the union's)."""
    a, b = (_build(tiny_lm, [f], tmp_path / f"{f.name}.kvpack", ratio=1.0, context="independent") for f in halves)
    union = _build(tiny_lm, halves, tmp_path / "ab.kvpack", ratio=1.0, context="independent")
    assert [d["path"] for d in union.manifest()] == [d["path"] for d in a.manifest() + b.manifest()]
    composed = kvcompile.compose([a, b], tiny_lm)
    assert composed.start == union.question_position
    for q in (QUESTION, "How long is the password reset link valid?"):
        torch.testing.assert_close(composed.first_token_logits(q), union.session(tiny_lm).first_token_logits(q),
                                   atol=1e-4, rtol=1e-4)
    # and the order matters: B then A is another context
    swapped = kvcompile.compose([b, a], tiny_lm).first_token_logits(QUESTION)
    assert (swapped - composed.first_token_logits(QUESTION)).abs().max() > 1e-4


def test_compressed_packs_compose_compacted(tiny_lm, halves, tmp_path):
    a, b = (_build(tiny_lm, [f], tmp_path / f"{f.name}.kvpack", ratio=0.5, quant=q)
            for f, q in zip(halves, ("none", "int4")))
    session = kvcompile.compose([str(a.path), str(b.path)], tiny_lm)
    framing = len(b.framing.prefix_ids)
    b_corpus = [torch.split(pos, list(kept)) for pos, kept in zip(b.positions, b.kept)]  # per layer, per head
    longest_a = a.attended_positions("compact")[1]
    assert session.start == longest_a + max(int((h >= framing).sum()) for heads in b_corpus for h in heads)
    # B's framing is dropped (A's serves); every head of B starts right after A's longest head
    assert sum(layer.rows for layer in session.kv) == (
        sum(map(sum, a.kept)) + sum(int((pos >= framing).sum()) for pos in b.positions))
    for layer, a_kept in zip(session.kv, a.kept):
        heads = torch.split(layer.positions, list(layer.lengths))
        for h, n in zip(heads, a_kept):
            assert h[:n].tolist() == list(range(n)) and h[n:].tolist() == list(range(longest_a, longest_a + len(h) - n))
    original = kvcompile.compose([a, b], tiny_lm, positions="original")
    assert original.start == a.question_position + b.question_position - framing
    assert torch.isfinite(session.first_token_logits(QUESTION)).all()


def test_packs_of_two_models_are_refused_naming_both(tiny_lm, tiny_corpus, tmp_path):
    other = load_model(str(make_tiny_model(tmp_path / "other", seed=1)), device="cpu", progress=False)
    a = _build(tiny_lm, [tiny_corpus], tmp_path / "a.kvpack", ratio=0.5)
    b = _build(other, [tiny_corpus], tmp_path / "b.kvpack", ratio=0.5)
    with pytest.raises(ModelMismatchError, match=r"b\.kvpack was built with model .* and .*a\.kvpack with"):
        kvcompile.compose([a, b], tiny_lm)


def test_packs_that_do_not_fit_together_are_refused_with_what_to_do(tiny_corpus, tmp_path):
    lm = load_model(str(make_tiny_model(tmp_path / "m", max_position_embeddings=1024)), device="cpu", progress=False)
    a = _build(lm, [tiny_corpus], tmp_path / "a.kvpack", ratio=0.5)
    with pytest.raises(OptionError, match="more than .* window of 1024: load them with positions compact"):
        kvcompile.compose([a, a], lm, positions="original")
    assert kvcompile.compose([a, a], lm).start < 1024  # compacted, they fit
    with pytest.raises(OptionError, match="compose fewer or smaller packs"):
        kvcompile.compose([a] * 4, lm)


def test_cli_query_answers_from_several_packs(tiny_model_dir, tiny_pack, tmp_path):
    runner = CliRunner()
    result = runner.invoke(app, ["query", str(tiny_pack), str(tiny_pack), QUESTION, "-n", "2", "--json",
                                 "--model", str(tiny_model_dir)])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["question"] == QUESTION
    missing = runner.invoke(app, ["query", str(tiny_pack), str(tmp_path / "nope.kvpack"), QUESTION])
    assert missing.exit_code != 0 and "nope.kvpack" in missing.stderr and "Traceback" not in missing.output


def test_packs_of_a_model_with_absolute_positions_are_not_composed(tiny_corpus, tmp_path):
    lm = load_model(str(make_tiny_model(tmp_path / "gpt2", arch="gpt2")), device="cpu", progress=False)
    a = _build(lm, [tiny_corpus], tmp_path / "a.kvpack", ratio=0.5)
    with pytest.raises(OptionError, match="absolute positions"):
        kvcompile.compose([a, a], lm)
    assert kvcompile.compose([a], lm).start == a.question_position  # one pack: as loaded (original positions)


# -- merge: one pack written from several ------------------------------------------------------


def _container(path):
    from kvcompile.container import Container

    c = Container(path)
    return json.loads(c.metadata["kvpack"]), {name: c.read(name) for name in c.entries}


@pytest.mark.parametrize("quant", ["none", "int4"])
def test_merge_writes_the_pack_a_clean_independent_build_of_the_union_writes(tiny_lm, halves, tmp_path, quant):
    from kvcompile.merging import merge

    opts = dict(ratio=0.5, context="independent", quant=quant, quant_group=8)
    parts = [_build(tiny_lm, [f], tmp_path / f"{f.name}.kvpack", **opts).path for f in halves]
    union = _build(tiny_lm, halves, tmp_path / "union.kvpack", **opts)
    report = merge(parts, tmp_path / "merged.kvpack")
    assert report.documents == union.header["corpus"]["documents"] == 5
    merged_header, merged = _container(tmp_path / "merged.kvpack")
    union_header, expected = _container(union.path)
    assert merged_header == union_header  # segment keys included
    assert merged.keys() == expected.keys()
    assert all(torch.equal(merged[n], expected[n]) for n in expected)
    # its segments stay reusable: a rebuild of the union from the merged pack compiles nothing
    from kvcompile.models import identify
    from kvcompile.pipeline import plan

    rebuild, _ = plan(list(halves), identify(tiny_lm.name), QA, BuildOptions(chunk_size=64, codec="fp32", **opts),
                      tmp_path / "merged.kvpack")
    assert rebuild.up_to_date


def test_merge_refuses_what_would_not_equal_a_build_of_the_union(tiny_lm, halves, tmp_path):
    from kvcompile.merging import merge

    a_dir, b_dir = halves
    ind = [_build(tiny_lm, [f], tmp_path / f"i-{f.name}.kvpack", ratio=0.5, context="independent").path
           for f in halves]
    chained = [_build(tiny_lm, [f], tmp_path / f"c-{f.name}.kvpack", ratio=0.5, context="chained").path
               for f in halves]
    whole = [_build(tiny_lm, [f], tmp_path / f"w-{f.name}.kvpack", ratio=0.5).path for f in halves]  # the default
    other_ratio = _build(tiny_lm, [b_dir], tmp_path / "r.kvpack", ratio=0.25, context="independent").path
    cases = [
        ([ind[0]], "at least two packs"),
        (chained, "--context chained.*--context independent"),
        (whole, "--context whole.*--context independent"),
        ([ind[0], other_ratio], "differ in options.ratio"),
        ([ind[0], ind[0]], "is in both"),
    ]
    other = load_model(str(make_tiny_model(tmp_path / "other", seed=1)), device="cpu", progress=False)
    cases.append(([ind[0], _build(other, [b_dir], tmp_path / "o.kvpack", ratio=0.5, context="independent").path],
                  "built with one model"))
    for paths, message in cases:
        with pytest.raises((OptionError, ModelMismatchError), match=message):
            merge(paths, tmp_path / "out.kvpack")
    assert not (tmp_path / "out.kvpack").exists()


def test_cli_merge(tiny_lm, halves, tmp_path):
    parts = [str(_build(tiny_lm, [f], tmp_path / f"{f.name}.kvpack", ratio=0.5, context="independent").path)
             for f in halves]
    runner = CliRunner()
    result = runner.invoke(app, ["merge", *parts, "-o", str(tmp_path / "ab.kvpack")])
    assert result.exit_code == 0, result.output
    assert "5 documents" in result.stderr and kvcompile.load(tmp_path / "ab.kvpack").header["corpus"]["documents"] == 5
    result = runner.invoke(app, ["merge", parts[0], parts[0], "-o", str(tmp_path / "x.kvpack")])
    assert result.exit_code != 0 and "is in both" in result.stderr and "Traceback" not in result.output
