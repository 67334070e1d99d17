"""A real single-node SLURM on localhost for tests: munge + slurmctld + slurmd in one folder.

Every piece of state (config, key, sockets, PID files, logs, spool) lives under the folder the
caller gives, the daemons run in the foreground as our children, and `stop()` cancels every job
and ends the daemons by PID, so nothing outlives the test session. Packages are installed with
apt-get once when missing (CI is a fresh Debian machine, running as root).
"""
from __future__ import annotations

import ctypes
import os
import re
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

BINARIES = ("munged", "mungekey", "slurmctld", "slurmd", "sbatch", "scontrol", "squeue", "scancel", "srun")
PACKAGES = ("slurm-wlm", "munge")
TERMINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL",
            "DEADLINE", "PREEMPTED"}


class SlurmUnavailable(RuntimeError):
    """SLURM is not installed and cannot be installed here (not root)."""


def ensure_installed() -> None:
    """apt-get install slurm-wlm and munge unless their binaries are already on PATH."""
    if all(shutil.which(b) or Path("/usr/sbin", b).exists() for b in BINARIES):
        return
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        raise SlurmUnavailable(f"SLURM is not installed and this is not a root Debian machine: "
                               f"install {' '.join(PACKAGES)} with apt-get first")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    subprocess.run(["apt-get", "update", "-qq"], env=env, check=True, capture_output=True, timeout=300)
    result = subprocess.run(["apt-get", "install", "-y", "-qq", "--no-install-recommends", *PACKAGES],
                            env=env, capture_output=True, text=True, timeout=600)
    if result.returncode != 0:
        raise RuntimeError(f"apt-get install {' '.join(PACKAGES)} failed:\n{result.stderr[-3000:]}")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _die_with_parent() -> None:
    """In the daemon's child before exec: SIGTERM it when the test process dies, however it dies."""
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def _sbin(name: str) -> str:
    return shutil.which(name) or f"/usr/sbin/{name}"


SLURM_CONF = """\
ClusterName=hopetest
SlurmctldHost=localhost(127.0.0.1)
SlurmUser=root
SlurmdUser=root
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={root}/munge.socket,cred_expire=10
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd.pid
SlurmctldLogFile={root}/slurmctld.log
SlurmdLogFile={root}/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/builtin
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
MpiDefault=none
SwitchType=switch/none
ReturnToService=2
SlurmdParameters=config_overrides
KillWait=10
MinJobAge=600
InactiveLimit=0
NodeName=localhost NodeAddr=127.0.0.1 CPUs=2 State=UNKNOWN
PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP
"""


@dataclass
class SlurmCluster:
    root: Path
    env: dict[str, str]
    daemons: dict[str, subprocess.Popen] = field(default_factory=dict)

    # ------------------------------------------------------------------ clients
    def run(self, *cmd: str, check: bool = True, timeout: float = 30, env: dict | None = None,
            cwd: str | Path | None = None) -> subprocess.CompletedProcess:
        result = subprocess.run(list(cmd), env={**self.env, **(env or {})}, cwd=cwd, capture_output=True,
                                text=True, timeout=timeout)
        if check and result.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} exited {result.returncode}:\n{result.stdout}\n{result.stderr}"
                               f"\n{self.logs()}")
        return result

    def sbatch(self, *args: str, env: dict | None = None, cwd: str | Path | None = None) -> int:
        out = self.run("sbatch", "--parsable", *args, env=env, cwd=cwd).stdout.strip()
        return int(out.split(";")[0])

    def job(self, job_id: int) -> dict[str, str]:
        """`scontrol show job` as a dict (JobState, ExitCode, Restarts, ...)."""
        out = self.run("scontrol", "show", "job", "-o", str(job_id)).stdout
        return dict(re.findall(r"(\w+)=(\S*)", out))

    def wait(self, job_id: int, timeout: float, states=TERMINAL) -> dict[str, str]:
        """Poll until the job reaches one of `states`; on timeout raise with its state and logs."""
        deadline = time.monotonic() + timeout
        while True:
            info = self.job(job_id)
            if info.get("JobState") in states:
                return info
            if time.monotonic() > deadline:
                raise TimeoutError(f"job {job_id} still {info.get('JobState')} ({info.get('Reason')}) "
                                   f"after {timeout:.0f}s\n{self.logs()}")
            time.sleep(0.5)

    def logs(self, tail: int = 2000) -> str:
        return "\n".join(f"--- {name}.log ---\n{(self.root / f'{name}.log').read_text(errors='replace')[-tail:]}"
                         for name in ("slurmctld", "slurmd") if (self.root / f"{name}.log").exists())

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> "SlurmCluster":
        r = self.root
        for sub in ("state", "spool"):
            (r / sub).mkdir(parents=True, exist_ok=True)
        os.chmod(r, 0o700)
        key = r / "munge.key"
        subprocess.run([_sbin("mungekey"), "--create", "--force", "--keyfile", str(key)], check=True,
                       capture_output=True)
        os.chmod(key, 0o400)
        (r / "slurm.conf").write_text(SLURM_CONF.format(root=r, ctld_port=_free_port(), slurmd_port=_free_port()))
        self._spawn("munged", [_sbin("munged"), "--foreground", "--force", f"--socket={r}/munge.socket",
                               f"--key-file={key}", f"--pid-file={r}/munged.pid", f"--log-file={r}/munged.log",
                               f"--seed-file={r}/munged.seed"])
        self._await(lambda: (r / "munge.socket").exists(), "munged socket")
        self._spawn("slurmctld", [_sbin("slurmctld"), "-D", "-c", "-i", "-f", str(r / "slurm.conf")])
        self._await(lambda: self.run("scontrol", "ping", check=False).stdout.count("UP") > 0, "slurmctld ping")
        self._spawn("slurmd", [_sbin("slurmd"), "-D", "-N", "localhost", "-f", str(r / "slurm.conf")])
        self._await(self._node_ready, "node localhost idle")
        return self

    def _spawn(self, name: str, cmd: list[str]) -> None:
        with open(self.root / f"{name}.out", "w") as log:  # the daemon keeps its own copy of the fd
            self.daemons[name] = subprocess.Popen(cmd, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                                  stdin=subprocess.DEVNULL, start_new_session=True,
                                                  preexec_fn=_die_with_parent)

    def _node_ready(self) -> bool:
        out = self.run("scontrol", "show", "node", "localhost", "-o", check=False).stdout
        return "State=IDLE" in out

    def _await(self, ready, what: str, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while not ready():
            dead = [n for n, p in self.daemons.items() if p.poll() is not None]
            if dead or time.monotonic() > deadline:
                out = "\n".join((self.root / f"{n}.out").read_text(errors="replace")[-1500:] for n in self.daemons)
                raise RuntimeError(f"SLURM did not come up ({what}; exited: {dead or 'none'})\n{out}\n{self.logs()}")
            time.sleep(0.05)

    def cancel_all(self, timeout: float = 30) -> None:
        """Cancel every job of this cluster and wait until the queue is empty."""
        if "slurmctld" not in self.daemons or self.daemons["slurmctld"].poll() is not None:
            return
        self.run("scancel", "--full", f"--user={os.geteuid()}", check=False)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and self.run("squeue", "-h", check=False).stdout.strip():
            time.sleep(0.5)

    def stop(self) -> None:
        """Cancel every job, wait for them to end, then end the daemons by PID (newest first)."""
        self.cancel_all()
        for name in reversed(list(self.daemons)):
            proc = self.daemons[name]
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(timeout=5)
        self.daemons.clear()


def start_cluster(root: Path) -> SlurmCluster:
    """Install if needed and start a cluster whose clients find it through SLURM_CONF."""
    ensure_installed()
    env = {**os.environ, "SLURM_CONF": str(root / "slurm.conf")}
    env["PATH"] = env.get("PATH", "") + ":/usr/sbin:/sbin"
    cluster = SlurmCluster(root, env)
    try:
        return cluster.start()
    except BaseException:
        cluster.stop()
        raise
