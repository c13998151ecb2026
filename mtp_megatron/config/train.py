"""TrainConfig: optimisation, ZeRO, logging, evaluation and checkpoint settings of a run."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal, get_args

from mtp_megatron.config.base import ConfigError, check_choice, check_int
from mtp_megatron.config.mtp import MTPTrainingConfig

Precision = Literal["auto", "fp32", "bf16"]
"""``train.precision``: 'auto' is fp32 on CPU, bf16 on GPU."""
ZeroStage = Literal[0, 1, 2, 3, "auto"]
"""``train.zero_stage``: 'auto' is 2 on a GPU, 1 on the CPU and under pipeline parallelism."""
OnNonFinite = Literal["stop", "skip"]
"""``train.on_nonfinite``: what a step with a NaN / inf loss or gradient norm does."""

# train.* settings that a resume may change when listed in train.resume_overrides: the
# optimizer's hyperparameters (re-applied after the checkpoint is loaded) and the LR schedule.
RESUME_OVERRIDABLE = ("lr", "min_lr_ratio", "lr_warmup_steps", "weight_decay", "betas", "steps")


@dataclass(kw_only=True)
class TrainConfig:
    """How a recipe trains (DeepSpeed drives the optimizer and ZeRO sharding)."""

    steps: int = 300
    """Optimizer steps."""
    micro_batch_size: int = 8
    """Sequences per micro-batch per data-parallel rank."""
    grad_accum: int = 1
    """Micro-batches per optimizer step (DeepSpeed gradient_accumulation_steps)."""
    seq_len: int | None = None
    """Training sequence length; None uses model.max_seq_len."""
    lr: float = 3e-3
    """Peak learning rate (AdamW)."""
    min_lr_ratio: float = 0.1
    """Cosine decay floor as a fraction of lr."""
    lr_warmup_steps: int = 30
    """Linear LR warm-up steps."""
    weight_decay: float = 0.1
    """AdamW weight decay on matrices (norm weights are not decayed)."""
    betas: tuple[float, float] = (0.9, 0.95)
    """AdamW betas."""
    grad_clip: float = 1.0
    """Global gradient-norm clip (0 disables)."""
    zero_stage: ZeroStage = "auto"
    """DeepSpeed ZeRO stage 0-3, sharding over the data-parallel group only. 'auto': ZeRO-2 on
    a GPU (fp32 gradient partitions reduce-scattered during backward: a 7B model with 2 heads
    fits 16 x 80 GB, where ZeRO-1's BF16_Optimizer keeps a full fp32 gradient buffer on every
    GPU and does not), ZeRO-1 on the CPU and under pipeline parallelism (DeepSpeed's pipeline
    engine runs ZeRO 0-1 only)."""
    precision: Precision = "auto"
    """'auto': fp32 on CPU, bf16 on GPU."""
    seed: int = 0
    """Seed of the model init and the data order."""
    log_every: int = 1
    """Steps between TensorBoard scalars / progress lines."""
    eval_every: int = 100
    """Steps between validation passes (and at the end); 0 disables periodic eval."""
    eval_batches: int = 8
    """Micro-batches per validation pass."""
    checkpoint_every: int = 100
    """Steps between checkpoints (and one at the end); 0: only at the end."""
    keep_last: int = 2
    """Checkpoints kept; older ones are deleted after a newer one is complete."""
    run_dir: str | None = None
    """Run directory (checkpoints, TensorBoard, resolved recipe); None: runs/<recipe name>."""
    on_nonfinite: OnNonFinite = "stop"
    """A step whose loss, an MTP step loss or the gradient norm is NaN / inf: 'stop' (exit
    non-zero, nothing of that state saved) or 'skip' (DeepSpeed drops the update; ZeRO >= 1)."""
    max_skipped_steps: int = 10
    """With on_nonfinite='skip': consecutive non-finite steps tolerated before the run stops."""
    collective_timeout_s: float = 120.0
    """A rank silent this long (stopped, swapped out, lost) ends the job with a message naming
    it; collectives time out 30 s later. Raise it if a checkpoint save takes longer."""
    resume_overrides: list[str] = field(default_factory=list)
    """Settings a resume may change against its checkpoint, applied for real: any of
    RESUME_OVERRIDABLE (e.g. [lr]); every other difference from the checkpoint is refused."""
    mtp: MTPTrainingConfig = field(default_factory=MTPTrainingConfig)
    """How the model with MTP heads trains (the guide's MTPTrainingConfig): memory-saving
    schedules that leave losses and gradients unchanged (sequential forward / backward,
    activation checkpointing), what trains the trunk, self-distillation and head curricula."""

    def validate(self, path: str = "train") -> None:
        positive = ("steps", "micro_batch_size", "grad_accum", "eval_batches", "keep_last")
        for name in positive:
            check_int(f"{path}.{name}", getattr(self, name), 1)
        for name in ("lr_warmup_steps", "eval_every", "checkpoint_every", "log_every"):
            check_int(f"{path}.{name}", getattr(self, name), 0)
        if isinstance(self.zero_stage, bool) or self.zero_stage not in get_args(ZeroStage):
            raise ConfigError(
                f"{path}.zero_stage={self.zero_stage!r} is invalid: must be 0-3 or 'auto'"
            )
        if not self.lr > 0:
            raise ConfigError(f"{path}.lr={self.lr!r} is invalid: must be > 0")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ConfigError(f"{path}.min_lr_ratio={self.min_lr_ratio!r} is invalid: in [0, 1]")
        check_choice(f"{path}.precision", self.precision, Precision)
        if self.seq_len is not None and self.seq_len < 2:
            raise ConfigError(f"{path}.seq_len={self.seq_len!r} is invalid: must be >= 2")
        if not self.grad_clip >= 0:  # also refuses NaN, which would turn clipping off
            raise ConfigError(f"{path}.grad_clip={self.grad_clip!r} is invalid: must be >= 0")
        numbers = {"lr": self.lr, "min_lr_ratio": self.min_lr_ratio, "grad_clip": self.grad_clip}
        numbers.update(
            weight_decay=self.weight_decay, collective_timeout_s=self.collective_timeout_s
        )
        numbers.update({f"betas[{i}]": b for i, b in enumerate(self.betas)})
        for name, value in numbers.items():
            if not math.isfinite(value):
                raise ConfigError(f"{path}.{name}={value!r} is invalid: must be a finite number")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ConfigError(f"{path}.betas={self.betas!r} is invalid: two numbers in [0, 1)")
        check_choice(f"{path}.on_nonfinite", self.on_nonfinite, OnNonFinite)
        if self.on_nonfinite == "skip" and self.zero_stage == 0:
            raise ConfigError(
                f"{path}.on_nonfinite='skip' is invalid with {path}.zero_stage=0: without ZeRO, "
                "DeepSpeed applies a non-finite update instead of dropping it; use zero_stage "
                "1-3 to skip such steps, or on_nonfinite='stop'"
            )
        check_int(f"{path}.max_skipped_steps", self.max_skipped_steps, 0, "an integer >= 0")
        if not self.collective_timeout_s >= 10:
            raise ConfigError(
                f"{path}.collective_timeout_s={self.collective_timeout_s!r} is invalid: must be "
                ">= 10 seconds (a rank is declared stalled after this long without progress)"
            )
        unknown = [name for name in self.resume_overrides if name not in RESUME_OVERRIDABLE]
        if unknown:
            raise ConfigError(
                f"{path}.resume_overrides={self.resume_overrides!r} is invalid: {unknown} cannot "
                f"change on resume; allowed: {list(RESUME_OVERRIDABLE)}"
            )
        self.mtp.validate(f"{path}.mtp")

    def resolved_zero_stage(
        self, on_gpu: bool, pipeline_parallel_size: int = 1
    ) -> Literal[0, 1, 2, 3]:
        """The ZeRO stage a run uses: ``zero_stage``, with 'auto' resolved (see its doc)."""
        if self.zero_stage != "auto":
            return self.zero_stage
        return 2 if on_gpu and pipeline_parallel_size == 1 else 1

    def resolved_precision(self, on_gpu: bool) -> Literal["fp32", "bf16"]:
        """The precision a run uses: ``precision``, with 'auto' resolved (bf16 on a GPU)."""
        if self.precision != "auto":
            return self.precision
        return "bf16" if on_gpu else "fp32"
