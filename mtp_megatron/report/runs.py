"""Find the runs under a folder and read their TensorBoard scalars, merged across launches.

A run is a folder with the ``recipe.yaml`` the trainer writes; its TensorBoard logs are one or
more ``<timestamp>/`` folders (one per launch that started from scratch; a resumed launch keeps
writing into the folder it started). Folders are merged by step in name (= time) order, a later
value of a tag at a step replacing an earlier one.
"""

from __future__ import annotations

import json
import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from mtp_megatron.config import ConfigError

EVENTS = "events.out.tfevents"


class ReportError(ConfigError):
    """Bad report input: the message says what and where."""


@dataclass
class Run:
    """One run: its scalars by tag and step, its resolved recipe and final evaluation."""

    name: str
    path: Path
    recipe: dict
    scalars: dict[str, dict[int, float]] = field(default_factory=dict)
    final_eval: dict[str, float] = field(default_factory=dict)

    @property
    def num_predict_tokens(self) -> int:
        """K (0 for a next-token-only run)."""
        mtp = (self.recipe.get("model") or {}).get("mtp")
        return int(mtp.get("num_predict_tokens", 0)) if mtp else 0

    @property
    def description(self) -> str:
        return str(self.recipe.get("description") or "")

    @property
    def last_step(self) -> int | None:
        steps = [max(v) for v in self.scalars.values() if v]
        return max(steps) if steps else None

    def curve(self, tag: str) -> tuple[list[int], list[float]]:
        points = sorted(self.scalars.get(tag, {}).items())
        return [s for s, _ in points], [v for _, v in points]

    def final(self, tag: str) -> float | None:
        """The tag's value at its last step; else final_eval.json's (or decode_benchmark.json's)."""
        values = self.scalars.get(tag)
        if values:
            return values[max(values)]
        return self.final_eval.get(tag)

    def median(self, tag: str) -> float | None:
        values = list(self.scalars.get(tag, {}).values())
        return statistics.median(values) if values else None

    def heads(self, prefix: str) -> list[int]:
        """k of every tag ``prefix<k>`` present (e.g. 'val/acceptance_pos_' -> [1, 2, 3])."""
        ks = {
            int(t[len(prefix) :])
            for t in (*self.scalars, *self.final_eval)
            if t.startswith(prefix) and t[len(prefix) :].isdigit()
        }
        return sorted(ks)


def tb_folders(run_dir: Path) -> list[Path]:
    """The run's TensorBoard folders (those holding event files), oldest first."""
    candidates = [run_dir, *sorted(p for p in run_dir.iterdir() if p.is_dir())]
    return [p for p in candidates if any(p.glob(f"{EVENTS}*"))]


def read_scalars(folder: Path) -> dict[str, dict[int, float]]:
    """Every scalar of one TensorBoard folder: {tag: {step: value}} (all events kept)."""
    from tensorboard.backend.event_processing import event_accumulator as ea

    acc = ea.EventAccumulator(str(folder), size_guidance={ea.SCALARS: 0})
    acc.Reload()
    out: dict[str, dict[int, float]] = {}
    for tag in acc.Tags().get("scalars", []):
        out[tag] = {e.step: float(e.value) for e in acc.Scalars(tag) if math.isfinite(e.value)}
    return out


def load_run(run_dir: Path, name: str) -> Run:
    try:
        recipe = yaml.safe_load((run_dir / "recipe.yaml").read_text()) or {}
    except yaml.YAMLError as e:
        raise ReportError(f"{run_dir / 'recipe.yaml'} is not valid YAML: {e}") from e
    run = Run(name=name, path=run_dir, recipe=recipe if isinstance(recipe, dict) else {})
    for folder in tb_folders(run_dir):
        for tag, values in read_scalars(folder).items():
            run.scalars.setdefault(tag, {}).update(values)
    final = run_dir / "final_eval.json"
    if final.is_file():
        try:
            run.final_eval = {k: float(v) for k, v in json.loads(final.read_text()).items()}
        except (ValueError, TypeError, AttributeError) as e:
            raise ReportError(f"{final} is not a JSON object of numbers: {e}") from e
    bench = run_dir / "decode_benchmark.json"  # bench-decode also logs decode/* to TensorBoard
    if bench.is_file() and "decode/speedup" not in run.scalars:
        try:
            data = json.loads(bench.read_text())
            run.final_eval["decode/speedup"] = float(data["best_speedup"])
            run.final_eval["decode/best_lookahead"] = float(data["best_lookahead"])
        except (ValueError, TypeError, KeyError) as e:
            raise ReportError(f"{bench} lacks best_speedup / best_lookahead: {e}") from e
    return run


def find_runs(root: str | Path) -> list[Run]:
    """Every run under ``root`` (or ``root`` itself), named by its path relative to ``root``."""
    root = Path(root)
    if not root.is_dir():
        raise ReportError(f"'{root}' is not a folder; pass the folder of a sweep (e.g. runs/k)")
    dirs = sorted(
        p.parent
        for p in root.rglob("recipe.yaml")
        if "checkpoints" not in p.relative_to(root).parts
    )
    if not dirs:
        raise ReportError(
            f"no runs under '{root}': a run is a folder with the recipe.yaml that "
            "`python -m mtp_megatron train` writes (has the sweep started?)"
        )
    return [load_run(d, d.name if d == root else str(d.relative_to(root))) for d in dirs]
