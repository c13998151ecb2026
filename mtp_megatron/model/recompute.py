"""Activation checkpointing: keep a block's inputs, recompute the rest in backward.

torch's non-reentrant ``checkpoint`` works on CPU and GPU alike and keeps the autograd graph of
the block (recomputation only refills its saved tensors), so every parameter still receives its
gradient once, inside the ordinary backward pass. Megatron's ``tensor_parallel.checkpoint`` would
also restore megatron's model-parallel CUDA RNG states, but it calls ``torch.cuda`` and fails on a
CPU; our layers have no dropout, so there is no RNG state for the recomputation to reproduce
beyond torch's default generators, which ``checkpoint`` restores itself.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch.utils.checkpoint import checkpoint


def checkpointed(fn: Callable[..., torch.Tensor], *args, enabled: bool = True) -> torch.Tensor:
    """``fn(*args)``, keeping only the inputs for backward when ``enabled`` and grad mode is on."""
    if not (enabled and torch.is_grad_enabled()):
        return fn(*args)
    return checkpoint(fn, *args, use_reentrant=False)
