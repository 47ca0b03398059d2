"""The architecture matrix (issue 11): every model type a pack accepts answers exactly as
the full prompt does, and every other one is refused by name.

Tiny random models of each supported type are built from a config (2 layers, about a
second each). With every token kept, the pack's first-token logits must equal those of
one ordinary forward pass over the full prompt: in ``chained`` mode over the corpus, in
``independent`` mode over one document (where both modes must be the full prompt), and,
for types with sliding windows, with a window shorter than the corpus. Keys placed at
other positions than they were computed at are checked against the model's own RoPE.
"""

from __future__ import annotations

import pytest
import torch
from transformers import AutoConfig

import kvcompile
from kvcompile.builder import BuildOptions
from kvcompile.capability import REFUSED, SUPPORTED, capability
from kvcompile.errors import ModelError, OptionError
from kvcompile.models import load_model, make_tiny_model
from kvcompile.pipeline import build
from kvcompile.recipe import load_recipe

pytestmark = pytest.mark.usefixtures("torch_single_thread")

QUESTION = "How long is the password reset link valid?"
WINDOW = 48  # shorter than the tiny corpus (~580 tokens) and than a 64-token chunk

MOE = {
    "mixtral": dict(num_local_experts=4, num_experts_per_tok=2),
    "qwen2_moe": dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                      shared_expert_intermediate_size=32),
    "qwen3_moe": dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32),
}
ROPE = {
    "llama3": dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                   original_max_position_embeddings=256, rope_theta=10000.0),
    "yarn": dict(rope_type="yarn", factor=4.0, original_max_position_embeddings=256, rope_theta=10000.0),
}

# (id, model type, config overrides): one exact case per supported type and variant.
EXACT = [
    ("llama", "llama", {}),
    ("llama-llama3", "llama", {"rope_parameters": ROPE["llama3"]}),
    ("llama-yarn", "llama", {"rope_parameters": ROPE["yarn"]}),
    ("mistral-window", "mistral", {"sliding_window": WINDOW}),
    ("mixtral", "mixtral", MOE["mixtral"]),
    ("qwen2-window", "qwen2", {"use_sliding_window": True, "sliding_window": WINDOW, "max_window_layers": 1}),
    ("qwen2_moe", "qwen2_moe", MOE["qwen2_moe"]),
    ("qwen2_moe-window", "qwen2_moe", {**MOE["qwen2_moe"], "use_sliding_window": True, "sliding_window": WINDOW,
                                       "max_window_layers": 1}),
    ("qwen3", "qwen3", {}),
    ("qwen3_moe", "qwen3_moe", MOE["qwen3_moe"]),
    ("gemma", "gemma", {}),
    ("gemma2-softcap-window", "gemma2", {"sliding_window": WINDOW}),
    ("phi", "phi", {}),
    ("phi3-window", "phi3", {"sliding_window": WINDOW}),
    ("olmo", "olmo", {}),
    ("olmo2", "olmo2", {}),
    ("granite", "granite", {}),
    ("stablelm", "stablelm", {}),
    ("starcoder2-window", "starcoder2", {"sliding_window": WINDOW}),
    ("smollm3", "smollm3", {}),
    ("smollm3-no-rope-layer", "smollm3", {"num_hidden_layers": 4}),
    ("gpt_neox-partial-rotary", "gpt_neox", {}),
    ("gpt2-absolute-positions", "gpt2", {}),
    ("opt-absolute-positions", "opt", {}),
    ("gemma3_text-local-global-rope", "gemma3_text", {"sliding_window": WINDOW, "num_hidden_layers": 3,
                                                      "sliding_window_pattern": 2}),
    ("cohere-interleaved-rope", "cohere", {}),
    ("gpt_oss-sinks-window", "gpt_oss", dict(num_local_experts=4, num_experts_per_tok=2, sliding_window=WINDOW)),
]


MODELING = {"gemma3_text": "gemma3"}  # where a type's modeling code lives, when not under its own name


def test_the_matrix_covers_every_supported_type():
    assert {arch for _, arch, _ in EXACT} == SUPPORTED


def _full_prompt_logits(lm, documents, session) -> torch.Tensor:
    from kvcompile.framing import document_text

    ids = list(session.framing.prefix_ids)
    for d in documents:
        ids += lm.tokenizer(document_text(d.path, d.text), add_special_tokens=False)["input_ids"]
    ids += session.question_ids(QUESTION)
    with torch.no_grad():
        return lm.model(torch.tensor([ids]), logits_to_keep=1).logits[0, -1].float()


def _worst_difference(lm, corpus, path, context: str) -> float:
    from kvcompile.corpus import read_corpus

    options = BuildOptions(ratio=1.0, chunk_size=64, codec="fp32", context=context)
    build([corpus], path, lm, load_recipe("qa"), options)
    session = kvcompile.load(path).session(lm)
    documents, _ = read_corpus([corpus])
    return (session.first_token_logits(QUESTION) - _full_prompt_logits(lm, documents, session)).abs().max().item()


@pytest.fixture(scope="module")
def one_document(tiny_corpus, tmp_path_factory):
    root = tmp_path_factory.mktemp("one")
    (root / "password.txt").write_text((tiny_corpus / "password.txt").read_text())
    return root


@pytest.mark.parametrize("arch, overrides", [pytest.param(a, o, id=i) for i, a, o in EXACT])
def test_ratio_one_is_exact(arch, overrides, tiny_corpus, one_document, tmp_path):
    lm = load_model(str(make_tiny_model(tmp_path / arch, arch=arch, **overrides)), device="cpu", progress=False)
    cap = capability(lm.config)
    if "window" in str(overrides) or arch == "gemma2":
        assert cap.has_windows, "the case must exercise a sliding window"
        assert lm.tokenizer(open(next(tiny_corpus.iterdir())).read())["input_ids"]  # corpus is real text
    chained = _worst_difference(lm, tiny_corpus, tmp_path / "c.kvpack", "chained")
    if cap.absolute_positions:  # keys cannot move: independent segments are refused by name
        with pytest.raises(OptionError, match=f"not exact for model type '{arch}'"):
            _worst_difference(lm, one_document, tmp_path / "i.kvpack", "independent")
        independent = 0.0
    else:
        independent = _worst_difference(lm, one_document, tmp_path / "i.kvpack", "independent")
    assert chained <= 1e-4 and independent <= 1e-4, (chained, independent)


def test_an_active_window_changes_the_answer(tiny_corpus, tmp_path):
    """The window cases can fail: ignoring the window gives other logits than the model's."""
    lm = load_model(str(make_tiny_model(tmp_path / "m", arch="mistral", sliding_window=WINDOW)), device="cpu",
                    progress=False)
    session_logits = []
    for window in (WINDOW, None):
        lm.model.config.sliding_window = window
        path = tmp_path / f"w{window}.kvpack"
        build([tiny_corpus], path, lm, load_recipe("qa"), BuildOptions(ratio=1.0, chunk_size=64, codec="fp32"))
        session_logits.append(kvcompile.load(path).session(lm).first_token_logits(QUESTION))
    assert (session_logits[0] - session_logits[1]).abs().max() > 1e-3


def _config(arch: str, **overrides):
    fields = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=4096)
    return AutoConfig.for_model(arch, **{**fields, **overrides})  # head_dim: 16, derived (Falcon's cannot be set)


@pytest.mark.parametrize("arch", sorted(REFUSED))
def test_unsupported_types_are_refused_by_name(arch):
    with pytest.raises(ModelError) as e:
        capability(_config(arch))
    assert f"model type '{arch}' is not supported: {REFUSED[arch]}" in str(e.value)


@pytest.mark.parametrize("arch, overrides, feature", [
    ("phi3", {"rope_parameters": {"rope_type": "longrope", "short_factor": [1.0] * 8, "long_factor": [2.0] * 8,
                                  "original_max_position_embeddings": 256, "rope_theta": 10000.0}}, "longrope"),
    ("mamba", {}, "has not been verified"),
], ids=["phi3-longrope", "unknown-type"])
def test_unsupported_features_of_supported_types_are_refused_by_name(arch, overrides, feature):
    with pytest.raises(ModelError, match=feature):
        capability(_config(arch, **overrides))


def test_a_refused_model_is_refused_before_its_weights_load(tmp_path):
    from typer.testing import CliRunner

    from kvcompile.cli import app

    model = make_tiny_model(tmp_path / "gptj", arch="gptj")
    corpus = tmp_path / "c"
    corpus.mkdir()
    (corpus / "a.txt").write_text("Some text.")
    result = CliRunner().invoke(app, ["build", str(corpus), "-o", str(tmp_path / "o.kvpack"), "--model", str(model),
                                      "--device", "cpu", "--quiet"])
    assert result.exit_code == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "model type 'gptj' is not supported: its rotary module and rotation" in lines[0]


def test_models_command_lists_and_checks(tmp_path):
    from typer.testing import CliRunner

    from kvcompile.cli import app

    runner = CliRunner()
    listing = runner.invoke(app, ["models", "--json"])
    assert listing.exit_code == 0, listing.output
    rows = {r["model_type"]: r["status"] for r in __import__("json").loads(listing.stdout)}
    assert {t for t, s in rows.items() if s == "supported"} == SUPPORTED
    assert rows["bloom"] == REFUSED["bloom"]
    model = make_tiny_model(tmp_path / "m", arch="mistral", sliding_window=WINDOW)
    checked = runner.invoke(app, ["models", str(model)])
    assert checked.exit_code == 0, checked.output
    assert "model type mistral, supported (RoPE default, sliding window [48] on 2 of 2 layers)" in checked.stdout
    refused = runner.invoke(app, ["models", str(make_tiny_model(tmp_path / "g", arch="gptj"))])
    assert refused.exit_code == 2 and "model type 'gptj' is not supported" in refused.stderr


@pytest.mark.parametrize("arch, overrides", [pytest.param(a, o, id=i) for i, a, o in EXACT])
def test_keys_are_placed_with_the_models_own_rope(arch, overrides, tmp_path):
    """Ratio 1.0 at unchanged positions cannot catch a wrong RoPE convention (a wrong undo and
    a wrong redo cancel out); keys moved to other positions (independent segments, compacted
    positions) can. So compare with the model's own ``apply_rotary_pos_emb`` directly."""
    import importlib

    from kvcompile.rope import apply_rope, rotaries

    lm = load_model(str(make_tiny_model(tmp_path / arch, arch=arch, **overrides)), device="cpu", progress=False)
    name = MODELING.get(arch, arch)
    modeling = importlib.import_module(f"transformers.models.{name}.modeling_{name}")
    heads, tokens, dim = 2, 7, 16  # make_tiny_model's head_dim
    k = torch.randn(1, heads, tokens, dim)
    positions = torch.tensor([0, 3, 4, 100, 517, 1000, 2047])
    per_layer = rotaries(lm.model)
    assert len(per_layer) == lm.config.num_hidden_layers
    if getattr(lm.config, "no_rope_layers", None):  # those layers' keys are stored and placed as they are
        assert [r is None for r in per_layer] == [not use for use in lm.config.no_rope_layers]
        assert any(r is None for r in per_layer) == (arch == "smollm3" and lm.config.num_hidden_layers >= 4)
    if arch == "gemma3_text":  # local and global layers, each with its own RoPE
        assert [r.layer_type for r in per_layer] == lm.config.layer_types
        assert len({r.layer_type for r in per_layer}) == 2
    for rotary in {id(r): r for r in per_layer if r is not None}.values():
        # the model's own cos/sin, called as the model calls its rotary module
        cos, sin = rotary.module(k, positions[None], *([rotary.layer_type] if rotary.layer_type else []))
        d = dim if rotary.half_width else cos.shape[-1]  # partial rotary: the model rotates the leading channels
        _, theirs = modeling.apply_rotary_pos_emb(k[..., :d], k[..., :d], cos, sin)
        theirs = torch.cat([theirs, k[..., d:]], dim=-1)
        ours = torch.stack([rotary.apply(k[0, h], positions) for h in range(heads)])[None]
        assert torch.allclose(ours, theirs, atol=1e-5), rotary.layer_type
        assert torch.allclose(rotary.undo(ours[0, 0], positions), k[0, 0], atol=1e-5)
        # what the attention kernel over integer codes rotates with (inv_freq and scaling)
        frequencies = rotary.frequencies(positions)
        assert (frequencies is None) == rotary.interleaved, arch
        if frequencies is not None:
            inv_freq, scaling = frequencies
            angles = positions.float()[:, None] * inv_freq[None, :]
            angles = torch.cat([angles, angles], dim=-1)
            mine = apply_rope(k[0], angles.cos() * scaling, angles.sin() * scaling)
            assert torch.allclose(mine[None], theirs, atol=1e-5), rotary.layer_type


def test_window_layers_load_only_the_rows_a_question_can_see(tiny_corpus, tmp_path):
    lm = load_model(str(make_tiny_model(tmp_path / "m", arch="qwen2", use_sliding_window=True, sliding_window=WINDOW,
                                        max_window_layers=1)), device="cpu", progress=False)
    path = tmp_path / "w.kvpack"
    build([tiny_corpus], path, lm, load_recipe("qa"), BuildOptions(ratio=1.0, chunk_size=64, codec="fp32"))
    pack = kvcompile.load(path)
    placed = pack.place(lm)
    stored = [pack.layer(li).rows for li in range(2)]
    assert placed[0].rows == stored[0]  # layer 0: full attention
    heads = len(pack.kept[1])
    assert placed[1].rows == heads * (WINDOW - 1)  # layer 1: the last window - 1 positions of each head
    assert int(placed[1].positions.min()) == pack.question_position - WINDOW + 1


QUANTISED = ["llama-llama3", "mistral-window", "gemma3_text-local-global-rope", "smollm3-no-rope-layer",
             "gpt_neox-partial-rotary", "gpt2-absolute-positions", "cohere-interleaved-rope"]


@pytest.mark.parametrize("arch, overrides", [pytest.param(a, o, id=i) for i, a, o in EXACT if i in QUANTISED])
def test_int8_keys_are_placed_as_float_keys_on_every_kind_of_position(arch, overrides, tiny_corpus, tmp_path):
    """Quantised keys are stored before RoPE and rotated when decoded, whatever the model's
    rotary (scaled, partial, interleaved, per layer type, none) or window: every token kept,
    each layer's decoded, placed keys are the float pack's up to int8's error."""
    lm = load_model(str(make_tiny_model(tmp_path / arch, arch=arch, **overrides)), device="cpu", progress=False)
    placed = {}
    for quant in ("none", "int8"):
        path = tmp_path / f"{quant}.kvpack"
        build([tiny_corpus], path, lm, load_recipe("qa"), BuildOptions(ratio=1.0, chunk_size=64, codec="fp32",
                                                                      quant=quant, quant_group=8))
        pack = kvcompile.load(path)
        placed[quant] = [layer.materialise() for layer in pack.place(lm)]
        logits = pack.session(lm).first_token_logits(QUESTION)
        assert torch.isfinite(logits).all()
    for ref, got in zip(placed["none"], placed["int8"]):
        assert torch.equal(ref.positions, got.positions)
        for a, b in ((ref.keys, got.keys), (ref.values, got.values)):
            assert (b - a).norm() <= 0.01 * a.norm()
