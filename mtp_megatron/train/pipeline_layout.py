"""Where each piece of the model sits in a pipeline (no DeepSpeed import: config checks, decoding
and tests use it too).

Notation: L decoder layers, P pipeline stages.

The pipeline's layer list (``train/pipeline.py``) and each entry's state-dict keys:

    index           module              its keys            MTPModel keys
    0               EmbeddingPipe       embedding.*         trunk.embedding.*
    1 .. L          DecoderLayerPipe    layer.*             trunk.layers.{index-1}.*
    L+1             FinalStagePipe      final_norm.*        trunk.final_norm.*
                                        output_layer.*      trunk.output_layer.*
                                        mtp.*               mtp.*
    L+2 (optional)  the embedding tie   (none saved: the first stage's copy is the weight)

The embedding is always on the first stage and entries L+1, L+2 on the last; the decoder layers
are split by :func:`partition_decoder_layers`. A layer's checkpoint file is named by its index,
so the files do not depend on the split.
"""

from __future__ import annotations

EMBEDDING_INDEX = 0
PARTITIONS = ("uniform", "parameters")


def final_stage_index(num_layers: int) -> int:
    """Index of the FinalStagePipe in the pipeline's layer list."""
    return num_layers + 1


def model_key(layer_index: int, key: str, num_layers: int) -> str:
    """The MTPModel name of ``key`` in the state dict of pipeline layer ``layer_index``."""
    if layer_index == EMBEDDING_INDEX:
        return f"trunk.{key}"
    if 1 <= layer_index <= num_layers:
        if not key.startswith("layer."):
            raise KeyError(f"decoder layer {layer_index} has unexpected key {key!r}")
        return f"trunk.layers.{layer_index - 1}.{key.removeprefix('layer.')}"
    if layer_index == final_stage_index(num_layers):
        return key if key.startswith("mtp.") else f"trunk.{key}"
    raise KeyError(f"pipeline layer {layer_index} holds no weights (model of {num_layers} layers)")


def module_key(name: str, num_layers: int) -> str:
    """A PipelineModule parameter name ('3.layer.mlp...', 'tied_modules.embed.embedding.weight')
    -> the MTPModel name."""
    if name.startswith("tied_modules.embed."):
        return model_key(EMBEDDING_INDEX, name.removeprefix("tied_modules.embed."), num_layers)
    index, key = name.split(".", 1)
    return model_key(int(index), key, num_layers)


def partition_decoder_layers(
    num_layers: int,
    num_stages: int,
    method: str = "uniform",
    costs: tuple[int, int, int] = (0, 1, 0),
) -> list[int]:
    """Bounds [0 = b_0 < b_1 < ... < b_P = L]: stage j runs decoder layers b_j .. b_{j+1} - 1.

    'uniform': equal counts, the first stages take the remainder (DeepSpeed's
    ``partition_uniform``; the last stage also holds the heads). 'parameters': the contiguous
    split minimising the largest stage, with ``costs`` = (first stage's extra parameters, one
    layer's, the last stage's extra). Every stage gets at least one layer.
    """
    if not 1 <= num_stages <= num_layers:
        raise ValueError(
            f"{num_stages} pipeline stages need at least as many decoder layers (have {num_layers})"
        )
    if method == "uniform":
        chunk, rest = divmod(num_layers, num_stages)
        return [j * chunk + min(j, rest) for j in range(num_stages + 1)]
    if method != "parameters":
        raise ValueError(f"pipeline partition {method!r}: must be one of {PARTITIONS}")
    first, per_layer, last = costs

    def cost(stage: int, n: int) -> int:
        extra = (first if stage == 0 else 0) + (last if stage == num_stages - 1 else 0)
        return extra + n * per_layer

    # best[j][i]: the smallest largest-stage cost of layers 0..i-1 on stages 0..j-1
    inf = float("inf")
    best = [[inf] * (num_layers + 1) for _ in range(num_stages + 1)]
    cut = [[0] * (num_layers + 1) for _ in range(num_stages + 1)]
    best[0][0] = 0
    for j in range(1, num_stages + 1):
        for i in range(j, num_layers + 1):
            for k in range(j - 1, i):  # stage j-1 runs layers k .. i-1 (at least one)
                value = max(best[j - 1][k], cost(j - 1, i - k))
                if value < best[j][i]:
                    best[j][i], cut[j][i] = value, k
    bounds = [num_layers]
    for j in range(num_stages, 0, -1):
        bounds.append(cut[j][bounds[-1]])
    return bounds[::-1]
