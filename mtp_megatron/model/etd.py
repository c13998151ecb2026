"""Encode-Think-Decode (arXiv:2510.07358) on our decoder trunk: ``wrap_transformer_with_etd``.

Notation: b batch, s sequence, h hidden; N layers = n_enc + n_think + n_dec; k iterations.

The trunk's layers 0..n_enc-1 (encoder) run once, layers n_enc..n_enc+n_think-1 (think block) run
k times with the same weights, the rest (decoder) once; MTP heads read the decoder's output like
any trunk's. Optional, per the guide:

- LoRA experts (MoDr): E LoRA branches on every linear layer of the think block (``lora.py``), a
  router choosing one per token per iteration (top-1, auxiliary-loss-free balancing).
- Layer router (adaptive depth, per token). Before each iteration past ``min_think_iterations``,
  a token whose halting probability (``router.py``, from its own state) reaches the threshold
  stops for good: its state is carried through the remaining iterations unchanged,
  state_{t+1} = halted ? state_t : block(state_t). Every iteration still runs on every token, so
  every (layer, iteration) has keys and values for all tokens and later tokens attend to them
  as usual; a halted token's keys come from its carried state. The decision is a hard threshold
  in training, evaluation and decoding alike, and causal (a token's state depends on earlier
  tokens only), so KV-cached decoding computes exactly what the full forward computes. Training
  differentiates it straight-through: the forward value is the hard mix, the backward treats
  it as state_t + c_t (block(state_t) - state_t) with c_t the probability of still thinking, and
  the loss adds ``halting_cost`` x expected iterations, sum_t c_t (ACT / PonderNet's cost).

  Per token rather than per sequence: a per-sequence depth decided from the whole sequence
  would let a token's depth depend on later tokens (not causal: training and decoding would
  disagree), and one decided from the prompt alone would not be what training saw. The price of
  this choice is compute: halted tokens still run the think block (their keys and values are
  needed); the router changes what the model computes, not yet how much.

KV caches: one per layer application, numbered in execution order (encoder layers, then the
think layers of iteration 1, 2, ..., then the decoder layers): ``num_kv_caches`` of them.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import cast

import torch
from megatron.core import parallel_state
from torch import nn

from mtp_megatron.config import ETDConfig
from mtp_megatron.model.layers import TransformerLayer
from mtp_megatron.model.lora import ExpertRouting, add_lora_experts
from mtp_megatron.model.router import ExpertRouter, HaltingRouter
from mtp_megatron.model.trunk import DecoderTrunk


@dataclass
class ETDStats:
    """What the last forward's think block did (detached; for logging and tests)."""

    think_iterations: torch.Tensor
    """Iterations each token ran, [b, s] float (k everywhere without the layer router)."""
    halt_prob: torch.Tensor | None = None
    """Mean halting probability over tokens and routed iterations."""
    router_entropy: torch.Tensor | None = None
    """Mean entropy (nats) of the expert router's distribution over tokens and iterations."""
    expert_load: torch.Tensor | None = None
    """Fraction of token-iterations routed to each expert, [E]."""


class ETDTrunk(DecoderTrunk):
    """A DecoderTrunk whose layers run as encoder / k x think / decoder (see the module doc).

    It adopts the given trunk's modules under the same names (embedding, layers, final_norm,
    output_layer), so it keeps the trunk's interface and parameter names; the LoRA branches
    replace the think layers' linear modules in place.
    """

    def __init__(self, trunk: DecoderTrunk, etd: ETDConfig):
        nn.Module.__init__(self)  # adopts the trunk's modules instead of building new ones
        etd.validate(num_layers=len(trunk.layers))
        cfg = dataclasses.replace(trunk.cfg, etd=etd)
        self.cfg, self.ctx, self.etd = cfg, trunk.ctx, etd
        self.embedding = trunk.embedding
        self.rope = trunk.rope
        self.layers = trunk.layers
        self.final_norm = trunk.final_norm
        self.output_layer = trunk.output_layer
        self.weights_gathered_per_call = trunk.weights_gathered_per_call
        self.routing = ExpertRouting()
        self.halt_router = (
            HaltingRouter(cfg.hidden_size, cfg.init_std, cfg.norm_eps)
            if etd.use_layer_router
            else None
        )
        self.expert_router = None
        if etd.use_lora_experts:
            dp_group = parallel_state.get_data_parallel_group()
            self.expert_router = ExpertRouter(
                cfg.hidden_size,
                etd.num_lora_experts,
                cfg.init_std,
                cfg.norm_eps,
                etd.expert_bias_update_rate,
                dp_group,
            )
            for i in self.think_layers:
                layer = cast(TransformerLayer, self.layers[i])
                add_lora_experts(layer, self.ctx, etd, self.routing)
                # a checkpointed call's recomputation must see its own iteration's routing
                layer.recompute_context = self.routing.replay
        self.last_stats: ETDStats | None = None

    @property
    def think_layers(self) -> range:
        return range(self.etd.n_encoder_layers, self.etd.n_encoder_layers + self.etd.n_think_layers)

    @property
    def num_kv_caches(self) -> int:
        e = self.etd
        return e.n_encoder_layers + e.n_think_layers * e.max_think_iterations + e.n_decoder_layers

    def run_layers(
        self,
        hidden: torch.Tensor,
        positions: torch.Tensor,
        layers: range | None = None,
        kv_caches: list | None = None,
    ) -> torch.Tensor:
        """Apply the layers ``layers`` (default: all; a pipeline stage's slice) in ETD order to
        [b, s, h]. The slice must hold all of the think block or none of it."""
        return self._run(hidden, positions, layers, kv_caches)[0]

    def run_layers_with_cost(
        self, hidden: torch.Tensor, positions: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """All layers, and the depth cost halting_cost x expected think iterations of a
        training forward with the halting router (None otherwise): a term of the loss."""
        return self._run(hidden, positions, None, None)

    def after_optimizer_step(self) -> None:
        """Move the experts' routing bias by the load of the step's training forwards (all
        micro-batches, every data-parallel rank): one update per optimizer step."""
        if self.expert_router is not None:
            self.expert_router.update_bias()

    def _run(self, hidden, positions, layers, kv_caches):
        layers = layers if layers is not None else range(len(self.layers))
        think = self.think_layers
        inside = [i in layers for i in think]
        if any(inside) and not all(inside):
            raise ValueError(
                f"layers {layers} cut through the ETD think block (layers {think.start}.."
                f"{think.stop - 1}); a pipeline stage must hold all of it or none of it"
            )
        shift = (self.etd.max_think_iterations - 1) * len(think)  # decoder slots follow the loop
        cost = None
        for i in layers:
            if i < think.start:
                hidden = self._layer(i, i, hidden, positions, kv_caches)
        if all(inside):
            hidden, cost = self._think(hidden, positions, kv_caches)
        for i in layers:
            if i >= think.stop:
                hidden = self._layer(i, i + shift, hidden, positions, kv_caches)
        return hidden, cost

    # -- internals -------------------------------------------------------------------------------
    def _layer(self, i, slot, hidden, positions, kv_caches, route=None):
        kv_cache = kv_caches[slot] if kv_caches is not None else None
        with self.routing.use(route):  # None outside the think block: no LoRA branch
            return self.layers[i](hidden, self.rope, positions, kv_cache)

    def _think(self, hidden, positions, kv_caches):
        etd = self.etd
        think = self.think_layers
        train = self.training and torch.is_grad_enabled()
        state = hidden  # [b, s, h]
        running = None  # [b, s] bool: still thinking (None: every token, no router yet)
        still = None  # [b, s] probability of still thinking (differentiable)
        iterations = torch.zeros(hidden.shape[:2], device=hidden.device)
        expected = torch.zeros((), device=hidden.device)
        halt_probs, entropies, counts = [], [], None
        for it in range(etd.max_think_iterations):
            if self.halt_router is not None and it >= etd.min_think_iterations:
                p = self.halt_router(state)  # [b, s]
                go = p < etd.halt_threshold
                running = go if running is None else running & go
                still = 1 - p if still is None else still * (1 - p)
                expected = expected + still.mean()
                halt_probs.append(p.detach().mean())
            else:
                expected = expected + 1
            route = None
            if self.expert_router is not None:
                route, scores, choice = self.expert_router(state)
                entropies.append(-(scores * scores.clamp_min(1e-20).log()).sum(-1).mean().detach())
                n = torch.bincount(choice.flatten(), minlength=self.expert_router.num_experts)
                counts = n if counts is None else counts + n
            new = state
            for j, i in enumerate(think):
                slot = think.start + it * len(think) + j
                new = self._layer(i, slot, new, positions, kv_caches, route)
            if running is None:
                state = new
                iterations += 1
                continue
            mixed = torch.where(running[..., None], new, state)  # halted: carried unchanged
            if train:  # straight-through: value unchanged (+0), gradient through `still`
                mixed = mixed + (still - still.detach())[..., None].to(new.dtype) * (new - state)
            state = mixed
            iterations += running.float()
        if train and self.expert_router is not None:
            self.expert_router.record_load(counts)
        cost = etd.halting_cost * expected if train and self.halt_router is not None else None
        self.last_stats = ETDStats(
            think_iterations=iterations,
            halt_prob=torch.stack(halt_probs).mean() if halt_probs else None,
            router_entropy=torch.stack(entropies).mean() if entropies else None,
            expert_load=counts.float() / counts.sum() if counts is not None else None,
        )
        return state, cost


def wrap_transformer_with_etd(model: DecoderTrunk, cfg: ETDConfig) -> ETDTrunk:
    """Run ``model``'s layers as encoder / think block x k / decoder: the guide's entry point.

    Wrap the trunk before adding MTP heads: ``wrap_model_with_mtp(wrap_transformer_with_etd(
    trunk, etd), mtp)``. The result shares the trunk's modules (use it, not the trunk, from here).
    """
    if isinstance(getattr(model, "trunk", None), DecoderTrunk):  # an MTPModel
        raise TypeError(
            "wrap the trunk before adding MTP heads: "
            "wrap_model_with_mtp(wrap_transformer_with_etd(trunk, etd_config), mtp_config)"
        )
    if isinstance(model, ETDTrunk):
        raise TypeError("the trunk is already wrapped with ETD; change its config instead")
    if not isinstance(model, DecoderTrunk):
        raise TypeError(f"expected a DecoderTrunk, got {type(model).__name__}")
    return ETDTrunk(model, cfg)


def etd_metrics(model: nn.Module, prefix: str = "") -> dict[str, float]:
    """Logging scalars of the last forward of ``model`` (an MTPModel or a trunk); {} without ETD.

    '<prefix>etd_mean_think_iterations', 'etd_halt_prob', 'etd_router_entropy',
    'etd_expert_load_<e>' (e = 1..E).
    """
    trunk = getattr(model, "trunk", model)
    stats = getattr(trunk, "last_stats", None)
    if not isinstance(trunk, ETDTrunk) or stats is None:
        return {}
    out = {f"{prefix}etd_mean_think_iterations": float(stats.think_iterations.mean())}
    if stats.halt_prob is not None:
        out[f"{prefix}etd_halt_prob"] = float(stats.halt_prob)
    if stats.router_entropy is not None:
        out[f"{prefix}etd_router_entropy"] = float(stats.router_entropy)
    if stats.expert_load is not None:
        for e, load in enumerate(stats.expert_load.tolist(), start=1):
            out[f"{prefix}etd_expert_load_{e}"] = load
    return out
