"""Training on a recipe's blend of indexed datasets: the blend resolved, read through megatron-core
(``gpt_data.py``), and cut into batches that are a pure function of where training stands.

Notation: b micro-batch size, s sequence length. Training samples are numbered globally, as in
``loader.py``: ``g = ((step * grad_accum + micro_step) * dp_size + dp_rank) * b + j``, and sample
g is the blended GPTDataset's item g (its own shuffle, fixed by the data, seed, sequence length,
blend and the total number of samples). No state advances between calls, so a resumed run draws
exactly the uninterrupted run's batches and data-parallel ranks read disjoint samples. The
loader's state records the datasets' fingerprint and the sample total instead of hashing tokens.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mtp_megatron.config import ConfigError
from mtp_megatron.data.config import BlendEntry, DataConfig
from mtp_megatron.data.gpt_data import BlendPart, build_gpt_data
from mtp_megatron.data.loader import eval_sample_ranges
from mtp_megatron.data.prepare_indexed import MANIFEST, prefixes


@dataclass
class IndexedData:
    """What the trainer reads: the datasets, their tokenizer and identity."""

    train: torch.utils.data.Dataset
    validation: torch.utils.data.Dataset
    tokenizer_path: Path
    fingerprint: str
    """Names the training data and its sample order (its part of the GPTDataset cache key)."""
    train_samples: int


def _manifest(folder: Path) -> dict | None:
    path = folder / MANIFEST
    return json.loads(path.read_text()) if path.is_file() else None


def resolve_blend(
    entries: list[BlendEntry], split: str, field: str
) -> tuple[list[BlendPart], list[dict]]:
    """(prefix, weight) parts of the recipe blend ``data.<field>`` for ``split`` (a dataset
    directory contributes each of its ``split`` shards, weighted by tokens; a bare prefix
    itself) and the manifests of its datasets."""
    parts, manifests = [], []
    for entry in entries:
        folder = Path(entry.path).resolve()
        manifest = _manifest(folder) if folder.is_dir() else None
        if folder.is_dir() and manifest is None:
            raise ConfigError(
                f"data.{field}: {folder} has no {MANIFEST} (an unfinished `prepare`: run it again, "
                "finished shards are reused)"
            )
        if manifest is None:  # one indexed prefix
            if field == "train" and split == "validation":
                raise ConfigError(
                    f"data.validation is needed: data.train's {folder} is a bare indexed prefix, "
                    "which has no validation split of its own (evaluating on it would measure "
                    "training data)"
                )
            parts.append(BlendPart(str(folder), float(entry.weight)))
            continue
        manifests.append(manifest)
        shards = prefixes(folder, split)
        if not shards:
            raise ConfigError(f"data.{field}: the dataset {folder} has no {split} documents")
        total = sum(tokens for _, tokens in shards)
        parts += [BlendPart(str(p), entry.weight * t / total) for p, t in shards]
    return parts, manifests


def _tokenizer(cfg: DataConfig, manifests: list[dict]) -> tuple[Path, int]:
    """The tokenizer file and end-of-document id every dataset of the blend agrees on."""
    agreed = {}
    for key in ("sha256", "eod_id"):
        found = {m["tokenizer"].get(key) for m in manifests} - {None}
        if len(found) > 1:
            raise ConfigError(
                f"data.train: the datasets were tokenized differently (tokenizer {key}: "
                f"{sorted(found)}); a blend needs one tokenizer"
            )
        agreed[key] = next(iter(found), None)
    if cfg.tokenizer is not None:
        from mtp_megatron.data.tokenizer import load_hf_tokenizer

        tok = load_hf_tokenizer(cfg.tokenizer)
        return tok.file, agreed["eod_id"] if agreed["eod_id"] is not None else tok.eod_id
    files = [m["tokenizer"].get("file") for m in manifests if m["tokenizer"].get("file")]
    if not files or not Path(files[0]).is_file() or agreed["eod_id"] is None:
        raise ConfigError(
            "data.tokenizer is needed: the blend's datasets record no tokenizer file that exists "
            f"here ({files[0] if files else 'imported data'}); set it to the tokenizer.json the "
            "ids come from (decoding reads it)"
        )
    return Path(files[0]), int(agreed["eod_id"])


def prepare_indexed_data(
    cfg: DataConfig,
    vocab_size: int,
    seq_len: int,
    train_samples: int,
    validation_samples: int,
    seed: int,
    log=print,
) -> IndexedData:
    """Resolve the recipe's blends and build them (collective over the default group)."""
    train, manifests = resolve_blend(cfg.train, "train", "train")
    if cfg.validation is not None:
        validation, more = resolve_blend(cfg.validation, "validation", "validation")
    else:  # the train datasets' own validation shards
        validation, more = resolve_blend(cfg.train, "validation", "train")
    manifests += more
    tokenizer, eod = _tokenizer(cfg, manifests)
    largest = max(
        [m.get("max_token_id", m["tokenizer"].get("vocab_size", 0) - 1) for m in manifests] + [0]
    )
    if largest >= vocab_size:
        raise ConfigError(
            f"model.vocab_size={vocab_size} is smaller than the data's vocabulary (ids up to "
            f"{largest}): set model.vocab_size >= {largest + 1}"
        )
    root = Path(cfg.cache_dir).resolve() / "gpt_datasets"
    data = build_gpt_data(
        train,
        validation,
        seq_len=seq_len,
        seed=seed,
        train_samples=train_samples,
        validation_samples=validation_samples,
        eod_id=eod,
        vocab_size=vocab_size,
        cache_root=root,
    )
    log(
        f"data: blend of {len(train)} train / {len(validation)} validation prefixes, "
        f"{len(data.train):,} train samples of {seq_len} tokens, "
        f"{'built' if data.built else 'cached'} in {data.cache_dir}"
    )
    return IndexedData(data.train, data.validation, tokenizer, data.train_key, train_samples)


def _pairs(dataset, indices: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    items = [dataset[int(i)] for i in indices]
    tokens = torch.stack([item["tokens"] for item in items]).long()  # [b, s]
    labels = torch.stack([item["labels"] for item in items]).long()
    return tokens, labels


class IndexedBatches:
    """Training micro-batches for one data-parallel rank, indexed by (step, micro_step)."""

    def __init__(
        self, data: IndexedData, seq_len: int, micro_batch_size: int, dp_rank: int, dp_size: int
    ):
        self.data, self.seq_len = data, seq_len
        self.micro_batch_size, self.dp_rank, self.dp_size = micro_batch_size, dp_rank, dp_size

    def batch(self, step: int, micro_step: int, grad_accum: int):
        """(input_ids, labels), both int64 [b, s], with labels[:, i] = input_ids[:, i + 1]."""
        first = ((step * grad_accum + micro_step) * self.dp_size + self.dp_rank) * (
            self.micro_batch_size
        )
        g = first + np.arange(self.micro_batch_size)
        return _pairs(self.data.train, g % len(self.data.train))

    def state_dict(self) -> dict[str, Any]:
        return {
            "kind": "indexed",
            "fingerprint": self.data.fingerprint,
            "train_samples": self.data.train_samples,
            "seq_len": self.seq_len,
            "micro_batch_size": self.micro_batch_size,
            "dp_size": self.dp_size,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Refuse a checkpoint made with other data, another sample total or batch layout."""
        mine = self.state_dict()
        if state.get("kind") != "indexed":
            raise ConfigError(
                "cannot resume: the checkpoint trained on a token stream (data.source), this run "
                "on an indexed blend (data.train); resume with the checkpoint's data settings"
            )
        if state["train_samples"] != mine["train_samples"]:
            raise ConfigError(
                f"cannot resume: the checkpoint's data drew {state['train_samples']:,} training "
                f"samples, this run {mine['train_samples']:,} (train.steps x the global batch): "
                "GPTDataset's sample order depends on that total, so the run would not continue "
                "its data order; resume with the same train.steps, or start a new run"
            )
        for key in ("fingerprint", "seq_len", "micro_batch_size", "dp_size"):
            if state[key] != mine[key]:
                raise ConfigError(
                    f"cannot resume: the checkpoint's data loader had {key}={state[key]!r}, this "
                    f"run has {key}={mine[key]!r}; resume with the same data and settings"
                )


def indexed_eval_batches(
    dataset, micro_batch_size: int, max_batches: int | None, dp_rank: int, dp_size: int
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """This rank's validation batches, as ``loader.eval_batches`` picks them."""
    what = f"the validation blend has {len(dataset)} samples"
    ranges = eval_sample_ranges(len(dataset), micro_batch_size, max_batches, dp_rank, dp_size, what)
    return (_pairs(dataset, np.arange(lo, hi)) for lo, hi in ranges)
