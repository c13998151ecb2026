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
manifest's ``fingerprint`` (sha256 of its content) names the dataset: caches keyed by it can never
hold stale indices.
"""

from __future__ import annotations

import dataclasses
import glob
import hashlib
import json
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
from mtp_megatron.config.data import BPE_PREFIX
from mtp_megatron.config.data import SOURCE_SUFFIXES as SUFFIXES
from mtp_megatron.data.cache import atomic_write_json, file_sha256, unit_hash
from mtp_megatron.data.documents import SKIP_REASONS, iter_documents
from mtp_megatron.data.indexed import IndexedWriter, is_complete

FORMAT = "mtp-megatron-indexed-v1"
MANIFEST = "manifest.json"
SPLITS = ("train", "validation")
HUB_PREFIX = "hf:"
"""An input ``hf:NAME[:CONFIG]``: a Hugging Face dataset's train split."""
ENCODE_BATCH = 256
"""Documents per ``encode_batch_fast`` call."""


@dataclass
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
    suffixes: tuple[str, ...] = SUFFIXES
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
        if isinstance(frac, bool) or not isinstance(frac, (int, float)) or not 0 <= frac < 1:
            raise ConfigError(f"--validation-fraction={frac!r} is invalid: must be in [0, 1)")
        if isinstance(self.workers, bool) or not isinstance(self.workers, int) or self.workers < 1:
            raise ConfigError(f"--workers={self.workers!r} is invalid: must be an integer >= 1")
        if (
            isinstance(self.shard_mb, bool)
            or not isinstance(self.shard_mb, (int, float))
            or (self.shard_mb <= 0)
        ):
            raise ConfigError(f"--shard-mb={self.shard_mb!r} is invalid: must be a number > 0")
        if not self.text_field:
            raise ConfigError("--text-field must be a non-empty column name")
        for name in ("max_files", "max_bytes"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
                raise ConfigError(f"--{name.replace('_', '-')}={value!r} must be an integer")
            if value is not None and value < 1:
                raise ConfigError(f"--{name.replace('_', '-')}={value!r} must be >= 1")


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


def _sources_sha256(sources: list[str]) -> str:
    return hashlib.sha256("".join(file_sha256(f) for f in sources).encode()).hexdigest()


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
    shard.source_sha256 = _sources_sha256(shard.sources)
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


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _reusable(shard: Shard, settings: dict) -> Shard | None:
    """The finished record of ``shard`` when its source, tokenizer and settings are unchanged."""
    out = Path(settings["output"])
    record = _read_json(out / "shards" / f"{shard.name}.json")
    if record is None:
        return None
    same_input = record.get("sources") == shard.sources and record.get("keys") == shard.keys
    if record.get("settings") != settings["key"] or not same_input:
        return None
    if record.get("source_sha256") != _sources_sha256(shard.sources):
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
    inputs = [_hub_export(i, out, log) if i.startswith(HUB_PREFIX) else i for i in cfg.inputs]
    shards = list_shards(
        inputs,
        cfg.shard_mb,
        suffixes=cfg.suffixes,
        exclude_dirs=cfg.exclude_dirs,
        max_files=cfg.max_files,
        max_bytes=cfg.max_bytes,
    )
    if cfg.tokenizer.startswith(BPE_PREFIX):
        cfg = dataclasses.replace(cfg, tokenizer=str(_own_bpe(cfg, shards, out, log)))
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
    if _read_json(out / MANIFEST) != manifest:  # a finished dataset is left untouched
        atomic_write_json(out / MANIFEST, manifest)
    totals = manifest["totals"]
    log(
        f"prepare: done, {totals['documents']['train']:,} train / "
        f"{totals['documents']['validation']:,} validation documents, "
        f"{sum(totals['tokens'].values()):,} tokens, skipped {totals['skipped'] or 'nothing'}; "
        f"fingerprint {manifest['fingerprint'][:16]}"
    )
    return manifest


def _hub_export(spec: str, out: Path, log) -> str:
    """``hf:NAME[:CONFIG]``: the dataset's train split as parquet files in a directory of
    ``out/hub/`` (downloaded and exported by ``datasets`` once; a later call finds it)."""
    parts = spec.split(":")
    if len(parts) not in (2, 3) or not all(parts[1:]):
        raise ConfigError(f"prepare: {spec!r}: a hub dataset is written 'hf:NAME[:CONFIG]'")
    name, config = parts[1], (parts[2] if len(parts) == 3 else None)
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in name.strip("/"))
    safe += f"-{config}" if config else ""
    hub = out / "hub"
    folder, export, done = hub / safe, hub / f".{safe}.export", hub / f".{safe}.json"
    if not done.is_file():
        import datasets

        log(f"prepare: exporting the hub dataset {name} {config or ''} to parquet in {folder}")
        try:
            builder = datasets.load_dataset_builder(name, config, cache_dir=str(hub / ".cache"))
            builder.download_and_prepare(output_dir=str(export), file_format="parquet")
        except Exception as e:  # offline, unknown name, gated: all end the same way
            raise ConfigError(
                f"{spec}: could not load the Hugging Face dataset {name!r} ({type(e).__name__}: "
                f"{e}); the hub may be unreachable from this machine: download its files and "
                "pass their directory instead"
            ) from e
        train = sorted(export.glob("*-train*.parquet"))
        if not train:
            raise ConfigError(f"{spec}: the dataset has no train split")
        folder.mkdir(parents=True, exist_ok=True)
        for file in train:  # only the train split's rows are the dataset's documents
            os.replace(file, folder / file.name)
        atomic_write_json(done, {"dataset": name, "config": config, "files": len(train)})
    return str(folder)


def _own_bpe(cfg: PrepareConfig, shards: list[Shard], out: Path, log) -> Path:
    """``bpe:VOCAB``: the project's byte-level BPE trained on the train split's documents,
    saved as ``out/tokenizer.json`` (kept while the inputs and split settings are the same)."""
    from mtp_megatron.data.tokenizer import train_tokenizer

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
        "inputs": [_sources_sha256(s.sources) for s in shards],
        "keys": [s.keys for s in shards],
        "text_field": cfg.text_field,
        "validation_fraction": cfg.validation_fraction,
        "split_seed": cfg.split_seed,
    }
    if path.is_file() and _read_json(record) == source:
        return path
    log(f"prepare: training a byte-level BPE of {vocab:,} tokens on the train split")

    def train_texts():
        skipped: Counter = Counter()
        for shard in shards:
            for src, key in zip(shard.sources, shard.keys):
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


def _manifest(cfg: PrepareConfig, tok, dtype, shards: list[Shard]) -> dict:
    totals = {"documents": Counter(), "tokens": Counter(), "skipped": Counter()}
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
    return {**body, "fingerprint": fingerprint(body)}


def fingerprint(manifest: dict) -> str:
    """sha256 of a manifest's content, where files were read from left out (the tokenizer's
    and each shard's ``.idx`` sha256 stand for what they hold)."""
    hashed = dict(manifest)
    hashed.pop("fingerprint", None)
    if "tokenizer" in hashed:
        hashed["tokenizer"] = {k: v for k, v in hashed["tokenizer"].items() if k != "file"}
    hashed["shards"] = [
        {k: v for k, v in s.items() if k not in ("sources", "prefixes")} for s in hashed["shards"]
    ]
    return hashlib.sha256(json.dumps(hashed, sort_keys=True).encode()).hexdigest()


def prefixes(dataset: str | Path, split: str) -> list[tuple[Path, int]]:
    """(prefix, tokens) of every shard of ``split`` in a prepared dataset, in shard order."""
    dataset = Path(dataset)
    path = dataset / MANIFEST
    if not path.is_file():
        raise ConfigError(
            f"{dataset} is no prepared dataset (no {MANIFEST}; an interrupted `prepare` leaves "
            "none: run it again, finished shards are reused)"
        )
    manifest = json.loads(path.read_text())
    return [
        (
            Path(s.get("prefixes", {}).get(split, dataset / split / f"shard_{s['index']:05d}")),
            s["tokens"][split],
        )
        for s in manifest["shards"]
        if s["documents"].get(split)
    ]


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


def main_prepare(argv: list[str]) -> int:
    import argparse

    parser = argparse.ArgumentParser(
        prog="python -m mtp_megatron prepare",
        description="Tokenize files into Megatron indexed datasets (train/ and validation/), or "
        "record existing Megatron prefixes / flat token files as a dataset.",
    )
    parser.add_argument(
        "inputs", nargs="*", help="files, globs or directories to tokenize, or hf:NAME[:CONFIG]"
    )
    parser.add_argument("--output", required=True, help="the dataset directory")
    parser.add_argument("--tokenizer", help="tokenizer.json or its directory, or bpe:VOCAB")
    parser.add_argument("--eod-token", default=None, help="default: eos_token, <|endoftext|>")
    parser.add_argument("--text-field", default="text", help="text column of .jsonl / .parquet")
    parser.add_argument("--workers", type=int, default=1, help="tokenizer processes")
    parser.add_argument("--validation-fraction", type=float, default=0.05)
    parser.add_argument("--split-seed", type=int, default=0)
    parser.add_argument("--shard-mb", type=float, default=64.0, help="input grouped per shard")
    parser.add_argument("--max-files", type=int, default=None, help="only the first N files")
    parser.add_argument("--max-bytes", type=int, default=None, help="only about N bytes")
    imports = parser.add_argument_group("importing token data made elsewhere (not copied)")
    imports.add_argument("--from-megatron", nargs="+", metavar="PREFIX", help=".bin/.idx prefixes")
    imports.add_argument("--from-numpy", nargs="+", metavar="GLOB", help="flat token files")
    imports.add_argument("--dtype", choices=["uint16", "uint32", "int32"], help="--from-numpy ids")
    imports.add_argument("--eod", type=int, help="end-of-document id (--from-numpy: required)")
    imports.add_argument(
        "--validation",
        nargs="+",
        metavar="PREFIX_OR_GLOB",
        default=[],
        help="the validation split's prefixes / files (same kind)",
    )
    args = parser.parse_args(argv)
    if args.from_megatron or args.from_numpy:
        from mtp_megatron.data.importers import import_data

        if args.from_megatron and args.from_numpy:
            raise ConfigError("prepare: --from-megatron and --from-numpy are separate datasets")
        if args.inputs or args.tokenizer:
            raise ConfigError("prepare: an import takes no text inputs or --tokenizer")
        given = {"train": args.from_megatron or args.from_numpy}
        if args.validation:
            given["validation"] = args.validation
        kind = "megatron" if args.from_megatron else "numpy"
        manifest = import_data(args.output, **{kind: given}, dtype=args.dtype, eod=args.eod)
        totals = manifest["totals"]
        print(
            f"prepare: imported {len(manifest['shards'])} {kind} file(s), "
            f"{totals['documents']['train']:,} train / {totals['documents']['validation']:,} "
            f"validation documents, {sum(totals['tokens'].values()):,} tokens, largest id "
            f"{manifest['max_token_id']}; fingerprint {manifest['fingerprint'][:16]}"
        )
        return 0
    if not args.tokenizer:
        raise ConfigError("prepare: --tokenizer is required to tokenize text inputs")
    prepare(
        PrepareConfig(
            inputs=args.inputs,
            tokenizer=args.tokenizer,
            output=args.output,
            eod_token=args.eod_token,
            text_field=args.text_field,
            validation_fraction=args.validation_fraction,
            split_seed=args.split_seed,
            workers=args.workers,
            shard_mb=args.shard_mb,
            max_files=args.max_files,
            max_bytes=args.max_bytes,
        )
    )
    return 0
