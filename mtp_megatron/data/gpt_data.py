"""Blends of Megatron indexed datasets read through megatron-core's GPTDataset, without its
sharp edges.

megatron-core's ``BlendedMegatronDatasetBuilder`` builds a ``GPTDataset`` per prefix and a
``BlendedDataset`` over them (a sample is a pure function of its index given the data, seed,
sequence length, blend and the requested number of samples). Its index cache is keyed without
the data's content, written with plain ``numpy.save`` (a killed writer leaves a truncated file
trusted forever) and assumes a directory every rank sees. Here:

- the cache lives under ``cache_root/<key>/``, the key hashing every prefix's path and ``.idx``
  (the document lengths the indices are made from), the weights, sequence length, seed, sample
  counts, end-of-document id, vocabulary and the megatron-core version: changed data can never
  hit stale indices;
- global rank 0 holds a file lock through the build and writes ``complete.json`` last; an entry
  without it is removed and rebuilt; the other ranks load after a barrier;
- before anything is built, every rank checks that it sees the file rank 0 wrote into the entry
  (a cache directory that is not shared gives a clear error on every rank, not a hang);
- ``create_attention_mask=False`` and ``split=None`` (``blend_per_split``: the train /
  validation split is the prepared dataset's own, per document).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import secrets
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch.distributed as dist

from mtp_megatron.config import ConfigError
from mtp_megatron.config.base import is_number
from mtp_megatron.data.cache import atomic_write_json, file_lock, file_sha256

MARKER = "complete.json"
_PROBE = "owner.json"


@dataclass(frozen=True)
class BlendPart:
    """One dataset of a blend."""

    prefix: str
    """A Megatron indexed dataset (``prefix.bin`` / ``prefix.idx``)."""
    weight: float = 1.0
    """Its share of the samples (normalised over the blend)."""


class _EodTokenizer:
    """What GPTDataset reads of a tokenizer: its end-of-document id and vocabulary size (the
    data is tokenized already; no pad token: every position is trained on)."""

    def __init__(self, eod: int, vocab_size: int):
        self.eod, self.vocab_size, self.pad = eod, vocab_size, -1
        self.unique_identifiers = {"class": "EodTokenizer", "eod": eod, "vocab_size": vocab_size}


@dataclass
class GPTData:
    """The built datasets: ``train[i]`` / ``validation[i]`` give megatron's sample dicts."""

    train: Any
    """Megatron's (blended) GPTDataset: ``len`` and ``[i]``."""
    validation: Any
    """The same for validation (None when no validation samples were asked for)."""
    cache_dir: Path
    """This build's cache entry."""
    key: str
    """Its name: the hash of what the samples depend on (``_cache_key``)."""
    train_key: str
    """The hash of the training data, its sequence length and seed (a resume must keep it)."""
    built: bool
    """True when this call built the entry (False: it was complete already)."""


def _check_parts(parts: list[BlendPart], name: str) -> None:
    if not parts:
        raise ConfigError(f"data.{name}: the blend is empty; list at least one prefix")
    for part in parts:
        missing = [s for s in (".bin", ".idx") if not Path(part.prefix + s).is_file()]
        if missing:
            raise ConfigError(
                f"data.{name}: {part.prefix} is no indexed dataset (no {' / '.join(missing)}); "
                "write one with `python -m mtp_megatron prepare`"
            )
        if not (is_number(part.weight) and part.weight > 0):
            raise ConfigError(f"data.{name}: weight {part.weight!r} of {part.prefix} must be > 0")


def _blend_identity(blend: list[BlendPart] | None) -> list[tuple[str, float, str]]:
    """(path, weight, .idx sha256) of each prefix: what a blend's indices are made from."""
    return [(p.prefix, p.weight, file_sha256(Path(p.prefix + ".idx"))) for p in blend or []]


def _cache_key(
    train: list[tuple],
    validation: list[tuple],
    seq_len: int,
    seed: int,
    samples: tuple[int, int],
    eod_id: int,
    vocab_size: int,
) -> str:
    """What the indices depend on, hashed (see the module doc); the prefixes' paths too, which
    megatron's own file names inside the entry include."""
    from importlib.metadata import version

    body = {
        "train": train,
        "validation": validation,
        "seq_len": seq_len,
        "seed": seed,
        "samples": list(samples),
        "eod_id": eod_id,
        "vocab_size": vocab_size,
        "megatron_core": version("megatron-core"),
    }
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()[:32]


def world() -> tuple[int, int]:
    """(global rank, world size) of the default group; (0, 1) without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _agree_shared(entry: Path, rank: int, world: int, failure: str | None) -> None:
    """Every rank sees the token rank 0 wrote into ``entry``, or every rank raises (also when
    rank 0 reports a ``failure``)."""
    token = [secrets.token_hex(8) if rank == 0 else None, failure]
    if rank == 0 and failure is None:
        try:
            atomic_write_json(entry / _PROBE, {"token": token[0], "host": os.uname().nodename})
        except OSError as e:
            token[1] = f"cannot write to the data cache {entry}: {e}"
    if world > 1:
        dist.broadcast_object_list(token, src=0)
    if token[1] is not None:
        raise ConfigError(token[1])
    if world == 1:
        return
    probe = entry / _PROBE
    sees = probe.is_file() and json.loads(probe.read_text()).get("token") == token[0]
    flags: list = [None] * world
    dist.all_gather_object(flags, (sees, os.uname().nodename))
    blind = [f"rank {r} ({host})" for r, (ok, host) in enumerate(flags) if not ok]
    if blind:
        raise ConfigError(
            f"the data cache {entry.parent} is not shared by every rank: {', '.join(blind)} "
            f"cannot see what rank 0 wrote there; set data.cache_dir to a directory on a file "
            "system every node mounts (e.g. the run's shared storage)"
        )


def build_gpt_data(
    train: list[BlendPart],
    validation: list[BlendPart] | None,
    *,
    seq_len: int,
    seed: int,
    train_samples: int,
    validation_samples: int,
    eod_id: int,
    vocab_size: int,
    cache_root: str | Path,
) -> GPTData:
    """The blended train (and validation) GPTDatasets; collective over the default group."""
    _check_parts(train, "train")
    if validation is not None:
        _check_parts(validation, "validation")
    samples = (train_samples, validation_samples if validation else 0)
    train_id, validation_id = _blend_identity(train), _blend_identity(validation)
    key = _cache_key(train_id, validation_id, seq_len, seed, samples, eod_id, vocab_size)
    # the training data alone (validation settings may change on resume; the sample total is
    # recorded and compared on its own)
    train_key = _cache_key(train_id, [], seq_len, seed, (0, 0), eod_id, vocab_size)
    root = Path(cache_root).resolve()
    entry = root / key
    rank, size = world()
    with contextlib.ExitStack() as held:
        # rank 0 holds the entry's lock through the build and the marker: another job with the
        # same key waits instead of removing or marking a half-written entry
        built, failure = False, None
        if rank == 0:
            try:
                held.enter_context(file_lock(root / f"{key}.lock", log=lambda _: None))
                if not (entry / MARKER).is_file():
                    shutil.rmtree(entry, ignore_errors=True)  # a crashed build's leftovers
                    built = True
                entry.mkdir(parents=True, exist_ok=True)
            except OSError as e:  # told to every rank below, so none waits in a collective
                failure = f"cannot prepare the data cache {entry}: {e}"
        _agree_shared(entry, rank, size, failure)
        data = _build(train, validation, seq_len, seed, samples, eod_id, vocab_size, entry)
        if rank == 0 and built:
            atomic_write_json(entry / MARKER, {"key": key, "samples": list(samples)})
        if size > 1:
            dist.barrier()
    return GPTData(data[0], data[1], entry, key, train_key, built)


def _build(train, validation, seq_len, seed, samples, eod_id, vocab_size, entry):
    """megatron's builder: global rank 0 first, then (after its barrier) the others."""
    from megatron.core.datasets.blended_megatron_dataset_builder import (
        BlendedMegatronDatasetBuilder,
    )
    from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig

    def blend(parts):
        return ([p.prefix for p in parts], [float(p.weight) for p in parts]) if parts else None

    config = GPTDatasetConfig(
        random_seed=seed,
        sequence_length=seq_len,
        blend_per_split=[blend(train), blend(validation), None],
        path_to_cache=str(entry),
        tokenizer=_EodTokenizer(eod_id, vocab_size),
        reset_position_ids=False,
        reset_attention_mask=False,
        eod_mask_loss=False,
        create_attention_mask=False,
    )
    sizes = [samples[0], samples[1] if validation else None, None]
    train_ds, valid_ds, _ = BlendedMegatronDatasetBuilder(
        GPTDataset, sizes, lambda: True, config
    ).build()
    return train_ds, valid_ds
