"""One tolerance rule for results computed in another fp32 operation order (TP, PP, another
reference implementation, another machine's BLAS kernels).

Reordered fp32 sums differ by rounding of the *largest terms summed*, not of each result: an
element that is a small difference of large terms (a gradient entry near zero) carries an
absolute error set by the whole tensor's scale, and how many such elements land outside an
element-wise tolerance depends on the kernels (block sizes, FMA, vector width) of the machine.
So every comparison is element-wise against ``rtol x max|expected|``: with fp32's 1.2e-7
epsilon and sums of 10^2-10^4 terms, rounding stays ~1e-6 of the scale on any CPU, while a
wiring mistake (a missing all-reduce, a wrong shard, a misplaced norm) moves elements by a
sizeable fraction of it.
"""

from __future__ import annotations

import torch

GRAD_RTOL = 1e-4
"""Gradients: up to ~10^4-term sums, then backward through several layers (x10 margin)."""
VALUE_RTOL = 1e-5
"""Losses and logits: one forward, rounding ~1e-6 relative."""


def assert_close_to_scale(actual, expected, rtol: float = GRAD_RTOL, msg: str = "") -> None:
    """|actual - expected| <= rtol x max|expected| element-wise (shapes and dtypes equal)."""
    expected = torch.as_tensor(expected)
    actual = torch.as_tensor(actual)
    scale = expected.abs().max().item() if expected.numel() else 0.0
    atol = rtol * max(scale, torch.finfo(torch.float32).tiny)
    torch.testing.assert_close(
        actual, expected, rtol=0.0, atol=atol, msg=(lambda m: f"{msg}: {m}") if msg else None
    )
