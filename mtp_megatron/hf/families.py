"""The Hugging Face model families whose decoders are twins of our trunk, and how to tell which.

Our trunk is one architecture with two switches that matter here: ``norm_placement`` and
``qk_norm`` (per head). Three transformers classes compute exactly the same function on the same
weights (checked with transformers 5.24, fp32, within RoPE rounding):

- ``exaone4``: post-norm (OLMo-2's reordered ``x + norm(f(x))``), per-head QK-norm, with every
  layer full attention and no sliding window: the default trunk's twin;
- ``qwen3``: pre-norm, per-head QK-norm;
- ``llama``: pre-norm, no QK-norm.

OLMo-2 (QK-norm over the whole projection) and Qwen2 (q/k/v biases) are not twins yet.
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
        ),
        Family(
            "qwen3", "Qwen3ForCausalLM", "pre", True, "input_layernorm", "post_attention_layernorm"
        ),
        Family(
            "llama", "LlamaForCausalLM", "pre", False, "input_layernorm", "post_attention_layernorm"
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
    for family in FAMILIES.values():
        if (family.norm_placement, family.qk_norm) == (cfg.norm_placement, cfg.qk_norm):
            return family
    raise ConfigError(
        f"model.norm_placement={cfg.norm_placement!r} with model.qk_norm={cfg.qk_norm} has no "
        "Hugging Face twin (post-norm needs QK-norm: Exaone4); families: "
        + ", ".join(
            f"{f.model_type} ({f.norm_placement}-norm, qk_norm={f.qk_norm})"
            for f in FAMILIES.values()
        )
    )
