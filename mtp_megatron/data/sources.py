"""A recipe's ``data.source`` (the stdlib, local files or a hub dataset ``hf:NAME``, parsed once by
``config.data.resolve_source``) as a prepared dataset.

On first use ``prepare`` (``prepare_indexed.py``) tokenizes the source into
``cache_dir/datasets/<key>/``, the key hashing the source and every setting that shapes the
dataset (tokenizer, end-of-document token, text field, split, limits). Every later start runs it
again: it re-hashes the input files and reuses each unchanged shard, so it is a no-op when
nothing changed and rebuilds only the changed shards when a file changed. Global rank 0
prepares, under the cache's file lock (another job on the same cache waits); the other ranks
wait for its verdict through the job's store, outside any collective (whose timeout a long
preparation would pass), so a failure reaches every rank too.
"""

from __future__ import annotations

import json
import os
import sysconfig
from collections.abc import Callable
from pathlib import Path
from typing import Any

from mtp_megatron.config.data import (
    BPE_PREFIX,
    DataConfig,
    HubDataset,
    PrepareConfig,
    StdlibSource,
    resolve_source,
)
from mtp_megatron.data.cache import digest, file_lock
from mtp_megatron.data.prepare_indexed import prepare
from mtp_megatron.parallel.rank_zero import StoreWait, run_on_rank_zero

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


PREPARE_QUIET_S = 3600.0
"""The longest the other ranks wait for rank 0's ``prepare`` without a progress line from it
(it prints one per shard, at most every 10 s; training the project's BPE on a large corpus is one
long step). A rank 0 that dies or stops is caught sooner by the stall watchdog."""


def prepare_source(cfg: DataConfig, log: Callable[[str], None] = print) -> Path:
    """The prepared dataset directory of ``cfg.source`` (made or brought up to date on global
    rank 0, the other ranks waiting outside any collective: ``parallel/rank_zero.py``)."""
    pcfg = source_prepare_config(cfg)

    def work(wait: StoreWait) -> None:
        def report(line: str) -> None:
            log(line)
            wait.progress(line)

        with file_lock(Path(cfg.cache_dir).resolve() / "datasets.lock", report):
            prepare(pcfg, report)

    run_on_rank_zero(work, f"prepare data.source={cfg.source!r}", PREPARE_QUIET_S)
    return Path(pcfg.output)
