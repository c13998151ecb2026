"""Data set-up over two gloo ranks: rank 0 builds GPTDataset blends and rank 1 loads the same
samples; a cache directory that is not shared is a clear error on every rank; a source is
prepared by rank 0 alone and its failure reaches rank 1."""

from pathlib import Path

import pytest

from mtp_megatron.testing.distributed import run_distributed


def _build_on_ranks(rank: int, world: int, root: str, per_rank_cache: bool):
    import torch

    from mtp_megatron.config import ConfigError
    from mtp_megatron.data.gpt_data import BlendPart, build_gpt_data
    from mtp_megatron.parallel import initialize_parallel
    from tests.cases.gpt_data import write_prefix

    initialize_parallel(tensor_parallel_size=1)
    prefix = Path(root) / "a"
    if rank == 0:
        write_prefix(prefix, seed=0)
    torch.distributed.barrier()
    cache = Path(root) / (f"cache-{rank}" if per_rank_cache else "cache")
    try:
        data = build_gpt_data(
            [BlendPart(str(prefix))],
            None,
            seq_len=32,
            seed=1,
            train_samples=500,
            validation_samples=0,
            eod_id=0,
            vocab_size=512,
            cache_root=cache,
        )
    except ConfigError as e:
        return {"error": str(e)}
    tokens = torch.stack([data.train[i]["tokens"] for i in range(500)])
    return {"built": data.built, "tokens": tokens}


@pytest.mark.distributed
def test_rank_0_builds_and_rank_1_loads_the_same_samples(tmp_path):
    r0, r1 = run_distributed(_build_on_ranks, 2, str(tmp_path), False)
    assert r0["built"] and not r1["built"]
    assert (r0["tokens"] == r1["tokens"]).all()


@pytest.mark.distributed
def test_a_cache_directory_not_shared_by_every_rank_is_a_clear_error(tmp_path):
    results = run_distributed(_build_on_ranks, 2, str(tmp_path), True)
    for result in results:
        assert "not shared by every rank: rank 1" in result["error"]


def _prepare_source_on_ranks(rank: int, world: int, root: str):
    import torch

    from mtp_megatron.config import ConfigError
    from mtp_megatron.data import DataConfig
    from mtp_megatron.data.sources import prepare_source
    from mtp_megatron.parallel import initialize_parallel

    initialize_parallel(tensor_parallel_size=1)
    logs: list[str] = []
    corpus = Path(root) / "corpus"
    cfg = DataConfig(source=str(corpus), tokenizer="bpe:300", cache_dir=str(Path(root) / "cache"))
    folder = str(prepare_source(cfg, logs.append))
    if rank == 0:  # now there is nothing to read
        for f in corpus.glob("*.txt"):
            f.unlink()
    torch.distributed.barrier()
    try:
        prepare_source(cfg, logs.append)
        error = None
    except ConfigError as e:
        error = str(e)
    return {"folder": folder, "prepared": any("prepare:" in line for line in logs), "error": error}


@pytest.mark.distributed
def test_a_source_is_prepared_by_rank_0_and_its_failure_reaches_every_rank(tmp_path):
    from tests.cases.indexed import TEXTS

    (tmp_path / "corpus").mkdir()
    for i, text in enumerate(TEXTS[:20]):
        (tmp_path / "corpus" / f"f{i}.txt").write_text(text * 5)
    r0, r1 = run_distributed(_prepare_source_on_ranks, 2, str(tmp_path))
    assert r0["folder"] == r1["folder"]
    assert r0["prepared"] and not r1["prepared"]
    assert "no .txt/.py/.md/.jsonl/.parquet files" in r0["error"]
    assert r1["error"].startswith("rank 0 could not prepare data.source=")
    assert "no .txt/.py/.md/.jsonl/.parquet files" in r1["error"]
