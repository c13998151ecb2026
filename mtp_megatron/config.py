"""Typed configs for the model and its MTP heads, with one ``validate()`` each.

Every error names the field, the value it got and what would be valid, so that a bad recipe fails
before any process starts. ``from_dict`` builds a config tree from plain dicts (YAML), rejecting
unknown keys with the list of known ones.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field, replace
from typing import Any, Literal, TypeVar, get_args, get_origin, get_type_hints

HEAD_TYPES: dict[str, str] = {
    "transformer": "projection + one decoder layer (DeepSeek-V3's MTP module)",
    "mlp": "projection + a SwiGLU block",
    "linear": "projection + a Medusa-style residual block x + W2 SiLU(W1 x)",
    "shared_lm_head": "no parameters: the trunk's final norm and output layer",
}
"""The MTP head types a recipe may name: the builders live in ``model/heads.py``, which checks at
import that it builds exactly these. Named here, torch-free, so that recipes validate without
importing the model (megatron-core takes ~10 s to import)."""
PARAMETER_FREE_HEAD_TYPES = ("shared_lm_head",)
"""Head types without parameters of their own (they cannot be independent, see validate)."""
HeadTypeName = Literal[tuple(HEAD_TYPES)]  # type: ignore[valid-type]
HEAD_ARRANGEMENTS = ("chained", "independent")
WEIGHT_SCHEDULES = ("constant", "step", "linear_decay")
"""``model.mtp.weight_schedule``: how the MTP weight w moves over training."""
WeightScheduleName = Literal[WEIGHT_SCHEDULES]  # type: ignore[valid-type]
CURRICULA = ("none", "forward", "reverse")
"""``train.mtp.curriculum``: how many MTP steps train at each point of training."""
NORM_PLACEMENTS = ("post", "pre")
PIPELINE_PARTITIONS = ("uniform", "parameters")


class ConfigError(ValueError):
    """A config value that cannot work; the message says which field and what to change."""


def _fail(path: str, value: Any, allowed: str) -> None:
    raise ConfigError(f"{path}={value!r} is invalid: {allowed}")


def _is_int(value: Any) -> bool:
    """An integer, and not a bool (YAML's ``true`` is an int to Python)."""
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    """An int or a float, and not a bool."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


@dataclass
class MTPConfig:
    """Multi-token prediction heads (the user's guide ``MTPConfig``, plus the arrangement).

    Step k = 1..K predicts token t_{i+k+1} from position i, beyond the main head's t_{i+1}.
    Meta (arXiv:2404.19737) counts the main head too: their n = K + 1.
    """

    num_predict_tokens: int = 4
    """K: future tokens predicted beyond the next one (4 is the paper optimum)."""
    mtp_head_type: HeadTypeName = "transformer"
    """A key of ``HEAD_TYPES``: 'transformer', 'mlp', 'linear' or 'shared_lm_head'."""
    share_weights_across_steps: bool = True
    """FastMTP: one head module applied at every step instead of K separate ones."""
    loss_weight_decay: float = 0.5
    """beta: step k weighs alpha_k = beta^(k-1) / sum_j beta^(j-1)."""
    mtp_loss_weight: float = 0.5
    """w: loss = main + w * sum_k alpha_k CE_k."""
    speculation_lookahead: int = 3
    """Draft tokens proposed per step at inference (at most K)."""
    head_arrangement: Literal["chained", "independent"] = "chained"
    """'chained' (DeepSeek-V3: step k reads step k-1's hidden state and the embedding of t_{i+k})
    or 'independent' (Meta: every head reads the trunk output only)."""
    warmup_steps: int = 0
    """Linear warm-up of w from 0 over this many optimizer steps (0: the schedule's weight from
    step 0), before any schedule."""
    weight_schedule: WeightScheduleName = "constant"
    """w over training (logged as ``train/mtp_weight``): 'constant' (``mtp_loss_weight``; with
    ``warmup_steps``, the linear warm-up), 'step' (DeepSeek-V3: ``mtp_loss_weight`` until the
    switch, ``final_loss_weight`` after; their 0.3 -> 0.1 after 10T of 14.8T tokens) or
    'linear_decay' (``mtp_loss_weight`` at the end of the warm-up, falling linearly to
    ``final_loss_weight`` at the switch and staying there)."""
    final_loss_weight: float | None = None
    """w after the switch ('step') or at the end of the decay ('linear_decay')."""
    weight_switch_step: int | None = None
    """The optimizer step of the switch ('step': the first step at the final weight;
    'linear_decay': the step the decay reaches it), after the warm-up. Steps count from 0 (the
    updates already applied), as in ``mtp_weight``; TensorBoard plots step s's values at s + 1.
    Or give ``weight_switch_tokens``."""
    weight_switch_tokens: int | None = None
    """The switch in training tokens instead of steps: the trainer turns it into the first step
    at or past that many tokens (tokens per step = global batch x seq_len)."""

    def step_weights(self) -> list[float]:
        """alpha_1..alpha_K, normalised to sum to one."""
        raw = [self.loss_weight_decay ** (k - 1) for k in range(1, self.num_predict_tokens + 1)]
        total = sum(raw)
        return [r / total for r in raw]

    def step_weights_of(self, active: int) -> list[float]:
        """alpha_1..alpha_active, normalised over the ``active`` first steps (a curriculum's)."""
        raw = [self.loss_weight_decay ** (k - 1) for k in range(1, active + 1)]
        total = sum(raw)
        return [r / total for r in raw]

    def with_tokens_per_step(self, tokens_per_step: int) -> MTPConfig:
        """This config with ``weight_switch_tokens`` turned into ``weight_switch_step``."""
        if self.weight_switch_tokens is None:
            return self
        step = math.ceil(self.weight_switch_tokens / tokens_per_step)
        if step <= self.warmup_steps:
            raise ConfigError(
                f"mtp.weight_switch_tokens={self.weight_switch_tokens} is step {step} at "
                f"{tokens_per_step} tokens per step, within the MTP warm-up "
                f"(warmup_steps={self.warmup_steps}): move the switch later or shorten the warm-up"
            )
        return replace(self, weight_switch_step=step, weight_switch_tokens=None)

    def mtp_weight(self, step: int | None) -> float:
        """w at an optimizer step: the guide's ``get_mtp_weight`` (``None``: the full
        ``mtp_loss_weight``, no schedule), warm-up then ``weight_schedule``."""
        w0 = self.mtp_loss_weight
        if step is None:
            return w0
        step = max(step, 0)
        if self.weight_schedule != "constant":
            switch, w1 = self.weight_switch_step, self.final_loss_weight
            if switch is None:
                raise ConfigError(
                    "mtp.weight_switch_tokens is not turned into steps yet: call "
                    "MTPConfig.with_tokens_per_step (the trainer does) or give weight_switch_step"
                )
            if self.weight_schedule == "step":
                w0 = w0 if step < switch else w1
            else:  # linear_decay, from the end of the warm-up to the switch
                start = min(self.warmup_steps, switch)
                frac = 1.0 if switch <= start else min(max(step - start, 0) / (switch - start), 1)
                w0 = w0 + (w1 - w0) * frac
        if self.warmup_steps > 0 and step < self.warmup_steps:
            return w0 * step / self.warmup_steps
        return w0

    @property
    def recursive_drafts(self) -> bool:
        """Whether drafting may go past K: one chained head module for every step (shared, or
        K=1) reads its own previous state, so applying it again drafts one more token (vLLM's
        and FastMTP's recursion)."""
        one_module = self.share_weights_across_steps or self.num_predict_tokens == 1
        return self.head_arrangement == "chained" and one_module

    def _validate_weight_schedule(self, path: str) -> None:
        schedule = self.weight_schedule
        if schedule not in WEIGHT_SCHEDULES:
            _fail(f"{path}.weight_schedule", schedule, f"must be one of {WEIGHT_SCHEDULES}")
        extras = ("final_loss_weight", "weight_switch_step", "weight_switch_tokens")
        if schedule == "constant":
            for name in extras:
                if getattr(self, name) is not None:
                    _fail(
                        f"{path}.{name}",
                        getattr(self, name),
                        "is only read by weight_schedule 'step' or 'linear_decay' (this one is "
                        "'constant'); remove it or choose a schedule",
                    )
            return
        w1 = self.final_loss_weight
        if not _is_number(w1) or not 0 <= w1 < math.inf:
            _fail(
                f"{path}.final_loss_weight",
                w1,
                f"weight_schedule {schedule!r} needs the final weight: a number >= 0",
            )
        step, tokens = self.weight_switch_step, self.weight_switch_tokens
        if (step is None) == (tokens is None):
            _fail(
                f"{path}.weight_switch_step",
                step,
                f"weight_schedule {schedule!r} needs its switch: set exactly one of "
                "weight_switch_step (optimizer steps) and weight_switch_tokens",
            )
        for name, value in (("weight_switch_step", step), ("weight_switch_tokens", tokens)):
            if value is not None and (not _is_int(value) or value < 1):
                _fail(f"{path}.{name}", value, "must be an integer >= 1")
        if step is not None and step <= self.warmup_steps:
            _fail(
                f"{path}.weight_switch_step",
                step,
                f"must come after the warm-up (warmup_steps={self.warmup_steps}): at or before "
                f"its end, weight_schedule {schedule!r} would never use mtp_loss_weight at full "
                "strength; move the switch later or shorten the warm-up",
            )

    def validate(self, path: str = "mtp") -> None:
        k = self.num_predict_tokens
        if not isinstance(k, int) or k < 1:
            _fail(
                f"{path}.num_predict_tokens", k, "must be an integer >= 1 (use mtp: null for NTP)"
            )
        if self.mtp_head_type not in HEAD_TYPES:
            _fail(
                f"{path}.mtp_head_type", self.mtp_head_type, f"must be one of {tuple(HEAD_TYPES)}"
            )
        if self.head_arrangement not in HEAD_ARRANGEMENTS:
            _fail(
                f"{path}.head_arrangement",
                self.head_arrangement,
                f"must be one of {HEAD_ARRANGEMENTS}",
            )
        if not (isinstance(self.loss_weight_decay, (int, float)) and self.loss_weight_decay > 0):
            _fail(f"{path}.loss_weight_decay", self.loss_weight_decay, "beta must be > 0")
        w = self.mtp_loss_weight
        if not _is_number(w) or not 0 <= w < math.inf:
            _fail(f"{path}.mtp_loss_weight", w, "must be a finite number >= 0")
        if not isinstance(self.warmup_steps, int) or self.warmup_steps < 0:
            _fail(f"{path}.warmup_steps", self.warmup_steps, "must be an integer >= 0")
        self._validate_weight_schedule(path)
        la = self.speculation_lookahead
        if not isinstance(la, int) or la < 1 or (la > k and not self.recursive_drafts):
            _fail(
                f"{path}.speculation_lookahead",
                la,
                f"must be between 1 and num_predict_tokens ({k}): each draft token needs a head "
                "(only one chained head shared by every step, or K=1, drafts further by "
                "applying itself again)",
            )
        if self.head_arrangement == "independent":
            # An independent head sees only the trunk output h_i. Without parameters of its own, or
            # with one module shared by all steps, every step would compute the same logits.
            if self.mtp_head_type in PARAMETER_FREE_HEAD_TYPES:
                with_parameters = [t for t in HEAD_TYPES if t not in PARAMETER_FREE_HEAD_TYPES]
                _fail(
                    f"{path}.mtp_head_type",
                    self.mtp_head_type,
                    "independent heads read only the trunk output, so a parameter-free head would "
                    "reproduce the main head; use head_arrangement='chained' or a head with "
                    f"parameters ({', '.join(with_parameters)})",
                )
            if self.share_weights_across_steps and k > 1:
                _fail(
                    f"{path}.share_weights_across_steps",
                    True,
                    "independent heads that share one module all compute the same logits; set it "
                    "to false or use head_arrangement='chained' (FastMTP shares chained heads)",
                )


TRUNK_TRAINING = ("joint", "freeze_trunk", "detach_heads")
"""``train.mtp.trunk``: what trains the trunk of a model with MTP heads."""


@dataclass
class MTPTrainingConfig:
    """How a model with MTP heads trains (the user's guide ``MTPTrainingConfig``; recipes: the
    ``train.mtp`` section): what the MTP loss trains, and memory-saving schedules that leave the
    losses and gradients unchanged."""

    sequential_forward: bool = False
    """Meta's schedule (arXiv:2404.19737, section 2): the trunk runs once, then each MTP step's
    logits are made, scored and differentiated in turn, so that at most one step's logits
    [b, s, V/p] are alive (peak O(V + d) instead of O(K V + d)); each step's head is recomputed in
    backward. Gradients and logged losses equal the plain path's. No effect without MTP heads."""
    gradient_checkpointing: bool = False
    """Activation checkpointing (torch.utils.checkpoint, non-reentrant) of every trunk layer and
    every MTP step's head: only their inputs are kept, the rest is recomputed in backward."""

    trunk: str = "joint"
    """What trains the trunk: 'joint' (both losses; the default), 'freeze_trunk' (nothing: the
    trunk, its embedding and output layer get no gradient and no optimizer state, only the heads
    train; FastMTP's setting, megatron's --freeze-base-model-for-mtp), or 'detach_heads' (the
    main loss alone: the heads read the trunk's state, embeddings and output layer detached, so
    the MTP loss trains the heads only; megatron's mtp_detach_heads)."""
    distill_weight: float = 0.0
    """beta: step k's training loss is (1 - beta) CE(data) + beta CE(the main head's own
    distribution for the same token, without gradient), so the heads learn to agree with the
    verifier they draft for (FastMTP's self-distilled targets; 0: the data only). The logged and
    evaluated step losses stay the data CE. Memory: the main logits stay alive through the MTP
    steps, and each step keeps two more fp32 [b, s, V/p] tensors (its softmax terms) until
    backward; training was 20% slower on the demo. Not with sequential_forward."""
    curriculum: str = "none"
    """Which MTP steps train when (Aynetdinov & Akbik, arXiv:2505.22757): 'none' (all K
    throughout), 'forward' (start as next-token prediction and add one step per stage: K + 1
    equal stages over ``curriculum_steps``, the last with all K) or 'reverse' (start with all K
    and drop the furthest step per stage, ending as next-token prediction). Steps that do not
    train are not computed; the step weights are renormalised over those that do. Logged as
    ``train/mtp_active_steps``; evaluation scores every head."""
    curriculum_steps: int | None = None
    """Optimizer steps the curriculum's K + 1 stages span (None: the run's train.steps)."""

    def with_total_steps(self, total_steps: int) -> MTPTrainingConfig:
        """This config with the curriculum's span set (``total_steps`` when it is None)."""
        if self.curriculum == "none" or self.curriculum_steps is not None:
            return self
        return replace(self, curriculum_steps=total_steps)

    def active_steps(self, step: int | None, num_steps: int, total_steps: int | None) -> int:
        """MTP steps that train at optimizer step ``step`` (``None``: all, e.g. evaluation).

        ``total_steps``: the span when ``curriculum_steps`` is None."""
        if self.curriculum == "none" or step is None:
            return num_steps
        span = self.curriculum_steps or total_steps
        if span is None:
            raise ConfigError(
                f"train.mtp.curriculum={self.curriculum!r} needs its span: set "
                "train.mtp.curriculum_steps (the trainer uses train.steps)"
            )
        stage = min(num_steps, max(step, 0) * (num_steps + 1) // span)  # 0..K
        return stage if self.curriculum == "forward" else num_steps - stage

    def validate(self, path: str = "train.mtp") -> None:
        if self.trunk not in TRUNK_TRAINING:
            _fail(f"{path}.trunk", self.trunk, f"must be one of {TRUNK_TRAINING}")
        if self.curriculum not in CURRICULA:
            _fail(f"{path}.curriculum", self.curriculum, f"must be one of {CURRICULA}")
        span = self.curriculum_steps
        if span is not None and (not _is_int(span) or span < 1):
            _fail(f"{path}.curriculum_steps", span, "must be an integer >= 1 (or null)")
        if span is not None and self.curriculum == "none":
            _fail(
                f"{path}.curriculum_steps",
                span,
                "is only read by a curriculum (train.mtp.curriculum is 'none'); remove it or set "
                "curriculum: forward or reverse",
            )
        beta = self.distill_weight
        if not _is_number(beta) or not 0 <= beta <= 1:
            _fail(f"{path}.distill_weight", beta, "must be a number in [0, 1]")
        if beta and self.sequential_forward:
            _fail(
                f"{path}.distill_weight",
                beta,
                "is not supported with sequential_forward (which scores one step's logits at a "
                "time without the main head's); set one of them off",
            )
        for name in ("sequential_forward", "gradient_checkpointing"):
            value = getattr(self, name)
            if not isinstance(value, bool):
                _fail(f"{path}.{name}", value, "must be true or false")


@dataclass
class ETDConfig:
    """Encode-Think-Decode (arXiv:2510.07358): the trunk's layers split into an encoder run once,
    a think block run ``max_think_iterations`` times with the same weights, and a decoder run once
    (the user's guide ``ETDConfig``, plus MoDr LoRA experts and an adaptive-depth router)."""

    n_encoder_layers: int = 7
    """Layers run once before the think block (the guide's OLMo-2 1B split is 7/4/5)."""
    n_think_layers: int = 4
    """Layers of the think block, iterated with tied weights."""
    n_decoder_layers: int = 5
    """Layers run once after the think block; the three counts sum to model.num_layers."""
    max_think_iterations: int = 5
    """k: applications of the think block (1 with router and experts off = the plain trunk)."""
    use_layer_router: bool = True
    """Adaptive depth: a per-token router may halt a token before each iteration past
    ``min_think_iterations``; a halted token's state is carried forward unchanged."""
    use_lora_experts: bool = True
    """MoDr: LoRA branches on the think block's linear layers, one per token per iteration."""
    min_think_iterations: int = 1
    """Iterations every token runs before the depth router may halt it."""
    halt_threshold: float = 0.5
    """A token halts when its halting probability reaches this (the same rule in training,
    evaluation and decoding)."""
    halting_cost: float = 0.01
    """Weight of the compute cost added to the loss: halting_cost x expected think iterations."""
    num_lora_experts: int = 4
    """LoRA branches per think-block linear layer; the router picks one (top-1)."""
    lora_rank: int = 8
    """r of every LoRA branch."""
    lora_alpha: float = 16.0
    """LoRA scale alpha / r."""
    expert_bias_update_rate: float = 1e-3
    """gamma of the auxiliary-loss-free balancing (DeepSeek-V3): after each training forward,
    each expert's routing bias moves by gamma towards equal load."""

    def suggested_split(self, num_layers: int) -> tuple[int, int, int]:
        """The guide's 7/4/5 proportions scaled to ``num_layers`` (at least one think layer)."""
        enc = max(1, round(num_layers * 7 / 16)) if num_layers >= 3 else 0
        dec = max(1, round(num_layers * 5 / 16)) if num_layers >= 3 else 0
        return enc, num_layers - enc - dec, dec

    def validate(self, num_layers: int | None = None, path: str = "model.etd") -> None:
        counts = ("n_encoder_layers", "n_think_layers", "n_decoder_layers")
        for name in counts:
            value = getattr(self, name)
            if not _is_int(value) or value < 0:
                _fail(f"{path}.{name}", value, "must be an integer >= 0")
        if self.n_think_layers < 1:
            _fail(f"{path}.n_think_layers", self.n_think_layers, "the think block needs a layer")
        total = sum(getattr(self, name) for name in counts)
        if num_layers is not None and total != num_layers:
            enc, think, dec = self.suggested_split(num_layers)
            raise ConfigError(
                f"{path}: n_encoder_layers + n_think_layers + n_decoder_layers = "
                f"{self.n_encoder_layers} + {self.n_think_layers} + {self.n_decoder_layers} = "
                f"{total} is invalid: must equal model.num_layers ({num_layers}); e.g. "
                f"{enc}/{think}/{dec}, or measure one with `python -m mtp_megatron etd-split`"
            )
        k, k_min = self.max_think_iterations, self.min_think_iterations
        if not _is_int(k) or k < 1:
            _fail(f"{path}.max_think_iterations", k, "must be an integer >= 1")
        if not _is_int(k_min) or not 1 <= k_min <= k:
            _fail(f"{path}.min_think_iterations", k_min, f"must be between 1 and {k}")
        for name in ("use_layer_router", "use_lora_experts"):
            if not isinstance(getattr(self, name), bool):
                _fail(f"{path}.{name}", getattr(self, name), "must be true or false")
        if self.use_layer_router and k_min >= k:
            _fail(
                f"{path}.use_layer_router",
                True,
                f"the router has no iteration to skip (min_think_iterations={k_min}, "
                f"max_think_iterations={k}); raise max_think_iterations or turn the router off",
            )

        def number(name: str) -> float:
            value = getattr(self, name)
            if not _is_number(value):
                _fail(f"{path}.{name}", value, "must be a number")
            return value

        if not 0 < number("halt_threshold") < 1:
            _fail(f"{path}.halt_threshold", self.halt_threshold, "must be in (0, 1)")
        if number("halting_cost") < 0:
            _fail(f"{path}.halting_cost", self.halting_cost, "must be >= 0")
        for name in ("num_lora_experts", "lora_rank"):
            value = getattr(self, name)
            if not _is_int(value) or value < 1:
                _fail(f"{path}.{name}", value, "must be an integer >= 1")
        if number("lora_alpha") <= 0:
            _fail(f"{path}.lora_alpha", self.lora_alpha, "must be > 0")
        if number("expert_bias_update_rate") < 0:
            _fail(f"{path}.expert_bias_update_rate", self.expert_bias_update_rate, "must be >= 0")

    def validate_pipeline(
        self, num_layers: int, stages: int, partition: str = "uniform", path: str = "model.etd"
    ) -> None:
        """The think block must sit inside one stage of the uniform split of the layers (equal
        counts, the first N mod P stages one more: DeepSpeed's ``partition_uniform``, as
        ``train/pipeline_layout.py`` splits them): its iterations cannot cross a stage boundary."""
        if partition != "uniform":
            raise ConfigError(
                f"parallel.pipeline_partition={partition!r} is invalid with model.etd: the think "
                "block must sit inside one stage, which the recipe can only check for the "
                "'uniform' partition; use pipeline_partition: uniform"
            )
        chunk, rest = divmod(num_layers, stages)
        bounds = [s * chunk + min(s, rest) for s in range(stages + 1)]
        stage_of = [s for s in range(stages) for _ in range(bounds[s], bounds[s + 1])]
        think = self.n_think_layers
        first, last = self.n_encoder_layers, self.n_encoder_layers + think - 1
        if stage_of[first] == stage_of[last]:
            return
        fits = [bounds[s] for s in range(stages) if bounds[s + 1] - bounds[s] >= think]
        enc = min(fits, key=lambda b: abs(b - first)) if fits else 0
        hint = (
            f"e.g. the split {enc}/{think}/{num_layers - enc - think}"
            if fits
            else f"no stage holds {think} layers; use fewer think layers"
        )
        raise ConfigError(
            f"{path}: the think block (layers {first}..{last}) spans pipeline stages "
            f"{stage_of[first]} and {stage_of[last]} of the uniform split of {num_layers} layers "
            f"over pipeline_parallel_size={stages} (stage starts {bounds[:-1]}); it must sit "
            f"inside one stage: {hint}, or lower pipeline_parallel_size"
        )


@dataclass
class RopeScalingConfig:
    """Llama-3's RoPE frequency scaling (``rope_type: llama3``): wavelengths longer than the
    original context / low_freq_factor are divided by ``factor``, shorter than original /
    high_freq_factor kept, those between interpolated."""

    factor: float = 8.0
    """How much longer the context is than ``original_max_position_embeddings``."""
    low_freq_factor: float = 1.0
    """original / low_freq_factor: wavelengths above it are scaled by 1 / factor."""
    high_freq_factor: float = 4.0
    """original / high_freq_factor: wavelengths below it are left alone."""
    original_max_position_embeddings: int = 8192
    """The context the model was first trained at."""

    def validate(self, path: str = "model.rope_scaling") -> None:
        for name in ("factor", "low_freq_factor", "high_freq_factor"):
            value = getattr(self, name)
            if not _is_number(value) or value <= 0:
                _fail(f"{path}.{name}", value, "must be a number > 0")
        if self.high_freq_factor <= self.low_freq_factor:
            _fail(f"{path}.high_freq_factor", self.high_freq_factor, "must exceed low_freq_factor")
        n = self.original_max_position_embeddings
        if not _is_int(n) or n < 1:
            _fail(f"{path}.original_max_position_embeddings", n, "must be an integer >= 1")


@dataclass
class ModelConfig:
    """An OLMo-2-style decoder (RMSNorm, RoPE, SwiGLU, QK-norm, optional GQA) and its MTP heads."""

    vocab_size: int | None = 4096
    """Token ids the model embeds; None (the recipes' default): the data's tokenizer's, filled
    in by the trainer (the run directory's recipe records the number). A set value must hold
    every id of the data."""
    vocab_pad_multiple: int = 128
    """The embedding / output rows are padded to a multiple of this (must divide by TP)."""
    hidden_size: int = 256
    """h: model width."""
    num_layers: int = 4
    """Decoder layers in the trunk."""
    num_attention_heads: int = 4
    """Query heads."""
    num_kv_heads: int | None = None
    """Key/value heads (grouped-query attention); None means one per query head."""
    ffn_hidden_size: int | None = None
    """SwiGLU inner width; None means 8/3 h rounded up to a multiple of 64."""
    max_seq_len: int = 256
    """Longest sequence (RoPE table size)."""
    rope_theta: float = 10000.0
    """RoPE base."""
    rope_scaling: RopeScalingConfig | None = None
    """Llama-3's frequency scaling (None: plain RoPE)."""
    kv_channels: int | None = None
    """d, the width of one attention head; None: hidden_size / num_attention_heads (set for
    checkpoints whose heads are wider, e.g. Qwen3-0.6B: h 1024, 16 heads, d 128)."""
    norm_eps: float = 1e-6
    """RMSNorm epsilon."""
    qk_norm: bool = True
    """RMSNorm on queries and keys (its width: ``qk_norm_scope``)."""
    qk_norm_scope: Literal["head", "full"] = "head"
    """'head': one RMSNorm per head over d (Qwen3, Exaone4); 'full': one over the whole q and
    k projections, [n d] and [g d] (OLMo-2), exact under TP (each rank's sum of squares is
    all-reduced)."""
    qkv_bias: bool = False
    """Biases on the query, key and value projections (Qwen2's attention)."""
    norm_placement: Literal["post", "pre"] = "post"
    """'post': OLMo-2's reordered norm x + norm(f(x)); 'pre': GPT/Megatron's x + f(norm(x))."""
    tie_embeddings: bool = False
    """Share the input embedding with the output layer."""
    init_std: float = 0.02
    """Std of the normal init; output projections are scaled by 1/sqrt(2 num_layers)."""
    embedding_init_std: float | None = None
    """Std of the input embedding's init (None: init_std). With pre-norm, 1.0 keeps the token's
    own embedding above the sum of the randomly initialised layers' outputs in the residual
    stream, so a deep trunk learns from the first steps what a one-layer head sees at once.
    With tie_embeddings it is the output layer's init too (large initial logits)."""
    mtp: MTPConfig | None = field(default_factory=MTPConfig)
    """MTP heads; None trains a plain next-token (NTP) model."""
    etd: ETDConfig | None = None
    """Encode-Think-Decode split of the layers (None: the plain trunk)."""

    @property
    def kv_heads(self) -> int:
        return self.num_kv_heads or self.num_attention_heads

    @property
    def head_dim(self) -> int:
        return self.kv_channels or self.hidden_size // self.num_attention_heads

    @property
    def ffn_size(self) -> int:
        if self.ffn_hidden_size is not None:
            return self.ffn_hidden_size
        return 64 * math.ceil(8 * self.hidden_size / 3 / 64)

    @property
    def padded_vocab_size(self) -> int:
        if self.vocab_size is None:
            raise ValueError("model.vocab_size is None: the trainer sets it from the tokenizer")
        m = self.vocab_pad_multiple
        return m * math.ceil(self.vocab_size / m)

    def validate(self, tensor_parallel_size: int = 1, path: str = "model") -> None:
        if self.vocab_size is not None and (
            not isinstance(self.vocab_size, int) or self.vocab_size < 1
        ):
            _fail(f"{path}.vocab_size", self.vocab_size, "must be a positive integer or null")
        std = self.embedding_init_std
        if std is not None and (not isinstance(std, (int, float)) or std <= 0):
            _fail(f"{path}.embedding_init_std", std, "must be a positive number or null")
        positive = (
            "vocab_pad_multiple",
            "hidden_size",
            "num_layers",
            "num_attention_heads",
            "max_seq_len",
        )
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                _fail(f"{path}.{name}", value, "must be a positive integer")
        tp = tensor_parallel_size
        kv = self.kv_channels
        if kv is not None and (not _is_int(kv) or kv < 1):
            _fail(f"{path}.kv_channels", kv, "must be a positive integer or null")
        if self.rope_scaling is not None:
            self.rope_scaling.validate(f"{path}.rope_scaling")
        if self.qk_norm_scope not in ("head", "full"):
            _fail(f"{path}.qk_norm_scope", self.qk_norm_scope, "must be 'head' or 'full'")
        if kv is None and self.hidden_size % self.num_attention_heads:
            _fail(
                f"{path}.hidden_size",
                self.hidden_size,
                f"must be divisible by num_attention_heads ({self.num_attention_heads})",
            )
        if self.head_dim % 2:
            name = "kv_channels" if kv is not None else "hidden_size"
            _fail(
                f"{path}.{name}",
                getattr(self, name),
                f"the head width {self.head_dim} must be even for RoPE",
            )
        if self.num_attention_heads % self.kv_heads:
            _fail(
                f"{path}.num_kv_heads",
                self.num_kv_heads,
                f"must divide num_attention_heads ({self.num_attention_heads})",
            )
        if self.norm_placement not in NORM_PLACEMENTS:
            _fail(
                f"{path}.norm_placement", self.norm_placement, f"must be one of {NORM_PLACEMENTS}"
            )
        checks = [
            ("num_attention_heads", self.num_attention_heads),
            ("num_kv_heads", self.kv_heads),
            ("ffn_hidden_size", self.ffn_size),
            ("hidden_size", self.hidden_size),
        ]
        for name, value in checks:
            if value % tp:
                _fail(f"{path}.{name}", value, f"must be divisible by tensor_parallel_size ({tp})")
        if self.vocab_pad_multiple % tp and (
            self.vocab_size is None or self.padded_vocab_size % tp
        ):
            padded = "unknown until the tokenizer is read" if self.vocab_size is None else None
            _fail(
                f"{path}.vocab_pad_multiple",
                self.vocab_pad_multiple,
                f"the padded vocabulary ({padded or self.padded_vocab_size}) must be divisible by "
                f"tensor_parallel_size ({tp}); use a multiple of {tp}",
            )
        if self.mtp is not None:
            self.mtp.validate(f"{path}.mtp")
        if self.etd is not None:
            self.etd.validate(num_layers=self.num_layers, path=f"{path}.etd")


@dataclass
class ParallelConfig:
    """How the world is split: world = pipeline x tensor x data parallel."""

    tensor_parallel_size: int = 1
    """Megatron TP: processes that shard each layer."""
    pipeline_parallel_size: int = 1
    """Pipeline stages (the MTP heads sit on the last one)."""
    pipeline_partition: Literal["uniform", "parameters"] = "uniform"
    """How decoder layers are split over stages: 'uniform' (equal layer counts) or 'parameters'
    (balance parameters, counting the embedding on the first stage and the output layer + MTP
    heads on the last); every stage keeps at least one decoder layer."""

    def validate(self, path: str = "parallel") -> None:
        for name in ("tensor_parallel_size", "pipeline_parallel_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                _fail(f"{path}.{name}", value, "must be a positive integer")
        if self.pipeline_partition not in PIPELINE_PARTITIONS:
            _fail(
                f"{path}.pipeline_partition",
                self.pipeline_partition,
                f"must be one of {PIPELINE_PARTITIONS}",
            )


# ---------------------------------------------------------------------------------------------
# dicts (YAML) -> dataclasses

T = TypeVar("T")


def _convert(tp: Any, value: Any, path: str) -> Any:
    origin = get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        options = get_args(tp)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _convert(option, value, path)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{path}: cannot be {value!r}")
    if origin is Literal:
        if value not in get_args(tp):
            _fail(path, value, f"must be one of {get_args(tp)}")
        return value
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            _fail(path, value, f"must be a mapping of {tp.__name__} fields")
        return from_dict(tp, value, path)
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            _fail(path, value, "must be a list")
        (item,) = get_args(tp)[:1] or (Any,)
        return [_convert(item, v, f"{path}[{i}]") for i, v in enumerate(value)]
    if origin is dict or tp is Any:
        return value
    if tp is bool:
        if not isinstance(value, bool):
            _fail(path, value, "must be true or false")
        return value
    if tp is int:
        if not _is_int(value):
            _fail(path, value, "must be an integer")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads 1e-3 (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if not _is_number(value):
            _fail(path, value, "must be a number")
        if not math.isfinite(value):  # YAML reads .nan / .inf; no setting here means them
            _fail(path, value, "must be a finite number")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            _fail(path, value, "must be a string")
        return value
    return value


def from_dict(cls: type[T], data: dict[str, Any], path: str = "") -> T:
    """Build dataclass ``cls`` from ``data``; unknown keys and wrong types raise ConfigError."""
    hints = get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        full = f"{path}.{key}" if path else key
        if key not in names:
            raise ConfigError(f"unknown key '{full}'; known keys here: {', '.join(names)}")
        kwargs[key] = _convert(hints[key], value, full)
    return cls(**kwargs)


def to_dict(config: Any) -> dict[str, Any]:
    """The inverse of :func:`from_dict` (nested plain dicts)."""
    return dataclasses.asdict(config)
