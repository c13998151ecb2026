"""Train/validation split and training-document order, both decided per document path.

Each path gets a stable number u in [0, 1) from blake2b(path, seed); the document is held out
when u < validation_fraction. A document's side therefore depends on nothing but its own path
and the seed: reordering files, or adding and removing other files, never moves it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from mtp_megatron.config import ConfigError
from mtp_megatron.data.cache import unit_hash


def split_indices(
    paths: Sequence[str],
    fraction: float,
    seed: int,
    log: Callable[[str], None] = print,
) -> tuple[list[int], list[int]]:
    """(train, validation) row indices of ``paths``, each in the order of ``paths``."""
    if len(paths) < 2:
        raise ConfigError(
            f"the corpus has {len(paths)} document(s); a train/validation split needs at least 2 "
            "(use a directory of files or a .jsonl/.parquet file with several rows)"
        )
    u = [unit_hash("split", seed, p) for p in paths]
    val = [i for i, x in enumerate(u) if x < fraction]
    train = [i for i, x in enumerate(u) if x >= fraction]
    # A tiny corpus can leave a side empty: move the one document nearest the threshold, so the
    # choice is still a function of the paths alone.
    if not val:
        val = [min(train, key=lambda i: u[i])]
        train.remove(val[0])
        log(f"data: no document hashed into validation; holding out {paths[val[0]]}")
    elif not train:
        train = [max(val, key=lambda i: u[i])]
        val.remove(train[0])
        log(f"data: no document hashed into train; training on {paths[train[0]]}")
    return train, val


def shuffled(indices: Sequence[int], paths: Sequence[str], seed: int) -> list[int]:
    """``indices`` ordered by a hash of their path: a shuffle that ignores the other documents."""
    return sorted(indices, key=lambda i: (unit_hash("order", seed, paths[i]), paths[i]))
