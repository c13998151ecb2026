"""Importing token data made elsewhere: Megatron prefixes as they are, OLMo / Dolma-style flat
token files without copying them; both then read through megatron-core."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mtp_megatron.config import ConfigError
from mtp_megatron.data.gpt_data import BlendPart, build_gpt_data
from mtp_megatron.data.importers import import_data
from mtp_megatron.data.manifest import prefixes

EOD = 0


def _documents(seed: int, n: int = 40, high: int = 500) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [np.append(rng.integers(1, high, rng.integers(3, 50)), EOD) for _ in range(n)]


def _read(prefix) -> list[list[int]]:
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    data = IndexedDataset(str(prefix), mmap=True)
    return [data[i].tolist() for i in range(len(data))]


@pytest.mark.parametrize("header", [False, True], ids=["raw", "npy"])
def test_flat_uint32_files_are_indexed_in_place(tmp_path, header):
    docs = _documents(0, high=70000)  # ids beyond uint16
    tail = np.array([7, 8, 9], dtype=np.uint32)  # a last document without its end id
    flat = np.concatenate([*docs, tail]).astype(np.uint32)
    file = tmp_path / "part-0.npy"
    if header:
        np.save(file, flat)
    else:
        flat.tofile(file)  # OLMo-core / Dolma: raw ids
    manifest = import_data(tmp_path / "ds", numpy={"train": [str(file)]}, dtype="uint32", eod=EOD)
    [(prefix, tokens)] = prefixes(tmp_path / "ds", "train")
    assert prefix.with_suffix(".bin").resolve() == file  # linked, not copied
    assert tokens == len(flat) and manifest["max_token_id"] == int(flat.max())
    assert _read(prefix) == [d.tolist() for d in docs] + [tail.tolist()]


def test_megatron_prefixes_are_validated_and_recorded(tmp_path, single_process):
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    for name, seed in (("a", 0), ("b", 1)):
        builder = IndexedDatasetBuilder(str(tmp_path / f"{name}.bin"), dtype=np.uint16)
        for doc in _documents(seed, n=120):
            builder.add_item(torch.tensor(doc))
            builder.end_document()
        builder.finalize(str(tmp_path / f"{name}.idx"))
    out = tmp_path / "ds"
    manifest = import_data(
        out, megatron={"train": [str(tmp_path / "a")], "validation": [str(tmp_path / "b")]}
    )
    assert [p for p, _ in prefixes(out, "train")] == [tmp_path / "a"]
    assert [p for p, _ in prefixes(out, "validation")] == [tmp_path / "b"]
    assert manifest["totals"]["documents"] == {"train": 120, "validation": 120}
    # the imported prefix and a flat file train through the same reader
    flat = np.concatenate(_documents(2, n=120)).astype(np.uint32)
    flat.tofile(tmp_path / "olmo.npy")
    import_data(
        tmp_path / "olmo", numpy={"train": [str(tmp_path / "olmo.npy")]}, dtype="uint32", eod=EOD
    )
    parts = [
        BlendPart(str(p)) for p, _ in prefixes(out, "train") + prefixes(tmp_path / "olmo", "train")
    ]
    data = build_gpt_data(
        parts,
        None,
        seq_len=16,
        seed=0,
        train_samples=300,
        validation_samples=0,
        eod_id=EOD,
        vocab_size=512,
        cache_root=tmp_path / "cache",
    )
    assert np.bincount(data.train.dataset_index).tolist() == [150, 150]
    # a data file cut short is refused, naming the sizes
    bin_ = tmp_path / "a.bin"
    bin_.write_bytes(bin_.read_bytes()[:-2])
    with pytest.raises(ConfigError, match="truncated"):
        import_data(tmp_path / "bad", megatron={"train": [str(tmp_path / "a")]})


def test_import_errors_name_the_fix(tmp_path):
    np.arange(5, dtype=np.uint16).tofile(tmp_path / "odd.npy")  # 10 bytes: not uint32
    with pytest.raises(ConfigError, match="wrong --dtype"):
        import_data(
            tmp_path / "x", numpy={"train": [str(tmp_path / "odd.npy")]}, dtype="uint32", eod=0
        )
    with pytest.raises(ConfigError, match="needs --eod"):
        import_data(tmp_path / "x", numpy={"train": [str(tmp_path / "odd.npy")]}, dtype="uint16")
    with pytest.raises(ConfigError, match="matches no file"):
        import_data(
            tmp_path / "x", numpy={"train": [str(tmp_path / "none*.npy")]}, dtype="uint16", eod=0
        )
    with pytest.raises(ConfigError, match="has no"):
        import_data(tmp_path / "x", megatron={"train": [str(tmp_path / "missing")]})
    big = np.array([1, 2**31 + 5, 0], dtype=np.uint32)
    big.tofile(tmp_path / "big.npy")
    with pytest.raises(ConfigError, match="does not fit int32"):
        import_data(
            tmp_path / "x", numpy={"train": [str(tmp_path / "big.npy")]}, dtype="uint32", eod=0
        )


def test_prepare_command_imports(tmp_path, capsys):
    from mtp_megatron.__main__ import main

    np.concatenate(_documents(3)).astype(np.uint16).tofile(tmp_path / "t.npy")
    argv = ["prepare", "--from-numpy", str(tmp_path / "*.npy"), "--dtype", "uint16", "--eod", "0"]
    assert main([*argv, "--output", str(tmp_path / "ds")]) == 0
    assert "imported 1 numpy file(s), 40 train" in capsys.readouterr().out
    assert main([*argv, "--output", "x", "--tokenizer", "t.json"]) == 2
    assert "takes no text inputs" in capsys.readouterr().err
