"""MoDr LoRA experts on tensor-parallel linear layers (the ETD think block's branches).

Notation: b batch, s sequence, p tensor-parallel size, E experts, r LoRA rank, i / o a base
layer's input / output features. Every expert's A is stacked into one [E r, i] matrix and every B
into one [o, E r] matrix, so all branches are one pair of matmuls; a token's routing weights
(one-hot of its expert times the router's gate, [b, s, E]) zero the other experts' r columns:

    y = base(x) + scale * B ((A x) * route)

Sharding follows the base weight, so no extra activation is gathered:

- column-parallel base W [o/p, i] (input replicated, output sharded): B [o/p, E r] sharded on its
  output dim with the base's stride (fused gate/up), A replicated. Each rank's A x is complete;
  the copy-to-TP-region on (A x) * route all-reduces its gradient in backward, because each rank
  only sees the part coming from its output shard (the grads of A, the gate and x are sums).
- row-parallel base W [o, i/p] (input sharded, output all-reduced): A [E r, i/p] sharded on its
  input dim, B replicated. A x is a partial sum: one all-reduce of the small [b, s, E r] tensor
  (cheaper than folding the LoRA output into the base's [b, s, o] all-reduce, which megatron's
  RowParallelLinear does inside its forward).

Master weights are created whole and sliced (as megatron's CPU initialisation does), so the same
seed gives the same experts at every TP size; tensor-parallel ones carry megatron's partition
attributes (checkpoint merging and the tests' gathers read them).
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import cast

import torch
import torch.nn.functional as F
from megatron.core.tensor_parallel import (
    copy_to_tensor_model_parallel_region,
    reduce_from_tensor_model_parallel_region,
)
from megatron.core.tensor_parallel.layers import set_tensor_model_parallel_attributes
from torch import nn

from mtp_megatron.config import ETDConfig
from mtp_megatron.model.layers import TransformerLayer
from mtp_megatron.model.specs import LayerContext, ParallelMode
from mtp_megatron.parallel.sharding import Partition, shard


class ExpertRouting:
    """The routing weights [b, s, E] of the think-block iteration being run (None outside one).

    One object is shared by every LoRA branch of the think block; the ETD trunk sets it around
    each layer call, and an activation-checkpointed layer's recomputation runs inside
    :meth:`replay` of its call (``model/recompute.py``), so it sees its own iteration's weights.
    """

    def __init__(self) -> None:
        self.weights: torch.Tensor | None = None

    @contextmanager
    def use(self, weights: torch.Tensor | None):
        previous, self.weights = self.weights, weights
        try:
            yield
        finally:
            self.weights = previous

    def replay(self):
        """A context that sets the current weights again (made at a call, entered later)."""
        return self.use(self.weights)


def _sharded(master: torch.Tensor, dim: int, stride: int, ctx: LayerContext) -> nn.Parameter:
    """This rank's slice of a master weight, split like megatron's (``parallel/sharding.py``)."""
    tp = ctx.tp_size
    rank = torch.distributed.get_rank(ctx.tp_group) if tp > 1 else 0
    param = nn.Parameter(shard(master, Partition(dim, stride), rank, tp).clone())
    set_tensor_model_parallel_attributes(param, True, dim, stride)
    return param


class LoRAExperts(nn.Module):
    """A linear layer (either backend's, ``model/specs.py``) plus E routed LoRA branches; same
    call and return as the base (``forward(x) -> y``)."""

    def __init__(
        self,
        base: nn.Module,
        ctx: LayerContext,
        etd: ETDConfig,
        routing: ExpertRouting,
    ):
        super().__init__()
        self.base = base
        self.routing = routing
        self.kind = cast(ParallelMode, base.parallel_mode)
        self.tp_group = ctx.tp_group
        self.experts, self.rank = etd.num_lora_experts, etd.lora_rank
        self.scale = etd.lora_alpha / etd.lora_rank
        width = self.experts * self.rank
        dtype = cast(torch.Tensor, base.weight).dtype
        a = torch.empty(width, cast(int, base.input_size), dtype=dtype)
        ctx.init(a)
        b = torch.zeros(cast(int, base.output_size), width, dtype=dtype)  # LoRA: starts at 0
        if self.kind == "column":
            stride = getattr(base.weight, "partition_stride", 1)
            self.lora_a = nn.Parameter(a)  # [E r, i] replicated
            self.lora_b = _sharded(b, 0, stride, ctx)  # [o/p, E r]
        else:
            self.lora_a = _sharded(a, 1, 1, ctx)  # [E r, i/p]
            self.lora_b = nn.Parameter(b)  # [o, E r] replicated

    def forward(self, x: torch.Tensor, weight: torch.Tensor | None = None):
        out = self.base(x) if weight is None else self.base(x, weight)
        route = self.routing.weights  # [b, s, E]
        if route is None:
            return out
        u = F.linear(x, self.lora_a)  # [b, s, E r] (row-parallel: this rank's partial sum)
        if self.kind == "row":
            u = reduce_from_tensor_model_parallel_region(u, group=self.tp_group)
        u = (u.unflatten(-1, (self.experts, self.rank)) * route[..., None]).flatten(-2)
        if self.kind == "column":
            u = copy_to_tensor_model_parallel_region(u, group=self.tp_group)
        return out + self.scale * F.linear(u, self.lora_b)  # [b, s, o/p] or [b, s, o]


def add_lora_experts(
    layer: TransformerLayer, ctx: LayerContext, etd: ETDConfig, routing: ExpertRouting
) -> None:
    """Replace q, k, v, o and the SwiGLU gate/up and down projections of ``layer`` in place."""
    attn, mlp = layer.attention.inner, layer.mlp.inner
    for module, name in (
        (attn, "q_proj"),
        (attn, "k_proj"),
        (attn, "v_proj"),
        (attn, "o_proj"),
        (mlp, "gate_up"),
        (mlp, "down"),
    ):
        setattr(module, name, LoRAExperts(getattr(module, name), ctx, etd, routing))
