"""Aynetdinov & Akbik (ACL 2025, arXiv:2505.22757): a forward curriculum (next-token prediction
first, one MTP step added per stage) and a reverse one (all K first, one removed per stage)
against fixed K: next-token quality, and tokens per trunk forward of self-speculative decoding."""

from __future__ import annotations

from typing import Any

from mtp_megatron.research.common import Study, decoding_stats, final_eval, percent, pyplot

NAME = "curriculum"
K = 3
PAPER = (
    "forward: next-token quality near or above fixed MTP and the best self-speculative "
    "speed-up for small models; reverse: the best next-token quality, but it loses the "
    "self-speculative speed-up (the heads were trained last long ago)"
)


def run(study: Study) -> dict:
    base = {"model.mtp.num_predict_tokens": K}
    runs = {
        "NTP": study.train("ntp", {"model.mtp": "null"}),
        f"fixed K={K}": study.train("k3", base),
        "forward": study.train("k3-forward", {**base, "train.mtp.curriculum": "forward"}),
        "reverse": study.train("k3-reverse", {**base, "train.mtp.curriculum": "reverse"}),
    }
    prompts, new = (2, 8) if study.quick else (16, 64)
    rows, results = [], {}
    for label, run_dir in runs.items():
        ev = final_eval(run_dir)
        r: dict[str, Any] = {
            "val_loss_main": ev["val/loss_main"],
            "val_acc_main": ev["val/acc_main"],
        }
        if label != "NTP":
            r |= decoding_stats(run_dir, K, prompts, new)
            speculative = f"{percent(r['acceptance_per_position'])} | {r['tokens_per_forward']:.2f}"
        else:
            speculative = "- | 1.00"
        results[label] = r
        rows.append(
            f"| {label} | {r['val_loss_main']:.3f} | {r['val_acc_main']:.3f} | {speculative} |"
        )
    table = "\n".join(
        [
            f"Next-token validation loss / top-1 accuracy after training; greedy "
            f"self-speculative decoding at lookahead {K}, {prompts} held-out prompts x {new} "
            "new tokens.\n",
            "| schedule | val loss (main) | top-1 (main) | acceptance per draft position | "
            "tokens per forward |",
            "|---|---|---|---|---|",
            *rows,
        ]
    )
    plt = pyplot()
    fig, (ax_loss, ax_tpf) = plt.subplots(1, 2, figsize=(9, 3.5))
    labels = list(results)
    ax_loss.bar(labels, [results[x]["val_loss_main"] for x in labels])
    low = min(results[x]["val_loss_main"] for x in labels)
    ax_loss.set(ylabel="val loss (main head)", ylim=(low - 0.2, None))
    ax_tpf.bar(labels, [results[x].get("tokens_per_forward", 1.0) for x in labels])
    ax_tpf.set(ylabel=f"tokens per forward (L={K})")
    fig.tight_layout()
    study.out_dir.mkdir(parents=True, exist_ok=True)
    fig.savefig(study.out_dir / "curriculum.png", dpi=110)
    plt.close(fig)
    return {"table": table, "results": results}
