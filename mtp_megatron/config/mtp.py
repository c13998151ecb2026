"""The MTP heads (``model.mtp``: ``MTPConfig``) and how a model with them trains (``train.mtp``:
``MTPTrainingConfig``), the user's guide's two configs. What they compute lives in
``model/objective.py`` (step weights, the weight schedule, the curriculum) and ``model/mtp.py``
(the heads); these are the settings and their checks."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, get_args

from mtp_megatron.config.base import (
    check_choice,
    check_flags,
    check_int,
    fail,
    is_int,
    is_number,
)

HeadTypeName = Literal["transformer", "mlp", "linear", "shared_lm_head"]
"""The MTP head types a recipe may name (builders: ``model/heads.py``, which checks at import
that it builds exactly these): 'transformer' (projection + one decoder layer, DeepSeek-V3's MTP
module), 'mlp' (projection + a SwiGLU block), 'linear' (projection + a Medusa-style residual
block) and 'shared_lm_head' (no parameters: the trunk's final norm and output layer)."""
HEAD_TYPES: tuple[HeadTypeName, ...] = get_args(HeadTypeName)
PARAMETER_FREE_HEAD_TYPES: tuple[str, ...] = ("shared_lm_head",)
"""Head types without parameters of their own (they cannot be independent, see validate)."""
HeadArrangement = Literal["chained", "independent"]
WeightScheduleName = Literal["constant", "step", "linear_decay"]
"""``model.mtp.weight_schedule``: how the MTP weight w moves over training."""
CurriculumName = Literal["none", "forward", "reverse"]
"""``train.mtp.curriculum``: how many MTP steps train at each point of training."""
TrunkTraining = Literal["joint", "freeze_trunk", "detach_heads"]
"""``train.mtp.trunk``: what trains the trunk of a model with MTP heads."""
HeadInit = Literal["random", "last_layer"]
"""A recipe's ``mtp_head_init`` (with ``init_from``): the heads' transformer blocks drawn at
random, or copies of the trunk's last layer (the usual start of MTP fine-tuning: the head begins
as one more trunk layer)."""


@dataclass(kw_only=True)
class MTPConfig:
    """Multi-token prediction heads (the user's guide ``MTPConfig``, plus the arrangement).

    Step k = 1..K predicts token t_{i+k+1} from position i, beyond the main head's t_{i+1}.
    Meta (arXiv:2404.19737) counts the main head too: their n = K + 1.
    """

    num_predict_tokens: int = 4
    """K: future tokens predicted beyond the next one (4 is the paper optimum)."""
    mtp_head_type: HeadTypeName = "transformer"
    """One of ``HEAD_TYPES``: 'transformer', 'mlp', 'linear' or 'shared_lm_head'."""
    share_weights_across_steps: bool = True
    """FastMTP: one head module applied at every step instead of K separate ones."""
    loss_weight_decay: float = 0.5
    """beta: step k weighs alpha_k = beta^(k-1) / sum_j beta^(j-1)."""
    mtp_loss_weight: float = 0.5
    """w: loss = main + w * sum_k alpha_k CE_k."""
    speculation_lookahead: int = 3
    """Draft tokens proposed per step at inference (at most K)."""
    head_arrangement: HeadArrangement = "chained"
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
    updates already applied), as in ``MTPObjective.weight``; TensorBoard plots step s's values at
    s + 1. Or give ``weight_switch_tokens``."""
    weight_switch_tokens: int | None = None
    """The switch in training tokens instead of steps: the trainer turns it into the first step
    at or past that many tokens (tokens per step = global batch x seq_len)."""

    @property
    def recursive_drafts(self) -> bool:
        """Whether drafting may go past K: one chained head module for every step (shared, or
        K=1) reads its own previous state, so applying it again drafts one more token (vLLM's
        and FastMTP's recursion)."""
        one_module = self.share_weights_across_steps or self.num_predict_tokens == 1
        return self.head_arrangement == "chained" and one_module

    def _validate_weight_schedule(self, path: str) -> None:
        schedule = self.weight_schedule
        check_choice(f"{path}.weight_schedule", schedule, WeightScheduleName)
        extras = ("final_loss_weight", "weight_switch_step", "weight_switch_tokens")
        if schedule == "constant":
            for name in extras:
                if getattr(self, name) is not None:
                    fail(
                        f"{path}.{name}",
                        getattr(self, name),
                        "is only read by weight_schedule 'step' or 'linear_decay' (this one is "
                        "'constant'); remove it or choose a schedule",
                    )
            return
        w1 = self.final_loss_weight
        if w1 is None or not is_number(w1) or not 0 <= w1 < math.inf:
            fail(
                f"{path}.final_loss_weight",
                w1,
                f"weight_schedule {schedule!r} needs the final weight: a number >= 0",
            )
        step, tokens = self.weight_switch_step, self.weight_switch_tokens
        if (step is None) == (tokens is None):
            fail(
                f"{path}.weight_switch_step",
                step,
                f"weight_schedule {schedule!r} needs its switch: set exactly one of "
                "weight_switch_step (optimizer steps) and weight_switch_tokens",
            )
        for name, value in (("weight_switch_step", step), ("weight_switch_tokens", tokens)):
            if value is not None:
                check_int(f"{path}.{name}", value, 1)
        if step is not None and step <= self.warmup_steps:
            fail(
                f"{path}.weight_switch_step",
                step,
                f"must come after the warm-up (warmup_steps={self.warmup_steps}): at or before "
                f"its end, weight_schedule {schedule!r} would never use mtp_loss_weight at full "
                "strength; move the switch later or shorten the warm-up",
            )

    def _validate_independent(self, path: str) -> None:
        # An independent head sees only the trunk output h_i. Without parameters of its own, or
        # with one module shared by all steps, every step would compute the same logits.
        if self.mtp_head_type in PARAMETER_FREE_HEAD_TYPES:
            with_parameters = [t for t in HEAD_TYPES if t not in PARAMETER_FREE_HEAD_TYPES]
            fail(
                f"{path}.mtp_head_type",
                self.mtp_head_type,
                "independent heads read only the trunk output, so a parameter-free head would "
                "reproduce the main head; use head_arrangement='chained' or a head with "
                f"parameters ({', '.join(with_parameters)})",
            )
        if self.share_weights_across_steps and self.num_predict_tokens > 1:
            fail(
                f"{path}.share_weights_across_steps",
                True,
                "independent heads that share one module all compute the same logits; set it "
                "to false or use head_arrangement='chained' (FastMTP shares chained heads)",
            )

    def validate(self, path: str = "mtp") -> None:
        k = self.num_predict_tokens
        check_int(
            f"{path}.num_predict_tokens", k, 1, "must be an integer >= 1 (use mtp: null for NTP)"
        )
        check_choice(f"{path}.mtp_head_type", self.mtp_head_type, HeadTypeName)
        check_choice(f"{path}.head_arrangement", self.head_arrangement, HeadArrangement)
        if not (is_number(self.loss_weight_decay) and self.loss_weight_decay > 0):
            fail(f"{path}.loss_weight_decay", self.loss_weight_decay, "beta must be > 0")
        w = self.mtp_loss_weight
        if not is_number(w) or not 0 <= w < math.inf:
            fail(f"{path}.mtp_loss_weight", w, "must be a finite number >= 0")
        check_int(f"{path}.warmup_steps", self.warmup_steps, 0)
        self._validate_weight_schedule(path)
        la = self.speculation_lookahead
        if not is_int(la) or la < 1 or (la > k and not self.recursive_drafts):
            fail(
                f"{path}.speculation_lookahead",
                la,
                f"must be between 1 and num_predict_tokens ({k}): each draft token needs a head "
                "(only one chained head shared by every step, or K=1, drafts further by "
                "applying itself again)",
            )
        if self.head_arrangement == "independent":
            self._validate_independent(path)


@dataclass(kw_only=True)
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
    trunk: TrunkTraining = "joint"
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
    steps (the teacher) with a copy of them for the main CE; each step keeps only its softmax,
    as without distillation (``model/loss.py``: one pass, the teacher expanded chunk by chunk).
    Not with sequential_forward."""
    curriculum: CurriculumName = "none"
    """Which MTP steps train when (Aynetdinov & Akbik, arXiv:2505.22757): 'none' (all K
    throughout), 'forward' (start as next-token prediction and add one step per stage: K + 1
    equal stages over ``curriculum_steps``, the last with all K) or 'reverse' (start with all K
    and drop the furthest step per stage, ending as next-token prediction). Steps that do not
    train are not computed; the step weights are renormalised over those that do. Logged as
    ``train/mtp_active_steps``; evaluation scores every head."""
    curriculum_steps: int | None = None
    """Optimizer steps the curriculum's K + 1 stages span (None: the run's train.steps)."""

    def curriculum_span(self, total_steps: int | None) -> int | None:
        """The optimizer steps the curriculum's stages span: ``curriculum_steps``, else the run's
        ``total_steps`` (None without a curriculum)."""
        if self.curriculum == "none":
            return None
        return self.curriculum_steps if self.curriculum_steps is not None else total_steps

    def validate(self, path: str = "train.mtp") -> None:
        check_choice(f"{path}.trunk", self.trunk, TrunkTraining)
        check_choice(f"{path}.curriculum", self.curriculum, CurriculumName)
        span = self.curriculum_steps
        if span is not None:
            check_int(f"{path}.curriculum_steps", span, 1, "must be an integer >= 1 (or null)")
        if span is not None and self.curriculum == "none":
            fail(
                f"{path}.curriculum_steps",
                span,
                "is only read by a curriculum (train.mtp.curriculum is 'none'); remove it or set "
                "curriculum: forward or reverse",
            )
        beta = self.distill_weight
        if not is_number(beta) or not 0 <= beta <= 1:
            fail(f"{path}.distill_weight", beta, "must be a number in [0, 1]")
        if beta and self.sequential_forward:
            fail(
                f"{path}.distill_weight",
                beta,
                "is not supported with sequential_forward (which scores one step's logits at a "
                "time without the main head's); set one of them off",
            )
        check_flags(self, path, ("sequential_forward", "gradient_checkpointing"))
