"""Training under DeepSpeed with gloo processes: ZeRO 1/2/3, TP=2, exact resume, SIGTERM."""

import json
from pathlib import Path

import pytest
import torch

from mtp_megatron.testing.distributed import run_distributed
from mtp_megatron.testing.runs import tiny_run_overrides, train_run
from mtp_megatron.testing.tolerance import VALUE_RTOL, assert_close_to_scale

pytestmark = pytest.mark.distributed

REPO = Path(__file__).resolve().parents[2]


def _falls(losses: dict[int, float]) -> bool:
    steps = sorted(losses)
    first = sum(losses[s] for s in steps[:3]) / 3
    last = sum(losses[s] for s in steps[-3:]) / 3
    return last < first - 0.5


@pytest.mark.parametrize("zero", [1, 2, 3])
def test_two_process_zero_stages_train(tmp_path, data_cache, zero):
    out = run_distributed(
        train_run, 2, tiny_run_overrides(tmp_path / "run", data_cache, **{"train.zero_stage": zero})
    )
    assert out[0]["losses"] == out[1]["losses"]  # DP-mean logged identically on both ranks
    assert _falls(out[0]["losses"]), out[0]["losses"]
    ev = out[0]["eval"]  # the final evaluation always runs
    assert {"val/loss_main", "val/acc_mtp_step_2", "val/acceptance_pos_2"} <= set(ev)
    assert (tmp_path / "run" / "checkpoints" / "latest").read_text() == "step_000030"


def test_tensor_parallel_two_processes_trains(tmp_path, data_cache):
    overrides = tiny_run_overrides(
        tmp_path / "run", data_cache, **{"parallel.tensor_parallel_size": 2}
    )
    out = run_distributed(train_run, 2, overrides)
    assert _falls(out[0]["losses"]), out[0]["losses"]


def test_tensor_parallel_training_matches_tp1(tmp_path, data_cache):
    """TP=2 under DeepSpeed follows the TP=1 run: losses and (TP-aware) gradient norms."""
    extra = {"train.steps": 6, "train.zero_stage": 1}
    tp1 = run_distributed(train_run, 1, tiny_run_overrides(tmp_path / "a", data_cache, **extra))[0]
    extra["parallel.tensor_parallel_size"] = 2
    tp2 = run_distributed(train_run, 2, tiny_run_overrides(tmp_path / "b", data_cache, **extra))[0]
    # fp32 reductions in another order, compounded over 6 Adam steps: agreement to ~1e-5
    for step in range(6):
        assert tp2["losses"][step] == pytest.approx(tp1["losses"][step], rel=1e-4, abs=1e-5)
        assert tp2["grad_norms"][step] == pytest.approx(tp1["grad_norms"][step], rel=1e-4)


def test_resume_is_exact(tmp_path, data_cache):
    """Stopped at step 7 and resumed == uninterrupted, loss for loss (ZeRO-2, grad accum 2)."""
    extra = {"train.steps": 14, "train.zero_stage": 2, "train.grad_accum": 2}
    full = run_distributed(
        train_run, 2, tiny_run_overrides(tmp_path / "full", data_cache, **extra)
    )[0]
    part = tiny_run_overrides(tmp_path / "part", data_cache, **extra)
    first = run_distributed(train_run, 2, part, 7)[0]
    assert first["last_step"] == 7
    assert (tmp_path / "part" / "checkpoints" / "latest").read_text() == "step_000007"
    second = run_distributed(train_run, 2, part)[0]
    assert sorted(second["losses"]) == list(range(7, 14))
    for step in range(14):
        got = first["losses"].get(step, second["losses"].get(step))
        assert got == full["losses"][step], (step, got, full["losses"][step])


def _train_then_load(rank: int, world: int, overrides: list[str]):
    """Train, then load the checkpoint back at the same TP size; logits of a fixed batch."""
    import torch

    from mtp_megatron.decoding.load import load_run
    from mtp_megatron.parallel import gather_last_dim, tensor_parallel_group

    train_run(rank, world, overrides)
    run = load_run(Path([o for o in overrides if o.startswith("train.run_dir=")][0].split("=")[1]))
    ids = torch.arange(40).view(2, 20) % 500
    with torch.no_grad():
        logits = run.model(ids).logits
    return gather_last_dim(logits, tensor_parallel_group())


def test_checkpoint_trained_at_tp2_loads_into_one_process(
    tmp_path, data_cache, single_process, capsys
):
    import torch

    from mtp_megatron.decoding.load import load_run

    extra = {"train.steps": 3, "parallel.tensor_parallel_size": 2, "train.zero_stage": 2}
    overrides = tiny_run_overrides(tmp_path / "run", data_cache, **extra)
    at_tp2 = run_distributed(_train_then_load, 2, overrides)[0]
    run = load_run(tmp_path / "run")  # this process: TP=1
    assert run.model.trunk.ctx.backend == "local"  # TP=1 inference: plain torch layers
    ids = torch.arange(40).view(2, 20) % 500
    with torch.no_grad():
        at_tp1 = run.model(ids).logits
    # TP=2 -> TP=1 changes only the order of fp32 reductions
    assert_close_to_scale(at_tp1, at_tp2, VALUE_RTOL)
    out, stats = run.model.mtp_decoder.generate(ids[:1, :8], max_new_tokens=8)
    assert stats["new_tokens"] == 8

    # the CLI on the same run: generation and the decode benchmark (greedy output checked)
    from mtp_megatron.__main__ import main

    run_dir = str(tmp_path / "run")
    assert (
        main(
            ["generate", "--checkpoint", run_dir, "--prompt", "def f(x):", "--max-new-tokens", "6"]
        )
        == 0
    )
    bf16 = ["generate", "--checkpoint", run_dir, "--prompt", "def f(x):", "--dtype", "bf16"]
    assert main([*bf16, "--max-new-tokens", "6"]) == 0  # bf16 decoding (KV caches in bf16 too)
    bench = ["bench-decode", "--checkpoint", run_dir, "--prompts", "2", "--prompt-len", "8"]
    bench += ["--batch-sizes", "1,2", "--max-new-tokens", "8", "--draft-vocab", "64"]
    assert main(bench) == 0
    out = capsys.readouterr().out
    assert "| speculative L=2 | 1 |" in out and "the 64 most frequent" in out
    assert "over transformers' plain generate" in out
    result = json.loads((tmp_path / "run" / "decode_benchmark.json").read_text())
    assert all(row["identical"] for row in result["rows"])  # ours and transformers'
    assert {row["new_tokens"] for row in result["rows"]} == {16}
    assert set(result["speedup_vs_transformers"]) == {"1", "2"}


ZERO3_PROMPT = [[(7 * i) % 500 for i in range(12)]]


def _train_zero3_then_decode_live(rank: int, world: int, overrides: list[str]):
    """Train at TP=2 under ZeRO-3, then greedy-decode with the live (partitioned) model, its
    parameters gathered: the tokens the consolidated weights must reproduce."""
    import deepspeed
    import torch

    import mtp_megatron.train.trainer as trainer
    from mtp_megatron.decoding import generate_plain

    built = []
    build = trainer.build_model
    trainer.build_model = lambda *a, **k: built.append(build(*a, **k)) or built[-1]
    train_run(rank, world, overrides)
    model, prompt = built[0].eval(), torch.tensor(ZERO3_PROMPT)
    with deepspeed.zero.GatheredParameters(list(model.parameters())), torch.no_grad():
        plain, _ = generate_plain(model, prompt, max_new_tokens=8)
        speculative, _ = model.mtp_decoder.generate(prompt, max_new_tokens=8)
    return plain, speculative


def test_zero3_tp2_run_consolidates_and_decodes_in_one_process(tmp_path, data_cache):
    import torch

    from mtp_megatron.__main__ import main
    from mtp_megatron.decoding import generate_plain
    from mtp_megatron.decoding.load import load_run

    extra = {"train.steps": 4, "parallel.tensor_parallel_size": 2, "train.zero_stage": 3}
    overrides = tiny_run_overrides(tmp_path / "run", data_cache, **extra)
    (live_plain, live_speculative), (other_plain, _) = run_distributed(
        _train_zero3_then_decode_live, 2, overrides
    )
    assert torch.equal(other_plain, live_plain)  # both TP ranks decode the same tokens
    step = tmp_path / "run" / "checkpoints" / "step_000004"
    assert list(step.glob("*zero_pp_rank_0_mp_rank_01_optim_states.pt"))  # TP=2 ZeRO-3 shards
    # the end of training wrote the TP=1 weights; load them in this process (TP=1, no DeepSpeed)
    run = load_run(tmp_path / "run")
    assert run.metadata["step"] == "4" and run.metadata["checkpoint"] == str(step)
    prompt = torch.tensor(ZERO3_PROMPT)
    plain, _ = generate_plain(run.model, prompt, max_new_tokens=8)
    speculative, _ = run.model.mtp_decoder.generate(prompt, max_new_tokens=8)
    assert torch.equal(plain, live_plain) and torch.equal(speculative, live_speculative)
    # `consolidate` of the step folder elsewhere: the same weights
    out = tmp_path / "again"
    assert main(["consolidate", str(step), "--out", str(out)]) == 0
    again = load_run(out).model.state_dict()
    for name, tensor in run.model.state_dict().items():
        if torch.is_tensor(tensor):
            assert torch.equal(again[name], tensor), name


def test_curriculum_and_weight_schedule_resume_exactly_across_their_switches(tmp_path, data_cache):
    """A reverse curriculum (K=2 over 9 steps: 2, 1, then 0 steps train, 3 steps each) with
    unshared heads under ZeRO-2 and the sequential schedule, and DeepSeek-V3's step schedule of
    the MTP weight (0.3, then 0.1 from step 5): stopped after step 4 and resumed == uninterrupted,
    loss for loss, and TensorBoard logs the active steps and the weight the schedules give."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    extra = {
        "train.steps": 9,
        "train.zero_stage": 2,
        "train.log_every": 1,
        "train.mtp.curriculum": "reverse",
        "train.mtp.sequential_forward": "true",
        "model.mtp.share_weights_across_steps": "false",
        "model.mtp.mtp_loss_weight": 0.3,
        "model.mtp.weight_schedule": "step",
        "model.mtp.final_loss_weight": 0.1,
        "model.mtp.weight_switch_step": 5,
    }
    full = run_distributed(
        train_run, 2, tiny_run_overrides(tmp_path / "full", data_cache, **extra)
    )[0]
    part = tiny_run_overrides(tmp_path / "part", data_cache, **extra)
    first = run_distributed(train_run, 2, part, 4)[0]
    second = run_distributed(train_run, 2, part)[0]
    assert sorted(second["losses"]) == list(range(4, 9))
    for step in range(9):
        got = first["losses"].get(step, second["losses"].get(step))
        assert got == full["losses"][step], (step, got, full["losses"][step])
    (tb_dir,) = [p for p in (tmp_path / "full").iterdir() if p.is_dir() and p.name != "checkpoints"]
    events = EventAccumulator(str(tb_dir))
    events.Reload()
    active = [e.value for e in events.Scalars("train/mtp_active_steps")]
    assert active == [2, 2, 2, 1, 1, 1, 0, 0, 0]
    weights = [e.value for e in events.Scalars("train/mtp_weight")]
    assert weights == pytest.approx([0.3] * 5 + [0.1] * 4)
    # a step's CE is logged while it trains: step 2 for 3 steps, step 1 for 6
    assert [e.step for e in events.Scalars("train/mtp_step_2")] == [1, 2, 3]
    assert [e.step for e in events.Scalars("train/mtp_step_1")] == list(range(1, 7))


def _resume_refused(rank: int, world: int, overrides: list[str]) -> str | None:
    """The ConfigError a resume with ``overrides`` raises on this rank (None: it trained)."""
    from mtp_megatron.config import ConfigError

    try:
        train_run(rank, world, overrides)
    except ConfigError as e:
        return str(e)
    return None


@pytest.mark.parametrize(
    "zero,optimizer", [(1, "BF16_Optimizer"), (2, "DeepSpeedZeroOptimizer")], ids=["zero1", "zero2"]
)
def test_bf16_trains_resumes_exactly_consolidates_and_decodes(
    tmp_path, data_cache, single_process, zero, optimizer
):
    """train.precision: bf16, the GPU default, on the CPU (DeepSpeed's bf16 path with fp32
    gradient accumulation): stopped at step 4 and resumed == uninterrupted, loss for loss; the
    checkpoint records the precision, ZeRO stage and optimizer, and a resume in fp32 or at the
    other stage is refused; the consolidated model decodes (speculative greedy == plain
    greedy)."""
    from mtp_megatron.decoding import generate_plain
    from mtp_megatron.decoding.load import load_run

    extra = {"train.steps": 8, "train.zero_stage": zero, "train.precision": "bf16"}
    extra["train.grad_accum"] = 2
    full = run_distributed(
        train_run, 2, tiny_run_overrides(tmp_path / "full", data_cache, **extra)
    )[0]
    part = tiny_run_overrides(tmp_path / "part", data_cache, **extra)
    first = run_distributed(train_run, 2, part, 4)[0]
    state = json.loads((tmp_path / "part/checkpoints/step_000004/run_state.json").read_text())
    assert (state["precision"], state["zero_stage"], state["optimizer"]) == (
        "bf16",
        zero,
        optimizer,
    )
    error = run_distributed(_resume_refused, 2, [*part, "train.precision=fp32"])[0]
    assert error and "train.precision bf16" in error and "set train.precision: bf16" in error
    other = 3 - zero  # ZeRO-1 <-> 2: BF16_Optimizer's files and DeepSpeedZeroOptimizer's
    error = run_distributed(_resume_refused, 2, [*part, f"train.zero_stage={other}"])[0]
    assert error and f"set train.zero_stage: {zero}" in error
    second = run_distributed(train_run, 2, part)[0]
    assert sorted(second["losses"]) == list(range(4, 8))
    for step in range(8):
        got = first["losses"].get(step, second["losses"].get(step))
        assert got == full["losses"][step], (step, got, full["losses"][step])
    run = load_run(tmp_path / "part")  # the consolidated model of the finished run
    prompt = torch.arange(8)[None] % 400
    plain, _ = generate_plain(run.model, prompt, 12)
    spec, stats = run.model.mtp_decoder.generate(prompt, max_new_tokens=12)
    assert torch.equal(spec, plain) and stats["new_tokens"] == 12
