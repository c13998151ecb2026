"""The MTP objective alone (``model/objective.py``), against hand-computed values: the step weights,
the weight schedule, the curriculum's renormalised weights, the whole loss against torch's own
cross-entropy, self-distillation against torch's probability-target cross-entropy, detached heads,
a frozen trunk, and the one layout of logged metrics."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mtp_megatron import MTPConfig, build_model
from mtp_megatron.config import MTPTrainingConfig
from mtp_megatron.model.loss import IGNORE_INDEX, labels_from_input_ids
from mtp_megatron.model.objective import MTPObjective, MTPOutput, StepMetrics, step_weights
from mtp_megatron.testing.variants import mtp_config, randomize_norm_weights, tiny_model_config
from mtp_megatron.train.apply import apply_mtp_training

# -- weights and schedules ---------------------------------------------------------------------


def test_step_weights_worked_example():
    alphas = MTPObjective(MTPConfig(num_predict_tokens=4, loss_weight_decay=0.5)).step_weights()
    assert [round(a, 3) for a in alphas] == [0.533, 0.267, 0.133, 0.067]
    assert sum(alphas) == pytest.approx(1.0)
    uniform = MTPObjective(MTPConfig(num_predict_tokens=3, loss_weight_decay=1.0)).step_weights()
    assert uniform == pytest.approx([1 / 3] * 3)


def test_mtp_weight_warmup_is_linear():
    w = MTPObjective(MTPConfig(mtp_loss_weight=0.5, warmup_steps=1000)).weight
    assert w(0) == 0.0
    assert w(250) == pytest.approx(0.125)
    assert w(1000) == 0.5
    assert w(5000) == 0.5
    assert w(None) == 0.5
    assert MTPObjective(MTPConfig(warmup_steps=0)).weight(0) == 0.5


def test_a_curriculum_renormalises_the_weights_of_the_steps_it_trains():
    # K = 3, beta = 0.5 over 30 steps (stages of 7.5 steps): reverse drops the furthest step
    objective = MTPObjective(
        MTPConfig(num_predict_tokens=3, loss_weight_decay=0.5),
        MTPTrainingConfig(curriculum="reverse", curriculum_steps=30),
    )
    by_stage = {s: objective.step_weights(objective.active_steps(s)) for s in (0, 8, 16, 29)}
    assert by_stage[0] == pytest.approx([4 / 7, 2 / 7, 1 / 7])
    assert by_stage[8] == pytest.approx([2 / 3, 1 / 3])
    assert by_stage[16] == pytest.approx([1.0])
    assert by_stage[29] == [] and step_weights(0.5, 0) == []


def test_an_ntp_objective_has_no_mtp_terms():
    objective = MTPObjective(None)
    assert (objective.num_steps, objective.step_weights(), objective.active_steps(7)) == (0, [], 0)


# -- the loss of a forward ---------------------------------------------------------------------


def _model(k: int = 3, training: MTPTrainingConfig | None = None, **mtp):
    cfg = tiny_model_config(mtp_config("transformer", False, "chained", k=k))
    for name, value in mtp.items():
        setattr(cfg.mtp, name, value)
    torch.manual_seed(0)
    model = build_model(cfg)
    randomize_norm_weights(model)
    apply_mtp_training(model, training or MTPTrainingConfig())
    return model


def _batch(model, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, model.cfg.vocab_size, (2, 16), generator=g)
    labels = labels_from_input_ids(ids)
    labels[1, 4] = IGNORE_INDEX  # an ignored target inside the sequence
    return ids, labels


def _reference_logits(model, ids):
    """(main logits, [logits_k]) [b, s, V] of the model's own pieces, outside the objective."""
    trunk = model.trunk
    positions = torch.arange(ids.shape[1])
    z = trunk.run_layers(trunk.embed(ids), positions)
    normed = trunk.final_norm(z)
    steps = model.mtp_steps(z, normed, ids)
    return trunk.logits(normed), [trunk.logits(h_k) for _, h_k in steps]


def _targets(labels: torch.Tensor, k: int) -> torch.Tensor:
    """t_{i+k+1} = labels[:, i + k] at position i; the last k positions have none."""
    out = torch.full_like(labels, IGNORE_INDEX)
    out[:, :-k] = labels[:, k:]
    return out


def _torch_ce(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """torch's own masked mean cross-entropy: the reference for megatron's vocab-parallel one."""
    return F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX)


def test_the_loss_is_the_main_ce_plus_the_scheduled_weight_times_the_weighted_step_ces(
    single_process,
):
    # K = 3, beta = 0.5: alpha = 4/7, 2/7, 1/7; w warms up linearly to 0.3 over 10 steps
    model = _model(loss_weight_decay=0.5, mtp_loss_weight=0.3, warmup_steps=10)
    ids, labels = _batch(model)
    out = model(ids, labels=labels, step=5)
    with torch.no_grad():
        main, per_step = _reference_logits(model, ids)
        ce0 = _torch_ce(main, labels)
        ce = [_torch_ce(lk, _targets(labels, k)) for k, lk in enumerate(per_step, start=1)]
    mtp = 4 / 7 * ce[0] + 2 / 7 * ce[1] + 1 / 7 * ce[2]
    assert out.mtp_weight == pytest.approx(0.15)
    torch.testing.assert_close(out.main_loss, ce0, rtol=1e-5, atol=0)
    for k in (1, 2, 3):
        torch.testing.assert_close(
            out.mtp_step_losses[f"mtp_step_{k}"], ce[k - 1], rtol=1e-5, atol=0
        )
    torch.testing.assert_close(out.mtp_loss, mtp, rtol=1e-5, atol=0)
    torch.testing.assert_close(out.loss, ce0 + 0.15 * mtp, rtol=1e-5, atol=0)
    assert out.mtp_active_steps == 3 and out.loss.requires_grad


def test_self_distillation_mixes_the_data_ce_with_torchs_soft_target_ce(single_process):
    """L_k = (1 - d) CE_k + d CE(q_k, softmax of the main head at i + k), the teacher's
    distribution taken as probability targets by torch's own cross_entropy."""
    d = 0.25
    model = _model(k=2, training=MTPTrainingConfig(distill_weight=d), loss_weight_decay=0.5)
    ids, labels = _batch(model, seed=2)
    out = model(ids, labels=labels, return_logits=False)
    with torch.no_grad():
        main, per_step = _reference_logits(model, ids)
        expected = torch.zeros(())
        for k, (alpha, logits_k) in enumerate(zip([2 / 3, 1 / 3], per_step), start=1):
            targets = labels[:, k:]  # t_{i+k+1} at positions 0 .. s-1-k
            valid = targets != IGNORE_INDEX
            hard = _torch_ce(logits_k[:, :-k], targets)
            teacher = main[:, k:].softmax(-1)  # the main head at i + k predicts t_{i+k+1} too
            soft = F.cross_entropy(logits_k[:, :-k][valid], teacher[valid])
            expected = expected + alpha * ((1 - d) * hard + d * soft)
            torch.testing.assert_close(
                out.mtp_step_losses[f"mtp_step_{k}"], hard, rtol=1e-5, atol=0
            )
    torch.testing.assert_close(out.mtp_loss, expected, rtol=1e-5, atol=0)
    assert out.logits is None  # training: the main logits are not kept for the caller


def test_detached_heads_send_the_mtp_loss_to_no_trunk_parameter(single_process):
    model = _model(training=MTPTrainingConfig(trunk="detach_heads"))
    ids, labels = _batch(model)
    out = model(ids, labels=labels, step=0)
    trunk = [p for p in model.trunk.parameters()]
    grads = torch.autograd.grad(out.mtp_loss, trunk, allow_unused=True, retain_graph=True)
    assert all(g is None or not g.any() for g in grads)
    heads = torch.autograd.grad(out.mtp_loss, list(model.mtp.parameters()), allow_unused=True)
    assert any(g is not None and g.abs().sum() > 0 for g in heads)
    # evaluation (no grad): the heads read the trunk as usual, the same losses
    with torch.no_grad():
        again = model(ids, labels=labels, step=0)
    torch.testing.assert_close(again.mtp_loss, out.mtp_loss.detach())


def test_a_frozen_trunk_takes_no_gradient_and_its_heads_do(single_process):
    model = _model(training=MTPTrainingConfig(trunk="freeze_trunk"))
    assert not any(p.requires_grad for p in model.trunk.parameters())
    ids, labels = _batch(model)
    model(ids, labels=labels, step=0).loss.backward()
    assert all(p.grad is None for p in model.trunk.parameters())
    assert all(p.grad is not None for p in model.mtp.parameters())
    assert model.objective.trunk_training == "freeze_trunk"


def test_the_model_holds_one_mtp_config(single_process):
    model = _model(
        training=MTPTrainingConfig(curriculum="forward"),
        weight_schedule="step",
        final_loss_weight=0.1,
        weight_switch_tokens=4096,
    )
    assert model.cfg.mtp is model.mtp.cfg  # one object: the model config's
    # the run's settings live in the objective, resolved from it (tokens -> steps, the span)
    objective = apply_mtp_training(
        model, MTPTrainingConfig(curriculum="forward"), total_steps=40, tokens_per_step=1024
    )
    assert (objective.schedule.switch_step, objective.curriculum.span) == (4, 40)
    assert model.objective is objective and model.cfg.mtp.weight_switch_step is None


# -- what a step logs ----------------------------------------------------------------------------


def _output(active: int, k: int = 3) -> MTPOutput:
    t = torch.tensor
    return MTPOutput(
        loss=t(3.0),
        main_loss=t(2.0),
        logits=None,
        mtp_loss=t(4.0),
        mtp_step_losses={
            f"mtp_step_{j}": t(float(j if j <= active else 0)) for j in range(1, k + 1)
        },
        mtp_weight=0.25,
        mtp_active_steps=active,
    )


def test_step_metrics_pack_one_layout_and_name_it_back():
    packed = StepMetrics.pack(_output(active=3))
    assert packed.tolist() == [3.0, 2.0, 4.0, 0.25, 3.0, 1.0, 2.0, 3.0]
    assert StepMetrics.size(3) == packed.numel()
    # two micro-batches summed and averaged, as the runners reduce them
    named = StepMetrics.names((packed + StepMetrics.pack(_output(active=3))) / 2)
    assert named == {
        "train/loss": 3.0,
        "train/main_loss": 2.0,
        "train/mtp_loss": 4.0,
        "train/mtp_weight": 0.25,
        "train/mtp_active_steps": 3.0,
        "train/mtp_step_1": 1.0,
        "train/mtp_step_2": 2.0,
        "train/mtp_step_3": 3.0,
    }
    # a curriculum's inactive steps are not logged; an NTP model logs no MTP field
    assert "train/mtp_step_2" not in StepMetrics.names(StepMetrics.pack(_output(active=1)))
    ntp = MTPOutput(loss=torch.tensor(1.5), main_loss=torch.tensor(1.5), logits=None)
    assert StepMetrics.names(StepMetrics.pack(ntp), prefix="") == {"loss": 1.5, "main_loss": 1.5}
