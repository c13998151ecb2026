"""What a resume may change: the recipe a checkpoint was trained with against the one resuming it.

A checkpoint fixes the model, the parallel layout, the data and its order, and (through the
optimizer and LR-scheduler states DeepSpeed restores) the optimizer's hyperparameters. A resume
that changes any of those is refused with the field's name, except the settings the recipe
lists in ``train.resume_overrides`` (see ``RESUME_OVERRIDABLE``), which :func:`apply_overrides`
puts into effect after the load. Logging, evaluation, checkpoint cadence and the fault settings
may change freely; each change is reported.
"""

from __future__ import annotations

from typing import Any

from mtp_megatron.config import ConfigError
from mtp_megatron.config.train import RESUME_OVERRIDABLE, TrainConfig

# train.* fields that do not change what is trained: free to change on resume
FREE_TRAIN_FIELDS = frozenset(
    {
        "log_every",
        "eval_every",
        "eval_batches",
        "checkpoint_every",
        "keep_last",
        "run_dir",
        "on_nonfinite",
        "max_skipped_steps",
        "collective_timeout_s",
        "resume_overrides",
        "grad_clip",  # DeepSpeed reads it from the config each run; the checkpoint holds none
    }
)
FREE_TOP_LEVEL = frozenset({"name", "description"})


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in d.items():
        if isinstance(value, dict):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = list(value) if isinstance(value, tuple) else value
    return out


def recipe_changes(saved: dict[str, Any], current: dict[str, Any]) -> dict[str, tuple]:
    """{dotted field: (saved value, current value)} for every field that differs."""
    a, b = _flatten(saved), _flatten(current)
    return {k: (a.get(k), b.get(k)) for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)}


def _with_curriculum_span(recipe: dict[str, Any]) -> dict[str, Any]:
    """``recipe`` with a curriculum's default span (train.steps) written out, so that a resume
    with more steps compares the span the checkpoint trained with, not the new one."""
    train = recipe.get("train", {})
    mtp = train.get("mtp", {})
    if mtp.get("curriculum", "none") == "none" or mtp.get("curriculum_steps") is not None:
        return recipe
    span = {**mtp, "curriculum_steps": train.get("steps")}
    return {**recipe, "train": {**train, "mtp": span}}


RESOLVED_FIELDS = ("precision", "zero_stage")
"""train.* settings whose 'auto' resolves per device: compared by the value a run resolved
(:func:`check_resolved`), not as written in the recipe."""


def check_resolved(saved: dict[str, Any], current: dict[str, Any], where: str) -> None:
    """A checkpoint's optimizer files belong to the precision and ZeRO stage that wrote them
    (bf16: bf16 weights with fp32 master copies, ZeRO-1 bf16: BF16_Optimizer's layout; fp32:
    fp32 states only): refuse to continue it with either resolved otherwise ('auto' differs
    between the CPU and a GPU), whether the recipe says 'auto' or a value. A checkpoint written
    before they were recorded is compared by its recipe's value, unless that was 'auto'."""
    for key in RESOLVED_FIELDS:
        recorded = saved.get(key)
        if recorded is None:
            recorded = saved.get("recipe", {}).get("train", {}).get(key)
        if recorded in (None, "auto") or recorded == current[key]:
            continue
        optimizer = saved.get("optimizer") or "optimizer"
        raise ConfigError(
            f"{where} was trained with train.{key} {recorded} (DeepSpeed's {optimizer}); this "
            f"run would use {current[key]} ('auto' is bf16 and ZeRO-2 on a GPU, fp32 and ZeRO-1 "
            f"on the CPU): set train.{key}: {recorded} to continue it, or start a new "
            "train.run_dir"
        )


def check_resume(
    saved: dict[str, Any],
    current: dict[str, Any],
    overrides: list[str],
    saved_world: int,
    world: int,
    where: str,
) -> list[str]:
    """Refuse (ConfigError) a resume that changes what the checkpoint at ``where`` fixes; the
    lines to report for the changes that are allowed. Call :func:`check_resolved` first: the
    precision and ZeRO stage are compared there, by their resolved values."""
    if saved_world != world:
        raise ConfigError(
            f"{where} was saved by {saved_world} processes; this run has {world}. DeepSpeed's "
            f"optimizer shards are per data-parallel rank: resume with {saved_world} processes "
            "(NPROC x NNODES), or start a new train.run_dir"
        )
    changes = recipe_changes(_with_curriculum_span(saved), _with_curriculum_span(current))
    span = changes.get("train.mtp.curriculum_steps")
    if span is not None and changes.get("train.steps") is not None:
        raise ConfigError(
            f"resuming {where} with train.steps {span[1]!r} would move the stages of "
            f"train.mtp.curriculum, which span train.steps ({span[0]!r} in the checkpoint) when "
            f"train.mtp.curriculum_steps is null: set train.mtp.curriculum_steps: {span[0]!r} to "
            "keep them (the steps past it train every step a finished curriculum leaves), or "
            "start a new train.run_dir"
        )
    lines, refused = [], []
    for name, (old, new) in changes.items():
        section, _, field = name.partition(".")
        free = name in FREE_TOP_LEVEL or (section == "train" and field in FREE_TRAIN_FIELDS)
        if section == "train" and field in RESOLVED_FIELDS:  # check_resolved compared these
            lines.append(f"{name}: {old!r} -> {new!r} (resolves as the checkpoint's did)")
        elif free:
            lines.append(f"{name}: {old!r} -> {new!r}")
        elif section == "train" and field in overrides:
            lines.append(f"{name}: {old!r} -> {new!r} (train.resume_overrides: applied)")
        else:
            refused.append((name, old, new))
    if refused:
        shown = "; ".join(f"{n}: {o!r} in the checkpoint, {v!r} now" for n, o, v in refused)
        overridable = [n for n, _, _ in refused if n.split(".", 1)[1] in RESUME_OVERRIDABLE]
        fix = (
            f"list {[n.split('.', 1)[1] for n in overridable]} in train.resume_overrides to "
            "apply the new values, or "
            if overridable and len(overridable) == len(refused)
            else ""
        )
        raise ConfigError(
            f"resuming {where} with a recipe that changes what the checkpoint fixes: {shown}. "
            f"To resume, {fix}restore the checkpoint's values (its run_state.json holds the "
            "recipe); or start a new train.run_dir"
        )
    return lines


def apply_overrides(engine, cfg: TrainConfig) -> None:
    """Put lr, weight_decay and betas of ``cfg`` into the loaded optimizer and LR scheduler.

    DeepSpeed restored the checkpoint's param_groups and scheduler state; the schedule's shape
    (steps, warm-up, floor) is ``cfg``'s already, since the scheduler's lambda is not saved. The
    LR becomes cfg.lr x the schedule's factor at the scheduler's position (the steps applied)."""
    from mtp_megatron.train.engine import lr_lambda

    scheduler = engine.lr_scheduler
    groups = engine.optimizer.param_groups
    factor = lr_lambda(cfg)(scheduler.last_epoch)
    scheduler.base_lrs = [cfg.lr for _ in scheduler.base_lrs]
    for i, group in enumerate(groups):
        group["initial_lr"] = cfg.lr
        group["lr"] = cfg.lr * factor
        group["betas"] = tuple(cfg.betas)
        if i == 0:  # parameter_groups(): group 0 decays (matrices), group 1 does not
            group["weight_decay"] = cfg.weight_decay
