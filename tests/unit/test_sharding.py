"""The one TP partition rule (parallel/sharding.py): shard and unshard are inverses, and the
stride-2 split keeps each half of a fused weight (gate | up) split over the ranks."""

import torch

from mtp_megatron.parallel.sharding import (
    Partition,
    shard,
    shard_state_dict,
    unshard,
    unshard_state_dicts,
)


def test_shard_unshard_round_trip():
    master = torch.arange(48.0).view(8, 6)
    for part in (Partition(0), Partition(1), Partition(0, stride=2), None):
        for world in (1, 2, 4 if part is None or part.dim == 0 else 2):
            pieces = [shard(master, part, r, world) for r in range(world)]
            assert torch.equal(unshard(pieces, part), master), (part, world)
    # stride 2: rank 0 holds the first quarter of each half (gate rows 0-1, up rows 4-5)
    gate_up = shard(master, Partition(0, stride=2), rank=0, world=2)
    assert torch.equal(gate_up, torch.cat([master[0:2], master[4:6]]))


def test_state_dicts_round_trip_buffers_replicated():
    master = {"w": torch.randn(4, 6), "norm": torch.randn(6), "bias_buffer": torch.randn(3)}
    parts = {"w": Partition(1), "norm": None}  # the buffer is not a parameter
    shards = [shard_state_dict(master, parts, r, 2) for r in range(2)]
    assert shards[1]["w"].shape == (4, 3) and torch.equal(shards[1]["norm"], master["norm"])
    back = unshard_state_dicts([{**s, "_extra_state": None} for s in shards], parts)
    assert back.keys() == master.keys()
    assert all(torch.equal(back[k], master[k]) for k in master)
