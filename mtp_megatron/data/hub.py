"""A Hugging Face *hub dataset* as local files: ``data.source: hf:NAME[:CONFIG]`` (or a ``prepare``
input of that form) becomes parquet files ``prepare`` reads like any other source. (A local
Hugging Face *checkpoint directory*, ``init_from: hf:DIR``, is ``hf/importer.py``'s.)"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from mtp_megatron.config import ConfigError
from mtp_megatron.config.data import HubDataset
from mtp_megatron.data.cache import atomic_write_json


def export_hub_dataset(dataset: HubDataset, out: Path, log: Callable[[str], None] = print) -> str:
    """The dataset's train split as parquet files in a directory of ``out/hub/`` (downloaded and
    exported by ``datasets`` once; a later call finds it); returns that directory."""
    name, config = dataset.name, dataset.config
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in name.strip("/"))
    safe += f"-{config}" if config else ""
    hub = out / "hub"
    folder, export, done = hub / safe, hub / f".{safe}.export", hub / f".{safe}.json"
    if done.is_file():
        return str(folder)
    import datasets

    log(f"prepare: exporting the hub dataset {name} {config or ''} to parquet in {folder}")
    try:
        builder = datasets.load_dataset_builder(name, config, cache_dir=str(hub / ".cache"))
        builder.download_and_prepare(output_dir=str(export), file_format="parquet")
    except Exception as e:  # offline, unknown name, gated: all end the same way
        raise ConfigError(
            f"{dataset}: could not load the Hugging Face hub dataset {name!r} "
            f"({type(e).__name__}: {e}); the hub may be unreachable from this machine: download "
            "its files and pass their directory instead"
        ) from e
    train = sorted(export.glob("*-train*.parquet"))
    if not train:
        raise ConfigError(f"{dataset}: the hub dataset has no train split")
    folder.mkdir(parents=True, exist_ok=True)
    for file in train:  # only the train split's rows are the dataset's documents
        os.replace(file, folder / file.name)
    atomic_write_json(done, {"dataset": name, "config": config, "files": len(train)})
    return str(folder)
