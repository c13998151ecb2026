"""The trainer's data: the recipe's source (prepared into the cache on first use,
``sources.py``) or blends of prepared datasets, read through megatron-core (``gpt_data.py``) and
cut into batches that are a pure function of where training stands.

Notation: b micro-batch size, s sequence length. Training samples are numbered globally,
``g = ((step * grad_accum + micro_step) * dp_size + dp_rank) * b + j``, and sample g is the
blended GPTDataset's item g (its own shuffle, fixed by the data, seed, sequence length, blend
and the total number of samples). No state advances between calls, so a resumed run draws
exactly the uninterrupted run's batches and data-parallel ranks read disjoint samples. The
loader's state records the datasets' fingerprint and the sample total instead of hashing tokens.

    data = prepare_training_data(recipe.data, None, seq_len=256, train_samples=...,
                                 validation_samples=..., seed=0)
    batches = Batches(data, seq_len=256, micro_batch_size=8, dp_rank=r, dp_size=d)
    input_ids, labels = batches.batch(step, micro_step, grad_accum)
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mtp_megatron.config import ConfigError
from mtp_megatron.config.data import BPE_PREFIX, BlendEntry, DataConfig
from mtp_megatron.data.gpt_data import BlendPart, build_gpt_data
from mtp_megatron.data.manifest import MANIFEST, prefixes, read_manifest
from mtp_megatron.data.sources import prepare_source


@dataclass
class DataBlends:
    """The recipe's data resolved to prefixes: what a training run, an evaluation or a
    benchmark reads."""

    train: list[BlendPart]
    validation: list[BlendPart]
    tokenizer_path: Path
    """The tokenizer.json the ids come from."""
    eod_id: int
    """The end-of-document id every dataset of the blend agrees on."""
    vocab_size: int
    """Ids the data and its tokenizer use (the model's vocabulary must hold them)."""


@dataclass
class TrainingData:
    """What the trainer reads: the datasets, their tokenizer and identity."""

    train: Any
    """Megatron's (blended) GPTDataset of the training samples."""
    validation: Any
    """The validation samples' (the same kind)."""
    tokenizer_path: Path
    fingerprint: str
    """Names the training data and its sample order (its part of the GPTDataset cache key)."""
    train_samples: int
    vocab_size: int
    """The model's vocabulary: ``model.vocab_size``, or the data's when that is None."""


def resolve_blend(
    entries: list[BlendEntry], split: str, field: str
) -> tuple[list[BlendPart], list[dict]]:
    """(prefix, weight) parts of the recipe blend ``data.<field>`` for ``split`` (a dataset
    directory contributes each of its ``split`` shards, weighted by tokens; a bare prefix
    itself) and the manifests of its datasets."""
    parts, manifests = [], []
    for entry in entries:
        folder = Path(entry.path).resolve()
        manifest = read_manifest(folder) if folder.is_dir() else None
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
            fix = (
                "raise data.validation_fraction or add documents"
                if field == "source"
                else "prepare it with a validation fraction, or set data.validation"
            )
            raise ConfigError(
                f"data.{field}: the dataset {folder} has no {split} documents ({fix})"
            )
        total = sum(tokens for _, tokens in shards)
        parts += [BlendPart(str(p), entry.weight * t / total) for p, t in shards]
    return parts, manifests


def _tokenizer(explicit: str | None, manifests: list[dict]) -> tuple[Path, int, int]:
    """The tokenizer file, the end-of-document id every dataset of the blend agrees on and the
    tokenizer's vocabulary (0 when the datasets record none)."""
    agreed = {}
    for key in ("sha256", "eod_id"):
        found = {m["tokenizer"].get(key) for m in manifests} - {None}
        if len(found) > 1:
            raise ConfigError(
                f"data.train: the datasets were tokenized differently (tokenizer {key}: "
                f"{sorted(found)}); a blend needs one tokenizer"
            )
        agreed[key] = next(iter(found), None)
    if explicit is not None:
        from mtp_megatron.data.tokenizer import load_hf_tokenizer

        tok = load_hf_tokenizer(explicit)
        eod = agreed["eod_id"] if agreed["eod_id"] is not None else tok.eod_id
        return tok.file, eod, tok.vocab_size
    files = [m["tokenizer"].get("file") for m in manifests if m["tokenizer"].get("file")]
    if not files or not Path(files[0]).is_file() or agreed["eod_id"] is None:
        raise ConfigError(
            "data.tokenizer is needed: the blend's datasets record no tokenizer file that exists "
            f"here ({files[0] if files else 'imported data'}); set it to the tokenizer.json the "
            "ids come from (decoding reads it)"
        )
    return Path(files[0]), int(agreed["eod_id"]), 0


def resolve_data(cfg: DataConfig, log=print) -> DataBlends:
    """The recipe's train and validation blends (``data.source`` prepared first if it is what
    the recipe trains on; collective over the default group then)."""
    if cfg.train is None:
        entries, field, explicit = [BlendEntry(path=str(prepare_source(cfg, log)))], "source", None
    else:
        entries, field, explicit = cfg.train, "train", cfg.tokenizer
    train, manifests = resolve_blend(entries, "train", field)
    if cfg.validation is not None:
        validation, more = resolve_blend(cfg.validation, "validation", "validation")
    else:  # the train datasets' own validation shards
        validation, more = resolve_blend(entries, "validation", field)
    manifests += more
    tokenizer, eod, tokenizer_vocab = _tokenizer(explicit, manifests)
    used = [m.get("max_token_id", m["tokenizer"].get("vocab_size", 0) - 1) + 1 for m in manifests]
    return DataBlends(train, validation, tokenizer, eod, max([tokenizer_vocab, *used]))


def data_vocab_size(cfg: DataConfig) -> int:
    """The data's vocabulary without preparing anything (a dry run's parameter count): a
    ``bpe:VOCAB`` source's VOCAB (at most: BPE may find fewer merges), a tokenizer's, or what
    the blend's datasets record."""
    from mtp_megatron.data.sources import DEFAULT_TOKENIZER
    from mtp_megatron.data.tokenizer import load_hf_tokenizer

    if cfg.train is not None:
        return resolve_data(cfg, log=lambda _: None).vocab_size
    tokenizer = cfg.tokenizer or DEFAULT_TOKENIZER
    if tokenizer.startswith(BPE_PREFIX):
        return int(tokenizer[len(BPE_PREFIX) :])
    return load_hf_tokenizer(tokenizer, cfg.eod_token).vocab_size


def model_vocab_size(requested: int | None, data_vocab: int) -> int:
    """``model.vocab_size`` when set (it must hold the data's ids), else the data's."""
    if requested is None:
        return data_vocab
    if requested < data_vocab:
        raise ConfigError(
            f"model.vocab_size={requested} is smaller than the data's vocabulary of {data_vocab} "
            f"(the tokenizer's ids and the largest id in the data): set model.vocab_size >= "
            f"{data_vocab}, or null to take the tokenizer's"
        )
    return requested


def prepare_training_data(
    cfg: DataConfig,
    vocab_size: int | None,
    seq_len: int,
    train_samples: int,
    validation_samples: int,
    seed: int,
    log=print,
) -> TrainingData:
    """Resolve the recipe's data and build its datasets (collective over the default group);
    ``vocab_size`` is ``model.vocab_size`` (None: the tokenizer's)."""
    blends = resolve_data(cfg, log)
    vocab = model_vocab_size(vocab_size, blends.vocab_size)
    # GPTDataset repeats a split to fill any request: ask for no more validation samples than
    # there are distinct ones, so that a too small split is an error, not the same samples twice
    distinct = distinct_samples(blends.validation, seq_len)
    if distinct < 1:
        raise ConfigError(
            f"the validation blend has no sample of seq_len={seq_len} tokens; add validation "
            "data (data.validation_fraction, data.validation) or shorten the sequences"
        )
    root = Path(cfg.cache_dir).resolve() / "gpt_datasets"
    data = build_gpt_data(
        blends.train,
        blends.validation,
        seq_len=seq_len,
        seed=seed,
        train_samples=train_samples,
        validation_samples=min(validation_samples, distinct),
        eod_id=blends.eod_id,
        vocab_size=vocab,
        cache_root=root,
    )
    log(
        f"data: blend of {len(blends.train)} train / {len(blends.validation)} validation "
        f"prefixes, {len(data.train):,} train samples of {seq_len} tokens, "
        f"{'built' if data.built else 'cached'} in {data.cache_dir}; vocabulary {vocab:,}"
    )
    return TrainingData(
        data.train, data.validation, blends.tokenizer_path, data.train_key, train_samples, vocab
    )


def distinct_samples(parts: list[BlendPart], seq_len: int) -> int:
    """Samples of seq_len tokens (plus the next one) the prefixes hold without repeating, as
    GPTDataset counts an epoch."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    total = 0
    for part in parts:
        index = IndexedDataset(part.prefix)  # alive while its memory-mapped lengths are read
        tokens = int(index.sequence_lengths.sum())
        total += max(tokens - 1, 0) // seq_len
        del index
    return total


def prefix_tokens(parts: list[BlendPart], limit: int | None = None) -> np.ndarray:
    """The token ids of ``parts`` back to back (documents in order, each followed by its end
    token), at most ``limit`` of them: for prompts and token statistics, not for training."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    arrays, total = [], 0
    for part in parts:
        if limit is not None and total >= limit:
            break
        dtype = IndexedDataset(part.prefix).index.dtype
        tokens = np.memmap(part.prefix + ".bin", dtype=dtype, mode="r")
        arrays.append(tokens if limit is None else tokens[: limit - total])
        total += len(arrays[-1])
    return np.concatenate(arrays) if arrays else np.zeros(0, np.int64)


def _pairs(dataset, indices: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    items = [dataset[int(i)] for i in indices]
    tokens = torch.stack([item["tokens"] for item in items]).long()  # [b, s]
    labels = torch.stack([item["labels"] for item in items]).long()
    return tokens, labels


class Batches:
    """Training micro-batches for one data-parallel rank, indexed by (step, micro_step)."""

    def __init__(
        self, data: TrainingData, seq_len: int, micro_batch_size: int, dp_rank: int, dp_size: int
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
            "kind": "gpt_dataset",
            "fingerprint": self.data.fingerprint,
            "train_samples": self.data.train_samples,
            "seq_len": self.seq_len,
            "micro_batch_size": self.micro_batch_size,
            "dp_size": self.dp_size,
        }

    def load_state_dict(self, state: dict[str, Any], new_total_allowed: bool = False) -> str:
        """Refuse a checkpoint made with other data, another sample total (unless
        ``new_total_allowed``: ``steps`` is in ``train.resume_overrides``) or batch layout;
        returns a note for the log when the total changed ('' otherwise)."""
        mine = self.state_dict()
        if state.get("kind") != "gpt_dataset":
            raise ConfigError(
                "cannot resume: the checkpoint was written by an older data loader (an in-memory "
                "token stream); its batch order cannot be continued: start a new run"
            )
        note = ""
        if state["train_samples"] != mine["train_samples"] and new_total_allowed:
            note = (
                f"the data's sample total {state['train_samples']:,} -> "
                f"{mine['train_samples']:,} (train.steps): GPTDataset draws a new sample order "
                "from the resume step on, so samples already trained on may come again"
            )
        elif state["train_samples"] != mine["train_samples"]:
            raise ConfigError(
                f"cannot resume: the checkpoint's data drew {state['train_samples']:,} training "
                f"samples, this run {mine['train_samples']:,} (train.steps x the global batch): "
                "GPTDataset's sample order depends on that total, so the run would not continue "
                "its data order; resume with the same train.steps, list steps in "
                "train.resume_overrides to accept a new order from here, or start a new run"
            )
        for key in ("fingerprint", "seq_len", "micro_batch_size", "dp_size"):
            if state[key] != mine[key]:
                raise ConfigError(
                    f"cannot resume: the checkpoint's data loader had {key}={state[key]!r}, this "
                    f"run has {key}={mine[key]!r}; resume with the same data and settings"
                )
        return note


def eval_batches(
    dataset, micro_batch_size: int, max_batches: int | None, dp_rank: int = 0, dp_size: int = 1
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """This rank's validation (input_ids, labels) batches over ``dataset`` in order.

    The evaluated batches are the first ``max_batches`` (all if None), rounded down to a
    multiple of dp_size; rank r yields every dp_size-th from r. So the evaluated data does not
    depend on dp_size, and every rank runs the same number of forwards (ZeRO-3 gathers
    parameters in every forward and would hang otherwise). Average (loss sum, token count)
    across ranks for the validation loss.
    """
    what = f"the validation blend has {len(dataset)} samples"
    ranges = eval_sample_ranges(len(dataset), micro_batch_size, max_batches, dp_rank, dp_size, what)
    # a generator of its own, so that the checks above raise at the call, not at the first next()
    return (_pairs(dataset, np.arange(lo, hi)) for lo, hi in ranges)


def eval_sample_ranges(
    items: int,
    micro_batch_size: int,
    max_batches: int | None,
    dp_rank: int,
    dp_size: int,
    what: str,
) -> list[tuple[int, int]]:
    """[start, end) sample ranges of this rank's validation batches (see ``eval_batches``);
    ``what`` describes the data in the error when not one batch per rank fits."""
    total = items // micro_batch_size
    if max_batches is not None:
        total = min(total, max_batches)
    total -= total % dp_size
    if total == 0:
        raise ConfigError(
            f"{what}, fewer than one batch of micro_batch_size={micro_batch_size} per rank "
            f"(dp_size={dp_size}); add validation data (data.validation_fraction, "
            "data.validation) or lower the micro-batch size"
        )
    b = micro_batch_size
    return [(i * b, (i + 1) * b) for i in range(dp_rank, total, dp_size)]
