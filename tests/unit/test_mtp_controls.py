"""The MTP training controls: weight schedules, head curricula, and drafting past K by applying
one shared chained head recursively."""

from __future__ import annotations

import pytest
import torch

from mtp_megatron import ConfigError, MTPConfig, build_model
from mtp_megatron.config import MTPTrainingConfig
from mtp_megatron.decoding import generate_plain
from mtp_megatron.model.objective import MTPObjective
from mtp_megatron.testing.variants import mtp_config, tiny_model_config
from mtp_megatron.train.apply import apply_mtp_training
from tests.cases.decoding import random_prompts

# -- MTP weight schedules ----------------------------------------------------------------------


def test_constant_schedule_with_warmup_is_todays_linear_warmup():
    cfg = MTPConfig(mtp_loss_weight=0.3, warmup_steps=10)
    cfg.validate()
    w = MTPObjective(cfg).weight
    assert [w(s) for s in (0, 5, 10, 500)] == pytest.approx([0, 0.15, 0.3, 0.3])


def test_deepseek_step_schedule_switches_at_the_step():
    cfg = MTPConfig(
        mtp_loss_weight=0.3, weight_schedule="step", final_loss_weight=0.1, weight_switch_step=100
    )
    cfg.validate()
    w = MTPObjective(cfg).weight
    assert [w(s) for s in (0, 99, 100, 101, 10_000)] == [0.3, 0.3, 0.1, 0.1, 0.1]
    assert w(None) == 0.3  # no step (evaluation): the full weight


def test_step_schedule_switch_in_tokens_becomes_the_first_step_past_them():
    cfg = MTPConfig(
        mtp_loss_weight=0.3,
        weight_schedule="step",
        final_loss_weight=0.1,
        weight_switch_tokens=10_000,
    )
    cfg.validate()
    with pytest.raises(ConfigError, match="tokens_per_step"):
        MTPObjective(cfg).weight(3)
    # 1024 tokens per step: step 10 reaches 10240
    resolved = MTPObjective(cfg, tokens_per_step=4 * 256)
    assert resolved.schedule.switch_step == 10
    assert (resolved.weight(9), resolved.weight(10)) == (0.3, 0.1)


def test_linear_decay_from_the_end_of_the_warmup_to_the_switch():
    cfg = MTPConfig(
        mtp_loss_weight=0.3,
        warmup_steps=10,
        weight_schedule="linear_decay",
        final_loss_weight=0.1,
        weight_switch_step=110,
    )
    cfg.validate()
    got = [MTPObjective(cfg).weight(s) for s in (0, 5, 10, 60, 110, 400)]
    assert got == pytest.approx([0.0, 0.15, 0.3, 0.2, 0.1, 0.1])


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(weight_schedule="cosine"), "mtp.weight_schedule='cosine' is invalid"),
        (dict(weight_schedule="step", weight_switch_step=5), "mtp.final_loss_weight=None"),
        (dict(weight_schedule="step", final_loss_weight=0.1), "set exactly one of"),
        (
            dict(
                weight_schedule="step",
                final_loss_weight=0.1,
                weight_switch_step=5,
                weight_switch_tokens=100,
            ),
            "set exactly one of",
        ),
        (
            dict(weight_schedule="linear_decay", final_loss_weight=-1.0, weight_switch_step=5),
            "mtp.final_loss_weight=-1.0",
        ),
        (
            dict(weight_schedule="step", final_loss_weight=0.1, weight_switch_step=0),
            "mtp.weight_switch_step=0",
        ),
        (dict(final_loss_weight=0.1), "only read by weight_schedule 'step' or 'linear_decay'"),
        (
            dict(weight_schedule="step", final_loss_weight=float("nan"), weight_switch_step=5),
            "mtp.final_loss_weight=nan",
        ),
        (
            dict(weight_schedule="step", final_loss_weight=0.1, weight_switch_step=True),
            "mtp.weight_switch_step=True",
        ),
        (
            dict(
                weight_schedule="linear_decay",
                final_loss_weight=0.1,
                weight_switch_step=10,
                warmup_steps=10,
            ),
            "must come after the warm-up (warmup_steps=10)",
        ),
        (dict(mtp_loss_weight=float("inf")), "mtp.mtp_loss_weight=inf"),
    ],
)
def test_invalid_weight_schedules_name_the_field(kwargs, message):
    with pytest.raises(ConfigError) as err:
        MTPConfig(**kwargs).validate()
    assert message in str(err.value)


def test_a_switch_in_tokens_becomes_the_first_step_past_them_and_not_inside_the_warmup():
    cfg = MTPConfig(
        weight_schedule="step", final_loss_weight=0.1, weight_switch_tokens=1000, warmup_steps=3
    )
    cfg.validate()
    # 4 x 256 >= 1000 > 3 x 256
    assert MTPObjective(cfg, tokens_per_step=256).schedule.switch_step == 4
    with pytest.raises(ConfigError, match="weight_switch_tokens=1000 is step 2 .* warm-up"):
        MTPObjective(cfg, tokens_per_step=512)


# -- head curricula ----------------------------------------------------------------------------


def test_forward_and_reverse_curricula_stage_their_steps():
    # K = 3 over 100 steps: K + 1 = 4 stages of 25 steps
    k3 = MTPConfig(num_predict_tokens=3)

    def objective(**training) -> MTPObjective:
        return MTPObjective(k3, MTPTrainingConfig(**training))

    forward = objective(curriculum="forward", curriculum_steps=100)
    reverse = objective(curriculum="reverse", curriculum_steps=100)
    steps = (0, 24, 25, 49, 50, 74, 75, 99, 100, 1000)
    assert [forward.active_steps(s) for s in steps] == [0, 0, 1, 1, 2, 2, 3, 3, 3, 3]
    assert [reverse.active_steps(s) for s in steps] == [3, 3, 2, 2, 1, 1, 0, 0, 0, 0]
    assert forward.active_steps(None) == 3  # evaluation: every head
    assert objective().active_steps(7) == 3
    # the span defaults to the run's steps
    span = MTPObjective(k3, MTPTrainingConfig(curriculum="forward"), total_steps=40)
    assert span.curriculum.span == 40 and span.active_steps(10) == 1
    with pytest.raises(ConfigError, match="curriculum_steps"):
        objective(curriculum="forward").active_steps(3)


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(curriculum="sideways"), "train.mtp.curriculum='sideways' is invalid"),
        (dict(curriculum="forward", curriculum_steps=0), "train.mtp.curriculum_steps=0"),
        (dict(curriculum_steps=100), "only read by a curriculum"),
    ],
)
def test_invalid_curricula_name_the_field(kwargs, message):
    with pytest.raises(ConfigError) as err:
        MTPTrainingConfig(**kwargs).validate()
    assert message in str(err.value)


def _curriculum_model(shared: bool, sequential: bool = False, step: int | None = None):
    cfg = tiny_model_config(mtp_config("transformer", shared, "chained", k=3))
    torch.manual_seed(0)
    model = build_model(cfg)
    training = MTPTrainingConfig(
        curriculum="forward", curriculum_steps=40, sequential_forward=sequential
    )
    apply_mtp_training(model, training)
    return model


@pytest.mark.parametrize("sequential", [False, True], ids=["plain", "sequential"])
def test_a_curriculum_stage_trains_only_its_steps(single_process, sequential):
    """At step 20 of a 40-step forward curriculum with K = 3, steps 1-2 train: the loss is the
    main CE plus w times their renormalised weights, step 3's head gets no gradient, and the
    step CEs equal those of the full model (the sequential schedule gives the same)."""
    model = _curriculum_model(shared=False, sequential=sequential)
    ids = random_prompts(model.cfg, 2, 24, seed=1)
    out = model(ids, step=20)
    assert out.mtp_active_steps == 2
    with torch.no_grad():
        full = model(ids)  # no step: every head (as evaluation)
    assert full.mtp_active_steps == 3
    alphas = model.objective.step_weights(2)
    assert alphas == pytest.approx([2 / 3, 1 / 3])
    ce = [full.mtp_step_losses[f"mtp_step_{k}"] for k in (1, 2)]
    for k in (1, 2):
        assert out.mtp_step_losses[f"mtp_step_{k}"].item() == pytest.approx(ce[k - 1].item())
    assert out.mtp_step_losses["mtp_step_3"].item() == 0.0  # not computed: logged as 0
    expected = full.main_loss + 0.5 * (alphas[0] * ce[0] + alphas[1] * ce[1])
    assert out.loss.item() == pytest.approx(expected.item(), rel=1e-6)
    out.loss.backward()
    assert all(p.grad is None for p in model.mtp.heads[2].parameters())
    assert all(p.grad is not None for p in model.mtp.heads[1].parameters())


def test_a_curriculum_stage_without_steps_is_next_token_prediction(single_process):
    model = _curriculum_model(shared=True)
    ids = random_prompts(model.cfg, 2, 24, seed=2)
    out = model(ids, step=5)  # stage 0 of forward
    assert out.mtp_active_steps == 0 and out.mtp_loss.item() == 0.0
    assert out.loss.item() == out.main_loss.item()
    out.loss.backward()
    assert all(p.grad is None for p in model.mtp.parameters())


def test_curricula_need_mtp_heads(tmp_path):
    from mtp_megatron.recipe import load_recipe
    from mtp_megatron.testing.runs import DEMO_RECIPE

    with pytest.raises(ConfigError, match="curriculum='forward' needs MTP heads"):
        load_recipe(DEMO_RECIPE, ["model.mtp=null", "train.mtp.curriculum=forward"])
    with pytest.raises(ConfigError, match="spans 3 steps .* fewer than its 4 stages"):
        load_recipe(DEMO_RECIPE, ["train.mtp.curriculum=reverse", "train.steps=3"])


def test_a_resume_with_more_steps_keeps_the_curriculum_span_of_its_checkpoint():
    from mtp_megatron.train.resume import check_resume

    def recipe(steps, span=None):
        mtp = {"curriculum": "forward", "curriculum_steps": span}
        return {"train": {"steps": steps, "mtp": mtp}}

    with pytest.raises(ConfigError, match="curriculum_steps: 100 to keep them"):
        check_resume(recipe(100), recipe(200), ["steps"], 1, 1, "ckpt")
    # the checkpoint's span written out: only train.steps changes, which the override allows
    lines = check_resume(recipe(100), recipe(200, span=100), ["steps"], 1, 1, "ckpt")
    assert lines == ["train.steps: 100 -> 200 (train.resume_overrides: applied)"]


# -- lookahead past K: one shared chained head applied recursively ---------------------------------


def _tiny(k: int, shared: bool = True, arrangement: str = "chained", seed: int = 0):
    cfg = tiny_model_config(mtp_config("transformer", shared, arrangement, k=k), max_seq_len=96)
    torch.manual_seed(seed)
    return build_model(cfg).eval()


@pytest.mark.parametrize("k,lookahead", [(1, 3), (2, 5)])
def test_recursive_drafts_past_k_keep_greedy_output_and_follow_the_recursion(
    single_process, k, lookahead
):
    """Greedy output equals plain decoding; and every draft of every round, k > K included,
    is what the same shared head unrolled for ``lookahead`` steps predicts in a teacher-forced
    training forward over what the drafter saw (the committed tokens, then that round's
    drafts): the recursion is the head applied to its own state."""
    model = _tiny(k)
    unrolled_cfg = tiny_model_config(
        mtp_config("transformer", True, "chained", k=lookahead), max_seq_len=96
    )
    unrolled = build_model(unrolled_cfg).eval()
    unrolled.load_state_dict(model.state_dict())  # one head module: the same parameters
    prompts = random_prompts(model.cfg, 2, 9, seed=3)
    plain, _ = generate_plain(model, prompts, 20)
    out, stats = model.mtp_decoder.generate(
        prompts, max_new_tokens=20, lookahead=lookahead, record_drafts=True
    )
    assert torch.equal(out, plain)
    assert stats["lookahead"] == lookahead
    assert len(stats["acceptance_rate_per_position"]) == lookahead
    checked_past_k = 0
    for p, drafts, _ in stats["drafts"]:
        for r in range(2):
            pr = int(p[r])
            seen = torch.cat([out[r, : pr + 2], drafts[r, : lookahead - 1]])[None]
            with torch.no_grad():
                tf = unrolled(seen, return_mtp_logits=True)
            for j in range(1, lookahead + 1):
                pred = tf.mtp_logits[j - 1][0, pr, : model.cfg.vocab_size].argmax()
                assert pred == drafts[r, j - 1], (r, pr, j)
                checked_past_k += j > k
    assert checked_past_k >= 20


@pytest.mark.parametrize("k,shared,arrangement", [(2, False, "chained"), (2, False, "independent")])
def test_lookahead_past_k_is_refused_for_heads_that_cannot_recurse(
    single_process, k, shared, arrangement
):
    model = _tiny(k, shared, arrangement)
    prompts = random_prompts(model.cfg, 1, 6, seed=0)
    with pytest.raises(ConfigError, match=f"between 1 and {k}"):
        model.mtp_decoder.generate(prompts, max_new_tokens=4, lookahead=k + 1)
    with pytest.raises(ConfigError, match="mtp.speculation_lookahead=3"):
        MTPConfig(
            num_predict_tokens=k,
            share_weights_across_steps=shared,
            head_arrangement=arrangement,
            speculation_lookahead=3,
        ).validate()


def test_shared_chained_heads_may_configure_a_lookahead_past_k():
    MTPConfig(num_predict_tokens=1, speculation_lookahead=3).validate()
    assert MTPConfig(num_predict_tokens=1).recursive_drafts
    assert MTPConfig(num_predict_tokens=1, share_weights_across_steps=False).recursive_drafts
    assert not MTPConfig(num_predict_tokens=2, share_weights_across_steps=False).recursive_drafts
