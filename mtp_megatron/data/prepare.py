"""``prepare_data``: corpus -> split -> tokenizer -> token streams, built once and cached.

Cache layout under ``cfg.cache_dir`` (relative paths resolve against the working directory)::

    lock                                      fcntl lock held while checking / building
    hf/                                       datasets' own cache (parquet files, hub datasets)
    tokenizers/bpe-<vocab>-<corpus key>.json  the trained tokenizer
    tokens/<stream key>/train.npy             1-D token stream, uint16 (int32 if vocab > 65536)
    tokens/<stream key>/validation.npy
    tokens/<stream key>/meta.json             written last: the directory is complete iff present

The corpus key hashes the sorted (path, size, content hash) of the documents with the split
settings and limits; the stream key hashes the tokenizer file, the corpus key and shuffle_seed.
Changing a file, a setting or the tokenizer therefore builds anew; nothing is ever overwritten
in place.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import datasets
import numpy as np

from mtp_megatron.data.cache import (
    atomic_save_npy,
    atomic_write_json,
    atomic_write_text,
    digest,
    file_lock,
)
from mtp_megatron.data.config import DataConfig
from mtp_megatron.data.corpus import read_corpus
from mtp_megatron.data.split import shuffled, split_indices
from mtp_megatron.data.tokenizer import (
    EOT_TOKEN,
    check_vocab_size,
    encode_stream,
    load_tokenizer,
    token_dtype,
    train_tokenizer,
)

FORMAT_VERSION = 1
"""Part of every cache key: bump it when the tokenizer recipe or the stream layout changes."""
_SPLITS = ("train", "validation")


@dataclass
class PreparedData:
    """Token streams of both splits and the tokenizer that made them."""

    train: np.ndarray
    """1-D training token stream (read-only memory map), documents separated by eot_id."""
    validation: np.ndarray
    """1-D validation token stream, documents in path order."""
    tokenizer_path: str
    """The tokenizer's JSON file (``load_tokenizer`` reads it)."""
    eot_id: int
    """Id of <|endoftext|>, which follows every document."""
    stats: dict[str, Any] = field(default_factory=dict)
    """Documents, skips and tokens per split, vocabulary size, cache hits, seconds."""


def _text_batches(docs: datasets.Dataset, rows: list[int], size: int = 256) -> Iterator[list[str]]:
    for batch in docs.select(rows).iter(batch_size=size):
        yield batch["text"]


def _train_and_save_tokenizer(docs, train_rows, vocab_size: int, path: Path, log) -> None:
    start = time.perf_counter()
    tok = train_tokenizer(_text_batches(docs, train_rows, 1000), vocab_size, len(train_rows))
    atomic_write_text(path, tok.to_str())
    log(
        f"data: tokenizer trained on {len(train_rows)} train documents in "
        f"{time.perf_counter() - start:.1f} s ({tok.get_vocab_size()} tokens) -> {path}"
    )


def _stream_location(cache: Path, tok_path: Path, corpus_key: str, shuffle_seed: int, dtype):
    """(folder, key) of the token streams made by this tokenizer file from this corpus."""
    key = digest(tok_path.read_text(), corpus_key, str(shuffle_seed), dtype.str)
    return cache / "tokens" / key[:20], key


def _load_streams(folder: Path, key: str, dtype: np.dtype) -> dict[str, np.ndarray] | None:
    """The cached streams if the folder is complete and matches its meta.json, else None."""
    try:
        meta = json.loads((folder / "meta.json").read_text())
        arrays = {s: np.load(folder / f"{s}.npy", mmap_mode="r") for s in _SPLITS}
    except (OSError, ValueError):
        return None
    for s, a in arrays.items():
        if meta.get("key") != key or a.dtype != dtype or a.shape != (meta.get(f"{s}_tokens"),):
            return None
    return arrays


def _build_streams(tok, docs, order: dict[str, list[int]], dtype, folder: Path, key: str, log):
    """Encode both splits, write them and then meta.json (which marks the folder complete)."""
    start = time.perf_counter()
    eot_id = tok.token_to_id(EOT_TOKEN)
    meta: dict[str, Any] = {"key": key, "dtype": dtype.str, "eot_id": eot_id}
    for s in _SPLITS:
        stream = encode_stream(tok, _text_batches(docs, order[s]), dtype, eot_id)
        atomic_save_npy(folder / f"{s}.npy", stream)
        meta[f"{s}_tokens"] = len(stream)
    atomic_write_json(folder / "meta.json", meta)
    log(
        f"data: tokenized {len(order['train']) + len(order['validation'])} documents in "
        f"{time.perf_counter() - start:.1f} s"
    )
    arrays = _load_streams(folder, key, dtype)
    if arrays is None:
        raise RuntimeError(f"the token streams just written to {folder} do not read back")
    return arrays


def prepare_data(
    cfg: DataConfig, vocab_size: int, log: Callable[[str], None] = print
) -> PreparedData:
    """Read, split, train the tokenizer on train only, tokenize both splits; cache everything.

    Safe to call from several processes at once: a complete cache is loaded without locking
    (its files are renamed into place whole and never change); a build runs under an fcntl
    lock on ``<cache_dir>/lock``, so one process builds while the others wait, then load. Each
    caller still reads the corpus (about 1-2 s for the stdlib) because the cache key is a hash
    of its content.
    """
    start = time.perf_counter()
    cfg.validate()
    check_vocab_size(vocab_size)
    cache = Path(cfg.cache_dir).resolve()
    corpus = read_corpus(cfg, cache / "hf", log)
    docs = corpus.documents
    paths = docs["path"][:]
    train_rows, val_rows = split_indices(paths, cfg.validation_fraction, cfg.split_seed, log)
    settings = (cfg.validation_fraction, cfg.split_seed, cfg.max_files, cfg.max_bytes)
    corpus_key = digest(f"v{FORMAT_VERSION}", corpus.content_digest, repr(settings))

    dtype = token_dtype(vocab_size)
    tok_path = cache / "tokenizers" / f"bpe-{vocab_size}-{corpus_key[:20]}.json"
    where = (cache, tok_path, corpus_key, cfg.shuffle_seed, dtype)
    # Look up without the lock first: cache files are complete once visible (atomic renames)
    # and never change, so N ranks loading a built cache need not queue on the lock.
    arrays = _load_streams(*_stream_location(*where), dtype) if tok_path.exists() else None
    tok_hit = streams_hit = arrays is not None
    if arrays is None:
        with file_lock(cache / "lock", log):
            tok_hit = tok_path.exists()  # again: another process may have built it meanwhile
            if not tok_hit:
                _train_and_save_tokenizer(docs, train_rows, vocab_size, tok_path, log)
            folder, key = _stream_location(*where)
            arrays = _load_streams(folder, key, dtype)
            streams_hit = arrays is not None
            if arrays is None:
                order = {
                    "train": shuffled(train_rows, paths, cfg.shuffle_seed),
                    "validation": val_rows,  # path order: evaluation reads it front to back
                }
                tok = load_tokenizer(str(tok_path))
                arrays = _build_streams(tok, docs, order, dtype, folder, key, log)
    tok = load_tokenizer(str(tok_path))
    log(
        f"data: tokenizer {'loaded from cache' if tok_hit else 'saved to'} {tok_path}; token "
        f"streams {'loaded from cache' if streams_hit else 'saved to'} {arrays['train'].filename}"
    )

    stats = {
        "source": cfg.source,
        "files_read": corpus.files_read,
        "bytes_read": corpus.bytes_read,
        "train_documents": len(train_rows),
        "validation_documents": len(val_rows),
        "skipped_non_utf8": corpus.skipped_non_utf8,
        "skipped_other": corpus.skipped_other,
        "skipped_empty": corpus.skipped_empty,
        "skipped_paths": corpus.skipped_paths,
        "train_tokens": int(arrays["train"].shape[0]),
        "validation_tokens": int(arrays["validation"].shape[0]),
        "vocab_size": tok.get_vocab_size(),
        "tokenizer_cache_hit": tok_hit,
        "tokens_cache_hit": streams_hit,
        "cache_hit": tok_hit and streams_hit,
        "seconds": round(time.perf_counter() - start, 2),
    }
    log(
        f"data: train {stats['train_tokens']:,} tokens ({len(train_rows)} documents), validation "
        f"{stats['validation_tokens']:,} tokens ({len(val_rows)} documents), vocabulary "
        f"{stats['vocab_size']}, {'cache hit' if stats['cache_hit'] else 'built'} in "
        f"{stats['seconds']:.1f} s"
    )
    eot_id = tok.token_to_id(EOT_TOKEN)
    return PreparedData(arrays["train"], arrays["validation"], str(tok_path), eot_id, stats)


def prepare_data_distributed(
    cfg: DataConfig,
    vocab_size: int,
    rank: int,
    barrier: Callable[[], None],
    log: Callable[[str], None] = print,
) -> PreparedData:
    """Rank 0 builds, every rank waits at ``barrier``, then the others load the cache.

    Pass the node-local rank when each node has its own cache_dir. The file lock in
    ``prepare_data`` keeps this correct even without the barrier; the barrier only spares the
    other ranks from waiting on the lock one after the other.
    """
    if rank == 0:
        try:
            data = prepare_data(cfg, vocab_size, log)
        except Exception:
            barrier()  # release the others: they then fail (or build) on their own, not hang
            raise
    barrier()
    if rank != 0:
        data = prepare_data(cfg, vocab_size, log)
    return data
