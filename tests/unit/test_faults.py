"""Faults and bad input in one process: non-finite recipe numbers, fault settings, the launcher
at NPROC=0, the guard's rules, non-finite weights refused, the free-space check."""

import math
import os
import shutil
import subprocess
import sys
import time

import pytest
import torch

from mtp_megatron.config import ConfigError
from mtp_megatron.recipe import load_recipe
from mtp_megatron.testing.runs import DEMO_RECIPE as DEMO
from mtp_megatron.testing.runs import REPO
from mtp_megatron.testing.variants import mtp_config, tiny_model_config
from mtp_megatron.train.guard import NonFiniteError, NonFiniteGuard, nonfinite_terms


@pytest.mark.parametrize(
    "override, field",
    [
        ("train.lr=.inf", "train.lr"),
        ("train.lr=.nan", "train.lr"),
        ("train.grad_clip=.nan", "train.grad_clip"),  # NaN used to turn clipping off silently
        ("train.betas=[0.9, .inf]", "train.betas[1]"),
        ("model.mtp.mtp_loss_weight=.inf", "model.mtp.mtp_loss_weight"),
        ("train.collective_timeout_s=.inf", "train.collective_timeout_s"),
    ],
)
def test_recipes_refuse_non_finite_numbers(override, field):
    with pytest.raises(ConfigError, match=rf"{field.replace('[', '.').replace(']', '.')}.*finite"):
        load_recipe(DEMO, [override])


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["train.on_nonfinite=skip", "train.zero_stage=0"], "zero_stage=0"),
        (["train.on_nonfinite=never"], "on_nonfinite"),
        (["train.max_skipped_steps=-1"], "max_skipped_steps"),
        (["train.resume_overrides=[seed]"], r"\['seed'\] cannot change on resume"),
        (["train.collective_timeout_s=1"], "collective_timeout_s"),
    ],
)
def test_fault_settings_are_validated(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_recipe(DEMO, overrides)


@pytest.mark.parametrize("env", [{"NPROC": "0"}, {"NPROC": "2", "NNODES": "0"}])
def test_launcher_refuses_zero_processes_before_torchrun(env):
    t0 = time.time()
    proc = subprocess.run(
        ["bash", str(REPO / "launch" / "train.sh"), str(DEMO)],
        env=dict(os.environ, PYTHON=sys.executable, **env),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2, proc.stderr
    assert "must be at least 1" in proc.stderr and "torch.distributed" not in proc.stderr
    assert time.time() - t0 < 30


def test_guard_names_the_step_and_terms_and_counts_skips():
    metrics = {"train/loss": math.nan, "train/main_loss": 2.0, "train/mtp_step_2": math.inf}
    assert nonfinite_terms(metrics, 1.0) == ["loss", "mtp_step_2"]
    assert nonfinite_terms({"train/loss": 1.0}, math.inf) == ["grad_norm"]
    assert nonfinite_terms({"train/loss": 1.0, "train/lr": 1e-3}, None) == []

    stop = NonFiniteGuard("stop", 10, log=lambda s: None)
    assert stop.check(3, [], True, "step_000002")
    with pytest.raises(NonFiniteError, match=r"step 4: non-finite loss, grad_norm.*step_000002"):
        stop.check(4, ["loss", "grad_norm"], False, "step_000002")

    lines = []
    skip = NonFiniteGuard("skip", 2, log=lines.append)
    assert not skip.check(5, ["grad_norm"], False, "")
    assert not skip.check(6, ["grad_norm"], False, "")
    assert skip.check(7, [], True, "")  # a good step resets the streak
    assert not skip.check(8, ["loss"], False, "")
    assert not skip.check(9, ["loss"], False, "")
    with pytest.raises(NonFiniteError, match=r"3 non-finite steps in a row.*max_skipped_steps=2"):
        skip.check(10, ["loss"], False, "")
    assert skip.total_skipped == 5 and len(lines) == 4
    with pytest.raises(NonFiniteError, match="applied the update anyway"):
        NonFiniteGuard("skip", 2).check(3, ["loss"], True, "")


def _nan_model():
    from mtp_megatron import build_model

    torch.manual_seed(0)
    model = build_model(tiny_model_config(mtp_config("transformer", True, "chained", k=2)))
    with torch.no_grad():
        model.trunk.layers[0].mlp.inner.down.weight.fill_(math.nan)
    return model.eval()


def test_decoding_and_evaluation_refuse_non_finite_weights(single_process):
    from mtp_megatron.decoding import generate_plain
    from mtp_megatron.decoding.runner import NonFiniteLogitsError
    from mtp_megatron.train.evaluate import evaluate

    model = _nan_model()
    ids = torch.randint(0, model.cfg.vocab_size, (1, 8))
    with pytest.raises(NonFiniteLogitsError, match="not finite"):
        model.mtp_decoder.generate(ids, max_new_tokens=4)
    with pytest.raises(NonFiniteLogitsError, match="not finite"):
        generate_plain(model, ids, 4)
    with pytest.raises(NonFiniteError, match="validation: non-finite loss_main"):
        evaluate(model, [(ids, ids.roll(-1, 1))])


def test_free_space_check_names_the_sizes(tmp_path):
    from mtp_megatron.train.preflight import check_free_space

    free = shutil.disk_usage(tmp_path).free
    check_free_space(tmp_path, free // 4, keep_last=1)  # two fit
    with pytest.raises(ConfigError, match=r"less than 2 checkpoints of about .* MiB"):
        check_free_space(tmp_path, free, keep_last=1)
    # keep_last=2 keeps two and writes a third before pruning the oldest: three must fit
    check_free_space(tmp_path, free // 4, keep_last=2)
    with pytest.raises(ConfigError, match=r"less than 3 checkpoints .* train.keep_last=2"):
        check_free_space(tmp_path, free // 2, keep_last=2)


def test_a_resume_compares_precision_and_zero_stage_as_resolved():
    """'auto' written in the recipe or the value it resolved to: the same run either way; a
    checkpoint that recorded neither (written before they were) by its recipe's value."""
    from mtp_megatron.train.resume import check_resolved, check_resume

    def saved(zero_stage, recorded=None):
        state = {"recipe": {"train": {"zero_stage": zero_stage, "precision": "auto"}}}
        return {**state, **({"zero_stage": recorded} if recorded is not None else {})}

    cpu = {"precision": "fp32", "zero_stage": 1}
    old = saved(1)  # base.yaml said 1 before 'auto'; the run resolves 'auto' to 1 on the CPU
    check_resolved(old, cpu, "ckpt")
    lines = check_resume(old["recipe"], saved("auto")["recipe"], [], 1, 1, "ckpt")
    assert lines == ["train.zero_stage: 1 -> 'auto' (resolves as the checkpoint's did)"]
    check_resolved(saved("auto", recorded=2), {"precision": "bf16", "zero_stage": 2}, "ckpt")
    with pytest.raises(ConfigError, match="set train.zero_stage: 2 to continue"):
        check_resolved(saved("auto", recorded=2), cpu, "ckpt")  # a GPU run resumed on the CPU
    with pytest.raises(ConfigError, match="set train.zero_stage: 1 to continue"):
        check_resolved(old, {"precision": "bf16", "zero_stage": 2}, "ckpt")
