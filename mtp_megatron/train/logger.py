"""Run output on rank 0: TensorBoard scalars and HParams, and a one-line progress report."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from torch.utils.tensorboard import SummaryWriter


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested recipe dict -> {'model.mtp.num_predict_tokens': 4, ...} of HParams-able values."""
    out: dict[str, Any] = {}
    for key, value in d.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, name + "."))
        elif value is None:
            out[name] = "none"
        elif isinstance(value, (list, tuple)):
            out[name] = str(list(value))
        else:
            out[name] = value
    return out


class RunLogger:
    """TensorBoard writer + progress line; a no-op on every rank but the logging one."""

    def __init__(self, tb_dir: Path | None, total_steps: int, start_step: int):
        self.writer = SummaryWriter(str(tb_dir)) if tb_dir is not None else None
        self.total = total_steps
        self.start_step = start_step
        self.t0 = time.perf_counter()

    @property
    def active(self) -> bool:
        return self.writer is not None

    def hparams(self, recipe: dict[str, Any]) -> None:
        if self.writer is None:
            return
        # run_name="." keeps the HParams entry in this run's own folder, next to its scalars
        self.writer.add_hparams(flatten(recipe), {"val/loss_main": float("nan")}, run_name=".")

    def scalars(self, step: int, values: dict[str, float]) -> None:
        if self.writer is None:
            return
        for tag, value in values.items():
            self.writer.add_scalar(tag, value, step)

    def progress(self, step: int, loss: float, tokens_per_s: float, extra: str = "") -> None:
        if self.writer is None:
            return
        done = step + 1 - self.start_step
        elapsed = time.perf_counter() - self.t0
        eta = elapsed / max(done, 1) * (self.total - step - 1)
        print(
            f"step {step + 1:>6}/{self.total} | loss {loss:7.4f} | {tokens_per_s:8.0f} tok/s | "
            f"eta {_hms(eta)}{extra}",
            flush=True,
        )

    def close(self) -> None:
        if self.writer is not None:
            self.writer.flush()
            self.writer.close()


def _hms(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600:d}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"
