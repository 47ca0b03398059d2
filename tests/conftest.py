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


# ----------------------------------------------------------------------------- small packs
# Shared by test_container.py, test_pack_format.py, test_build_safety.py and test_cli.py.

TINY_CORPUS = {
    "billing.txt": "Invoices are issued on the first day of each month. Payment is due within 30 days. "
    "Late payments incur a fee of 2 percent per month.",
    "password.txt": "To reset your password, open Settings, choose Security and click Reset password. "
    "A link valid for 24 hours is sent to your email address.",
    "shipping.txt": "Orders ship from the warehouse in Rotterdam within two business days. "
    "Express delivery to Germany takes one day; standard delivery takes three to five days.",
    "history.txt": "The company was founded in 1998 by Ada Moreau and Jonas Lind in Lyon. "
    "It moved its headquarters to Amsterdam in 2011 and employs 420 people today.",
    "support.txt": "Support is open Monday to Friday from 9:00 to 17:00 CET. "
    "Premium customers can call the hotline at any time; tickets are answered within four hours.",
}


@pytest.fixture(scope="session")
def tiny_lm(tiny_model_dir):
    """The tiny random model of ``tiny_model_dir``, loaded once on CPU."""
    from kvcompile.models import load_model

    return load_model(str(tiny_model_dir), device="cpu", progress=False)


@pytest.fixture(scope="session")
def tiny_corpus(tmp_path_factory) -> Path:
    """A folder of five short .txt documents (about 580 cache tokens with the framing)."""
    root = tmp_path_factory.mktemp("corpus")
    for name, text in TINY_CORPUS.items():
        (root / name).write_text((text + " ") * 3, encoding="utf-8")
    return root


@pytest.fixture(scope="session")
def tiny_pack(tiny_lm, tiny_corpus, tmp_path_factory) -> Path:
    """A pack of ``tiny_corpus`` built once with the tiny model (ratio 0.5, chunks of 64). Do not modify it."""
    import torch

    from kvcompile.builder import BuildOptions
    from kvcompile.pipeline import build
    from kvcompile.recipe import load_recipe

    path = tmp_path_factory.mktemp("pack") / "tiny.kvpack"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # see torch_single_thread
    try:
        build([tiny_corpus], path, tiny_lm, load_recipe("qa"), BuildOptions(ratio=0.5, chunk_size=64))
    finally:
        torch.set_num_threads(threads)
    return path


@pytest.fixture(scope="module")
def torch_single_thread():
    """Run a module's tiny-model work on one torch thread (restored afterwards).

    On a small, busy machine torch's default of one thread per core makes the tiny
    model's many small ops 5-10x slower than a single thread (threads spin-wait for
    each other); use with ``pytestmark = pytest.mark.usefixtures("torch_single_thread")``.
    """
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def rewrite_pack():
    """``rewrite_pack(src, dst, edit=None, checksums=True)``: rewrite a pack with a valid header hash.

    ``edit(header, tensors)`` may change the parsed kvpack header and the dict of tensors in
    place; the checksums and ``payload_bytes`` are recomputed unless ``checksums`` is False, and the header's
    ``kvpack_sha256`` always matches, so only the edit itself can make the result invalid.
    """
    import hashlib
    import json

    from kvcompile.container import Container, tensor_bytes, write_container

    def rewrite(src, dst, edit=None, checksums=True) -> Path:
        c = Container(src)
        tensors = {name: c.read(name) for name in c.entries}
        header = json.loads(c.metadata["kvpack"])
        if edit is not None:
            edit(header, tensors)
        if checksums:  # what anyone can repair after an edit: tensor hashes and sizes
            header["checksums"] = {n: hashlib.sha256(tensor_bytes(t)).hexdigest() for n, t in sorted(tensors.items())}
            try:  # by the roles the header gives its tensors (an edit may have broken them: then as is)
                roles = {n: part for entry in header["cache"]["layers"] for part in ("keys", "values")
                         for n in entry[part]["tensors"].values()}
                roles.update({header["cache"]["positions"]: "positions", header["corpus"]["manifest"]: "manifest"})
                parts = ["keys", "values", "positions", "manifest"]
                if "index" in header["corpus"]:
                    roles[header["corpus"]["index"]["tensor"]] = "index"
                    parts.append("index")
                header["payload_bytes"] = {
                    part: sum(t.numel() * t.element_size() for n, t in tensors.items() if roles.get(n) == part)
                    for part in parts}
            except (KeyError, TypeError, AttributeError):
                pass
        text = json.dumps(header, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
        metadata = {"kvpack": text, "kvpack_sha256": hashlib.sha256(text.encode()).hexdigest()}
        with open(dst, "wb") as f:
            write_container(f, tensors, metadata)
        return Path(dst)

    return rewrite


def set_field(path: list, value):
    """An edit for ``rewrite_pack`` that sets ``header[path[0]][path[1]]... = value``."""

    def edit(header, tensors):
        node = header
        for k in path[:-1]:
            node = node[k]
        node[path[-1]] = value

    return edit
