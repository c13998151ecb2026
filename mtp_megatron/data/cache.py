"""Cache primitives: stable digests, atomic file writes and an inter-process lock.

A cache file is either absent or complete: every write goes to a temporary file in the same
directory and is moved into place with ``os.replace`` (atomic on POSIX), so a crash mid-write
leaves at most a stray ``*.tmp`` that nothing reads.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

import numpy as np


def file_sha256(path: str | Path) -> str:
    """sha256 hex digest of a file's bytes, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def files_sha256(paths: list[str]) -> str:
    """sha256 over the files' contents, in order (of their own sha256 digests)."""
    return hashlib.sha256("".join(file_sha256(f) for f in paths).encode()).hexdigest()


def read_json(path: Path) -> dict | None:
    """A JSON file's content; None when it is missing or unreadable (a record to redo)."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def digest(*parts: str | bytes, size: int = 16) -> str:
    """blake2b hex digest of the parts, each length-prefixed so ('ab', 'c') != ('a', 'bc')."""
    h = hashlib.blake2b(digest_size=size)
    for part in parts:
        data = part.encode() if isinstance(part, str) else part
        h.update(len(data).to_bytes(8, "little"))
        h.update(data)
    return h.hexdigest()


def unit_hash(tag: str, seed: int, key: str) -> float:
    """A stable number in [0, 1) for (tag, seed, key); unlike hash(), equal across processes."""
    raw = hashlib.blake2b(f"{tag}\0{seed}\0{key}".encode(), digest_size=8).digest()
    return int.from_bytes(raw, "big") / 2**64


def atomic_write(path: Path, write: Callable[[IO[bytes]], None]) -> None:
    """Write ``path`` through ``write(file)`` into a temp file, fsync, then rename into place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; other users' jobs may share the cache
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    data = text.encode()

    def write(f: IO[bytes]) -> None:
        f.write(data)

    atomic_write(path, write)


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=1, sort_keys=True) + "\n")


def atomic_save_npy(path: Path, array: np.ndarray) -> None:
    atomic_write(path, lambda f: np.save(f, array, allow_pickle=False))


@contextlib.contextmanager
def file_lock(path: Path, log: Callable[[str], None] = print) -> Iterator[None]:
    """Hold an exclusive ``fcntl.flock`` on ``path`` (created if missing) for the block.

    The kernel releases it when the process dies, so a crashed builder never blocks the others.
    flock works between processes of one machine; on network file systems it depends on the mount.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+b") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log(f"data: waiting for {path} (another process is building the cache)")
            fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)
