"""Activation checkpointing: keep a block's inputs, recompute the rest in backward.

Two forms, both torch's non-reentrant ``checkpoint``:

- :func:`checkpointed` for one call (the sequential MTP schedule recomputes each step's head);
- :func:`set_activation_checkpointing` for every call of some modules from now on, applied from
  outside the modules' code: each module's class is swapped for a subclass whose ``__call__``
  (hooks included, so a ZeRO-3 gather is redone too) runs under ``checkpoint``, as torch's FSDP2
  ``fully_shard`` attaches its behaviour. Parameter names, state dicts and the module tree stay
  as they were, and it can be undone.

A module whose forward reads state besides its arguments (an ETD think layer reads the routing
weights of its iteration) sets ``recompute_context``: a callable, called at each forward, that
returns a context manager which the recomputation runs inside (it reinstates that state).

The non-reentrant form works on CPU and GPU alike and keeps the block's autograd graph
(recomputation only refills its saved tensors), so every parameter still receives its gradient
once, inside the ordinary backward pass. Megatron's ``tensor_parallel.checkpoint`` would also
restore megatron's model-parallel CUDA RNG states, but it calls ``torch.cuda`` and fails on a
CPU; our layers have no dropout, so there is no RNG state to reproduce beyond torch's default
generators, which ``checkpoint`` restores itself.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from contextlib import nullcontext

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint


def checkpointed(fn: Callable[..., torch.Tensor], *args, enabled: bool = True) -> torch.Tensor:
    """``fn(*args)``, keeping only the inputs for backward when ``enabled`` and grad mode is on."""
    if not (enabled and torch.is_grad_enabled()):
        return fn(*args)
    return checkpoint(fn, *args, use_reentrant=False)


class ActivationCheckpointed:
    """Mixin of the swapped-in classes: every call with grad enabled is checkpointed."""

    def __call__(self, *args, **kwargs):
        call = super().__call__
        if not torch.is_grad_enabled():  # evaluation, decoding: nothing to recompute
            return call(*args, **kwargs)
        replay = getattr(self, "recompute_context", None)

        def contexts():
            return nullcontext(), (replay() if replay is not None else nullcontext())

        return checkpoint(call, *args, use_reentrant=False, context_fn=contexts, **kwargs)


_SUBCLASSES: dict[type, type] = {}


def _checkpointed_class(cls: type) -> type:
    if cls not in _SUBCLASSES:
        name = f"ActivationCheckpointed{cls.__name__}"
        _SUBCLASSES[cls] = type(name, (ActivationCheckpointed, cls), {"__module__": cls.__module__})
    return _SUBCLASSES[cls]


def is_checkpointed(module: nn.Module) -> bool:
    return isinstance(module, ActivationCheckpointed)


def set_activation_checkpointing(modules: Iterable[nn.Module], enabled: bool) -> None:
    """Checkpoint every later call of each of ``modules`` (``enabled``), or stop doing so."""
    for module in modules:
        cls = type(module)
        if enabled and not is_checkpointed(module):
            module.__class__ = _checkpointed_class(cls)
        elif not enabled and is_checkpointed(module):
            module.__class__ = next(c for c in cls.__mro__[1:] if c is not ActivationCheckpointed)
