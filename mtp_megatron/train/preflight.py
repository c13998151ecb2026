"""Checks before step 1 of what would otherwise fail after N steps: the checkpoint directory is
writable by every rank, its disk has room for the checkpoints a run keeps plus the one it writes
before pruning, validation has a batch per rank.
"""

from __future__ import annotations

import os
import shutil
import socket
from pathlib import Path

import torch
import torch.distributed as dist

from mtp_megatron.config import ConfigError

MiB = 2**20


def write_problem(folder: Path) -> str | None:
    """None when this process can create, write and delete a file in ``folder`` (created if
    missing); else what went wrong."""
    probe = folder / f".write_probe.{socket.gethostname()}.{os.getpid()}"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with open(probe, "wb") as f:
            f.write(b"probe")
            f.flush()
            os.fsync(f.fileno())
        probe.unlink()
    except OSError as e:
        return f"{type(e).__name__}: {e.strerror or e} ({e.filename or folder})"
    return None


def check_writable(folder: Path) -> None:
    """Collective: refuse to start unless every rank can write into ``folder``."""
    problem = write_problem(folder) or ""
    problems: list[str] = [""] * dist.get_world_size()
    dist.all_gather_object(problems, problem)
    bad = [(r, p) for r, p in enumerate(problems) if p]
    if bad:
        rank, what = bad[0]
        raise ConfigError(
            f"the checkpoint directory {folder} is not writable by rank {rank} "
            f"({len(bad)} of {len(problems)} ranks): {what}; set train.run_dir to a writable "
            "folder (on a filesystem every node shares)"
        )


def estimate_checkpoint_bytes(module: torch.nn.Module, bf16: bool) -> int:
    """Collective: bytes of one checkpoint of the whole job, from the parameter counts.

    Per parameter: the weights (2 B bf16 / 4 B fp32), AdamW's two fp32 moments, and an fp32
    master copy when training in bf16."""
    from megatron.core import parallel_state

    local = sum(getattr(p, "ds_numel", p.numel()) for p in module.parameters())
    total = torch.tensor([float(local)])
    dist.all_reduce(total)  # shards of every rank, replicas counted once per DP rank:
    unique = total.item() / parallel_state.get_data_parallel_world_size()
    per_param = (2 + 12) if bf16 else (4 + 8)
    return int(unique * per_param)


def check_free_space(folder: Path, checkpoint_bytes: int, keep_last: int) -> None:
    """Refuse to start when ``folder``'s disk has less room than ``keep_last + 1`` checkpoints:
    the ``keep_last`` kept ones, and the next, written before the oldest is pruned."""
    count = keep_last + 1
    free = shutil.disk_usage(folder).free
    need = count * checkpoint_bytes
    if free < need:
        raise ConfigError(
            f"the disk of {folder} has {free / MiB:,.0f} MiB free, less than {count} checkpoints "
            f"of about {checkpoint_bytes / MiB:,.0f} MiB each ({need / MiB:,.0f} MiB: "
            f"train.keep_last={keep_last}, and the next one is written before the oldest is "
            "deleted): free space, lower train.keep_last, or set train.run_dir to a larger disk"
        )
