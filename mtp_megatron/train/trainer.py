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
from typing import Any, Literal

import torch
import torch.distributed as dist
import yaml

from mtp_megatron.config import ConfigError
from mtp_megatron.data.loader import Batches, eval_batches, prepare_training_data
from mtp_megatron.model import build_model
from mtp_megatron.model.objective import WeightSchedule
from mtp_megatron.parallel import initialize_parallel
from mtp_megatron.parallel.rank_zero import run_on_rank_zero
from mtp_megatron.recipe import Recipe
from mtp_megatron.train.apply import apply_training
from mtp_megatron.train.checkpoint import (
    SLOW_DISK_BYTES_PER_S,
    CheckpointError,
    ResumePlan,
    checkpoint_bytes,
    load_checkpoint,
    read_run_state,
    resume_candidates,
    save_checkpoint,
)
from mtp_megatron.train.consolidate import consolidate
from mtp_megatron.train.evaluate import validation_line
from mtp_megatron.train.guard import (
    NonFiniteError,
    NonFiniteGuard,
    agree_any,
    local_state_finite,
    nonfinite_terms,
)
from mtp_megatron.train.logger import RunLogger
from mtp_megatron.train.preflight import check_free_space, check_writable, estimate_checkpoint_bytes
from mtp_megatron.train.resume import apply_overrides, check_resolved, check_resume
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
        return _Trainer(recipe, layout, resume, log, stop, watchdog).run(stop_after_steps)
    finally:
        stop.restore()
        if watchdog is not None:
            watchdog.close()


def _plan_resume(ckpt_dir: Path, resume: ResumeMode) -> ResumePlan:
    """Rank 0 inspects ``ckpt_dir``; every rank gets its plan (or the same ConfigError)."""
    shared = [resume_candidates(ckpt_dir) if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(shared, src=0)
    plan = shared[0]
    assert plan is not None  # (rank 0's, broadcast)
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


def _check_against(folder: Path, recipe: Recipe, world: int, resolved: dict[str, Any]) -> list[str]:
    """Refuse (ConfigError) resuming ``folder`` with ``recipe`` on ``world`` processes where
    that changes what the checkpoint fixes (``resolved``: the precision and ZeRO stage 'auto'
    became here); the allowed changes, as report lines."""
    saved = read_run_state(folder)
    check_resolved(saved, resolved, str(folder))
    current = asdict(recipe)
    if current["model"]["vocab_size"] is None:  # the data's, not known yet: its loader state
        current["model"]["vocab_size"] = saved["recipe"]["model"]["vocab_size"]  # is compared
    return check_resume(
        saved["recipe"],
        current,
        recipe.train.resume_overrides,
        saved["world_size"],
        world,
        str(folder),
    )


def _resume(
    engine, recipe: Recipe, plan: ResumePlan, world: int, resolved: dict[str, Any], say
) -> tuple[dict, Path]:
    """Load the newest loadable checkpoint of ``plan`` (collective); (client state, folder)."""
    for i, folder in enumerate(plan.candidates):
        changes = _check_against(folder, recipe, world, resolved)
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


class _Trainer:
    """One invocation of a recipe on this rank: set-up in ``__init__`` (fails before step 1 on
    a bad run directory, resume or data), then :meth:`run`, the loop, which calls a step runner
    (PP=1 or PP>1, ``train/steps.py``) and the small parts below. Every method is collective."""

    def __init__(self, recipe: Recipe, layout, resume: ResumeMode, log, stop, watchdog):
        recipe.dims(layout.world_size)
        self.recipe, self.tcfg, self.layout = recipe, recipe.train, layout
        self.stop, self.watchdog = stop, watchdog
        self.is_logger = layout.rank == 0
        self.say = log if self.is_logger else (lambda *a, **k: None)
        self.device = layout.device
        self.precision = self.tcfg.resolved_precision(self.device.type == "cuda")
        """What train.precision resolves to here (recorded in every checkpoint)."""
        pp = recipe.parallel.pipeline_parallel_size
        self.zero_stage = self.tcfg.resolved_zero_stage(self.device.type == "cuda", pp)
        """What train.zero_stage resolves to here (recorded in every checkpoint)."""
        self.run_dir = run_directory(recipe)
        self.ckpt_dir = self.run_dir / "checkpoints"
        check_writable(self.ckpt_dir)
        plan = _plan_resume(self.ckpt_dir, resume)
        self.say(
            f"[setup] {recipe.name}: {layout.describe()}, ZeRO {self.zero_stage}, "
            f"{self.precision}, "
            f"run dir {self.run_dir}"
        )
        for note in plan.notes:
            self.say(f"[resume] skipped: {note}")
        if plan.candidates:  # refuse a changed recipe before seconds of data and model set-up
            _check_against(plan.candidates[0], recipe, layout.world_size, self.resolved)
        self._prepare_data()
        if self.device.type == "cuda":
            self._check_memory(resuming=bool(plan.candidates))
        self._build(fresh=not plan.candidates)
        self._restore(plan)

    @property
    def resolved(self) -> dict[str, Any]:
        """The settings 'auto' resolved here that a checkpoint's optimizer files depend on."""
        return {"precision": self.precision, "zero_stage": self.zero_stage}

    # -- set-up ----------------------------------------------------------------------------------
    def _prepare_data(self) -> None:
        """The recipe's data through megatron-core's GPTDataset; ``model.vocab_size`` None
        becomes the tokenizer's (the run directory's recipe records the number)."""
        recipe, tcfg, layout = self.recipe, self.tcfg, self.layout
        per_step = tcfg.micro_batch_size * tcfg.grad_accum * layout.data_parallel_size
        evaluated = tcfg.micro_batch_size * layout.data_parallel_size * max(tcfg.eval_batches, 1)
        self.data = prepare_training_data(
            recipe.data,
            recipe.model.vocab_size,
            recipe.seq_len,
            train_samples=tcfg.steps * per_step,
            validation_samples=evaluated,
            seed=tcfg.seed,
            log=self.say,
        )
        recipe.model.vocab_size = self.data.vocab_size
        recipe.model.validate(recipe.parallel.tensor_parallel_size)
        self.batches = Batches(
            self.data,
            recipe.seq_len,
            tcfg.micro_batch_size,
            layout.data_parallel_rank,
            layout.data_parallel_size,
        )
        self._val_batches()  # raises now, not at the first evaluation, when too small

    def _check_memory(self, resuming: bool) -> None:
        """Refuse, before the model is built, a run that the memory plan says will not fit
        this GPU (``train/memory_plan.py``), with the change that makes it fit; a resumed run
        (whose batch and ZeRO stage the checkpoint fixes) is only warned."""
        from mtp_megatron.train.memory_plan import GIB, PlanUnavailable, check_fits, memory_check

        if self.layout.tensor_parallel_size > 1:  # the plan traces at TP=1, in its own world
            self.say("[memory] TP > 1: no plan at start-up; see `python -m mtp_megatron plan`")
            return
        total = torch.cuda.get_device_properties(self.device).total_memory
        try:
            plan = check_fits(self.recipe, self.layout.world_size, total, "this GPU")
        except PlanUnavailable as e:
            self.say(f"[memory] plan not available: {e}")
            return
        except ConfigError as e:
            if resuming or not memory_check():
                self.say(f"[memory] warning: {str(e).splitlines()[0]}")
                return
            raise
        self.say(f"[memory] plan: about {plan.total / GIB:.1f} of {total / GIB:.1f} GiB per GPU")

    def _val_batches(self):
        # every DP rank runs the same number of batches (ZeRO-3 gathers are collective)
        layout, tcfg = self.layout, self.tcfg
        return eval_batches(
            self.data.validation,
            tcfg.micro_batch_size,
            tcfg.eval_batches * layout.data_parallel_size,
            layout.data_parallel_rank,
            layout.data_parallel_size,
        )

    def _build(self, fresh: bool) -> None:
        recipe, tcfg, par = self.recipe, self.tcfg, self.recipe.parallel
        torch.manual_seed(tcfg.seed)  # same master weights on every rank, sliced per TP rank
        sequences = tcfg.micro_batch_size * tcfg.grad_accum * self.layout.data_parallel_size
        tokens_per_step = sequences * recipe.seq_len
        if recipe.model.mtp is not None:  # a switch in tokens, now in steps (or refused)
            switch = WeightSchedule.from_config(recipe.model.mtp, tokens_per_step).switch_step
            if switch is not None and switch >= tcfg.steps:
                self.say(
                    f"[mtp] note: the MTP weight switch is at step {switch}, at or past "
                    f"train.steps={tcfg.steps}: this run never reaches final_loss_weight"
                )
        model = build_model(recipe.model)
        if recipe.init_from is not None and fresh:  # a resume loads the checkpoint instead
            from mtp_megatron.hf.importer import load_pretrained

            load_pretrained(model, recipe.init_from, recipe.mtp_head_init, log=self.say)
        setup = apply_training(model, tcfg, par, self.device, tokens_per_step)
        self.engine, self.runner, module = setup.engine, setup.runner, setup.module
        if par.pipeline_parallel_size > 1:
            self.say(f"[setup] pipeline ({par.pipeline_partition}): {module.describe()}")
        n_params = sum(p.numel() for p in module.parameters())
        self.say(
            f"[setup] model: {n_params / 1e6:.2f}M parameters on this rank, "
            f"seq_len {recipe.seq_len}"
        )

    def _restore(self, plan: ResumePlan) -> None:
        """Free-space check, resume from ``plan``, the run directory's recipe and logger."""
        recipe, engine = self.recipe, self.engine
        if plan.candidates:
            size = checkpoint_bytes(plan.candidates[0])
        else:
            size = estimate_checkpoint_bytes(engine.module, self.precision == "bf16")
        check_free_space(self.ckpt_dir, size, self.tcfg.keep_last)
        # how long a rank waits for the others' checkpoint files (or rank 0's consolidation)
        self.io_bound_s = self.tcfg.collective_timeout_s + size / SLOW_DISK_BYTES_PER_S
        self.start_step, tb_dir, self.latest = 0, None, ""
        if plan.candidates:
            world = self.layout.world_size
            state, folder = _resume(engine, recipe, plan, world, self.resolved, self.say)
            self.start_step = int(state["step"])
            tb_dir = state.get("tb_dir")
            note = self.batches.load_state_dict(
                state["data"], new_total_allowed="steps" in recipe.train.resume_overrides
            )
            if note:
                self.say(f"[resume] changed: {note}")
            self.latest = folder.name
            self.say(f"[resume] from {folder} at step {self.start_step}")
        self.tb_dir = tb_dir or str(self.run_dir / datetime.now().strftime("%Y%m%d-%H%M%S"))
        if self.is_logger:  # what this run trains with (resume_overrides included)
            (self.run_dir / "recipe.yaml").write_text(
                yaml.safe_dump(asdict(recipe), sort_keys=False)
            )
            shutil.copyfile(self.data.tokenizer_path, self.run_dir / "tokenizer.json")
        log_dir = Path(self.tb_dir) if self.is_logger else None
        self.logger = RunLogger(log_dir, self.tcfg.steps, self.start_step)
        if self.start_step == 0:
            self.logger.hparams(asdict(recipe))

    # -- the loop --------------------------------------------------------------------------------
    def run(self, stop_after_steps: int | None) -> TrainResult:
        tcfg = self.tcfg
        guard = NonFiniteGuard(tcfg.on_nonfinite, tcfg.max_skipped_steps, log=self.say)
        result = TrainResult(run_dir=self.run_dir, last_step=self.start_step)
        try:
            for step in range(self.start_step, tcfg.steps):
                done = step + 1
                metrics, stop_requested = self._train_step(step, result, guard)
                last = done == tcfg.steps
                if (tcfg.eval_every and done % tcfg.eval_every == 0) or last:
                    result.eval = self._evaluate(done)
                stopping = stop_requested or (
                    stop_after_steps is not None and done - self.start_step >= stop_after_steps
                )
                if (
                    (tcfg.checkpoint_every and done % tcfg.checkpoint_every == 0)
                    or last
                    or stopping
                ):
                    self._save(done)
                if stopping:
                    result.stopped_early = True
                    self.say(
                        f"[stop] stopping after step {done}; a resumed run continues from here"
                    )
                    break
        finally:
            self.logger.close()
        self._finish(result)
        return result

    def _train_step(self, step: int, result: TrainResult, guard: NonFiniteGuard):
        """One optimizer step, logged and checked; (metrics, whether a stop was requested)."""
        tcfg, layout, engine = self.tcfg, self.layout, self.engine
        self.watchdog.update(step + 1, "train")
        t0 = time.perf_counter()
        lr = result.lrs[step] = engine.get_lr()[0]  # the LR this step's update uses
        metrics = self.runner.train_step(self.batches, step, tcfg.grad_accum)  # DP mean
        dt = time.perf_counter() - t0
        metrics["train/lr"] = lr
        grad_norm = engine.get_global_grad_norm()
        if grad_norm is not None:
            metrics["train/grad_norm"] = result.grad_norms[step] = float(grad_norm)
        tokens = tcfg.micro_batch_size * tcfg.grad_accum * layout.data_parallel_size
        metrics["train/tokens_per_s"] = tokens * self.recipe.seq_len / dt
        result.losses[step] = metrics["train/loss"]
        result.last_step = step + 1
        bad = nonfinite_terms(metrics, None if grad_norm is None else float(grad_norm))
        stop_requested, any_bad = agree_any([self.stop.raised, bool(bad)], self.device)
        if tcfg.log_every and (step + 1) % tcfg.log_every == 0 or step + 1 == tcfg.steps:
            self.logger.scalars(step + 1, metrics)
            self.logger.progress(step, metrics["train/loss"], metrics["train/tokens_per_s"])
        if any_bad:
            bad = bad or ["(on another rank)"]
        applied = engine.was_step_applied()
        if not guard.check(step + 1, bad if any_bad else [], applied, self.latest):
            result.skipped_steps.append(step + 1)
        return metrics, stop_requested

    def _evaluate(self, step: int) -> dict[str, float]:
        self.watchdog.update(step, "evaluation")
        try:
            metrics = self.runner.evaluate(self._val_batches())
        except NonFiniteError as e:
            keep = f"{self.latest} is kept as the latest checkpoint" if self.latest else ""
            raise NonFiniteError(f"step {step}: {e}; {keep or 'nothing was saved'}") from None
        self.logger.scalars(step, metrics)
        self.say(validation_line(step, metrics))
        return metrics

    def _save(self, step: int) -> None:
        """A checkpoint of the state after ``step``; never of non-finite weights."""
        self.watchdog.update(step, "checkpoint")
        if agree_any([not local_state_finite(self.engine.module)], self.device)[0]:
            raise NonFiniteError(
                f"step {step}: the weights are not finite; not saving them. "
                f"{self.latest or 'No checkpoint'} stays the latest checkpoint"
            )
        client_state = {"step": step, "tb_dir": self.tb_dir, "data": self.batches.state_dict()}
        run_state = {
            "step": step,
            "world_size": self.layout.world_size,
            "recipe": asdict(self.recipe),
            "tb_dir": self.tb_dir,
            **self.resolved,  # precision and ZeRO stage: a resume must keep them
            "optimizer": type(self.engine.optimizer).__name__,
        }
        self.latest = save_checkpoint(
            self.engine,
            self.ckpt_dir,
            step,
            client_state,
            self.tcfg.keep_last,
            run_state,
            self.io_bound_s,
        )
        self.say(f"[checkpoint] {self.ckpt_dir / self.latest}")

    def _finish(self, result: TrainResult) -> None:
        """A finished run: its TP=1 weights for inference and export, and its final metrics."""
        if result.last_step == self.tcfg.steps and not result.stopped_early and self.latest:
            self.watchdog.update(result.last_step, "consolidation")
            checkpoint = self.ckpt_dir / self.latest

            def work(wait) -> None:  # rank 0; the others wait outside any collective
                consolidate(checkpoint, out=self.run_dir, log=self.say)

            # it reads the checkpoint and writes the fp32 model: about twice its bytes
            run_on_rank_zero(work, f"consolidate {checkpoint}", 2 * self.io_bound_s)
        if self.is_logger and result.eval:
            finite = {k: (v if math.isfinite(v) else None) for k, v in result.eval.items()}
            text = json.dumps(finite, indent=2, allow_nan=False)
            (self.run_dir / "final_eval.json").write_text(text)
