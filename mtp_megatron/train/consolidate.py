"""DeepSpeed checkpoint (any TP / PP / ZeRO stage) -> the consolidated model (``consolidated.py``).

Where the weights are in a step folder:

- ZeRO 0-2 without PP: the module weights of TP rank t in ``mp_rank_{t:02d}_model_states.pt``;
- PP > 1: one file per pipeline layer and TP rank (``train/pipeline_checkpoint.py`` renames them);
- ZeRO-3: the model-state files hold empty placeholders and the fp32 weights are flat partitions
  in the optimizer files. DeepSpeed's own reader (``zero_to_fp32``) reassembles them for one model
  replica; it globs every ``*mp_rank_*`` file, so for TP > 1 it is pointed at each TP rank's
  files in turn (symlinked under ``mp_rank_00`` names) and the TP shards are then merged.

The TP shards are merged by megatron's partition rule (``parallel/sharding.py``), read from the
model built on the meta device (no memory, no weights initialised).
"""

from __future__ import annotations

import re
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch

from mtp_megatron import consolidated
from mtp_megatron.config import ConfigError, ModelConfig
from mtp_megatron.parallel.sharding import partitions, unshard_state_dicts
from mtp_megatron.train.checkpoint import read_run_state, resume_candidates
from mtp_megatron.train.pipeline_checkpoint import is_pipeline_checkpoint, pipeline_state_dicts

CONSOLIDATED_DIR = "consolidated"
"""Where ``consolidate`` puts a checkpoint other than the final one: run_dir/consolidated/step_N."""
_TP_RANK = re.compile(r"mp_rank_(\d+)")


def resolve_checkpoint(path: str | Path, log: Callable[[str], None] = print) -> tuple[Path, Path]:
    """(run_dir, step folder) from a run dir, its checkpoints/ folder, or a step folder: the
    newest complete checkpoint unless a step folder is named."""
    path = Path(path).resolve()
    if (path / "checkpoints").is_dir():
        path = path / "checkpoints"
    if path.name == "checkpoints" or (path / "latest").exists():
        plan = resume_candidates(path)
        if not plan.candidates:
            raise ConfigError(
                f"no complete checkpoint under {path}" + "".join(f"; {n}" for n in plan.notes)
            )
        for note in plan.notes:
            log(f"[consolidate] skipped: {note}")
        path = plan.candidates[0]
    if not any(path.glob("*model_states.pt")):
        raise ConfigError(
            f"no DeepSpeed checkpoint in {path}; pass a run directory (runs/<name>), its "
            "checkpoints/ folder, or a step_NNNNNN folder"
        )
    return path.parent.parent, path


def _tp_ranks(ckpt: Path) -> list[int]:
    return sorted(
        {int(m.group(1)) for p in ckpt.glob("*model_states.pt") if (m := _TP_RANK.search(p.name))}
    )


def _zero3_state_dicts(ckpt: Path) -> list[dict[str, torch.Tensor]]:
    """One fp32 state dict per TP rank, reassembled by DeepSpeed's zero_to_fp32."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    out = []
    for rank in _tp_ranks(ckpt):
        with tempfile.TemporaryDirectory() as tmp:
            view = Path(tmp) / ckpt.name
            view.mkdir()
            for f in ckpt.glob(f"*mp_rank_{rank:02d}_*states.pt"):
                (view / f.name.replace(f"mp_rank_{rank:02d}", "mp_rank_00")).symlink_to(f)
            out.append(dict(get_fp32_state_dict_from_zero_checkpoint(tmp, tag=ckpt.name)))
    return out


def _module_state_dicts(ckpt: Path, cfg: ModelConfig) -> list[dict[str, torch.Tensor]]:
    """One state dict per TP rank, as saved (PP: renamed into MTPModel names)."""
    if is_pipeline_checkpoint(ckpt):
        return pipeline_state_dicts(ckpt, cfg.num_layers)
    files = [ckpt / f"mp_rank_{r:02d}_model_states.pt" for r in _tp_ranks(ckpt)]
    if not all(f.is_file() for f in files):  # ZeRO-3 names its model-state files per DP rank
        return []
    return [torch.load(f, map_location="cpu", weights_only=False)["module"] for f in files]


def master_state_dict(ckpt: Path, cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """The TP=1 state dict (parameters and persistent buffers) of the checkpoint ``ckpt``."""
    from mtp_megatron.model import build_model
    from mtp_megatron.parallel import ensure_parallel_initialized

    ensure_parallel_initialized()
    with torch.device("meta"):  # only the names, shapes and partition attributes are needed
        model = build_model(cfg)
    parts = partitions(model)
    shards = _module_state_dicts(ckpt, cfg)
    if not shards or any(n not in shards[0] or shards[0][n].numel() == 0 for n in parts):
        buffers = shards[0] if shards else {}
        shards = [{**buffers, **s} for s in _zero3_state_dicts(ckpt)]  # ZeRO-3
    master = unshard_state_dicts(shards, parts)
    wanted = {n for n, t in model.state_dict().items() if torch.is_tensor(t)}  # no _extra_state
    missing = sorted(wanted - set(master))
    if missing:
        raise ConfigError(
            f"checkpoint {ckpt} lacks {missing[:5]}{' ...' if len(missing) > 5 else ''}"
        )
    bad = consolidated.non_finite_tensors({n: master[n] for n in wanted})
    if bad:
        raise ConfigError(
            f"checkpoint {ckpt} holds non-finite (NaN / inf) weights in {len(bad)} tensors "
            f"({', '.join(bad[:3])}{', ...' if len(bad) > 3 else ''}); use an earlier "
            "checkpoint (pass its step_NNNNNN folder)"
        )
    return {n: master[n].float() if master[n].is_floating_point() else master[n] for n in wanted}


def consolidate(
    path: str | Path, out: str | Path | None = None, log: Callable[[str], None] = print
) -> Path:
    """Write the consolidated model of a checkpoint; returns its folder.

    ``out`` defaults to the run directory for the newest complete checkpoint (what training
    writes at its end) and to ``run_dir/consolidated/step_N`` for an older one.
    """
    run_dir, ckpt = resolve_checkpoint(path, log)
    newest = resume_candidates(ckpt.parent).candidates[:1] == [ckpt]
    folder = (
        Path(out)
        if out is not None
        else run_dir
        if newest
        else run_dir / CONSOLIDATED_DIR / ckpt.name
    )
    cfg = consolidated.read_model_config(run_dir)
    state = master_state_dict(ckpt, cfg)
    state_file = ckpt / "run_state.json"
    run_state = read_run_state(ckpt) if state_file.is_file() else {}
    metadata = {"checkpoint": str(ckpt), "step": str(run_state.get("step", ""))}
    if run_state.get("tb_dir"):
        metadata["tb_dir"] = str(run_state["tb_dir"])
    folder.mkdir(parents=True, exist_ok=True)
    for name in (consolidated.RECIPE_FILE, consolidated.TOKENIZER_FILE):
        if folder.resolve() != run_dir.resolve():
            shutil.copyfile(run_dir / name, folder / name)
    consolidated.save_weights(folder, state, metadata)
    log(f"[consolidate] {ckpt} -> {folder / consolidated.WEIGHTS_FILE}")
    return folder


def consolidated_folder(path: str | Path, log: Callable[[str], None] = print) -> Path:
    """A consolidated folder for ``path``: itself when it is one and not older than its run's
    newest checkpoint, else the consolidation of the checkpoint ``path`` names."""
    path = Path(path).resolve()
    if consolidated.is_consolidated(path):
        ckpts = path / "checkpoints"
        plan = resume_candidates(ckpts) if ckpts.is_dir() else None
        if plan is None or not plan.candidates:
            return path
        if consolidated.load_metadata(path).get("checkpoint") == str(plan.candidates[0]):
            return path
    return consolidate(path, log=log)
