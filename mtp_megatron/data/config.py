"""Where the training text comes from and how it is split, limited and cached."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from mtp_megatron.config import ConfigError

TEXT_SUFFIXES = (".txt", ".py", ".md")
"""Files read whole, one document each."""
ROW_SUFFIXES = (".jsonl", ".parquet")
"""Files whose rows are documents (the ``text_field`` column)."""
SOURCE_SUFFIXES = TEXT_SUFFIXES + ROW_SUFFIXES


def _fail(path: str, value: Any, allowed: str) -> None:
    raise ConfigError(f"{path}={value!r} is invalid: {allowed}")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass
class BlendEntry:
    """One dataset of a training or validation blend."""

    path: str
    """A dataset directory written by ``prepare`` (all its shards of the split, each weighted
    by its tokens) or one Megatron indexed prefix (``path.bin`` / ``path.idx``)."""
    weight: float = 1.0
    """Its share of the samples, normalised over the blend."""


@dataclass
class DataConfig:
    """The corpus, its train/validation split, and the cache of tokenizer and token streams."""

    source: str = "stdlib"
    """'stdlib' (the running interpreter's standard library *.py files, without site-packages),
    a local file or directory of .txt/.py/.md/.jsonl/.parquet files, or 'hf:NAME[:CONFIG]'."""
    text_field: str = "text"
    """Column holding the text in .jsonl/.parquet files and hub datasets."""
    validation_fraction: float = 0.05
    """Share of documents (chosen by a hash of their path) held out for validation."""
    split_seed: int = 0
    """Salt of the path hash that assigns documents to train or validation."""
    cache_dir: str = ".cache/mtp_megatron"
    """Tokenizer and token-stream cache; a relative path resolves against the working directory."""
    max_files: int | None = None
    """Read at most this many files (rows for an hf: source), the first ones in sorted order."""
    max_bytes: int | None = None
    """Stop reading once this many bytes are read (the file that crosses the limit is kept)."""
    shuffle_seed: int = 1234
    """Order of the training documents in the token stream; the trainer's TokenBatches seed."""
    train: list[BlendEntry] | None = None
    """Train on a blend of prepared indexed datasets, read through megatron-core's GPTDataset,
    instead of ``source`` (which is then ignored). The number of samples drawn is train.steps x
    the global batch; the sample order depends on it."""
    validation: list[BlendEntry] | None = None
    """The validation blend; None: the validation shards of the ``train`` entries' datasets."""
    tokenizer: str | None = None
    """The tokenizer.json the ids of ``train`` come from (decoding needs it); None: the one the
    prepared datasets record."""

    def validate(self, path: str = "data") -> None:
        for name in ("train", "validation"):
            for i, entry in enumerate(getattr(self, name) or []):
                where = f"{path}.{name}[{i}]"
                full = os.path.abspath(entry.path)
                if not (os.path.isdir(full) or os.path.isfile(full + ".idx")):
                    _fail(
                        f"{where}.path",
                        entry.path,
                        f"{full} is neither a dataset directory nor an indexed prefix "
                        "(PATH.idx); write one with `python -m mtp_megatron prepare`",
                    )
                w = entry.weight
                if isinstance(w, bool) or not isinstance(w, (int, float)) or not w > 0:
                    _fail(f"{where}.weight", w, "must be a number > 0")
        if self.train is not None and not self.train:
            _fail(f"{path}.train", self.train, "must list at least one dataset (or be null)")
        if self.validation is not None and self.train is None:
            _fail(f"{path}.validation", self.validation, "needs data.train (an indexed blend)")
        if self.tokenizer is not None and not os.path.exists(self.tokenizer):
            _fail(f"{path}.tokenizer", self.tokenizer, "no such file or directory")
        src = self.source
        if not isinstance(src, str) or not src:
            _fail(f"{path}.source", src, "must be 'stdlib', a local path or 'hf:NAME[:CONFIG]'")
        if src.startswith("hf:"):
            parts = src.split(":")
            if len(parts) not in (2, 3) or not all(parts[1:]):
                _fail(
                    f"{path}.source", src, "a hub dataset is written 'hf:NAME' or 'hf:NAME:CONFIG'"
                )
        elif src != "stdlib":
            full = os.path.abspath(src)
            if not os.path.exists(full):
                _fail(
                    f"{path}.source",
                    src,
                    f"the local path {full} does not exist; use 'stdlib', an existing file or "
                    "directory, or 'hf:NAME[:CONFIG]'",
                )
            if os.path.isfile(full) and not full.endswith(SOURCE_SUFFIXES):
                _fail(
                    f"{path}.source", src, f"a source file must end with one of {SOURCE_SUFFIXES}"
                )
        if not isinstance(self.text_field, str) or not self.text_field:
            _fail(f"{path}.text_field", self.text_field, "must be a non-empty column name")
        frac = self.validation_fraction
        if isinstance(frac, bool) or not isinstance(frac, (int, float)) or not 0 < frac <= 0.5:
            _fail(
                f"{path}.validation_fraction",
                frac,
                "must be a number in (0, 0.5]: both splits need documents",
            )
        for name in ("split_seed", "shuffle_seed"):
            if not _is_int(getattr(self, name)):
                _fail(f"{path}.{name}", getattr(self, name), "must be an integer")
        if not isinstance(self.cache_dir, str) or not self.cache_dir:
            _fail(f"{path}.cache_dir", self.cache_dir, "must be a non-empty directory path")
        for name in ("max_files", "max_bytes"):
            value = getattr(self, name)
            if value is not None and (not _is_int(value) or value < 1):
                _fail(f"{path}.{name}", value, "must be null (no limit) or an integer >= 1")
