"""The training loop: recipe -> parallel groups -> data -> model -> DeepSpeed -> steps.

Every batch is a function of (step, micro-step, data-parallel rank), so a run resumed from the
checkpoint of step N continues with exactly the batches an uninterrupted run would have seen.
SIGTERM and SIGUSR1 (SLURM preemption) make every rank save a checkpoint at the end of the
current step and return. Faults are bounded: bad set-ups fail before step 1
(``train/preflight.py``, ``train/resume.py``), a non-finite step stops or is skipped
(``train/guard.py``), a stalled rank ends the job (``train/watchdog.py``), and only complete,
finite checkpoints are ever resumed from (``train/checkpoint.py``).
"""

from __future__ import annotations

import json
import math
import shutil
import signal
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Literal

import torch
import torch.distributed as dist
import yaml
from megatron.core import parallel_state

from mtp_megatron.config import ConfigError
from mtp_megatron.data import TokenBatches, eval_batches, prepare_data
from mtp_megatron.model import build_model
from mtp_megatron.model.etd import etd_metrics
from mtp_megatron.parallel import initialize_parallel
from mtp_megatron.recipe import Recipe
from mtp_megatron.train.checkpoint import (
    CheckpointError,
    ResumePlan,
    checkpoint_bytes,
    load_checkpoint,
    read_run_state,
    resume_candidates,
    save_checkpoint,
)
from mtp_megatron.train.consolidate import consolidate
from mtp_megatron.train.engine import build_engine, use_bf16
from mtp_megatron.train.evaluate import evaluate
from mtp_megatron.train.guard import (
    NonFiniteError,
    NonFiniteGuard,
    agree_any,
    local_state_finite,
    nonfinite_terms,
)
from mtp_megatron.train.logger import RunLogger
from mtp_megatron.train.pipeline import logged_values
from mtp_megatron.train.pipeline_engine import PipelineSteps, build_pipeline_engine
from mtp_megatron.train.preflight import check_free_space, check_writable, estimate_checkpoint_bytes
from mtp_megatron.train.resume import apply_overrides, check_resume
from mtp_megatron.train.watchdog import StallWatchdog

ResumeMode = Literal["auto", "require", "never"]


@dataclass
class TrainResult:
    """What a finished (or preempted) run reports."""

    run_dir: Path
    """Where checkpoints, TensorBoard logs and the resolved recipe are."""
    last_step: int
    """Optimizer steps completed."""
    losses: dict[int, float] = field(default_factory=dict)
    """Training loss (DP mean) of every step this process ran, by step."""
    grad_norms: dict[int, float] = field(default_factory=dict)
    """Global gradient norm (before clipping) of every step this process ran."""
    eval: dict[str, float] = field(default_factory=dict)
    """The last validation metrics."""
    stopped_early: bool = False
    """True when a signal (SIGTERM / SIGUSR1) or stop_after_steps ended the run early."""
    lrs: dict[int, float] = field(default_factory=dict)
    """Learning rate each step's update used (read from the optimizer), by step."""
    skipped_steps: list[int] = field(default_factory=list)
    """Steps (1-based) whose non-finite update was skipped (train.on_nonfinite='skip')."""


class _StopFlag:
    """Set by SIGTERM / SIGUSR1; agreed on by all ranks once per step (``agree_any``)."""

    def __init__(self):
        self.raised = False
        self._previous = {}

    def install(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        self.raised = True

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def run_directory(recipe: Recipe) -> Path:
    return Path(recipe.train.run_dir or Path("runs") / recipe.name)


def train(
    recipe: Recipe,
    resume: ResumeMode = "auto",
    log=print,
    stop_after_steps: int | None = None,
) -> TrainResult:
    """Run ``recipe`` in this process (one of the ``torchrun`` world). Collective.

    ``stop_after_steps``: checkpoint and return after this many steps of this invocation, as a
    preemption would (for time-limited jobs and resume tests). Raises ConfigError (bad recipe,
    run directory or resume) before step 1, NonFiniteError on divergence, CheckpointError when
    a save fails; in every case the latest complete checkpoint is left as it was.
    """
    recipe.validate()
    stop = _StopFlag()
    stop.install()  # first, so that a preemption during set-up is not lost
    watchdog = None
    try:
        layout = initialize_parallel(
            recipe.parallel.tensor_parallel_size,
            recipe.parallel.pipeline_parallel_size,
            # the watchdog (which names the stalled rank) speaks first; this bounds a collective
            # that hangs while every rank is still alive
            timeout_s=recipe.train.collective_timeout_s + 30,
        )
        watchdog = StallWatchdog(recipe.train.collective_timeout_s, layout.rank, layout.world_size)
        watchdog.start()
        return _train(recipe, layout, resume, log, stop_after_steps, stop, watchdog)
    finally:
        stop.restore()
        if watchdog is not None:
            watchdog.close()


def _plan_resume(ckpt_dir: Path, resume: ResumeMode) -> ResumePlan:
    """Rank 0 inspects ``ckpt_dir``; every rank gets its plan (or the same ConfigError)."""
    plan = [resume_candidates(ckpt_dir) if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(plan, src=0)
    plan = plan[0]
    found = "; ".join(plan.notes)
    if resume == "never" and plan.any_checkpoint:
        raise ConfigError(
            f"{ckpt_dir} already holds checkpoints; resume them (--resume auto), or pick "
            "another train.run_dir"
        )
    if resume == "require" and not plan.candidates:
        raise ConfigError(f"--resume require: no complete checkpoint under {ckpt_dir} ({found})")
    if plan.any_checkpoint and not plan.candidates:
        raise ConfigError(
            f"{ckpt_dir} holds checkpoints but none is complete ({found}); refusing to start "
            "over, which would overwrite them: move that folder away, or set another "
            "train.run_dir"
        )
    return plan


def _check_against(folder: Path, recipe: Recipe, world: int) -> list[str]:
    """Refuse (ConfigError) resuming ``folder`` with ``recipe`` on ``world`` processes where
    that changes what the checkpoint fixes; the allowed changes, as report lines."""
    saved = read_run_state(folder)
    return check_resume(
        saved["recipe"],
        asdict(recipe),
        recipe.train.resume_overrides,
        saved["world_size"],
        world,
        str(folder),
    )


def _resume(engine, recipe: Recipe, plan: ResumePlan, world: int, say) -> tuple[dict, Path]:
    """Load the newest loadable checkpoint of ``plan`` (collective); (client state, folder)."""
    for i, folder in enumerate(plan.candidates):
        changes = _check_against(folder, recipe, world)
        error = ""
        try:
            state = load_checkpoint(engine, folder)
        except CheckpointError as e:
            error = f"rank {dist.get_rank()}: {e}"
        errors: list[str] = [""] * world
        dist.all_gather_object(errors, error)
        failed = [e for e in errors if e]
        if not failed:
            for line in changes:
                say(f"[resume] changed: {line}")
            if recipe.train.resume_overrides:
                apply_overrides(engine, recipe.train)
            return state, folder
        more = "trying the previous complete checkpoint" if i + 1 < len(plan.candidates) else ""
        say(f"[resume] skipped {folder}: {failed[0]}{'; ' + more if more else ''}")
    raise ConfigError(
        f"no checkpoint under {plan.candidates[0].parent} could be loaded (see above); refusing "
        "to start over: move that folder away, or set another train.run_dir"
    )


def _train(
    recipe: Recipe,
    layout,
    resume: ResumeMode,
    log,
    stop_after_steps: int | None,
    stop: _StopFlag,
    watchdog: StallWatchdog,
) -> TrainResult:
    tcfg = recipe.train
    par = recipe.parallel
    recipe.dims(layout.world_size)
    is_logger = layout.rank == 0
    say = log if is_logger else (lambda *a, **k: None)
    device = layout.device
    run_dir = run_directory(recipe)
    ckpt_dir = run_dir / "checkpoints"
    check_writable(ckpt_dir)
    plan = _plan_resume(ckpt_dir, resume)
    say(f"[setup] {recipe.name}: {layout.describe()}, ZeRO {tcfg.zero_stage}, run dir {run_dir}")
    for note in plan.notes:
        say(f"[resume] skipped: {note}")
    if plan.candidates:  # refuse a changed recipe before seconds of data and model set-up
        _check_against(plan.candidates[0], recipe, layout.world_size)

    data = prepare_data(recipe.data, recipe.model.vocab_size, log=say)
    seq_len = recipe.seq_len
    batches = TokenBatches(
        data.train,
        seq_len,
        tcfg.micro_batch_size,
        layout.data_parallel_rank,
        layout.data_parallel_size,
        tcfg.seed,
    )

    def val_batches():
        # every DP rank runs the same number of batches (ZeRO-3 gathers are collective)
        return eval_batches(
            data.validation,
            seq_len,
            tcfg.micro_batch_size,
            tcfg.eval_batches * layout.data_parallel_size,
            dp_rank=layout.data_parallel_rank,
            dp_size=layout.data_parallel_size,
        )

    try:
        val_batches()  # raises now, not at the first evaluation, when validation is too small
    except ValueError as e:
        raise ConfigError(f"data: {e}") from None

    torch.manual_seed(tcfg.seed)  # same master weights on every rank, sliced per TP rank
    model = build_model(recipe.model, training=tcfg.mtp)
    pipe = None  # PP > 1: DeepSpeed's pipeline engine runs the steps (train/pipeline_engine.py)
    if par.pipeline_parallel_size > 1:
        engine = build_pipeline_engine(model, tcfg, par.pipeline_partition, device)
        pipe = PipelineSteps(engine, recipe.model.mtp.num_predict_tokens if recipe.model.mtp else 0)
        model = engine.module  # this stage's modules only
        say(f"[setup] pipeline ({par.pipeline_partition}): {model.describe()}")
    else:
        model = model.to(device)
        engine = build_engine(model, tcfg, device)
    n_params = sum(p.numel() for p in model.parameters())
    say(f"[setup] model: {n_params / 1e6:.2f}M parameters on this rank, seq_len {seq_len}")

    start_step, tb_dir, latest = 0, None, ""
    if plan.candidates:
        size = checkpoint_bytes(plan.candidates[0])
    else:
        size = estimate_checkpoint_bytes(engine.module, use_bf16(tcfg, device))
    check_free_space(ckpt_dir, size)
    if plan.candidates:
        state, folder = _resume(engine, recipe, plan, layout.world_size, say)
        start_step = int(state["step"])
        tb_dir = state.get("tb_dir")
        batches.load_state_dict(state["data"])
        latest = folder.name
        say(f"[resume] from {folder} at step {start_step}")
    if tb_dir is None:
        tb_dir = str(run_dir / datetime.now().strftime("%Y%m%d-%H%M%S"))
    if is_logger:  # what this run trains with (resume_overrides included)
        (run_dir / "recipe.yaml").write_text(yaml.safe_dump(asdict(recipe), sort_keys=False))
        shutil.copyfile(data.tokenizer_path, run_dir / "tokenizer.json")
    logger = RunLogger(Path(tb_dir) if is_logger else None, tcfg.steps, start_step)
    if start_step == 0:
        logger.hparams(asdict(recipe))

    def client_state(next_step: int) -> dict:
        return {"step": next_step, "tb_dir": tb_dir, "data": batches.state_dict()}

    def run_state(next_step: int) -> dict:
        return {
            "step": next_step,
            "world_size": layout.world_size,
            "recipe": asdict(recipe),
            "tb_dir": tb_dir,
        }

    def run_eval(step: int) -> dict[str, float]:
        watchdog.update(step, "evaluation")
        try:
            if pipe is not None:
                return pipe.evaluate(val_batches())
            batches_on_device = ((i.to(device), lab.to(device)) for i, lab in val_batches())
            return evaluate(engine.module, batches_on_device)
        except NonFiniteError as e:
            keep = f"{latest} is kept as the latest checkpoint" if latest else "nothing was saved"
            raise NonFiniteError(f"step {step}: {e}; {keep}") from None

    guard = NonFiniteGuard(tcfg.on_nonfinite, tcfg.max_skipped_steps, log=say)
    result = TrainResult(run_dir=run_dir, last_step=start_step)
    dp_group = parallel_state.get_data_parallel_group()
    tokens_per_step = tcfg.micro_batch_size * tcfg.grad_accum * layout.data_parallel_size * seq_len
    try:
        for step in range(start_step, tcfg.steps):
            watchdog.update(step + 1, "train")
            t0 = time.perf_counter()
            lr = result.lrs[step] = engine.get_lr()[0]  # the LR this step's update uses
            if pipe is not None:  # the last stage's values, DP mean, on every rank
                metrics = pipe.train_step(batches, step, tcfg.grad_accum)
            else:
                sums = None
                for micro in range(tcfg.grad_accum):
                    input_ids, labels = batches.batch(step, micro, tcfg.grad_accum)
                    out = engine(
                        input_ids.to(device),
                        labels=labels.to(device),
                        step=step,
                        return_logits=False,
                    )
                    engine.backward(out.loss)
                    engine.step()
                    values = logged_values(out)
                    sums = values if sums is None else sums + values
                engine.module.after_optimizer_step()  # once per step: ETD's routing bias
                # mean over micro-batches and data-parallel ranks, in one all-reduce
                sums = sums / (tcfg.grad_accum * layout.data_parallel_size)
                dist.all_reduce(sums, group=dp_group)
                metrics = _named(sums, out)
                metrics.update(etd_metrics(engine.module, "train/"))  # last micro-batch, this rank
            dt = time.perf_counter() - t0
            metrics["train/lr"] = lr
            grad_norm = engine.get_global_grad_norm()
            if grad_norm is not None:
                metrics["train/grad_norm"] = result.grad_norms[step] = float(grad_norm)
            metrics["train/tokens_per_s"] = tokens_per_step / dt
            result.losses[step] = metrics["train/loss"]
            result.last_step = step + 1
            bad = nonfinite_terms(metrics, None if grad_norm is None else float(grad_norm))
            stop_requested, any_bad = agree_any([stop.raised, bool(bad)], device)
            if tcfg.log_every and (step + 1) % tcfg.log_every == 0 or step + 1 == tcfg.steps:
                logger.scalars(step + 1, metrics)
                logger.progress(step, metrics["train/loss"], metrics["train/tokens_per_s"])
            if any_bad:
                bad = bad or ["(on another rank)"]
            if not guard.check(step + 1, bad if any_bad else [], engine.was_step_applied(), latest):
                result.skipped_steps.append(step + 1)
            last = step + 1 == tcfg.steps
            if (tcfg.eval_every and (step + 1) % tcfg.eval_every == 0) or last:
                result.eval = run_eval(step + 1)
                logger.scalars(step + 1, result.eval)
                say(_eval_line(step + 1, result.eval))
            stopping = stop_requested or (
                stop_after_steps is not None and step + 1 - start_step >= stop_after_steps
            )
            due = tcfg.checkpoint_every and (step + 1) % tcfg.checkpoint_every == 0
            if due or last or stopping:
                watchdog.update(step + 1, "checkpoint")
                if agree_any([not local_state_finite(engine.module)], device)[0]:
                    raise NonFiniteError(
                        f"step {step + 1}: the weights are not finite; not saving them. "
                        f"{latest or 'No checkpoint'} stays the latest checkpoint"
                    )
                tag = save_checkpoint(
                    engine,
                    ckpt_dir,
                    step + 1,
                    client_state(step + 1),
                    tcfg.keep_last,
                    run_state(step + 1),
                )
                latest = tag
                say(f"[checkpoint] {ckpt_dir / tag}")
            if stopping:
                result.stopped_early = True
                say(f"[stop] stopping after step {step + 1}; a resumed run continues from here")
                break
    finally:
        logger.close()
    if result.last_step == tcfg.steps and not result.stopped_early and latest:
        # the finished run's TP=1 weights for inference and export (decoding reads only these)
        watchdog.update(result.last_step, "consolidation")
        if is_logger:
            consolidate(ckpt_dir / latest, out=run_dir, log=say)
        dist.barrier()
    if is_logger and result.eval:
        finite = {k: (v if math.isfinite(v) else None) for k, v in result.eval.items()}
        (run_dir / "final_eval.json").write_text(json.dumps(finite, indent=2, allow_nan=False))
    return result


def _named(values: torch.Tensor, out) -> dict[str, float]:
    names = ["train/loss", "train/main_loss", "train/mtp_loss", "train/mtp_weight"]
    names += [f"train/{k}" for k in out.mtp_step_losses]
    named = dict(zip(names, values.tolist()))
    if out.mtp_loss is None:
        named.pop("train/mtp_loss")
        named.pop("train/mtp_weight")
    return named


def _eval_line(step: int, ev: dict[str, float]) -> str:
    parts = [f"val loss {ev['val/loss_main']:.4f}", f"acc {ev['val/acc_main']:.3f}"]
    k = 1
    while f"val/acceptance_pos_{k}" in ev:
        parts.append(
            f"head{k} acc {ev[f'val/acc_mtp_step_{k}']:.3f} "
            f"accept {ev[f'val/acceptance_pos_{k}']:.3f}"
        )
        k += 1
    return f"[eval] step {step}: " + " | ".join(parts)
