"""Per-device memory of a training run, before it starts: ``python -m mtp_megatron plan``.

Two parts, each counted from what runs rather than from a formula of the architecture:

- **Model states** (weights, gradients, optimizer), per parameter of the device's largest
  pipeline stage, as DeepSpeed 0.19 holds them for the run's ZeRO stage and precision
  (:data:`STATE_BYTES`, read off its optimizers and checked against a real engine's memory,
  ``docs/memory-plan.md``). Tensor-parallel parameters count 1/TP.
- **The step**: one micro-batch's forward and backward traced on the ``meta`` device
  (:func:`trace_step`): every tensor the model's ops create is counted while it is alive, so
  activations saved for backward, the main and MTP logits under the plain or the sequential
  schedule, activation checkpointing and the distillation's teacher count exactly as the code
  runs them. Attention is traced as a fused kernel (no s x s matrix: flash / memory-efficient
  SDPA on a GPU, the CPU's flash kernel). Gradients are released as they are made, as ZeRO's
  hooks do (the model states hold them); nothing is allocated.

TP > 1 divides the traced layer activations as Megatron does without sequence parallelism
(Korthikanti et al. 2022: 10 + 24/t of 34 units per token and width) and the rest (logits)
by t; PP > 1 gives stage j its layers' activations for min(PP - j, grad_accum) micro-batches
in flight (DeepSpeed's 1F1B schedule) and the last stage the heads and logits. Both are
estimates; the TP=1, PP=1 step is measured against ``bench-memory`` in ``docs/memory-plan.md``.
"""

from __future__ import annotations

import os
import weakref
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING
from unittest import mock

import torch

from mtp_megatron.config import ConfigError, ModelConfig, MTPTrainingConfig

if TYPE_CHECKING:
    from mtp_megatron.recipe import Recipe

GIB = 2**30
HEADROOM = 0.10
"""Share of the device kept free for the allocator's fragmentation and kernels' workspaces."""
CONTEXT_GIB = 1.0
"""The CUDA context and NCCL's buffers, outside torch's allocator."""
BUCKET_ELEMENTS = 5e8
"""DeepSpeed's reduce bucket (``reduce_bucket_size``, ZeRO and plain data parallel alike), in
elements: what bounds the gradients held for reduction at once."""


MEMORY_CHECK_ENV = "MTP_MEMORY_CHECK"
"""Set to 0 to skip the refusal of a run the plan says will not fit (``check``, start-up)."""


def memory_check() -> bool:
    """Whether ``check`` and a GPU run's start-up refuse what the plan says will not fit."""
    return os.environ.get(MEMORY_CHECK_ENV, "1").strip() != "0"


class PlanUnavailable(ConfigError):
    """The model cannot be planned (its step does not trace on the meta device): the callers
    that plan on the way to something else (dry-run, check, start-up) note it and go on."""


@dataclass(frozen=True)
class StateBytes:
    """Model-state bytes per parameter of one (precision, ZeRO stage), as (on every rank, divided
    over DP). Read off a real DeepSpeed 0.19 engine on the CPU (``bench-plan``: 131M parameters,
    DP 1 and 2, memory above the model's build), then named by DeepSpeed's buffers."""

    weights: tuple[float, float]
    """The model's parameters (fp32 or bf16; partitioned by ZeRO-3)."""
    optimizer: tuple[float, float]
    """Between steps, besides the weights: fp32 master weights, Adam's two moments, and
    buffers that live through the step (BF16_Optimizer's full fp32 gradient buffer)."""
    backward: tuple[float, float]
    """Gradients kept once reduced (all of them, or this rank's fp32 partition)."""
    bucket: float
    """Per gradient element while in a reduction bucket (until BUCKET_ELEMENTS fill it)."""
    optimizer_step: tuple[float, float]
    """Everything at the optimizer step's peak (weights, states, gradients, temporaries)."""


STATE_BYTES: dict[tuple[str, int], StateBytes] = {
    # no ZeRO: fp32 weights, torch AdamW's moments; gradients and DeepSpeed's flattened
    # all-reduce buckets during backward
    ("fp32", 0): StateBytes((4, 0), (8, 0), (4, 0), 4, (18, 0)),
    # ZeRO-1/2: fp32 partition copy + Adam over DP; gradients reduced bucket by bucket
    ("fp32", 1): StateBytes((4, 0), (0, 12), (0, 0), 8, (4, 28)),
    ("fp32", 2): StateBytes((4, 0), (0, 12), (0, 0), 8, (4, 28)),
    # ZeRO-3: everything partitioned; gathered parameters and buckets are bounded buffers
    ("fp32", 3): StateBytes((0, 4), (4, 16), (0, 0), 12, (4, 32)),
    # BF16_Optimizer: bf16 weights and gradients, a full-size fp32 gradient buffer on every rank
    ("bf16", 1): StateBytes((2, 0), (4, 12), (2, 0), 4, (8, 20)),
    # ZeRO-2 bf16: fp32 gradient partitions only
    ("bf16", 2): StateBytes((2, 0), (0, 12), (0, 4), 8, (2, 24)),
    ("bf16", 3): StateBytes((0, 2), (4, 16), (0, 0), 10, (4, 30)),
}
"""Model-state bytes per parameter by precision and ZeRO stage (bf16 needs ZeRO >= 1)."""


# -- the step, traced -----------------------------------------------------------------------------
class _LiveBytes(torch.utils._python_dispatch.TorchDispatchMode):
    """Counts the bytes of every storage an op creates while it is alive; the peak."""

    def __init__(self, existing: list[torch.UntypedStorage]):
        super().__init__()
        self._known = {id(s) for s in existing}  # weights, buffers, inputs: not the step's
        self._existing = existing  # (kept alive, so their ids are not reused)
        self.live = 0
        self.peak = 0

    def _freed(self, key: int, nbytes: int) -> None:
        self._known.discard(key)
        self.live -= nbytes

    def hold(self, nbytes: float) -> None:
        """Count memory no op of the trace allocates (DeepSpeed's gradient buffers); negative:
        release it."""
        self.live += round(nbytes)
        self.peak = max(self.peak, self.live)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in torch.utils._pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor):
                storage = t.untyped_storage()
                key = id(storage)
                if key not in self._known:
                    self._known.add(key)
                    self.live += storage.nbytes()
                    weakref.finalize(storage, self._freed, key, storage.nbytes())
        self.peak = max(self.peak, self.live)
        return out


def _fused_attention(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, **_):
    """SDPA as a fused kernel would run it on the meta device (no s x s scores kept)."""
    if k.shape[1] != q.shape[1]:  # grouped-query attention: a fused kernel reads k, v in place
        repeat = q.shape[1] // k.shape[1]
        k = k[:, :, None].expand(-1, -1, repeat, -1, -1).flatten(1, 2)
        v = v[:, :, None].expand(-1, -1, repeat, -1, -1).flatten(1, 2)
    attention = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
    return attention(q, k, v, dropout_p, is_causal, scale=scale)[0]


def _fused_sdpa():
    """Every SDPA call traced as :func:`_fused_attention` (a context manager)."""
    return mock.patch.object(torch.nn.functional, "scaled_dot_product_attention", _fused_attention)


@dataclass(frozen=True)
class StepTrace:
    """One traced micro-batch (TP=1, the whole model)."""

    peak_bytes: int
    """Largest memory the step's tensors held at once (above the weights)."""
    saved_bytes: int
    """Held at the end of the forward: what backward needs (activations, logits kept)."""
    layer_saved_bytes: int
    """Of which one trunk decoder layer's saved activations."""
    embedding_params: int
    """Parameters of the input embedding (the first pipeline stage's)."""
    layer_params: int
    """Parameters of one trunk decoder layer."""
    params: int
    """Parameters of the whole model (TP=1)."""
    trainable: int
    """Of which trained (a frozen trunk has weights but no gradients or optimizer states)."""


def _meta_model(cfg: ModelConfig, training: MTPTrainingConfig, dtype: torch.dtype):
    from mtp_megatron.model import build_model
    from mtp_megatron.parallel import ensure_parallel_initialized
    from mtp_megatron.train.apply import apply_mtp_training

    ensure_parallel_initialized()
    with torch.device("meta"):
        model = build_model(cfg)
    # every head computed (a curriculum's widest stage), at the schedule's full weight
    apply_mtp_training(model, replace(training, curriculum="none", curriculum_steps=None))
    return model.to(dtype).train()


class _Reduction:
    """DeepSpeed's gradient handling as memory: each gradient, once accumulated, is copied into
    a reduction bucket and the model-dtype gradient dropped; a full bucket (``flush_at``
    elements) is reduced into the kept gradients (all of them, or this rank's partition) and
    freed. So gradients build up while backward frees the activations, and the two peaks do not
    add."""

    def __init__(self, counter: _LiveBytes, kept: float, bucket: float, flush_at: float):
        self.counter, self.kept, self.bucket, self.flush_at = counter, kept, bucket, flush_at
        self.in_bucket = 0

    def __call__(self, p: torch.Tensor) -> None:
        p.grad = None
        n = p.numel()
        self.counter.hold(n * (self.kept + self.bucket))
        self.in_bucket += n
        if self.in_bucket >= self.flush_at:
            self.counter.hold(-self.in_bucket * self.bucket)
            self.in_bucket = 0


def _drop_grad(p: torch.Tensor) -> None:
    p.grad = None


def _trace(
    model,
    batch: int,
    seq: int,
    keep_grads: bool,
    reduction: tuple[float, float, float] | None = None,
) -> tuple[int, int]:
    """(peak, held after forward) of one forward + backward on the meta device. Gradients stay
    (``keep_grads``), are dropped as they are made, or go through ``reduction`` (bytes per
    element kept after reduction, bytes per element while in a bucket, elements that flush a
    bucket: :class:`_Reduction`)."""
    ids = torch.zeros(batch, seq, dtype=torch.long, device="meta")
    existing = [t.untyped_storage() for t in (*model.parameters(), *model.buffers(), ids)]
    counter = _LiveBytes(existing)
    hooks = []
    if not keep_grads:
        take = _Reduction(counter, *reduction) if reduction else _drop_grad
        for p in model.parameters():
            if p.requires_grad:
                hooks.append(p.register_post_accumulate_grad_hook(take))
    try:
        with _fused_sdpa(), counter:
            out = model(ids, return_logits=False)
            saved = counter.live
            out.loss.backward()
    finally:
        for hook in hooks:
            hook.remove()
    return counter.peak, saved


def trace_step(
    cfg: ModelConfig,
    training: MTPTrainingConfig,
    batch: int,
    seq: int,
    dtype: torch.dtype,
    keep_grads: bool = False,
    reduction: tuple[float, float, float] | None = None,
) -> StepTrace:
    """Trace one training micro-batch of ``cfg`` on the meta device. ``keep_grads``: the
    parameters' gradients stay (as in a bare forward + backward, ``bench-memory``);
    ``reduction``: they go through DeepSpeed's buckets (:func:`_trace`). Remembered per process:
    finding the change that makes a recipe fit plans it several times."""
    key = repr((cfg, training, batch, seq, dtype, keep_grads, reduction))
    if key not in _TRACES:
        _TRACES[key] = _trace_step(cfg, training, batch, seq, dtype, keep_grads, reduction)
    return _TRACES[key]


_TRACES: dict[str, StepTrace] = {}


def _trace_step(
    cfg: ModelConfig,
    training: MTPTrainingConfig,
    batch: int,
    seq: int,
    dtype: torch.dtype,
    keep_grads: bool,
    reduction: tuple[float, float, float] | None,
) -> StepTrace:
    if cfg.etd is not None:  # its expert routing (bincount) has no meta-device kernel
        raise PlanUnavailable("no memory plan for ETD models yet: ETD's routing cannot be traced")
    model = _meta_model(cfg, training, dtype)
    try:
        peak, saved = _trace(model, batch, seq, keep_grads, reduction)
    except NotImplementedError as e:  # an op without a meta kernel
        raise PlanUnavailable(f"no memory plan: the step cannot be traced ({e})") from e
    layer_saved = 0
    if cfg.num_layers > 1:  # one layer fewer: what one decoder layer keeps for backward
        fewer = _meta_model(replace(cfg, num_layers=cfg.num_layers - 1), training, dtype)
        layer_saved = max(0, saved - _trace(fewer, batch, seq, keep_grads)[1])
    return StepTrace(
        peak_bytes=peak,
        saved_bytes=saved,
        layer_saved_bytes=layer_saved,
        embedding_params=sum(p.numel() for p in model.trunk.embedding.parameters()),
        layer_params=sum(p.numel() for p in model.trunk.layers[0].parameters()),
        params=sum(p.numel() for p in model.parameters()),
        trainable=sum(p.numel() for p in model.parameters() if p.requires_grad),
    )


# -- the plan -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class MemoryPlan:
    """Bytes per device of the most loaded pipeline stage, at the step's two peaks: forward +
    backward (activations, and gradients building up as backward frees them) and the optimizer
    step."""

    what: str
    """The run in words (layout, precision, ZeRO stage, micro-batch)."""
    params: int
    """Parameters on that device."""
    trainable: int
    """Of which trained (with gradients and optimizer states)."""
    weights: float
    optimizer: float
    """fp32 master weights, Adam's moments, buffers kept between steps (this device's share)."""
    gradients: float
    """What gradients, their partitions and reduction buckets add at the backward's peak (they
    build up while backward frees activations: at most all of them, often less)."""
    activations: float
    """The step's activations, logits and transient tensors (micro-batches in flight)."""
    logits: float
    """Of ``activations``: what is not decoder-layer activations (main and MTP logits, heads)."""
    optimizer_step: float
    """Everything at the optimizer step's peak (activations freed by then)."""

    @property
    def backward_peak(self) -> float:
        return self.weights + self.optimizer + self.gradients + self.activations

    @property
    def total(self) -> float:
        return max(self.backward_peak, self.optimizer_step)

    def usable(self, device_bytes: float) -> float:
        """What a device of ``device_bytes`` leaves for the plan."""
        return device_bytes * (1 - HEADROOM) - CONTEXT_GIB * GIB

    def fits(self, device_bytes: float) -> bool:
        return self.total <= self.usable(device_bytes)

    def table(self, device_bytes: float | None = None) -> str:
        rows = [
            ("weights", self.weights),
            ("optimizer states (master, Adam, buffers)", self.optimizer),
            ("gradients, buckets (added at the step's peak)", self.gradients),
            ("activations, logits (micro-batches in flight)", self.activations),
            ("  of which outside the decoder layers", self.logits),
            ("peak in forward + backward", self.backward_peak),
            ("peak in the optimizer step", self.optimizer_step),
        ]
        frozen = self.params - self.trainable
        count = _count(self.params) + (f" ({_count(frozen)} frozen)" if frozen else "")
        lines = [f"memory plan: {self.what}, {count} parameters on the device"]
        lines += [f"  {name:46s} {value / GIB:8.2f} GiB" for name, value in rows]
        if device_bytes:
            verdict = "fits" if self.fits(device_bytes) else "does NOT fit"
            lines.append(
                f"  {self.total / GIB:.2f} GiB of a {device_bytes / GIB:.1f} GiB device (usable "
                f"{self.usable(device_bytes) / GIB:.1f} GiB: less {HEADROOM:.0%} for fragmentation "
                f"and {CONTEXT_GIB:.0f} GiB of CUDA context): {verdict}"
            )
        return "\n".join(lines)


def _count(n: float) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.1f}M"


def _on_device(part: tuple[float, float], dp: int) -> float:
    replicated, sharded = part
    return replicated + sharded / dp


def plan_memory(
    cfg: ModelConfig,
    training: MTPTrainingConfig,
    *,
    precision: str,
    zero_stage: int,
    micro_batch: int,
    seq_len: int,
    grad_accum: int = 1,
    tp: int = 1,
    pp: int = 1,
    dp: int = 1,
) -> MemoryPlan:
    """The per-device memory of training ``cfg`` (``precision`` resolved: 'fp32' or 'bf16')."""
    if (precision, zero_stage) not in STATE_BYTES:
        raise ConfigError(
            f"no memory plan for {precision} at ZeRO-{zero_stage} (bf16 needs ZeRO >= 1)"
        )
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    trace = trace_step(cfg, training, micro_batch, seq_len, dtype)
    layer_share = (10 + 24 / tp) / 34  # Megatron's split of a layer's activations over TP
    per_stage = -(-cfg.num_layers // pp)
    layer_bytes = trace.layer_saved_bytes * layer_share
    rest = max(0, trace.peak_bytes - trace.layer_saved_bytes * cfg.num_layers) / tp
    if pp == 1:
        activations = layer_bytes * cfg.num_layers + rest
    else:  # 1F1B: stage 0 holds min(pp, grad_accum) micro-batches; the last one the heads too
        activations = max(
            per_stage * layer_bytes * min(pp, grad_accum), per_stage * layer_bytes + rest
        )
    params = _params_on_device(cfg, trace, tp, pp)
    trainable = round(params * trace.trainable / trace.params)
    states = STATE_BYTES[(precision, zero_stage)]
    weights = params * _on_device(states.weights, dp)
    # gradients build up through DeepSpeed's buckets while backward frees the activations: what
    # they add at the step's peak is traced, scaled to this device's share of the parameters
    # ZeRO-2/3 reduce a bucket as it fills; ZeRO-0/1 and the pipeline engine after backward
    flush_at = BUCKET_ELEMENTS if zero_stage in (2, 3) and pp == 1 else float("inf")
    reduction = (_on_device(states.backward, dp), states.bucket, flush_at)
    with_grads = trace_step(cfg, training, micro_batch, seq_len, dtype, reduction=reduction)
    added = max(0, with_grads.peak_bytes - trace.peak_bytes)
    gradients = added * trainable / max(1, trace.trainable)
    what = (
        f"{precision} ZeRO-{zero_stage}, TP {tp} x PP {pp} x DP {dp}, micro-batch {micro_batch}"
        f" x {seq_len}"
    )
    return MemoryPlan(
        what=what,
        params=params,
        trainable=trainable,
        weights=weights,
        optimizer=trainable * _on_device(states.optimizer, dp),
        gradients=gradients,
        activations=activations,
        logits=rest,
        # optimizer_step counts the weights: a frozen parameter's, without its states
        optimizer_step=weights
        + trainable * (_on_device(states.optimizer_step, dp) - _on_device(states.weights, dp)),
    )


def _params_on_device(cfg: ModelConfig, trace: StepTrace, tp: int, pp: int) -> int:
    """Parameters of the largest pipeline stage on one TP rank (embedding, layers, output
    layer and heads all divide over TP, but for the norms: a rounding)."""
    if pp == 1:
        return -(-trace.params // tp)
    layers = -(-cfg.num_layers // pp) * trace.layer_params
    first = trace.embedding_params + layers
    last = trace.params - trace.embedding_params - trace.layer_params * (cfg.num_layers - 1)
    last += layers - trace.layer_params + (trace.embedding_params if cfg.tie_embeddings else 0)
    return -(-max(first, last) // tp)


# -- a recipe's plan, and what makes it fit -----------------------------------------------------
def plan_recipe(recipe: Recipe, world: int, on_gpu: bool = True) -> MemoryPlan:
    """The plan of ``recipe`` on ``world`` processes (``model.vocab_size`` resolved), with
    'auto' precision and ZeRO stage as they resolve on a GPU (``on_gpu``) or the CPU."""
    if recipe.model.vocab_size is None:
        raise ConfigError("the memory plan needs model.vocab_size (the tokenizer's): resolve it")
    dims = recipe.dims(world)
    train = recipe.train
    precision = train.resolved_precision(on_gpu)
    return plan_memory(
        recipe.model,
        train.mtp,
        precision=precision,
        zero_stage=train.resolved_zero_stage(on_gpu, dims.pp),
        micro_batch=train.micro_batch_size,
        seq_len=recipe.seq_len,
        grad_accum=train.grad_accum,
        tp=dims.tp,
        pp=dims.pp,
        dp=dims.dp,
    )


def _changes(recipe: Recipe) -> list[str]:
    """Changes that lower the memory without changing the losses, in the order to try them, as
    the overrides a user would pass."""
    train, out = recipe.train, []
    if recipe.parallel.pipeline_parallel_size == 1 and train.zero_stage in (0, 1):  # 'auto': 2
        out.append("train.zero_stage=2")
    if not train.mtp.gradient_checkpointing:
        out.append("train.mtp.gradient_checkpointing=true")
    sequential_allowed = train.mtp.distill_weight == 0  # distillation needs the plain schedule
    if recipe.model.mtp is not None and not train.mtp.sequential_forward and sequential_allowed:
        out.append("train.mtp.sequential_forward=true")
    batch, accum = train.micro_batch_size, train.grad_accum
    while batch > 1 and batch % 2 == 0:
        batch, accum = batch // 2, accum * 2
        out.append(f"train.micro_batch_size={batch} train.grad_accum={accum}")
    return out


def _with(recipe: Recipe, override: str) -> Recipe:
    """``recipe`` with ``override`` applied as the command line would, validated."""
    from mtp_megatron.config import from_dict, to_dict
    from mtp_megatron.recipe import Recipe, apply_overrides

    changed = from_dict(Recipe, apply_overrides(to_dict(recipe), override.split()))
    changed.validate()
    return changed


def make_it_fit(recipe: Recipe, world: int, device_bytes: float) -> tuple[list[str], MemoryPlan]:
    """The fewest of :func:`_changes` (the first single one that fits, else the first ones
    taken together) that make ``recipe`` fit; ([], plan) when none does."""
    changes = _changes(recipe)
    for override in changes:
        plan = plan_recipe(_with(recipe, override), world)
        if plan.fits(device_bytes):
            return [override], plan
    taken: list[str] = []
    current = recipe
    for override in changes:
        current = _with(current, override)
        taken = [t for t in taken if not t.startswith("train.micro_batch_size")] + [override]
        plan = plan_recipe(current, world)
        if plan.fits(device_bytes):
            return taken, plan
    return [], plan_recipe(current, world)


def check_fits(recipe: Recipe, world: int, device_bytes: float, where: str) -> MemoryPlan:
    """The plan, or a ConfigError naming what does not fit and the change that makes it fit."""
    plan = plan_recipe(recipe, world)
    if plan.fits(device_bytes):
        return plan
    fix, fixed = make_it_fit(recipe, world, device_bytes)
    need = f"needs about {plan.total / GIB:.1f} GiB per GPU ({plan.what})"
    have = f"{where} has {device_bytes / GIB:.1f} GiB, {plan.usable(device_bytes) / GIB:.1f} usable"
    if fix:
        how = f"set {' '.join(fix)} (about {fixed.total / GIB:.1f} GiB)"
    else:
        how = (
            "no change of ZeRO stage, checkpointing, schedule or micro-batch is enough: raise "
            "parallel.tensor_parallel_size or pipeline_parallel_size, or use more GPUs"
        )
    raise ConfigError(
        f"recipe {recipe.name} {need}; {have}: {how} ({MEMORY_CHECK_ENV}=0 skips this check; "
        f"docs/memory-plan.md). The plan:\n{plan.table(device_bytes)}"
    )
