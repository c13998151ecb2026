"""Process groups and device-agnostic collectives for tensor / pipeline / data parallelism."""

from mtp_megatron.parallel.collectives import (
    gather_last_dim,
    scatter_last_dim,
    vocab_parallel_argmax,
)
from mtp_megatron.parallel.state import (
    ParallelLayout,
    current_layout,
    default_device,
    default_process_count,
    destroy_parallel,
    ensure_parallel_initialized,
    initialize_parallel,
    tensor_parallel_group,
)

__all__ = [
    "ParallelLayout",
    "current_layout",
    "default_device",
    "default_process_count",
    "destroy_parallel",
    "ensure_parallel_initialized",
    "gather_last_dim",
    "initialize_parallel",
    "scatter_last_dim",
    "tensor_parallel_group",
    "vocab_parallel_argmax",
]
