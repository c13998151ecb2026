"""The sweep report over fabricated TensorBoard runs, and sweep.sh's input checks (no SLURM).

sweep.sh runs with a fake ``sbatch`` first on PATH that records its calls: bad input must fail
before it is called, good input must call it once with the whole array.
"""

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from torch.utils.tensorboard import SummaryWriter

from mtp_megatron.report import main_report
from mtp_megatron.sweep import SweepError, expand_grid, plan, split_values

REPO = Path(__file__).resolve().parents[2]
SWEEP = REPO / "launch" / "slurm" / "sweep.sh"
PNG = b"\x89PNG\r\n\x1a\n"


def _write_tb(folder: Path, scalars: dict[str, dict[int, float]]) -> None:
    writer = SummaryWriter(str(folder))
    for tag, values in scalars.items():
        for step, value in values.items():
            writer.add_scalar(tag, value, step)
    writer.close()


def _run(
    root: Path,
    name: str,
    k: int | None,
    launches: list[tuple[str, dict]],
    final_eval: dict | None = None,
) -> Path:
    run = root / name
    run.mkdir(parents=True)
    mtp = None if k is None else {"num_predict_tokens": k, "mtp_head_type": "transformer"}
    recipe = {"name": name, "description": f"{name} run", "model": {"mtp": mtp}}
    (run / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    for stamp, scalars in launches:
        _write_tb(run / stamp, scalars)
    if final_eval:
        (run / "final_eval.json").write_text(json.dumps(final_eval))
    (run / "checkpoints").mkdir()
    return run


@pytest.fixture
def sweep_dir(tmp_path):
    """Two runs. 'mtp': K=2, preempted before its first checkpoint, so two TensorBoard folders
    whose steps overlap (the second launch's values win); 'ntp': one folder, no heads."""
    root = tmp_path / "sweep"
    first = {
        "train/loss": {s: 10.0 - s * 0.25 for s in range(1, 9)},
        "train/main_loss": {s: 6.0 for s in range(1, 9)},
        "train/tokens_per_s": {s: 1000.0 for s in range(1, 9)},
    }
    second = {
        "train/loss": {s: 9.0 - s * 0.25 for s in range(5, 21)},  # step 20: 4.0
        "train/main_loss": {s: 3.5 for s in range(5, 21)},
        "train/tokens_per_s": {s: 2000.0 + s for s in range(5, 21)},  # median over all steps
        "val/loss_main": {10: 4.5, 20: 3.75},
        "val/loss_mtp_step_1": {10: 5.0, 20: 4.25},
        "val/loss_mtp_step_2": {10: 5.5, 20: 4.75},
        "val/acc_main": {20: 0.5},
        "val/acc_mtp_step_1": {20: 0.375},
        "val/acc_mtp_step_2": {20: 0.25},
        "val/acceptance_pos_1": {10: 0.5, 20: 0.75},
        "val/acceptance_pos_2": {10: 0.25, 20: 0.625},
        "decode/speedup": {20: 1.5},
        "decode/best_lookahead": {20: 2.0},
    }
    _run(root, "mtp", 2, [("20260101-000000", first), ("20260101-000100", second)])
    ntp = {
        "train/loss": {s: 5.0 - s * 0.125 for s in range(1, 21)},  # step 20: 2.5
        "train/main_loss": {s: 5.0 - s * 0.125 for s in range(1, 21)},
        "train/tokens_per_s": {1: 100.0, 2: 3000.0, 3: 3100.0},
        "val/acc_main": {20: 0.5},
    }
    # val/loss_main missing from the logs: taken from final_eval.json
    _run(
        root,
        "ntp",
        None,
        [("20260101-000000", ntp)],
        final_eval={"val/loss_main": 3.25, "val/acc_main": 0.5},
    )
    (root / "_slurm" / "logs").mkdir(parents=True)  # a sweep's task files are not a run
    return root


def test_report_table_values_and_plots(sweep_dir, tmp_path, capsys):
    out = tmp_path / "out"
    assert main_report([str(sweep_dir), "--out", str(out)]) == 0
    with open(out / "report.csv") as f:
        rows = {r["run"]: r for r in csv.DictReader(f)}
    assert sorted(rows) == ["mtp", "ntp"]
    mtp, ntp = rows["mtp"], rows["ntp"]
    assert mtp["num_predict_tokens"] == "2" and ntp["num_predict_tokens"] == "0"
    assert mtp["steps"] == "20"
    assert float(mtp["train_loss"]) == 4.0  # the second launch's value at the last step
    assert float(mtp["train_main_loss"]) == 3.5
    assert float(mtp["val_loss_main"]) == 3.75
    assert float(mtp["val_loss_mtp_step_1"]) == 4.25
    assert float(mtp["val_loss_mtp_step_2"]) == 4.75
    assert float(mtp["val_acc_mtp_step_2"]) == 0.25
    assert float(mtp["acceptance_pos_1"]) == 0.75
    assert float(mtp["acceptance_pos_2"]) == 0.625
    # steps 1-4 from the first launch (1000), 5-20 from the second (2005..2020): median 2010.5
    assert float(mtp["tokens_per_s_median"]) == 2010.5
    assert float(mtp["decode_speedup"]) == 1.5 and mtp["decode_best_lookahead"] == "2"
    assert float(ntp["train_loss"]) == 2.5
    assert float(ntp["val_loss_main"]) == 3.25  # from final_eval.json
    assert float(ntp["tokens_per_s_median"]) == 3000.0
    assert ntp["acceptance_pos_1"] == ntp["val_loss_mtp_step_1"] == ntp["decode_speedup"] == ""

    md = (out / "report.md").read_text()
    assert "| mtp | 2 | 20 | 4.0000 | 3.5000 | 3.7500 | 4.2500 | 4.7500 | mtp run |" in md
    # best per column in bold (a column with one value has no best)
    assert "| ntp | 0 | 20 | 2.5000 | **2.5000** | **3.2500** | - | - | ntp run |" in md
    assert "| mtp | **0.500** | 0.375 | 0.250 | 0.750 | 0.625 | 2010 | 1.50 | 2 |" in md
    assert "| ntp | **0.500** | - | - | - | - | **3000** | - | - |" in md
    assert "![loss curves](loss_curves.png)" in md and "acceptance.png" in md
    for png in ("loss_curves.png", "acceptance.png"):
        data = (out / png).read_bytes()
        assert data.startswith(PNG) and len(data) > 10_000, png
    assert "wrote" in capsys.readouterr().out


def test_report_defaults_to_the_runs_dir_and_lists_runs_without_events(sweep_dir):
    run = sweep_dir / "pending"
    run.mkdir()
    (run / "recipe.yaml").write_text("name: pending\nmodel: {mtp: null}\n")
    assert main_report([str(sweep_dir)]) == 0
    md = (sweep_dir / "report.md").read_text()
    assert "No TensorBoard events yet: pending." in md
    assert "| pending | 0 | - | - |" in md


def test_decode_speedup_from_the_benchmark_file_when_not_in_tensorboard(tmp_path):
    run = _run(tmp_path / "s", "k4", 4, [("t", {"train/loss": {1: 2.0}})])
    (run / "decode_benchmark.json").write_text(
        json.dumps({"rows": [], "best_speedup": 1.75, "best_lookahead": 3})
    )
    assert main_report([str(tmp_path / "s")]) == 0
    with open(tmp_path / "s" / "report.csv") as f:
        (row,) = csv.DictReader(f)
    assert (row["decode_speedup"], row["decode_best_lookahead"]) == ("1.75", "3")


def test_report_of_ntp_runs_only_has_no_acceptance_plot(tmp_path):
    _run(tmp_path / "s", "ntp", None, [("t", {"train/loss": {1: 2.0}, "val/loss_main": {1: 2.5}})])
    assert main_report([str(tmp_path / "s")]) == 0
    assert (tmp_path / "s" / "loss_curves.png").is_file()
    assert not (tmp_path / "s" / "acceptance.png").exists()
    assert "No run has MTP heads" in (tmp_path / "s" / "report.md").read_text()


@pytest.mark.parametrize("what", ["empty", "missing", "file"])
def test_report_bad_input_is_a_clear_error(tmp_path, capsys, what):
    target = tmp_path / "runs"
    if what == "empty":
        (target / "nothing_here").mkdir(parents=True)
    elif what == "file":
        target.write_text("x")
    assert main_report([str(target)]) == 2
    err = capsys.readouterr().err
    assert ("no runs under" if what == "empty" else "is not a folder") in err


# ---------------------------------------------------------------- sweep planning (in process)
def test_grid_and_zip_expand():
    assert split_values("1,2,[3,4],'a,b'") == ["1", "2", "[3,4]", "'a,b'"]
    points = expand_grid(
        ["train.lr=0.001,0.003"],
        ["model.mtp.num_predict_tokens=1,2", "model.mtp.speculation_lookahead=1,2"],
    )
    assert len(points) == 4
    assert points[0] == [
        ("train.lr", "0.001"),
        ("model.mtp.num_predict_tokens", "1"),
        ("model.mtp.speculation_lookahead", "1"),
    ]
    with pytest.raises(SweepError, match="same length"):
        expand_grid([], ["a.b=1,2", "c.d=1"])


def test_plan_pins_a_run_directory_per_task(tmp_path):
    runs = plan(
        [str(REPO / "recipes" / "demo.yaml")],
        tmp_path / "k",
        ["train.steps=5"],
        zips=["model.mtp.num_predict_tokens=1,2", "model.mtp.speculation_lookahead=1,2"],
        nproc=2,
    )
    assert [r.name for r in runs] == [
        "demo-num_predict_tokens=1-speculation_lookahead=1",
        "demo-num_predict_tokens=2-speculation_lookahead=2",
    ]
    args = runs[1].args()
    assert args[0] == str(REPO / "recipes" / "demo.yaml")
    assert "model.mtp.num_predict_tokens=2" in args and "train.steps=5" in args
    assert args[-1] == f"train.run_dir={(tmp_path / 'k').resolve() / runs[1].name}"


def test_plan_rejects_missing_recipes_and_empty_folders(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(SweepError) as e:
        plan([str(tmp_path / "empty"), str(tmp_path / "nope.yaml")], tmp_path / "k")
    assert str(e.value) == (
        f"folder '{tmp_path / 'empty'}' holds no recipes (*.yaml); "
        f"recipe '{tmp_path / 'nope.yaml'}' does not exist"
    )


def test_plan_reports_every_invalid_run(tmp_path):
    with pytest.raises(SweepError) as e:
        plan(
            [str(REPO / "recipes" / "demo.yaml")],
            tmp_path / "k",
            # unshared heads: none drafts past its own step
            ["model.mtp.share_weights_across_steps=false"],
            grids=["model.mtp.num_predict_tokens=1,2,4"],
        )
    msg = str(e.value)
    assert "1 of 3 runs are invalid, nothing submitted" in msg
    assert "demo-num_predict_tokens=1" not in msg  # K=1: one chained head, drafts by recursion
    assert (
        "\n  demo-num_predict_tokens=2: model.mtp.speculation_lookahead=3 is invalid: must be "
        "between 1 and num_predict_tokens (2)"
    ) in msg
    assert "demo-num_predict_tokens=4" not in msg
    with pytest.raises(SweepError, match="cannot be split into tensor_parallel_size"):
        plan(
            [str(REPO / "recipes" / "demo.yaml")],
            tmp_path / "k",
            ["parallel.tensor_parallel_size=2"],
            nproc=3,
        )


# ---------------------------------------------------------------- sweep.sh with a fake sbatch
@pytest.fixture
def fake_sbatch(tmp_path):
    """A recording ``sbatch`` first on PATH; returns (env, calls file)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    calls = tmp_path / "sbatch_calls"
    (bin_dir / "sbatch").write_text(f'#!/bin/sh\necho "$*" >> {calls}\necho 4242\n')
    (bin_dir / "sbatch").chmod(0o755)
    return dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}"), calls


def _sweep(env, *args, cwd):
    return subprocess.run(
        [str(SWEEP), *args], env=env, cwd=cwd, capture_output=True, text=True, timeout=120
    )


@pytest.mark.parametrize("case", ["missing_recipe", "unknown_key", "empty_folder"])
def test_sweep_bad_input_fails_before_submitting(tmp_path, fake_sbatch, case):
    env, calls = fake_sbatch
    ablations = str(REPO / "recipes" / "ablations")
    names = sorted(p.stem for p in (REPO / "recipes" / "ablations").glob("*.yaml"))
    n = len(names)
    empty = tmp_path / "no_recipes"
    empty.mkdir()
    (empty / "notes.txt").write_text("not a recipe")
    args, expected = {
        "missing_recipe": (
            [f"{ablations}/ntp.yaml", f"{ablations}/mtp_k3.yaml"],
            f"recipe '{ablations}/mtp_k3.yaml' does not exist",
        ),
        "unknown_key": (
            [ablations, "model.mtp.num_heads=3"],
            f"{n} of {n} runs are invalid, nothing submitted:\n  {', '.join(names)}: ",
        ),
        "empty_folder": ([str(empty)], f"folder '{empty}' holds no recipes (*.yaml)"),
    }[case]
    proc = _sweep(env, "--runs", str(tmp_path / "runs"), *args, cwd=tmp_path)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert expected in proc.stderr
    if case == "unknown_key":
        assert "unknown key 'model.mtp.num_heads'" in proc.stderr
    assert not calls.exists(), "sbatch was called for bad input"
    assert not list((tmp_path / "runs").rglob("*.args"))


def test_sweep_submits_one_array_with_a_task_file_per_run(tmp_path, fake_sbatch):
    env, calls = fake_sbatch
    ablations = REPO / "recipes" / "ablations"
    proc = _sweep(
        env,
        "--runs",
        str(tmp_path / "runs"),
        "--name",
        "k",
        "--nproc",
        "2",
        "--max-parallel",
        "1",
        str(ablations / "ntp.yaml"),
        str(ablations / "mtp_k2.yaml"),
        "train.steps=7",
        "--",
        "--time=00:10:00",
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "submitted job array 4242: 2 runs" in proc.stdout
    (call,) = calls.read_text().splitlines()
    sweep = tmp_path / "runs" / "k"
    assert "--array=0-1%1 --job-name=mtp-k --nodes=1" in call
    assert f"--output={sweep}/_slurm/logs/%x-%A_%a.out" in call
    assert f"MTP_TASKS_DIR={sweep}/_slurm/tasks,NPROC=2" in call
    assert call.endswith(f"--time=00:10:00 {REPO}/launch/slurm/train.sbatch")
    task1 = (sweep / "_slurm" / "tasks" / "1.args").read_text().splitlines()
    assert task1 == [
        str(ablations / "mtp_k2.yaml"),
        "train.steps=7",
        "name=mtp_k2",
        f"train.run_dir={sweep}/mtp_k2",
    ]
    # --dry-run: validated, printed, nothing submitted or written
    calls.unlink()
    proc = _sweep(
        env,
        "--runs",
        str(tmp_path / "dry"),
        "--dry-run",
        "--nproc",
        "2",
        str(ablations),
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    n = len(list(ablations.glob("*.yaml")))
    assert f"dry run: {n} runs valid; would submit:" in proc.stdout
    assert f"--array=0-{n - 1} --job-name=mtp-ablations" in proc.stdout
    assert not calls.exists() and not list((tmp_path / "dry").rglob("*.args"))


@pytest.mark.parametrize(
    "args, nproc",
    [
        (["--", "--gpus-per-node=8"], "8"),  # one process per requested GPU
        (["--", "--gpus-per-node", "h100:4"], "4"),
        (["--nproc", "2", "--", "--gpus-per-node=8"], "2"),  # --nproc wins
        ([], "1"),
    ],
)
def test_submit_takes_the_process_count_from_the_gpus_requested(args, nproc):
    recipe = str(REPO / "recipes" / "demo.yaml")
    opts = args[args.index("--") :] if "--" in args else []
    before = args[: args.index("--")] if "--" in args else args
    env = {k: v for k, v in os.environ.items() if k != "NPROC"}
    proc = subprocess.run(
        ["bash", str(REPO / "launch" / "slurm" / "submit.sh"), "--dry-run", *before, recipe, *opts],
        env=dict(env, PYTHON=sys.executable),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert f"NPROC={nproc} " in proc.stdout, proc.stdout
