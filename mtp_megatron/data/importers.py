"""Token data made elsewhere, taken as it is: Megatron prefixes and flat token files.

- ``prepare --from-megatron PREFIX ...``: ``.bin`` / ``.idx`` written by Megatron-LM's
  ``tools/preprocess_data.py`` (or anything in that format) are validated (index readable, data
  file exactly as long as the index says, every id known) and recorded in a manifest; nothing is
  copied.
- ``prepare --from-numpy 'x/*.npy' --dtype uint32 --eod ID``: the flat token files of the Dolma
  / OLMo-core toolkits (raw ids back to back, or a ``.npy`` with its header), split into
  documents after each end-of-document id; an ``.idx`` is written for each and the file itself
  is linked as the ``.bin`` (megatron reads ids at the byte offsets the index gives, so a header
  is simply skipped). uint32 ids are declared int32 (the same bytes below 2^31; megatron's
  format has no uint32 code).

Either way the dataset directory gets the manifest of ``prepare`` (``manifest.py``), so
training reads it the same way; imported files land in the train split, a validation split is
given separately (``--validation``).
"""

from __future__ import annotations

import glob
from pathlib import Path

import numpy as np

from mtp_megatron.config import ConfigError
from mtp_megatron.data.cache import atomic_write_json, file_sha256
from mtp_megatron.data.indexed import DTYPE_CODES, HEADER, write_index
from mtp_megatron.data.manifest import FORMAT, MANIFEST, SPLITS, sealed

CHUNK = 1 << 24
"""Ids scanned at a time (64 MB of uint32): memory stays flat for any file size."""
FLAT_DTYPES: dict[str, np.dtype] = {
    "uint16": np.dtype(np.uint16),
    "uint32": np.dtype(np.uint32),
    "int32": np.dtype(np.int32),
}
_CODE_DTYPES: dict[int, np.dtype] = {code: np.dtype(dt) for dt, code in DTYPE_CODES.items()}


def _scan(tokens: np.ndarray, eod: int | None) -> tuple[np.ndarray, int]:
    """(exclusive end of each document, the largest id) of a flat id array, chunk by chunk."""
    ends, largest = [], -1
    for start in range(0, len(tokens), CHUNK):
        chunk = np.asarray(tokens[start : start + CHUNK])
        if eod is not None:
            ends.append(np.flatnonzero(chunk == eod) + start + 1)
        largest = max(largest, int(chunk.max()))
    found = np.concatenate(ends) if ends else np.zeros(0, dtype=np.int64)
    return found.astype(np.int64), largest


def _expand(patterns: list[str], what: str) -> list[Path]:
    files = []
    for pattern in patterns:
        matches = sorted(glob.glob(pattern)) or ([pattern] if Path(pattern).is_file() else [])
        if not matches:
            raise ConfigError(f"prepare {what}: {pattern!r} matches no file")
        files += [Path(m).resolve() for m in matches]
    return files


def _flat_tokens(file: Path, dtype) -> tuple[np.ndarray, int]:
    """The ids of ``file`` (memory-mapped) and the byte offset they start at."""
    with open(file, "rb") as f:
        magic = f.read(6)
    if magic == b"\x93NUMPY":
        array = np.load(file, mmap_mode="r")
        if array.ndim != 1 or array.dtype != np.dtype(dtype):
            raise ConfigError(
                f"{file} holds a {array.dtype} array of shape {array.shape}, not the 1-D "
                f"{np.dtype(dtype)} ids --dtype says"
            )
        return array, int(array.offset)
    size = file.stat().st_size
    if size % np.dtype(dtype).itemsize:
        raise ConfigError(
            f"{file} is {size} bytes, not a whole number of {np.dtype(dtype)} ids: wrong --dtype?"
        )
    return np.memmap(file, dtype=dtype, mode="r"), 0


def _scan_flat(file: Path, dtype, eod: int) -> dict:
    """Validate a flat token file and find its documents (nothing written yet)."""
    tokens, offset = _flat_tokens(file, dtype)
    if len(tokens) == 0:
        raise ConfigError(f"{file} holds no ids")
    ends, largest = _scan(tokens, eod)
    if np.dtype(dtype) == np.uint32 and largest > np.iinfo(np.int32).max:
        raise ConfigError(f"{file}: id {largest} does not fit int32, megatron's widest id type")
    if not len(ends) or ends[-1] != len(tokens):
        ends = np.append(ends, len(tokens))  # the last document may lack its end id
    lengths = np.diff(ends, prepend=0)
    declared = np.dtype(np.int32) if np.dtype(dtype) == np.uint32 else np.dtype(dtype)
    return {
        "documents": len(lengths),
        "tokens": int(len(tokens)),
        "max_id": largest,
        "index": (declared, lengths, offset),
    }


def _index_flat(file: Path, prefix: Path, scanned: dict) -> None:
    """Link ``file`` as ``prefix.bin`` and write its index."""
    link = Path(f"{prefix}.bin")
    if link.exists() and not link.is_symlink():
        raise ConfigError(
            f"{link} is a data file of its own (an earlier `prepare` into this directory?); "
            "import into another --output"
        )
    prefix.parent.mkdir(parents=True, exist_ok=True)
    link.unlink(missing_ok=True)
    link.symlink_to(file)  # the data stays where it is
    declared, lengths, offset = scanned.pop("index")
    write_index(prefix, declared, lengths, base_offset=offset)


def _check_megatron(prefix: Path) -> dict:
    """Validate an existing prefix: its index, the data file's length, the ids."""
    idx, bin_ = Path(f"{prefix}.idx"), Path(f"{prefix}.bin")
    missing = [p.name for p in (idx, bin_) if not p.is_file()]
    if missing:
        raise ConfigError(f"prepare --from-megatron: {prefix} has no {' / '.join(missing)}")
    with open(idx, "rb") as f:
        head = f.read(len(HEADER) + 9)
    if head[: len(HEADER)] != HEADER:
        raise ConfigError(f"{idx} is not a Megatron index (no MMIDIDX header)")
    code = head[-1]
    if code not in _CODE_DTYPES:
        raise ConfigError(f"{idx}: dtype code {code} is not a token type (uint16 8, int32 4)")
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    data = IndexedDataset(str(prefix), mmap=True)
    lengths = data.sequence_lengths.astype(np.int64)
    dtype = _CODE_DTYPES[code]
    expected = int(lengths.sum()) * dtype.itemsize
    if bin_.stat().st_size != expected:
        raise ConfigError(
            f"{bin_} is {bin_.stat().st_size:,} bytes but its index describes {expected:,}: "
            "truncated or not the index's data file"
        )
    _, largest = _scan(np.memmap(bin_, dtype=dtype, mode="r"), None)
    return {"documents": len(data), "tokens": int(lengths.sum()), "max_id": largest}


def import_data(
    output: str | Path,
    *,
    megatron: dict[str, list[str]] | None = None,
    numpy: dict[str, list[str]] | None = None,
    dtype: str | None = None,
    eod: int | None = None,
) -> dict:
    """Record existing data under ``output``: ``megatron`` / ``numpy`` map a split ('train',
    'validation') to prefixes / file patterns. Returns the manifest."""
    out = Path(output).resolve()
    (out / MANIFEST).unlink(missing_ok=True)  # rewritten last, once every input is valid
    shards: list[dict] = []
    if numpy:
        if dtype not in FLAT_DTYPES:
            raise ConfigError(f"--dtype={dtype!r} is invalid: one of {sorted(FLAT_DTYPES)}")
        if eod is None:
            raise ConfigError("--from-numpy needs --eod ID (the id that ends each document)")
    flat = [
        (split, f) for split, pats in (numpy or {}).items() for f in _expand(pats, "--from-numpy")
    ]
    scanned = []
    if flat:  # a --from-numpy import: dtype and eod are checked above
        assert dtype is not None and eod is not None
        scanned = [_scan_flat(file, FLAT_DTYPES[dtype], eod) for _, file in flat]  # all first
    for (split, file), stats in zip(flat, scanned):
        prefix = out / split / f"shard_{len(shards):05d}"
        _index_flat(file, prefix, stats)
        shards.append(_shard(len(shards), split, str(prefix), str(file), stats))
    for split, given in (megatron or {}).items():
        for name in given:
            prefix = Path(name).resolve()
            stats = _check_megatron(prefix)
            shards.append(_shard(len(shards), split, str(prefix), str(prefix), stats))
    if not shards:
        raise ConfigError("prepare: nothing to import")
    body = {
        "format": FORMAT,
        "imported": True,
        "tokenizer": {"eod_id": eod},
        "max_token_id": max(s["max_id"] for s in shards),
        "shards": shards,
        "totals": {
            key: {sp: sum(s[key].get(sp, 0) for s in shards) for sp in SPLITS}
            for key in ("documents", "tokens")
        },
    }
    manifest = sealed(body)
    atomic_write_json(out / MANIFEST, manifest)
    return manifest


def _shard(index: int, split: str, prefix: str, source: str, stats: dict) -> dict:
    return {
        "index": index,
        "sources": [source],
        "prefixes": {split: prefix},
        "documents": {split: stats["documents"]},
        "tokens": {split: stats["tokens"]},
        "idx_sha256": {split: file_sha256(Path(f"{prefix}.idx"))},
        "max_id": stats["max_id"],
    }
