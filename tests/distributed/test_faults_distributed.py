"""Faults in multi-process training runs: divergence, broken checkpoints, refusals before step
1, a stalled rank, SIGTERM to the launcher."""

import contextlib
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from mtp_megatron.config import ConfigError
from mtp_megatron.recipe import load_recipe
from mtp_megatron.testing.distributed import run_distributed
from mtp_megatron.testing.runs import DEMO_RECIPE as DEMO
from mtp_megatron.testing.runs import REPO, tiny_run_overrides
from mtp_megatron.train.guard import NonFiniteError


def _inject_nan(steps: set[int], ranks: set[int]) -> None:
    """Test hook: the training loss of these (0-based) steps becomes NaN on these ranks."""
    import torch.distributed as dist

    from mtp_megatron.model import MTPModel

    original = MTPModel.forward

    def forward(self, *args, step=None, **kwargs):
        out = original(self, *args, step=step, **kwargs)
        if self.training and step in steps and dist.get_rank() in ranks:
            out.loss = out.loss * math.nan
        return out

    MTPModel.forward = forward


def _saved_weights_finite(run_dir: Path) -> dict[str, bool]:
    out = {}
    for folder in sorted((run_dir / "checkpoints").glob("step_*")):
        for f in folder.glob("*model_states.pt"):
            state = torch.load(f, map_location="cpu", weights_only=False)["module"]
            out[f"{folder.name}/{f.name}"] = all(
                bool(torch.isfinite(t).all()) for t in state.values() if torch.is_tensor(t)
            )
    return out


def _divergence_cases(rank, world, base: str, cache: str):
    from mtp_megatron.train.trainer import train

    base = Path(base)
    cases = {
        # the issue's report: a huge LR without clipping (DeepSpeed skips the overflowing steps)
        "huge_lr": dict(
            extra={"train.lr": 1e12, "train.grad_clip": 0, "train.checkpoint_every": 1},
            nan_steps=set(),
        ),
        # NaN on rank 1 only, ZeRO-0 (the update is applied: the weights in memory are NaN)
        "stop_zero0": dict(extra={"train.zero_stage": 0}, nan_steps={4}),
        "skip_once": dict(extra={"train.on_nonfinite": "skip"}, nan_steps={3}),
        # a mid-run divergence that persists, keep_last 1: the last good checkpoint survives
        "skip_streak": dict(
            extra={
                "train.on_nonfinite": "skip",
                "train.max_skipped_steps": 2,
                "train.keep_last": 1,
            },
            nan_steps=set(range(5, 99)),
        ),
    }
    from mtp_megatron.model import MTPModel

    original = MTPModel.forward
    results = {}
    for name, case in cases.items():
        MTPModel.forward = original
        _inject_nan(case["nan_steps"], {1})
        extra = {"train.steps": 8, "train.checkpoint_every": 2, "train.zero_stage": 1}
        extra.update(case["extra"])
        recipe = load_recipe(DEMO, tiny_run_overrides(base / name, Path(cache), **extra))
        lines = []
        try:
            result = train(recipe, log=lines.append)
            outcome = {"error": None, "skipped": result.skipped_steps, "last": result.last_step}
        except NonFiniteError as e:
            outcome = {"error": str(e)}
        outcome["log"] = lines
        results[name] = outcome
    MTPModel.forward = original
    return results


@pytest.mark.distributed
def test_divergence_stops_or_skips_and_never_saves_non_finite_state(tmp_path, data_cache):
    out = run_distributed(_divergence_cases, 2, str(tmp_path), str(data_cache))
    assert out[0].keys() == out[1].keys()
    for name in out[0]:  # both ranks reach the same decision (the NaN was on rank 1 only)
        assert out[0][name]["error"] == out[1][name]["error"], name

    def latest(name):
        return (tmp_path / name / "checkpoints" / "latest").read_text()

    # stop: the step and the terms are named; the last good checkpoint stays latest
    error = out[0]["huge_lr"]["error"]
    assert error and "non-finite loss" in error, error
    failed = int(re.match(r"step (\d+): ", error).group(1))
    assert (
        f"step_{failed - 1:06d} is kept" in error and latest("huge_lr") == f"step_{failed - 1:06d}"
    )
    error = out[0]["stop_zero0"]["error"]
    assert error.startswith("step 5: non-finite loss") and "step_000004 is kept" in error, error
    assert latest("stop_zero0") == "step_000004"
    # skip: one bad step is dropped and the run finishes
    once = out[0]["skip_once"]
    assert once["error"] is None and once["skipped"] == [4] and once["last"] == 8
    assert any("[nonfinite] step 4" in line for line in once["log"])
    # skip: a streak longer than max_skipped_steps stops; pruning kept the last good one
    error = out[0]["skip_streak"]["error"]
    assert error.startswith("step 8:") and "3 non-finite steps in a row" in error, error
    assert latest("skip_streak") == "step_000006"
    for name in out[0]:
        finite = _saved_weights_finite(tmp_path / name)
        assert finite and all(finite.values()), (name, finite)


CORRUPTIONS = {
    "latest_deleted": (lambda c: (c / "latest").unlink(), 6, "latest is missing"),
    "latest_empty": (lambda c: (c / "latest").write_text(""), 6, "latest is empty"),
    "latest_garbage": (
        lambda c: (c / "latest").write_bytes(b"\xff\xfe\x00garbage"),
        6,
        "latest is unreadable",
    ),
    "latest_names_missing_folder": (
        lambda c: (c / "latest").write_text("step_000010"),
        6,
        "names step_000010, which does not exist",
    ),
    "model_truncated": (
        lambda c: os.truncate(c / "step_000006" / "mp_rank_00_model_states.pt", 1000),
        4,
        "mp_rank_00_model_states.pt of 1,000 bytes",
    ),
    "optimizer_deleted": (
        lambda c: (c / "step_000006" / "zero_pp_rank_1_mp_rank_00_optim_states.pt").unlink(),
        4,
        "lacks",
    ),
    "model_garbled": (  # same size, so only the load itself can tell
        lambda c: (c / "step_000006" / "mp_rank_00_model_states.pt").write_bytes(
            b"\0" * (c / "step_000006" / "mp_rank_00_model_states.pt").stat().st_size
        ),
        4,
        "mp_rank_00_model_states.pt is unreadable",
    ),
}


def _resume_cases(rank, world, base: str, cache: str):
    import torch.distributed as dist

    from mtp_megatron.train.engine import lr_lambda
    from mtp_megatron.train.trainer import train

    base, cache = Path(base), Path(cache)
    extra = {"train.steps": 8, "train.checkpoint_every": 2, "train.keep_last": 4}

    def run(name, stop_after=None, **more):
        recipe = load_recipe(DEMO, tiny_run_overrides(base / name, cache, **{**extra, **more}))
        lines = []
        try:
            result = train(recipe, log=lines.append, stop_after_steps=stop_after)
        except ConfigError as e:
            return {"error": str(e), "log": lines}
        return {"error": None, "losses": result.losses, "lrs": result.lrs, "log": lines}

    def copy_of_part(name, corrupt=None):
        if rank == 0:
            shutil.copytree(base / "part", base / name)
            if corrupt is not None:
                corrupt(base / name / "checkpoints")
        dist.barrier()

    out = {"full": run("full"), "part": run("part", stop_after=6)}
    for name, (corrupt, _, _) in CORRUPTIONS.items():
        copy_of_part(name, corrupt)
        out[name] = run(name)

    def no_markers(c):
        for marker in c.glob("step_*/complete.json"):
            marker.unlink()

    copy_of_part("none_complete", no_markers)
    out["none_complete"] = run("none_complete")
    out["none_complete"]["folders"] = sorted(
        p.name for p in (base / "none_complete" / "checkpoints").glob("step_*")
    )

    copy_of_part("changes")
    out["lr_refused"] = run("changes", **{"train.lr": 1e-3})
    out["k_refused"] = run(
        "changes",
        **{"model.mtp.num_predict_tokens": 1, "model.mtp.speculation_lookahead": 1},
    )
    out["steps_refused"] = run("changes", **{"train.steps": 12})
    out["lr_override"] = run("changes", **{"train.lr": 1e-3, "train.resume_overrides": "[lr]"})
    recipe = load_recipe(DEMO, tiny_run_overrides(base / "x", cache, **{**extra, "train.lr": 1e-3}))
    out["lr_expected"] = {s: 1e-3 * lr_lambda(recipe.train)(s) for s in range(6, 8)}
    out["recipe_lr"] = load_recipe(base / "changes" / "recipe.yaml").train.lr if rank == 0 else 0
    copy_of_part("longer")
    out["steps_override"] = run(
        "longer", **{"train.steps": 12, "train.resume_overrides": "[steps]"}
    )
    recipe = load_recipe(
        DEMO, tiny_run_overrides(base / "y", cache, **{**extra, "train.steps": 12})
    )
    out["steps_expected"] = {s: 3e-3 * lr_lambda(recipe.train)(s) for s in range(6, 12)}
    return out


def _resume_with_one_process(rank, world, base: str, cache: str):
    from mtp_megatron.train.trainer import train

    overrides = tiny_run_overrides(Path(base) / "part", Path(cache), **{"train.steps": 8})
    try:
        train(load_recipe(DEMO, overrides))
    except ConfigError as e:
        return str(e)
    return None


@pytest.mark.distributed
def test_resume_survives_broken_checkpoints_and_refuses_changed_recipes(tmp_path, data_cache):
    out = run_distributed(_resume_cases, 2, str(tmp_path), str(data_cache))[0]
    full = out["full"]["losses"]
    assert sorted(out["part"]["losses"]) == list(range(6))
    for name, (_, resumed_at, says) in CORRUPTIONS.items():
        got = out[name]
        assert got["error"] is None, (name, got["error"])
        assert sorted(got["losses"]) == list(range(resumed_at, 8)), name
        for step, loss in got["losses"].items():  # exactly the uninterrupted run
            assert loss == full[step], (name, step, loss, full[step])
        log = "\n".join(got["log"])
        assert f"[resume] from {tmp_path / name}/checkpoints/step_{resumed_at:06d}" in log, log
        assert "[resume] skipped" in log and says in log, (name, log)

    none = out["none_complete"]
    assert "none is complete" in none["error"] and "refusing to start over" in none["error"]
    assert none["folders"] == ["step_000002", "step_000004", "step_000006"]  # left alone

    assert "train.lr: 0.003 in the checkpoint, 0.001 now" in out["lr_refused"]["error"]
    assert "train.resume_overrides" in out["lr_refused"]["error"]
    assert "model.mtp.num_predict_tokens: 2 in the checkpoint, 1 now" in out["k_refused"]["error"]
    assert "train.steps: 8 in the checkpoint, 12 now" in out["steps_refused"]["error"]
    # listed in resume_overrides: the new LR is what the optimizer uses, and it is recorded
    override = out["lr_override"]
    assert override["error"] is None, override["error"]
    assert override["lrs"] == pytest.approx(out["lr_expected"], rel=1e-12)
    assert out["recipe_lr"] == 1e-3
    assert "[resume] changed: train.lr: 0.003 -> 0.001" in "\n".join(override["log"])
    # a longer run: the cosine schedule continues over the new total from the resume step
    longer = out["steps_override"]
    assert longer["error"] is None, longer["error"]
    assert longer["lrs"] == pytest.approx(out["steps_expected"], rel=1e-12)
    assert "[resume] changed: the data's sample total 64 -> 96" in "\n".join(longer["log"])

    message = run_distributed(_resume_with_one_process, 1, str(tmp_path), str(data_cache))[0]
    assert message and "saved by 2 processes; this run has 1" in message


def _startup_case(rank, world, run_dir: str, cache: str, extra: dict):
    from mtp_megatron.train.trainer import train

    recipe = load_recipe(DEMO, tiny_run_overrides(Path(run_dir), Path(cache), **extra))
    lines = []
    try:
        train(recipe, log=lines.append)
    except ConfigError as e:
        return {"error": str(e), "log": lines}
    return {"error": None, "log": lines}


def _make_read_only(folder: Path) -> bool:
    folder.mkdir(parents=True)
    folder.chmod(0o555)
    if os.geteuid() == 0:  # root ignores permission bits; the immutable flag holds for root too
        subprocess.run(["chattr", "+i", str(folder)], capture_output=True)
    try:
        (folder / "probe").write_text("x")
    except OSError:
        return True
    (folder / "probe").unlink()
    return False


@pytest.mark.distributed
def test_read_only_run_directory_is_refused_before_step_one(tmp_path, data_cache):
    run_dir = tmp_path / "ro"
    if not _make_read_only(run_dir):
        pytest.skip("cannot make a read-only folder on this machine (chattr unavailable)")
    try:
        out = run_distributed(_startup_case, 2, str(run_dir), str(data_cache), {})
    finally:
        subprocess.run(["chattr", "-i", str(run_dir)], capture_output=True)
        run_dir.chmod(0o755)
    error = out[0]["error"]
    assert error and "is not writable by rank 0" in error and "train.run_dir" in error, error
    assert not any(line.startswith("step ") for line in out[0]["log"])


@pytest.mark.distributed
def test_too_small_validation_split_is_refused_before_step_one(tmp_path, data_cache):
    extra = {"train.micro_batch_size": 400, "train.eval_every": 100}
    out = run_distributed(_startup_case, 2, str(tmp_path / "run"), str(data_cache), extra)
    error = out[0]["error"]
    assert error and "fewer than one batch of micro_batch_size=400" in error, error
    assert not any(line.startswith("step ") for line in out[0]["log"])
    assert not list((tmp_path / "run" / "checkpoints").glob("step_*"))


def _read_until_step(proc, lines, step, deadline):
    for line in proc.stdout:
        lines.append(line)
        if line.startswith("step ") and int(line.split()[1].split("/")[0]) >= step:
            return
        assert time.time() < deadline, "".join(lines[-30:])
    raise AssertionError("".join(lines[-30:]))


def _worker_pids(tag: str) -> dict[int, int]:
    """rank -> pid of the torchrun workers started with MTP_TEST_TAG=tag."""
    found = subprocess.run(["pgrep", "-f", "mtp_megatron train"], capture_output=True, text=True)
    out = {}
    for pid in map(int, found.stdout.split()):
        try:
            env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        env = dict(v.split(b"=", 1) for v in env if b"=" in v)
        if env.get(b"MTP_TEST_TAG") == tag.encode() and b"TORCHELASTIC_RUN_ID" in env:
            out[int(env[b"RANK"])] = pid
    return out


@pytest.mark.distributed
def test_a_stalled_rank_ends_the_job_within_the_bound(tmp_path, data_cache):
    bound = 15
    overrides = tiny_run_overrides(
        tmp_path / "run",
        data_cache,
        **{"train.steps": 400, "train.collective_timeout_s": bound, "train.log_every": 1},
    )
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    cmd += ["-m", "mtp_megatron", "train", str(DEMO), *overrides]
    tag = f"stall-{os.getpid()}"
    env = dict(os.environ, PYTHONUNBUFFERED="1", MTP_TEST_TAG=tag)
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env
    )
    lines: list[str] = []
    stalled = None
    try:
        _read_until_step(proc, lines, 3, time.time() + 240)
        pids = {}
        for _ in range(50):
            pids = _worker_pids(tag)
            if len(pids) == 2:
                break
            time.sleep(0.1)
        assert set(pids) == {0, 1}, pids
        stalled = pids[1]
        os.kill(stalled, signal.SIGSTOP)
        t0 = time.time()
        rest, _ = proc.communicate(timeout=bound + 90)
        elapsed = time.time() - t0
    finally:
        if stalled is not None:
            try:
                os.kill(stalled, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if proc.poll() is None:
            proc.kill()
    log = "".join(lines) + rest
    assert proc.returncode != 0
    assert f"[watchdog] rank 1 on {os.uname().nodename} (pid {stalled})" in log, log[-3000:]
    assert f"more than train.collective_timeout_s={bound}" in log
    print(f"stalled rank 1: the job ended {elapsed:.1f} s after SIGSTOP (bound {bound} s)")
    assert elapsed < bound + 60, elapsed  # the bound, a heartbeat period and torchrun's teardown


@pytest.mark.distributed
def test_sigterm_to_the_launcher_checkpoints_and_exits_zero(tmp_path, data_cache):
    from mtp_megatron.testing.runs import train_run

    run_dir = tmp_path / "run"
    overrides = tiny_run_overrides(
        run_dir, data_cache, **{"train.steps": 400, "train.log_every": 1}
    )
    env = dict(os.environ, PYTHONUNBUFFERED="1", PYTHON=sys.executable, NPROC="2")
    proc = subprocess.Popen(
        ["bash", str(REPO / "launch" / "train.sh"), str(DEMO), *overrides],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
    )
    lines: list[str] = []
    try:
        _read_until_step(proc, lines, 5, time.time() + 240)
        proc.send_signal(signal.SIGTERM)  # what a scheduler or `kill` sends the launcher
        rest, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    log = "".join(lines) + rest
    assert proc.returncode == 0, log[-3000:]
    assert "[stop] stopping after step" in log and "Traceback" not in log, log[-3000:]
    stopped = int((run_dir / "checkpoints" / "latest").read_text().split("_")[1])
    assert 5 <= stopped < 400
    # resumed for 2 steps == an uninterrupted run over the same steps
    resumed = run_distributed(train_run, 2, overrides, 2)[0]["losses"]
    reference = tiny_run_overrides(tmp_path / "ref", data_cache, **{"train.steps": 400})
    full = run_distributed(train_run, 2, reference, stopped + 2)[0]["losses"]
    assert sorted(resumed) == [stopped, stopped + 1]
    assert all(resumed[s] == full[s] for s in resumed), (resumed, full)


def _record_fsyncs(rank: int, world: int, overrides: list[str]) -> list[str]:
    """A short run on this rank; the paths checkpoint saving fsynced here."""
    from mtp_megatron.testing.runs import train_run
    from mtp_megatron.train import checkpoint

    synced: list[str] = []
    real = checkpoint._fsync_file

    def recorded(path):
        synced.append(str(path))
        real(path)

    checkpoint._fsync_file = recorded
    train_run(rank, world, overrides)
    return synced


@pytest.mark.distributed
def test_each_rank_fsyncs_only_the_checkpoint_files_it_wrote(tmp_path, data_cache):
    """ranks x files fsyncs would crawl on a parallel file system: each file is synced once, by
    the rank that wrote it (rank 0 also syncs DeepSpeed's helper script, written by no rank's
    checkpoint engine); the markers are synced as they are written."""
    from mtp_megatron.train.checkpoint import COMPLETE, RUN_STATE

    extra = {"train.steps": 2, "train.checkpoint_every": 2, "train.zero_stage": 1}
    out = run_distributed(
        _record_fsyncs, 2, tiny_run_overrides(tmp_path / "run", data_cache, **extra)
    )
    folder = tmp_path / "run" / "checkpoints" / "step_000002"
    inside = [[p for p in synced if p.startswith(f"{folder}/")] for synced in out]
    assert all(len(paths) == len(set(paths)) for paths in inside)  # once per rank
    rank0, rank1 = map(set, inside)
    assert rank0.isdisjoint(rank1) and rank1  # rank 1 synced its own shard, nothing of rank 0's
    files = {str(p) for p in folder.rglob("*") if p.is_file()}
    assert rank0 | rank1 == files - {str(folder / RUN_STATE), str(folder / COMPLETE)}


def _slow_rank_zero_run(rank: int, world: int, overrides: list[str], slow_s: float) -> dict:
    """A run whose process group times out after 3 s, while rank 0 takes ``slow_s`` longer to
    prepare the data, to write each checkpoint and to consolidate at the end."""
    import time

    from mtp_megatron.data import sources
    from mtp_megatron.parallel import initialize_parallel
    from mtp_megatron.testing.runs import train_run
    from mtp_megatron.train import checkpoint, trainer

    initialize_parallel(timeout_s=3)  # the trainer's call then keeps this world
    if rank == 0:

        def slowly(fn):
            def wrapped(*args, **kwargs):
                time.sleep(slow_s)
                return fn(*args, **kwargs)

            return wrapped

        sources.prepare = slowly(sources.prepare)
        trainer.consolidate = slowly(trainer.consolidate)
        recorded = checkpoint._recorded_saves

        @contextlib.contextmanager
        def slow_saves(engine):
            with recorded(engine) as written:
                save = engine.checkpoint_engine.save
                engine.checkpoint_engine.save = slowly(save)
                try:
                    yield written
                finally:
                    engine.checkpoint_engine.save = save

        checkpoint._recorded_saves = slow_saves
    return train_run(rank, world, overrides)


@pytest.mark.distributed
def test_no_rank_waits_on_rank_zero_in_a_collective(tmp_path):
    """Preparing a corpus on first use, writing a checkpoint and consolidating take rank 0 longer
    than a collective may wait (3 s here): the other ranks wait through the store and the run
    finishes."""
    extra = {"train.steps": 2, "train.checkpoint_every": 2, "train.eval_every": 0}
    overrides = tiny_run_overrides(tmp_path / "run", tmp_path / "fresh_cache", **extra)
    out = run_distributed(_slow_rank_zero_run, 2, overrides, 5.0)
    assert out[0]["last_step"] == out[1]["last_step"] == 2
    assert (tmp_path / "run" / "model.safetensors").is_file()  # consolidated
