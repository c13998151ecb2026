"""Device-agnostic tensor-parallel collectives.

Megatron's own last-dimension gather allocates with ``torch.cuda.current_device()`` and fails on a
CPU, so the few collectives we need along the hidden / vocab dimension are written here with plain
``torch.distributed`` calls that work under gloo and NCCL alike.

Notation: p = tensor-parallel size; the last dimension of a sharded tensor is the local shard.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def _all_gather_last_dim(x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    world = dist.get_world_size(group)
    if world == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(world)]
    dist.all_gather(parts, x.contiguous(), group=group)
    return torch.cat(parts, dim=-1)  # [..., d/p] x p -> [..., d]


def _local_slice_last_dim(x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    world = dist.get_world_size(group)
    if world == 1:
        return x
    rank = dist.get_rank(group)
    return x.chunk(world, dim=-1)[rank].contiguous()  # [..., d] -> [..., d/p]


class _GatherLastDim(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
        ctx.group = group
        return _all_gather_last_dim(x, group)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        # Every rank holds the same downstream graph, so each keeps the gradient of its own shard.
        return _local_slice_last_dim(grad, ctx.group), None


class _ScatterLastDim(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
        ctx.group = group
        return _local_slice_last_dim(x, group)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return _all_gather_last_dim(grad, ctx.group), None


def gather_last_dim(x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    """[..., d/p] on each rank -> [..., d] on every rank; backward keeps the local shard's grad."""
    return _GatherLastDim.apply(x, group)


def scatter_last_dim(x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    """[..., d] replicated -> [..., d/p] local shard; backward all-gathers the gradient."""
    return _ScatterLastDim.apply(x, group)


def vocab_parallel_argmax(logits: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    """Global argmax over the vocabulary of vocab-parallel logits [..., V/p] -> [...] token ids.

    Ties resolve to the lowest id, as torch.argmax does on the full vocabulary (lower ranks own
    lower ids, and each rank's local argmax returns its first maximum).
    """
    local_max, local_idx = logits.max(dim=-1)  # [...]
    world = dist.get_world_size(group)
    if world == 1:
        return local_idx
    local_idx = local_idx + dist.get_rank(group) * logits.shape[-1]
    maxes = [torch.empty_like(local_max) for _ in range(world)]
    idxs = [torch.empty_like(local_idx) for _ in range(world)]
    dist.all_gather(maxes, local_max.contiguous(), group=group)
    dist.all_gather(idxs, local_idx.contiguous(), group=group)
    best_rank = torch.stack(maxes).argmax(dim=0, keepdim=True)  # [1, ...] first max wins
    return torch.stack(idxs).gather(0, best_rank).squeeze(0)
