"""TrainConfig: optimisation, ZeRO, logging, evaluation and checkpoint settings of a run."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from mtp_megatron.config import ConfigError, MTPTrainingConfig


@dataclass
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
    zero_stage: int = 1
    """DeepSpeed ZeRO stage 0-3, sharding over the data-parallel group only."""
    precision: Literal["auto", "fp32", "bf16"] = "auto"
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
    mtp: MTPTrainingConfig = field(default_factory=MTPTrainingConfig)
    """Memory-saving execution of the model (the guide's MTPTrainingConfig): sequential MTP
    forward/backward and activation checkpointing; the losses and gradients do not change."""

    def validate(self, path: str = "train") -> None:
        positive = ("steps", "micro_batch_size", "grad_accum", "eval_batches", "keep_last")
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ConfigError(f"{path}.{name}={value!r} is invalid: must be an integer >= 1")
        for name in ("lr_warmup_steps", "eval_every", "checkpoint_every", "log_every"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 0:
                raise ConfigError(f"{path}.{name}={value!r} is invalid: must be an integer >= 0")
        if self.zero_stage not in (0, 1, 2, 3):
            raise ConfigError(f"{path}.zero_stage={self.zero_stage!r} is invalid: must be 0-3")
        if not self.lr > 0:
            raise ConfigError(f"{path}.lr={self.lr!r} is invalid: must be > 0")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ConfigError(f"{path}.min_lr_ratio={self.min_lr_ratio!r} is invalid: in [0, 1]")
        if self.precision not in ("auto", "fp32", "bf16"):
            raise ConfigError(
                f"{path}.precision={self.precision!r} is invalid: 'auto', 'fp32' or 'bf16'"
            )
        if self.seq_len is not None and self.seq_len < 2:
            raise ConfigError(f"{path}.seq_len={self.seq_len!r} is invalid: must be >= 2")
        if self.grad_clip < 0:
            raise ConfigError(f"{path}.grad_clip={self.grad_clip!r} is invalid: must be >= 0")
        self.mtp.validate(f"{path}.mtp")
