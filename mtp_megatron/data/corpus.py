"""Read a corpus into a ``datasets.Dataset`` of documents (columns ``path``, ``text``).

A document is a whole .txt/.py/.md file or one row of a .jsonl/.parquet file or hub dataset. Its
``path`` is relative to the source root ('asyncio/tasks.py', 'shard0.jsonl:17' for line 17), so
the split, which hashes paths, survives moving the corpus. Bad input never stops a run: files
that are not valid UTF-8, unreadable files, broken rows and empty documents are skipped, counted
and named in the stats.
"""

from __future__ import annotations

import contextlib
import json
import os
import sysconfig
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import datasets

from mtp_megatron.config import ConfigError
from mtp_megatron.data.cache import digest
from mtp_megatron.data.config import ROW_SUFFIXES, SOURCE_SUFFIXES, DataConfig

# Third-party packages installed into the base interpreter differ between machines; the stdlib
# corpus is the interpreter's own modules only (~1,790 files, 31.5 MB on CPython 3.11).
_NOT_STDLIB = {"site-packages", "dist-packages"}
_MAX_NAMED = 100  # skipped paths kept in the stats; the counts are always complete


@dataclass
class Corpus:
    """The documents of a source, sorted by path, and what was skipped on the way."""

    documents: datasets.Dataset
    """Columns 'path' and 'text', one row per document, sorted by path."""
    content_digest: str
    """blake2b of the sorted (path, size, content hash) of every document."""
    files_read: int = 0
    """Files (or hub rows) looked at after the limits."""
    bytes_read: int = 0
    """Their total size."""
    skipped_non_utf8: int = 0
    """Files or rows that are not valid UTF-8."""
    skipped_other: int = 0
    """Unreadable files, broken rows (bad JSON, missing or non-string text field)."""
    skipped_empty: int = 0
    """Empty or whitespace-only documents (e.g. the stdlib's empty __init__.py files)."""
    skipped_paths: list[str] = field(default_factory=list)
    """'path: reason' for the first non-UTF-8 or broken items (at most 100; empty ones are not
    named)."""


class _Reader:
    """Accumulates documents and skip counts while the files of a source are read."""

    def __init__(self) -> None:
        self.docs: dict[str, tuple[str, str]] = {}  # path -> (text, "size:hash")
        self.corpus = Corpus(documents=None, content_digest="")  # type: ignore[arg-type]

    def skip(self, kind: str, path: str, reason: str) -> None:
        setattr(self.corpus, kind, getattr(self.corpus, kind) + 1)
        if kind != "skipped_empty" and len(self.corpus.skipped_paths) < _MAX_NAMED:
            self.corpus.skipped_paths.append(f"{path}: {reason}")

    def add(self, path: str, text: str, raw: bytes | None = None) -> None:
        if not text.strip():
            self.skip("skipped_empty", path, "empty")
            return
        raw = text.encode() if raw is None else raw
        self.docs[path] = (text, f"{len(raw)}:{digest(raw)}")

    def add_row(self, path: str, row: object, text_field: str) -> None:
        text = row.get(text_field) if isinstance(row, dict) else None
        if not isinstance(text, str):
            self.skip("skipped_other", path, f"no string field '{text_field}'")
        else:
            self.add(path, text)

    def finish(self) -> Corpus:
        paths = sorted(self.docs)
        entries = [f"{p}\0{self.docs[p][1]}" for p in paths]
        self.corpus.content_digest = digest(*entries)
        texts = [self.docs[p][0] for p in paths]
        self.corpus.documents = datasets.Dataset.from_dict({"path": paths, "text": texts})
        return self.corpus


def _list_files(root: Path, stdlib: bool) -> list[tuple[str, Path]]:
    """(relative posix path, file) for the source files under ``root``, sorted by that path."""
    if root.is_file():
        return [(root.name, root)]
    suffixes = (".py",) if stdlib else SOURCE_SUFFIXES
    found = []
    for folder, dirs, names in os.walk(root):
        # Pruned, not filtered: hidden folders (.git, .venv, a cache inside the corpus) and
        # site-packages can hold far more files than the corpus itself.
        dirs[:] = [d for d in dirs if not d.startswith(".") and not (stdlib and d in _NOT_STDLIB)]
        for name in names:
            if name.endswith(suffixes) and not name.startswith("."):
                file = Path(folder, name)
                found.append((file.relative_to(root).as_posix(), file))
    return sorted(found)


def _limit(
    files: list[tuple[str, Path]], cfg: DataConfig, reader: _Reader
) -> list[tuple[str, Path, int]]:
    """Apply max_files / max_bytes to the sorted list, so a limit always picks the same files."""
    if cfg.max_files is not None:
        files = files[: cfg.max_files]
    kept, total = [], 0
    for rel, file in files:
        if cfg.max_bytes is not None and total >= cfg.max_bytes:
            break
        try:
            size = file.stat().st_size
        except OSError as e:
            reader.skip("skipped_other", rel, f"cannot stat: {e.strerror}")
            continue
        kept.append((rel, file, size))
        total += size
    return kept


@contextlib.contextmanager
def _no_progress_bars() -> Iterator[None]:
    """datasets' per-file progress bars would drown the log lines; restore them afterwards."""
    enabled = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        if enabled:
            datasets.enable_progress_bars()


def _read_jsonl(rel: str, raw: bytes, text_field: str, reader: _Reader) -> None:
    # Parsed line by line: datasets' json builder fails the whole file on one broken line.
    lines = raw.split(b"\n")
    if lines[-1] == b"":
        lines.pop()  # what follows the final newline is no line
    for i, line in enumerate(lines):
        path = f"{rel}:{i}"
        if not line.strip():
            reader.skip("skipped_empty", path, "empty line")
            continue
        try:
            row = json.loads(line.decode("utf-8"))
        except UnicodeDecodeError:
            reader.skip("skipped_non_utf8", path, "not valid UTF-8")
            continue
        except json.JSONDecodeError as e:
            reader.skip("skipped_other", path, f"bad JSON: {e.msg}")
            continue
        reader.add_row(path, row, text_field)


def _read_parquet(rel: str, file: Path, cfg: DataConfig, hf_cache: Path, reader: _Reader) -> None:
    try:
        with _no_progress_bars():
            table = datasets.load_dataset(
                "parquet", data_files=str(file), split="train", cache_dir=str(hf_cache)
            )
    except Exception as e:  # any unreadable parquet file is skipped, not fatal
        reader.skip("skipped_other", rel, f"cannot read parquet: {type(e).__name__}: {e}")
        return
    if cfg.text_field not in table.column_names:
        reader.skip("skipped_other", rel, f"no column '{cfg.text_field}' in {table.column_names}")
        return
    for i, text in enumerate(table[cfg.text_field]):
        reader.add_row(f"{rel}:{i}", {cfg.text_field: text}, cfg.text_field)


def _read_files(cfg: DataConfig, root: Path, stdlib: bool, hf_cache: Path, log) -> Corpus:
    reader = _Reader()
    files = _limit(_list_files(root, stdlib), cfg, reader)
    log(f"data: reading {len(files)} files from {root}")
    start = time.perf_counter()
    for n, (rel, file, size) in enumerate(files, 1):
        reader.corpus.files_read += 1
        reader.corpus.bytes_read += size
        if n % 2000 == 0:
            log(f"data: read {n}/{len(files)} files")
        if file.suffix == ".parquet":
            _read_parquet(rel, file, cfg, hf_cache, reader)
            continue
        try:
            raw = file.read_bytes()
        except OSError as e:
            reader.skip("skipped_other", rel, f"cannot read: {e.strerror}")
            continue
        if file.suffix in ROW_SUFFIXES:  # .jsonl (parquet handled above)
            _read_jsonl(rel, raw, cfg.text_field, reader)
            continue
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            reader.skip("skipped_non_utf8", rel, "not valid UTF-8")
            continue
        reader.add(rel, text, raw)
    corpus = reader.finish()
    log(f"data: read {corpus.files_read} files in {time.perf_counter() - start:.1f} s")
    return corpus


def _read_hub(cfg: DataConfig, hf_cache: Path, log) -> Corpus:
    _, name, *config = cfg.source.split(":")
    log(f"data: loading hub dataset {name} {config[0] if config else ''}".rstrip())
    try:
        with _no_progress_bars():
            table = datasets.load_dataset(
                name, config[0] if config else None, split="train", cache_dir=str(hf_cache)
            )
    except Exception as e:  # offline, unknown name, gated: all end the same way for the user
        raise ConfigError(
            f"data.source={cfg.source!r}: could not load the Hugging Face dataset {name!r} "
            f"({type(e).__name__}: {e}). The network may be unavailable from this machine; "
            "use a local corpus instead, e.g. data.source=stdlib or data.source=/path/to/texts "
            "(a directory of .txt/.py/.md/.jsonl/.parquet files)"
        ) from e
    if cfg.text_field not in table.column_names:
        raise ConfigError(
            f"data.text_field={cfg.text_field!r}: the dataset {name!r} has no such column; "
            f"it has {table.column_names}"
        )
    reader = _Reader()
    rows: Iterable[object] = table[cfg.text_field]
    for i, text in enumerate(rows):
        if cfg.max_files is not None and i >= cfg.max_files:
            break
        if cfg.max_bytes is not None and reader.corpus.bytes_read >= cfg.max_bytes:
            break
        reader.corpus.files_read += 1
        reader.corpus.bytes_read += len(text.encode()) if isinstance(text, str) else 0
        reader.add_row(f"{name}:{i}", {cfg.text_field: text}, cfg.text_field)
    return reader.finish()


def read_corpus(cfg: DataConfig, hf_cache: Path, log: Callable[[str], None] = print) -> Corpus:
    """Read ``cfg.source`` (limits applied) and log what was read and skipped."""
    if cfg.source.startswith("hf:"):
        corpus = _read_hub(cfg, hf_cache, log)
    elif cfg.source == "stdlib":
        root = Path(sysconfig.get_paths()["stdlib"])
        corpus = _read_files(cfg, root, stdlib=True, hf_cache=hf_cache, log=log)
    else:
        corpus = _read_files(cfg, Path(cfg.source).resolve(), False, hf_cache, log)
    c = corpus
    log(
        f"data: {len(c.documents)} documents ({c.bytes_read / 1e6:.1f} MB read); skipped "
        f"{c.skipped_non_utf8} not valid UTF-8, {c.skipped_other} unreadable or broken, "
        f"{c.skipped_empty} empty"
    )
    for line in c.skipped_paths[:10]:
        log(f"data:   skipped {line}")
    return corpus
