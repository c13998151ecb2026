"""Pipeline checkpoints -> MTPModel state dicts (for decoding a PP>1 run in one process).

DeepSpeed's pipeline engine saves module weights per pipeline layer and tensor-parallel rank:
``layer_XX-model_YY-model_states.pt`` (XX: the layer's index in the pipeline's layer list, YY:
the TP rank), each the state dict of that layer's module. Renaming their keys by the table in
``train/pipeline_layout.py`` (``trunk.layers.{XX-1}.*`` for decoder layer XX, ...) gives one
MTPModel state dict per TP rank, which ``decoding/load.py`` merges and re-slices as it does for a
checkpoint trained without PP. This module does not import DeepSpeed.
"""

from __future__ import annotations

import re
from collections import defaultdict
from pathlib import Path

import torch

from mtp_megatron.train.pipeline_layout import model_key

LAYER_FILE = re.compile(r"^layer_(\d+)-model_(\d+)-model_states\.pt$")


def is_pipeline_checkpoint(ckpt: Path) -> bool:
    """True when ``ckpt`` (a step folder) was written by DeepSpeed's pipeline engine."""
    return any(LAYER_FILE.match(p.name) for p in ckpt.glob("layer_*-model_states.pt"))


def pipeline_state_dicts(ckpt: Path, num_layers: int) -> list[dict[str, torch.Tensor]]:
    """One state dict per TP rank, in MTPModel names, from the layer files of ``ckpt``."""
    per_rank: dict[int, dict[str, torch.Tensor]] = defaultdict(dict)
    for path in sorted(ckpt.glob("layer_*-model_states.pt")):
        m = LAYER_FILE.match(path.name)
        if m is None:
            continue
        layer, tp_rank = int(m.group(1)), int(m.group(2))
        state = torch.load(path, map_location="cpu", weights_only=False)
        for key, value in state.items():
            if torch.is_tensor(value):
                per_rank[tp_rank][model_key(layer, key, num_layers)] = value
    if not per_rank:
        raise FileNotFoundError(f"no pipeline layer files (layer_XX-model_YY-*) in {ckpt}")
    ranks = sorted(per_rank)
    if ranks != list(range(len(ranks))):
        raise FileNotFoundError(
            f"{ckpt}: layer files for TP ranks {ranks}, expected 0..{len(ranks) - 1}"
        )
    return [per_rank[r] for r in ranks]
