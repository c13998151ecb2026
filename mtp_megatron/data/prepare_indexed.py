"""``python -m mtp_megatron prepare``: input shards -> tokenized Megatron indexed datasets.

    OUTPUT/train/shard_00000.bin|.idx        one prefix per input shard and side (none if empty)
    OUTPUT/validation/shard_00000.bin|.idx
    OUTPUT/shards/shard_00000.json           a finished shard's record (written after its files)
    OUTPUT/manifest.json                     written last: the dataset is complete iff present

Input files are grouped, in order, into shards of about ``shard_mb`` (a larger file is a shard
of its own); each shard is tokenized by one worker process (one tokenizer thread each,
``encode_batch_fast``) and streamed (``data/documents.py``: memory bounded by the shard, never
by the corpus). A document goes to validation when the hash of its key (shard path and row) and
``split_seed`` falls under ``validation_fraction``: a document's side depends on nothing else
(reordering, adding or removing other files never moves it). Every document is followed by the
end-of-document token. A shard's files depend only on the shard, the tokenizer and the split
settings, so the output is byte-identical for any worker count; a re-run reuses every shard whose
record matches (after a crash, the finished ones) and is a no-op when the manifest does. The
manifest (``manifest.py``) is written last. A hub dataset input (``hf:NAME[:CONFIG]``) is exported
to parquet first (``hub.py``); ``--tokenizer bpe:VOCAB`` trains the project's BPE on the train
split (``tokenizer.own_bpe``). The command line is ``cli/data.py``'s.
"""

from __future__ import annotations

import dataclasses
import glob
import multiprocessing
import os
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from mtp_megatron.config import ConfigError
from mtp_megatron.config.data import BPE_PREFIX, HUB_DATASET_PREFIX, HubDataset, PrepareConfig
from mtp_megatron.config.data import SOURCE_SUFFIXES as SUFFIXES
from mtp_megatron.data.cache import (
    atomic_write_json,
    file_sha256,
    files_sha256,
    read_json,
    unit_hash,
)
from mtp_megatron.data.documents import SKIP_REASONS, iter_documents
from mtp_megatron.data.hub import export_hub_dataset
from mtp_megatron.data.indexed import IndexedWriter, is_complete
from mtp_megatron.data.manifest import FORMAT, MANIFEST, SPLITS, sealed

ENCODE_BATCH = 256
"""Documents per ``encode_batch_fast`` call."""


@dataclass
class Shard:
    """Consecutive input files and what they became."""

    index: int
    sources: list[str]
    """The files' absolute paths."""
    keys: list[str]
    """The names their documents' keys start with: each path relative to its input root."""
    source_sha256: str = ""
    """sha256 over the files' contents, in order."""
    documents: dict[str, int] = field(default_factory=dict)
    """Per split."""
    tokens: dict[str, int] = field(default_factory=dict)
    idx_sha256: dict[str, str] = field(default_factory=dict)
    """Per split with documents (a split without any has no prefix)."""
    skipped: dict[str, int] = field(default_factory=dict)
    """Reason -> count (``documents.SKIP_REASONS``)."""
    bytes: int = 0

    @property
    def name(self) -> str:
        return f"shard_{self.index:05d}"


def walk_inputs(root: Path, suffixes: tuple[str, ...], exclude: tuple[str, ...]) -> list[Path]:
    """The files under ``root`` with one of ``suffixes``, sorted; hidden entries and the
    ``exclude`` directories are pruned, not filtered (a .git or .venv can hold far more files
    than the corpus itself)."""
    files = []
    for folder, dirs, names in os.walk(root):
        dirs[:] = [d for d in dirs if not d.startswith(".") and d not in exclude]
        files += [Path(folder, n) for n in names if n.endswith(suffixes) and not n.startswith(".")]
    return sorted(files)


def list_shards(
    inputs: list[str],
    shard_mb: float = 64.0,
    *,
    suffixes: tuple[str, ...] = SUFFIXES,
    exclude_dirs: tuple[str, ...] = (),
    max_files: int | None = None,
    max_bytes: int | None = None,
) -> list[Shard]:
    """Every input file, in a deterministic order (inputs in order, each expanded sorted), cut
    to the limits and grouped into shards of about ``shard_mb``."""
    found: list[tuple[str, str]] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            for file in walk_inputs(path, suffixes, exclude_dirs):
                rel = file.relative_to(path)
                found.append((str(file.resolve()), f"{path.name}/{rel.as_posix()}"))
        elif path.is_file():
            found.append((str(path.resolve()), path.name))
        else:
            matches = sorted(glob.glob(item, recursive=True))
            files = [Path(m) for m in matches if Path(m).is_file()]
            if not files:
                raise ConfigError(f"prepare: input {item!r} is no file, directory or matching glob")
            found += [(str(f.resolve()), f.name) for f in files if f.name.endswith(suffixes)]
    unknown = [s for s, _ in found if not s.endswith(SUFFIXES)]
    if unknown:
        raise ConfigError(f"prepare: {unknown[0]} is not one of {SUFFIXES}")
    if not found:
        raise ConfigError(f"prepare: no {'/'.join(suffixes)} files under {inputs}")
    counts = Counter(k for _, k in found)
    duplicate = next((k for k, n in counts.items() if n > 1), None)
    if duplicate is not None:
        raise ConfigError(
            f"prepare: two inputs are both named {duplicate!r}; documents are keyed by name "
            "(the split hashes it): rename one or pass their common parent directory"
        )
    if max_files is not None:
        found = found[:max_files]
    sizes = [os.path.getsize(source) for source, _ in found]
    if max_bytes is not None:
        kept, total = 0, 0
        while kept < len(found) and total < max_bytes:
            total += sizes[kept]
            kept += 1
        found, sizes = found[:kept], sizes[:kept]
    shards: list[Shard] = []
    size, limit = 0, shard_mb * 1e6
    for (source, key), file_size in zip(found, sizes):
        if not shards or size + file_size > limit:
            shards.append(Shard(len(shards), [], []))
            size = 0
        shards[-1].sources.append(source)
        shards[-1].keys.append(key)
        size += file_size
    return shards


# -- one shard (in a worker) ---------------------------------------------------------------------
_WORKER: dict = {}


def _init_worker(tokenizer: str, eod_token: str | None, settings: dict, one_thread: bool) -> None:
    if one_thread:
        os.environ["RAYON_NUM_THREADS"] = "1"  # before tokenizers starts its thread pool
    from mtp_megatron.data.tokenizer import load_hf_tokenizer

    _WORKER["tok"] = load_hf_tokenizer(tokenizer, eod_token)
    _WORKER["settings"] = settings


def _batches(docs: Iterator[tuple[str, str]]) -> Iterator[list[tuple[str, str]]]:
    batch = []
    for doc in docs:
        batch.append(doc)
        if len(batch) == ENCODE_BATCH:
            yield batch
            batch = []
    if batch:
        yield batch


def _prepare_shard(shard: Shard) -> Shard:
    """Tokenize ``shard`` into its train / validation prefixes and write its record."""
    import numpy as np

    from mtp_megatron.data.tokenizer import token_dtype

    tok, s = _WORKER["tok"], _WORKER["settings"]
    out = Path(s["output"])
    # the old record goes before any file of the shard is replaced: a record always describes
    # the files next to it
    (out / "shards" / f"{shard.name}.json").unlink(missing_ok=True)
    dtype = token_dtype(tok.vocab_size)
    shard.source_sha256 = files_sha256(shard.sources)
    shard.bytes = sum(os.path.getsize(f) for f in shard.sources)
    skipped: Counter = Counter()
    writers = {
        split: IndexedWriter(out / split / shard.name, dtype) for split in SPLITS
    }  # nothing appears under a prefix until finish()
    try:
        eod = np.array([tok.eod_id], dtype=np.int64)
        encode = tok.tokenizer.encode_batch_fast
        docs = (
            doc
            for source, key in zip(shard.sources, shard.keys)
            for doc in iter_documents(Path(source), key, s["text_field"], skipped)
        )
        for batch in _batches(docs):
            for (key, _), enc in zip(
                batch, encode([t for _, t in batch], add_special_tokens=False)
            ):
                held_out = unit_hash("split", s["split_seed"], key) < s["validation_fraction"]
                ids = np.concatenate([np.asarray(enc.ids, dtype=np.int64), eod])
                writers["validation" if held_out else "train"].add_document(ids)
        for split, writer in writers.items():
            shard.documents[split], shard.tokens[split] = writer.documents, writer.tokens
            if writer.documents:
                shard.idx_sha256[split] = writer.finish().idx_sha256
            else:
                writer.abort()
    except BaseException:
        for writer in writers.values():
            writer.abort()
        raise
    shard.skipped = {reason: skipped[reason] for reason in SKIP_REASONS if skipped[reason]}
    atomic_write_json(out / "shards" / f"{shard.name}.json", _record(shard, s))
    return shard


def _record(shard: Shard, settings: dict) -> dict:
    return {"settings": settings["key"], **asdict(shard)}


def _reusable(shard: Shard, settings: dict) -> Shard | None:
    """The finished record of ``shard`` when its source, tokenizer and settings are unchanged."""
    out = Path(settings["output"])
    record = read_json(out / "shards" / f"{shard.name}.json")
    if record is None:
        return None
    same_input = record.get("sources") == shard.sources and record.get("keys") == shard.keys
    if record.get("settings") != settings["key"] or not same_input:
        return None
    if record.get("source_sha256") != files_sha256(shard.sources):
        return None
    itemsize = np.dtype(settings["dtype"]).itemsize
    for split, idx_sha in record["idx_sha256"].items():
        prefix = out / split / shard.name
        if not is_complete(prefix) or file_sha256(f"{prefix}.idx") != idx_sha:
            return None
        if os.path.getsize(f"{prefix}.bin") != record["tokens"][split] * itemsize:
            return None
    record.pop("settings")
    return Shard(**record)


# -- the whole dataset ---------------------------------------------------------------------------
def prepare(cfg: PrepareConfig, log: Callable[[str], None] = print) -> dict:
    """Prepare ``cfg.output`` (see the module doc); returns the manifest."""
    from mtp_megatron.data.tokenizer import load_hf_tokenizer, token_dtype

    cfg.validate()
    out = Path(cfg.output).resolve()
    inputs = [
        export_hub_dataset(HubDataset.parse(i, "prepare input"), out, log)
        if i.startswith(HUB_DATASET_PREFIX)
        else i
        for i in cfg.inputs
    ]
    shards = list_shards(
        inputs,
        cfg.shard_mb,
        suffixes=cfg.suffixes,
        exclude_dirs=cfg.exclude_dirs,
        max_files=cfg.max_files,
        max_bytes=cfg.max_bytes,
    )
    if cfg.tokenizer.startswith(BPE_PREFIX):
        from mtp_megatron.data.tokenizer import own_bpe

        trained = own_bpe(cfg, [(s.sources, s.keys) for s in shards], out, log)
        cfg = dataclasses.replace(cfg, tokenizer=str(trained))
    tok = load_hf_tokenizer(cfg.tokenizer, cfg.eod_token)
    key = {
        "format": FORMAT,
        "tokenizer_sha256": tok.sha256,
        "eod_id": tok.eod_id,
        "text_field": cfg.text_field,
        "validation_fraction": cfg.validation_fraction,
        "split_seed": cfg.split_seed,
    }
    settings = {**key, "key": key, "output": str(out), "dtype": str(token_dtype(tok.vocab_size))}
    todo, done = [], {}
    for shard in shards:
        reused = _reusable(shard, settings)
        if reused is None:
            todo.append(shard)
        else:
            done[shard.index] = reused
    log(
        f"prepare: {len(shards)} shards ({len(done)} already done), tokenizer {tok.file} "
        f"(vocabulary {tok.vocab_size:,}, end of document {tok.eod_token!r} = {tok.eod_id}), "
        f"{cfg.workers} worker(s) -> {out}"
    )
    if todo:  # rewritten last, once every shard is done
        (out / MANIFEST).unlink(missing_ok=True)
    progress = _Progress(sum(os.path.getsize(f) for s in todo for f in s.sources), log)
    init = (cfg.tokenizer, cfg.eod_token, settings)
    if cfg.workers == 1 or len(todo) <= 1:
        _init_worker(*init, one_thread=False)
        results: Iterator[Shard] = map(_prepare_shard, todo)
        for shard in results:
            done[shard.index] = shard
            progress.shard_done(shard, len(done), len(shards))
    else:
        ctx = multiprocessing.get_context("spawn")
        with ctx.Pool(cfg.workers, _init_worker, (*init, True)) as pool:
            for shard in pool.imap_unordered(_prepare_shard, todo):
                done[shard.index] = shard
                progress.shard_done(shard, len(done), len(shards))
    manifest = _manifest(cfg, tok, token_dtype(tok.vocab_size), [done[i] for i in sorted(done)])
    if read_json(out / MANIFEST) != manifest:  # a finished dataset is left untouched
        atomic_write_json(out / MANIFEST, manifest)
    totals = manifest["totals"]
    log(
        f"prepare: done, {totals['documents']['train']:,} train / "
        f"{totals['documents']['validation']:,} validation documents, "
        f"{sum(totals['tokens'].values()):,} tokens, skipped {totals['skipped'] or 'nothing'}; "
        f"fingerprint {manifest['fingerprint'][:16]}"
    )
    return manifest


def _manifest(cfg: PrepareConfig, tok, dtype, shards: list[Shard]) -> dict:
    totals: dict[str, Counter] = {"documents": Counter(), "tokens": Counter(), "skipped": Counter()}
    for shard in shards:
        totals["documents"].update(shard.documents)
        totals["tokens"].update(shard.tokens)
        totals["skipped"].update(shard.skipped)
    body = {
        "format": FORMAT,
        "tokenizer": {
            "file": str(tok.file),
            "sha256": tok.sha256,
            "eod_token": tok.eod_token,
            "eod_id": tok.eod_id,
            "vocab_size": tok.vocab_size,
        },
        "dtype": str(dtype),
        "text_field": cfg.text_field,
        "validation_fraction": cfg.validation_fraction,
        "split_seed": cfg.split_seed,
        "shards": [asdict(s) for s in shards],
        "totals": {
            "documents": {s: totals["documents"][s] for s in SPLITS},
            "tokens": {s: totals["tokens"][s] for s in SPLITS},
            "skipped": dict(sorted(totals["skipped"].items())),
        },
    }
    return sealed(body)


class _Progress:
    """One line per finished shard (rewritten in place on a terminal): tokens, MB/s, ETA."""

    EVERY_S = 10.0
    """Plain lines (not a terminal) at most this often, and at the end."""

    def __init__(self, total_bytes: int, log: Callable[[str], None]):
        self.total, self.bytes, self.tokens, self.log = total_bytes, 0, 0, log
        self.start = self.last = time.perf_counter()
        self.tty = log is print and sys.stdout.isatty()

    def shard_done(self, shard: Shard, done: int, total: int) -> None:
        self.bytes += shard.bytes
        self.tokens += sum(shard.tokens.values())
        now = time.perf_counter()
        if not self.tty and done < total and now - self.last < self.EVERY_S:
            return
        self.last = now
        elapsed = max(now - self.start, 1e-9)
        rate = self.bytes / elapsed
        eta = (self.total - self.bytes) / rate if rate > 0 else 0.0
        line = (
            f"prepare: {done}/{total} shards, {self.tokens:,} tokens, "
            f"{self.tokens / elapsed:,.0f} tokens/s, {rate / 1e6:.1f} MB/s, ETA {eta:.0f} s"
        )
        if self.tty:
            print(f"\r{line}", end="\n" if done == total else "", flush=True)
        else:
            self.log(line)
