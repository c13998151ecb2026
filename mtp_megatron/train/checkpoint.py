"""Checkpoints through DeepSpeed's save/load, each folder proven complete before it is used.

Layout of ``<run_dir>/checkpoints``: one folder per tag (``step_000100``) written by DeepSpeed,
and ``latest`` (the tag of the newest complete checkpoint). A save goes: every rank writes its
shards and fsyncs them (its own only: ranks x files fsyncs would crawl on Lustre / GPFS); at a
barrier rank 0 fsyncs what no rank wrote through DeepSpeed's checkpoint engine (its helper
script), writes ``run_state.json`` (step, world size, the recipe the run used) and then
``complete.json`` (every file's size) into the folder, fsynced; only then does it move ``latest``
(atomic rename) and prune checkpoints beyond ``keep_last``.

The ranks meet through the job's store, not in collectives (``parallel/rank_zero.py``): the
slowest writer (rank 0, with the model file) may take longer than a collective may wait, so the
others wait with a bound sized for the checkpoint (DeepSpeed's own barriers inside its save
included).

So a folder without ``complete.json``, or whose files no longer have the recorded sizes, is not
a checkpoint: a crash, preemption or full disk during a save leaves the previous one usable, and
a resume (:func:`resume_candidates`) finds the newest complete folder even when ``latest`` is
missing, empty or garbage. The trainer never saves a non-finite state (``train/guard.py``), so
pruning cannot delete the last good checkpoint in favour of a diverged one.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch.distributed as dist

from mtp_megatron.parallel import rank_zero

SLOW_DISK_BYTES_PER_S = 20e6
"""The write (or read) rate a checkpoint's waiting bound assumes: a parallel file system under
load. Bounds are the collective timeout plus the bytes at this rate."""
LATEST = "latest"
COMPLETE = "complete.json"
RUN_STATE = "run_state.json"
_TAG = re.compile(r"^step_(\d+)$")


class CheckpointError(RuntimeError):
    """A checkpoint could not be written or read; the message names the file and the fix."""


def tag_for(step: int) -> str:
    return f"step_{step:06d}"


def _step_of(tag: str) -> int:
    """The step of a ``step_NNNNNN`` tag."""
    match = _TAG.match(tag)
    if match is None:
        raise ValueError(f"{tag!r} is not a step_NNNNNN checkpoint tag")
    return int(match.group(1))


def step_folders(ckpt_dir: Path) -> list[Path]:
    """Every ``step_*`` folder under ``ckpt_dir``, newest (highest step) first."""
    if not ckpt_dir.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in ckpt_dir.iterdir() if (m := _TAG.match(p.name))]
    return [p for _, p in sorted(found, reverse=True) if p.is_dir()]


def _latest_tag(ckpt_dir: Path) -> tuple[str | None, str | None]:
    """(tag, None) or (None, what is wrong with ``latest``)."""
    path = ckpt_dir / LATEST
    if not path.is_file():
        return None, f"{path} is missing"
    try:
        tag = path.read_bytes().decode("ascii").strip()
    except (OSError, UnicodeDecodeError) as e:
        return None, f"{path} is unreadable ({type(e).__name__})"
    if not tag:
        return None, f"{path} is empty"
    if not _TAG.match(tag):
        return None, f"{path} holds {tag[:40]!r}, not a step_NNNNNN tag"
    problem = verify(ckpt_dir / tag)
    if problem is not None:
        return None, f"{path} names {tag}, which {problem}"
    return tag, None


def verify(folder: Path) -> str | None:
    """None when ``folder`` is a complete checkpoint; else what is wrong (for messages)."""
    marker = folder / COMPLETE
    if not folder.is_dir():
        return "does not exist"
    try:
        files = json.loads(marker.read_text())["files"]
    except FileNotFoundError:
        return f"has no {COMPLETE} (its save never finished)"
    except (OSError, ValueError, KeyError, TypeError) as e:
        return f"has an unreadable {COMPLETE} ({type(e).__name__})"
    for rel, size in files.items():
        path = folder / rel
        if not path.is_file():
            return f"lacks {path} (deleted?)"
        actual = path.stat().st_size
        if actual != size:
            return f"has {path} of {actual:,} bytes where {size:,} were written (truncated?)"
    return None


def checkpoint_bytes(folder: Path) -> int:
    """Total size of a checkpoint folder's files."""
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def read_run_state(folder: Path) -> dict[str, Any]:
    return json.loads((folder / RUN_STATE).read_text())


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_synced(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` atomically (temp file, fsync, rename, fsync the folder)."""
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_file(path.parent)


@contextlib.contextmanager
def _recorded_saves(engine) -> Iterator[list[Path]]:
    """The files this rank's ``engine`` writes through its checkpoint engine (DeepSpeed's engine
    and pipeline module both save through it) while the block runs."""
    checkpoint_engine = engine.checkpoint_engine
    save = checkpoint_engine.save
    written: list[Path] = []

    def recording(state_dict, path, *args, **kwargs):
        result = save(state_dict, path, *args, **kwargs)
        written.append(Path(path))
        return result

    checkpoint_engine.save = recording
    try:
        yield written
    finally:
        checkpoint_engine.save = save


@contextlib.contextmanager
def _store_barriers(what: str, bound_s: float) -> Iterator[None]:
    """DeepSpeed's barriers over the whole world (inside its save) become store barriers bounded
    by ``bound_s``: a rank that finished its files waits for the one still writing without the
    process group's timeout."""
    import deepspeed.comm

    original = deepspeed.comm.barrier

    def barrier(group=None, *args, **kwargs):
        if group is not None:
            return original(group, *args, **kwargs)
        return rank_zero.barrier(what, bound_s)

    deepspeed.comm.barrier = barrier
    try:
        yield
    finally:
        deepspeed.comm.barrier = original


def _prune(ckpt_dir: Path, keep_last: int, current: str) -> None:
    """Keep the newest ``keep_last`` complete checkpoints up to ``current``; delete older step
    folders (complete or not). A newer folder (a save in progress elsewhere) is left alone."""
    current_step = _step_of(current)
    kept = 0
    for folder in step_folders(ckpt_dir):
        step = _step_of(folder.name)
        if step > current_step:
            continue
        if kept < keep_last and verify(folder) is None:
            kept += 1
            continue
        if step < current_step:
            shutil.rmtree(folder, ignore_errors=True)


def save_checkpoint(
    engine,
    ckpt_dir: Path,
    step: int,
    client_state: dict[str, Any],
    keep_last: int,
    run_state: dict[str, Any],
    bound_s: float = 600.0,
) -> str:
    """Every rank calls it. Returns the tag written; raises CheckpointError (on every rank) when
    any rank's save failed, with ``latest`` left where it was. ``bound_s``: how long a rank waits
    for the others' files (sized for the checkpoint by the caller)."""
    tag = tag_for(step)
    folder = ckpt_dir / tag
    rank, world = dist.get_rank(), dist.get_world_size()
    if rank == 0:
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        # a leftover of this step (a save that failed, a run resumed from before it) is not
        # complete: cleared, so that the marker lists only this save's files
        shutil.rmtree(folder, ignore_errors=True)
    dist.barrier()
    error, written = "", []
    what = f"write checkpoint {tag}"
    try:
        with _recorded_saves(engine) as written, _store_barriers(what, bound_s):
            engine.save_checkpoint(
                str(ckpt_dir), tag=tag, client_state=client_state, save_latest=False
            )
        for path in written:  # this rank's shards are durable before the marker
            _fsync_file(path)
    except (OSError, RuntimeError) as e:  # torch reports ENOSPC as "unexpected pos ..."
        error = f"rank {rank}: {type(e).__name__}: {e}"
    # every shard on disk, or everyone learns who failed; rank 0 then marks the checkpoint
    report = [error, [str(p) for p in written]]
    wait = rank_zero.StoreWait(what) if world > 1 else None
    if wait is not None:
        wait.post(f"rank{rank}", report)
    if rank == 0:
        reports = wait.wait([f"rank{r}" for r in range(world)], bound_s) if wait else [report]
        failed = [e for e, _ in reports if e]
        if failed:
            shutil.rmtree(folder, ignore_errors=True)
        else:
            _mark_complete(ckpt_dir, folder, step, reports, run_state, keep_last)
        if wait is not None:
            wait.post("done", failed)
    else:
        assert wait is not None
        (failed,) = wait.wait(["done"], bound_s)
    if failed:
        free = shutil.disk_usage(ckpt_dir).free
        raise CheckpointError(
            f"saving checkpoint {folder} failed ({failed[0]}); {free / 2**20:,.0f} MiB are free "
            f"on that disk{' (it is full)' if free < 2**20 * 64 else ''}. The partial folder was "
            f"removed and {ckpt_dir / LATEST} still names the previous checkpoint: free space "
            "or move train.run_dir, then resume"
        )
    return tag


def _mark_complete(
    ckpt_dir: Path,
    folder: Path,
    step: int,
    reports: list[Any],
    run_state: dict[str, Any],
    keep_last: int,
) -> None:
    """Rank 0, every rank's files on disk: the folder becomes a checkpoint, ``latest`` names
    it, older ones beyond ``keep_last`` go."""
    claimed = {path for _, paths in reports for path in paths}
    for path in sorted(folder.rglob("*")):  # what no rank saved (DeepSpeed's script copy)
        if path.is_file() and str(path) not in claimed:
            _fsync_file(path)
    _write_synced(folder / RUN_STATE, json.dumps(run_state, indent=1))
    files = {
        str(p.relative_to(folder)): p.stat().st_size
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }
    _write_synced(folder / COMPLETE, json.dumps({"step": step, "files": files}, indent=1))
    _write_synced(ckpt_dir / LATEST, folder.name)
    _prune(ckpt_dir, keep_last, folder.name)


@dataclass
class ResumePlan:
    """What a resume found under a checkpoint directory (the same on every rank)."""

    candidates: list[Path]
    """Complete checkpoints to try, newest first."""
    notes: list[str]
    """What was skipped and why (shown to the user)."""
    any_checkpoint: bool
    """Whether the directory holds anything checkpoint-like (a ``latest`` or step folders)."""


def resume_candidates(ckpt_dir: Path) -> ResumePlan:
    """The complete checkpoints to resume from, newest first, and notes on what was skipped.

    ``latest`` is only a hint: the marker is written before ``latest`` moves, so a complete
    folder newer than the one ``latest`` names is a save whose last rename did not happen."""
    folders = step_folders(ckpt_dir)
    notes = []
    tag, problem = _latest_tag(ckpt_dir)
    if problem is not None and ((ckpt_dir / LATEST).exists() or folders):
        notes.append(problem)
    candidates = []
    for folder in folders:
        why = verify(folder)
        if why is None:
            candidates.append(folder)
        elif not candidates:  # only folders newer than the one we resume from matter
            notes.append(f"{folder} {why}")
    any_checkpoint = bool(folders) or (ckpt_dir / LATEST).exists()
    return ResumePlan(candidates, notes, any_checkpoint)


def _unreadable_file(folder: Path) -> Path | None:
    """The first ``*.pt`` file in ``folder`` that torch cannot open (memory-mapped: cheap)."""
    import torch

    for path in sorted(folder.glob("*.pt")):
        try:
            torch.load(path, map_location="cpu", weights_only=False, mmap=True)
        except Exception:  # noqa: BLE001
            return path
    return None


def load_checkpoint(engine, folder: Path) -> dict[str, Any]:
    """Load ``folder`` into ``engine`` (this rank's part); its client state. Not collective:
    DeepSpeed's loader reads files only, so a failure on one rank cannot hang the others."""
    try:
        path, client_state = engine.load_checkpoint(str(folder.parent), tag=folder.name)
    except Exception as e:  # noqa: BLE001  (torch / DeepSpeed raise many kinds; name the file)
        bad = _unreadable_file(folder)
        what = f"{bad} is unreadable" if bad else "it could not be loaded"
        raise CheckpointError(f"{folder}: {what} ({type(e).__name__}: {e})") from e
    if path is None:
        raise CheckpointError(f"DeepSpeed found no checkpoint files in {folder}")
    return client_state
