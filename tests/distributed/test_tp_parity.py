"""TP=2 and TP=4 (gloo, 2 and 4 processes) give the TP=1 loss and gradients for every variant."""

import pytest
import torch

from mtp_megatron.testing.distributed import gather_full_tensor, run_distributed
from mtp_megatron.testing.tolerance import VALUE_RTOL, assert_close_to_scale
from mtp_megatron.testing.variants import (
    mtp_config,
    randomize_norm_weights,
    tiny_model_config,
    valid_combinations,
)

pytestmark = pytest.mark.distributed

VARIANTS = valid_combinations(k=3)


def _losses_and_grads(rank: int, world: int, tp: int, tie: bool):
    from mtp_megatron import build_model
    from mtp_megatron.parallel import initialize_parallel, tensor_parallel_group

    initialize_parallel(tensor_parallel_size=tp)
    group = tensor_parallel_group()
    results = {}
    for variant in VARIANTS:
        cfg = tiny_model_config(mtp_config(*variant, k=3), tie_embeddings=tie)
        torch.manual_seed(0)  # every rank builds the same master weights, then keeps its slice
        model = build_model(cfg)
        randomize_norm_weights(model)
        g = torch.Generator().manual_seed(1)
        ids = torch.randint(0, cfg.vocab_size, (2, 16), generator=g)
        out = model(ids)
        out.loss.backward()
        results[variant] = {
            "loss": out.loss.detach(),
            "steps": {k: v for k, v in out.mtp_step_losses.items()},
            "grads": {n: gather_full_tensor(p.grad, p, group) for n, p in model.named_parameters()},
        }
    return results


@pytest.fixture(scope="module", params=[False, True], ids=["untied", "tied"])
def tp1(request):
    return request.param, run_distributed(_losses_and_grads, 1, 1, request.param)[0]


@pytest.mark.parametrize("tp", [2, 4])
def test_tensor_parallel_matches_tp1(tp1, tp):
    tie, reference = tp1
    ranks = run_distributed(_losses_and_grads, tp, tp, tie)
    for variant in VARIANTS:
        ref = reference[variant]
        for rank, result in enumerate(ranks):
            got = result[variant]
            # TP changes only the order of fp32 reductions (row-parallel partial sums, the
            # vocab-parallel softmax's split sum-exp): agreement to rounding, not bitwise.
            # (tolerances relative to each tensor's scale: testing/tolerance.py says why)
            assert_close_to_scale(got["loss"], ref["loss"], VALUE_RTOL)
            for k, v in ref["steps"].items():
                assert_close_to_scale(got["steps"][k], v, VALUE_RTOL)
            assert got["grads"].keys() == ref["grads"].keys()
            for name, g in ref["grads"].items():
                assert_close_to_scale(got["grads"][name], g, msg=f"{variant} rank {rank} {name}")


def _full_width_qk_norm_grads(rank: int, world: int, tp: int):
    """OLMo-2's QK-norm over the whole q / k projection: each rank holds a slice of it."""
    from mtp_megatron import build_model
    from mtp_megatron.parallel import initialize_parallel, tensor_parallel_group

    initialize_parallel(tensor_parallel_size=tp)
    cfg = tiny_model_config(mtp_config("transformer", False, "chained", k=2))
    cfg.qk_norm_scope = "full"
    torch.manual_seed(0)
    model = build_model(cfg)
    from mtp_megatron.parallel.sharding import partition_of, shard

    with torch.no_grad():  # random norm weights, the sharded q / k ones a slice of one master
        g = torch.Generator().manual_seed(2)
        for name, p in model.named_parameters():
            if "norm" in name:
                part = partition_of(p)
                full = p.shape[0] * (tp if part is not None else 1)
                master = torch.empty(full).uniform_(0.5, 1.5, generator=g)
                p.copy_(shard(master, part, rank % tp, tp))
    ids = torch.randint(0, cfg.vocab_size, (2, 16), generator=torch.Generator().manual_seed(1))
    out = model(ids)
    out.loss.backward()
    group = tensor_parallel_group()
    grads = {n: gather_full_tensor(p.grad, p, group) for n, p in model.named_parameters()}
    return {"loss": out.loss.detach(), "grads": grads}


def test_full_width_qk_norm_at_tp2_matches_tp1():
    (reference,) = run_distributed(_full_width_qk_norm_grads, 1, 1)
    for got in run_distributed(_full_width_qk_norm_grads, 2, 2):
        # the sum of squares is all-reduced in forward and backward: rounding-level agreement
        assert_close_to_scale(got["loss"], reference["loss"], VALUE_RTOL)
        assert got["grads"].keys() == reference["grads"].keys()
        for name, g in reference["grads"].items():
            assert_close_to_scale(got["grads"][name], g, msg=name)
        norm = "trunk.layers.0.attention.inner.q_norm.weight"
        assert reference["grads"][norm].shape == (64,)  # [n d]: the whole projection


def _distilled_grads(rank: int, world: int, tp: int):
    """Heads trained towards the main head (train.mtp.distill_weight): the soft CE's softmax
    over a vocabulary split across the TP ranks."""
    from mtp_megatron import build_model
    from mtp_megatron.config import MTPTrainingConfig
    from mtp_megatron.parallel import initialize_parallel, tensor_parallel_group
    from mtp_megatron.train.apply import apply_mtp_training

    initialize_parallel(tensor_parallel_size=tp)
    cfg = tiny_model_config(mtp_config("transformer", False, "chained", k=2))
    torch.manual_seed(0)
    model = build_model(cfg)
    apply_mtp_training(model, MTPTrainingConfig(distill_weight=0.5))
    randomize_norm_weights(model)
    ids = torch.randint(0, cfg.vocab_size, (2, 16), generator=torch.Generator().manual_seed(1))
    out = model(ids, return_logits=False)
    out.loss.backward()
    group = tensor_parallel_group()
    grads = {n: gather_full_tensor(p.grad, p, group) for n, p in model.named_parameters()}
    return {"loss": out.loss.detach(), "mtp": out.mtp_loss.detach(), "grads": grads}


def test_self_distillation_at_tp2_matches_tp1():
    (reference,) = run_distributed(_distilled_grads, 1, 1)
    for got in run_distributed(_distilled_grads, 2, 2):
        # all-reduced maxima and sums: rounding-level agreement, as for the hard CE
        assert_close_to_scale(got["loss"], reference["loss"], VALUE_RTOL)
        assert_close_to_scale(got["mtp"], reference["mtp"], VALUE_RTOL)
        for name, g in reference["grads"].items():
            assert_close_to_scale(got["grads"][name], g, msg=name)
