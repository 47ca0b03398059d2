"""The task-aware scorer keeps more of the full context's value than an even stride.

Measured where task guidance is what matters: a haystack of generic filler with sixteen
facts ("The secret code of the teal vault is 4817.") and one question per fact, with the
embedded model, at 25% and 10% of the tokens kept, by the share of the full context's
gold-answer NLL gain that each pack keeps. (On dense corpora, where every sentence is a
fact someone asks about, task-aware and stride are close: docs/benchmarks/rebuild/.)
"""

from __future__ import annotations

import pytest

import kvcompile
from kvcompile.builder import BuildOptions
from kvcompile.data.synthetic import needles, write_corpus
from kvcompile.pipeline import build
from kvcompile.quality import gain_kept, none_nll, pack_nll
from kvcompile.recipe import load_recipe


@pytest.mark.slow
def test_task_aware_beats_even_stride(default_model, tmp_path):
    evalset = needles(3000, n_needles=16, seed=0)
    write_corpus(evalset, tmp_path / "corpus")
    qas = evalset.questions
    recipe = load_recipe("qa")
    nll = {}
    variants = {"full": BuildOptions(ratio=1.0)}
    for ratio in (0.25, 0.1):
        variants[f"task_aware@{ratio}"] = BuildOptions(ratio=ratio)
        variants[f"stride@{ratio}"] = BuildOptions(ratio=ratio, scorer="stride")
    for name, options in variants.items():
        path = tmp_path / f"{name}.kvpack"
        build([tmp_path / "corpus"], path, default_model, recipe, options)
        session = kvcompile.load(path).session(default_model)
        nll[name] = pack_nll(session, qas)
        if name == "full":
            nll["none"] = none_nll(session, qas)
    assert sum(nll["none"]) > sum(nll["full"])  # the documents help at all
    for ratio in (0.25, 0.1):
        task = gain_kept(nll["none"], nll["full"], nll[f"task_aware@{ratio}"])
        stride = gain_kept(nll["none"], nll["full"], nll[f"stride@{ratio}"])
        print(f"gain kept at {ratio:.0%}: task_aware {task:.3f}, stride {stride:.3f}")
        assert task > stride
