"""The ETD think block's two routers: which LoRA expert a token uses at an iteration (MoDr), and
whether a token stops thinking (adaptive depth).

Notation: b batch, s sequence, h hidden, E experts. Both routers read the token's own state at
the start of the iteration, RMS-normalised (no weight), so a decision depends on that token and,
through attention, on earlier ones only: the same in a full-sequence forward and in KV-cached
decoding. Their weights are small replicated tensors: every tensor-parallel rank sees the same
state and makes the same decision.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

HALT_BIAS_INIT = math.log(0.1 / 0.9)
"""Initial halting logit: p(halt) starts near 0.1, below any sensible threshold, so a new model
runs every iteration (the fixed-depth ETD) until the compute cost teaches it to stop."""


def _rms(x: torch.Tensor, eps: float) -> torch.Tensor:
    return F.rms_norm(x, (x.shape[-1],), None, eps)


class HaltingRouter(nn.Module):
    """p(halt) [b, s] = sigmoid(w . rms(x) + c) of each token before an iteration."""

    def __init__(self, hidden: int, init_std: float, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.empty(hidden))
        nn.init.normal_(self.weight, std=init_std)
        # shape [1], not []: DeepSpeed broadcasts parameters viewed as bytes, which a 0-dim can't be
        self.bias = nn.Parameter(torch.full((1,), HALT_BIAS_INIT))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logit = _rms(x, self.eps) @ self.weight.to(x.dtype) + self.bias.to(x.dtype)  # [b, s]
        return torch.sigmoid(logit.float())


class ExpertRouter(nn.Module):
    """Top-1 choice among E LoRA experts with auxiliary-loss-free load balancing (DeepSeek-V3).

    Scores are softmax(W rms(x)) [b, s, E]; the expert is argmax(score + expert_bias) and its gate
    is its score (the bias steers the choice only, so it does not bias the output). Training
    forwards record their load (:meth:`record_load`); once per optimizer step, after it,
    :meth:`update_bias` moves every bias by ``rate`` towards equal load of everything recorded
    since the last update (all micro-batches of the step: with gradient accumulation the bias is
    fixed within a step, as the weights are), outside autograd. The bias is a persistent
    buffer, so checkpoints carry it and a loaded model routes as it did in training.
    """

    def __init__(
        self,
        hidden: int,
        experts: int,
        init_std: float,
        eps: float,
        rate: float,
        dp_group: dist.ProcessGroup | None,
    ):
        super().__init__()
        self.eps, self.rate, self.dp_group = eps, rate, dp_group
        self.weight = nn.Parameter(torch.empty(experts, hidden))
        nn.init.normal_(self.weight, std=init_std)
        self.register_buffer("expert_bias", torch.zeros(experts))
        # fraction of the tokens (x iterations) each expert got in the last optimizer step
        self.register_buffer("expert_load", torch.full((experts,), 1.0 / experts), persistent=False)
        # tokens routed to each expert by the training forwards since the last update
        self.register_buffer("pending_counts", torch.zeros(experts), persistent=False)

    @property
    def num_experts(self) -> int:
        return self.weight.shape[0]

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x [b, s, h] -> (routing weights [b, s, E] in x's dtype: one-hot x gate,
        scores [b, s, E] fp32, chosen expert [b, s])."""
        scores = F.linear(_rms(x, self.eps), self.weight.to(x.dtype)).float().softmax(-1)
        choice = (scores.detach() + self.expert_bias).argmax(-1)  # [b, s]
        gate = scores.gather(-1, choice[..., None])  # [b, s, 1]
        weights = F.one_hot(choice, self.num_experts).to(gate.dtype) * gate
        return weights.to(x.dtype), scores, choice

    @torch.no_grad()
    def record_load(self, counts: torch.Tensor) -> None:
        """counts [E]: tokens routed to each expert by one training forward."""
        self.pending_counts += counts.float()

    @torch.no_grad()
    def update_bias(self) -> None:
        """Apply the recorded load (summed over the data-parallel group here, so every replica
        applies the same update and the biases stay identical); nothing recorded: no change."""
        counts = self.pending_counts.clone()
        self.pending_counts.zero_()
        if self.dp_group is not None and dist.get_world_size(self.dp_group) > 1:
            dist.all_reduce(counts, group=self.dp_group)
        if not bool(counts.sum() > 0):  # no training forward since the last update
            return
        load = counts / counts.sum()
        self.expert_load.copy_(load)
        self.expert_bias += self.rate * torch.sign(load.mean() - load)

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        # keep the bias in fp32 when the model is cast to bf16: steps of 1e-3 would round away
        self.expert_bias = self.expert_bias.float()
        self.expert_load = self.expert_load.float()
        self.pending_counts = self.pending_counts.float()
        return self
