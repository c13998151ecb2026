"""MTP heads as megatron tensor-parallel layers, and the block that runs them step by step.

Notation: b batch, s sequence, h hidden, p tensor-parallel size, K = num_predict_tokens.

Step k (1..K) predicts t_{i+k+1} at position i.

- chained (DeepSeek-V3, the guide's diagram):
  h^k = final_norm_k(block(proj([enorm(e_{i+k}); hnorm(h^{k-1})]))), with h^0 the trunk output
  after its final norm. Each step sees the previous step's normalised state (exactly what its
  logits are computed from, as in megatron-core's MultiTokenPredictionLayer) and the embedding of
  the token it is told: teacher forcing in training, the previous draft at inference.
- independent (Meta, arXiv:2404.19737): h^k = final_norm_k(block_k(z)) with z the trunk output
  before its final norm; no step reads another.

Head types (``model/heads.py``) choose the block: 'transformer', 'mlp', 'linear', or none
('shared_lm_head', no parameters: h^k = final_norm(rms(h^{k-1}) + rms(e_{i+k})) with the trunk's
final norm). Every head reuses the trunk's embedding and output layer (logits_k = W_out h^k);
heads with parameters have their own final norm. FastMTP (``share_weights_across_steps``)
applies one head module at every step.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import cast

import torch
from torch import nn

from mtp_megatron.config import MTPConfig
from mtp_megatron.model.heads import head_type
from mtp_megatron.model.layers import KVCacheLayer, RMSNorm, RotaryEmbedding
from mtp_megatron.model.loss import future_token_ids
from mtp_megatron.model.recompute import checkpointed
from mtp_megatron.model.specs import LayerContext
from mtp_megatron.parallel import gather_last_dim


class MTPHead(nn.Module):
    """One step's module: combines its inputs into h^k [b, s, h]."""

    def __init__(self, ctx: LayerContext, mtp: MTPConfig):
        super().__init__()
        h, eps = ctx.cfg.hidden_size, ctx.cfg.norm_eps
        self.chained = mtp.head_arrangement == "chained"
        self.tp_group = ctx.tp_group
        self.final_norm: RMSNorm | None = None  # None: the trunk's final norm
        self.block: nn.Module | None = None
        kind = head_type(mtp.mtp_head_type)
        self.has_attention = kind.has_attention
        if kind.block is None:  # parameter-free
            self.hnorm = RMSNorm(h, eps, affine=False)
            self.enorm = RMSNorm(h, eps, affine=False)
            self.eh_proj = None
            return
        if self.chained:
            self.hnorm = RMSNorm(h, eps)
            self.enorm = RMSNorm(h, eps)
            # 2h -> h, column-parallel: each rank computes h/p output features, then a gather.
            self.eh_proj = ctx.column_linear(2 * h, h)
        self.block = kind.block(ctx)
        self.final_norm = RMSNorm(h, eps)

    def forward(
        self,
        prev_hidden: torch.Tensor,
        token_embedding: torch.Tensor | None,
        rope: RotaryEmbedding,
        positions: torch.Tensor,
        kv_cache: KVCacheLayer | None = None,
    ) -> torch.Tensor:
        """prev_hidden: h^{k-1} (chained) or z (independent), [b, s, h] -> [b, s, h] before the
        final norm (see :meth:`MTPBlock.step`)."""
        x = prev_hidden
        if self.chained:
            e, hprev = self.enorm(token_embedding), self.hnorm(prev_hidden)
            if self.eh_proj is None:  # shared_lm_head: parameter-free sum
                x = hprev + e
            else:
                x = self.eh_proj(torch.cat([e, hprev], dim=-1))  # [b, s, h/p]
                x = gather_last_dim(x, self.tp_group)  # [b, s, h]
        if self.block is not None:
            x = self.block(x, rope, positions, kv_cache)
        return x


class MTPBlock(nn.Module):
    """The K prediction steps (one shared head module, or K of them)."""

    def __init__(self, ctx: LayerContext, mtp: MTPConfig):
        super().__init__()
        mtp.validate()
        self.cfg = mtp
        n_modules = 1 if mtp.share_weights_across_steps else mtp.num_predict_tokens
        self.heads = nn.ModuleList(MTPHead(ctx, mtp) for _ in range(n_modules))

    @property
    def num_steps(self) -> int:
        return self.cfg.num_predict_tokens

    @property
    def chained(self) -> bool:
        return self.cfg.head_arrangement == "chained"

    def head(self, k: int) -> MTPHead:
        """The module of step k (1-based)."""
        return cast(MTPHead, self.heads[0] if len(self.heads) == 1 else self.heads[k - 1])

    def step(
        self,
        k: int,
        prev_hidden: torch.Tensor,
        token_embedding: torch.Tensor | None,
        trunk_final_norm: Callable[[torch.Tensor], torch.Tensor],
        rope: RotaryEmbedding,
        positions: torch.Tensor,
        kv_cache: KVCacheLayer | None = None,
    ) -> torch.Tensor:
        """Normalised h^k [b, s, h] from h^{k-1} and e_{i+k} (chained) or from z (independent)."""
        head = self.head(k)
        x = head(prev_hidden, token_embedding, rope, positions, kv_cache)
        return (head.final_norm or trunk_final_norm)(x)

    def iter_steps(
        self,
        trunk_hidden: torch.Tensor,
        trunk_normed: torch.Tensor,
        input_ids: torch.Tensor,
        embed: Callable[[torch.Tensor], torch.Tensor],
        trunk_final_norm: Callable[[torch.Tensor], torch.Tensor],
        rope: RotaryEmbedding,
        positions: torch.Tensor,
        checkpoint: bool = False,
    ) -> Iterator[tuple[int, torch.Tensor]]:
        """Yield (k, normalised h^k [b, s, h]) for k = 1..K over a whole training sequence.

        trunk_hidden: z, the trunk output before its final norm; trunk_normed: final_norm(z).
        ``checkpoint``: keep only each step's inputs and recompute its head in backward.
        """
        prev = trunk_normed
        for k in range(1, self.num_steps + 1):
            emb = embed(future_token_ids(input_ids, k)) if self.chained else None  # e_{i+k}
            source = prev if self.chained else trunk_hidden
            prev = checkpointed(
                self.step, k, source, emb, trunk_final_norm, rope, positions, enabled=checkpoint
            )
            yield k, prev
