"""Load a consolidated run for inference: ``model.safetensors`` + recipe + tokenizer -> MTPModel.

Reads only the consolidated format (``mtp_megatron/consolidated.py``: the TP=1 master state
dict), never DeepSpeed's checkpoint files: the end of training writes it into the run
directory, and ``python -m mtp_megatron consolidate`` writes it for any checkpoint (any TP / PP /
ZeRO stage). The model is built for the current TP size and each rank keeps its slice; at TP=1
on the ``local`` backend (plain torch layers laid out for batch-1 decoding, ``model/specs.py``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from mtp_megatron import consolidated
from mtp_megatron.config import ConfigError, ModelConfig
from mtp_megatron.model import MTPModel, build_model
from mtp_megatron.model.specs import Backend
from mtp_megatron.parallel.sharding import partitions, shard_state_dict


@dataclass
class LoadedRun:
    """A trained model ready for decoding."""

    model: MTPModel
    """The model (eval mode), weights from the consolidated folder."""
    model_config: ModelConfig
    """What the model was built from (the recipe's ``model`` section)."""
    recipe: dict
    """The run's resolved recipe, as a plain dict (``recipe.yaml``)."""
    folder: Path
    """The consolidated folder that was loaded (results of benchmarks go here)."""
    metadata: dict[str, str]
    """The weights' metadata: step, source checkpoint, TensorBoard folder."""

    @property
    def tokenizer_path(self) -> Path:
        return self.folder / consolidated.TOKENIZER_FILE


DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
"""Decoding precisions: fp32 (the default: exact greedy equality with plain decoding) or bf16
(faster on a GPU; the verification's batched matmuls round unlike one-token steps, so a
near-tied greedy token may differ from plain bf16 decoding)."""


def load_run(
    path: str | Path,
    device: torch.device | None = None,
    dtype: str = "fp32",
    backend: Backend | None = None,
) -> LoadedRun:
    """Build the model of the consolidated folder ``path`` (a finished run's directory, or what
    ``consolidate`` wrote) for the current TP size, in ``dtype`` ('fp32' or 'bf16'), on
    ``backend`` (default: 'local' at TP=1, 'megatron' at TP > 1)."""
    if dtype not in DTYPES:
        raise ConfigError(f"dtype={dtype!r} is invalid: one of {sorted(DTYPES)}")
    from mtp_megatron.parallel import (
        default_device,
        ensure_parallel_initialized,
        tensor_parallel_group,
    )

    folder = Path(path).resolve()
    if not consolidated.is_consolidated(folder):
        raise ConfigError(
            f"{folder} holds no consolidated model ({consolidated.WEIGHTS_FILE}, "
            f"{consolidated.RECIPE_FILE}, {consolidated.TOKENIZER_FILE}); write one with "
            f"`python -m mtp_megatron consolidate {folder}` (any run directory or checkpoint)"
        )
    cfg = consolidated.read_model_config(folder)
    master, metadata = consolidated.load_weights(folder)
    bad = consolidated.non_finite_tensors(master)
    if bad:
        raise ConfigError(
            f"{folder / consolidated.WEIGHTS_FILE} holds non-finite (NaN / inf) weights in "
            f"{len(bad)} tensors ({', '.join(bad[:3])}); consolidate an earlier checkpoint"
        )
    ensure_parallel_initialized()
    group = tensor_parallel_group()
    if backend is None:
        backend = "local" if group.size() == 1 else "megatron"
    torch.manual_seed(0)
    model = build_model(cfg, backend=backend)
    tensors = {n for n, t in model.state_dict().items() if torch.is_tensor(t)}  # no _extra_state
    missing = sorted(tensors - set(master))
    if missing:
        raise ConfigError(f"{folder / consolidated.WEIGHTS_FILE} lacks {missing[:5]} ...")
    local = shard_state_dict(master, partitions(model), dist.get_rank(group), group.size())
    model.load_state_dict(local, strict=False)  # megatron's _extra_state entries are None
    model = model.to(device or default_device(), DTYPES[dtype]).eval()
    recipe = consolidated.read_recipe(folder)
    return LoadedRun(model, cfg, recipe, folder, metadata)
