"""The training loop: recipe -> parallel groups -> data -> model -> DeepSpeed -> steps.

Every batch is a function of (step, micro-step, data-parallel rank), so a run resumed from the
checkpoint of step N continues with exactly the batches an uninterrupted run would have seen.
SIGTERM and SIGUSR1 (SLURM preemption) make every rank save a checkpoint at the end of the
current step and return.
"""

from __future__ import annotations

import json
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
from mtp_megatron.train.checkpoint import load_latest, read_latest, save_checkpoint
from mtp_megatron.train.engine import build_engine
from mtp_megatron.train.evaluate import evaluate
from mtp_megatron.train.logger import RunLogger
from mtp_megatron.train.pipeline_engine import PipelineSteps, build_pipeline_engine

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


class _StopFlag:
    """Set by SIGTERM / SIGUSR1; checked once per step and agreed on by all ranks."""

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

    def agreed(self, device: torch.device) -> bool:
        flag = torch.tensor([1.0 if self.raised else 0.0], device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())


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
    preemption would (for time-limited jobs and resume tests).
    """
    recipe.validate()
    tcfg = recipe.train
    par = recipe.parallel
    layout = initialize_parallel(par.tensor_parallel_size, par.pipeline_parallel_size)
    par.validate_world(layout.world_size)
    is_logger = layout.rank == 0
    say = log if is_logger else (lambda *a, **k: None)
    device = layout.device
    run_dir = run_directory(recipe)
    ckpt_dir = run_dir / "checkpoints"
    has_checkpoint = read_latest(ckpt_dir) is not None
    if resume == "require" and not has_checkpoint:
        raise ConfigError(f"--resume require: no complete checkpoint under {ckpt_dir}")
    if resume == "never" and has_checkpoint:
        raise ConfigError(
            f"{ckpt_dir} already holds a checkpoint; resume it (--resume auto), or pick another "
            "train.run_dir"
        )
    say(f"[setup] {recipe.name}: {layout.describe()}, ZeRO {tcfg.zero_stage}, run dir {run_dir}")

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

    start_step, tb_dir = 0, None
    if resume != "never" and has_checkpoint:
        state = load_latest(engine, ckpt_dir)
        start_step = int(state["step"])
        tb_dir = state.get("tb_dir")
        batches.load_state_dict(state["data"])
        say(f"[resume] from {ckpt_dir} at step {start_step}")
    if tb_dir is None:
        tb_dir = str(run_dir / datetime.now().strftime("%Y%m%d-%H%M%S"))
    if is_logger:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "recipe.yaml").write_text(yaml.safe_dump(asdict(recipe), sort_keys=False))
        shutil.copyfile(data.tokenizer_path, run_dir / "tokenizer.json")
    logger = RunLogger(Path(tb_dir) if is_logger else None, tcfg.steps, start_step)
    if start_step == 0:
        logger.hparams(asdict(recipe))

    def client_state(next_step: int) -> dict:
        return {"step": next_step, "tb_dir": tb_dir, "data": batches.state_dict()}

    def run_eval() -> dict[str, float]:
        # every DP rank runs the same number of batches (ZeRO-3 gathers are collective)
        val = eval_batches(
            data.validation,
            seq_len,
            tcfg.micro_batch_size,
            tcfg.eval_batches * layout.data_parallel_size,
            dp_rank=layout.data_parallel_rank,
            dp_size=layout.data_parallel_size,
        )
        if pipe is not None:
            return pipe.evaluate(val)
        return evaluate(engine.module, ((i.to(device), lab.to(device)) for i, lab in val))

    stop = _StopFlag()
    stop.install()
    result = TrainResult(run_dir=run_dir, last_step=start_step)
    dp_group = parallel_state.get_data_parallel_group()
    tokens_per_step = tcfg.micro_batch_size * tcfg.grad_accum * layout.data_parallel_size * seq_len
    try:
        for step in range(start_step, tcfg.steps):
            t0 = time.perf_counter()
            if pipe is not None:  # the last stage's values, DP mean, on every rank
                metrics = pipe.train_step(batches, step, tcfg.grad_accum)
            else:
                sums = None
                for micro in range(tcfg.grad_accum):
                    input_ids, labels = batches.batch(step, micro, tcfg.grad_accum)
                    out = engine(input_ids.to(device), labels=labels.to(device), step=step)
                    engine.backward(out.loss)
                    engine.step()
                    values = _step_values(out)
                    sums = values if sums is None else sums + values
                # mean over micro-batches and data-parallel ranks, in one all-reduce
                sums = sums / (tcfg.grad_accum * layout.data_parallel_size)
                dist.all_reduce(sums, group=dp_group)
                metrics = _named(sums, out)
                metrics.update(etd_metrics(engine.module, "train/"))  # last micro-batch, this rank
            dt = time.perf_counter() - t0
            metrics["train/lr"] = engine.get_lr()[0]
            grad_norm = engine.get_global_grad_norm()
            if grad_norm is not None:
                metrics["train/grad_norm"] = result.grad_norms[step] = float(grad_norm)
            metrics["train/tokens_per_s"] = tokens_per_step / dt
            result.losses[step] = metrics["train/loss"]
            result.last_step = step + 1
            if tcfg.log_every and (step + 1) % tcfg.log_every == 0 or step + 1 == tcfg.steps:
                logger.scalars(step + 1, metrics)
                logger.progress(step, metrics["train/loss"], metrics["train/tokens_per_s"])
            last = step + 1 == tcfg.steps
            if (tcfg.eval_every and (step + 1) % tcfg.eval_every == 0) or last:
                result.eval = run_eval()
                logger.scalars(step + 1, result.eval)
                say(_eval_line(step + 1, result.eval))
            stopping = stop.agreed(device) or (
                stop_after_steps is not None and step + 1 - start_step >= stop_after_steps
            )
            due = tcfg.checkpoint_every and (step + 1) % tcfg.checkpoint_every == 0
            if due or last or stopping:
                state = client_state(step + 1)
                tag = save_checkpoint(engine, ckpt_dir, step + 1, state, tcfg.keep_last)
                say(f"[checkpoint] {ckpt_dir / tag}")
            if stopping:
                result.stopped_early = True
                say(f"[stop] stopping after step {step + 1}; a resumed run continues from here")
                break
    finally:
        stop.restore()
        logger.close()
    if is_logger and result.eval:
        (run_dir / "final_eval.json").write_text(json.dumps(result.eval, indent=2))
    return result


def _step_values(out) -> torch.Tensor:
    """[loss, main, mtp, mtp_weight, step_1..step_K] of one micro-batch, detached."""
    mtp = out.mtp_loss.detach() if out.mtp_loss is not None else torch.zeros(())
    parts = [out.loss.detach(), out.main_loss.detach(), mtp, torch.tensor(out.mtp_weight)]
    parts += [v for v in out.mtp_step_losses.values()]
    return torch.stack([p.float().reshape(()).cpu() for p in parts])


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
