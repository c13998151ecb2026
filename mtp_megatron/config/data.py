"""Where the training data comes from: a source prepared into the cache on first use, or blends
of prepared datasets; its tokenizer, split, limits and cache."""

from __future__ import annotations

import os
from dataclasses import dataclass

from mtp_megatron.config.base import ConfigError, check_int, fail, is_int, is_number

TEXT_SUFFIXES = (".txt", ".py", ".md")
"""Files read whole, one document each."""
ROW_SUFFIXES = (".jsonl", ".parquet")
"""Files whose rows are documents (the ``text_field`` column)."""
SOURCE_SUFFIXES = TEXT_SUFFIXES + ROW_SUFFIXES
BPE_PREFIX = "bpe:"
"""A tokenizer 'bpe:VOCAB': the project's byte-level BPE, trained on the train split."""
MIN_VOCAB_SIZE = 257
"""The project's BPE: the 256 byte symbols and the end-of-text token."""
STDLIB = "stdlib"
"""``data.source: stdlib``: the running interpreter's standard library ``*.py`` files, the
embedded default corpus."""
HUB_DATASET_PREFIX = "hf:"
"""``data.source: hf:NAME[:CONFIG]`` (and a ``prepare`` input): a Hugging Face *hub dataset*.
Not to be confused with ``init_from: hf:DIR``, a local Hugging Face *checkpoint directory*
(``hf/importer.py``)."""


@dataclass(frozen=True)
class StdlibSource:
    """The interpreter's standard library (``data.source: stdlib``)."""


@dataclass(frozen=True)
class LocalSource:
    """A local file or directory of .txt/.py/.md/.jsonl/.parquet files."""

    path: str
    """Absolute."""


@dataclass(frozen=True)
class HubDataset:
    """A Hugging Face hub dataset's train split: ``hf:NAME[:CONFIG]``."""

    name: str
    """The dataset's hub name, e.g. 'roneneldan/TinyStories'."""
    config: str | None = None
    """Its configuration (subset), if it has several."""

    @classmethod
    def parse(cls, spec: str, path: str = "data.source") -> HubDataset:
        """``hf:NAME[:CONFIG]`` -> HubDataset; ConfigError naming ``path`` otherwise."""
        parts = spec.split(":")
        if parts[0] + ":" != HUB_DATASET_PREFIX or len(parts) not in (2, 3) or not all(parts[1:]):
            fail(path, spec, "a hub dataset is written 'hf:NAME' or 'hf:NAME:CONFIG'")
        return cls(parts[1], parts[2] if len(parts) == 3 else None)

    def __str__(self) -> str:
        return f"{HUB_DATASET_PREFIX}{self.name}" + (f":{self.config}" if self.config else "")


Source = StdlibSource | LocalSource | HubDataset
"""``data.source`` once resolved: what ``data/sources.py`` prepares."""


def resolve_source(spec: str, path: str = "data.source") -> Source:
    """``data.source`` as a typed source; ConfigError (naming ``path``) when it cannot be one."""
    if not isinstance(spec, str) or not spec:
        fail(path, spec, "must be 'stdlib', a local path or 'hf:NAME[:CONFIG]'")
    if spec == STDLIB:
        return StdlibSource()
    if spec.startswith(HUB_DATASET_PREFIX):
        return HubDataset.parse(spec, path)
    full = os.path.abspath(spec)
    if not os.path.exists(full):
        fail(
            path,
            spec,
            f"the local path {full} does not exist; use 'stdlib', an existing file or "
            "directory, or 'hf:NAME[:CONFIG]'",
        )
    if os.path.isfile(full) and not full.endswith(SOURCE_SUFFIXES):
        fail(path, spec, f"a source file must end with one of {SOURCE_SUFFIXES}")
    return LocalSource(full)


@dataclass(kw_only=True)
class BlendEntry:
    """One dataset of a training or validation blend."""

    path: str
    """A dataset directory written by ``prepare`` (all its shards of the split, each weighted
    by its tokens) or one Megatron indexed prefix (``path.bin`` / ``path.idx``)."""
    weight: float = 1.0
    """Its share of the samples, normalised over the blend."""


@dataclass(kw_only=True)
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
        self._validate_blends(path)
        self._validate_tokenizer(path)
        resolve_source(self.source, f"{path}.source")
        if not isinstance(self.text_field, str) or not self.text_field:
            fail(f"{path}.text_field", self.text_field, "must be a non-empty column name")
        frac = self.validation_fraction
        if not is_number(frac) or not 0 < frac <= 0.5:
            fail(
                f"{path}.validation_fraction",
                frac,
                "must be a number in (0, 0.5]: both splits need documents",
            )
        if not is_int(self.split_seed):
            fail(f"{path}.split_seed", self.split_seed, "must be an integer")
        check_int(f"{path}.prepare_workers", self.prepare_workers, 1)
        if not isinstance(self.cache_dir, str) or not self.cache_dir:
            fail(f"{path}.cache_dir", self.cache_dir, "must be a non-empty directory path")
        for name in ("max_files", "max_bytes"):
            value = getattr(self, name)
            if value is not None:
                check_int(f"{path}.{name}", value, 1, "must be null (no limit) or an integer >= 1")

    def _validate_blends(self, path: str) -> None:
        for name in ("train", "validation"):
            for i, entry in enumerate(getattr(self, name) or []):
                where = f"{path}.{name}[{i}]"
                full = os.path.abspath(entry.path)
                if not (os.path.isdir(full) or os.path.isfile(full + ".idx")):
                    fail(
                        f"{where}.path",
                        entry.path,
                        f"{full} is neither a dataset directory nor an indexed prefix "
                        "(PATH.idx); write one with `python -m mtp_megatron prepare`",
                    )
                w = entry.weight
                if not is_number(w) or not w > 0:
                    fail(f"{where}.weight", w, "must be a number > 0")
        if self.train is not None and not self.train:
            fail(f"{path}.train", self.train, "must list at least one dataset (or be null)")
        if self.validation is not None and self.train is None:
            fail(f"{path}.validation", self.validation, "needs data.train (an indexed blend)")

    def _validate_tokenizer(self, path: str) -> None:
        tok = self.tokenizer
        if tok is not None and not (isinstance(tok, str) and tok):
            fail(f"{path}.tokenizer", tok, "must be a tokenizer path or 'bpe:VOCAB'")
        if tok is not None and tok.startswith(BPE_PREFIX):
            if self.train is not None:
                fail(f"{path}.tokenizer", tok, "with data.train, name the tokenizer.json")
            size = tok[len(BPE_PREFIX) :]
            if not size.isdigit() or int(size) < MIN_VOCAB_SIZE:
                fail(
                    f"{path}.tokenizer",
                    tok,
                    f"the project's BPE is 'bpe:VOCAB' with VOCAB >= {MIN_VOCAB_SIZE}",
                )
        elif tok is not None and not os.path.exists(tok):
            fail(f"{path}.tokenizer", tok, "no such file or directory (or 'bpe:VOCAB')")
        if self.eod_token is not None and not (isinstance(self.eod_token, str) and self.eod_token):
            fail(f"{path}.eod_token", self.eod_token, "must be a token string or null")


@dataclass(kw_only=True)
class PrepareConfig:
    """What ``prepare`` reads, how it tokenizes and splits, and where it writes."""

    inputs: list[str]
    """Files, globs or directories (searched recursively) of .txt/.py/.md/.jsonl/.parquet, or
    ``hf:NAME[:CONFIG]``: a Hugging Face hub dataset's train split (or a local directory
    ``datasets`` can load), exported once to parquet under ``OUTPUT/hub/``."""
    tokenizer: str
    """A Hugging Face ``tokenizer.json`` or a directory holding one (``save_pretrained``), or
    ``bpe:VOCAB``: the project's byte-level BPE, trained here on the train split."""
    output: str
    """The dataset directory (created; a finished one is reused)."""
    eod_token: str | None = None
    """End-of-document token; default: the directory's ``eos_token``, else <|endoftext|>."""
    text_field: str = "text"
    """Column holding the text in .jsonl / .parquet rows."""
    validation_fraction: float = 0.05
    """Share of documents (chosen by a hash of their key) held out for validation."""
    split_seed: int = 0
    """Salt of that hash."""
    workers: int = 1
    """Tokenizer processes (1: in this process)."""
    shard_mb: float = 64.0
    """Consecutive small input files are grouped into shards of about this size (the unit of
    work, reuse and output files)."""
    suffixes: tuple[str, ...] = SOURCE_SUFFIXES
    """The file types read from input directories and globs."""
    exclude_dirs: tuple[str, ...] = ()
    """Directory names pruned from input directories (besides hidden ones)."""
    max_files: int | None = None
    """Read only the first this many files (in the sorted input order)."""
    max_bytes: int | None = None
    """Stop adding files once this many bytes are listed (the file crossing the limit is kept)."""

    def validate(self) -> None:
        if not self.inputs:
            raise ConfigError("prepare: no inputs given (files, globs or directories)")
        frac = self.validation_fraction
        if not is_number(frac) or not 0 <= frac < 1:
            raise ConfigError(f"--validation-fraction={frac!r} is invalid: must be in [0, 1)")
        if not is_int(self.workers) or self.workers < 1:
            raise ConfigError(f"--workers={self.workers!r} is invalid: must be an integer >= 1")
        if not is_number(self.shard_mb) or self.shard_mb <= 0:
            raise ConfigError(f"--shard-mb={self.shard_mb!r} is invalid: must be a number > 0")
        if not self.text_field:
            raise ConfigError("--text-field must be a non-empty column name")
        for name in ("max_files", "max_bytes"):
            value = getattr(self, name)
            if value is not None and not is_int(value):
                raise ConfigError(f"--{name.replace('_', '-')}={value!r} must be an integer")
            if value is not None and value < 1:
                raise ConfigError(f"--{name.replace('_', '-')}={value!r} must be >= 1")
