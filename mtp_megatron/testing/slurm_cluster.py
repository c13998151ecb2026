"""A real SLURM cluster (munged + slurmctld + slurmd per node) on this machine, for tests.

Debian's ``slurm-wlm`` and ``munge`` packages, installed with apt-get when missing. What the
daemons write (slurm.conf, cgroup.conf, state, spool, logs) lives under ``root``, the munge key and
socket in a /tmp folder of the munge user's; the ports are picked free, so the cluster touches
nothing in /etc and does not collide with another one. Needs root (slurmd runs jobs as their
user; munged must run as the ``munge`` user).

Several nodes run on this one machine (one ``slurmd -N nI`` each, on its own port), which makes
multi-node jobs real: one task per node, a rendezvous across them.

Settings that work in a container without systemd (see shared/DESIGN.md, "Facts checked"):
``ProctrackType=proctrack/linuxproc``, ``TaskPlugin=task/none``, ``CgroupPlugin=cgroup/v1``.

    python -m mtp_megatron.testing.slurm_cluster /tmp/slurm [NODES]   # Ctrl-C / TERM ends it
"""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PACKAGES = ("slurm-wlm", "munge")
BINARIES = ("munged", "slurmctld", "slurmd", "sbatch", "srun", "scontrol", "squeue", "scancel")


def cannot_run_reason() -> str | None:
    """Why SLURM cannot run here (a skip reason), or None when it can (maybe after apt-get)."""
    if sys.platform != "linux":
        return f"SLURM needs Linux; this is {sys.platform}"
    if os.geteuid() != 0:
        return "bringing up slurmctld/slurmd/munged needs root; this test runs as a normal user"
    if all(shutil.which(b) for b in BINARIES):
        return None
    if not shutil.which("apt-get"):
        return "slurm-wlm/munge are not installed and apt-get is not available to install them"
    return None


class PackagesUnavailable(RuntimeError):
    """apt-get could not install SLURM (no network or no package source): an environment limit."""


def ensure_installed(log=print) -> None:
    """apt-get install slurm-wlm munge when a binary is missing (a fresh CI machine)."""
    if all(shutil.which(b) for b in BINARIES):
        return
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    log(f"installing {' '.join(PACKAGES)} with apt-get")
    for cmd in (
        ["apt-get", "update", "-qq"],
        ["apt-get", "install", "-y", "-qq", "--no-install-recommends", *PACKAGES],
    ):
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            raise PackagesUnavailable(
                f"{' '.join(cmd)} failed:\n{proc.stdout[-2000:]}{proc.stderr[-2000:]}"
            )
    missing = [b for b in BINARIES if not shutil.which(b)]
    if missing:
        raise RuntimeError(f"after apt-get install, still missing: {missing}")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _hardware() -> str:
    """The hardware slurmd detects (``slurmd -C``), so a node never drains as 'Low CPUs'."""
    out = subprocess.run(["slurmd", "-C"], capture_output=True, text=True, check=True).stdout
    line = next(x for x in out.splitlines() if x.startswith("NodeName="))
    return " ".join(w for w in line.split() if not w.startswith(("NodeName=", "RealMemory=")))


class SlurmCluster:
    """munged + slurmctld + slurmd on this machine; ``env`` points SLURM clients at it."""

    def __init__(
        self, root: Path, nodes: int = 1, cpus_per_node: int | None = None, cred_expire: int = 10
    ):
        self.root = Path(root).resolve()
        self.nodes = [f"n{i}" for i in range(1, nodes + 1)]
        # None: what the hardware has; a number: that many job slots per node, whatever the
        # machine has (slurmd's config_overrides), so small jobs never wait for each other
        self.cpus_per_node = cpus_per_node
        self.cred_expire = cred_expire  # also the wait before a requeued job may start again
        self.procs: dict[str, subprocess.Popen] = {}
        self.conf = self.root / "etc" / "slurm.conf"
        self.munge_dir: Path | None = None

    @property
    def env(self) -> dict[str, str]:
        return dict(os.environ, SLURM_CONF=str(self.conf))

    # -- configuration -------------------------------------------------------------------------
    def _write_munge(self) -> None:
        munge = pwd.getpwnam("munge")
        # not under self.root: pytest's temp dirs are 0700 and munged runs as the munge user
        d = self.munge_dir = Path(tempfile.mkdtemp(prefix="mtp-munge-"))
        key = d / "munge.key"
        key.write_bytes(os.urandom(1024))
        for path, mode in ((d, 0o711), (key, 0o400)):
            os.chown(path, munge.pw_uid, munge.pw_gid)
            os.chmod(path, mode)
        self.munge_socket = d / "munge.socket"

    def _write_slurm_conf(self) -> None:
        etc, state, spool, log = (self.root / n for n in ("etc", "state", "spool", "log"))
        for p in (etc, state, spool, log):
            p.mkdir(parents=True, exist_ok=True)
        host = socket.gethostname().split(".")[0]
        self.ctld_port = _free_port()
        # several nodes on this one machine: one slurmd each (slurmd -N NAME), each on its own
        # port, all reached at 127.0.0.1; their spool, pid and log files are per node (%n)
        hw = _hardware() if self.cpus_per_node is None else f"CPUs={self.cpus_per_node}"
        overrides = "" if self.cpus_per_node is None else "SlurmdParameters=config_overrides\n"
        node_lines = "\n".join(
            f"NodeName={n} NodeHostname={host} NodeAddr=127.0.0.1 Port={_free_port()} {hw} "
            "State=UNKNOWN"
            for n in self.nodes
        )
        self.conf.write_text(
            f"""ClusterName=mtptest
SlurmctldHost={host}(127.0.0.1)
SlurmctldPort={self.ctld_port}
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={self.munge_socket},cred_expire={self.cred_expire}
SlurmUser=root
SlurmdUser=root
StateSaveLocation={state}
SlurmdSpoolDir={spool}/%n
SlurmctldPidFile={self.root}/slurmctld.pid
SlurmdPidFile={self.root}/slurmd-%n.pid
SlurmctldLogFile={log}/slurmctld.log
SlurmdLogFile={log}/slurmd-%n.log
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
SchedulerType=sched/builtin
SchedulerParameters=sched_interval=2
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
ReturnToService=2
JobRequeue=1
KillWait=30
MinJobAge=600
InactiveLimit=0
JobCompType=jobcomp/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
{overrides}{node_lines}
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP LLN=YES
"""
        )
        # cgroup/v1: the autodetection fails on this machine's hybrid cgroup mounts
        (etc / "cgroup.conf").write_text("CgroupPlugin=cgroup/v1\nConstrainCores=no\n")

    # -- daemons -------------------------------------------------------------------------------
    def _start(self, name: str, cmd: list[str], user: str | None = None) -> None:
        log = open(self.root / "log" / f"{name}.stdout", "w")
        self.procs[name] = subprocess.Popen(
            cmd,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=self.env,
            user=user,
            start_new_session=True,
        )

    def _wait(self, what: str, ok, timeout: float = 60.0) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            for name, proc in self.procs.items():
                if proc.poll() is not None:
                    raise RuntimeError(f"{name} exited ({proc.returncode}):\n{self.logs()}")
            if ok():
                return
            time.sleep(0.3)
        raise RuntimeError(f"timed out waiting for {what}:\n{self.logs()}")

    def start(self) -> SlurmCluster:
        try:
            return self._start_all()
        except BaseException:
            self.stop()
            raise

    def _start_all(self) -> SlurmCluster:
        self.root.mkdir(parents=True, exist_ok=True)
        self._write_munge()
        self._write_slurm_conf()
        munge = self.munge_dir
        assert munge is not None  # (written just above)
        self._start(
            "munged",
            [
                "munged",
                "--foreground",
                f"--key-file={munge / 'munge.key'}",
                f"--socket={self.munge_socket}",
                f"--pid-file={munge / 'munged.pid'}",
                f"--log-file={munge / 'munged.log'}",
                f"--seed-file={munge / 'munged.seed'}",
            ],
            user="munge",
        )
        self._wait("munged", self.munge_socket.exists)
        self._start("slurmctld", ["slurmctld", "-D", "-c", "-f", str(self.conf)])
        self._wait("slurmctld", lambda: self.run("scontrol", "ping", check=False).returncode == 0)
        for node in self.nodes:
            self._start(f"slurmd-{node}", ["slurmd", "-D", "-N", node, "-f", str(self.conf)])
        self._wait(
            "the nodes to be idle",
            lambda: (
                self.run("sinfo", "-h", "-N", "-o", "%t", check=False).stdout.split()
                == ["idle"] * len(self.nodes)
            ),
        )
        return self

    def stop(self) -> None:
        """Cancel every job, then stop the daemons (TERM, then KILL) and their process groups."""
        if "slurmctld" in self.procs and self.procs["slurmctld"].poll() is None:
            self.run("scancel", "--user", "root", check=False)
            time.sleep(1)
        order = [n for n in self.procs if n.startswith("slurmd")] + ["slurmctld", "munged"]
        for name in order:
            proc = self.procs.get(name)
            if proc is None or proc.poll() is not None:
                continue
            proc.terminate()
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        self.procs.clear()
        munge = getattr(self, "munge_dir", None)
        if munge is not None:
            if (munge / "munged.log").is_file():
                shutil.copy(munge / "munged.log", self.root / "log" / "munged.log")
            shutil.rmtree(munge, ignore_errors=True)
            self.munge_dir = None

    def __enter__(self) -> SlurmCluster:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- clients -------------------------------------------------------------------------------
    def run(self, *cmd: str, check: bool = True, **kw) -> subprocess.CompletedProcess:
        proc = subprocess.run(
            list(cmd), env=kw.pop("env", self.env), capture_output=True, text=True, **kw
        )
        if check and proc.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} -> {proc.returncode}\n{proc.stdout}{proc.stderr}")
        return proc

    def job_states(self, job_id: str) -> dict[str, str]:
        """{job id (array tasks as JOB_TASK): state} from scontrol, once the jobs exist."""
        out = self.run("scontrol", "-o", "show", "job", job_id, check=False).stdout
        states = {}
        for line in out.splitlines():
            fields = dict(w.split("=", 1) for w in line.split() if "=" in w)
            key = fields.get("JobId", "?")
            if fields.get("ArrayTaskId"):
                key = f"{fields['ArrayJobId']}_{fields['ArrayTaskId']}"
            states[key] = fields.get("JobState", "?")
        return states

    def wait_done(self, job_id: str, timeout: float) -> dict[str, str]:
        """Wait until every job of ``job_id`` (an array: every task) has left PENDING/RUNNING."""
        active = {
            "PENDING",
            "RUNNING",
            "CONFIGURING",
            "COMPLETING",
            "REQUEUED",
            "SUSPENDED",
            "REQUEUE_FED",
            "REQUEUE_HOLD",
            "RESIZING",
            "SIGNALING",
            "STAGE_OUT",
        }
        deadline = time.time() + timeout
        while True:
            states = self.job_states(job_id)
            if states and not active & set(states.values()):
                return states
            if time.time() > deadline:
                raise TimeoutError(f"job {job_id} still {states} after {timeout}s\n{self.logs()}")
            time.sleep(1)

    def logs(self, tail: int = 40) -> str:
        parts = []
        for p in sorted((self.root / "log").glob("*")):
            if p.is_file():
                lines = p.read_text(errors="replace").splitlines()[-tail:]
                parts.append(f"--- {p.name}\n" + "\n".join(lines))
        return "\n".join(parts)


if __name__ == "__main__":
    root = Path(sys.argv[1] if len(sys.argv) > 1 else "/tmp/slurm-cluster")
    nodes = int(sys.argv[2]) if len(sys.argv) > 2 else 1
    if reason := cannot_run_reason():
        sys.exit(reason)
    ensure_installed()
    shutil.rmtree(root, ignore_errors=True)
    with SlurmCluster(root, nodes) as cluster:
        print(f"up: export SLURM_CONF={cluster.conf}   (Ctrl-C to stop)", flush=True)
        signal.signal(signal.SIGTERM, signal.default_int_handler)  # TERM tears down too
        try:
            signal.pause()
        except KeyboardInterrupt:
            pass
