"""What the MTP loss trains (``train.mtp.trunk``): a frozen trunk stays bitwise unchanged and
has no optimizer state; detached heads leave the trunk exactly the next-token gradient."""

from __future__ import annotations

import pytest
import torch

from mtp_megatron import build_model
from mtp_megatron.config import ConfigError, MTPTrainingConfig
from mtp_megatron.config.train import TrainConfig
from mtp_megatron.parallel.dims import ParallelConfig
from mtp_megatron.testing.variants import mtp_config, randomize_norm_weights, tiny_model_config
from mtp_megatron.train.apply import apply_mtp_training


class _RandomBatches:
    """Fixed random (input_ids, labels) per (step, micro-step)."""

    def __init__(self, vocab: int, b: int = 2, s: int = 16):
        self.vocab, self.b, self.s = vocab, b, s

    def batch(self, step: int, micro: int, grad_accum: int):
        g = torch.Generator().manual_seed(step * 100 + micro)
        ids = torch.randint(0, self.vocab, (self.b, self.s + 1), generator=g)
        return ids[:, :-1].contiguous(), ids[:, 1:].contiguous()


def _model(tie: bool = False, **mtp):
    cfg = tiny_model_config(mtp_config("transformer", False, "chained", k=2), tie_embeddings=tie)
    for name, value in mtp.items():
        setattr(cfg.mtp, name, value)
    torch.manual_seed(0)
    model = build_model(cfg)  # megatron layers, as training builds them
    randomize_norm_weights(model)
    return model


@pytest.mark.parametrize("zero_stage", [0, 1])
def test_a_frozen_trunk_stays_bitwise_and_has_no_optimizer_state(single_process, zero_stage):
    from mtp_megatron.train.apply import apply_training

    model = _model()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    tcfg = TrainConfig(
        steps=3,
        lr=1e-2,
        lr_warmup_steps=0,
        micro_batch_size=2,
        zero_stage=zero_stage,
        precision="fp32",
        mtp=MTPTrainingConfig(trunk="freeze_trunk"),
    )
    setup = apply_training(model, tcfg, ParallelConfig(), torch.device("cpu"))
    batches = _RandomBatches(model.cfg.vocab_size)
    for step in range(3):
        setup.runner.train_step(batches, step, grad_accum=1)
    trainable = 0
    for name, p in model.named_parameters():
        if name.startswith("trunk."):
            assert not p.requires_grad and torch.equal(p, before[name]), name
        else:
            trainable += p.numel()
            assert p.requires_grad, name
    assert any(not torch.equal(p, before[n]) for n, p in model.mtp.named_parameters(prefix="mtp"))
    # the optimizer holds the heads' parameters only (ZeRO-1 keeps them flat, perhaps padded)
    opt = setup.engine.optimizer
    held = sum(p.numel() for g in opt.param_groups for p in g["params"])
    assert trainable <= held < trainable + 1024
    trunk = sum(p.numel() for p in model.trunk.parameters())
    assert trunk > 1024  # so that a trunk in the optimizer could not pass the bound above


@pytest.mark.parametrize("sequential", [False, True], ids=["plain", "sequential"])
@pytest.mark.parametrize("tie", [False, True], ids=["untied", "tied"])
def test_detached_heads_leave_the_trunk_its_next_token_gradient(single_process, tie, sequential):
    detached, ntp = _model(tie), _model(tie)
    apply_mtp_training(
        detached, MTPTrainingConfig(trunk="detach_heads", sequential_forward=sequential)
    )
    ids, labels = _RandomBatches(detached.cfg.vocab_size).batch(0, 0, 1)
    out = detached(ids, labels=labels, step=0, return_logits=False)
    out.loss.backward()  # main + w * MTP
    ntp(ids, labels=labels, step=0).main_loss.backward()  # the next-token loss alone
    assert out.mtp_loss.item() > 0
    for (name, p), q in zip(detached.trunk.named_parameters(), ntp.trunk.parameters()):
        # the same graph for the trunk: equal up to summation order of shared tensors
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-6, atol=1e-7, msg=name)
    heads = [p.grad for p in detached.mtp.parameters()]
    assert all(g is not None for g in heads) and any(g.abs().sum() > 0 for g in heads)


def test_trunk_modes_that_would_train_nothing_are_refused():
    from mtp_megatron.recipe import load_recipe
    from mtp_megatron.testing.runs import DEMO_RECIPE

    with pytest.raises(ConfigError, match="must be one of"):
        load_recipe(DEMO_RECIPE, ["train.mtp.trunk=frozen"])
    with pytest.raises(ConfigError, match="parameter-free shared_lm_head"):
        load_recipe(
            DEMO_RECIPE, ["train.mtp.trunk=detach_heads", "model.mtp.mtp_head_type=shared_lm_head"]
        )
    with pytest.raises(ConfigError, match="needs MTP heads"):
        load_recipe(DEMO_RECIPE, ["train.mtp.trunk=freeze_trunk", "model.mtp=null"])
    pp2 = ["parallel.pipeline_parallel_size=2"]
    with pytest.raises(ConfigError, match="only the first stage"):
        load_recipe(DEMO_RECIPE, ["train.mtp.trunk=detach_heads", *pp2])
    with pytest.raises(ConfigError, match="untested"):
        load_recipe(DEMO_RECIPE, ["train.mtp.trunk=freeze_trunk", *pp2])
    with pytest.raises(ConfigError, match="outside ZeRO-3's gather"):
        load_recipe(DEMO_RECIPE, ["train.mtp.trunk=detach_heads", "train.zero_stage=3"])
    etd = "{n_encoder_layers: 4, n_think_layers: 4, n_decoder_layers: 4}"
    with pytest.raises(ConfigError, match="LoRA experts and routers"):
        load_recipe(DEMO_RECIPE, ["train.mtp.trunk=freeze_trunk", f"model.etd={etd}"])


# ---------------------------------------------------------------------------------------------
# train.mtp.distill_weight: heads trained towards the main head's own distribution


@pytest.mark.parametrize("chunk", [1 << 24, 11 * 2], ids=["one pass", "chunked"])
def test_distilled_cross_entropy_is_torch_cross_entropy_with_hard_and_soft_targets(
    monkeypatch, chunk
):
    """Both terms and their gradients against torch's own cross_entropy (class targets, then
    the teacher's softmax as probability targets), with the teacher expanded at once or two
    positions at a time."""
    import torch.nn.functional as F

    from mtp_megatron.model import loss
    from mtp_megatron.model.loss import IGNORE_INDEX, distilled_cross_entropy, log_normalizer

    monkeypatch.setattr(loss, "CHUNK_ELEMENTS", chunk)
    g = torch.Generator().manual_seed(0)
    student = torch.randn(2, 5, 11, generator=g, requires_grad=True)
    teacher = torch.randn(2, 5, 11, generator=g, requires_grad=True)
    targets = torch.randint(0, 11, (2, 5), generator=g)
    targets[0, 3:], targets[1, 4] = IGNORE_INDEX, IGNORE_INDEX
    mask = (targets != IGNORE_INDEX).float()
    lse = log_normalizer(teacher * 3)
    data, soft = distilled_cross_entropy(student * 3, teacher * 3, lse, targets)
    p = (teacher.detach() * 3).softmax(-1)
    each = F.cross_entropy((student * 3).transpose(1, 2), p.transpose(1, 2), reduction="none")
    soft_ref = (each * mask).sum() / mask.sum()
    data_ref = F.cross_entropy((student * 3).transpose(1, 2), targets, ignore_index=IGNORE_INDEX)
    torch.testing.assert_close(soft, soft_ref, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(data, data_ref, rtol=1e-6, atol=1e-6)
    mixed, mixed_ref = 0.3 * data + 0.7 * soft, 0.3 * data_ref + 0.7 * soft_ref
    (grad,) = torch.autograd.grad(mixed, student, retain_graph=True)
    torch.testing.assert_close(grad, torch.autograd.grad(mixed_ref, student)[0])
    mixed.backward()
    assert teacher.grad is None  # the teacher is a target, not trained


def test_distillation_pulls_the_heads_towards_the_main_head(single_process):
    """beta = 1: each head's training loss is its CE against the main head's distribution for
    the same token; the logged step losses stay the data CE, and the trunk gets no gradient
    through the teacher."""
    import torch.nn.functional as F

    from mtp_megatron.model.loss import IGNORE_INDEX, step_targets

    plain, distilled = _model(), _model()
    apply_mtp_training(distilled, MTPTrainingConfig(distill_weight=1.0))
    ids, labels = _RandomBatches(plain.cfg.vocab_size).batch(0, 0, 1)
    ref = plain(ids, labels=labels, step=0, return_mtp_logits=True)
    out = distilled(ids, labels=labels, step=0, return_logits=False)
    assert out.mtp_step_losses.keys() == ref.mtp_step_losses.keys()
    for name, value in out.mtp_step_losses.items():
        torch.testing.assert_close(value, ref.mtp_step_losses[name])  # the data CE, logged
    expected = torch.zeros(())
    for k, logits_k in enumerate(ref.mtp_logits, start=1):
        valid = step_targets(labels, k)[:, :-k] != IGNORE_INDEX
        p = ref.logits[:, k:].softmax(-1)  # torch's probability-target CE is the reference
        soft = F.cross_entropy(logits_k[:, :-k][valid].detach(), p[valid].detach())
        expected = expected + distilled.objective.step_weights()[k - 1] * soft
    torch.testing.assert_close(out.mtp_loss, expected, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(out.mtp_loss, ref.mtp_loss)
    out.loss.backward()
    assert all(p.grad is not None for p in distilled.mtp.parameters())


def test_distillation_with_the_sequential_schedule_is_refused():
    with pytest.raises(ConfigError, match="not supported with sequential_forward"):
        MTPTrainingConfig(distill_weight=0.5, sequential_forward=True).validate()
    with pytest.raises(ConfigError, match=r"must be a number in \[0, 1\]"):
        MTPTrainingConfig(distill_weight=1.5).validate()
