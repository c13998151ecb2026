"""Start-up time and memory of the indexed-data path at growing corpus sizes.

    python -m mtp_megatron bench-data [--sizes 10M 100M 1B] [--dir DIR] [--samples N]

For each size, a synthetic indexed dataset (random uint16 documents of 1-2,000 tokens, written
directly, not tokenized) is built once; then a fresh process resolves it as a recipe's
``data.train`` and builds the blended GPTDataset (cold: no cache entry; warm: the entry exists),
reads one micro-batch, and reports its wall time, the RSS it added (after imports and the
process group) and the process's peak RSS (imports of torch and megatron included).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from mtp_megatron.config import ConfigError

_SUFFIX = {"K": 10**3, "M": 10**6, "B": 10**9}


def parse_size(text: str) -> int:
    """'10M' -> 10_000_000 (K, M, B suffixes)."""
    try:
        scale = _SUFFIX.get(text[-1].upper(), 1)
        return int(float(text[:-1] if text[-1].upper() in _SUFFIX else text) * scale)
    except (ValueError, IndexError):
        raise ConfigError(f"size {text!r} is invalid: a number with K, M or B, e.g. 100M") from None


def write_synthetic(prefix: Path, tokens: int, seed: int = 0) -> None:
    """Random documents totalling ``tokens`` ids (below 32,000), each ending with id 0."""
    from mtp_megatron.data.importers import import_data

    rng = np.random.default_rng(seed)
    flat = Path(f"{prefix}.tokens")
    with open(flat, "wb") as f:
        left = tokens
        while left > 0:
            n = min(left, 1 << 24)
            block = rng.integers(1, 32000, n, dtype=np.uint16)
            block[rng.random(n) < 1 / 1000] = 0  # documents of ~1,000 tokens on average
            f.write(block.tobytes())
            left -= n
    import_data(
        prefix, numpy={"train": [str(flat)], "validation": [str(flat)]}, dtype="uint16", eod=0
    )


_CHILD = """
import json, resource, sys, time
from pathlib import Path

def rss_mib():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024

import mtp_megatron.data.loader as L
from mtp_megatron.config.data import BlendEntry, DataConfig
from mtp_megatron.parallel import initialize_parallel
initialize_parallel(tensor_parallel_size=1)
base = rss_mib()
dataset, cache, samples, tok = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
cfg = DataConfig(train=[BlendEntry(path=dataset)], cache_dir=cache, tokenizer=tok)
t = time.perf_counter()
data = L.prepare_training_data(cfg, 32768, 1024, samples, 64, seed=0, log=lambda _: None)
batches = L.Batches(data, 1024, 8, 0, 1)
batches.batch(0, 0, 1)
wall = time.perf_counter() - t
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(json.dumps({"wall_s": wall, "rss_mib": rss_mib() - base, "peak_mib": peak}))
"""


def _measure(dataset: Path, cache: Path, samples: int, tokenizer: Path) -> dict:
    out = subprocess.run(
        [sys.executable, "-c", _CHILD, str(dataset), str(cache), str(samples), str(tokenizer)],
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def _tokenizer(folder: Path) -> Path:
    """A throwaway tokenizer.json (the trainer records one; the ids here are synthetic)."""
    from tokenizers import Tokenizer, models

    path = folder / "tokenizer.json"
    Tokenizer(models.WordLevel({"<|endoftext|>": 0, "[UNK]": 1}, unk_token="[UNK]")).save(str(path))
    return path


def main_bench_data(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m mtp_megatron bench-data", description=__doc__)
    parser.add_argument("--sizes", nargs="+", default=["10M", "100M", "1B"])
    parser.add_argument("--dir", default=None, help="where the datasets go (default: a temp dir)")
    parser.add_argument("--samples", type=int, default=64_000, help="training samples drawn")
    args = parser.parse_args(argv)
    sizes = [parse_size(s) for s in args.sizes]
    root = Path(args.dir or tempfile.mkdtemp(prefix="bench-data-"))
    root.mkdir(parents=True, exist_ok=True)
    tokenizer = _tokenizer(root)
    rows = []
    for text, size in zip(args.sizes, sizes):
        dataset = root / f"synthetic-{text}"
        if not (dataset / "manifest.json").is_file():
            t = time.perf_counter()
            write_synthetic(dataset, size)
            print(f"# wrote {text} tokens in {time.perf_counter() - t:.1f} s", flush=True)
        cache = root / f"cache-{text}"
        shutil.rmtree(cache, ignore_errors=True)
        cold = _measure(dataset, cache, args.samples, tokenizer)
        warm = _measure(dataset, cache, args.samples, tokenizer)
        rows.append((text, cold, warm))
    print(f"\nstart-up of the indexed-data path, {args.samples:,} training samples of 1,024 tokens")
    print(
        "| corpus | cold start (builds indices) | warm start (cached) | RSS added cold / warm "
        "| process peak RSS cold / warm |"
    )
    print("|---|---|---|---|---|")
    for text, cold, warm in rows:
        print(
            f"| {text} tokens | {cold['wall_s']:.2f} s | {warm['wall_s']:.2f} s | "
            f"{cold['rss_mib']:.0f} / {warm['rss_mib']:.0f} MiB | "
            f"{cold['peak_mib']:.0f} / {warm['peak_mib']:.0f} MiB |"
        )
    return 0
