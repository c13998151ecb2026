"""Process groups: torch.distributed + megatron-core parallel_state, on CPU (gloo) or GPU (NCCL).

Megatron's tensor-parallel layers read their process group from ``parallel_state`` even in a single
process, so every entry point (training, decoding, tests, a user's notebook) goes through
:func:`initialize_parallel`. Under ``torchrun`` the world comes from the environment; in a plain
``python`` process a world of one is created on a private loopback port.
"""

from __future__ import annotations

import datetime
import os
import socket
from dataclasses import dataclass

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from mtp_megatron.config import ConfigError
from mtp_megatron.parallel.dims import ParallelDims


@dataclass(frozen=True)
class ParallelLayout:
    """The ranks of this process in each parallel dimension (world = PP x TP x DP)."""

    world_size: int
    """Number of processes in the job."""
    rank: int
    """Global rank of this process."""
    tensor_parallel_size: int
    """Processes that shard one layer's weights (Megatron TP)."""
    tensor_parallel_rank: int
    """This process's index inside its tensor-parallel group."""
    pipeline_parallel_size: int
    """Pipeline stages."""
    pipeline_parallel_rank: int
    """This process's stage."""
    data_parallel_size: int
    """Replicas that see different data (ZeRO shards over this group only)."""
    data_parallel_rank: int
    """This process's replica index."""
    device: torch.device
    """Device the model lives on."""

    @property
    def dims(self) -> ParallelDims:
        return ParallelDims(self.world_size, self.tensor_parallel_size, self.pipeline_parallel_size)

    def describe(self) -> str:
        return f"{self.dims.describe()} on {self.device.type}"


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


DEVICE_ENV = "MTP_DEVICE"
"""Environment switch: 'cpu' keeps everything on the CPU even where CUDA exists (the tests set
it); 'cuda' insists on a GPU; unset picks CUDA when available."""


def uses_cuda() -> bool:
    """Whether this process trains and decodes on CUDA (``MTP_DEVICE``, else availability)."""
    forced = os.environ.get(DEVICE_ENV, "").strip().lower()
    if forced not in ("", "cpu", "cuda"):
        raise ConfigError(f"{DEVICE_ENV}={forced!r} is invalid: 'cpu', 'cuda' or unset")
    if forced == "cuda" and not torch.cuda.is_available():
        raise ConfigError(
            f"{DEVICE_ENV}=cuda, but torch {torch.__version__} sees no CUDA device (a CPU build, "
            "or no driver): install the node's CUDA build of torch, or set "
            f"{DEVICE_ENV}=cpu to train on the CPU"
        )
    return forced != "cpu" and torch.cuda.is_available()


def default_device() -> torch.device:
    """This process's GPU (``LOCAL_RANK``) when CUDA is present and not switched off with
    ``MTP_DEVICE=cpu``; else the CPU."""
    if not uses_cuda():
        return torch.device("cpu")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    count = torch.cuda.device_count()
    if local_rank >= count:
        raise ConfigError(
            f"LOCAL_RANK={local_rank}, but this node has {count} GPU(s): launch at most {count} "
            f"processes per node (NPROC={count}), or set {DEVICE_ENV}=cpu to train on the CPU"
        )
    torch.cuda.set_device(local_rank)
    return torch.device("cuda", local_rank)


def default_process_count() -> int:
    """Processes to launch on this node by default: one per GPU, or 2 on the CPU."""
    return torch.cuda.device_count() if uses_cuda() and torch.cuda.device_count() > 0 else 2


def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host batch tensor on ``device`` without waiting for it: pinned, then copied
    asynchronously (a copy from pageable memory makes the host wait for the device's queue)."""
    if device.type == "cpu":
        return t
    return t.pin_memory().to(device, non_blocking=True)


def process_group_backend(device: torch.device) -> str:
    """gloo on the CPU; on a GPU NCCL for CUDA tensors *and* gloo for CPU ones, so that a CPU
    tensor reduced anywhere (megatron's groups inherit the default backend) still works."""
    return "cpu:gloo,cuda:nccl" if device.type == "cuda" else "gloo"


def initialize_parallel(
    tensor_parallel_size: int = 1,
    pipeline_parallel_size: int = 1,
    device: torch.device | None = None,
    timeout_s: float = 600.0,
) -> ParallelLayout:
    """Start torch.distributed (if needed) and megatron's model-parallel groups.

    Idempotent: a second call with the same sizes returns the current layout; a call with other
    sizes raises instead of silently keeping the old groups.
    """
    device = device or default_device()
    if not dist.is_initialized():
        backend = process_group_backend(device)
        timeout = datetime.timedelta(seconds=timeout_s)
        launched = all(k in os.environ for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR"))
        if launched:  # torchrun (a bare RANK may be inherited from a one-process parent)
            dist.init_process_group(backend=backend, timeout=timeout)
        else:  # a plain python process: a world of one
            # DeepSpeed reads torchrun's variables even in a single process
            for key, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1")):
                os.environ.setdefault(key, value)
            dist.init_process_group(
                backend=backend,
                init_method=f"tcp://127.0.0.1:{_free_port()}",
                rank=0,
                world_size=1,
                timeout=timeout,
            )
    ParallelDims(dist.get_world_size(), tensor_parallel_size, pipeline_parallel_size)
    if parallel_state.model_parallel_is_initialized():
        current = (
            parallel_state.get_tensor_model_parallel_world_size(),
            parallel_state.get_pipeline_model_parallel_world_size(),
        )
        if current != (tensor_parallel_size, pipeline_parallel_size):
            raise RuntimeError(
                f"model parallel groups already exist with (TP, PP) = {current}, "
                f"not {(tensor_parallel_size, pipeline_parallel_size)}; "
                "call destroy_parallel() first"
            )
    else:
        parallel_state.initialize_model_parallel(
            tensor_model_parallel_size=tensor_parallel_size,
            pipeline_model_parallel_size=pipeline_parallel_size,
            create_gloo_process_groups=False,
        )
    return current_layout(device)


def current_layout(device: torch.device | None = None) -> ParallelLayout:
    """The layout of the groups created by :func:`initialize_parallel`."""
    return ParallelLayout(
        world_size=dist.get_world_size(),
        rank=dist.get_rank(),
        tensor_parallel_size=parallel_state.get_tensor_model_parallel_world_size(),
        tensor_parallel_rank=parallel_state.get_tensor_model_parallel_rank(),
        pipeline_parallel_size=parallel_state.get_pipeline_model_parallel_world_size(),
        pipeline_parallel_rank=parallel_state.get_pipeline_model_parallel_rank(),
        data_parallel_size=parallel_state.get_data_parallel_world_size(),
        data_parallel_rank=parallel_state.get_data_parallel_rank(),
        device=device or default_device(),
    )


def ensure_parallel_initialized() -> None:
    """Create a one-process TP=1 world when nothing is initialized (notebooks, unit tests)."""
    if not (dist.is_initialized() and parallel_state.model_parallel_is_initialized()):
        initialize_parallel()


def tensor_parallel_group() -> dist.ProcessGroup:
    return parallel_state.get_tensor_model_parallel_group()


def destroy_parallel() -> None:
    """Tear down megatron's groups and the default process group."""
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()
