"""Shared fixtures: a stable model cache, the default model, and a tiny random model."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session", autouse=True)
def kvcompile_cache() -> Path:
    """Point KVCOMPILE_CACHE at a directory that outlives the test run, so GGUF conversions are reused."""
    path = Path(os.environ.get("KVCOMPILE_CACHE") or REPO / ".kvcompile-cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("KVCOMPILE_CACHE", str(path))
        yield path


@pytest.fixture(scope="session")
def default_model(kvcompile_cache):
    """The embedded default model (SmolLM2-135M-Instruct) on CPU, loaded once per session."""
    from kvcompile.models import load_model

    return load_model(device="cpu", progress=False)


@pytest.fixture(scope="session")
def tiny_model_dir(kvcompile_cache, tmp_path_factory) -> Path:
    """A 2-layer randomly initialised Llama with the default model's tokenizer."""
    from kvcompile.models import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("tiny") / "llama")
