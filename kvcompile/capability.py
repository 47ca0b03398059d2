"""Which models kvcompile serves exactly, and how: one decision, made from the config at load.

A pack stores keys before RoPE and attends with its own attention function. That is
exact only when kvcompile knows where the model keeps its rotary embedding, which RoPE
convention it uses, and every attention feature its layers pass to the attention
function. A model outside that knowledge must be refused by name rather than answered
wrongly: its users cannot see what was compressed, so a wrong answer that looks right is
the worst outcome.

:func:`capability` reads a transformers config and returns a :class:`Capability`
describing the model, or raises ``ModelError`` naming the model type and the feature.
Model types are allowed only after the architecture matrix (tests/test_architectures.py)
has checked them exact; docs/models.md lists them.
"""

from __future__ import annotations

from dataclasses import dataclass

from .errors import ModelError, OptionError

# Verified exact at ratio 1.0 in tests/test_architectures.py. All keep their rotary module at
# ``model.model.rotary_emb`` (one RoPE per layer type for Gemma-3; none on SmolLM3's
# ``no_rope_layers``: kvcompile.rope.rotaries), rotate with ``rotate_half`` or a convention
# named in kvcompile/rope.py, and pass any window, softcap or sinks to the attention function,
# which honours them (kvcompile/attention.py).
SUPPORTED = frozenset({
    "llama", "mistral", "mixtral", "qwen2", "qwen2_moe", "qwen3", "qwen3_moe", "gemma", "gemma2", "phi", "phi3",
    "olmo", "olmo2", "granite", "stablelm", "starcoder2", "smollm3", "cohere",
    "gpt_oss", "gemma3_text", "gpt_neox", "gpt2", "opt",
})

# RoPE conventions other than Llama's rotate_half (kvcompile/rope.py implements each).
ROPE_LAYOUTS = {
    "cohere": "pairs",  # adjacent channels paired; cos/sin repeated per pair
    "gpt_oss": "half-width",  # cos/sin written once for both halves
}
# Types whose attention adds per-head sink logits (``s_aux``) to the softmax.
SINKS = frozenset({"gpt_oss"})

# Types whose attention has one KV head per query head, whatever else the config holds.
WITHOUT_GQA = frozenset({"gpt_neox", "gpt2", "opt"})
# Types that add learned absolute position embeddings to the input: a token's KV depends on
# its absolute position, so keys cannot be moved, and only `chained` compilation is exact.
ABSOLUTE_POSITIONS = frozenset({"gpt2", "opt"})

# Refused on purpose, with the reason a user is shown.
REFUSED = {
    "cohere2": "its full-attention layers use no RoPE and its sliding layers do",
    "gemma3": "it is the multimodal Gemma-3; use its text model (gemma3_text)",
    "gptj": "its rotary module and rotation (GPT-J style) have not been verified with kvcompile",
    "falcon": "its ALiBi and fused multi-query variants have not been verified with kvcompile",
    "bloom": "it uses ALiBi position biases, not RoPE",
    "deepseek_v2": "it uses multi-head latent attention (one latent per token, not per-head keys and values)",
    "deepseek_v3": "it uses multi-head latent attention (one latent per token, not per-head keys and values)",
}


@dataclass(frozen=True)
class Capability:
    """How kvcompile serves one model exactly.

    windows: per layer, the sliding window in tokens, or None for full attention.
    softcap: the attention logit softcap, or None.
    """

    model_type: str
    num_layers: int
    num_kv_heads: int
    head_dim: int
    rope_type: str
    windows: tuple[int | None, ...]
    softcap: float | None
    absolute_positions: bool = False
    rope_layout: str = "halves"  # "halves" (Llama), "pairs" (Cohere) or "half-width" (gpt-oss)
    sinks: bool = False

    @property
    def needs_eager(self) -> bool:
        """The model's own SDPA path cannot honour its softcap or sinks (the full-prompt path)."""
        return self.softcap is not None or self.sinks

    @property
    def has_windows(self) -> bool:
        return any(w is not None for w in self.windows)

    def check_plain_attention(self, option: str) -> None:
        """Refuse ``option`` (an attention of its own: sparse decode, APE) for models whose
        attention has sliding windows, a softcap or sinks, which it does not implement."""
        if self.has_windows or self.softcap is not None or self.sinks:
            raise OptionError(f"{option} does not support model type '{self.model_type}' (sliding windows, softcap "
                              f"or sinks): leave it out")

    def check_context(self, context: str) -> None:
        """Refuse ``independent`` compilation for models with absolute positions, by name."""
        if context == "independent" and self.absolute_positions:
            raise OptionError(f"--context independent is not exact for model type '{self.model_type}': it adds "
                              "absolute position embeddings, so a document's KV depends on where it was compiled. "
                              "Use --context chained")


def _rope_type(config) -> str:
    params = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    if isinstance(params, dict) and any(isinstance(v, dict) for v in params.values()):
        types = {v.get("rope_type", v.get("type", "default")) for v in params.values() if isinstance(v, dict)}
        if len(types) > 1:
            return "per-layer(" + ",".join(sorted(types)) + ")"
        return types.pop()
    return params.get("rope_type", params.get("type", "default")) if isinstance(params, dict) else "default"


def _windows(config, layers: int) -> tuple[int | None, ...]:
    window = getattr(config, "sliding_window", None)
    if not window:
        return (None,) * layers
    types = getattr(config, "layer_types", None)
    if types:
        return tuple(window if t == "sliding_attention" else None for t in types)
    if getattr(config, "use_sliding_window", True) is False:
        return (None,) * layers
    return (window,) * layers  # Mistral, Phi-3, StarCoder2: one window for every layer


def capability(config) -> Capability:
    """What kvcompile knows about the model of ``config``; ``ModelError`` (one line, naming
    the model type and the feature) when it cannot serve it exactly."""
    model_type = getattr(config, "model_type", None) or type(config).__name__

    def refuse(why: str):
        raise ModelError(f"model type '{model_type}' is not supported: {why}. "
                         "Supported types are listed by `kvcompile models` (docs/models.md)")

    if model_type in REFUSED:
        refuse(REFUSED[model_type])
    if model_type not in SUPPORTED:
        refuse("its attention has not been verified with kvcompile")
    if getattr(config, "kv_lora_rank", None):
        refuse(REFUSED["deepseek_v3"].removeprefix("it "))
    rope_type = _rope_type(config)
    if rope_type == "longrope":
        refuse("longrope chooses its RoPE factors from the length of each call, so keys placed at load "
               "differ from the full prompt's")
    layers = config.num_hidden_layers
    return Capability(
        model_type=model_type,
        num_layers=layers,
        num_kv_heads=(config.num_attention_heads if model_type in WITHOUT_GQA
                      else getattr(config, "num_key_value_heads", None) or config.num_attention_heads),
        head_dim=getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads,
        rope_type="none" if model_type in ABSOLUTE_POSITIONS else rope_type,
        windows=_windows(config, layers),
        softcap=getattr(config, "attn_logit_softcapping", None),
        absolute_positions=model_type in ABSOLUTE_POSITIONS,
        rope_layout=ROPE_LAYOUTS.get(model_type, "halves"),
        sinks=model_type in SINKS,
    )


def support_table() -> list[tuple[str, str]]:
    """``(model type, "supported" or the reason it is refused)``, sorted by type."""
    rows = [(t, "supported") for t in SUPPORTED] + list(REFUSED.items())
    return sorted(rows)
