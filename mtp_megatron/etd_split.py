"""Propose an ETD encoder / think / decoder split from a trained model, as ETD chose theirs.

The angular distance of layer i is how far it turns each token's hidden state,
arccos(cos(x_i, x_{i+1})) / pi (0: unchanged, 1: reversed; Gromov et al., arXiv:2403.17887),
averaged over the tokens of validation batches. ETD (arXiv:2510.07358) reads the curve as: early
layers change the state a lot (encoding), a middle stretch changes it little (where iterating
helps: the think block), and the last layers change it a lot again (decoding).

Knees (Kneedle-style, the point farthest below the chord of a convex stretch): the curve is cut
at its flattest interior layer m; on layers 0..m the encoder knee is where the fall flattens out,
on m..N-1 the decoder knee is where the rise starts. The think block runs from the encoder knee
to the decoder knee, both included; the first and last layers always stay outside it.

    python -m mtp_megatron etd-split --checkpoint runs/demo --batches 8
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Iterable

import torch
import torch.nn.functional as F


@torch.no_grad()
def layer_distances(model, batches: Iterable) -> tuple[list[float], int]:
    """Mean angular distance between each layer's input and output [N], and the tokens seen.

    ``model``: an MTPModel or a trunk; its layers are run as a plain stack (an ETD trunk's think
    block once, without its LoRA branches). ``batches``: [b, s] input ids, or (ids, labels) pairs.
    """
    trunk = getattr(model, "trunk", model)
    was_training = trunk.training
    trunk.eval()
    sums = torch.zeros(len(trunk.layers), dtype=torch.float64)
    tokens = 0
    for batch in batches:
        input_ids = batch[0] if isinstance(batch, (tuple, list)) else batch
        input_ids = input_ids.to(trunk.embedding.weight.device)
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        hidden = trunk.embed(input_ids)  # [b, s, h]
        for i, layer in enumerate(trunk.layers):
            out = layer(hidden, trunk.rope, positions)
            cos = F.cosine_similarity(hidden.float(), out.float(), dim=-1).clamp(-1.0, 1.0)
            sums[i] += (torch.arccos(cos) / math.pi).sum().double().cpu()  # [b, s] summed
            hidden = out
        tokens += input_ids.numel()
    trunk.train(was_training)
    if tokens == 0:
        raise ValueError("no validation batches: nothing to measure")
    return (sums / tokens).tolist(), tokens


def _chord_knee(y: list[float], start: int, stop: int, flat_end: int) -> int:
    """Index in [start, stop] farthest below the chord from start to stop, on min-max
    normalised axes; ``flat_end`` when no point lies below it (or the stretch is too short)."""
    if stop - start < 2:
        return flat_end
    seg = y[start : stop + 1]
    lo, hi = min(seg), max(seg)
    span = (hi - lo) or 1.0
    n = len(seg) - 1
    gaps = []
    for j, v in enumerate(seg):
        chord = seg[0] + (seg[-1] - seg[0]) * j / n
        gaps.append((chord - v) / span)
    best = max(range(len(gaps)), key=lambda j: gaps[j])
    return start + best if gaps[best] > 1e-9 else flat_end


def split_from_distances(distances: list[float]) -> dict:
    """Encoder / think / decoder counts from the per-layer distance curve (see the module doc)."""
    n = len(distances)
    if n < 3:  # too few layers for three parts: all of them think
        return dict(
            n_encoder_layers=0,
            n_think_layers=n,
            n_decoder_layers=0,
            flattest_layer=0,
            encoder_knee=0,
            decoder_knee=n - 1,
        )
    m = min(range(1, n - 1), key=lambda i: distances[i])  # flattest interior layer
    enc = _chord_knee(distances, 0, m, flat_end=m)
    dec = _chord_knee(distances, m, n - 1, flat_end=m)
    return dict(
        n_encoder_layers=enc,
        n_think_layers=dec - enc + 1,
        n_decoder_layers=n - 1 - dec,
        flattest_layer=m,
        encoder_knee=enc,
        decoder_knee=dec,
    )


def propose_split(model, batches: Iterable) -> dict:
    """Measure the angular distances of ``model``'s layers on ``batches`` and propose a split.

    Returns 'num_layers', 'tokens', 'angular_distance' (per layer), 'n_encoder_layers',
    'n_think_layers', 'n_decoder_layers' (summing to num_layers), 'flattest_layer',
    'encoder_knee', 'decoder_knee'.
    """
    distances, tokens = layer_distances(model, batches)
    split = split_from_distances(distances)
    return dict(num_layers=len(distances), tokens=tokens, angular_distance=distances, **split)


def format_report(result: dict) -> str:
    """A table of the curve with the proposed parts, and the recipe lines to use it."""
    enc, think = result["n_encoder_layers"], result["n_think_layers"]
    rows = ["| layer | angular distance | part |", "|---|---|---|"]
    for i, d in enumerate(result["angular_distance"]):
        part = "encoder" if i < enc else "think" if i < enc + think else "decoder"
        rows.append(f"| {i} | {d:.4f} {'#' * round(40 * d)} | {part} |")
    rows.append("")
    rows.append(
        f"proposed split {enc}/{think}/{result['n_decoder_layers']} "
        f"(encoder knee {result['encoder_knee']}, flattest layer {result['flattest_layer']}, "
        f"decoder knee {result['decoder_knee']}; {result['tokens']} validation tokens)"
    )
    rows.append(
        f"recipe: model.etd.n_encoder_layers={enc} model.etd.n_think_layers={think} "
        f"model.etd.n_decoder_layers={result['n_decoder_layers']}"
    )
    return "\n".join(rows)


def main_etd_split(argv: list[str] | None = None) -> int:
    """``python -m mtp_megatron etd-split``: measure a trained run and propose its ETD split."""
    from mtp_megatron.config import from_dict
    from mtp_megatron.data.loader import eval_batches, prepare_training_data
    from mtp_megatron.decoding.load import load_run
    from mtp_megatron.recipe import Recipe
    from mtp_megatron.train.consolidate import consolidated_folder

    parser = argparse.ArgumentParser(
        prog="python -m mtp_megatron etd-split",
        description="Angular distance between consecutive layers' hidden states of a trained "
        "run on validation data, and the encoder/think/decoder split at the knees of the curve.",
    )
    parser.add_argument("--checkpoint", required=True, help="run dir, checkpoints/ or step folder")
    parser.add_argument("--batches", type=int, default=8, help="validation batches to average")
    parser.add_argument("--batch-size", type=int, default=None, help="default: the recipe's")
    args = parser.parse_args(argv)
    if args.batches < 1:
        raise ValueError(f"--batches={args.batches} is invalid: must be >= 1")

    run = load_run(consolidated_folder(args.checkpoint))
    recipe = from_dict(Recipe, run.recipe)
    batch_size = args.batch_size or recipe.train.micro_batch_size
    data = prepare_training_data(  # the run's validation data (prepared already: a cache hit)
        recipe.data,
        recipe.model.vocab_size,
        recipe.seq_len,
        train_samples=batch_size,
        validation_samples=batch_size * args.batches,
        seed=recipe.train.seed,
    )
    batches = eval_batches(data.validation, batch_size, args.batches)
    result = propose_split(run.model, batches)
    result["checkpoint"] = run.metadata.get("checkpoint", str(run.folder))
    print(format_report(result))
    out = run.folder / "etd_split.json"
    out.write_text(json.dumps(result, indent=2))
    print(f"results: {out}")
    return 0
