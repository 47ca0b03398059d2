"""Quantised packs end to end: build --quant, load (encoded on the device), answer, inspect,
KVmix's profile, and headers whose codec parameters are corrupt."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

import kvcompile
from kvcompile.builder import BuildOptions
from kvcompile.cli import app
from kvcompile.encoded import EncodedKV
from kvcompile.errors import OptionError, PackError
from kvcompile.kvmix import Profile, projections
from kvcompile.pipeline import build
from kvcompile.recipe import load_recipe

pytestmark = pytest.mark.usefixtures("torch_single_thread")
QA = load_recipe("qa")
QUESTION, ANSWER = "When are invoices issued?", "On the first day of each month."


@pytest.fixture(scope="module")
def packs(tiny_lm, tiny_corpus, tmp_path_factory):
    """One pack per --quant choice (ratio 0.5; groups of 8 so that the tiny corpus fills several)."""
    root = tmp_path_factory.mktemp("quant")
    out = {}
    for quant in ("none", "int8", "int4", "int3", "int2", "kvmix", "rvq"):
        out[quant] = root / f"{quant}.kvpack"
        build([tiny_corpus], out[quant], tiny_lm, QA, BuildOptions(ratio=0.5, chunk_size=64, quant=quant,
                                                                  quant_group=8, codec="fp32"))
    return out


@pytest.mark.parametrize("quant", ["int8", "int4", "int3", "int2", "kvmix", "rvq"])
def test_each_codec_loads_encoded_and_answers(packs, tiny_lm, quant):
    pack = kvcompile.load(packs[quant])
    session = pack.session(tiny_lm)
    assert all(isinstance(layer, EncodedKV) for layer in session.kv)
    # on the device: the encoded bytes, not a float cache
    dense = sum(layer.rows for layer in session.kv) * 2 * pack.head_dim * tiny_lm.dtype.itemsize
    assert sum(layer.nbytes for layer in session.kv) < dense / 2
    reference = kvcompile.load(packs["none"]).session(tiny_lm).answer_nll(QUESTION, ANSWER)
    nll = session.answer_nll(QUESTION, ANSWER)
    assert torch.isfinite(torch.tensor(nll))
    if quant == "int8":  # near lossless; the others are only checked to answer
        assert nll == pytest.approx(reference, rel=1e-3)
    assert session.ask(QUESTION, max_new_tokens=4).tokens > 0


def test_the_header_records_what_the_reader_uses(packs):
    for quant, bits in (("int4", (4, 4)), ("int2", (2, 2))):
        pack = kvcompile.load(packs[quant])
        assert pack.header["options"]["quant"] == {"name": quant, "group": 8, "outliers": 0.0}
        for li in range(len(pack.kept)):
            (kc, _, _), (vc, _, _) = pack.encoded(li, "keys"), pack.encoded(li, "values")
            assert (kc.params(), vc.params()) == ({"bits": bits[0], "per": "channel", "group": 8},
                                                  {"bits": bits[1], "per": "token", "group": 8})
    assert "quant" not in kvcompile.load(packs["none"]).header["options"]
    kvmix = kvcompile.load(packs["kvmix"])
    assert kvmix.header["options"]["quant"]["outliers"] == 0.1
    assert all(kvmix.encoded(li, part)[0].outliers == 0.1 for li in range(2) for part in ("keys", "values"))


def test_smaller_than_fp16_by_the_bits(packs):
    sizes = {q: kvcompile.load(p).sizes() for q, p in packs.items()}
    kv = {q: s["keys"] + s["values"] for q, s in sizes.items()}
    assert kv["int8"] < kv["none"] / 2  # fp32 storage here: 4x fewer bits, plus scales of tiny groups
    assert kv["int2"] < kv["int3"] < kv["int4"] < kv["int8"]
    assert kv["int2"] < kv["kvmix"] < kv["none"] / 2  # more bits in some layers, and 10% of rows exact


def test_kvmix_is_deterministic(tiny_lm, tiny_corpus, tmp_path, packs):
    again = tmp_path / "again.kvpack"
    build([tiny_corpus], again, tiny_lm, QA, BuildOptions(ratio=0.5, chunk_size=64, quant="kvmix", quant_group=8,
                                                         codec="fp32"))
    assert again.read_bytes() == packs["kvmix"].read_bytes()
    report = build([tiny_corpus], again, tiny_lm, QA, BuildOptions(ratio=0.5, chunk_size=64, quant="kvmix",
                                                                  quant_group=8, codec="fp32"))
    assert report.plan.counts()["reused"] == 5


def test_rvq_rebuilds_whole_and_byte_identical(tiny_lm, tiny_corpus, tmp_path, packs):
    import shutil

    options = BuildOptions(ratio=0.5, chunk_size=64, quant="rvq", quant_group=8, codec="fp32")
    pack = tmp_path / "rvq.kvpack"
    shutil.copy(packs["rvq"], pack)
    assert build([tiny_corpus], pack, tiny_lm, QA, options).plan.counts()["reused"] == 5
    assert pack.read_bytes() == packs["rvq"].read_bytes()  # codebooks and codes copied, not learned again
    corpus = tmp_path / "corpus"
    shutil.copytree(tiny_corpus, corpus)
    # the last document in corpus order: under int codecs the other four would be reused
    (corpus / "support.txt").write_text("Support answers within a day.", encoding="utf-8")
    report = build([corpus], pack, tiny_lm, QA, options)
    assert report.plan.counts()["reused"] == 0  # codebooks are learned on the whole corpus
    info = kvcompile.load(pack).storage()
    assert info["codebook_bytes"] > 0 and info["layers"][0]["keys"]["interleave"] is True


def test_kvmix_gives_the_top_layers_more_bits():
    profile = Profile(keys=(0.1, 0.9, 0.3, 0.2, 0.5, 0.4, 0.0, 0.05, 0.6, 0.7),
                      values=(1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 2.0))
    bits = profile.bits(top=0.2, high=(3, 4), low=2)
    assert [k for k, _ in bits] == [2, 3, 2, 2, 2, 2, 2, 2, 2, 3]
    assert [v for _, v in bits] == [4, 2, 2, 2, 2, 2, 2, 2, 2, 4]


def test_kvmix_refuses_fused_projections():
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=64))
    with pytest.raises(OptionError, match="k_proj"):
        projections(model)


def test_quant_options_are_checked():
    with pytest.raises(OptionError, match="--quant"):
        BuildOptions(quant="int5").validate()
    with pytest.raises(OptionError, match="--quant-group"):
        BuildOptions(quant="int4", quant_group=0).validate()


def test_cli_build_and_inspect_a_quantised_pack(tiny_model_dir, tiny_corpus, tmp_path):
    runner = CliRunner()
    out = tmp_path / "q.kvpack"
    bad = runner.invoke(app, ["build", str(tiny_corpus), "-o", str(out), "--model", str(tiny_model_dir),
                              "--quant", "int5"])
    assert bad.exit_code != 0 and "--quant must be one of" in bad.output and "Traceback" not in bad.output
    assert not out.exists()
    ok = runner.invoke(app, ["build", str(tiny_corpus), "-o", str(out), "--model", str(tiny_model_dir), "--quant",
                             "int4", "--quant-group", "8", "--chunk-size", "64", "-q"])
    assert ok.exit_code == 0, ok.output
    shown = runner.invoke(app, ["inspect", str(out)], env={"COLUMNS": "300"})
    assert "quant     int4: keys int4 per channel over 8 tokens; values int4 per token over 8 channels" in shown.output
    info = json.loads(runner.invoke(app, ["inspect", str(out), "--json"]).stdout)
    rows = sum(map(sum, info["kept"]))
    storage = info["storage"]
    assert storage["layers"][0]["keys"]["bits"] == 4
    assert storage["bytes_per_row"]["keys"] * rows == info["bytes"]["keys"]
    d = info["model"]["head_dim"]  # values: d 4-bit codes, and an fp16 scale and zero per 8 channels
    assert storage["bytes_per_row"]["values"] == d * 4 / 8 + 4 * d / 8 < storage["fp16_bytes_per_row"]


@pytest.mark.parametrize("edit, problem", [
    (lambda e, t: e["keys"].__setitem__("bits", 5), "bits"),
    (lambda e, t: e["values"].__setitem__("per", "diagonal"), "per"),
    (lambda e, t: e["keys"].__setitem__("group", 3), "layers.0.keys.scales"),  # shape no longer matches the runs
    (lambda e, t: e["values"].pop("group"), "group"),
    (lambda e, t: t.__setitem__("layers.0.values.scales", t["layers.0.values.scales"][:-1]), "layers.0.values.scales"),
    (lambda e, t: e["keys"]["tensors"].pop("zeros"), "zeros"),
])
def test_corrupt_codec_parameters_are_refused(packs, tmp_path, rewrite_pack, edit, problem):
    def change(header, tensors):
        edit(header["cache"]["layers"][0], tensors)

    path = rewrite_pack(packs["int4"], tmp_path / "bad.kvpack", change)
    with pytest.raises(PackError, match=problem) as e:
        kvcompile.load(path)
    assert "corrupt pack" in str(e.value) and "\n" not in str(e.value)


def test_the_kernel_rotates_keys_only_with_frequencies_that_reproduce_the_model(tiny_lm, monkeypatch):
    """``Rotary.frequencies`` (what the attention kernel over codes rotates keys with) is checked
    against the model's own cos/sin: frequencies that do not reproduce them are not used."""
    from kvcompile.rope import rotaries

    rotary = rotaries(tiny_lm.model)[0]
    positions = torch.arange(0, 3000, 7)
    inv_freq, scaling = rotary.frequencies(positions)
    assert inv_freq.dtype == torch.float32 and scaling == 1.0
    real = rotary.cos_sin
    # a module whose angles are not position x inv_freq (as if it rescaled them per call)
    monkeypatch.setattr(rotary, "cos_sin", lambda p: tuple(t.roll(1, dims=0) for t in real(p)))
    assert rotary.frequencies(positions) is None
