"""The Hugging Face model families whose decoders are twins of our trunk, and how to tell which.

Our trunk is one architecture with four switches that matter here: ``norm_placement``,
``qk_norm``, its width ``qk_norm_scope`` and ``qkv_bias``. Five transformers classes compute
exactly the same function on the same weights (tested against transformers 5.24, fp32):

- ``exaone4``: post-norm (OLMo-2's reordered ``x + norm(f(x))``), per-head QK-norm, with every
  layer full attention and no sliding window: the default trunk's twin;
- ``qwen3``: pre-norm, per-head QK-norm;
- ``llama``: pre-norm, no QK-norm;
- ``qwen2``: pre-norm, no QK-norm, biases on q / k / v (``qkv_bias``);
- ``olmo2``: post-norm with QK-norm over the whole q and k projections (``qk_norm_scope:
  full``), not per head.
"""

from __future__ import annotations

from dataclasses import dataclass

from mtp_megatron.config import ConfigError, ModelConfig


@dataclass(frozen=True)
class Family:
    """One transformers model type and the names of its decoder-layer norms."""

    model_type: str
    """``config.json``'s ``model_type``."""
    architecture: str
    """The ``*ForCausalLM`` class ``from_pretrained`` builds."""
    norm_placement: str
    qk_norm: bool
    attention_norm: str
    """The HF norm that is our attention block's norm (before it for pre-norm, after it for
    post-norm)."""
    mlp_norm: str
    """The HF norm that is our SwiGLU block's norm."""
    qkv_bias: bool = False
    """Biases on q / k / v (Qwen2)."""
    qk_norm_scope: str = "head"
    """The QK-norm's width: per head, or the whole projection (OLMo-2)."""
    default_eps: float = 1e-6
    """transformers' ``rms_norm_eps`` when a config.json leaves it out."""


FAMILIES = {
    f.model_type: f
    for f in (
        Family(
            "exaone4",
            "Exaone4ForCausalLM",
            "post",
            True,
            "post_attention_layernorm",
            "post_feedforward_layernorm",
            default_eps=1e-5,
        ),
        Family(
            "qwen3", "Qwen3ForCausalLM", "pre", True, "input_layernorm", "post_attention_layernorm"
        ),
        Family(
            "llama", "LlamaForCausalLM", "pre", False, "input_layernorm", "post_attention_layernorm"
        ),
        Family(
            "olmo2",
            "Olmo2ForCausalLM",
            "post",
            True,
            "post_attention_layernorm",
            "post_feedforward_layernorm",
            qk_norm_scope="full",
            default_eps=1e-5,
        ),
        Family(
            "qwen2",
            "Qwen2ForCausalLM",
            "pre",
            False,
            "input_layernorm",
            "post_attention_layernorm",
            qkv_bias=True,
        ),
    )
}


def family_of(cfg: ModelConfig) -> Family:
    """The family whose model computes what ``cfg``'s trunk computes, or a ConfigError."""
    if cfg.etd is not None:
        raise ConfigError(
            "model.etd: an Encode-Think-Decode trunk (iterated layers, LoRA experts) has no "
            "Hugging Face twin; export the plain trunk only"
        )
    scope = cfg.qk_norm_scope if cfg.qk_norm else "head"
    ours = (cfg.norm_placement, cfg.qk_norm, cfg.qkv_bias, scope)
    for f in FAMILIES.values():
        if (f.norm_placement, f.qk_norm, f.qkv_bias, f.qk_norm_scope) == ours:
            return f
    raise ConfigError(
        f"model.norm_placement={cfg.norm_placement!r} with model.qk_norm={cfg.qk_norm} and "
        f"model.qkv_bias={cfg.qkv_bias} (qk_norm_scope {scope!r}) has no Hugging Face twin; "
        "families: "
        + ", ".join(
            f"{f.model_type} ({f.norm_placement}-norm, qk_norm={f.qk_norm} over "
            f"{f.qk_norm_scope}, qkv_bias={f.qkv_bias})"
            for f in FAMILIES.values()
        )
    )
