"""Process groups and device-agnostic collectives for tensor / pipeline / data parallelism.

``parallel.dims`` (the layout arithmetic) is torch-free, for recipe checks; the groups and
collectives import torch and megatron-core, so they load on first use (PEP 562).
"""

from mtp_megatron.parallel.dims import ParallelDims

_LAZY = {
    "gather_last_dim": "collectives",
    "scatter_last_dim": "collectives",
    "vocab_parallel_argmax": "collectives",
    "ParallelLayout": "state",
    "current_layout": "state",
    "default_device": "state",
    "default_process_count": "state",
    "destroy_parallel": "state",
    "ensure_parallel_initialized": "state",
    "initialize_parallel": "state",
    "tensor_parallel_group": "state",
    "to_device": "state",
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f"mtp_megatron.parallel.{_LAZY[name]}"), name)
    raise AttributeError(f"module 'mtp_megatron.parallel' has no attribute {name!r}")


__all__ = ["ParallelDims", *_LAZY]
