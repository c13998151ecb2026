"""Decoder building blocks on megatron-core tensor-parallel layers.

Notation: b batch, s sequence, h hidden, p tensor-parallel size, n query heads, g key/value heads,
d head dim, f SwiGLU inner width. Tensors are batch-first ([b, s, h]); megatron's linear layers
act on the last dimension, so they are indifferent to the order of the leading ones.

Weights are always initialised on the CPU from the full master weight and then sliced
(``use_cpu_initialization=True``), so the same seed gives the same model at every TP size.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from megatron.core.model_parallel_config import ModelParallelConfig
from megatron.core.tensor_parallel import (
    ColumnParallelLinear,
    RowParallelLinear,
    copy_to_tensor_model_parallel_region,
)
from megatron.core.utils import init_method_normal, scaled_init_method_normal
from torch import nn

from mtp_megatron.config import ModelConfig


def megatron_parallel_config(tensor_parallel_size: int) -> ModelParallelConfig:
    """The ModelParallelConfig every TP layer of ours is built with."""
    return ModelParallelConfig(
        tensor_model_parallel_size=tensor_parallel_size,
        use_cpu_initialization=True,
        perform_initialization=True,
        params_dtype=torch.float32,
    )


@dataclass
class LayerContext:
    """What every TP layer needs besides its sizes: megatron's config and the init methods."""

    cfg: ModelConfig
    """The model's hyperparameters."""
    megatron: ModelParallelConfig
    """Passed to every megatron layer."""
    tp_group: torch.distributed.ProcessGroup
    """The tensor-parallel group, passed explicitly to every megatron layer."""

    @property
    def tp_size(self) -> int:
        return self.megatron.tensor_model_parallel_size

    @property
    def init(self):
        return init_method_normal(self.cfg.init_std)

    @property
    def output_init(self):
        return scaled_init_method_normal(self.cfg.init_std, self.cfg.num_layers)

    def column_linear(
        self, in_features: int, out_features: int, stride: int = 1, external_weight: bool = False
    ) -> ColumnParallelLinear:
        """in -> out/p per rank, no bias, output left sharded (``stride``: fused outputs, e.g.
        gate | up; ``external_weight``: no weight of its own, passed at call time (tied))."""
        return ColumnParallelLinear(
            in_features,
            out_features,
            config=self.megatron,
            init_method=self.init,
            bias=False,
            gather_output=False,
            stride=stride,
            skip_weight_param_allocation=external_weight,
            tp_group=self.tp_group,
        )

    def row_linear(self, in_features: int, out_features: int) -> RowParallelLinear:
        """in/p per rank (a sharded input) -> out, all-reduced; no bias; the scaled output init."""
        return RowParallelLinear(
            in_features,
            out_features,
            config=self.megatron,
            init_method=self.output_init,
            bias=False,
            input_is_parallel=True,
            skip_bias_add=False,
            tp_group=self.tp_group,
        )


class _DirectLinears:
    """State of decoding's direct linear path (see :func:`tp_linear`)."""

    depth = 0
    """> 0 while a decode runs (nested ``direct_linears`` contexts)."""
    transposed: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    """id(weight) -> (weight, weight.T copy [in, out]), cleared when the outermost context ends."""


@contextmanager
def direct_linears():
    """Let :func:`tp_linear` bypass megatron's layers while decoding (no autograd, one TP rank).

    Scoped to a decode so that the transposed weight copies can never outlive a weight update:
    optimizers such as DeepSpeed ZeRO-1/2 write parameters through flat buffers without bumping
    their version counters, and ZeRO-3 gathers weights only inside megatron's module forward.
    """
    _DirectLinears.depth += 1
    try:
        yield
    finally:
        _DirectLinears.depth -= 1
        if _DirectLinears.depth == 0:
            _DirectLinears.transposed.clear()


def tp_linear(
    layer: ColumnParallelLinear | RowParallelLinear,
    x: torch.Tensor,
    weight: torch.Tensor | None = None,
) -> torch.Tensor:
    """Output of a megatron Column/RowParallelLinear (``weight``: a column layer's external one).

    Inside ``direct_linears()`` on a one-rank TP group without autograd (decoding) the product is
    taken directly: megatron's path wraps each call in autograd Functions and group look-ups that
    cost more than a batch-1 matmul on a CPU. Same weights, same result; training, evaluation and
    TP>1 always take megatron's path.
    """
    direct = (
        _DirectLinears.depth > 0
        and not torch.is_grad_enabled()
        and isinstance(layer, (ColumnParallelLinear, RowParallelLinear))  # not a LoRA wrapper
        and layer.tp_group.size() == 1
    )
    if direct:
        w = layer.weight if weight is None else weight
        direct = not hasattr(w, "ds_id")  # a ZeRO-3 partitioned parameter: megatron gathers it
    if not direct:
        return layer(x)[0] if weight is None else layer(x, weight=weight)[0]
    bias = None if layer.skip_bias_add else layer.bias  # megatron returns a skipped bias apart
    if x.device.type == "cpu":
        out = x @ _transposed_copy(w)  # [..., in] @ [in, out]
        return out if bias is None else out + bias
    return F.linear(x, w, bias)


def _transposed_copy(weight: torch.Tensor) -> torch.Tensor:
    """weight.T [in, out], contiguous, made once per decode.

    At batch 1 a CPU matmul streams a row-major [in, out] weight about 2.5x faster than the
    [out, in] layout (measured with weights out of cache: 160 vs 418 us for a 4096 x 192 output
    layer). The copies cost one model's worth of linear weights while a decode runs.
    """
    cached = _DirectLinears.transposed.get(id(weight))
    if cached is None or cached[0] is not weight:
        cached = (weight, weight.detach().t().contiguous())
        _DirectLinears.transposed[id(weight)] = cached
    return cached[1]


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


class RotaryEmbedding(nn.Module):
    """RoPE (rotate-half convention) with a precomputed cos/sin table up to ``max_seq_len``."""

    def __init__(self, head_dim: int, max_seq_len: int, theta: float):
        super().__init__()
        inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
        angles = torch.outer(torch.arange(max_seq_len, dtype=torch.float64), inv_freq)  # [S, d/2]
        angles = torch.cat([angles, angles], dim=-1)  # [S, d]
        self.register_buffer("cos", angles.cos().float(), persistent=False)
        self.register_buffer("sin", angles.sin().float(), persistent=False)

    def forward(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """x: [b, heads, s, d]; positions: [s] or [b, s] absolute positions."""
        cos = self.cos[positions].to(x.dtype)  # [s, d] or [b, s, d]
        sin = self.sin[positions].to(x.dtype)
        if cos.dim() == 3:
            cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)  # [b, 1, s, d]
        x1, x2 = x.chunk(2, dim=-1)
        return x * cos + torch.cat([-x2, x1], dim=-1) * sin


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

        def column(out_features: int) -> ColumnParallelLinear:
            return ctx.column_linear(cfg.hidden_size, out_features)

        self.q_proj = column(cfg.num_attention_heads * d)
        self.k_proj = column(cfg.kv_heads * d)
        self.v_proj = column(cfg.kv_heads * d)
        self.o_proj = ctx.row_linear(cfg.num_attention_heads * d, cfg.hidden_size)
        qk_norm = cfg.qk_norm
        self.q_norm = (
            RMSNorm(d, cfg.norm_eps, sharded_input_group=ctx.tp_group) if qk_norm else None
        )
        self.k_norm = (
            RMSNorm(d, cfg.norm_eps, sharded_input_group=ctx.tp_group) if qk_norm else None
        )

    def forward(
        self,
        x: torch.Tensor,
        rope: RotaryEmbedding,
        positions: torch.Tensor,
        kv_cache: KVCacheLayer | None = None,
    ) -> torch.Tensor:
        b, s, _ = x.shape
        n, g, d = self.local_heads, self.local_kv_heads, self.head_dim
        q = tp_linear(self.q_proj, x).view(b, s, n, d)  # [b, s, n/p, d]
        k = tp_linear(self.k_proj, x).view(b, s, g, d)  # [b, s, g/p, d]
        v = tp_linear(self.v_proj, x).view(b, s, g, d)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
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
        return tp_linear(self.o_proj, out)


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
        gate, up = tp_linear(self.gate_up, x).chunk(2, dim=-1)  # [b, s, f/p] each
        return tp_linear(self.down, F.silu(gate) * up)


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
