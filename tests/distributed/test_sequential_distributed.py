"""The sequential MTP backward and checkpointing equal the plain path at TP=2 and under DeepSpeed
ZeRO-2 (grad accumulation 2) and ZeRO-3 (every parameter partitioned)."""

import pytest

from mtp_megatron.testing.distributed import run_distributed
from mtp_megatron.testing.runs import tiny_run_overrides, train_run
from tests.cases.sequential import MODES, VARIANTS, assert_same_results, forward_backward


def _tp_runs(rank: int, world: int):
    from mtp_megatron.parallel import initialize_parallel

    initialize_parallel(tensor_parallel_size=world)
    modes = [(None, None), *MODES.items()]
    return {v: {mode: forward_backward(v, training) for mode, training in modes} for v in VARIANTS}


@pytest.mark.distributed
def test_tensor_parallel_two_processes():
    """TP=2 (megatron's vocab-parallel CE, all-reduced hidden gradients): local shards agree."""
    for rank, runs in enumerate(run_distributed(_tp_runs, 2)):
        for variant, by_mode in runs.items():
            for mode in MODES:
                where = f"TP=2 rank {rank} {variant} {mode}"
                assert_same_results(by_mode[None], by_mode[mode], mode == "checkpointing", where)


@pytest.mark.distributed
def test_deepspeed_zero2_grad_accum_matches_plain(tmp_path, data_cache):
    """2 processes (DP=2), ZeRO-2, 2 micro-batches per step: the engine's backward and gradient
    accumulation see the plain path's gradients (losses and pre-clip grad norms agree)."""
    extra = {"train.steps": 3, "train.zero_stage": 2, "train.grad_accum": 2}
    plain = run_distributed(
        train_run, 2, tiny_run_overrides(tmp_path / "plain", data_cache, **extra)
    )[0]
    extra.update({"train.mtp.sequential_forward": True, "train.mtp.gradient_checkpointing": True})
    seq = run_distributed(train_run, 2, tiny_run_overrides(tmp_path / "seq", data_cache, **extra))[
        0
    ]
    for step in range(3):
        # identical forward values; fp32 gradient rounding (see above) compounded by Adam steps
        assert seq["losses"][step] == pytest.approx(plain["losses"][step], rel=1e-5)
        assert seq["grad_norms"][step] == pytest.approx(plain["grad_norms"][step], rel=1e-5)


def _train_zero3_partitioned(rank, world, overrides):
    """ZeRO-3 with every parameter partitioned away after its module's forward (persistence
    threshold 0): the sequential loss reaches the output weight through the identity call."""
    from mtp_megatron.train import engine

    original = engine.deepspeed_config

    def config(*args, **kwargs):
        out = original(*args, **kwargs)
        out["zero_optimization"]["stage3_param_persistence_threshold"] = 0
        return out

    engine.deepspeed_config = config
    return train_run(rank, world, overrides)


@pytest.mark.distributed
def test_deepspeed_zero3_partitioned_output_weight_matches_plain(tmp_path, data_cache):
    extra = {"train.steps": 2, "train.zero_stage": 3, "model.tie_embeddings": False}
    runs = {}
    for name, seq in (("plain", False), ("seq", True)):
        more = {**extra, "train.mtp.sequential_forward": seq}
        overrides = tiny_run_overrides(tmp_path / name, data_cache, **more)
        runs[name] = run_distributed(_train_zero3_partitioned, 2, overrides)[0]
    for step in range(2):
        assert runs["seq"]["losses"][step] == pytest.approx(runs["plain"]["losses"][step], rel=1e-5)
        assert runs["seq"]["grad_norms"][step] == pytest.approx(
            runs["plain"]["grad_norms"][step], rel=1e-5
        )
