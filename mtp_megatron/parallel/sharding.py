"""Megatron's tensor-parallel partition rule, in one place: shard a master tensor, unshard shards.

A TP-parallel parameter carries ``tensor_model_parallel``, ``partition_dim`` and
``partition_stride`` (set by megatron's layers). Its master is split into ``p * stride`` chunks
along ``partition_dim`` and rank r keeps chunks r, r + p, r + 2p, ... concatenated (stride 2:
the fused gate/up weight, whose two halves are each split over the ranks). Everything else is
replicated. Used by the checkpoint consolidation and loading, the LoRA experts and the tests.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class Partition:
    """How one TP-parallel tensor is split."""

    dim: int
    """The dimension split over the TP ranks."""
    stride: int = 1
    """Interleaved pieces per rank (megatron's ``partition_stride``)."""


def partition_of(param: torch.Tensor) -> Partition | None:
    """The parameter's partition, or None when it is replicated over TP ranks."""
    if not getattr(param, "tensor_model_parallel", False):
        return None
    dim = param.partition_dim  # type: ignore[attr-defined]  # set by megatron on TP parameters
    return Partition(dim, getattr(param, "partition_stride", 1))


def partitions(module: nn.Module) -> dict[str, Partition | None]:
    """name -> partition of every parameter of ``module`` (buffers are replicated)."""
    return {name: partition_of(p) for name, p in module.named_parameters()}


def shard(master: torch.Tensor, part: Partition | None, rank: int, world: int) -> torch.Tensor:
    """This rank's slice of ``master`` (the master itself when replicated or world == 1)."""
    if part is None or world == 1:
        return master
    chunks = master.chunk(world * part.stride, dim=part.dim)
    return torch.cat(chunks[rank::world], dim=part.dim)


def unshard(shards: list[torch.Tensor], part: Partition | None) -> torch.Tensor:
    """The master tensor from every rank's shard, in rank order (inverse of :func:`shard`)."""
    if part is None or len(shards) == 1:
        return shards[0]
    pieces = [s.chunk(part.stride, dim=part.dim) for s in shards]  # pieces[rank][j]
    ranks = range(len(shards))
    return torch.cat([pieces[r][j] for j in range(part.stride) for r in ranks], dim=part.dim)


def unshard_state_dicts(
    shards: Sequence[Mapping[str, torch.Tensor]], parts: Mapping[str, Partition | None]
) -> dict[str, torch.Tensor]:
    """Per-TP-rank state dicts -> one master (TP=1) state dict; names not in ``parts``
    (buffers) are taken from rank 0, non-tensor entries dropped."""
    return {
        name: unshard([s[name] for s in shards], parts.get(name))
        for name, first in shards[0].items()
        if torch.is_tensor(first)
    }


def shard_state_dict(
    master: Mapping[str, torch.Tensor],
    parts: Mapping[str, Partition | None],
    rank: int,
    world: int,
) -> dict[str, torch.Tensor]:
    """A master state dict -> this TP rank's (inverse of :func:`unshard_state_dicts`)."""
    return {name: shard(t, parts.get(name), rank, world) for name, t in master.items()}
