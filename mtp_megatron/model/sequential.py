"""Meta's sequential MTP loss: one step's logits alive at a time, the same losses and gradients.

Notation: b batch, s sequence, h hidden, V padded vocabulary, p tensor-parallel size, K steps,
W the output layer's weight shard [V/p, h].

The plain forward keeps every step's logits until backward (megatron's vocab-parallel CE saves
its softmax, [b, s, V/p], in place of them): K + 1 such tensors at the peak. Here the forward pass,
for k = 1..K (the caller runs the steps' heads under activation checkpointing, so only each
step's inputs are kept and its head is recomputed in backward):

1. logits_k and CE_k are computed from a detached copy of h^k and differentiated at once
   (``torch.autograd.grad`` with upstream 1): g_k = dCE_k/dh^k [b, s, h] and dCE_k/dW. The logits
   are gone before step k + 1 starts.
2. CE_k enters the loss through :class:`_PrecomputedGradient`, whose value is CE_k and whose
   backward sends upstream * g_k to h^k.

Why it is exact: CE_k depends on h^k and W only, and its gradient is linear in the upstream
scalar, so the unit-upstream gradient scaled by whatever backward brings (alpha_k, w, DeepSpeed's
1/grad_accum, a loss scale) is the plain path's gradient, up to the order of fp roundings. The
dCE_k/dW are summed (times alpha_k) and attached to W itself: a zero-valued term whose backward
sends c * sum to W (c the upstream scalar), so W's gradient arrives inside the ordinary backward
pass (DeepSpeed's gradient hooks and loss scaling see one normal backward per micro-batch) at no
extra matmul. A ZeRO-3 partitioned W is an empty placeholder outside its module's call (the
training engine sets ``trunk.weights_gathered_per_call``), so there
the sum reaches W through one more call of the output layer, on the identity: output_layer(I_h) =
W^T, whose backward with upstream c * sum^T adds exactly c * sum (ZeRO-3 gathers W for that call
as for any other). That costs one [h, h] x [h, V/p] matmul each way per micro-batch, so it is
kept to the partitioned case. For chained heads, step
k's backward needs dL/dh^k from the later steps: the autograd engine runs the steps' recomputed
backwards from K down to 1, one step's head activations at a time.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from mtp_megatron.model.loss import masked_cross_entropy, step_targets
from mtp_megatron.model.trunk import DecoderTrunk


class _PrecomputedGradient(torch.autograd.Function):
    """Forward: ``value`` (a loss computed off the graph). Backward: upstream * ``grad`` into
    ``x``, the tensor the loss was computed from."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, value: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(grad)
        return value.clone()

    @staticmethod
    def backward(ctx, upstream: torch.Tensor):
        (grad,) = ctx.saved_tensors
        return grad * upstream, None, None


def _attach(x: torch.Tensor, value: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """``value`` whose gradient with respect to ``x`` is ``grad`` (per unit of upstream)."""
    return _PrecomputedGradient.apply(x, value, grad)


def _score(
    trunk: DecoderTrunk, hidden: torch.Tensor, targets: torch.Tensor, output_grad: bool = True
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(CE, dCE/dhidden [b, s, h], dCE/dW [V/p, h] or None) of one step; its logits are freed on
    return. Under TP the hidden gradient is all-reduced by the output layer's backward.
    ``output_grad=False``: no gradient for the output weight (detached heads)."""
    leaf = hidden.detach().requires_grad_(True)
    weight = trunk.output_weight
    wrt = [leaf, weight] if weight.requires_grad and output_grad else [leaf]
    with torch.enable_grad():
        # logits [b, s, V/p] live only here; megatron's CE may overwrite them (nothing reads them)
        ce = masked_cross_entropy(
            trunk.logits(leaf, detach_weight=not output_grad), targets, inplace=True
        )
    grads = torch.autograd.grad(ce, wrt)
    return ce.detach(), grads[0], grads[1] if len(grads) > 1 else None


def sequential_mtp_loss(
    trunk: DecoderTrunk,
    steps: Iterable[tuple[int, torch.Tensor]],
    labels: torch.Tensor,
    step_weights: list[float],
    output_grad: bool = True,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """(sum_k alpha_k CE_k, {'mtp_step_k': CE_k}) over ``steps`` (pairs (k, normalised h^k)).

    Same values as the plain loop, and the same gradients once backpropagated (with
    ``output_grad=False`` none for the output weight, as the plain loop's detached heads).
    """
    mtp_loss = torch.zeros((), device=labels.device)
    step_losses: dict[str, torch.Tensor] = {}
    weight_grad: torch.Tensor | None = None  # sum_k alpha_k dCE_k/dW [V/p, h], fp32
    for k, hidden_k in steps:
        alpha = step_weights[k - 1]
        ce, hidden_grad, w_grad = _score(trunk, hidden_k, step_targets(labels, k), output_grad)
        mtp_loss = mtp_loss + alpha * _attach(hidden_k, ce, hidden_grad)
        step_losses[f"mtp_step_{k}"] = ce
        if w_grad is not None:
            if weight_grad is None:
                weight_grad = w_grad.float() * alpha
            else:
                weight_grad.add_(w_grad, alpha=alpha)
    if weight_grad is not None:
        # + 0: the value stays the plain path's, bit for bit
        mtp_loss = mtp_loss + _attach_weight_grad(trunk, weight_grad, mtp_loss)
    return mtp_loss, step_losses


def _attach_weight_grad(
    trunk: DecoderTrunk, weight_grad: torch.Tensor, like: torch.Tensor
) -> torch.Tensor:
    """A zero scalar whose backward adds upstream * ``weight_grad`` [V/p, h] to W's gradient."""
    zero = torch.zeros((), device=like.device, dtype=like.dtype)
    weight = trunk.output_weight
    # (a placeholder of another shape: partitioned by an engine that did not say so)
    if not trunk.weights_gathered_per_call and weight.shape == weight_grad.shape:
        return _attach(weight, zero, weight_grad.to(weight.dtype))
    h = weight_grad.shape[1]
    eye = torch.eye(h, dtype=weight.dtype, device=weight_grad.device)
    w_t = trunk.logits(eye.unsqueeze(0))  # W^T [1, h, V/p]: megatron's linear wants 3-d input
    grad_t = weight_grad.t().unsqueeze(0).to(w_t.dtype)  # [1, h, V/p]
    return _attach(w_t, zero, grad_t)
