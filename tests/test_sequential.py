"""Sequential MTP forward/backward and activation checkpointing give the plain path's losses and
gradients: every head variant at TP=1 and TP=2, and under DeepSpeed (ZeRO-2, grad accumulation 2).
"""

import weakref

import pytest
import torch
from test_training import _overrides, _train

from mtp_megatron import ConfigError, MTPTrainingConfig, build_model
from mtp_megatron.model.recompute import is_checkpointed
from mtp_megatron.testing.distributed import run_distributed
from mtp_megatron.testing.tolerance import VALUE_RTOL, assert_close_to_scale
from mtp_megatron.testing.variants import (
    mtp_config,
    randomize_norm_weights,
    tiny_model_config,
    valid_combinations,
)

VARIANTS = valid_combinations(k=3)
MODES = {
    "sequential": MTPTrainingConfig(sequential_forward=True),
    "checkpointing": MTPTrainingConfig(gradient_checkpointing=True),
    "both": MTPTrainingConfig(sequential_forward=True, gradient_checkpointing=True),
}
UPSTREAM = 0.37  # backward from a scaled loss, as DeepSpeed's 1/grad_accum and loss scale do


def _run(variant, training=None, tie=False):
    """(losses, {name: local grad}) of one forward + backward on a fixed batch."""
    cfg = tiny_model_config(mtp_config(*variant, k=3), tie_embeddings=tie)
    torch.manual_seed(0)  # the same master weights on every rank and in every mode
    model = build_model(cfg, training=training)
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


def _assert_same(ref, got, exact_grads: bool, where: str) -> None:
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


@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: "-".join(map(str, v)))
def test_modes_match_plain_path(single_process, variant):
    ref = _run(variant)
    for mode, training in MODES.items():
        _assert_same(ref, _run(variant, training), mode == "checkpointing", f"{variant} {mode}")


def test_tied_embeddings(single_process):
    variant = ("transformer", True, "chained")
    ref = _run(variant, tie=True)
    for mode, training in MODES.items():
        _assert_same(ref, _run(variant, training, tie=True), mode == "checkpointing", mode)


def _saved_vocab_tensors(training):
    """Logits-sized tensors [b, s, V] still held for backward at the end of the forward."""
    cfg = tiny_model_config(mtp_config("transformer", True, "chained", k=3))
    torch.manual_seed(0)
    model = build_model(cfg, training=training)
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
    model = build_model(cfg, training=training)
    calls = 0
    logits = model.trunk.logits

    def counted(x):
        nonlocal calls
        calls += 1
        return logits(x)

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
    model = build_model(cfg, training=MODES["both"])
    ids = torch.randint(0, cfg.vocab_size, (2, 16))
    with torch.no_grad():  # no backward to prepare: the plain path, with every step's logits
        out = model(ids, return_mtp_logits=True)
    assert len(out.mtp_logits) == 3 and out.loss.grad_fn is None
    # gradient checkpointing: every trunk layer; the sequential schedule recomputes the heads
    assert all(is_checkpointed(layer) for layer in model.trunk.layers)
    assert not any(is_checkpointed(head) for head in model.mtp.heads)
    model.training_config = MTPTrainingConfig(gradient_checkpointing=True)
    assert all(is_checkpointed(head) for head in model.mtp.heads)
    names = [n for n, _ in model.named_parameters()]
    model.training_config = MTPTrainingConfig()
    assert not any(is_checkpointed(m) for m in [*model.trunk.layers, *model.mtp.heads])
    assert [n for n, _ in model.named_parameters()] == names  # the module tree is unchanged
    with pytest.raises(ConfigError, match="train.mtp.sequential_forward"):
        model.training_config = MTPTrainingConfig(sequential_forward="yes")


def _tp_runs(rank: int, world: int):
    from mtp_megatron.parallel import initialize_parallel

    initialize_parallel(tensor_parallel_size=world)
    modes = [(None, None), *MODES.items()]
    return {v: {mode: _run(v, training) for mode, training in modes} for v in VARIANTS}


@pytest.mark.distributed
def test_tensor_parallel_two_processes():
    """TP=2 (megatron's vocab-parallel CE, all-reduced hidden gradients): local shards agree."""
    for rank, runs in enumerate(run_distributed(_tp_runs, 2)):
        for variant, by_mode in runs.items():
            for mode in MODES:
                where = f"TP=2 rank {rank} {variant} {mode}"
                _assert_same(by_mode[None], by_mode[mode], mode == "checkpointing", where)


@pytest.fixture(scope="module")
def data_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("data_cache")


@pytest.mark.distributed
def test_deepspeed_zero2_grad_accum_matches_plain(tmp_path, data_cache):
    """2 processes (DP=2), ZeRO-2, 2 micro-batches per step: the engine's backward and gradient
    accumulation see the plain path's gradients (losses and pre-clip grad norms agree)."""
    extra = {"train.steps": 3, "train.zero_stage": 2, "train.grad_accum": 2}
    plain = run_distributed(_train, 2, _overrides(tmp_path / "plain", data_cache, **extra))[0]
    extra.update({"train.mtp.sequential_forward": True, "train.mtp.gradient_checkpointing": True})
    seq = run_distributed(_train, 2, _overrides(tmp_path / "seq", data_cache, **extra))[0]
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
    return _train(rank, world, overrides)


@pytest.mark.distributed
def test_deepspeed_zero3_partitioned_output_weight_matches_plain(tmp_path, data_cache):
    extra = {"train.steps": 2, "train.zero_stage": 3, "model.tie_embeddings": False}
    runs = {}
    for name, seq in (("plain", False), ("seq", True)):
        more = {**extra, "train.mtp.sequential_forward": seq}
        overrides = _overrides(tmp_path / name, data_cache, **more)
        runs[name] = run_distributed(_train_zero3_partitioned, 2, overrides)[0]
    for step in range(2):
        assert runs["seq"]["losses"][step] == pytest.approx(runs["plain"]["losses"][step], rel=1e-5)
        assert runs["seq"]["grad_norms"][step] == pytest.approx(
            runs["plain"]["grad_norms"][step], rel=1e-5
        )
