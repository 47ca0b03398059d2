"""The task-aware scorer keeps more of the full context's value than an even stride.

Measured on a generated corpus of entity profiles (unique facts, one question each) with
the embedded model, at 25% of the tokens kept, by the share of the full context's
gold-answer NLL gain that each pack keeps.
"""

from __future__ import annotations

import pytest

import kvcompile
from kvcompile.builder import BuildOptions
from kvcompile.data.synthetic import entity_profiles, write_corpus
from kvcompile.pipeline import build
from kvcompile.quality import gain_kept, none_nll, pack_nll
from kvcompile.recipe import load_recipe


@pytest.mark.slow
def test_task_aware_beats_even_stride(default_model, tmp_path):
    evalset = entity_profiles(20, seed=0)
    write_corpus(evalset, tmp_path / "corpus")
    qas = evalset.questions[::3]
    recipe = load_recipe("qa")
    nll = {}
    for name, options in {
        "full": BuildOptions(ratio=1.0),
        "task_aware": BuildOptions(ratio=0.25),
        "stride": BuildOptions(ratio=0.25, scorer="stride"),
    }.items():
        path = tmp_path / f"{name}.kvpack"
        build([tmp_path / "corpus"], path, default_model, recipe, options)
        session = kvcompile.load(path).session(default_model)
        nll[name] = pack_nll(session, qas)
        if name == "full":
            nll["none"] = none_nll(session, qas)
    task = gain_kept(nll["none"], nll["full"], nll["task_aware"])
    stride = gain_kept(nll["none"], nll["full"], nll["stride"])
    print(f"gain kept at 25%: task_aware {task:.3f}, stride {stride:.3f}")
    assert sum(nll["none"]) > sum(nll["full"])  # the documents help at all
    assert task > stride
