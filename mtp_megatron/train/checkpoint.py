"""Checkpoints through DeepSpeed's save/load, with a crash-safe ``latest`` pointer.

Layout of ``<run_dir>/checkpoints``: one folder per tag (``step_000100``) written by DeepSpeed,
and ``latest`` (the tag of the newest *complete* checkpoint, the file DeepSpeed's loader reads).
Every rank writes its shards, all ranks meet at a barrier, and only then does rank 0 replace
``latest`` atomically and delete checkpoints beyond ``keep_last``. A crash or preemption during a
save leaves ``latest`` on the previous complete checkpoint.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch.distributed as dist

LATEST = "latest"
_TAG = re.compile(r"^step_(\d+)$")


def tag_for(step: int) -> str:
    return f"step_{step:06d}"


def read_latest(ckpt_dir: Path) -> str | None:
    """The tag ``latest`` points at, if it exists and its folder is there."""
    path = ckpt_dir / LATEST
    if not path.is_file():
        return None
    tag = path.read_text().strip()
    return tag if (ckpt_dir / tag).is_dir() else None


def _write_latest(ckpt_dir: Path, tag: str) -> None:
    tmp = ckpt_dir / f".{LATEST}.tmp"
    with open(tmp, "w") as f:
        f.write(tag)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, ckpt_dir / LATEST)


def _prune(ckpt_dir: Path, keep_last: int, current: str) -> None:
    tags = sorted(
        (int(m.group(1)), p.name)
        for p in ckpt_dir.iterdir()
        if p.is_dir() and (m := _TAG.match(p.name))
    )
    complete_until = int(_TAG.match(current).group(1))
    # keep the newest `keep_last` complete ones; never touch a (partial) newer folder
    old = [name for step, name in tags if step <= complete_until]
    for name in old[:-keep_last]:
        shutil.rmtree(ckpt_dir / name, ignore_errors=True)


def save_checkpoint(
    engine, ckpt_dir: Path, step: int, client_state: dict[str, Any], keep_last: int
) -> str:
    """Collective: every rank calls it. Returns the tag written."""
    tag = tag_for(step)
    if dist.get_rank() == 0:
        ckpt_dir.mkdir(parents=True, exist_ok=True)
    dist.barrier()
    engine.save_checkpoint(str(ckpt_dir), tag=tag, client_state=client_state, save_latest=False)
    dist.barrier()  # every rank's shards are on disk
    if dist.get_rank() == 0:
        _write_latest(ckpt_dir, tag)
        _prune(ckpt_dir, keep_last, tag)
    dist.barrier()
    return tag


def load_latest(engine, ckpt_dir: Path) -> dict[str, Any] | None:
    """Load the newest complete checkpoint into ``engine``; its client state, or None."""
    tag = read_latest(ckpt_dir)
    if tag is None:
        return None
    path, client_state = engine.load_checkpoint(str(ckpt_dir), tag=tag)
    if path is None:
        raise RuntimeError(f"DeepSpeed could not load checkpoint {ckpt_dir / tag}")
    return client_state
