"""Load a trained run for inference: recipe + tokenizer + DeepSpeed checkpoint -> an MTPModel.

A checkpoint saved at any tensor-parallel size loads into a model of the current TP size: the
per-rank shards (``mp_rank_XX_model_states.pt``) are merged into the full weights using each
parameter's megatron partition attributes, then sliced for this rank. ZeRO-3 checkpoints hold no
module weights in those files; DeepSpeed's own ``zero_to_fp32`` reader reassembles them (TP=1).
A checkpoint trained with pipeline parallelism holds one file per pipeline layer and TP rank
(``layer_XX-model_YY-model_states.pt``); ``train/pipeline_checkpoint.py`` renames them into
MTPModel state dicts first, so it loads the same way into a one-process (PP=1) model.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import yaml

from mtp_megatron.config import ConfigError, from_dict
from mtp_megatron.model import MTPModel, build_model
from mtp_megatron.train.checkpoint import resume_candidates
from mtp_megatron.train.pipeline_checkpoint import is_pipeline_checkpoint, pipeline_state_dicts


@dataclass
class LoadedRun:
    """A trained model ready for decoding."""

    model: MTPModel
    """The model (eval mode), weights from the checkpoint."""
    tokenizer_path: Path
    """The run's tokenizer (tokenizers JSON)."""
    recipe: object
    """The run's resolved Recipe."""
    checkpoint: Path
    """The checkpoint folder that was loaded."""


def _resolve(path: Path) -> tuple[Path, Path]:
    """(run_dir, checkpoint folder) from a run dir, its checkpoints dir, or a step folder."""
    path = path.resolve()
    if (path / "checkpoints").is_dir():
        path = path / "checkpoints"
    if path.name == "checkpoints" or (path / "latest").exists():
        plan = resume_candidates(path)
        if not plan.candidates:
            raise ConfigError(
                f"no complete checkpoint under {path}" + "".join(f"; {n}" for n in plan.notes)
            )
        for note in plan.notes:
            print(f"[load] skipped: {note}")
        path = plan.candidates[0]
    if not list(path.glob("mp_rank_*_model_states.pt")):
        raise ConfigError(
            f"no DeepSpeed checkpoint in {path}; pass a run directory (runs/<name>), its "
            "checkpoints/ folder, or a step_NNNNNN folder"
        )
    return path.parent.parent, path


def _merge_shards(shards: list[dict], model: MTPModel) -> dict[str, torch.Tensor]:
    """TP shards of a state dict -> full (TP=1 layout) tensors, by each parameter's attributes."""
    params = dict(model.named_parameters())
    merged = {}
    for name, first in shards[0].items():
        if not torch.is_tensor(first):
            continue
        p = params.get(name)
        if len(shards) == 1 or p is None or not getattr(p, "tensor_model_parallel", False):
            merged[name] = first
            continue
        dim, stride = p.partition_dim, getattr(p, "partition_stride", 1)
        pieces = [s[name].chunk(stride, dim=dim) for s in shards]  # [rank][stride piece]
        merged[name] = torch.cat(
            [pieces[r][j] for j in range(stride) for r in range(len(shards))], dim=dim
        )
    return merged


def _slice_for_rank(full: dict[str, torch.Tensor], model: MTPModel) -> dict[str, torch.Tensor]:
    from mtp_megatron.parallel import tensor_parallel_group

    group = tensor_parallel_group()
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    out = {}
    for name, p in model.named_parameters():
        tensor = full[name]
        if world > 1 and getattr(p, "tensor_model_parallel", False):
            dim, stride = p.partition_dim, getattr(p, "partition_stride", 1)
            chunks = tensor.chunk(world * stride, dim=dim)
            tensor = torch.cat(chunks[rank::world], dim=dim)
        out[name] = tensor
    for name, _ in model.named_buffers():  # persistent buffers (ETD's routing bias): replicated
        if name in full:
            out[name] = full[name]
    return out


DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
"""Decoding precisions: fp32 (the default: exact greedy equality with plain decoding) or bf16
(faster on a GPU; the verification's batched matmuls round unlike one-token steps, so a
near-tied greedy token may differ from plain bf16 decoding)."""


def load_run(
    path: str | Path, device: torch.device | None = None, dtype: str = "fp32"
) -> LoadedRun:
    """Build the run's model for the current TP size and load its latest (or given) checkpoint,
    in ``dtype`` ('fp32' or 'bf16', see DTYPES)."""
    if dtype not in DTYPES:
        raise ConfigError(f"dtype={dtype!r} is invalid: one of {sorted(DTYPES)}")
    from mtp_megatron.parallel import default_device, ensure_parallel_initialized
    from mtp_megatron.recipe import Recipe

    run_dir, ckpt = _resolve(Path(path))
    recipe_file = run_dir / "recipe.yaml"
    if not recipe_file.is_file():
        raise ConfigError(f"{recipe_file} is missing: is {run_dir} a run directory?")
    recipe = from_dict(Recipe, yaml.safe_load(recipe_file.read_text()))
    ensure_parallel_initialized()
    torch.manual_seed(0)
    model = build_model(recipe.model)
    names = {n for n, _ in model.named_parameters()}
    if is_pipeline_checkpoint(ckpt):  # trained with PP > 1: one file per layer and TP rank
        shards = pipeline_state_dicts(ckpt, recipe.model.num_layers)
    else:
        files = sorted(ckpt.glob("mp_rank_*_model_states.pt"))
        shards = [torch.load(f, map_location="cpu", weights_only=False)["module"] for f in files]
    if not names <= set(shards[0]) or any(shards[0][n].numel() == 0 for n in names):
        shards = [_zero3_state_dict(ckpt)]  # ZeRO-3: weights live in the optimizer shards
    full = _merge_shards(shards, model)
    missing = names - set(full)
    if missing:
        raise ConfigError(f"checkpoint {ckpt} lacks {sorted(missing)[:5]} ...")
    bad = [name for name in sorted(names) if not bool(torch.isfinite(full[name]).all())]
    if bad:
        raise ConfigError(
            f"checkpoint {ckpt} holds non-finite (NaN / inf) weights in {len(bad)} tensors "
            f"({', '.join(bad[:3])}{', ...' if len(bad) > 3 else ''}); decode from an earlier "
            "checkpoint (pass its step_NNNNNN folder)"
        )
    model.load_state_dict(_slice_for_rank(full, model), strict=False)
    model = model.to(device or default_device(), DTYPES[dtype]).eval()
    return LoadedRun(model, run_dir / "tokenizer.json", recipe, ckpt)


def _zero3_state_dict(ckpt: Path) -> dict[str, torch.Tensor]:
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    if len(list(ckpt.glob("zero_pp_rank_*_mp_rank_01_*"))):
        raise ConfigError(f"{ckpt}: ZeRO-3 checkpoints with TP > 1 cannot be merged here")
    return get_fp32_state_dict_from_zero_checkpoint(str(ckpt.parent), tag=ckpt.name)
