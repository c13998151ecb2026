"""Our TP=1 master state dict <-> a Hugging Face twin's (``families.py``), trunk weights only.

Notation: V vocabulary, V' padded vocabulary (a multiple of ``vocab_pad_multiple``), h hidden,
f SwiGLU width. Our fused ``gate_up`` [2f, h] is HF's ``gate_proj`` [f, h] over ``up_proj``;
our embedding and output layer hold V' rows, HF's V (the padding rows are dropped on export and
zero on import). Every other tensor keeps its name's shape and values: a round trip is bitwise.
"""

from __future__ import annotations

from typing import Any

import torch

from mtp_megatron.config import ConfigError, ModelConfig
from mtp_megatron.hf.families import Family

_SAME = {  # ours (under trunk.layers.{i}.) -> HF (under model.layers.{i}.)
    "attention.inner.q_proj.weight": "self_attn.q_proj.weight",
    "attention.inner.k_proj.weight": "self_attn.k_proj.weight",
    "attention.inner.v_proj.weight": "self_attn.v_proj.weight",
    "attention.inner.o_proj.weight": "self_attn.o_proj.weight",
    "attention.inner.q_norm.weight": "self_attn.q_norm.weight",
    "attention.inner.k_norm.weight": "self_attn.k_norm.weight",
    "mlp.inner.down.weight": "mlp.down_proj.weight",
}


def _layer_names(family: Family) -> dict[str, str]:
    names = dict(_SAME)
    if not family.qk_norm:
        del names["attention.inner.q_norm.weight"], names["attention.inner.k_norm.weight"]
    if family.qkv_bias:
        for p in "qkv":
            names[f"attention.inner.{p}_proj.bias"] = f"self_attn.{p}_proj.bias"
    names["attention.norm.weight"] = f"{family.attention_norm}.weight"
    names["mlp.norm.weight"] = f"{family.mlp_norm}.weight"
    return names


def trunk_to_hf(master: dict[str, torch.Tensor], cfg: ModelConfig, family: Family) -> dict:
    """The HF state dict of the trunk in ``master`` (our names, TP=1 layout)."""
    v = cfg.vocab_size
    out = {
        "model.embed_tokens.weight": master["trunk.embedding.weight"][:v],  # [V, h]
        "model.norm.weight": master["trunk.final_norm.weight"],
    }
    if not cfg.tie_embeddings:
        out["lm_head.weight"] = master["trunk.output_layer.weight"][:v]  # [V, h]
    names = _layer_names(family)
    for i in range(cfg.num_layers):
        ours, theirs = f"trunk.layers.{i}.", f"model.layers.{i}."
        for a, b in names.items():
            out[theirs + b] = master[ours + a]
        gate, up = master[ours + "mlp.inner.gate_up.weight"].chunk(2, dim=0)  # [f, h] each
        out[theirs + "mlp.gate_proj.weight"], out[theirs + "mlp.up_proj.weight"] = gate, up
    return {k: t.contiguous() for k, t in out.items()}


def trunk_from_hf(hf: dict[str, torch.Tensor], cfg: ModelConfig, family: Family) -> dict:
    """Our trunk's master state dict from an HF state dict; a missing or unexpected HF tensor
    is an error naming it (strict loading)."""
    padded, v = cfg.padded_vocab_size, cfg.known_vocab_size

    def pad(t: torch.Tensor) -> torch.Tensor:  # [V, h] -> [V', h]
        return torch.cat([t, t.new_zeros(padded - v, t.shape[1])])

    used: set[str] = set()

    def take(name: str) -> torch.Tensor:
        if name not in hf:
            raise ConfigError(f"the Hugging Face checkpoint lacks {name} (a {family.model_type})")
        used.add(name)
        return hf[name]

    out = {
        "trunk.embedding.weight": pad(take("model.embed_tokens.weight")),
        "trunk.final_norm.weight": take("model.norm.weight"),
    }
    if not cfg.tie_embeddings:
        out["trunk.output_layer.weight"] = pad(take("lm_head.weight"))
    names = _layer_names(family)
    for i in range(cfg.num_layers):
        ours, theirs = f"trunk.layers.{i}.", f"model.layers.{i}."
        for a, b in names.items():
            out[ours + a] = take(theirs + b)
        gate, up = take(theirs + "mlp.gate_proj.weight"), take(theirs + "mlp.up_proj.weight")
        out[ours + "mlp.inner.gate_up.weight"] = torch.cat([gate, up])  # [2f, h]
    unexpected = sorted(set(hf) - used - {"lm_head.weight"})  # a tied checkpoint may keep it
    if unexpected:
        raise ConfigError(
            f"the Hugging Face checkpoint has tensors a {family.model_type} twin of this trunk "
            f"does not: {unexpected[:5]}"
        )
    return out


EXPORTABLE_HEADS = ("transformer", "mlp", "shared_lm_head")
"""Chained head types that are exactly a DeepSeek-V3 MTP layer of the family's decoder layer:
'mlp' with a zero attention sub-block, 'shared_lm_head' with eh_proj = [I I], unit norms and a
zero decoder layer (both sub-blocks add nothing). 'linear' and independent heads are not."""


def heads_exportable(cfg: ModelConfig) -> str | None:
    """Why ``cfg``'s MTP heads cannot be written in transformers' MTP layout (None: they can)."""
    mtp = cfg.mtp
    if mtp is None:
        return "the model has no MTP heads"
    if mtp.head_arrangement != "chained":
        return "independent (Meta) heads read the trunk output, not the previous step's state"
    if mtp.mtp_head_type not in EXPORTABLE_HEADS:
        return f"the {mtp.mtp_head_type!r} head is no decoder layer"
    return None


def _blank_layer(cfg: ModelConfig, family: Family, like: torch.Tensor) -> dict:
    """A decoder layer that adds nothing to its input (zero output projections, unit norms)."""
    h, f, d = cfg.hidden_size, cfg.ffn_size, cfg.head_dim
    zeros = {
        "self_attn.q_proj.weight": (cfg.num_attention_heads * d, h),
        "self_attn.k_proj.weight": (cfg.kv_heads * d, h),
        "self_attn.v_proj.weight": (cfg.kv_heads * d, h),
        "self_attn.o_proj.weight": (h, cfg.num_attention_heads * d),
        "mlp.gate_proj.weight": (f, h),
        "mlp.up_proj.weight": (f, h),
        "mlp.down_proj.weight": (h, f),
    }
    out = {name: like.new_zeros(shape) for name, shape in zeros.items()}
    out[f"{family.attention_norm}.weight"] = like.new_ones(h)
    out[f"{family.mlp_norm}.weight"] = like.new_ones(h)
    if family.qk_norm:  # per head [d], or over the whole projection [n d] / [g d] (OLMo-2)
        full = family.qk_norm_scope == "full"
        out["self_attn.q_norm.weight"] = like.new_ones(cfg.num_attention_heads * d if full else d)
        out["self_attn.k_norm.weight"] = like.new_ones(cfg.kv_heads * d if full else d)
    if family.qkv_bias:
        out["self_attn.q_proj.bias"] = like.new_zeros(cfg.num_attention_heads * d)
        out["self_attn.k_proj.bias"] = like.new_zeros(cfg.kv_heads * d)
        out["self_attn.v_proj.bias"] = like.new_zeros(cfg.kv_heads * d)
    return out


def heads_to_hf(master: dict[str, torch.Tensor], cfg: ModelConfig, family: Family) -> dict:
    """The chained MTP heads in DeepSeek-V3's layout, which transformers' ``MtpModel`` reads:
    step k (1..K) as ``model.layers.{L+k-1}.{enorm, hnorm, eh_proj, shared_head.norm, <the
    family's decoder layer>}`` (a FastMTP head shared by every step is written K times)."""
    why = heads_exportable(cfg)
    if why is not None:
        raise ConfigError(f"the MTP heads cannot be exported to transformers: {why}")
    mtp, h, like = cfg.mtp, cfg.hidden_size, master["trunk.final_norm.weight"]
    assert mtp is not None  # (heads_exportable)
    names = _layer_names(family)
    out = {}
    for k in range(1, mtp.num_predict_tokens + 1):
        ours = f"mtp.heads.{0 if mtp.share_weights_across_steps else k - 1}."
        theirs = f"model.layers.{cfg.num_layers + k - 1}."
        if mtp.mtp_head_type == "shared_lm_head":  # final_norm(rms(h) + rms(e)), no parameters
            eye = torch.eye(h, dtype=like.dtype)
            step = {
                "enorm.weight": like.new_ones(h),
                "hnorm.weight": like.new_ones(h),
                "eh_proj.weight": torch.cat([eye, eye], dim=1),  # [h, 2h]
                "shared_head.norm.weight": master["trunk.final_norm.weight"],
                **_blank_layer(cfg, family, like),
            }
        else:
            step = {
                "enorm.weight": master[ours + "enorm.weight"],
                "hnorm.weight": master[ours + "hnorm.weight"],
                "eh_proj.weight": master[ours + "eh_proj.weight"],  # [h, 2h] over [e; h]
                "shared_head.norm.weight": master[ours + "final_norm.weight"],
                **_blank_layer(cfg, family, like),
            }
            block = ours + "block."
            for a, b in names.items():
                if block + a in master:  # an 'mlp' head keeps the blank attention sub-block
                    step[b] = master[block + a]
            gate, up = master[block + "mlp.inner.gate_up.weight"].chunk(2, dim=0)
            step["mlp.gate_proj.weight"], step["mlp.up_proj.weight"] = gate, up
        out.update({theirs + name: t.clone() for name, t in step.items()})  # no shared storage
    return out


def _rope_parameters(cfg: ModelConfig) -> dict:
    scaling = cfg.rope_scaling
    if scaling is None:
        return {"rope_type": "default", "rope_theta": cfg.rope_theta}
    return {
        "rope_type": "llama3",
        "rope_theta": cfg.rope_theta,
        "factor": scaling.factor,
        "low_freq_factor": scaling.low_freq_factor,
        "high_freq_factor": scaling.high_freq_factor,
        "original_max_position_embeddings": scaling.original_max_position_embeddings,
    }


def hf_config(cfg: ModelConfig, family: Family, eos_token_id: int | None, dtype: str):
    """The transformers config of ``cfg``'s trunk in ``family``."""
    import transformers

    common: dict[str, Any] = dict(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.ffn_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.kv_heads,
        head_dim=cfg.head_dim,
        max_position_embeddings=cfg.max_seq_len,
        rms_norm_eps=cfg.norm_eps,
        rope_parameters=_rope_parameters(cfg),
        tie_word_embeddings=cfg.tie_embeddings,
        hidden_act="silu",
        attention_bias=False,
        bos_token_id=None,
        eos_token_id=eos_token_id,
        pad_token_id=None,
        dtype=dtype,
        architectures=[family.architecture],
    )
    full = ["full_attention"] * cfg.num_layers
    mtp: dict[str, Any] = {}
    if cfg.mtp is not None and heads_exportable(cfg) is None:  # transformers' MtpModel reads these
        k = cfg.mtp.num_predict_tokens
        mtp = {"num_mtp_layers": k}
        if family.model_type not in ("llama", "olmo2"):  # layer_types need the heads' too
            mtp["mtp_layer_types"] = ["full_attention"] * k
    if family.model_type == "exaone4":
        return transformers.Exaone4Config(**common, sliding_window=None, layer_types=full, **mtp)
    if family.model_type == "olmo2":  # no layer types
        return transformers.Olmo2Config(**common, **mtp)
    if family.model_type in ("qwen3", "qwen2"):
        config_class = {"qwen3": transformers.Qwen3Config, "qwen2": transformers.Qwen2Config}
        return config_class[family.model_type](
            **common, use_sliding_window=False, layer_types=full, **mtp
        )
    return transformers.LlamaConfig(**common, mlp_bias=False, **mtp)
