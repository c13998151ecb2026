"""GPTDataset blends over two gloo ranks: rank 0 builds, rank 1 loads the same samples; a cache
directory that is not shared is a clear error on every rank."""

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
