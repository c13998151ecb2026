"""Acceptance over training: the greedy acceptance proxy of each draft position (head k's top-1
agrees with the main head's at the position it drafts for, teacher-forced on validation data:
``val/acceptance_pos_k``) against the optimizer step, read from the TensorBoard logs of the
reference recipe (``recipes/reference.yaml``: the demo model trained for 1600 steps), trained
here on this machine's processes (one per GPU, 2 on a CPU) with its figures' global batch (2
processes x 4 sequences) and an evaluation every 100 steps."""

from __future__ import annotations

from mtp_megatron.recipe import RECIPES
from mtp_megatron.research.common import Study, pyplot

NAME = "acceptance"
EVAL_EVERY = 100
REFERENCE = RECIPES / "reference.yaml"
REFERENCE_PROCESSES, REFERENCE_SEQUENCES = 2, 8
"""The reference figures' layout: 2 processes x micro-batch 4 sequences per optimizer step."""


def same_global_batch(nproc: int) -> dict:
    """Overrides that keep REFERENCE_SEQUENCES per step on ``nproc`` processes (none on the
    reference's 2, so its finished runs stay reusable)."""
    if nproc == REFERENCE_PROCESSES:
        return {}
    per_process, rest = divmod(REFERENCE_SEQUENCES, nproc)
    if per_process == 0 or rest:
        raise ValueError(
            f"{nproc} processes cannot share {REFERENCE_SEQUENCES} sequences per step evenly: "
            "run the study with a process count that divides it"
        )
    return {"train.micro_batch_size": per_process, "train.grad_accum": 1}


def run(study: Study) -> dict:
    from mtp_megatron.report.runs import load_run

    if study.quick:
        run_dir = study.train("acceptance", {"train.eval_every": 4})
    else:
        from mtp_megatron.parallel import default_process_count

        nproc = default_process_count()
        overrides = {"train.eval_every": EVAL_EVERY, **same_global_batch(nproc)}
        run_dir = study.train("reference", overrides, REFERENCE, shape=False, nproc=nproc)
    logged = load_run(run_dir, "reference")
    k = logged.num_predict_tokens
    curves = {j: logged.curve(f"val/acceptance_pos_{j}") for j in range(1, k + 1)}
    loss_steps, losses = logged.curve("val/loss_main")
    steps = curves[1][0]
    rows = []
    for i, step in enumerate(steps):
        cells = " | ".join(f"{curves[j][1][i]:.3f}" for j in range(1, k + 1))
        loss = dict(zip(loss_steps, losses)).get(step)  # logged at the same evaluations
        rows.append(f"| {step} | {'-' if loss is None else f'{loss:.3f}'} | {cells} |")
    header = " | ".join(f"pos {j}" for j in range(1, k + 1))
    table = "\n".join(
        [
            "Greedy acceptance proxy per draft position on the validation batches, every "
            f"{4 if study.quick else EVAL_EVERY} steps.\n",
            f"| step | val loss (main) | {header} |",
            "|---|---|" + "---|" * k,
            *rows,
        ]
    )
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for j, (xs, ys) in curves.items():
        ax.plot(xs, ys, marker=".", label=f"draft position {j}")
    ax.set(xlabel="optimizer step", ylabel="acceptance (greedy proxy)", ylim=(0, 1))
    ax.legend()
    fig.tight_layout()
    study.out_dir.mkdir(parents=True, exist_ok=True)
    fig.savefig(study.out_dir / "acceptance_over_training.png", dpi=110)
    plt.close(fig)
    results = {
        "steps": steps,
        "val_loss_main": losses,
        **{f"acceptance_pos_{j}": curves[j][1] for j in curves},
    }
    return {"table": table, "results": results}
