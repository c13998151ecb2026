"""Tokenizers: the project's byte-level BPE, or any Hugging Face ``tokenizer.json``.

The project's BPE (GPT-2 style) is trained with ``tokenizers``: byte-level, so every string
encodes (no unknown token) and decode(encode(text)) == text; its only special token is
``<|endoftext|>``, added first, so its id is 0. A Hugging Face tokenizer (a ``tokenizer.json``
file, or a directory saved by ``save_pretrained``) is loaded with ``tokenizers`` alone (no
``transformers`` at training time); :func:`load_hf_tokenizer` finds its end-of-document token.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from mtp_megatron.config import ConfigError
from mtp_megatron.config.base import is_int
from mtp_megatron.config.data import BPE_PREFIX, MIN_VOCAB_SIZE, PrepareConfig
from mtp_megatron.data.cache import (
    atomic_write_json,
    file_sha256,
    files_sha256,
    read_json,
    unit_hash,
)
from mtp_megatron.data.documents import iter_documents

EOT_TOKEN = "<|endoftext|>"
"""Separates documents in the token stream."""


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 while every id fits (half the disk and memory of int32), else int32."""
    return np.dtype(np.uint16) if vocab_size <= 2**16 else np.dtype(np.int32)


def check_vocab_size(vocab_size: int) -> None:
    """Raise ConfigError unless ``vocab_size`` can hold the bytes and the end-of-text token."""
    if not is_int(vocab_size):
        raise ConfigError(f"vocab_size={vocab_size!r} is invalid: must be an integer")
    if vocab_size < MIN_VOCAB_SIZE:
        raise ConfigError(
            f"vocab_size={vocab_size!r} is invalid: a byte-level BPE needs at least "
            f"{MIN_VOCAB_SIZE} (256 bytes + {EOT_TOKEN})"
        )


def train_tokenizer(
    texts: Iterable[str] | Iterable[list[str]], vocab_size: int, length: int | None = None
) -> Tokenizer:
    """Train a byte-level BPE of at most ``vocab_size`` tokens (fewer if the corpus runs out of
    merges) on texts or batches of texts; ``length`` only sizes the progress estimate."""
    check_vocab_size(vocab_size)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOT_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer, length=length)
    return tok


def own_bpe(
    cfg: PrepareConfig, shards: list[tuple[list[str], list[str]]], out: Path, log=print
) -> Path:
    """``bpe:VOCAB`` (``cfg.tokenizer``): the project's byte-level BPE trained on the train
    split's documents of ``shards`` (each: its files and their document keys), saved as
    ``out/tokenizer.json`` (kept while the inputs and split settings are the same)."""
    try:
        vocab = int(cfg.tokenizer[len(BPE_PREFIX) :])
    except ValueError:
        raise ConfigError(
            f"--tokenizer={cfg.tokenizer!r} is invalid: the project's BPE is 'bpe:VOCAB', "
            "e.g. bpe:4096"
        ) from None
    path, record = out / "tokenizer.json", out / "tokenizer_source.json"
    source = {
        "vocab_size": vocab,
        "inputs": [files_sha256(sources) for sources, _ in shards],
        "keys": [keys for _, keys in shards],
        "text_field": cfg.text_field,
        "validation_fraction": cfg.validation_fraction,
        "split_seed": cfg.split_seed,
    }
    if path.is_file() and read_json(record) == source:
        return path
    log(f"prepare: training a byte-level BPE of {vocab:,} tokens on the train split")

    def train_texts():
        skipped: Counter = Counter()
        for sources, keys in shards:
            for src, key in zip(sources, keys):
                for doc_key, text in iter_documents(Path(src), key, cfg.text_field, skipped):
                    if unit_hash("split", cfg.split_seed, doc_key) >= cfg.validation_fraction:
                        yield text

    out.mkdir(parents=True, exist_ok=True)
    record.unlink(missing_ok=True)  # before the tokenizer is replaced
    tok = train_tokenizer(train_texts(), vocab)
    tmp = out / f".tokenizer.json.tmp.{os.getpid()}"
    tok.save(str(tmp))
    os.replace(tmp, path)
    atomic_write_json(record, source)
    return path


@dataclass(frozen=True)
class HFTokenizer:
    """A loaded Hugging Face tokenizer and the token that ends each document."""

    tokenizer: Tokenizer
    file: Path
    """The ``tokenizer.json`` it was read from."""
    eod_token: str
    eod_id: int
    sha256: str
    """Of the ``tokenizer.json`` file (what a prepared dataset records)."""

    @property
    def vocab_size(self) -> int:
        """Ids in use, added tokens included (the model's vocabulary must hold them all)."""
        return self.tokenizer.get_vocab_size(with_added_tokens=True)


def _config_eos(config: Path) -> str | None:
    """``eos_token`` of a ``tokenizer_config.json`` (a string or a serialized AddedToken)."""
    if not config.is_file():
        return None
    try:
        eos = json.loads(config.read_text()).get("eos_token")
    except (OSError, ValueError) as e:
        raise ConfigError(f"cannot read {config}: {e}") from e
    if isinstance(eos, dict):
        eos = eos.get("content")
    return eos if isinstance(eos, str) and eos else None


def load_hf_tokenizer(path: str | Path, eod_token: str | None = None) -> HFTokenizer:
    """Load ``path`` (a ``tokenizer.json`` or a directory holding one) with its end-of-document
    token: ``eod_token`` if given, else the directory's ``tokenizer_config.json`` ``eos_token``,
    else ``<|endoftext|>``; a ConfigError names what was tried when none is in the vocabulary."""
    path = Path(path)
    file = path / "tokenizer.json" if path.is_dir() else path
    if not file.is_file():
        raise ConfigError(
            f"tokenizer {path}: no such file"
            + (
                " (the directory has no tokenizer.json; write one with the tokenizer's "
                "save_pretrained)"
                if path.is_dir()
                else ""
            )
        )
    try:
        tok = Tokenizer.from_file(str(file))
    except Exception as e:  # tokenizers raises its own Exception type for a bad file
        raise ConfigError(f"tokenizer {file} cannot be read by `tokenizers`: {e}") from e
    tried = []
    candidates: list[tuple[str, str | None]] = []
    if eod_token:
        candidates.append(("the recipe's eod_token", eod_token))
    if path.is_dir():
        candidates.append(
            ("tokenizer_config.json's eos_token", _config_eos(path / "tokenizer_config.json"))
        )
    candidates.append(("the default", EOT_TOKEN))
    for where, token in candidates:
        if token is None:
            continue
        token_id = tok.token_to_id(token)
        if token_id is not None:
            sha = file_sha256(file)
            return HFTokenizer(tok, file, token, token_id, sha)
        tried.append(f"{token!r} ({where})")
        if eod_token:  # an explicit choice that is not in the vocabulary is an error
            break
    raise ConfigError(
        f"tokenizer {file} has no end-of-document token: tried {', '.join(tried)}; set the "
        "one it uses (e.g. '</s>' or '<|end_of_text|>') with eod_token"
    )


def load_tokenizer(path: str | Path) -> Tokenizer:
    """The tokenizer of a run (its ``tokenizer.json``), whichever made the data."""
    return Tokenizer.from_file(str(path))
