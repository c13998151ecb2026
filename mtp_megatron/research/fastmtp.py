"""FastMTP (arXiv:2509.18362): one shared chained head trained to predict K=3 steps, against a
K=1 head applied recursively ("vanilla" MTP drafting past what it was trained for), both
drafting 3 tokens: acceptance per draft position and tokens per trunk forward."""

from __future__ import annotations

from mtp_megatron.research.common import Study, decoding_stats, final_eval, percent, pyplot

NAME = "fastmtp"
PAPER = "about 81 / 56 / 36% (shared head, K=3) vs 70 / 10 / 0% (K=1 recursion), 7B"
LOOKAHEAD = 3


def run(study: Study) -> dict:
    runs = {
        "shared head, K=3": study.train("k3", {"model.mtp.num_predict_tokens": 3}),
        "K=1 head, recursion": study.train(
            "k1",
            {"model.mtp.num_predict_tokens": 1, "model.mtp.speculation_lookahead": 1},
        ),
    }
    prompts, new = (2, 8) if study.quick else (16, 64)
    rows, results = [], {}
    for label, run_dir in runs.items():
        stats = decoding_stats(run_dir, LOOKAHEAD, prompts, new)
        ev = final_eval(run_dir)
        results[label] = {**stats, "val_loss_main": ev["val/loss_main"]}
        rows.append(
            f"| {label} | {ev['val/loss_main']:.3f} | "
            f"{percent(stats['acceptance_per_position'])} | {stats['tokens_per_forward']:.2f} |"
        )
    table = "\n".join(
        [
            f"Greedy drafting of {LOOKAHEAD} tokens per round, {prompts} held-out prompts x "
            f"{new} new tokens.\n",
            "| drafter | val loss (main) | acceptance per draft position | tokens per forward |",
            "|---|---|---|---|",
            *rows,
            f"| paper (Qwen2.5-7B) | - | {PAPER} | - |",
        ]
    )
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for label, r in results.items():
        ax.plot(range(1, LOOKAHEAD + 1), r["acceptance_per_position"], marker="o", label=label)
    ax.set(xlabel="draft position", ylabel="acceptance", ylim=(0, 1), xticks=[1, 2, 3])
    ax.legend()
    fig.tight_layout()
    study.out_dir.mkdir(parents=True, exist_ok=True)
    fig.savefig(study.out_dir / "acceptance.png", dpi=110)
    plt.close(fig)
    return {"table": table, "results": results}
