"""What a pack kept, token by token: counts, the view on the corpus's text, the HTML page,
``inspect --json --corpus``, and the errors (no corpus, another corpus)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from kvcompile.cli import app
from kvcompile.corpus import read_corpus
from kvcompile.framing import document_text, frame
from kvcompile.kept import (
    MIN_SPAN_SHARE,
    KeptView,
    TextKept,
    document_shares,
    heads_total,
    kept_counts,
    kept_view,
    token_pieces,
)
from kvcompile.kept_html import render
from kvcompile.models import identify
from kvcompile.pack import load

pytestmark = pytest.mark.usefixtures("torch_single_thread")

runner = CliRunner()


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def one_error_line(result, *needles) -> str:
    """A clean failure: non-zero exit, exactly one 'error:' line on stderr, no traceback."""
    assert result.exit_code != 0, result.output
    assert isinstance(result.exception, SystemExit), repr(result.exception)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), result.stderr
    assert "Traceback" not in result.output
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def direct_counts(pack) -> dict[int, int]:
    """Per position, the (layer, head) pairs whose rows hold it: row by row, in Python."""
    counts: dict[int, int] = {}
    for li, per_head in enumerate(pack.kept):
        positions = pack.positions[li].tolist()
        row = 0
        for n in per_head:
            for p in positions[row : row + n]:
                counts[p] = counts.get(p, 0) + 1
            row += n
    return counts


@pytest.fixture(scope="module")
def pack(tiny_pack):
    return load(tiny_pack)


@pytest.fixture(scope="module")
def view(pack, tiny_corpus):
    documents, _ = read_corpus([tiny_corpus])
    return kept_view(pack, documents, identify(pack.model["name"]).tokenizer)


# ----------------------------------------------------------------------------- counts and the view


def test_counts_agree_with_a_direct_count(pack):
    counts = kept_counts(pack)
    heads = heads_total(pack)
    assert counts.shape == (pack.layout["tokens"],) and heads == 2 * 2
    direct = direct_counts(pack)
    assert counts.tolist() == [direct.get(p, 0) for p in range(pack.layout["tokens"])]
    assert 0 <= int(counts.min()) and int(counts.max()) <= heads
    assert int(counts.sum()) == sum(map(sum, pack.kept))
    assert 0 < int((counts == 0).sum()) and 0 < int(((counts > 0) & (counts < heads)).sum())  # a real selection


def test_framing_is_kept_by_every_head(pack, view):
    n_prefix = len(pack.framing.prefix_ids)
    assert view.framing.tokens == n_prefix > 4
    assert view.framing.shares == [1.0] * n_prefix
    assert kept_counts(pack)[:n_prefix].tolist() == [heads_total(pack)] * n_prefix


def test_view_tiles_the_documents_text(pack, view, tiny_corpus):
    documents, _ = read_corpus([tiny_corpus])
    by_path = {d.path: d for d in documents}
    counts = kept_counts(pack).tolist()
    at = len(pack.framing.prefix_ids)
    assert [d.path for d in view.documents] == [m["path"] for m in pack.manifest()]
    for d, m, share in zip(view.documents, pack.manifest(), document_shares(pack)):
        assert d.tokens == m["tokens"] == len(d.pieces) and d.start == at
        assert "".join(d.pieces) == document_text(d.path, by_path[d.path].text)  # every character once
        assert d.counts == counts[at : at + d.tokens]
        assert all(0 <= s <= 1 for s in d.shares)
        assert d.share == pytest.approx(share)
        at += d.tokens
    assert at == pack.layout["tokens"]
    assert view.corpus_share == pytest.approx(0.5, abs=0.05)  # ratio 0.5


def test_top_spans_are_maximal_kept_runs_by_mass(view):
    found = 0
    for d in view.documents:
        spans = d.top_spans()
        masses = [s.share * s.tokens for s in spans]
        assert masses == sorted(masses, reverse=True) and len(spans) <= 5
        kept = [s >= MIN_SPAN_SHARE for s in d.shares]
        for s in spans:
            found += 1
            assert all(kept[s.start : s.end])
            assert s.start == 0 or not kept[s.start - 1]
            assert s.end == d.tokens or not kept[s.end]
            assert s.text == "".join(d.pieces[s.start : s.end])
            assert s.share == pytest.approx(sum(d.shares[s.start : s.end]) / s.tokens)
    assert found


def test_token_pieces_cover_the_text_once():
    text = "ab😀 c"
    # overlapping offsets (the emoji split in two byte tokens) and a gap (a trimmed space)
    assert token_pieces(text, [(0, 2), (2, 3), (2, 3), (4, 5)]) == ["ab", "😀", "", " c"]
    assert token_pieces("xy ", [(0, 2)]) == ["xy "]


def test_sinks_beyond_the_framing_show_share_one(tiny_lm, tmp_path):
    from kvcompile.builder import BuildOptions
    from kvcompile.pipeline import build
    from kvcompile.recipe import load_recipe

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "a.txt").write_text("Invoices are issued on the first day of each month. " * 4, encoding="utf-8")
    out = tmp_path / "sinks.kvpack"
    n_prefix = len(frame(tiny_lm.tokenizer).prefix_ids)
    build([corpus], out, tiny_lm, load_recipe("qa"), BuildOptions(ratio=0.2, chunk_size=64, sinks=n_prefix + 6))
    p = load(out)
    documents, _ = read_corpus([corpus])
    v = kept_view(p, documents, identify(p.model["name"]).tokenizer)
    doc = v.documents[0]
    assert v.framing.shares == [1.0] * n_prefix
    assert doc.shares[:6] == [1.0] * 6  # the sinks: kept by every head
    assert min(doc.shares[6:]) < 1  # and not the rest


# ----------------------------------------------------------------------------- the page


def test_html_names_every_document(tiny_pack, tiny_corpus, pack, tmp_path):
    page = tmp_path / "kept.html"
    result = invoke("inspect", tiny_pack, "--corpus", tiny_corpus, "--html", page)
    assert result.exit_code == 0, result.output
    assert "wrote" in result.stderr and str(page) in result.stderr
    assert "billing.txt" in result.stdout and "top kept span" in result.stdout  # the usual description, with spans
    text = page.read_text(encoding="utf-8")
    assert text.startswith("<!DOCTYPE html>") and "<style>" in text and "<script" not in text
    for i, m in enumerate(pack.manifest()):
        assert f'href="#doc-{i}"' in text and f'id="doc-{i}"' in text
        assert text.count(m["path"]) >= 2  # in the summary table and as the section's title
    assert f'title="{heads_total(pack)}/{heads_total(pack)}"' in text  # the framing, kept whole
    assert 'class="k0"' in text  # tokens no head kept


def test_html_escapes_untrusted_text():
    doc = TextKept("<b>evil</b>.txt", 3, [0, 2, 4], ["## <b>", "<script>alert(1)</script>", "\u202e&\n"], 4)
    framing = TextKept("(framing)", 0, [4, 4, 4], ["<|im_start|>", "system", "\n"], 4)
    page = render(KeptView("x.kvpack", "m", "qa", 2, 2, framing, [doc]))
    assert "<script" not in page and "<b>evil" not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page and "&lt;b&gt;evil&lt;/b&gt;.txt" in page
    assert "\u202e" not in page and "\\u202e&amp;" in page  # a bidi override is shown, not obeyed
    assert '<span class="k0" title="0/4">## &lt;b&gt;</span>' in page
    assert '<span class="k20" title="4/4">' in page and 'class="k10" title="2/4"' in page


# ----------------------------------------------------------------------------- --json


def test_json_with_corpus_gives_every_token(tiny_pack, tiny_corpus, pack):
    result = invoke("inspect", tiny_pack, "--json", "--corpus", tiny_corpus)
    assert result.exit_code == 0, result.output
    info = json.loads(result.stdout)
    heads = info["heads"]
    assert heads == heads_total(pack)
    direct = direct_counts(pack)
    assert info["framing"]["token_shares"] == [1.0] * info["framing"]["tokens"]
    documents, _ = read_corpus([tiny_corpus])
    texts = {d.path: document_text(d.path, d.text) for d in documents}
    assert [d["path"] for d in info["documents"]] == [m["path"] for m in pack.manifest()]
    for d in info["documents"]:
        assert set(d) >= {"path", "sha256", "tokens", "segment", "start", "kept_share", "top_spans",
                          "token_shares", "token_text"}
        assert len(d["token_shares"]) == len(d["token_text"]) == d["tokens"]
        assert "".join(d["token_text"]) == texts[d["path"]]
        assert [round(s * heads) for s in d["token_shares"]] == [direct.get(d["start"] + i, 0)
                                                                   for i in range(d["tokens"])]
        assert 0 <= d["kept_share"] <= 1
        for s in d["top_spans"]:
            assert set(s) == {"start", "end", "share", "text"} and 0 <= s["start"] < s["end"] <= d["tokens"]
            assert s["share"] >= MIN_SPAN_SHARE


def test_json_without_corpus_gives_shares_only(tiny_pack, pack):
    result = invoke("inspect", tiny_pack, "--json")
    assert result.exit_code == 0, result.output
    info = json.loads(result.stdout)
    assert "framing" not in info
    for d, share in zip(info["documents"], document_shares(pack)):
        assert d["kept_share"] == round(share, 4) and "token_shares" not in d


# ----------------------------------------------------------------------------- errors


def test_html_needs_the_corpus(tiny_pack, tmp_path):
    result = invoke("inspect", tiny_pack, "--html", tmp_path / "kept.html")
    one_error_line(result, "--html", "--corpus")
    assert not (tmp_path / "kept.html").exists()


def test_another_corpus_names_the_documents_that_differ(tiny_pack, tiny_corpus, tmp_path):
    corpus = Path(shutil.copytree(tiny_corpus, tmp_path / "corpus"))
    (corpus / "billing.txt").unlink()
    (corpus / "shipping.txt").write_text("Orders now ship from Antwerp.", encoding="utf-8")
    (corpus / "returns.txt").write_text("Returns are free within 30 days.", encoding="utf-8")
    for extra in ([], ["--json"], ["--html", tmp_path / "kept.html"]):
        line = one_error_line(invoke("inspect", tiny_pack, "--corpus", corpus, *extra), "not built from this corpus")
        assert "missing 'billing.txt'" in line and "extra 'returns.txt'" in line and "changed 'shipping.txt'" in line
        assert "password.txt" not in line
    assert not (tmp_path / "kept.html").exists()
