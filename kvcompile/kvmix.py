"""KVmix's layer importance: key and value bits per layer from gradient norms (methods.md, section 5).

Profiling runs the model forward and backward on a few prompts with the language-model
loss, and takes the L2 norm of the gradient of each layer's ``k_proj`` and ``v_proj``
weight, averaged over prompts. Layers whose keys (values) matter most to the loss get
more bits: the top ``top`` share of layers by key norm get ``high_bits[0]`` key bits,
by value norm ``high_bits[1]`` value bits; the rest ``low_bits``.

The prompts come from the corpus (chunks spread evenly over its token stream, each
followed by the recipe's task prompt), so the profile is deterministic for a corpus,
recipe and model; it is cached under the cache directory by a hash of all three.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass

import torch

from .errors import OptionError
from .models import LoadedModel, cache_dir

DEFAULTS = {"prompts": 8, "prompt_tokens": 512, "top": 0.2, "high_key_bits": 3, "high_value_bits": 4, "low_bits": 2,
            "outliers": 0.1}


@dataclass(frozen=True)
class Profile:
    """Mean gradient norms of each layer's ``k_proj`` and ``v_proj`` weight."""

    keys: tuple[float, ...]
    values: tuple[float, ...]

    def bits(self, top: float = 0.2, high: tuple[int, int] = (3, 4), low: int = 2) -> list[tuple[int, int]]:
        """``(key bits, value bits)`` per layer: ``high`` for the top ``top`` share by norm."""
        layers = len(self.keys)
        n_top = max(1, math.ceil(top * layers)) if top > 0 else 0

        def ranked(norms):  # stable: ties go to the earlier layer
            return set(sorted(range(layers), key=lambda i: (-norms[i], i))[:n_top])

        top_k, top_v = ranked(self.keys), ranked(self.values)
        return [(high[0] if i in top_k else low, high[1] if i in top_v else low) for i in range(layers)]


def projections(model: torch.nn.Module) -> list[tuple[torch.nn.Linear, torch.nn.Linear]]:
    """Each decoder layer's ``(k_proj, v_proj)``; OptionError for models that fuse them."""
    layers = getattr(getattr(model, "base_model", model), "layers", None)
    out = []
    for layer in layers or []:
        attn = getattr(layer, "self_attn", None)
        k, v = getattr(attn, "k_proj", None), getattr(attn, "v_proj", None)
        if not isinstance(k, torch.nn.Linear) or not isinstance(v, torch.nn.Linear):
            break
        out.append((k, v))
    if not out or len(out) != model.config.num_hidden_layers:
        raise OptionError(f"--quant kvmix needs separate k_proj and v_proj layers, which "
                          f"{type(model).__name__} does not have: use --quant int4 or int2")
    return out


def prompts(stream: list[int], task_ids: list[int], n: int, tokens: int) -> list[list[int]]:
    """``n`` chunks of ``tokens`` spread evenly over ``stream``, each followed by ``task_ids``."""
    body = max(16, tokens - len(task_ids))
    if len(stream) <= body:
        return [stream + task_ids]
    starts = sorted({round(i * (len(stream) - body) / max(1, n - 1)) for i in range(n)})
    return [stream[s : s + body] + task_ids for s in starts]


def layer_bits(tk, lm: LoadedModel) -> list[tuple[int, int]]:
    """The ``(key bits, value bits)`` of each layer for ``build --quant kvmix``: the profile of
    prompts from the corpus ``tk`` (a :class:`~kvcompile.builder.Tokenized`) and its task
    prompt, allocated with the defaults of :data:`DEFAULTS`."""
    p = DEFAULTS
    stream = tk.stream()[len(tk.prefix_ids):]
    ids = prompts(stream, tk.probe_ids, p["prompts"], p["prompt_tokens"])
    return profile(lm, ids).bits(p["top"], (p["high_key_bits"], p["high_value_bits"]), p["low_bits"])


def recorded_bits(header: dict) -> list[tuple[int, int]] | None:
    """The bits per layer a kvmix pack's header records, or None for any other pack."""
    if header["options"].get("quant", {}).get("name") != "kvmix":
        return None
    try:
        return [(int(e["keys"]["bits"]), int(e["values"]["bits"])) for e in header["cache"]["layers"]]
    except (KeyError, TypeError, ValueError):
        return None


def profile(lm: LoadedModel, prompt_ids: list[list[int]]) -> Profile:
    """Mean ``k_proj``/``v_proj`` weight-gradient norms over ``prompt_ids`` (cached)."""
    key = hashlib.sha256(json.dumps([lm.fingerprint, prompt_ids]).encode()).hexdigest()
    path = cache_dir() / "kvmix" / f"{key}.json"
    if path.exists():
        try:
            data = json.loads(path.read_text())
            return Profile(tuple(data["keys"]), tuple(data["values"]))
        except (OSError, ValueError, KeyError):
            pass  # recompute a damaged entry
    pairs = projections(lm.model)
    weights = [p.weight for pair in pairs for p in pair]
    was = [w.requires_grad for w in weights]
    keys, values = [0.0] * len(pairs), [0.0] * len(pairs)
    try:
        for w in weights:
            w.requires_grad_(True)
            w.grad = None
        with torch.enable_grad():
            for ids in prompt_ids:
                x = torch.tensor([ids], device=lm.device)
                loss = lm.model(x, labels=x).loss
                loss.backward()
                for i, (k, v) in enumerate(pairs):
                    keys[i] += float(k.weight.grad.float().norm()) / len(prompt_ids)
                    values[i] += float(v.weight.grad.float().norm()) / len(prompt_ids)
                    k.weight.grad = v.weight.grad = None
    finally:
        for w, r in zip(weights, was):
            w.requires_grad_(r)
            w.grad = None
    result = Profile(tuple(keys), tuple(values))
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"model": lm.name, "keys": keys, "values": values}))
    except OSError:
        pass  # a cache that cannot be written costs a profile next time
    return result
