"""Decoder building blocks, tensor-parallel: their linear layers come from a LayerContext.

Notation: b batch, s sequence, h hidden, p tensor-parallel size, n query heads, g key/value heads,
d head dim, f SwiGLU inner width. Tensors are batch-first ([b, s, h]); the linear layers act on
the last dimension, so they are indifferent to the order of the leading ones.

Which classes the linear layers are (megatron's or plain torch) is the context's backend
(``model/specs.py``); weights are always initialised on the CPU from the full master weight and
then sliced, so the same seed gives the same model at every TP size and on either backend.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from contextlib import AbstractContextManager

import torch
import torch.nn.functional as F
from megatron.core.tensor_parallel import (
    copy_to_tensor_model_parallel_region,
    reduce_from_tensor_model_parallel_region,
)
from megatron.core.tensor_parallel.layers import set_tensor_model_parallel_attributes
from torch import nn

from mtp_megatron.config import ModelConfig, RopeScalingConfig
from mtp_megatron.model.specs import LayerContext


class RMSNorm(nn.Module):
    """RMSNorm over the last dimension; ``affine=False`` gives the parameter-free form.

    ``sharded_input_group``: set when the norm is replicated but applied to a TP-sharded input
    (per-head QK-norm sees only this rank's heads). Its weight gradient is then partial on each
    rank; routing the weight through megatron's copy-to-TP-region all-reduces it in backward, so
    the gradient is exact without a separate reduction step in the trainer.
    """

    def __init__(
        self,
        dim: int,
        eps: float,
        affine: bool = True,
        sharded_input_group: torch.distributed.ProcessGroup | None = None,
    ):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim)) if affine else None
        self.sharded_input_group = sharded_input_group

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight
        if weight is not None and self.sharded_input_group is not None:
            if self.sharded_input_group.size() > 1:
                weight = copy_to_tensor_model_parallel_region(
                    weight, group=self.sharded_input_group
                )
        return F.rms_norm(x, (x.shape[-1],), weight, self.eps)  # one fused kernel


def llama3_inv_freq(inv_freq: torch.Tensor, scaling: RopeScalingConfig) -> torch.Tensor:
    """Llama-3's frequency scaling of ``inv_freq`` [d/2] (transformers' arithmetic, fp32)."""
    old = scaling.original_max_position_embeddings
    low_wavelen, high_wavelen = old / scaling.low_freq_factor, old / scaling.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / scaling.factor, inv_freq)
    smooth = (old / wavelen - scaling.low_freq_factor) / (
        scaling.high_freq_factor - scaling.low_freq_factor
    )
    smoothed = (1 - smooth) * scaled / scaling.factor + smooth * scaled
    medium = ~(wavelen < high_wavelen) * ~(wavelen > low_wavelen)
    return torch.where(medium, smoothed, scaled)


class ShardedRMSNorm(nn.Module):
    """RMSNorm over a whole projection whose features are sharded over TP (OLMo-2's QK-norm:
    one norm over q's [n d] and k's [g d], not per head). x: [b, s, f/p] -> [b, s, f/p].

    Each rank sums the squares of its features, the sums are all-reduced (in backward too: every
    rank's output depends on every rank's features), and each rank scales by its slice of the
    weight [f/p], sharded like the projection's rows. Computed in fp32, as transformers does.
    """

    def __init__(self, full_dim: int, eps: float, tp_group: torch.distributed.ProcessGroup):
        super().__init__()
        p = tp_group.size()
        self.full_dim, self.eps, self.tp_group = full_dim, eps, tp_group
        self.weight = nn.Parameter(torch.ones(full_dim // p))
        set_tensor_model_parallel_attributes(self.weight, True, 0, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        squares = x.float().pow(2).sum(-1, keepdim=True)  # [b, s, 1], this rank's features
        if self.tp_group.size() > 1:  # all-reduced forward (reduce_from) and backward (copy_to)
            squares = copy_to_tensor_model_parallel_region(squares, group=self.tp_group)
            squares = reduce_from_tensor_model_parallel_region(squares, group=self.tp_group)
        normed = x.float() * torch.rsqrt(squares / self.full_dim + self.eps)
        return (self.weight * normed).to(x.dtype)  # weight x fp32, then cast: Olmo2RMSNorm's


class RotaryEmbedding(nn.Module):
    """RoPE (rotate-half convention) with a precomputed cos/sin table up to ``max_seq_len``.

    Computed as transformers (and vLLM) compute it, in fp32 throughout: a float64 table rounded
    once differs from theirs by 3e-4 at 4k positions and 2e-3 at 32k, which a pretrained
    checkpoint would notice.
    """

    cos: torch.Tensor
    signed_sin: torch.Tensor  # buffers, [max_seq_len, d]

    def __init__(
        self,
        head_dim: int,
        max_seq_len: int,
        theta: float,
        scaling: RopeScalingConfig | None = None,
    ):
        super().__init__()
        exponents = torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim
        inv_freq = 1.0 / (theta**exponents)  # [d/2], fp32
        if scaling is not None:
            inv_freq = llama3_inv_freq(inv_freq, scaling)
        positions = torch.arange(max_seq_len, dtype=torch.int64).float()
        angles = torch.outer(positions, inv_freq)  # [S, d/2]: one fp32 product each, as HF's
        angles = torch.cat([angles, angles], dim=-1)  # [S, d]
        self.register_buffer("cos", angles.cos(), persistent=False)
        # rotate_half(x) * sin == roll(x, d/2) * [-sin_1, sin_2] exactly (negation is exact):
        # one roll instead of a split, a negation and a concatenation per call
        half = head_dim // 2
        signed = torch.cat([-angles[:, :half].sin(), angles[:, half:].sin()], dim=-1)
        self.register_buffer("signed_sin", signed, persistent=False)
        self._memo: tuple | None = None

    def angles(self, positions: torch.Tensor, dtype: torch.dtype):
        """(cos, signed sin) [s, d] or [b, 1, s, d] at ``positions`` ([s] or [b, s]).

        Every layer of a forward gets the same position tensor, so the table is gathered
        once per forward, not twice per layer (at batch-1 decoding these small gathers cost
        as much as a layer's matmuls); keyed on the tensor itself and its in-place version.
        """
        memo = self._memo
        if positions.is_inference():  # no version counter to key on: no memo
            memo = None
        elif memo is not None and memo[0] is positions and memo[1:3] == (positions._version, dtype):
            return memo[3]
        cos = self.cos[positions].to(dtype)  # [s, d] or [b, s, d]
        sin = self.signed_sin[positions].to(dtype)
        if cos.dim() == 3:
            cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)  # [b, 1, s, d]
        if not positions.is_inference():
            self._memo = (positions, positions._version, dtype, (cos, sin))
        return cos, sin

    def forward(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """x: [b, heads, s, d]; positions: [s] or [b, s] absolute positions."""
        cos, sin = self.angles(positions, x.dtype)
        return x * cos + x.roll(x.shape[-1] // 2, dims=-1) * sin


class SelfAttention(nn.Module):
    """Causal self-attention with per-head QK-norm, RoPE, GQA; heads sharded over TP ranks.

    q/k/v are column-parallel (each rank owns n/p query heads and g/p kv heads), the output
    projection row-parallel (one all-reduce). Separate q, k, v weights keep the TP slicing of the
    CPU-initialised master weights aligned with whole heads.
    """

    def __init__(self, ctx: LayerContext):
        super().__init__()
        cfg = ctx.cfg
        d = cfg.head_dim
        self.local_heads = cfg.num_attention_heads // ctx.tp_size
        self.local_kv_heads = cfg.kv_heads // ctx.tp_size
        self.head_dim = d

        def column(out_features: int) -> nn.Module:
            return ctx.column_linear(cfg.hidden_size, out_features, bias=cfg.qkv_bias)

        self.q_proj = column(cfg.num_attention_heads * d)
        self.k_proj = column(cfg.kv_heads * d)
        self.v_proj = column(cfg.kv_heads * d)
        self.o_proj = ctx.row_linear(cfg.num_attention_heads * d, cfg.hidden_size)
        self.q_norm: nn.Module | None = None
        self.k_norm: nn.Module | None = None
        self.full_width_qk_norm = cfg.qk_norm and cfg.qk_norm_scope == "full"
        if self.full_width_qk_norm:  # over the whole projection (OLMo-2)
            self.q_norm = ShardedRMSNorm(cfg.num_attention_heads * d, cfg.norm_eps, ctx.tp_group)
            self.k_norm = ShardedRMSNorm(cfg.kv_heads * d, cfg.norm_eps, ctx.tp_group)
        elif cfg.qk_norm:  # per head: local to a rank
            self.q_norm = RMSNorm(d, cfg.norm_eps, sharded_input_group=ctx.tp_group)
            self.k_norm = RMSNorm(d, cfg.norm_eps, sharded_input_group=ctx.tp_group)

    def forward(
        self,
        x: torch.Tensor,
        rope: RotaryEmbedding,
        positions: torch.Tensor,
        kv_cache: KVCacheLayer | None = None,
    ) -> torch.Tensor:
        b, s, _ = x.shape
        n, g, d = self.local_heads, self.local_kv_heads, self.head_dim
        q, k = self.q_proj(x), self.k_proj(x)  # [b, s, n d/p], [b, s, g d/p]
        q_norm, k_norm = self.q_norm, self.k_norm
        if q_norm is not None and k_norm is not None and self.full_width_qk_norm:
            q, k = q_norm(q), k_norm(k)
        q, k = q.view(b, s, n, d), k.view(b, s, g, d)  # [b, s, n/p, d], [b, s, g/p, d]
        v = self.v_proj(x).view(b, s, g, d)
        if q_norm is not None and k_norm is not None and not self.full_width_qk_norm:
            q, k = q_norm(q), k_norm(k)
        q = rope(q.transpose(1, 2), positions)  # [b, n/p, s, d]
        k = rope(k.transpose(1, 2), positions)  # [b, g/p, s, d]
        v = v.transpose(1, 2)
        if kv_cache is None:
            out = F.scaled_dot_product_attention(
                q, k, v, is_causal=True, enable_gqa=self.local_heads != self.local_kv_heads
            )
        else:
            k, v, mask = kv_cache.append(k, v)  # all cached keys; mask [b, 1, s, S]
            out = F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, enable_gqa=self.local_heads != self.local_kv_heads
            )
        out = out.transpose(1, 2).reshape(b, s, self.local_heads * self.head_dim)  # [b, s, n d/p]
        return self.o_proj(out)


class KVCacheLayer:
    """Interface of one layer's KV cache (the decoding package implements it)."""

    def append(
        self, k: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        raise NotImplementedError


class SwiGLU(nn.Module):
    """down(silu(gate(x)) * up(x)); gate/up fused and column-parallel, down row-parallel.

    ``stride=2`` makes megatron slice the fused [gate; up] master weight as [gate_r; up_r] per
    rank, so each rank's chunk(2) splits its own shard into gate and up.
    """

    def __init__(self, ctx: LayerContext):
        super().__init__()
        cfg = ctx.cfg
        self.gate_up = ctx.column_linear(cfg.hidden_size, 2 * cfg.ffn_size, stride=2)
        self.down = ctx.row_linear(cfg.ffn_size, cfg.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up(x).chunk(2, dim=-1)  # [b, s, f/p] each
        return self.down(F.silu(gate) * up)


class Residual(nn.Module):
    """One residual sub-block with the configured norm placement.

    post (OLMo-2): x + norm(f(x)); pre (GPT / Megatron): x + f(norm(x)).
    """

    def __init__(self, inner: nn.Module, cfg: ModelConfig):
        super().__init__()
        self.inner = inner
        self.norm = RMSNorm(cfg.hidden_size, cfg.norm_eps)
        self.pre = cfg.norm_placement == "pre"

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if self.pre:
            return x + self.inner(self.norm(x), *args, **kwargs)
        return x + self.norm(self.inner(x, *args, **kwargs))


class TransformerLayer(nn.Module):
    """Attention block then SwiGLU block, each residual. x: [b, s, h] -> [b, s, h]."""

    recompute_context: Callable[[], AbstractContextManager] | None = None
    """What a checkpointed call's recomputation runs inside (``model/recompute.py``; an ETD
    think layer's reinstates its iteration's routing)."""

    def __init__(self, ctx: LayerContext):
        super().__init__()
        self.attention = Residual(SelfAttention(ctx), ctx.cfg)
        self.mlp = Residual(SwiGLU(ctx), ctx.cfg)

    def forward(
        self,
        x: torch.Tensor,
        rope: RotaryEmbedding,
        positions: torch.Tensor,
        kv_cache: KVCacheLayer | None = None,
    ) -> torch.Tensor:
        x = self.attention(x, rope, positions, kv_cache)
        return self.mlp(x)


class MLPLayer(nn.Module):
    """The SwiGLU block alone (the 'mlp' MTP head): no attention, so no KV cache."""

    def __init__(self, ctx: LayerContext):
        super().__init__()
        self.mlp = Residual(SwiGLU(ctx), ctx.cfg)

    def forward(self, x, rope=None, positions=None, kv_cache=None) -> torch.Tensor:
        return self.mlp(x)
