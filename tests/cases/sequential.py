"""The sequential-backward parity runs shared by both tiers: one forward + backward per mode."""

import torch

from mtp_megatron import MTPTrainingConfig, build_model
from mtp_megatron.testing.tolerance import VALUE_RTOL, assert_close_to_scale
from mtp_megatron.testing.variants import (
    mtp_config,
    randomize_norm_weights,
    tiny_model_config,
    valid_combinations,
)
from mtp_megatron.train.apply import apply_mtp_training

VARIANTS = valid_combinations(k=3)


MODES = {
    "sequential": MTPTrainingConfig(sequential_forward=True),
    "checkpointing": MTPTrainingConfig(gradient_checkpointing=True),
    "both": MTPTrainingConfig(sequential_forward=True, gradient_checkpointing=True),
}


UPSTREAM = 0.37  # backward from a scaled loss, as DeepSpeed's 1/grad_accum and loss scale do


def forward_backward(variant, training=None, tie=False):
    """(losses, {name: local grad}) of one forward + backward on a fixed batch."""
    cfg = tiny_model_config(mtp_config(*variant, k=3), tie_embeddings=tie)
    torch.manual_seed(0)  # the same master weights on every rank and in every mode
    model = build_model(cfg)
    apply_mtp_training(model, training or MTPTrainingConfig())
    randomize_norm_weights(model)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, cfg.vocab_size, (2, 16), generator=g)
    labels = torch.cat([ids[:, 1:], torch.full((2, 1), -100)], dim=1)
    labels[0, 3] = -100  # an ignored label inside the sequence
    out = model(ids, labels=labels, step=3)
    (out.loss * UPSTREAM).backward()
    losses = {"loss": out.loss, "main": out.main_loss, "mtp": out.mtp_loss}
    losses.update(out.mtp_step_losses)
    losses = {k: v.detach() for k, v in losses.items()}
    return losses, {n: p.grad.clone() for n, p in model.named_parameters()}


def assert_same_results(ref, got, exact_grads: bool, where: str) -> None:
    ref_losses, ref_grads = ref
    losses, grads = got
    for name, value in ref_losses.items():  # the same numbers, bit for bit
        assert torch.equal(losses[name], value), (where, name, losses[name], value)
    assert grads.keys() == ref_grads.keys()
    for name, g in ref_grads.items():
        if exact_grads:  # recomputation repeats the same fp32 operations
            assert torch.equal(grads[name], g), (where, name)
            continue
        # Sequential: each step's gradient is computed at upstream 1 and scaled after the output
        # layer's matmul instead of before it, and W's per-step gradients are summed in another
        # order: fp32 rounding, ~1e-6 of each tensor's largest entry.
        assert_close_to_scale(grads[name], g, VALUE_RTOL, msg=f"{where} grad {name}")
