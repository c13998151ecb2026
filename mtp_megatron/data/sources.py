"""A recipe's ``data.source`` (the stdlib, local files or a hub dataset ``hf:NAME``, parsed once by
``config.data.resolve_source``) as a prepared dataset.

On first use ``prepare`` (``prepare_indexed.py``) tokenizes the source into
``cache_dir/datasets/<key>/``, the key hashing the source and every setting that shapes the
dataset (tokenizer, end-of-document token, text field, split, limits). Every later start runs it
again: it re-hashes the input files and reuses each unchanged shard, so it is a no-op when
nothing changed and rebuilds only the changed shards when a file changed. Global rank 0
prepares, under the cache's file lock (another job on the same cache waits); the other ranks
wait for its verdict, so a failure reaches every rank instead of leaving them in a collective.
"""

from __future__ import annotations

import json
import os
import sysconfig
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch.distributed

from mtp_megatron.config import ConfigError
from mtp_megatron.config.data import (
    BPE_PREFIX,
    DataConfig,
    HubDataset,
    PrepareConfig,
    StdlibSource,
    resolve_source,
)
from mtp_megatron.data.cache import digest, file_lock
from mtp_megatron.data.gpt_data import world
from mtp_megatron.data.prepare_indexed import prepare

NOT_STDLIB = ("site-packages", "dist-packages")
"""Third-party packages installed into the interpreter differ between machines."""
DEFAULT_TOKENIZER = f"{BPE_PREFIX}4096"
"""``data.tokenizer`` unset: the project's byte-level BPE of 4,096 tokens, trained on the train
split."""


def source_prepare_config(cfg: DataConfig) -> PrepareConfig:
    """What ``prepare`` is asked to do for ``cfg.source``, its output under the cache."""
    tokenizer = cfg.tokenizer or DEFAULT_TOKENIZER
    if not tokenizer.startswith(BPE_PREFIX):
        tokenizer = os.path.abspath(tokenizer)
    source = resolve_source(cfg.source)
    inputs: list[str]
    suffixes: tuple[str, ...]
    exclude: tuple[str, ...]
    if isinstance(source, StdlibSource):
        inputs, suffixes, exclude = [sysconfig.get_paths()["stdlib"]], (".py",), NOT_STDLIB
    else:  # a hub dataset's name (``prepare`` exports it) or the local path
        given = str(source) if isinstance(source, HubDataset) else source.path
        inputs, suffixes, exclude = [given], PrepareConfig.suffixes, ()
    settings: dict[str, Any] = {
        "inputs": inputs,
        "suffixes": suffixes,
        "exclude_dirs": exclude,
        "tokenizer": tokenizer,
        "eod_token": cfg.eod_token,
        "text_field": cfg.text_field,
        "validation_fraction": cfg.validation_fraction,
        "split_seed": cfg.split_seed,
        "max_files": cfg.max_files,
        "max_bytes": cfg.max_bytes,
    }
    key = digest(json.dumps(settings, sort_keys=True))[:20]
    output = Path(cfg.cache_dir).resolve() / "datasets" / key
    return PrepareConfig(output=str(output), workers=cfg.prepare_workers, **settings)


def prepare_source(cfg: DataConfig, log: Callable[[str], None] = print) -> Path:
    """The prepared dataset directory of ``cfg.source`` (made or brought up to date on global
    rank 0); collective over the default group when one exists."""
    pcfg = source_prepare_config(cfg)
    rank, size = world()
    verdict: list = [None]
    error: BaseException | None = None
    if rank == 0:
        try:
            with file_lock(Path(cfg.cache_dir).resolve() / "datasets.lock", log):
                prepare(pcfg, log)
        except Exception as e:  # told to every rank below, so none waits in a collective
            error = e
            verdict[0] = str(e) if isinstance(e, ConfigError) else f"{type(e).__name__}: {e}"
    if size > 1:
        torch.distributed.broadcast_object_list(verdict, src=0)
    if error is not None:
        raise error
    if verdict[0] is not None:
        raise ConfigError(f"rank 0 could not prepare data.source={cfg.source!r}: {verdict[0]}")
    return Path(pcfg.output)
