"""The manifest of a prepared dataset: the contract between what writes a dataset (``prepare``,
``prepare_indexed.py``; the importers, ``importers.py``) and what reads it (``loader.py``).

    DATASET/manifest.json        written last: the dataset is complete iff it is present
    DATASET/train/shard_00000.bin|.idx, DATASET/validation/...   (or ``prefixes`` per shard)

A manifest holds the format, the tokenizer (its sha256, end-of-document id, vocabulary), the
split settings, one record per shard (documents, tokens and the ``.idx`` sha256 per split) and
their totals. Its ``fingerprint`` (sha256 of that content, paths left out) names the dataset:
caches keyed by it can never hold stale indices.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from mtp_megatron.config import ConfigError

FORMAT = "mtp-megatron-indexed-v1"
MANIFEST = "manifest.json"
SPLITS = ("train", "validation")


def fingerprint(manifest: dict) -> str:
    """sha256 of a manifest's content, where files were read from left out (the tokenizer's
    and each shard's ``.idx`` sha256 stand for what they hold)."""
    hashed = dict(manifest)
    hashed.pop("fingerprint", None)
    if "tokenizer" in hashed:
        hashed["tokenizer"] = {k: v for k, v in hashed["tokenizer"].items() if k != "file"}
    hashed["shards"] = [
        {k: v for k, v in s.items() if k not in ("sources", "prefixes")} for s in hashed["shards"]
    ]
    return hashlib.sha256(json.dumps(hashed, sort_keys=True).encode()).hexdigest()


def sealed(body: dict) -> dict:
    """``body`` with its fingerprint: the manifest as written."""
    return {**body, "fingerprint": fingerprint(body)}


def read_manifest(dataset: str | Path) -> dict | None:
    """The manifest of a dataset directory; None when it has none (not a dataset, or an
    unfinished ``prepare``)."""
    path = Path(dataset) / MANIFEST
    return json.loads(path.read_text()) if path.is_file() else None


def prefixes(dataset: str | Path, split: str) -> list[tuple[Path, int]]:
    """(prefix, tokens) of every shard of ``split`` in a prepared dataset, in shard order."""
    dataset = Path(dataset)
    manifest = read_manifest(dataset)
    if manifest is None:
        raise ConfigError(
            f"{dataset} is no prepared dataset (no {MANIFEST}; an interrupted `prepare` leaves "
            "none: run it again, finished shards are reused)"
        )
    return [
        (
            Path(s.get("prefixes", {}).get(split, dataset / split / f"shard_{s['index']:05d}")),
            s["tokens"][split],
        )
        for s in manifest["shards"]
        if s["documents"].get(split)
    ]
