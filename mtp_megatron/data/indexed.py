"""Megatron's indexed dataset format (``PREFIX.bin`` + ``PREFIX.idx``), written crash-safely.

``.bin`` holds the token ids of every document back to back; ``.idx`` is (little-endian)::

    b"MMIDIDX\\x00\\x00", u64 1, u8 dtype code       header (codes: uint16 8, int32 4, ...)
    u64 S, u64 D                                      sequences, document boundaries (docs + 1)
    i32[S] lengths, i64[S] byte offsets, i64[D] document boundaries (sequence indices)

one sequence per document, as Megatron-LM's ``tools/preprocess_data.py`` writes it, so the files
are byte-identical to megatron-core's ``IndexedDatasetBuilder`` output (tested) and readable by
``IndexedDataset`` / ``GPTDataset``. Unlike the builder, :class:`IndexedWriter` writes both
files under temporary names and renames them only when complete (``.bin`` first, ``.idx`` last:
a prefix whose ``.idx`` exists is whole), and refuses an id that its dtype cannot hold (numpy
would wrap it silently).
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mtp_megatron.data.cache import file_sha256

HEADER = b"MMIDIDX\x00\x00"
DTYPE_CODES: dict[np.dtype, int] = {np.dtype(np.uint16): 8, np.dtype(np.int32): 4}
"""The token dtypes we write (``tokenizer.token_dtype``: uint16 while every id fits, else int32;
megatron has no uint32 code), with megatron's codes."""


@dataclass(frozen=True)
class IndexedStats:
    """What one finished prefix holds."""

    documents: int
    tokens: int
    idx_sha256: str
    """sha256 of the ``.idx`` file (it holds every length and offset: the dataset's shape)."""


class IndexedWriter:
    """Append documents to ``prefix``.bin/.idx; :meth:`finish` makes them visible.

    Use as a context manager: leaving it with an exception removes the temporary files.
    """

    def __init__(self, prefix: str | Path, dtype: np.dtype):
        self.prefix = Path(prefix)
        self.dtype = np.dtype(dtype)
        if self.dtype not in DTYPE_CODES:
            raise ValueError(f"dtype {self.dtype} is not one of {list(map(str, DTYPE_CODES))}")
        self._limit = np.iinfo(self.dtype).max
        self.prefix.parent.mkdir(parents=True, exist_ok=True)
        self._bin_tmp = self._tmp(".bin")
        self._bin = open(self._bin_tmp, "wb")
        self._lengths: list[int] = []
        self._tokens = 0

    def _tmp(self, suffix: str) -> Path:
        return self.prefix.with_name(f".{self.prefix.name}{suffix}.tmp.{os.getpid()}")

    @property
    def documents(self) -> int:
        return len(self._lengths)

    @property
    def tokens(self) -> int:
        return self._tokens

    def add_document(self, ids) -> None:
        """One document's token ids (end-of-document token included, if wanted)."""
        ids = np.asarray(ids)
        if ids.size and (int(ids.max()) > self._limit or int(ids.min()) < 0):
            bad = int(ids.max()) if int(ids.max()) > self._limit else int(ids.min())
            raise ValueError(
                f"token id {bad} does not fit {self.dtype} (0..{self._limit}) in {self.prefix}: "
                "the tokenizer's vocabulary is larger than the one the dtype was chosen for"
            )
        self._bin.write(ids.astype(self.dtype, copy=False).tobytes(order="C"))
        self._lengths.append(int(ids.size))
        self._tokens += int(ids.size)

    def finish(self) -> IndexedStats:
        """fsync and rename ``.bin``, then write and rename ``.idx``; returns the stats."""
        self._bin.flush()
        os.fsync(self._bin.fileno())
        self._bin.close()
        os.replace(self._bin_tmp, f"{self.prefix}.bin")
        write_index(self.prefix, self.dtype, np.asarray(self._lengths, dtype=np.int64))
        return IndexedStats(self.documents, self._tokens, file_sha256(Path(f"{self.prefix}.idx")))

    def abort(self) -> None:
        """Drop what was written (nothing appears under the prefix)."""
        if not self._bin.closed:
            self._bin.close()
        for tmp in (self._bin_tmp, self._tmp(".idx")):
            tmp.unlink(missing_ok=True)

    def __enter__(self) -> IndexedWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.abort()


def write_index(
    prefix: str | Path, dtype: np.dtype, lengths: np.ndarray, base_offset: int = 0
) -> Path:
    """Write ``prefix.idx`` (through a temporary name) for documents of ``lengths`` tokens laid
    out back to back in ``prefix.bin`` from byte ``base_offset`` (a header the data file has)."""
    dtype, lengths = np.dtype(dtype), np.asarray(lengths, dtype=np.int64)
    if len(lengths) and int(lengths.max()) > np.iinfo(np.int32).max:
        raise ValueError(f"a document of {int(lengths.max()):,} tokens does not fit the index")
    offsets = np.full(len(lengths), base_offset, dtype=np.int64)
    if len(lengths) > 1:
        offsets[1:] += np.cumsum(lengths[:-1] * dtype.itemsize)
    boundaries = np.arange(len(lengths) + 1, dtype=np.int64)  # one sequence per document
    path = Path(f"{prefix}.idx")
    tmp = path.with_name(f".{path.name}.tmp.{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(HEADER)
        f.write(struct.pack("<Q", 1))
        f.write(struct.pack("<B", DTYPE_CODES[dtype]))
        f.write(struct.pack("<Q", len(lengths)))
        f.write(struct.pack("<Q", len(boundaries)))
        f.write(lengths.astype(np.int32).tobytes(order="C"))
        f.write(offsets.tobytes(order="C"))
        f.write(boundaries.tobytes(order="C"))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return path


def is_complete(prefix: str | Path) -> bool:
    """Both files of ``prefix`` exist (the writer renames ``.idx`` last)."""
    return Path(f"{prefix}.bin").is_file() and Path(f"{prefix}.idx").is_file()
