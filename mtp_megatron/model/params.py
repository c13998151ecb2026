"""Parameter counts of a model shape, computed on the meta device (nothing is allocated)."""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from mtp_megatron.config import HEAD_TYPES, ModelConfig, MTPConfig

OLMO2_1B = ModelConfig(
    vocab_size=100_352,
    hidden_size=2048,
    num_layers=16,
    num_attention_heads=16,
    ffn_hidden_size=8192,
    max_seq_len=4096,
    rope_theta=500_000.0,
    mtp=None,
)
"""The OLMo-2 1B shape the user's guide quotes overheads for."""


@dataclass(frozen=True)
class ParamCount:
    """Parameters of the trunk and of its MTP heads (global, i.e. summed over TP shards)."""

    trunk: int
    """Embedding, decoder layers, final norm and output layer."""
    heads: int
    """Everything the MTP heads add (0 for shared_lm_head)."""

    @property
    def overhead(self) -> float:
        return self.heads / self.trunk


def count_parameters(cfg: ModelConfig) -> ParamCount:
    """Build ``cfg`` on the meta device at TP=1 and count trunk and head parameters."""
    from mtp_megatron.model.mtp_model import build_model
    from mtp_megatron.parallel import ensure_parallel_initialized

    ensure_parallel_initialized()
    with torch.device("meta"):
        model = build_model(cfg)
    trunk = sum(p.numel() for p in model.trunk.parameters())
    heads = sum(p.numel() for p in model.mtp.parameters()) if model.mtp is not None else 0
    return ParamCount(trunk=trunk, heads=heads)


def overhead_table(base: ModelConfig = OLMO2_1B, k: int = 4) -> list[dict]:
    """Head overhead of every head type x shared/unshared x arrangement that validates."""
    rows = []
    for arrangement in ("chained", "independent"):
        for head_type in HEAD_TYPES:
            for shared in (True, False):
                mtp = MTPConfig(
                    num_predict_tokens=k,
                    mtp_head_type=head_type,
                    share_weights_across_steps=shared,
                    head_arrangement=arrangement,
                )
                try:
                    mtp.validate()
                except ValueError:
                    continue
                count = count_parameters(replace(base, mtp=mtp))
                rows.append(
                    dict(
                        arrangement=arrangement,
                        head_type=head_type,
                        shared=shared,
                        trunk=count.trunk,
                        heads=count.heads,
                        overhead=count.overhead,
                    )
                )
    return rows
