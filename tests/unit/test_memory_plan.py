"""The memory plan (``train/memory_plan.py``): the traced step against bench-memory's measured
peaks, the ZeRO stage 'auto' picks against the models the README names, and a recipe that does
not fit refused with the change that makes it fit (``plan``, ``check``)."""

from __future__ import annotations

import re
from dataclasses import replace

import pytest
import torch

from mtp_megatron.__main__ import main
from mtp_megatron.bench.memory import main_bench_memory
from mtp_megatron.config import ConfigError, ModelConfig, MTPConfig, MTPTrainingConfig, TrainConfig
from mtp_megatron.model.params import OLMO2_1B
from mtp_megatron.recipe import DEMO_RECIPE, RECIPES, load_recipe
from mtp_megatron.train.memory_plan import (
    GIB,
    PlanUnavailable,
    check_fits,
    plan_memory,
    plan_recipe,
    trace_step,
)

TINY = ModelConfig(
    vocab_size=4096,
    hidden_size=64,
    num_layers=2,
    num_attention_heads=4,
    max_seq_len=128,
    mtp=MTPConfig(num_predict_tokens=2, speculation_lookahead=2),
)


def _peak(cfg: ModelConfig, **training) -> int:
    return trace_step(cfg, MTPTrainingConfig(**training), 2, 128, torch.float32).peak_bytes


def test_trace_counts_what_each_schedule_keeps(single_process):
    ntp = _peak(replace(TINY, mtp=None))
    plain, sequential = _peak(TINY), _peak(TINY, sequential_forward=True)
    both = _peak(TINY, sequential_forward=True, gradient_checkpointing=True)
    distill = _peak(TINY, distill_weight=0.5)
    logits = 2 * 128 * 4096 * 4  # one [b, s, V] fp32 tensor
    assert ntp > logits  # the main logits at least
    assert plain > ntp + 2 * logits  # two heads' logits alive with the plain schedule
    assert ntp < sequential < plain  # one head's at a time
    assert both < sequential and distill > plain
    trace = trace_step(TINY, MTPTrainingConfig(), 2, 128, torch.float32)
    assert 0 < trace.layer_saved_bytes < trace.saved_bytes
    assert trace.trainable == trace.params
    frozen = trace_step(TINY, MTPTrainingConfig(trunk="freeze_trunk"), 2, 128, torch.float32)
    assert frozen.trainable < frozen.params


def test_gradients_build_up_while_backward_frees_activations(single_process):
    """Through DeepSpeed's buckets the gradients add less than all of them to the step's peak
    where activations dominate; where they do not (8 tokens), a bucket smaller than the model
    (ZeRO-2/3 reduce and free it as it fills) holds less at once than ZeRO-0/1's, which keep
    every gradient until backward ends."""
    fp32, kept, bucket = torch.float32, 4.0, 8.0  # fp32 ZeRO-0: full gradients, fp32 buckets
    plain = trace_step(TINY, MTPTrainingConfig(), 2, 128, fp32).peak_bytes
    every = (kept, bucket, float("inf"))
    reduced = trace_step(TINY, MTPTrainingConfig(), 2, 128, fp32, reduction=every)
    all_gradients = reduced.trainable * (kept + bucket)
    assert plain <= reduced.peak_bytes < plain + all_gradients
    one_bucket = trace_step(TINY, MTPTrainingConfig(), 1, 8, fp32, reduction=every).peak_bytes
    quarter = (kept, bucket, reduced.trainable // 4)
    flushed = trace_step(TINY, MTPTrainingConfig(), 1, 8, fp32, reduction=quarter).peak_bytes
    assert all_gradients <= one_bucket and flushed < one_bucket - reduced.trainable * bucket / 4


def test_a_plan_that_cannot_be_made_is_noted_not_fatal(capsys, single_process):
    """ETD's routing has no meta-device kernel: `plan_recipe` says so, dry-run and check note
    it and go on."""
    etd = [str(RECIPES / "ablations" / "etd_mtp.yaml"), "model.vocab_size=4096"]
    with pytest.raises(PlanUnavailable, match="ETD"):
        plan_recipe(load_recipe(etd[0], etd[1:]), 1)
    assert main(["dry-run", *etd]) == 0
    assert "# memory plan: not available" in capsys.readouterr().out
    assert main(["check", *etd, "--gpu-mem", "80"]) == 0
    assert "memory plan: not available" in capsys.readouterr().out
    # a CPU-only layout (ZeRO-0 with 'auto' precision: bf16 on a GPU needs ZeRO >= 1) is noted
    assert main(["dry-run", str(DEMO_RECIPE), "train.zero_stage=0"]) == 0
    assert "# memory plan: not available: no memory plan for bf16 at ZeRO-0" in (
        capsys.readouterr().out
    )
    # without --nproc the plan takes the recipe's smallest world (PP 2 here), not 1
    pp2 = [str(RECIPES / "ablations" / "pp2.yaml"), "model.vocab_size=4096"]
    assert main(["check", *pp2, "--gpu-mem", "80"]) == 0
    assert "TP 1 x PP 2 x DP 1" in capsys.readouterr().out


def test_plan_is_within_15_percent_of_bench_memory(capsys, monkeypatch):
    """The acceptance's bound, at a shape whose tensors are large enough for the allocator to
    return them (docs/memory-plan.md has the three larger shapes, fp32 and bf16). Two threads in
    the measured processes, as where the bound was set: kernels' per-thread scratch grows with
    the cores."""
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    shape = ["--vocab", "8192", "--hidden", "128", "--layers", "2", "--heads", "4"]
    shape += ["--seq-len", "256", "--batch", "4", "--k", "2", "--warmup", "1", "--steps", "1"]
    cases = ["mtp", "sequential_ckpt", "distill"]
    assert main_bench_memory([*shape, "--cases", *cases]) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ")]
    header = [c.strip() for c in rows[0].split("|")]
    column = header.index("plan / measured")
    ratios = {row.split("|")[1].strip(): float(row.split("|")[column]) for row in rows[1:]}
    assert len(ratios) == len(cases)
    for case, ratio in ratios.items():
        assert 0.85 <= ratio <= 1.15, f"{case}: plan / measured {ratio}"


def _plan(cfg: ModelConfig, stage: int, dp: int, **training) -> float:
    plan = plan_memory(
        cfg,
        MTPTrainingConfig(**training),
        precision="bf16",
        zero_stage=stage,
        micro_batch=1,
        seq_len=4096,
        dp=dp,
    )
    return plan.total


def test_the_gpu_default_stage_fits_olmo2_1b_on_one_and_7b_on_sixteen_80gb_gpus(single_process):
    """README: 'auto' is ZeRO-2 on a GPU because with it OLMo-2-1B + 2 heads fits 1 x 80 GB and a
    7B + 2 heads 16 x 80 GB at micro-batch 1 x 4096, where ZeRO-1 (BF16_Optimizer's full fp32
    gradient buffer on every GPU) does not fit the 7B."""
    auto = TrainConfig().resolved_zero_stage(on_gpu=True)
    assert auto == 2 and TrainConfig().resolved_zero_stage(on_gpu=False) == 1
    usable = 80 * GIB * 0.9 - GIB  # MemoryPlan.usable: 10% headroom, 1 GiB of CUDA context
    heads = MTPConfig(num_predict_tokens=2, speculation_lookahead=2)
    olmo_1b = replace(OLMO2_1B, mtp=heads)
    olmo_7b = replace(olmo_1b, hidden_size=4096, num_layers=32, num_attention_heads=32)
    olmo_7b = replace(olmo_7b, ffn_hidden_size=11008)
    assert _plan(olmo_1b, auto, dp=1) < usable
    assert _plan(olmo_7b, auto, dp=16) < usable < _plan(olmo_7b, 1, dp=16)


def test_check_and_plan_refuse_a_recipe_that_does_not_fit_with_the_fix(capsys, single_process):
    big_batch = ["train.micro_batch_size=32", "model.vocab_size=4096", "model.num_layers=2"]
    assert main(["plan", str(DEMO_RECIPE), *big_batch, "--nproc", "1", "--gpu-mem", "1.8"]) == 1
    out = capsys.readouterr().out
    assert "does NOT fit" in out
    fix = re.search(r"to fit: (.+)", out)
    assert fix and fix.group(1).startswith("train.")
    recipe = load_recipe(DEMO_RECIPE, [*big_batch, *fix.group(1).split()])
    check_fits(recipe, 1, 1.8 * GIB, "each GPU")  # the change named fits

    assert main(["check", str(DEMO_RECIPE), *big_batch, "--gpu-mem", "1.8"]) == 2
    err = capsys.readouterr().err
    assert "needs about" in err and f"set {fix.group(1)}" in err
    assert (
        main(
            [
                "check",
                str(DEMO_RECIPE),
                "model.vocab_size=4096",
                "model.num_layers=2",
                "--gpu-mem",
                "1.8",
            ]
        )
        == 0
    )
    assert "GiB per GPU" in capsys.readouterr().out
    with pytest.raises(ConfigError, match="no change of ZeRO stage"):  # nothing is enough
        check_fits(load_recipe(DEMO_RECIPE, big_batch), 1, 1.1 * GIB, "each GPU")


def test_zero_stage_auto_resolves_and_validates():
    assert TrainConfig(zero_stage="auto").resolved_zero_stage(True, pipeline_parallel_size=2) == 1
    assert TrainConfig(zero_stage=3).resolved_zero_stage(True) == 3
    for bad in (True, "2", 4):
        with pytest.raises(ConfigError, match="zero_stage"):
            TrainConfig(zero_stage=bad).validate()  # type: ignore[arg-type]
