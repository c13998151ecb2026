"""On a CUDA device: the same numbers as on the CPU (fp32; bf16 within a stated bound), the
memory-saving paths equal to the plain one, decoding greedy-equal and sync-lean, a short bf16
ZeRO-1 training run, and a run too big for the GPU refused. Marked ``gpu``: skipped where torch
sees no CUDA device."""

import pytest
import torch

from mtp_megatron import MTPTrainingConfig, build_model
from mtp_megatron.testing.distributed import run_distributed
from mtp_megatron.testing.runs import tiny_run_overrides
from mtp_megatron.testing.tolerance import GRAD_RTOL, VALUE_RTOL, assert_close_to_scale
from mtp_megatron.testing.variants import mtp_config, randomize_norm_weights, tiny_model_config
from mtp_megatron.train.apply import apply_mtp_training

pytestmark = pytest.mark.gpu
CUDA = torch.device("cuda", 0)


def _loss_and_grads(device, dtype=torch.float32, training=None):
    cfg = tiny_model_config(mtp_config("transformer", True, "chained", k=3))
    torch.manual_seed(0)
    model = build_model(cfg)
    apply_mtp_training(model, training or MTPTrainingConfig())
    randomize_norm_weights(model)
    model = model.to(device, dtype)
    ids = torch.randint(0, cfg.vocab_size, (2, 16), generator=torch.Generator().manual_seed(1))
    out = model(ids.to(device))
    out.loss.backward()
    grads = {n: p.grad.float().cpu() for n, p in model.named_parameters()}
    return out.loss.float().cpu(), grads


def test_fp32_cuda_matches_cpu_and_bf16_stays_close(single_process):
    loss_cpu, grads_cpu = _loss_and_grads(torch.device("cpu"))
    loss_gpu, grads_gpu = _loss_and_grads(CUDA)
    # fp32 on both (TF32 is off for matmuls by default): other kernels, rounding only
    assert_close_to_scale(loss_gpu, loss_cpu, VALUE_RTOL)
    for name, g in grads_cpu.items():
        assert_close_to_scale(grads_gpu[name], g, GRAD_RTOL, msg=name)
    # bf16 keeps 8 bits of mantissa: the loss within 2%, each gradient pointing the same way
    loss_bf16, grads_bf16 = _loss_and_grads(CUDA, torch.bfloat16)
    assert abs(loss_bf16 - loss_cpu) <= 0.02 * abs(loss_cpu)
    for name, g in grads_cpu.items():
        cos = torch.nn.functional.cosine_similarity(grads_bf16[name].flatten(), g.flatten(), 0)
        assert cos > 0.98 or g.abs().max() < 1e-6, (name, float(cos))


@pytest.mark.parametrize(
    "training",
    [
        MTPTrainingConfig(sequential_forward=True),
        MTPTrainingConfig(gradient_checkpointing=True),
        MTPTrainingConfig(sequential_forward=True, gradient_checkpointing=True),
    ],
    ids=["sequential", "checkpointing", "both"],
)
def test_memory_saving_paths_equal_plain_on_cuda(single_process, training):
    loss, grads = _loss_and_grads(CUDA)
    got_loss, got_grads = _loss_and_grads(CUDA, training=training)
    assert_close_to_scale(got_loss, loss, VALUE_RTOL)
    for name, g in grads.items():
        assert_close_to_scale(got_grads[name], g, VALUE_RTOL, msg=name)


def test_decoding_on_cuda_is_greedy_equal_and_reads_the_host_rarely(single_process):
    from mtp_megatron.decoding import generate_plain
    from mtp_megatron.decoding.host import HostReads

    cfg = tiny_model_config(mtp_config("transformer", True, "chained", k=3), max_seq_len=96)
    torch.manual_seed(0)
    model = build_model(cfg).to(CUDA).eval()
    ids = torch.randint(0, cfg.vocab_size, (1, 8))  # on the CPU: moved to the model's device
    before = HostReads.count
    plain, _ = generate_plain(model, ids, 64)
    assert HostReads.count - before <= 2 * 64
    spec, stats = model.mtp_decoder.generate(ids, max_new_tokens=64)
    assert torch.equal(spec, plain)
    sampled, _ = model.mtp_decoder.generate(
        ids, max_new_tokens=16, temperature=0.8, generator=torch.Generator().manual_seed(0)
    )
    assert sampled.device == CUDA and sampled.shape == (1, 24)


def _train_on_cuda(rank, world, overrides):
    import os

    os.environ["MTP_DEVICE"] = "cuda"
    from mtp_megatron.testing.runs import train_run

    return train_run(rank, world, overrides)


@pytest.mark.distributed  # spawns its training process (run_distributed refuses unmarked tests)
def test_bf16_zero1_training_on_one_gpu(tmp_path):
    extra = {"train.steps": 20, "train.zero_stage": 1, "train.precision": "bf16"}
    out = run_distributed(
        _train_on_cuda, 1, tiny_run_overrides(tmp_path / "run", tmp_path / "c", **extra)
    )
    losses = out[0]["losses"]
    assert all(torch.isfinite(torch.tensor(v)) for v in losses.values())
    assert losses[19] < losses[0] - 0.5, losses


def _refused_on_cuda(rank: int, world: int, overrides: list[str]):
    try:
        _train_on_cuda(rank, world, overrides)
    except Exception as e:  # noqa: BLE001 - the refusal's text is the result
        return f"{type(e).__name__}: {e}"
    return None


@pytest.mark.distributed
def test_a_run_too_big_for_the_gpu_is_refused_before_the_model_is_built(tmp_path):
    """The memory plan at start-up: a micro-batch of 8192 x 64 tokens does not fit any GPU."""
    extra = {"train.micro_batch_size": 8192, "train.steps": 2}
    overrides = tiny_run_overrides(tmp_path / "run", tmp_path / "c", **extra)
    error = run_distributed(_refused_on_cuda, 1, overrides)[0]
    assert error and error.startswith("ConfigError") and "needs about" in error, error
    assert "set train." in error or "no change of ZeRO stage" in error
    assert not list((tmp_path / "run").glob("checkpoints/step_*"))  # nothing trained
