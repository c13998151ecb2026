"""Training FLOPs per token, counted from the model itself, and the dense peak of a GPU.

The count runs one forward + backward of the real model on the ``meta`` device under torch's
``FlopCounterMode``: every matmul the step issues is counted from its shapes (trunk layers, each
MTP head's layer and projection, every application of a shared head and of the output layer),
and nothing else, so the embedding lookup counts zero. Attention scores and values are counted
over the full sequence (as PaLM's and Megatron's MFU do), not halved for causality.
Activation-checkpointing recompute is not counted: the figure is model FLOPs (MFU), not
hardware FLOPs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mtp_megatron.config import ModelConfig

PEAK_BF16_TFLOPS = (
    ("H100 NVL", 835.0),
    ("H100 PCIe", 756.0),
    ("GH200", 989.0),
    ("H200", 989.0),
    ("H100", 989.0),  # SXM ("NVIDIA H100 80GB HBM3")
    ("A100", 312.0),
)
"""Dense bf16 peak by GPU name (first match wins, so the specific names come first)."""


@dataclass(frozen=True)
class ModelFlops:
    """FLOPs of one training token (forward + backward) at one sequence length."""

    per_token: float
    """All counted FLOPs per token."""
    attention_per_token: float
    """Of which attention scores and values (batched matmuls)."""
    params: int
    """Parameters of the model (embedding included)."""
    embedding_params: int
    """Of which the input embedding (no FLOPs)."""


def model_flops(cfg: ModelConfig, seq_len: int) -> ModelFlops:
    """Count one [1, seq_len] training step of ``cfg`` (TP=1) on the meta device."""
    from torch.utils.flop_counter import FlopCounterMode

    from mtp_megatron.model import build_model
    from mtp_megatron.parallel import ensure_parallel_initialized

    ensure_parallel_initialized()
    with torch.device("meta"):
        model = build_model(cfg)
    ids = torch.zeros(1, seq_len, dtype=torch.long, device="meta")
    counter = FlopCounterMode(display=False)
    with counter:
        model(ids, return_logits=False).loss.backward()
    counts = counter.get_flop_counts()["Global"]
    attention = sum(v for op, v in counts.items() if "bmm" in str(op) or "attention" in str(op))
    embedding = sum(p.numel() for p in model.trunk.embedding.parameters())
    return ModelFlops(
        per_token=counter.get_total_flops() / seq_len,
        attention_per_token=attention / seq_len,
        params=sum(p.numel() for p in model.parameters()),
        embedding_params=embedding,
    )


def peak_tflops(device_name: str) -> float | None:
    """Dense bf16 TFLOP/s of a GPU by its name, or None when not in the table."""
    return next((peak for key, peak in PEAK_BF16_TFLOPS if key in device_name), None)
