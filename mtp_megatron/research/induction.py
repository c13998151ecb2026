"""Induction at small scale (Gloeckle et al., arXiv:2404.19737, section 4.1 and appendix: 2-token
prediction clearly improves induction in models of at most ~30M non-embedding parameters).

The task, made here: sequences of uniformly random tokens in which a span appears twice. Outside
the repeat nothing can be predicted; inside its second copy every token after the first follows
from the first copy, so accuracy there measures induction (find the previous token earlier in
the context, copy what came after it). NTP against n = 2 (K = 1, Meta's independent head on the
trunk) at three model sizes and several seeds, the same data and steps for each.

The models are this repository's (``build_model``, megatron layers, one process); the loop is a
plain AdamW loop over the generated batches, since the trainer reads tokenized text corpora and
this task is generated tensors.
"""

from __future__ import annotations

import statistics

import torch

from mtp_megatron.config import ModelConfig, MTPConfig
from mtp_megatron.research.common import Study, pyplot

NAME = "induction"
VOCAB = 128
SEQ = 64
SPAN = 20
SIZES = ((32, 2), (64, 2), (128, 2))
"""(hidden size, layers): 33k, 0.1M and 0.4M non-embedding parameters."""
SEEDS = (0, 1, 2)
STEPS = 1000
"""Induction forms around step 400-1000 at d64 (at 400 steps: 5% accuracy, at 1000: 98%)."""
EVAL_EVERY = 100
BATCH = 32


def induction_batch(n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """n sequences [n, SEQ] of random tokens with one span of SPAN tokens repeated, and the
    mask [n, SEQ] of the positions whose *next* token is predictable by induction (the second
    copy's positions but its last, i.e. the labels of its 2nd..SPAN-th tokens)."""
    ids = torch.randint(0, VOCAB, (n, SEQ), generator=generator)
    first = torch.randint(0, SEQ // 2 - SPAN, (n,), generator=generator)
    gap = torch.randint(2, SEQ // 2 - SPAN, (n,), generator=generator)
    second = first + SPAN + gap  # < SEQ - SPAN + 1
    offsets = torch.arange(SPAN)
    rows = torch.arange(n)[:, None]
    ids[rows, second[:, None] + offsets] = ids[rows, first[:, None] + offsets]
    mask = torch.zeros(n, SEQ, dtype=torch.bool)
    mask[rows, second[:, None] + offsets[:-1]] = True  # predicts second + 1 .. second + SPAN - 1
    return ids, mask


def induction_accuracy(logits: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor) -> float:
    """Top-1 next-token accuracy [b, s, V] over the masked positions."""
    pred = logits[:, :-1, :VOCAB].argmax(-1)
    hit = (pred == ids[:, 1:]) & mask[:, :-1]
    return hit.sum().item() / mask[:, :-1].sum().item()


def _model_config(hidden: int, layers: int, mtp: bool) -> ModelConfig:
    heads = MTPConfig(
        num_predict_tokens=1,
        head_arrangement="independent",  # Meta: every head a layer on the shared trunk
        share_weights_across_steps=False,
        mtp_loss_weight=1.0,  # Meta sums the n heads' losses
        speculation_lookahead=1,
    )
    return ModelConfig(
        vocab_size=VOCAB,
        hidden_size=hidden,
        num_layers=layers,
        num_attention_heads=4,
        max_seq_len=SEQ,
        norm_placement="pre",
        mtp=heads if mtp else None,
    )


def train_one(hidden: int, layers: int, mtp: bool, seed: int, steps: int) -> dict:
    """One model trained for ``steps``; its induction accuracy every EVAL_EVERY steps."""
    from mtp_megatron import build_model

    torch.manual_seed(seed)
    model = build_model(_model_config(hidden, layers, mtp))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.1, betas=(0.9, 0.95))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 30))
    data = torch.Generator().manual_seed(1000 + seed)  # the same batches for NTP and MTP
    held_out = induction_batch(512, torch.Generator().manual_seed(99))  # one for every model
    curve = {}
    for step in range(1, steps + 1):
        model.train()
        ids, _ = induction_batch(BATCH, data)
        loss = model(ids, return_logits=False).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % EVAL_EVERY == 0 or step == steps:
            model.eval()
            with torch.no_grad():
                curve[step] = induction_accuracy(model(held_out[0]).logits, *held_out)
    non_embedding = sum(p.numel() for p in model.trunk.layers.parameters())
    return {"accuracy": curve[steps], "curve": curve, "non_embedding_params": non_embedding}


def first_step_above(curve: dict[int, float], level: float) -> int | None:
    """The first evaluated step whose accuracy reaches ``level`` (None: never)."""
    return next((s for s, a in sorted(curve.items()) if a >= level), None)


def _mean_sd(values: list[float]) -> str:
    spread = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.2f} ± {spread:.2f}"


def _steps_to(curves: list[dict[int, float]], level: float) -> str:
    found = [first_step_above(c, level) for c in curves]
    return ", ".join("never" if s is None else str(s) for s in found)


def run(study: Study) -> dict:
    from mtp_megatron.parallel import initialize_parallel

    initialize_parallel(tensor_parallel_size=1)
    torch.set_num_threads(2)
    sizes, seeds, steps = (SIZES[:1], SEEDS[:1], 5) if study.quick else (SIZES, SEEDS, STEPS)
    middle = steps // 2 if study.quick else steps // 2 // EVAL_EVERY * EVAL_EVERY
    results: dict = {}
    for hidden, layers in sizes:
        for mtp in (False, True):
            label = f"d{hidden} x {layers}, {'n=2' if mtp else 'NTP'}"
            runs = [train_one(hidden, layers, mtp, s, steps) for s in seeds]
            results[label] = {
                "hidden": hidden,
                "layers": layers,
                "mtp": mtp,
                "non_embedding_params": runs[0]["non_embedding_params"],
                "accuracy_per_seed": [r["accuracy"] for r in runs],
                "curve_per_seed": [r["curve"] for r in runs],
            }
            study.log(
                f"[research] induction {label}: accuracy {results[label]['accuracy_per_seed']}"
            )
    rows = []
    for hidden, layers in sizes:
        ntp, two = (results[f"d{hidden} x {layers}, {m}"] for m in ("NTP", "n=2"))
        cells = []
        for at in (middle, steps):
            for r in (ntp, two):
                cells.append(_mean_sd([c.get(at, c[max(c)]) for c in r["curve_per_seed"]]))
        for r in (ntp, two):
            cells.append(_steps_to(r["curve_per_seed"], 0.5))
        rows.append(
            f"| d{hidden} x {layers} | {ntp['non_embedding_params'] / 1e3:.0f}k | "
            + " | ".join(cells)
            + " |"
        )
    table = "\n".join(
        [
            f"Induction accuracy: top-1 of the main head on the 2nd..{SPAN}th tokens of a span's "
            f"second copy (chance {1 / VOCAB:.3f}), on 512 held-out sequences of {SEQ} random "
            f"tokens (vocabulary {VOCAB}); AdamW steps of {BATCH} sequences; mean ± standard "
            f"deviation over seeds {list(seeds)}; steps to 50%: per seed, evaluated every "
            f"{EVAL_EVERY} steps.\n",
            f"| model | non-embedding params | NTP @ {middle} | n=2 @ {middle} | NTP @ {steps} | "
            f"n=2 @ {steps} | NTP: steps to 50% | n=2: steps to 50% |",
            "|---|---|---|---|---|---|---|---|",
            *rows,
        ]
    )
    plt = pyplot()
    fig, axes = plt.subplots(1, len(sizes), figsize=(4 * len(sizes), 3.3), squeeze=False)
    for ax, (hidden, layers) in zip(axes[0], sizes):
        for mtp, color in ((False, "tab:blue"), (True, "tab:orange")):
            r = results[f"d{hidden} x {layers}, {'n=2' if mtp else 'NTP'}"]
            for i, curve in enumerate(r["curve_per_seed"]):
                xs = sorted(curve)
                name = ("n=2" if mtp else "NTP") if i == 0 else None
                ax.plot(xs, [curve[x] for x in xs], color=color, alpha=0.8, label=name)
        ax.set(title=f"d{hidden} x {layers}", xlabel="step", ylim=(0, 1))
        ax.set_ylabel("induction accuracy")
        ax.legend()
    fig.tight_layout()
    study.out_dir.mkdir(parents=True, exist_ok=True)
    fig.savefig(study.out_dir / "induction.png", dpi=110)
    plt.close(fig)
    for r in results.values():  # JSON keys are strings
        r["curve_per_seed"] = [{str(k): v for k, v in c.items()} for c in r["curve_per_seed"]]
    return {"table": table, "results": results}
