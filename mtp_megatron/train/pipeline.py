"""The model as DeepSpeed pipeline stages: embedding first, decoder layers split, heads last.

Notation: b batch, s sequence, h hidden, L decoder layers, P pipeline stages.

DeepSpeed's ``PipelineModule`` runs a list of layers as a sequence, each stage a contiguous
slice. Ours (the table with each entry's checkpoint keys is in ``train/pipeline_layout.py``):
[0] EmbeddingPipe (first stage; TiedLayerSpec 'embed'), [1..L] one DecoderLayerPipe per trunk
layer (split over the stages by ``parallel.pipeline_partition``), [L+1] FinalStagePipe (last
stage: final norm, output layer, every MTP head), [L+2] the tie marker (last stage; TiedLayerSpec
'embed', only when the last stage reads the embedding).

- **Between stages only z travels** (one float tensor). The last stage loads the input ids and
  labels from the same deterministic batch as the first stage (DeepSpeed hands the first stage
  ``batch[0]`` and the last ``batch[1]``): the chained heads' future tokens t_{i+k} need no extra
  p2p traffic. The optimizer step (for w(step) and a curriculum) is set on the last stage's
  module by the step runner, a host number: nothing is read back from the device for it. RoPE
  positions are 0..s-1.
- **The loss** is the module's ``loss_fn`` on the last stage: ``MTPModel.final_stage`` (final norm,
  main head, the K steps and the objective), the code a PP=1 forward runs.
- **The tie**: the last stage needs the token embedding when the heads are chained (e_{i+k}) or
  the output layer is tied. DeepSpeed then builds an EmbeddingPipe on the first and the last
  stage and, after every backward, all-reduces the weight's gradient over those two ranks of each
  (data, tensor) coordinate, so both copies take the same step from the summed gradient. Only
  the first stage's copy is saved (the marker has a ``forward_fn``, which DeepSpeed does not
  checkpoint); loading broadcasts it to the last stage.
- **Initialisation**: every rank builds the whole MTPModel from the recipe's seed (the PP=1
  model, weight for weight) and keeps only its stage's modules; the rest is freed after the build.
- **Rank layout**: DeepSpeed's grid (axes pipe, data, model; model fastest) and megatron's
  default order (tp-cp-ep-dp-pp; tp fastest) number ranks the same way;
  :func:`pipeline_topology` checks that the TP, DP and PP groups coincide and refuses otherwise.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist
from deepspeed.pipe import LayerSpec, PipelineModule, TiedLayerSpec
from deepspeed.runtime.pipe.topology import PipeModelDataParallelTopology
from megatron.core import parallel_state
from torch import nn

from mtp_megatron.config import ConfigError
from mtp_megatron.model import MTPModel, MTPOutput
from mtp_megatron.model.objective import StepMetrics
from mtp_megatron.parallel import tensor_parallel_group
from mtp_megatron.train.evaluate import add_batch_stats
from mtp_megatron.train.pipeline_layout import (
    EMBEDDING_INDEX,
    final_stage_index,
    partition_decoder_layers,
)

TIE_KEY = "embed"
_TIED = {"tied_weight_attr": ["embedding.weight"]}  # what DeepSpeed syncs and all-reduces


class _Source:
    """The whole model, built once per rank; the stage modules take their pieces from it."""

    def __init__(self, model: MTPModel):
        self.model: MTPModel | None = model

    def built(self) -> MTPModel:
        """The model, while the stages take their pieces (freed once they have)."""
        assert self.model is not None, "the stage modules are built once, from the model"
        return self.model

    def __repr__(self) -> str:  # DeepSpeed prints LayerSpec arguments
        return "MTPModel"


class EmbeddingPipe(nn.Module):
    """First stage: the vocab-parallel token embedding (tied with the last stage's copy)."""

    def __init__(self, source: _Source):
        super().__init__()
        self.embedding = source.built().trunk.embedding

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.embedding(input_ids)  # [b, s] -> [b, s, h]


def _tie_marker(module: EmbeddingPipe, hidden: torch.Tensor) -> torch.Tensor:
    """The last stage's 'embed' entry: holds the tied copy, passes z through."""
    return hidden


class DecoderLayerPipe(nn.Module):
    """One trunk decoder layer, [b, s, h] -> [b, s, h]."""

    def __init__(self, source: _Source, index: int):
        super().__init__()
        trunk = source.built().trunk
        self.layer = trunk.layers[index]
        self.rope = trunk.rope  # no persistent state: shared by every stage module

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(hidden.shape[1], device=hidden.device)
        return self.layer(hidden, self.rope, positions)  # checkpointed if the model says so


class FinalStagePipe(nn.Module):
    """Last stage: final norm, output layer and every MTP head; computes the loss.

    ``forward`` passes z through (DeepSpeed gives the labels to ``loss_fn`` only); :meth:`loss`
    runs ``MTPModel.final_stage`` on the model object, whose trunk keeps only this stage's
    pieces. In training it records each micro-batch's logged values; in evaluation it adds the
    validation statistics and keeps the last output (for inspection and tests).
    """

    def __init__(self, source: _Source):
        super().__init__()
        model = source.built()
        self.final_norm = model.trunk.final_norm
        self.output_layer = model.trunk.output_layer
        self.rope = model.trunk.rope
        self.mtp = model.mtp
        self._model = (model,)  # a tuple: not registered, so its modules are not listed twice
        self.step: int | None = None
        """The optimizer step being trained (set by the step runner before each batch)."""
        self.records: list[torch.Tensor] = []
        self.eval_sums: dict[str, tuple[float, float]] = {}
        self.last_output: MTPOutput | None = None

    @property
    def model(self) -> MTPModel:
        return self._model[0]

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return hidden

    def loss(self, hidden: torch.Tensor, batch: Sequence[torch.Tensor]) -> torch.Tensor:
        """hidden: z [b, s, h]; batch: (labels [b, s], input_ids [b, s])."""
        labels, input_ids = batch
        if self.training:
            self.last_output = None
            out = self.model.final_stage(
                hidden, input_ids, labels, step=self.step, return_logits=False
            )
            self.records.append(StepMetrics.pack(out))
            return out.loss
        out = self.model.final_stage(hidden, input_ids, labels, return_mtp_logits=True)
        add_batch_stats(self.eval_sums, out, labels, tensor_parallel_group())
        self.last_output = out
        return out.main_loss


def last_stage_needs_embedding(model: MTPModel) -> bool:
    """Chained heads embed t_{i+k}; a tied output layer reads the embedding's weight."""
    chained = model.mtp is not None and model.mtp.chained
    return chained or model.cfg.tie_embeddings


def _numel(module: nn.Module | None) -> int:
    return 0 if module is None else sum(p.numel() for p in module.parameters())


def stage_costs(model: MTPModel) -> tuple[int, int, int]:
    """Parameters of (the first stage's extras, one decoder layer, the last stage's extras)."""
    trunk = model.trunk
    embedding = _numel(trunk.embedding)
    last = _numel(trunk.final_norm) + _numel(trunk.output_layer) + _numel(model.mtp)
    if last_stage_needs_embedding(model):
        last += embedding
    return embedding, _numel(trunk.layers[0]), last


def pipeline_topology() -> PipeModelDataParallelTopology:
    """DeepSpeed's rank grid for megatron's current groups; raises if their groups differ.

    Megatron orders ranks tp-cp-ep-dp-pp (TP fastest), DeepSpeed's grid axes are
    [pipe, data, model] (row-major: model fastest). Both give rank = tp + TP * (dp + DP * pp); the
    check below compares the actual groups so that another megatron order cannot slip through.
    """
    pp = parallel_state.get_pipeline_model_parallel_world_size()
    tp = parallel_state.get_tensor_model_parallel_world_size()
    dp = parallel_state.get_data_parallel_world_size()
    topo = PipeModelDataParallelTopology(num_pp=pp, num_mp=tp, num_dp=dp)
    for axis, ranks in layout_groups(topo).items():
        if ranks["deepspeed"] != ranks["megatron"]:
            raise RuntimeError(
                f"rank {dist.get_rank()}: DeepSpeed's pipeline grid puts it in the {axis} group "
                f"{ranks['deepspeed']}, megatron's parallel_state in {ranks['megatron']}; "
                "initialise megatron with its default rank order (tp-cp-ep-dp-pp)"
            )
    return topo


def layout_groups(topo: PipeModelDataParallelTopology) -> dict[str, dict[str, list[int]]]:
    """This rank's tensor / data / pipeline group, as DeepSpeed's grid and megatron see them."""
    me = topo.get_coord(dist.get_rank())
    megatron = {
        "tensor": parallel_state.get_tensor_model_parallel_group(),
        "data": parallel_state.get_data_parallel_group(),
        "pipeline": parallel_state.get_pipeline_model_parallel_group(),
    }
    deepspeed = {
        "tensor": topo.filter_match(pipe=me.pipe, data=me.data),
        "data": topo.filter_match(pipe=me.pipe, model=me.model),
        "pipeline": topo.filter_match(data=me.data, model=me.model),
    }
    return {
        axis: {
            "deepspeed": sorted(deepspeed[axis]),
            "megatron": sorted(dist.get_process_group_ranks(megatron[axis])),
        }
        for axis in megatron
    }


class MTPPipelineModule(PipelineModule):
    """An MTPModel cut into pipeline stages (see the module docstring)."""

    def __init__(
        self,
        model: MTPModel,
        topology: PipeModelDataParallelTopology,
        partition: str = "uniform",
    ):
        if getattr(model.cfg, "etd", None) is not None:
            raise ConfigError(
                "model.etd with parallel.pipeline_parallel_size > 1 is not supported yet: the "
                "pipeline stages wrap single trunk layers, while ETD's think block, router and "
                "depth cost span several; train ETD with pipeline_parallel_size=1"
            )
        num_layers = model.cfg.num_layers
        source = _Source(model)
        tie = last_stage_needs_embedding(model)
        specs: list[LayerSpec] = [TiedLayerSpec(TIE_KEY, EmbeddingPipe, source, **_TIED)]
        specs += [LayerSpec(DecoderLayerPipe, source, i) for i in range(num_layers)]
        specs.append(LayerSpec(FinalStagePipe, source))
        if tie:
            specs.append(
                TiedLayerSpec(TIE_KEY, EmbeddingPipe, source, forward_fn=_tie_marker, **_TIED)
            )
        assert isinstance(specs[EMBEDDING_INDEX], TiedLayerSpec)
        assert specs[final_stage_index(num_layers)].typename is FinalStagePipe
        stages = topology.get_dim("pipe")
        bounds = partition_decoder_layers(num_layers, stages, partition, stage_costs(model))
        # DeepSpeed calls _partition_layers from its __init__: the plan must exist before
        self._planned_parts = [0] + [1 + b for b in bounds[1:-1]] + [len(specs)]
        super().__init__(specs, topology=topology, partition_method=partition)
        self._heads = model.mtp is not None
        self.embedding_tied = tie
        """True when the last stage holds a tied copy of the embedding."""
        self.decoder_layer_bounds = bounds
        """[b_0 .. b_P]: stage j runs decoder layers b_j .. b_{j+1} - 1."""
        funcs = self.forward_funcs
        self.final_stage = next((f for f in funcs if isinstance(f, FinalStagePipe)), None)
        """This stage's FinalStagePipe (None before the last stage)."""
        self.loss_fn = self.final_stage.loss if self.final_stage is not None else None
        if self.final_stage is not None:  # keep only the last stage's pieces in the model object
            model.trunk.layers = nn.ModuleList()
            if not tie:
                model.trunk.embedding = None  # type: ignore[assignment]  # (freed here)
        source.model = None  # the other stages' modules are freed with it

    def describe(self) -> str:
        """One line: what each stage holds."""
        b, last = self.decoder_layer_bounds, len(self.decoder_layer_bounds) - 2
        stages = []
        for j in range(last + 1):
            parts = ["embedding"] if j == 0 else []
            parts.append(
                f"layers {b[j]}-{b[j + 1] - 1}" if b[j + 1] - b[j] > 1 else f"layer {b[j]}"
            )
            if j == last:
                parts.append("final norm, output layer" + (", MTP heads" if self._heads else ""))
                parts += ["embedding (tied to stage 0)"] if self.embedding_tied else []
            stages.append(f"stage {j}: " + ", ".join(parts))
        return " | ".join(stages)

    def _partition_layers(self, method: str = "uniform") -> None:
        """DeepSpeed's hook: our plan keeps the embedding first and the heads last."""
        self.parts = self._planned_parts
        stage = self._topo.get_coord(self.global_rank).pipe
        self._set_bounds(start=self.parts[stage], stop=self.parts[stage + 1])
