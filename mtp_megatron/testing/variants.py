"""The MTP variants the tests sweep: head type x shared/unshared x chained/independent."""

from __future__ import annotations

import itertools
from typing import Any, cast

from mtp_megatron.config import HEAD_TYPES, ConfigError, ModelConfig, MTPConfig
from mtp_megatron.config.mtp import HeadArrangement, HeadTypeName


def all_combinations() -> list[tuple[str, bool, str]]:
    return list(itertools.product(HEAD_TYPES, (True, False), ("chained", "independent")))


def is_valid(head_type: str, shared: bool, arrangement: str, k: int = 3) -> bool:
    try:
        mtp_config(head_type, shared, arrangement, k).validate()
    except ConfigError:
        return False
    return True


def valid_combinations(k: int = 3) -> list[tuple[str, bool, str]]:
    return [c for c in all_combinations() if is_valid(*c, k=k)]


def mtp_config(head_type: str, shared: bool, arrangement: str, k: int = 3) -> MTPConfig:
    return MTPConfig(
        num_predict_tokens=k,
        mtp_head_type=cast(HeadTypeName, head_type),
        share_weights_across_steps=shared,
        head_arrangement=cast(HeadArrangement, arrangement),
        speculation_lookahead=min(3, k),
    )


def tiny_model_config(mtp: MTPConfig | None, **overrides) -> ModelConfig:
    """Small enough for 4 gloo processes on 2 cores; every size divides by TP = 4 (and GQA 2:1)."""
    base: dict[str, Any] = dict(
        vocab_size=200,  # padded to 256: padded rows are part of the softmax, as in megatron
        vocab_pad_multiple=128,
        hidden_size=64,
        num_layers=2,
        num_attention_heads=8,
        num_kv_heads=4,
        ffn_hidden_size=128,
        max_seq_len=32,
        mtp=mtp,
    )
    base.update(overrides)
    return ModelConfig(**base)


def randomize_norm_weights(model, low: float = 0.5, high: float = 1.5) -> None:
    """Norm weights start at 1, where applying a norm once or twice looks the same; make them
    matter (same values on every rank: norm weights are replicated, seed from the caller)."""
    import torch

    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(low, high)
