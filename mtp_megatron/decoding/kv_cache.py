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
        # every row's length is max_length (plain decoding, any batch-1 step): a forward
        # writes its keys with one slice copy per layer, and a one-token step needs no mask
        self.uniform = True
        self._plan: tuple | None = None  # (key, plan): what every layer of a forward shares
        self._moves = 0  # bumped whenever lengths change (inference tensors have no _version)
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
        self._moves += 1

    def set_lengths(self, lengths: torch.Tensor, max_length: int | None = None) -> None:
        """Roll rows back (or forward) to ``lengths`` [b]; ``max_length`` is its maximum when the
        caller knows it on the host (else it is read from the device)."""
        self.lengths.copy_(lengths)
        self.max_length = int(host_read(lengths.max())) if max_length is None else max_length
        self.uniform = lengths.numel() == 1  # one row: its length is the maximum
        self._moves += 1

    def plan(self, s: int, device: torch.device):
        """(first slot or None, scatter index [b, s] or None, mask [b, 1, s, E] or None) of a
        forward of s tokens: computed by its first layer, reused by the others."""
        key = (s, self.max_length, self._moves, self.uniform)
        if self._plan is not None and self._plan[0] == key:
            return self._plan[1]
        end = self.max_length + s
        plan: tuple[int | None, torch.Tensor | None, torch.Tensor | None]
        if self.uniform:
            start = self.max_length
            mask = None  # one query sees every slot
            if s > 1:  # causal over the new block: query i sees slots 0 .. start + i
                slots = start + torch.arange(s, device=device)
                mask = (torch.arange(end, device=device)[None, :] <= slots[:, None])[None, None]
            plan = (start, None, mask)
        else:
            slots = self.lengths[:, None] + torch.arange(s, device=device)  # [b, s]
            visible = torch.arange(end, device=device)[None, None, :] <= slots[:, :, None]
            plan = (None, slots, visible[:, None])  # mask [b, 1, s, E]
        self._plan = (key, plan)
        return plan


class _LayerCache(KVCacheLayer):
    def __init__(self, owner: KVCacheSet, k: torch.Tensor, v: torch.Tensor):
        self.owner, self.k, self.v = owner, k, v

    def append(self, k: torch.Tensor, v: torch.Tensor):
        """k, v: [b, g/p, s, d] -> all keys/values [b, g/p, E, d] and mask [b, 1, s, E] (None:
        every query sees every key)."""
        b, _, s, _ = k.shape
        end = self.owner.max_length + s
        if end > self.owner.capacity:
            raise RuntimeError(
                f"KV cache overflow: {end} slots needed, capacity {self.owner.capacity}"
            )
        start, slots, mask = self.owner.plan(s, k.device)
        if start is not None:  # every row writes at the same slots
            self.k[:, :, start:end] = k
            self.v[:, :, start:end] = v
        else:
            index = slots[:, None, :, None].expand(b, k.shape[1], s, k.shape[3])
            self.k.scatter_(2, index, k)
            self.v.scatter_(2, index, v)
        return self.k[:, :, :end], self.v[:, :, :end], mask
