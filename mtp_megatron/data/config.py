"""Where the training data comes from: a source prepared into the cache on first use, or blends
of prepared datasets; its tokenizer, split, limits and cache."""

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
BPE_PREFIX = "bpe:"
"""A tokenizer 'bpe:VOCAB': the project's byte-level BPE, trained on the train split."""
MIN_VOCAB_SIZE = 257
"""The project's BPE: the 256 byte symbols and the end-of-text token."""


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
    """The corpus or blend, its tokenizer and split, and the cache."""

    source: str = "stdlib"
    """'stdlib' (the running interpreter's standard library *.py files, without site-packages),
    a local file or directory of .txt/.py/.md/.jsonl/.parquet files, or 'hf:NAME[:CONFIG]'
    (a hub dataset's train split). Tokenized by ``prepare`` into ``cache_dir`` on first use and
    read like any prepared dataset; ignored when ``train`` is set."""
    text_field: str = "text"
    """Column holding the text in .jsonl/.parquet files and hub datasets."""
    validation_fraction: float = 0.05
    """Share of the source's documents (chosen by a hash of their key) held out for validation."""
    split_seed: int = 0
    """Salt of the key hash that assigns documents to train or validation."""
    cache_dir: str = ".cache/mtp_megatron"
    """Prepared sources and GPTDataset indices; a relative path resolves against the working
    directory. On a cluster: a directory every node mounts (a shared file system)."""
    max_files: int | None = None
    """Read at most this many of the source's files, the first ones in sorted order (a hub
    dataset: its first parquet files)."""
    max_bytes: int | None = None
    """Stop listing the source's files once this many bytes are listed (the file that crosses
    the limit is kept)."""
    prepare_workers: int = 1
    """Tokenizer processes of the first-use ``prepare`` (on global rank 0)."""
    train: list[BlendEntry] | None = None
    """Train on a blend of prepared indexed datasets, read through megatron-core's GPTDataset,
    instead of ``source`` (which is then ignored). The number of samples drawn is train.steps x
    the global batch; the sample order depends on it."""
    validation: list[BlendEntry] | None = None
    """The validation blend; None: the validation shards of the ``train`` entries' datasets."""
    tokenizer: str | None = None
    """With ``source``: the tokenizer to prepare it with, a Hugging Face ``tokenizer.json`` or a
    directory holding one, or 'bpe:VOCAB' (the project's byte-level BPE trained on the train
    split); None: 'bpe:4096'. With ``train``: the tokenizer.json the ids come from (decoding
    needs it); None: the one the prepared datasets record. The model's vocabulary is the
    tokenizer's unless ``model.vocab_size`` sets a larger one."""
    eod_token: str | None = None
    """The token ending each document of ``source``; None: the tokenizer directory's
    ``eos_token``, else <|endoftext|>."""

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
        tok = self.tokenizer
        if tok is not None and not (isinstance(tok, str) and tok):
            _fail(f"{path}.tokenizer", tok, "must be a tokenizer path or 'bpe:VOCAB'")
        if tok is not None and tok.startswith(BPE_PREFIX):
            if self.train is not None:
                _fail(f"{path}.tokenizer", tok, "with data.train, name the tokenizer.json")
            size = tok[len(BPE_PREFIX) :]
            if not size.isdigit() or int(size) < MIN_VOCAB_SIZE:
                _fail(
                    f"{path}.tokenizer",
                    tok,
                    f"the project's BPE is 'bpe:VOCAB' with VOCAB >= {MIN_VOCAB_SIZE}",
                )
        elif tok is not None and not os.path.exists(tok):
            _fail(f"{path}.tokenizer", tok, "no such file or directory (or 'bpe:VOCAB')")
        if self.eod_token is not None and not (isinstance(self.eod_token, str) and self.eod_token):
            _fail(f"{path}.eod_token", self.eod_token, "must be a token string or null")
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
        if not _is_int(self.split_seed):
            _fail(f"{path}.split_seed", self.split_seed, "must be an integer")
        if not _is_int(self.prepare_workers) or self.prepare_workers < 1:
            _fail(f"{path}.prepare_workers", self.prepare_workers, "must be an integer >= 1")
        if not isinstance(self.cache_dir, str) or not self.cache_dir:
            _fail(f"{path}.cache_dir", self.cache_dir, "must be a non-empty directory path")
        for name in ("max_files", "max_bytes"):
            value = getattr(self, name)
            if value is not None and (not _is_int(value) or value < 1):
                _fail(f"{path}.{name}", value, "must be null (no limit) or an integer >= 1")
