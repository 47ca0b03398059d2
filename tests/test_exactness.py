"""With everything kept, a pack is the full context: the first answer token's logits match.

Also exercises chunked prefill (chunks much shorter than the corpus), the pre-RoPE
round trip, the ragged attention and the framing: any error in those shows up here.
"""

from __future__ import annotations

import pytest
import torch

import kvcompile
from kvcompile.attention import pack_attention
from kvcompile.builder import BuildOptions
from kvcompile.cache import cache_argument
from kvcompile.corpus import read_corpus
from kvcompile.framing import document_text
from kvcompile.pipeline import build
from kvcompile.recipe import load_recipe

QUESTIONS = ["How long is the password reset link valid?", "Where do orders ship from?"]


def full_prompt_logits(lm, corpus, session, question: str) -> torch.Tensor:
    """Logits of the first answer token from one ordinary (SDPA) forward over the whole prompt."""
    docs, _ = read_corpus([corpus])
    tok = lm.tokenizer
    ids = list(session.framing.prefix_ids)
    for d in docs:
        ids += tok(document_text(d.path, d.text), add_special_tokens=False)["input_ids"]
    ids += session.question_ids(question)
    # The pack's attention is scoped to a question: outside, the model is as loaded.
    assert lm.model.config._attn_implementation == "sdpa"
    with torch.no_grad():
        return lm.model(torch.tensor([ids]), logits_to_keep=1).logits[0, -1].float()


def check_exact(lm, corpus, path, chunk_size: int) -> float:
    options = BuildOptions(ratio=1.0, chunk_size=chunk_size, codec="fp32", context="chained")
    build([corpus], path, lm, load_recipe("qa"), options)
    session = kvcompile.load(path).session(lm)
    worst = 0.0
    for q in QUESTIONS:
        diff = (session.first_token_logits(q) - full_prompt_logits(lm, corpus, session, q)).abs().max().item()
        worst = max(worst, diff)
    return worst


@pytest.mark.parametrize("chunk_size", [64, 4096])
def test_ratio_one_is_exact_tiny(tiny_lm, tiny_corpus, tmp_path, chunk_size):
    assert check_exact(tiny_lm, tiny_corpus, tmp_path / "p.kvpack", chunk_size) <= 1e-3


@pytest.mark.slow
def test_ratio_one_is_exact_default_model(default_model, tiny_corpus, tmp_path):
    assert check_exact(default_model, tiny_corpus, tmp_path / "p.kvpack", chunk_size=256) <= 1e-3


def test_compression_changes_logits(tiny_lm, tiny_corpus, tmp_path):
    """The exactness check can fail: at ratio 0.25 the logits do differ."""
    path = tmp_path / "p.kvpack"
    build([tiny_corpus], path, tiny_lm, load_recipe("qa"), BuildOptions(ratio=0.25, chunk_size=64, codec="fp32"))
    session = kvcompile.load(path).session(tiny_lm)
    q = QUESTIONS[0]
    assert (session.first_token_logits(q) - full_prompt_logits(tiny_lm, tiny_corpus, session, q)).abs().max() > 1e-3


def test_generate_with_pack_cache_matches_session(tiny_lm, tiny_pack):
    """A user's own generate() over pack.cache() decodes what the session decodes."""
    pack = kvcompile.load(tiny_pack)
    session = pack.session(tiny_lm)
    q = session.question_ids("When was the company founded?")
    start = pack.attended_positions()[1]  # where questions start (compacted by default)
    with pack_attention(tiny_lm.model):
        # `cache=` from transformers 5.24 on, `past_key_values=` before (and until 5.40).
        cache = {cache_argument(tiny_lm.model): pack.cache(tiny_lm)}
        out = tiny_lm.model.generate(torch.tensor([[0] * start + q]), **cache, max_new_tokens=6, do_sample=False,
                                     min_new_tokens=6)
    assert tiny_lm.model.config._attn_implementation == "sdpa"
    first = int(session.first_token_logits("When was the company founded?").argmax())
    assert int(out[0, start + len(q)]) == first


def test_questions_are_independent(tiny_lm, tiny_pack):
    """Asking one question leaves the pack's cache as it was for the next."""
    session = kvcompile.load(tiny_pack).session(tiny_lm)
    before = session.first_token_logits("Where do orders ship from?")
    session.ask("Tell me everything about the support hotline.", max_new_tokens=5)
    after = session.first_token_logits("Where do orders ship from?")
    assert torch.equal(before, after)
