"""PNG plots of a sweep: loss curves of every run on one axis, acceptance per draft position."""

from __future__ import annotations

from pathlib import Path

from mtp_megatron.report.runs import Run


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only; no display needed
    import matplotlib.pyplot as plt

    return plt


def _smooth(values: list[float], weight: float) -> list[float]:
    """TensorBoard-style exponential moving average (weight 0: raw)."""
    out, last = [], None
    for v in values:
        last = v if last is None else weight * last + (1 - weight) * v
        out.append(last)
    return out


def loss_curves(runs: list[Run], path: Path, smooth: float = 0.0) -> None:
    """Left: the training loss each run optimised (main + w * MTP). Right: next-token loss,
    comparable across K: the main head's training loss (lines) and validation loss (markers)."""
    plt = _pyplot()
    fig, (ax_total, ax_main) = plt.subplots(1, 2, figsize=(12, 4.5), sharex=True)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, run in enumerate(runs):
        color = colors[i % len(colors)]
        steps, values = run.curve("train/loss")
        if steps:
            ax_total.plot(steps, _smooth(values, smooth), color=color, lw=1.2, label=run.name)
        steps, values = run.curve("train/main_loss")
        if steps:
            ax_main.plot(
                steps, _smooth(values, smooth), color=color, lw=1.2, label=f"{run.name} train"
            )
        steps, values = run.curve("val/loss_main")
        if steps:
            ax_main.plot(
                steps,
                values,
                color=color,
                ls="none",
                marker="o",
                ms=6,
                mec="black",
                mew=0.6,
                label=f"{run.name} val",
            )
    ax_total.set_title("training loss (main + w·MTP)")
    ax_main.set_title("next-token loss: train (line), validation (markers)")
    for ax in (ax_total, ax_main):
        ax.set_xlabel("step")
        ax.set_ylabel("cross-entropy (nats)")
        ax.grid(alpha=0.3)
    for ax, kw in ((ax_total, {"fontsize": 8}), (ax_main, {"fontsize": 7, "ncol": 2})):
        if ax.get_legend_handles_labels()[0]:  # a run may have no curve (no events yet)
            ax.legend(**kw)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def acceptance(runs: list[Run], path: Path) -> bool:
    """Grouped bars: for each draft position k, one bar per run. False (no file) without MTP."""
    with_heads = [(r, r.heads("val/acceptance_pos_")) for r in runs]
    with_heads = [(r, ks) for r, ks in with_heads if ks]
    if not with_heads:
        return False
    plt = _pyplot()
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    colors_of = {r.name: colors[i % len(colors)] for i, r in enumerate(runs)}  # as loss_curves
    kmax = max(max(ks) for _, ks in with_heads)
    width = 0.8 / len(with_heads)
    fig, ax = plt.subplots(figsize=(max(5, 1.6 * kmax + 2), 4))
    for i, (run, ks) in enumerate(with_heads):
        values = [run.final(f"val/acceptance_pos_{k}") for k in ks]
        xs = [k - 0.4 + width * (i + 0.5) for k in ks]
        bars = ax.bar(xs, values, width=width * 0.95, label=run.name, color=colors_of[run.name])
        ax.bar_label(bars, fmt="%.2f", fontsize=7, padding=1)
    ax.set_xticks(range(1, kmax + 1))
    ax.set_xlabel("draft position k (MTP head k)")
    ax.set_ylabel("acceptance (greedy proxy)")
    ax.set_ylim(0, 1.08)
    ax.set_title("acceptance per draft position (final validation)")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True
