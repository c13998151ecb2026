"""Plan SLURM runs: validate every recipe of a sweep, then write one argument file per array task.

The launch scripts (``launch/slurm/sweep.sh``, ``submit.sh``, ``train.sbatch``) call this module;
it never submits anything. Every run of a sweep is validated for the whole world
(``processes per node x nodes``, as ``python -m mtp_megatron check`` does) before a single file is
written, and every error is reported, so bad input fails before ``sbatch`` runs.

    python -m mtp_megatron.sweep plan --sweep-dir runs/k recipes/ablations/ --nproc 2
    python -m mtp_megatron.sweep plan --sweep-dir runs/k recipes/demo.yaml \\
        --grid model.mtp.num_predict_tokens=2,4 train.steps=100
    python -m mtp_megatron.sweep job RECIPE [key=value ...] --nproc 2 --nnodes 1

``plan`` writes ``<sweep-dir>/_slurm/tasks/<i>.args`` (the recipe, then one override per line,
``train.run_dir`` pinned to ``<sweep-dir>/<run name>`` so a requeued task finds its checkpoints)
and ``<sweep-dir>/_slurm/tasks.tsv`` (task id, run name, recipe, overrides) and prints the number
of tasks. ``job`` validates one run inside a job and prints ``RUN_DIR<TAB>STEPS``.
"""

from __future__ import annotations

import argparse
import itertools
import re
import sys
from dataclasses import dataclass
from pathlib import Path

from mtp_megatron.config import ConfigError

TASKS = "_slurm"
"""Sub-folder of a sweep directory holding the task files and the job logs (not a run)."""


@dataclass
class PlannedRun:
    """One array task: a recipe, its overrides and the run directory they pin."""

    name: str
    recipe: Path
    overrides: list[str]
    run_dir: Path

    def args(self) -> list[str]:
        return [str(self.recipe), *self.overrides, f"train.run_dir={self.run_dir}"]


class SweepError(ConfigError):
    """Bad sweep input: the message says what and how to fix it."""


def split_values(raw: str) -> list[str]:
    """'1,2,[3,4]' -> ['1', '2', '[3,4]']: commas inside brackets or quotes do not split."""
    out, cur, depth, quote = [], "", 0, ""
    for ch in raw:
        if quote:
            quote = "" if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch in "[{":
            depth += 1
        elif ch in "]}":
            depth -= 1
        elif ch == "," and depth == 0:
            out.append(cur)
            cur = ""
            continue
        cur += ch
    out.append(cur)
    return [v.strip() for v in out]


def _axis(spec: str, flag: str) -> tuple[str, list[str]]:
    if "=" not in spec:
        raise SweepError(f"{flag} '{spec}' must look like key.subkey=value1,value2")
    key, raw = spec.split("=", 1)
    values = split_values(raw)
    if not key or any(v == "" for v in values):
        raise SweepError(f"{flag} '{spec}': empty key or value")
    return key, values


def expand_grid(grids: list[str], zips: list[str]) -> list[list[tuple[str, str]]]:
    """Cartesian product of every ``--grid`` axis, times the ``--zip`` axes taken in lockstep."""
    axes = [[[(k, v)] for v in vals] for k, vals in (_axis(g, "--grid") for g in grids)]
    if zips:
        zipped = [_axis(z, "--zip") for z in zips]
        lengths = {len(vals) for _, vals in zipped}
        if len(lengths) != 1:
            detail = ", ".join(f"{k}: {len(v)}" for k, v in zipped)
            raise SweepError(f"--zip lists must have the same length ({detail})")
        axes.append([[(k, vals[i]) for k, vals in zipped] for i in range(lengths.pop())])
    return [sum(combo, []) for combo in itertools.product(*axes)] or [[]]


def find_recipes(inputs: list[str]) -> list[Path]:
    """Recipe files of the inputs (a folder contributes its *.yaml / *.yml, sorted)."""
    recipes: list[Path] = []
    errors = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            found = sorted(p for p in path.iterdir() if p.suffix in (".yaml", ".yml"))
            if not found:
                errors.append(f"folder '{item}' holds no recipes (*.yaml)")
            recipes += found
        elif path.is_file():
            recipes.append(path)
        else:
            errors.append(f"recipe '{item}' does not exist")
    if errors:
        raise SweepError("; ".join(errors))
    if not recipes:
        raise SweepError("no recipes given: pass recipe files or a folder of recipes")
    return [p.resolve() for p in recipes]


_UNSAFE = re.compile(r"[^A-Za-z0-9._=+-]+")


def _run_name(recipe_name: str, point: list[tuple[str, str]], full_keys: bool) -> str:
    parts = [recipe_name] + [f"{k if full_keys else k.rsplit('.', 1)[-1]}={v}" for k, v in point]
    return _UNSAFE.sub("_", "-".join(parts))


def plan(
    inputs: list[str],
    sweep_dir: str | Path,
    overrides: list[str] | None = None,
    grids: list[str] | None = None,
    zips: list[str] | None = None,
    nproc: int = 1,
    nnodes: int = 1,
) -> list[PlannedRun]:
    """Every run of the sweep, validated for ``nproc x nnodes`` processes; raises SweepError."""
    from mtp_megatron.recipe import load_recipe, load_recipe_dict

    overrides = list(overrides or [])
    for item in overrides:
        if "=" not in item:
            raise SweepError(
                f"'{item}' is neither a recipe file, a folder nor a key=value override"
            )
    recipes = find_recipes(inputs)
    points = expand_grid(grids or [], zips or [])
    sweep_dir = Path(sweep_dir).resolve()
    names: dict[Path, str] = {}
    for r in recipes:
        try:
            names[r] = str(load_recipe_dict(r).get("name") or r.stem)
        except ConfigError:
            names[r] = r.stem  # the error is reported below, with the others
    runs = []
    for full_keys in (False, True):
        runs = [
            PlannedRun(
                name,
                r,
                [*overrides, *(f"{k}={v}" for k, v in point), f"name={name}"],
                sweep_dir / name,
            )
            for r in recipes
            for point in points
            for name in [_run_name(names[r], point, full_keys)]
        ]
        if len({run.name for run in runs}) == len(runs):
            break
    seen: dict[str, PlannedRun] = {}
    errors: dict[str, list[str]] = {}  # message -> runs (one line per distinct error)
    for run in runs:
        if run.name in seen:
            msg = (
                f"two runs are named '{run.name}' ({seen[run.name].recipe} and {run.recipe}); "
                "give one of them another 'name:'"
            )
            errors.setdefault(msg, []).append(run.name)
        seen[run.name] = run
        try:
            recipe = load_recipe(run.recipe, run.overrides)
            recipe.dims(nproc * nnodes)
        except ConfigError as e:
            errors.setdefault(str(e), []).append(run.name)
    if errors:
        bad = sum(len(v) for v in errors.values())
        lines = [f"{', '.join(who)}: {msg}" for msg, who in errors.items()]
        raise SweepError(
            f"{bad} of {len(runs)} runs are invalid, nothing submitted:\n  " + "\n  ".join(lines)
        )
    return runs


def write_tasks(runs: list[PlannedRun], sweep_dir: str | Path) -> Path:
    """``<sweep_dir>/_slurm/tasks/<i>.args`` (one argument per line) and ``tasks.tsv``."""
    base = Path(sweep_dir).resolve() / TASKS
    tasks = base / "tasks"
    tasks.mkdir(parents=True, exist_ok=True)
    (base / "logs").mkdir(exist_ok=True)
    for old in tasks.glob("*.args"):
        old.unlink()
    index = ["task\trun\trecipe\toverrides"]
    for i, run in enumerate(runs):
        args = run.args()
        if any("\n" in a for a in args):
            raise SweepError(f"{run.name}: an override holds a newline")
        (tasks / f"{i}.args").write_text("\n".join(args) + "\n")
        index.append(f"{i}\t{run.name}\t{run.recipe}\t{' '.join(run.overrides)}")
    (base / "tasks.tsv").write_text("\n".join(index) + "\n")
    return tasks


def _split_inputs(items: list[str]) -> tuple[list[str], list[str]]:
    """Positional words: ``key=value`` (that is not an existing path) is an override, else an
    input (a recipe file or folder)."""
    inputs: list[str] = []
    overrides: list[str] = []
    for item in items:
        (overrides if "=" in item and not Path(item).exists() else inputs).append(item)
    return inputs, overrides


def main_sweep(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m mtp_megatron sweep",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("plan", help="validate a sweep and write its array task files")
    p.add_argument("items", nargs="+", help="recipe files, folders of recipes, key=value overrides")
    p.add_argument("--sweep-dir", required=True, help="runs go to SWEEP_DIR/<run name>")
    p.add_argument("--grid", action="append", default=[], help="key=v1,v2 (product)")
    p.add_argument("--zip", action="append", default=[], help="key=v1,v2 (in lockstep)")
    p.add_argument("--nproc", type=int, default=1, help="processes per node")
    p.add_argument("--nnodes", type=int, default=1, help="nodes per run")
    p.add_argument("--dry-run", action="store_true", help="validate and list; write nothing")
    j = sub.add_parser("job", help="validate one run (inside a job); print RUN_DIR<TAB>STEPS")
    j.add_argument("recipe")
    j.add_argument("overrides", nargs="*")
    j.add_argument("--nproc", type=int, default=1)
    j.add_argument("--nnodes", type=int, default=1)
    args = parser.parse_args(argv)

    import mtp_megatron  # noqa: F401  (quiets megatron's import-time warnings)

    try:
        if args.command == "job":
            from mtp_megatron.recipe import load_recipe

            recipe = load_recipe(args.recipe, args.overrides)
            recipe.dims(args.nproc * args.nnodes)
            run_dir = Path(recipe.train.run_dir or Path("runs") / recipe.name).resolve()
            print(f"{run_dir}\t{recipe.train.steps}")
            return 0
        inputs, overrides = _split_inputs(args.items)
        runs = plan(inputs, args.sweep_dir, overrides, args.grid, args.zip, args.nproc, args.nnodes)
        for i, run in enumerate(runs):
            print(
                f"# task {i}: {run.name}: {run.recipe.name} {' '.join(run.overrides)}",
                file=sys.stderr,
            )
        if not args.dry_run:
            write_tasks(runs, args.sweep_dir)
        print(len(runs))
        return 0
    except ConfigError as e:  # SweepError included
        print(f"error: {e}", file=sys.stderr)
        return 2
