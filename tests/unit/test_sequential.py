"""Sequential MTP forward/backward and activation checkpointing give the plain path's losses and
gradients, for every head variant in one process (TP=2 and DeepSpeed: tests/distributed)."""

import weakref

import pytest
import torch

from mtp_megatron import ConfigError, MTPTrainingConfig, build_model
from mtp_megatron.model.recompute import is_checkpointed
from mtp_megatron.testing.variants import (
    mtp_config,
    tiny_model_config,
)
from mtp_megatron.train.apply import apply_mtp_training
from tests.cases.sequential import MODES, VARIANTS, assert_same_results, forward_backward


@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: "-".join(map(str, v)))
def test_modes_match_plain_path(single_process, variant):
    ref = forward_backward(variant)
    for mode, training in MODES.items():
        assert_same_results(
            ref, forward_backward(variant, training), mode == "checkpointing", f"{variant} {mode}"
        )


def test_tied_embeddings(single_process):
    variant = ("transformer", True, "chained")
    ref = forward_backward(variant, tie=True)
    for mode, training in MODES.items():
        assert_same_results(
            ref, forward_backward(variant, training, tie=True), mode == "checkpointing", mode
        )


def _saved_vocab_tensors(training):
    """Logits-sized tensors [b, s, V] still held for backward at the end of the forward."""
    cfg = tiny_model_config(mtp_config("transformer", True, "chained", k=3))
    torch.manual_seed(0)
    model = build_model(cfg)
    apply_mtp_training(model, training or MTPTrainingConfig())
    ids = torch.randint(0, cfg.vocab_size, (2, 16))
    saved: list[weakref.ref] = []

    def pack(t):
        if t.shape == (*ids.shape, cfg.padded_vocab_size):
            saved.append(weakref.ref(t))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(ids)
    alive = sum(ref() is not None for ref in saved)
    out.loss.backward()
    return alive


def test_sequential_keeps_one_step_of_logits(single_process):
    # plain: the main head's and each of the K = 3 steps' softmax; sequential: the main head's
    assert _saved_vocab_tensors(None) == 4
    assert _saved_vocab_tensors(MODES["sequential"]) == 1


def _output_layer_calls(training, tie: bool) -> int:
    """Calls of the output layer (trunk.logits) in one forward + backward."""
    cfg = tiny_model_config(mtp_config("transformer", True, "chained", k=3), tie_embeddings=tie)
    torch.manual_seed(0)
    model = build_model(cfg)
    apply_mtp_training(model, training or MTPTrainingConfig())
    calls = 0
    logits = model.trunk.logits

    def counted(x, **kwargs):
        nonlocal calls
        calls += 1
        return logits(x, **kwargs)

    model.trunk.logits = counted
    out = model(torch.randint(0, cfg.vocab_size, (2, 16)))
    out.loss.backward()
    return calls


@pytest.mark.parametrize("tie", [False, True])
def test_sequential_adds_no_output_layer_call(single_process, tie):
    # main head + K = 3 steps in both; W's summed gradient is attached to W directly (the extra
    # identity call is only for a ZeRO-3 partitioned W, tested under DeepSpeed below)
    assert _output_layer_calls(None, tie) == 4
    assert _output_layer_calls(MODES["sequential"], tie) == 4


def test_evaluation_and_config(single_process):
    variant = ("mlp", False, "chained")
    cfg = tiny_model_config(mtp_config(*variant, k=3))
    torch.manual_seed(0)
    model = build_model(cfg)
    apply_mtp_training(model, MODES["both"])
    ids = torch.randint(0, cfg.vocab_size, (2, 16))
    with torch.no_grad():  # no backward to prepare: the plain path, with every step's logits
        out = model(ids, return_mtp_logits=True)
    assert len(out.mtp_logits) == 3 and out.loss.grad_fn is None
    # gradient checkpointing: every trunk layer; the sequential schedule recomputes the heads
    assert all(is_checkpointed(layer) for layer in model.trunk.layers)
    assert not any(is_checkpointed(head) for head in model.mtp.heads)
    apply_mtp_training(model, MTPTrainingConfig(gradient_checkpointing=True))
    assert all(is_checkpointed(head) for head in model.mtp.heads)
    names = [n for n, _ in model.named_parameters()]
    apply_mtp_training(model, MTPTrainingConfig())
    assert not any(is_checkpointed(m) for m in [*model.trunk.layers, *model.mtp.heads])
    assert [n for n, _ in model.named_parameters()] == names  # the module tree is unchanged
    with pytest.raises(ConfigError, match="train.mtp.sequential_forward"):
        apply_mtp_training(model, MTPTrainingConfig(sequential_forward="yes"))
