"""Small synthetic indexed datasets for the GPTDataset tests of both tiers."""

from pathlib import Path

import numpy as np

from mtp_megatron.data.indexed import IndexedWriter


def write_prefix(prefix: Path, seed: int, documents: int = 200) -> Path:
    """``documents`` random documents (5-80 ids below 500, then the end token 0)."""
    rng = np.random.default_rng(seed)
    with IndexedWriter(prefix, np.uint16) as writer:
        for _ in range(documents):
            writer.add_document(np.append(rng.integers(1, 500, rng.integers(5, 80)), 0))
        writer.finish()
    return prefix
