"""MTP head types: what each one builds (the one module a new head type is added to).

Notation: b batch, s sequence, h hidden, p tensor-parallel size.

Every head type with parameters is, per step, ``final_norm(block(x))`` where x is the chained
projection ``eh_proj([enorm(e_{i+k}); hnorm(h^{k-1})])`` or, for independent heads, the trunk
output z (see ``model/mtp.py``, which owns the arrangement). A head type only chooses ``block``:

- 'transformer': one decoder layer (attention + SwiGLU), as DeepSeek-V3's MTP module;
- 'mlp': the SwiGLU block alone, x + norm(SwiGLU(x));
- 'linear': a residual SiLU block x + W2 SiLU(W1 x), no norm inside: the cheap non-attention
  heads of Meta's ablation (arXiv:2404.19737 Table S4) in the form of Medusa's heads
  (arXiv:2401.10774, whose block is x + SiLU(W x); W2 lets the update leave SiLU's range);
- 'shared_lm_head': no block and no parameters (the trunk's final norm and output layer).

The names a recipe may use are ``config.mtp.HeadTypeName`` (torch-free, for recipe checks); a
test and the check at the bottom keep the two lists equal.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from mtp_megatron.config import ConfigError
from mtp_megatron.config.mtp import HEAD_TYPES as HEAD_TYPE_NAMES
from mtp_megatron.config.mtp import PARAMETER_FREE_HEAD_TYPES
from mtp_megatron.model.layers import MLPLayer, TransformerLayer
from mtp_megatron.model.specs import LayerContext


class LinearResidualBlock(nn.Module):
    """x + W2 SiLU(W1 x), both h x h: W1 column-parallel, W2 row-parallel (one all-reduce)."""

    def __init__(self, ctx: LayerContext):
        super().__init__()
        h = ctx.cfg.hidden_size
        self.up = ctx.column_linear(h, h)
        self.down = ctx.row_linear(h, h)

    def forward(self, x: torch.Tensor, rope=None, positions=None, kv_cache=None) -> torch.Tensor:
        """[b, s, h] -> [b, s, h]; no attention, so no KV cache."""
        return x + self.down(F.silu(self.up(x)))  # up: [b, s, h/p]


@dataclass(frozen=True)
class HeadType:
    """How one head type builds a step's block."""

    block: Callable[[LayerContext], nn.Module] | None
    """Builds the block (called x -> [b, s, h] with rope, positions, kv_cache); None: no
    parameters at all (no projection, no block, the trunk's final norm)."""
    has_attention: bool = False
    """The block attends over the sequence, so decoding keeps a KV cache for it."""


HEAD_TYPES: dict[str, HeadType] = {
    "transformer": HeadType(TransformerLayer, has_attention=True),
    "mlp": HeadType(MLPLayer),
    "linear": HeadType(LinearResidualBlock),
    "shared_lm_head": HeadType(None),
}


def head_type(name: str) -> HeadType:
    """The head type called ``name``; an unknown one is an error naming the known ones."""
    if name not in HEAD_TYPES:
        raise ConfigError(
            f"mtp.mtp_head_type={name!r} is invalid: must be one of {tuple(HEAD_TYPES)}"
        )
    return HEAD_TYPES[name]


def _check_tables() -> None:
    names, free = set(HEAD_TYPE_NAMES), set(PARAMETER_FREE_HEAD_TYPES)
    built_free = {n for n, t in HEAD_TYPES.items() if t.block is None}
    if set(HEAD_TYPES) != names or built_free != free:
        raise RuntimeError(
            f"model/heads.py builds {sorted(HEAD_TYPES)} (parameter-free {sorted(built_free)}) "
            f"but config.mtp.HeadTypeName names {sorted(names)} (parameter-free {sorted(free)}): "
            "add a new head type to both tables"
        )


_check_tables()
