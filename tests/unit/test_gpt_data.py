"""Blends read through megatron-core's GPTDataset: exact blend counts, cache hits, no stale or
truncated cache entries."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mtp_megatron.config import ConfigError
from mtp_megatron.data.gpt_data import MARKER, BlendPart, build_gpt_data
from tests.cases.gpt_data import write_prefix


def _build(tmp_path, train, validation=None, samples=4000):
    return build_gpt_data(
        train,
        validation,
        seq_len=32,
        seed=1,
        train_samples=samples,
        validation_samples=50,
        eod_id=0,
        vocab_size=512,
        cache_root=tmp_path / "cache",
    )


def _samples(dataset, n=64) -> torch.Tensor:
    return torch.stack([dataset[i]["tokens"] for i in range(n)])


def test_a_blend_draws_its_weights_exactly_and_a_cache_hit_gives_the_same_samples(
    tmp_path, single_process
):
    a, b = write_prefix(tmp_path / "a", seed=0), write_prefix(tmp_path / "b", seed=1)
    blend = [BlendPart(str(a), 0.7), BlendPart(str(b), 0.3)]
    first = _build(tmp_path, blend, [BlendPart(str(b))])
    assert first.built and (first.cache_dir / MARKER).is_file()
    assert np.bincount(first.train.dataset_index).tolist() == [2800, 1200]
    assert len(first.train) == 4000 and len(first.validation) >= 50
    sample = first.train[0]
    assert sample["tokens"].shape == (32,) and "attention_mask" not in sample
    assert torch.equal(sample["tokens"][1:], sample["labels"][:-1])  # labels: tokens shifted
    again = _build(tmp_path, blend, [BlendPart(str(b))])
    assert not again.built and again.cache_dir == first.cache_dir
    assert torch.equal(_samples(again.train), _samples(first.train))


def test_changed_data_never_hits_a_stale_cache_and_a_truncated_one_is_rebuilt(
    tmp_path, single_process
):
    a = write_prefix(tmp_path / "a", seed=0)
    first = _build(tmp_path, [BlendPart(str(a))])
    reference = _samples(first.train)
    write_prefix(tmp_path / "a", seed=5)  # the same prefix rewritten with other documents
    changed = _build(tmp_path, [BlendPart(str(a))])
    assert changed.built and changed.cache_dir != first.cache_dir
    assert not torch.equal(_samples(changed.train), reference)
    # a killed build: one index file cut short and no marker -> removed and built again
    write_prefix(tmp_path / "a", seed=0)
    index = sorted(first.cache_dir.glob("*document_index.npy"))[0]
    index.write_bytes(index.read_bytes()[: index.stat().st_size // 2])
    (first.cache_dir / MARKER).unlink()
    rebuilt = _build(tmp_path, [BlendPart(str(a))])
    assert rebuilt.built and rebuilt.cache_dir == first.cache_dir
    assert torch.equal(_samples(rebuilt.train), reference)


def test_blend_errors_name_the_problem(tmp_path, single_process):
    with pytest.raises(ConfigError, match="no indexed dataset .*prepare"):
        _build(tmp_path, [BlendPart(str(tmp_path / "missing"))])
    a = write_prefix(tmp_path / "a", seed=0)
    with pytest.raises(ConfigError, match="weight -1"):
        _build(tmp_path, [BlendPart(str(a), -1)])
    with pytest.raises(ConfigError, match="empty"):
        _build(tmp_path, [])


def test_a_bare_prefix_needs_a_validation_blend(tmp_path, single_process):
    from mtp_megatron.config.data import BlendEntry, DataConfig
    from mtp_megatron.data.loader import prepare_training_data

    a = write_prefix(tmp_path / "a", seed=0)
    cfg = DataConfig(train=[BlendEntry(path=str(a))], cache_dir=str(tmp_path / "c"))
    with pytest.raises(ConfigError, match="data.validation is needed"):
        prepare_training_data(cfg, 512, 32, 100, 10, seed=0, log=lambda _: None)
