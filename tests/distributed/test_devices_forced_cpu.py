"""MTP_DEVICE=cpu keeps a run and the training benchmark on the CPU even where CUDA is claimed."""

import pytest
import torch

from mtp_megatron.testing.distributed import run_distributed
from mtp_megatron.testing.runs import tiny_run_overrides


def _train_with_cuda_claimed(rank, world, overrides):
    """A run in a process where torch claims CUDA: MTP_DEVICE=cpu keeps it on gloo / CPU."""
    import torch.distributed as dist

    torch.cuda.is_available = lambda: True
    from mtp_megatron.testing.runs import train_run

    out = train_run(rank, world, overrides)
    out["backend"] = dist.get_backend()
    return out


@pytest.mark.distributed
def test_a_run_stays_on_the_cpu_when_forced_even_if_cuda_is_claimed(tmp_path):
    overrides = tiny_run_overrides(tmp_path / "run", tmp_path / "cache", **{"train.steps": 2})
    out = run_distributed(_train_with_cuda_claimed, 2, overrides)[0]
    assert out["backend"] == "gloo" and sorted(out["losses"]) == [0, 1]


BENCH_SHAPE = dict(
    vocab_size=200, hidden_size=32, num_layers=2, num_attention_heads=4, max_seq_len=16
)


def _bench_with_cuda_claimed(rank, world):
    import torch.distributed as dist

    from mtp_megatron.bench.train_throughput import main_bench_train

    torch.cuda.is_available = lambda: True  # as on a GPU machine; MTP_DEVICE=cpu holds
    backends = []
    init = dist.init_process_group

    def recording_init(*args, **kwargs):
        backends.append(kwargs.get("backend"))
        return init(*args, **kwargs)

    dist.init_process_group = recording_init
    if dist.is_initialized():  # a fresh world, so that the backend choice is made here
        dist.destroy_process_group()
    tiny = [f"model.{k}={v}" for k, v in BENCH_SHAPE.items()] + ["model.mtp=null"]
    argv = [*tiny, "--cases", "ntp", "--rounds", "1", "--steps-per-round", "1", "--warmup", "0"]
    code = main_bench_train([*argv, "--batch", "1", "--seq-len", "8"])
    return code, backends


@pytest.mark.distributed
def test_bench_train_stays_on_the_cpu_when_forced_even_if_cuda_is_claimed():
    code, backends = run_distributed(_bench_with_cuda_claimed, 1)[0]
    assert code == 0 and backends == ["gloo"]  # NCCL would fail on the CPU tensors
