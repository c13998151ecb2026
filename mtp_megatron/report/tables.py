"""The side-by-side table of a sweep: one row per run, as CSV and as markdown."""

from __future__ import annotations

import csv
import io

from mtp_megatron.report.runs import Run


def _kmax(runs: list[Run], prefix: str) -> int:
    return max((max(r.heads(prefix), default=0) for r in runs), default=0)


def rows(runs: list[Run]) -> list[dict[str, object]]:
    """One dict per run; every run has every column (None where the run has no such head)."""
    k_loss = _kmax(runs, "val/loss_mtp_step_")
    k_acc = _kmax(runs, "val/acceptance_pos_")
    out = []
    for r in runs:
        row: dict[str, object] = {
            "run": r.name,
            "num_predict_tokens": r.num_predict_tokens,
            "steps": r.last_step,
            "train_loss": r.final("train/loss"),
            "train_main_loss": r.final("train/main_loss"),
            "val_loss_main": r.final("val/loss_main"),
        }
        for k in range(1, k_loss + 1):
            row[f"val_loss_mtp_step_{k}"] = r.final(f"val/loss_mtp_step_{k}")
        row["val_acc_main"] = r.final("val/acc_main")
        for k in range(1, k_loss + 1):
            row[f"val_acc_mtp_step_{k}"] = r.final(f"val/acc_mtp_step_{k}")
        for k in range(1, k_acc + 1):
            row[f"acceptance_pos_{k}"] = r.final(f"val/acceptance_pos_{k}")
        row["tokens_per_s_median"] = r.median("train/tokens_per_s")
        row["decode_speedup"] = r.final("decode/speedup")
        lookahead = r.final("decode/best_lookahead")
        row["decode_best_lookahead"] = None if lookahead is None else int(lookahead)
        row["description"] = r.description
        out.append(row)
    return out


def to_csv(table: list[dict[str, object]]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(table[0]), lineterminator="\n")
    writer.writeheader()
    for row in table:
        writer.writerow({k: "" if v is None else v for k, v in row.items()})
    return buf.getvalue()


def _fmt(value: object, digits: int) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def _markdown(
    table: list[dict[str, object]], columns: list[tuple[str, str, int]], best: dict[str, str]
) -> str:
    """``columns``: (key, header, digits); ``best``: key -> 'min' | 'max' (bold the best run)."""
    lines = [
        "| " + " | ".join(h for _, h, _ in columns) + " |",
        "|"
        + "|".join("---" if k in ("run", "description") else "---:" for k, _, _ in columns)
        + "|",
    ]
    bests = {}
    for key, how in best.items():
        values = [v for row in table if isinstance(v := row.get(key), float)]
        if len(values) > 1:
            bests[key] = min(values) if how == "min" else max(values)
    for row in table:
        cells = []
        for key, _, digits in columns:
            text = _fmt(row.get(key), digits)
            if key in bests and row.get(key) == bests[key]:
                text = f"**{text}**"
            cells.append(text)
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def to_markdown(table: list[dict[str, object]]) -> str:
    """Two tables: losses per head, then speculation (accuracy, acceptance, speed)."""
    keys = list(table[0])
    loss_cols = [
        ("run", "run", 0),
        ("num_predict_tokens", "K", 0),
        ("steps", "steps", 0),
        ("train_loss", "train loss", 4),
        ("train_main_loss", "train main", 4),
        ("val_loss_main", "val main", 4),
    ]
    loss_cols += [
        (k, f"val mtp {k.rsplit('_', 1)[1]}", 4) for k in keys if k.startswith("val_loss_mtp_step_")
    ]
    loss_cols.append(("description", "recipe", 0))
    spec_cols = [("run", "run", 0), ("val_acc_main", "top-1 main", 3)]
    spec_cols += [
        (k, f"top-1 mtp {k.rsplit('_', 1)[1]}", 3)
        for k in keys
        if k.startswith("val_acc_mtp_step_")
    ]
    spec_cols += [
        (k, f"accept pos {k.rsplit('_', 1)[1]}", 3) for k in keys if k.startswith("acceptance_pos_")
    ]
    spec_cols.append(("tokens_per_s_median", "tokens/s (median)", 0))
    if any(row.get("decode_speedup") is not None for row in table):
        spec_cols += [
            ("decode_speedup", "decode speed-up", 2),
            ("decode_best_lookahead", "at lookahead", 0),
        ]
    best = {k: "min" for k, _, _ in loss_cols if k.startswith(("val_loss", "train_main"))}
    best.update({k: "max" for k, _, _ in spec_cols if k not in ("run", "decode_best_lookahead")})
    return (
        "### Losses (final step; validation per head)\n\n"
        + _markdown(table, loss_cols, best)
        + "\n\n### Speculation (validation top-1 accuracy, greedy acceptance per draft position)"
        + "\n\n"
        + _markdown(table, spec_cols, best)
    )
