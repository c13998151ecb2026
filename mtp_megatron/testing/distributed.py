"""Run a function in N gloo processes (torch.distributed on CPU) and collect rank 0's result."""

from __future__ import annotations

import os
import socket
import tempfile
from collections.abc import Callable
from typing import Any

import torch
import torch.multiprocessing as mp


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, world: int, port: int, out: str, fn: Callable, args: tuple) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world),
        OMP_NUM_THREADS="1",
    )
    torch.set_num_threads(1)
    import mtp_megatron  # noqa: F401  (quiets megatron's import warnings)
    from mtp_megatron.parallel import destroy_parallel

    try:
        result = fn(rank, world, *args)
        torch.save(result, os.path.join(out, f"rank{rank}.pt"))
    finally:
        destroy_parallel()


MARKERS_ENV = "MTP_TEST_MARKERS"
"""Set by the suite's conftest to the running test's marker names (comma-separated)."""


def _require_distributed_marker() -> None:
    """Under pytest, a test that spawns processes must be marked ``distributed``, so that the
    fast tier (``-m 'not distributed'``) stays one-process."""
    markers = os.environ.get(MARKERS_ENV)
    if markers is not None and "distributed" not in markers.split(","):
        test = os.environ.get("PYTEST_CURRENT_TEST", "this test").split(" ")[0]
        raise RuntimeError(f"{test} spawns processes: mark it @pytest.mark.distributed")


def run_distributed(fn: Callable, world_size: int, *args: Any) -> list[Any]:
    """Call ``fn(rank, world_size, *args)`` in ``world_size`` spawned processes.

    The processes see torchrun's environment variables, so ``initialize_parallel`` joins them into
    one gloo world. Returns every rank's return value (they must be picklable by torch.save).
    """
    _require_distributed_marker()
    with tempfile.TemporaryDirectory() as out:
        mp.spawn(_entry, args=(world_size, _free_port(), out, fn, args), nprocs=world_size)
        return [torch.load(os.path.join(out, f"rank{r}.pt")) for r in range(world_size)]


def gather_full_tensor(t: torch.Tensor, param: torch.nn.Parameter, group) -> torch.Tensor:
    """Reassemble a TP-sharded tensor (a parameter or its gradient) into the master layout.

    Megatron slices with a stride: the master is split into ``p * stride`` chunks along
    ``partition_dim`` and rank r holds chunks r, r + p, ... concatenated.
    """
    import torch.distributed as dist

    from mtp_megatron.parallel.sharding import partition_of, unshard

    part = partition_of(param)
    if part is None or dist.get_world_size(group) == 1:
        return t.detach().clone()
    shards = [torch.empty_like(t) for _ in range(dist.get_world_size(group))]
    dist.all_gather(shards, t.contiguous(), group=group)
    return unshard(shards, part)
