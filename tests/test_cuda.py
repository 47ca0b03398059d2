"""Build and query on CUDA behave as on CPU, and packs move between the two.

Runs only where a GPU is (``bench/gpu.sh`` runs it on the lent GPU machine); CI has
none and skips the module. The tokenizer comes from ``KVCOMPILE_TEST_TOKENIZER`` (a
saved tokenizer directory) when set, else from the embedded default model.
"""

from __future__ import annotations

import os

import pytest
import torch

import kvcompile
from kvcompile.attention import uses_kernel
from kvcompile.builder import BuildOptions
from kvcompile.models import load_model, make_tiny_model
from kvcompile.pipeline import build
from kvcompile.recipe import load_recipe

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

QUESTIONS = ["How long is the password reset link valid?", "Where do orders ship from?"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    tokenizer = os.environ.get("KVCOMPILE_TEST_TOKENIZER")
    return make_tiny_model(tmp_path_factory.mktemp("cuda") / "llama", vocab_from=tokenizer)


@pytest.fixture(scope="module")
def cpu_lm(model_dir):
    return load_model(str(model_dir), device="cpu", dtype="float32", progress=False)


@pytest.fixture(scope="module")
def cuda_lm(model_dir):
    return load_model(str(model_dir), device="cuda", dtype="float32", progress=False)


def _logits(pack_path, lm) -> torch.Tensor:
    session = kvcompile.load(pack_path).session(lm)
    return torch.stack([session.first_token_logits(q).cpu() for q in QUESTIONS])


def test_the_kernel_is_used_on_cuda():
    assert uses_kernel(torch.device("cuda"))


def test_ratio_one_is_exact_on_cuda(cuda_lm, tiny_corpus, tmp_path):
    path = tmp_path / "full.kvpack"
    build([tiny_corpus], path, cuda_lm, load_recipe("qa"), BuildOptions(ratio=1.0, chunk_size=64, codec="fp32"))
    session = kvcompile.load(path).session(cuda_lm)
    tok = cuda_lm.tokenizer
    from kvcompile.corpus import read_corpus
    from kvcompile.framing import document_text

    docs, _ = read_corpus([tiny_corpus])
    context = list(session.framing.prefix_ids)
    for d in docs:
        context += tok(document_text(d.path, d.text), add_special_tokens=False)["input_ids"]
    for q in QUESTIONS:
        ids = torch.tensor([context + session.question_ids(q)], device="cuda")
        with torch.no_grad():
            full = cuda_lm.model(ids, logits_to_keep=1).logits[0, -1].float()
        # Triton's fp32 dots run in TF32 on Hopper: about 1e-3 relative.
        torch.testing.assert_close(session.first_token_logits(q), full, atol=2e-2, rtol=2e-2)
    assert cuda_lm.model.config._attn_implementation == "sdpa"


def test_packs_move_between_cpu_and_cuda(cpu_lm, cuda_lm, tiny_corpus, tmp_path):
    options = BuildOptions(ratio=0.5, chunk_size=64)
    on_cpu, on_cuda = tmp_path / "cpu.kvpack", tmp_path / "cuda.kvpack"
    build([tiny_corpus], on_cpu, cpu_lm, load_recipe("qa"), options)
    build([tiny_corpus], on_cuda, cuda_lm, load_recipe("qa"), options)
    a, b = kvcompile.load(on_cpu), kvcompile.load(on_cuda)
    # The layer's budget is exact on both devices; which tokens win may differ by float noise.
    assert [sum(k) for k in a.kept] == [sum(k) for k in b.kept]
    for path in (on_cpu, on_cuda):
        torch.testing.assert_close(_logits(path, cuda_lm), _logits(path, cpu_lm), atol=2e-2, rtol=2e-2)


def test_decode_steps_on_cuda_match_cpu(cpu_lm, cuda_lm, tiny_corpus, tmp_path):
    # Teacher-forced decode over a compressed pack: the kernel's single-query path (split
    # over the prefix) against the CPU reference, step by step.
    from kvcompile.attention import pack_attention
    from kvcompile.cache import forward

    path = tmp_path / "p.kvpack"
    build([tiny_corpus], path, cpu_lm, load_recipe("qa"), BuildOptions(ratio=0.25, chunk_size=64))
    steps = []
    for lm in (cpu_lm, cuda_lm):
        session = kvcompile.load(path).session(lm)
        ids = session.question_ids(QUESTIONS[0])
        tokens = [ids] + [[t] for t in range(100, 108)]
        out = []
        with pack_attention(lm.model), torch.no_grad():
            cache = session.cache()
            for x in tokens:
                logits = forward(lm.model, torch.tensor([x], device=lm.device), cache, logits_to_keep=1).logits
                out.append(logits[0, -1].float().cpu())
        steps.append(torch.stack(out))
    torch.testing.assert_close(steps[1], steps[0], atol=2e-2, rtol=2e-2)


def test_a_build_in_bf16_on_cuda_answers(model_dir, tiny_corpus, tmp_path):
    lm = load_model(str(model_dir), device="cuda", dtype="bfloat16", progress=False)
    path = tmp_path / "bf16.kvpack"
    build([tiny_corpus], path, lm, load_recipe("qa"), BuildOptions(ratio=0.25, chunk_size=128))
    answer = kvcompile.load(path).session(lm).ask(QUESTIONS[1], max_new_tokens=4)
    assert answer.tokens >= 0 and torch.isfinite(torch.tensor(answer.timings["ttft"]))


def test_keys_are_placed_by_the_rope_kernel_as_on_cpu(cuda_lm, cpu_lm):
    from kvcompile.rope import _kernel, rotaries

    assert _kernel() is not None
    g = torch.Generator().manual_seed(0)
    head_dim = cpu_lm.config.hidden_size // cpu_lm.config.num_attention_heads
    x = torch.randn(300, head_dim, generator=g)
    positions = torch.randint(0, 4000, (300,), generator=g)
    on_cpu = rotaries(cpu_lm.model)[0].apply(x, positions)
    on_cuda = rotaries(cuda_lm.model)[0].apply(x.cuda(), positions.cuda()).cpu()
    torch.testing.assert_close(on_cuda, on_cpu, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("quant", ["int4", "int3", "rvq"])
def test_a_quantised_pack_answers_on_cuda_as_on_cpu(cpu_lm, cuda_lm, tiny_corpus, tmp_path, quant):
    """The same pack, loaded on each device: CUDA keeps it encoded and attends over the integer
    codes directly (quant_attention) or decodes RVQ with its kernel, the CPU with the codecs'
    references."""
    path = tmp_path / f"{quant}.kvpack"
    build([tiny_corpus], path, cpu_lm, load_recipe("qa"),
          BuildOptions(ratio=0.5, chunk_size=64, quant=quant, quant_group=8, quant_outliers=0.1))
    from kvcompile.encoded import EncodedKV

    session = kvcompile.load(path).session(cuda_lm)
    assert all(isinstance(layer, EncodedKV) and layer.device.type == "cuda" for layer in session.kv)
    assert all(layer.attends_encoded == (quant != "rvq") for layer in session.kv)
    torch.testing.assert_close(_logits(path, cuda_lm), _logits(path, cpu_lm), atol=2e-2, rtol=2e-2)
