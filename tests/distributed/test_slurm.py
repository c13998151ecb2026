"""The SLURM launch scripts against a real SLURM brought up on this machine (needs root).

The module's cluster: munged + slurmctld + two slurmd (nodes n1, n2 on this machine), Debian's
packages installed with apt-get when missing (``mtp_megatron/testing/slurm_cluster.py``).
Through the real scripts:

- ``launch/slurm/sweep.sh``: two tiny ablations (NTP, MTP K=2) as one job array, 1 node x 2
  processes each; their checkpoints, TensorBoard logs, and the report over them.
- ``launch/slurm/submit.sh``: the MTP K=2 recipe again, on 2 nodes x 1 process (a c10d rendezvous
  across the nodes), preempted mid-run the way ``#SBATCH --signal=B:USR1@120`` does it
  (``scancel --signal=USR1 --batch``): the trainer checkpoints, the batch script requeues the job,
  the requeued job resumes from the checkpoint and finishes with the same losses, step for step,
  as the uninterrupted sweep run (same world size 2, same batches: the runs are deterministic).

Both jobs are submitted at once by the module fixture; a watcher thread signals the second one as
soon as its log shows step 10.
"""

import csv
import re
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from mtp_megatron.report import main_report
from mtp_megatron.report.runs import load_run
from mtp_megatron.testing.slurm_cluster import (
    PackagesUnavailable,
    SlurmCluster,
    cannot_run_reason,
    ensure_installed,
)

REPO = Path(__file__).resolve().parents[2]
SLURM = REPO / "launch" / "slurm"
ABLATIONS = REPO / "recipes" / "ablations"
STEPS = 100
SIGNAL_AT = 10  # the step after which the preempted jobs get their signal
JOB_TIMEOUT = 420  # s: generous, the 2 cores are shared

pytestmark = [pytest.mark.slurm, pytest.mark.distributed, pytest.mark.timeout(900)]
if (_reason := cannot_run_reason()) is not None:
    pytestmark.append(pytest.mark.skip(reason=_reason))


def _overrides(cache: Path) -> list[str]:
    tiny = {
        "data.tokenizer": "bpe:512",
        "model.hidden_size": 64,
        "model.num_layers": 2,
        "model.num_attention_heads": 4,
        "model.max_seq_len": 64,
        "train.steps": STEPS,
        "train.micro_batch_size": 4,
        "train.lr_warmup_steps": 5,
        "train.log_every": 1,
        "train.eval_every": 50,
        "train.eval_batches": 2,
        "train.checkpoint_every": 0,
        "data.max_files": 60,
        "data.cache_dir": cache,
    }
    return [f"{k}={v}" for k, v in tiny.items()]


@dataclass
class Preemption:
    """What the watcher saw and did."""

    signalled_at: int | None = None
    error: str | None = None
    thread: threading.Thread | None = field(default=None, repr=False)


@dataclass
class Preempted:
    """A job the watcher stops mid-run with ``signal`` (then SLURM requeues it)."""

    job: str
    run_dir: Path
    log: Path
    preemption: Preemption


@dataclass
class Jobs:
    cluster: SlurmCluster
    work: Path
    sweep_dir: Path
    array_id: str
    preempted: dict[str, Preempted]
    """By signal: USR1 (SLURM's --signal=B:USR1@120 before the time limit), TERM (scancel's
    signal, or a site's preemption)."""


def _submit(cluster: SlurmCluster, *submissions: tuple[list, str], cwd: Path) -> list[str]:
    """Run the submit commands at once (each validates its recipes first); their job ids."""
    procs = [
        subprocess.Popen(
            [str(c) for c in cmd],
            cwd=cwd,
            env=cluster.env,
            text=True,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        for cmd, _ in submissions
    ]
    ids = []
    for proc, (cmd, pattern) in zip(procs, submissions):
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, f"{cmd}\n{out}\n{err}"
        match = re.search(pattern, out)
        assert match, out
        ids.append(match.group(1))
    return ids


def _watch(cluster: SlurmCluster, job: str, log: Path, out: Preemption, sig: str) -> None:
    """Send ``sig`` to the batch script once the log shows step SIGNAL_AT (as SLURM's
    --signal=B:USR1@120 does before the time limit)."""
    deadline = time.time() + JOB_TIMEOUT
    step = re.compile(r"^step +(\d+)/", re.M)
    while time.time() < deadline:
        text = log.read_text(errors="replace") if log.exists() else ""
        steps = [int(s) for s in step.findall(text)]
        if steps and max(steps) >= SIGNAL_AT:
            out.signalled_at = max(steps)
            cluster.run("scancel", f"--signal={sig}", "--batch", job)
            return
        if "run finished" in text or "training failed" in text or "invalid" in text:
            out.error = f"job {job} ended before it could be signalled:\n{text[-3000:]}"
            return
        time.sleep(0.2)
    out.error = f"job {job} never reached step {SIGNAL_AT}:\n{cluster.logs()}"


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    try:
        ensure_installed()
    except PackagesUnavailable as err:  # no network / package source here: like a missing GPU
        pytest.skip(f"SLURM is not installed and could not be installed: {err}")
    # 2 nodes x 4 job slots: the sweep's two tasks and the 2-node job all run at once (on the
    # machine's cores, shared)
    with SlurmCluster(tmp_path_factory.mktemp("slurm"), nodes=2, cpus_per_node=4) as c:
        yield c


@pytest.fixture(scope="module")
def jobs(cluster, tmp_path_factory):
    work = tmp_path_factory.mktemp("work")
    overrides = _overrides(work / "data_cache")
    runs = {"USR1": work / "preempted", "TERM": work / "terminated"}
    array_id, usr1_id, term_id = _submit(
        cluster,
        (
            [
                SLURM / "sweep.sh",
                "--runs",
                work / "runs",
                "--name",
                "abl",
                "--nproc",
                "2",
                ABLATIONS / "ntp.yaml",
                ABLATIONS / "mtp_k2.yaml",
                *overrides,
            ],
            r"submitted job array (\d+): 2 runs",
        ),
        (
            [
                SLURM / "submit.sh",
                "--nodes",
                "2",
                "--nproc",
                "1",
                ABLATIONS / "mtp_k2.yaml",
                *overrides,
                f"train.run_dir={runs['USR1']}",
            ],
            r"submitted job (\d+):",
        ),
        (  # one node, two processes: the same world size as the sweep's mtp_k2
            [
                SLURM / "submit.sh",
                "--nproc",
                "2",
                ABLATIONS / "mtp_k2.yaml",
                *overrides,
                f"train.run_dir={runs['TERM']}",
            ],
            r"submitted job (\d+):",
        ),
        cwd=work,
    )
    preempted = {}
    for sig, job in (("USR1", usr1_id), ("TERM", term_id)):
        log = work / "runs" / "slurm" / f"mtp-{runs[sig].name}-{job}.out"
        preemption = Preemption()
        preemption.thread = threading.Thread(
            target=_watch, daemon=True, args=(cluster, job, log, preemption, sig)
        )
        preemption.thread.start()
        preempted[sig] = Preempted(job, runs[sig], log, preemption)
    return Jobs(cluster, work, work / "runs" / "abl", array_id, preempted)


def _job_fields(cluster: SlurmCluster, job: str) -> list[dict[str, str]]:
    out = cluster.run("scontrol", "-o", "show", "job", job).stdout
    return [dict(w.split("=", 1) for w in line.split() if "=" in w) for line in out.splitlines()]


def test_sweep_runs_as_one_array_and_reports(jobs):
    cluster, sweep = jobs.cluster, jobs.sweep_dir
    states = cluster.wait_done(jobs.array_id, JOB_TIMEOUT)
    logs = sorted((sweep / "_slurm" / "logs").glob("*.out"))
    detail = "\n".join(p.read_text(errors="replace")[-2500:] for p in logs)
    assert states == {f"{jobs.array_id}_0": "COMPLETED", f"{jobs.array_id}_1": "COMPLETED"}, detail
    assert [p.name for p in logs] == [f"mtp-abl-{jobs.array_id}_{i}.out" for i in (0, 1)]
    assert all("run finished" in p.read_text() for p in logs), detail
    for name, k in (("ntp", 0), ("mtp_k2", 2)):
        run_dir = sweep / name
        assert (run_dir / "checkpoints" / "latest").read_text() == f"step_{STEPS:06d}"
        assert (run_dir / "final_eval.json").is_file() and (run_dir / "recipe.yaml").is_file()
        run = load_run(run_dir, name)
        assert sorted(run.scalars["train/loss"]) == list(range(1, STEPS + 1))
        assert sorted(run.scalars["val/loss_main"]) == [50, 100]
        loss = run.scalars["train/main_loss"]
        assert loss[STEPS] < loss[1] - 1.0, "the next-token loss did not fall"
        assert run.heads("val/acceptance_pos_") == list(range(1, k + 1))
        assert run.recipe["name"] == name and run.recipe["train"]["run_dir"] == str(run_dir)

    out = jobs.work / "report"
    assert main_report([str(sweep), "--out", str(out)]) == 0
    with open(out / "report.csv") as f:
        rows = {r["run"]: r for r in csv.DictReader(f)}
    assert sorted(rows) == ["mtp_k2", "ntp"]  # the _slurm folder is not a run
    mtp = load_run(sweep / "mtp_k2", "mtp_k2")
    assert float(rows["mtp_k2"]["train_loss"]) == pytest.approx(mtp.scalars["train/loss"][STEPS])
    assert float(rows["mtp_k2"]["acceptance_pos_2"]) == pytest.approx(
        mtp.scalars["val/acceptance_pos_2"][STEPS]
    )
    assert rows["ntp"]["acceptance_pos_1"] == ""
    for png in ("loss_curves.png", "acceptance.png"):
        assert (out / png).read_bytes().startswith(b"\x89PNG"), png


@pytest.mark.parametrize("sig", ["USR1", "TERM"])
def test_preempted_job_requeues_resumes_and_matches_the_uninterrupted_run(jobs, sig):
    cluster, job = jobs.cluster, jobs.preempted[sig]
    states = cluster.wait_done(job.job, JOB_TIMEOUT)
    job.preemption.thread.join(timeout=5)
    log = job.log.read_text(errors="replace")
    assert job.preemption.error is None, job.preemption.error
    assert states == {job.job: "COMPLETED"}, log[-4000:]
    (info,) = _job_fields(cluster, job.job)
    assert info["Restarts"] == "1" and info["ExitCode"] == "0:0", info

    # one task per node, a rendezvous on the first node, in both launches
    nodes = 2 if sig == "USR1" else 1
    assert log.count("[entrypoint]") == 2 * nodes
    if nodes == 2:
        assert "node 1 of 2, 1 processes" in log
    assert f"{sig}: asking the trainer to checkpoint and stop" in log
    stop = re.search(r"\[stop\] stopping after step (\d+)", log)
    assert stop, f"the trainer never stopped early:\n{log[-4000:]}"
    stopped = int(stop.group(1))
    assert job.preemption.signalled_at <= stopped < STEPS
    # the trainer exited 0 and so did torchrun (it ignores USR1): a clean step, then the requeue
    assert f"unfinished at step_{stopped:06d} of {STEPS} steps (step exit 0): requeueing" in log
    assert "srun: error" not in log
    resumed_from = f"{job.run_dir}/checkpoints/step_{stopped:06d} at step {stopped}"
    assert "(restart 1)" in log and f"[resume] from {resumed_from}" in log
    assert f"run finished: {job.run_dir} ({STEPS} steps), exit 0" in log
    assert (job.run_dir / "checkpoints" / "latest").read_text() == f"step_{STEPS:06d}"

    # the uninterrupted run: the sweep's mtp_k2 (same recipe, same world size)
    cluster.wait_done(jobs.array_id, JOB_TIMEOUT)
    resumed = load_run(job.run_dir, job.run_dir.name)
    reference = load_run(jobs.sweep_dir / "mtp_k2", "mtp_k2")
    assert len(list(job.run_dir.glob("2*/events.out.tfevents*"))) >= 1
    for tag in ("train/loss", "train/grad_norm", "val/loss_main", "val/acceptance_pos_1"):
        assert resumed.scalars[tag] == reference.scalars[tag], tag  # exact, every step
    assert resumed.scalars["train/loss"][STEPS] == reference.scalars["train/loss"][STEPS]
