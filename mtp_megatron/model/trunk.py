"""The decoder trunk: embedding -> decoder layers -> final stage (norm, output layer).

Notation: b batch, s sequence, h hidden, V padded vocabulary, p tensor-parallel size.

The three parts are separate methods so that a pipeline schedule can place the embedding on the
first stage, slices of ``layers`` on the middle ones, and the final stage (with the MTP heads) on
the last one without rewriting the model.
"""

from __future__ import annotations

from typing import cast

import torch
from torch import nn

from mtp_megatron.config import ModelConfig
from mtp_megatron.model.layers import RMSNorm, RotaryEmbedding, TransformerLayer
from mtp_megatron.model.specs import Backend, LayerContext
from mtp_megatron.parallel import ensure_parallel_initialized, tensor_parallel_group


def build_layer_context(cfg: ModelConfig, backend: Backend = "megatron") -> LayerContext:
    """Validate ``cfg`` against the current TP size and bundle what the layers need."""
    ensure_parallel_initialized()
    group = tensor_parallel_group()
    cfg.validate(tensor_parallel_size=torch.distributed.get_world_size(group))
    return LayerContext(cfg=cfg, tp_group=group, backend=backend)


class DecoderTrunk(nn.Module):
    """OLMo-2-style decoder; its embedding and linear layers are the ``backend``'s (megatron's
    TP layers for training, plain torch ones for TP=1 inference: ``model/specs.py``)."""

    def __init__(self, cfg: ModelConfig, backend: Backend = "megatron"):
        super().__init__()
        ctx = build_layer_context(cfg, backend)
        self.cfg = cfg
        self.ctx = ctx
        self.embedding = ctx.embedding(cfg.padded_vocab_size, cfg.hidden_size)
        self.rope = RotaryEmbedding(cfg.head_dim, cfg.max_seq_len, cfg.rope_theta, cfg.rope_scaling)
        self.layers = nn.ModuleList(TransformerLayer(ctx) for _ in range(cfg.num_layers))
        self.final_norm = RMSNorm(cfg.hidden_size, cfg.norm_eps)
        self.output_layer = ctx.column_linear(
            cfg.hidden_size, cfg.padded_vocab_size, external_weight=cfg.tie_embeddings
        )
        # True when a parameter's data exists only inside its own module's call (set by the
        # training engine under ZeRO-3): the sequential loss then reaches W through a call
        self.weights_gathered_per_call = False

    # -- first stage ---------------------------------------------------------------------------
    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """[b, s] token ids -> [b, s, h] (each rank looks up its vocab shard, then all-reduce)."""
        return self.embedding(input_ids)

    # -- every stage -----------------------------------------------------------------------------
    def run_layers(
        self,
        hidden: torch.Tensor,
        positions: torch.Tensor,
        layers: range | None = None,
        kv_caches: list | None = None,
    ) -> torch.Tensor:
        """Apply decoder layers ``layers`` (default: all) to [b, s, h]."""
        for i in layers if layers is not None else range(len(self.layers)):
            kv_cache = kv_caches[i] if kv_caches is not None else None
            hidden = self.layers[i](hidden, self.rope, positions, kv_cache)
        return hidden

    @property
    def num_kv_caches(self) -> int:
        """Length of the ``kv_caches`` list run_layers expects: one per layer application."""
        return len(self.layers)

    def run_layers_with_cost(
        self, hidden: torch.Tensor, positions: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """All layers on [b, s, h] and their extra training loss (an ETD trunk's depth cost in
        a training forward; None for the plain trunk)."""
        return self.run_layers(hidden, positions), None

    def after_optimizer_step(self) -> None:
        """Called once per optimizer step, after it (an ETD trunk moves its routing bias)."""

    # -- last stage ------------------------------------------------------------------------------
    @property
    def output_weight(self) -> torch.nn.Parameter:
        """W [V/p, h] of the output layer: the embedding's when they are tied."""
        owner = self.embedding if self.cfg.tie_embeddings else self.output_layer
        return cast(torch.nn.Parameter, owner.weight)

    def logits(self, normed: torch.Tensor, detach_weight: bool = False) -> torch.Tensor:
        """Normalised states [b, s, h] -> vocab-parallel logits [b, s, V/p] (shared by heads);
        ``detach_weight``: no gradient reaches the output weight (heads that must not train
        the trunk)."""
        weight: torch.Tensor | None = self.output_weight.detach() if detach_weight else None
        if weight is None and self.cfg.tie_embeddings:
            weight = self.output_weight
        return self.output_layer(normed, weight)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor | None = None):
        """[b, s] -> (trunk hidden before the final norm [b, s, h], logits [b, s, V/p])."""
        if positions is None:
            positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        hidden = self.run_layers(self.embed(input_ids), positions)
        return hidden, self.logits(self.final_norm(hidden))
