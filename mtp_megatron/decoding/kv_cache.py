"""Preallocated KV caches with a valid length per batch row (rows accept different draft counts).

Notation: b batch, g/p key-value heads on this TP rank, S capacity, s new tokens, d head dim.

A forward of s tokens writes row r's keys at slots lengths[r] .. lengths[r] + s - 1 and lets the
query at slot q attend to slots 0..q. Slots past a row's valid length hold stale or padding
entries; no real query ever sees them, so rolling back after a rejected draft is only
``lengths = accepted``.
"""

from __future__ import annotations

import torch

from mtp_megatron.decoding.host import host_read
from mtp_megatron.model.layers import KVCacheLayer


class KVCacheSet:
    """The caches of a stack of attention layers that advance together (one shared ``lengths``)."""

    def __init__(
        self,
        num_layers: int,
        batch: int,
        kv_heads: int,
        head_dim: int,
        capacity: int,
        device: torch.device,
        dtype: torch.dtype,
    ):
        self.capacity = capacity
        self.lengths = torch.zeros(batch, dtype=torch.long, device=device)
        self.max_length = 0  # max(lengths) on the host: appending needs no device read
        shape = (batch, kv_heads, capacity, head_dim)
        self.layers = [
            _LayerCache(
                self,
                torch.zeros(shape, device=device, dtype=dtype),
                torch.zeros(shape, device=device, dtype=dtype),
            )
            for _ in range(num_layers)
        ]

    def positions(self, s: int) -> torch.Tensor:
        """Absolute positions [b, s] of the next s tokens of each row."""
        return self.lengths[:, None] + torch.arange(s, device=self.lengths.device)

    def advance(self, s: int) -> None:
        self.lengths += s
        self.max_length += s

    def set_lengths(self, lengths: torch.Tensor, max_length: int | None = None) -> None:
        """Roll rows back (or forward) to ``lengths`` [b]; ``max_length`` is its maximum when the
        caller knows it on the host (else it is read from the device)."""
        self.lengths.copy_(lengths)
        self.max_length = int(host_read(lengths.max())) if max_length is None else max_length


class _LayerCache(KVCacheLayer):
    def __init__(self, owner: KVCacheSet, k: torch.Tensor, v: torch.Tensor):
        self.owner, self.k, self.v = owner, k, v

    def append(self, k: torch.Tensor, v: torch.Tensor):
        """k, v: [b, g/p, s, d] -> all keys/values [b, g/p, E, d] and mask [b, 1, s, E]."""
        b, _, s, _ = k.shape
        lengths = self.owner.lengths
        end = self.owner.max_length + s
        if end > self.owner.capacity:
            raise RuntimeError(
                f"KV cache overflow: {end} slots needed, capacity {self.owner.capacity}"
            )
        slots = lengths[:, None] + torch.arange(s, device=k.device)  # [b, s]
        index = slots[:, None, :, None].expand(b, k.shape[1], s, k.shape[3])
        self.k.scatter_(2, index, k)
        self.v.scatter_(2, index, v)
        visible = (
            torch.arange(end, device=k.device)[None, None, :] <= slots[:, :, None]
        )  # [b, s, E]
        return self.k[:, :, :end], self.v[:, :, :end], visible[:, None]
