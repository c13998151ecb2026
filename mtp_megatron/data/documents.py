"""Stream the documents of one input shard, with memory bounded by the shard's largest unit.

A document is a whole .txt/.py/.md file, one line of a .jsonl file (read line by line), or one
row of a .parquet file (read one row group at a time). Each has a key, the shard's name plus
its row ('data/part-0.jsonl:17'), which the train/validation split hashes. Bad input is skipped
and counted by reason (:data:`SKIP_REASONS`), never fatal: a truncated parquet file keeps the
rows of its readable row groups and counts the file once as unreadable.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

SKIP_REASONS = ("empty", "not_utf8", "bad_json", "no_text_field", "unreadable")
"""Why a document (or, for 'unreadable', a file or the rest of it) was skipped."""


def iter_documents(
    file: Path, key: str, text_field: str, skipped: Counter
) -> Iterator[tuple[str, str]]:
    """(document key, text) of each document of ``file`` (named ``key``); skips go to
    ``skipped`` (reason -> count)."""
    suffix = file.suffix
    try:
        if suffix == ".jsonl":
            yield from _jsonl(file, key, text_field, skipped)
        elif suffix == ".parquet":
            yield from _parquet(file, key, text_field, skipped)
        else:
            raw = file.read_bytes()
            text = _decoded(raw, skipped)
            if text is not None and _non_empty(text, skipped):
                yield key, text
    except OSError:
        skipped["unreadable"] += 1


def _decoded(raw: bytes, skipped: Counter) -> str | None:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        skipped["not_utf8"] += 1
        return None


def _non_empty(text: str, skipped: Counter) -> bool:
    """A document worth keeping: not blank, and encodable (JSON can spell a lone surrogate,
    '\\ud800', which no tokenizer accepts)."""
    if not text.strip():
        skipped["empty"] += 1
        return False
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        skipped["not_utf8"] += 1
        return False
    return True


def _row_text(row: object, text_field: str, skipped: Counter) -> str | None:
    text = row.get(text_field) if isinstance(row, dict) else None
    if not isinstance(text, str):
        skipped["no_text_field"] += 1
        return None
    return text if _non_empty(text, skipped) else None


def _jsonl(file: Path, key: str, text_field: str, skipped: Counter):
    with open(file, "rb") as f:
        for i, line in enumerate(f):
            if not line.strip():
                skipped["empty"] += 1
                continue
            decoded = _decoded(line, skipped)
            if decoded is None:
                continue
            try:
                row = json.loads(decoded)
            except json.JSONDecodeError:
                skipped["bad_json"] += 1
                continue
            text = _row_text(row, text_field, skipped)
            if text is not None:
                yield f"{key}:{i}", text


def _parquet(file: Path, key: str, text_field: str, skipped: Counter):
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(file)
    except Exception:  # not a parquet file, truncated footer: pyarrow raises ArrowInvalid & co.
        skipped["unreadable"] += 1
        return
    if text_field not in pf.schema_arrow.names:
        skipped["no_text_field"] += pf.metadata.num_rows
        return
    row = 0
    for group in range(pf.num_row_groups):
        try:
            texts = pf.read_row_group(group, columns=[text_field]).column(0).to_pylist()
        except Exception:  # a damaged row group: the rest of the file cannot be trusted
            skipped["unreadable"] += 1
            return
        for text in texts:
            if isinstance(text, str) and _non_empty(text, skipped):
                yield f"{key}:{row}", text
            elif not isinstance(text, str):
                skipped["no_text_field"] += 1
            row += 1
