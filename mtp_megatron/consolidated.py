"""The consolidated model: the one format inference, export and evaluation read.

A folder (the run directory, or one written by ``python -m mtp_megatron consolidate``) holding

- ``model.safetensors``: the model's state dict in the TP=1 master layout (parameters and
  persistent buffers, as ``MTPModel.state_dict()`` names them), with metadata: this format's
  version, the training step, and the checkpoint it came from;
- ``recipe.yaml``: the resolved recipe of the run (its ``model`` section builds the model);
- ``tokenizer.json``: the run's tokenizer.

DeepSpeed's checkpoints (any TP / PP / ZeRO stage) stay the training format; only
``train/consolidate.py`` reads them. This module needs neither torch.distributed nor DeepSpeed.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
import yaml

from mtp_megatron.config import ConfigError, ModelConfig, from_dict

WEIGHTS_FILE = "model.safetensors"
RECIPE_FILE = "recipe.yaml"
TOKENIZER_FILE = "tokenizer.json"
FORMAT = "mtp-megatron-consolidated/1"
"""``format`` in the weights' metadata; a reader refuses other values."""


def non_finite_tensors(state_dict: dict[str, torch.Tensor]) -> list[str]:
    """Sorted names of the floating-point tensors holding a NaN or inf (weights that must
    never be written or loaded)."""
    return sorted(
        n for n, t in state_dict.items() if t.is_floating_point() and not bool(t.isfinite().all())
    )


def is_consolidated(folder: str | Path) -> bool:
    folder = Path(folder)
    return all((folder / f).is_file() for f in (WEIGHTS_FILE, RECIPE_FILE, TOKENIZER_FILE))


def save_weights(
    folder: str | Path, state_dict: dict[str, torch.Tensor], metadata: dict[str, str]
) -> Path:
    """Write ``model.safetensors`` atomically (a temporary file, fsynced, then renamed)."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / WEIGHTS_FILE
    tmp = folder / f".{WEIGHTS_FILE}.tmp"
    tensors = {k: v.detach().cpu().contiguous() for k, v in state_dict.items()}
    save_file(tensors, str(tmp), metadata={"format": FORMAT, **metadata})
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return path


def _open(folder: str | Path, read_tensors: bool):
    from safetensors import safe_open

    path = Path(folder) / WEIGHTS_FILE
    if not path.is_file():
        raise ConfigError(
            f"{path} is missing: consolidate the run's checkpoint first "
            f"(python -m mtp_megatron consolidate {Path(folder)})"
        )
    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata() or {}
        if metadata.get("format") != FORMAT:
            raise ConfigError(
                f"{path} is not an mtp-megatron consolidated model (format "
                f"{metadata.get('format')!r}, expected {FORMAT!r})"
            )
        tensors = {k: f.get_tensor(k) for k in f.keys()} if read_tensors else {}
    return tensors, metadata


def load_weights(folder: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(state dict on the CPU, metadata) of a consolidated folder."""
    return _open(folder, read_tensors=True)


def load_metadata(folder: str | Path) -> dict[str, str]:
    """The weights' metadata (format, step, source checkpoint) without reading the tensors."""
    return _open(folder, read_tensors=False)[1]


def read_recipe(folder: str | Path) -> dict:
    """The resolved recipe (a plain dict) of a run directory or consolidated folder."""
    path = Path(folder) / RECIPE_FILE
    if not path.is_file():
        raise ConfigError(f"{path} is missing: is {Path(folder)} a run directory?")
    data = yaml.safe_load(path.read_text())
    if not isinstance(data, dict):
        raise ConfigError(f"{path} is not a recipe (a mapping at the top level)")
    return data


def read_model_config(folder: str | Path) -> ModelConfig:
    """The ``ModelConfig`` the weights of ``folder`` were trained with."""
    return from_dict(ModelConfig, read_recipe(folder).get("model") or {}, "model")
