"""The launch scripts where the cluster is not what they expect: each case exits 2 within seconds
with one `launch...:` line naming what is missing and the fix, and never starts torchrun with a
broken plan (such as `--rdzv-endpoint=:20001`). The scripts run for real with a controlled PATH and
environment: no SLURM is needed except for the node list that does not expand (the real scontrol,
installed as the SLURM tests install it) and the last test (a real job)."""
from __future__ import annotations

import re
import shutil
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest

from helpers import REPO
from helpers.reliability_table import Table
from helpers.slurm_cluster import SlurmUnavailable, ensure_installed
from helpers.slurm_jobs import cluster, job_log, slurm, submit  # noqa: F401

VENV_BIN = Path(sys.executable).parent
TABLE = Table("launch-errors")
IN_JOB = {"SLURM_JOB_ID": "123", "SLURM_JOB_NUM_NODES": "2", "SLURM_JOB_NODELIST": "node[01-02]",
          "HOPE_NPROC_PER_NODE": "2"}


table = TABLE.fixture(REPO)


@pytest.fixture(scope="module")
def bare_bin(tmp_path_factory) -> Path:
    """A folder with every program of /usr/bin except SLURM's and Python: a machine without them."""
    folder = tmp_path_factory.mktemp("bare_bin")
    for tool in Path("/usr/bin").iterdir():
        if not re.match(r"^(python|s(control|run|batch|cancel|queue|info)$)", tool.name):
            (folder / tool.name).symlink_to(tool)
    return folder


@dataclass
class Env:
    tmp: Path
    bare: Path

    def tools(self, *names: str) -> str:
        """A PATH of the bare machine plus these real programs."""
        extra = self.tmp / "bin"
        extra.mkdir(exist_ok=True)
        for name in names:
            found = shutil.which(name, path=f"{VENV_BIN}:/usr/bin:/usr/sbin")
            if found is None:
                pytest.skip(f"{name} is not installed")
            (extra / name).symlink_to(found)
        return f"{extra}:{self.bare}"


def _repo_without_venv(e: Env) -> Path:
    repo = e.tmp / "repo"
    shutil.copytree(REPO / "launch", repo / "launch", ignore=shutil.ignore_patterns("logs"))
    return repo


def _bare_venv(e: Env) -> Path:
    """A real virtualenv of the system Python, without torch or yaml: the wrong environment."""
    system = shutil.which("python3", path="/usr/bin:/bin")
    if system is None:
        pytest.skip("no system python3 to make the wrong environment with")
    subprocess.run([system, "-m", "venv", "--without-pip", str(e.tmp / "venv")], check=True)
    return e.tmp / "venv"


def _scontrol(e: Env, nodelist: str) -> dict:
    """The real scontrol with a minimal slurm.conf (it reads one even to expand a list)."""
    try:
        ensure_installed()
    except SlurmUnavailable as err:
        pytest.skip(str(err))
    conf = e.tmp / "slurm.conf"
    conf.write_text("ClusterName=t\nSlurmctldHost=localhost\nNodeName=localhost\nPartitionName=p Nodes=localhost\n")
    return {"PATH": e.tools("scontrol"), **IN_JOB, "SLURM_CONF": str(conf), "SLURM_JOB_NODELIST": nodelist}


@dataclass
class Case:
    name: str
    run: Callable[[Env], tuple[list[str], dict]]  # (command, environment), run from the repository
    expect: tuple[str, ...]
    slow: bool = False  # needs the real scontrol, which may have to be installed first


def _script(env: Callable[[Env], dict], script: Callable[[Env], str] = lambda e: "launch/hope_1b3.sh"):
    return lambda e: (["bash", script(e), "--dry-run"], env(e))


def _node(port: Callable[[Env], int], path: Callable[[Env], str] = lambda e: f"{VENV_BIN}:{e.bare}"):
    return lambda e: (["bash", "launch/node.sh", "torchrun", f"--rdzv-endpoint=localhost:{port(e)}", "--nnodes=1",
                       "-m", "nothing"], {"PATH": path(e)})


BUSY: list[socket.socket] = []


def _busy_port(e: Env) -> int:
    s = socket.socket()
    s.bind(("", 0))
    s.listen()
    BUSY.append(s)
    return s.getsockname()[1]


CASES = [
    Case("scontrol missing inside a job", _script(lambda e: {"PATH": str(e.bare), **IN_JOB}),
         ("scontrol is not in PATH", "SLURM_JOB_NODELIST=node[01-02]", "load the SLURM module")),
    Case("node list that does not expand (scontrol errs, exits 0)", _script(lambda e: _scontrol(e, "node[a-b]")),
         ("SLURM_JOB_NODELIST=node[a-b] does not expand", "Invalid range"), slow=True),
    Case("node list that expands to junk", _script(lambda e: _scontrol(e, "node[01-")),
         ("SLURM_JOB_NODELIST=node[01- does not expand", "node]"), slow=True),
    Case("empty node list inside a job", _script(lambda e: {"PATH": str(e.bare), **IN_JOB, "SLURM_JOB_NODELIST": ""}),
         ("SLURM_JOB_NODELIST is empty", "sbatch/salloc")),
    Case("HOPE_VENV without a virtualenv",
         _script(lambda e: {"PATH": str(e.bare), "HOPE_VENV": str(e.tmp / "nowhere")}),
         ("HOPE_VENV=", "has no bin/activate")),
    Case("no .venv and no python", _script(lambda e: {"PATH": str(e.bare)},
                                           lambda e: str(_repo_without_venv(e) / "launch" / "hope_1b3.sh")),
         ("no python in PATH", ".venv", "scripts/setup.sh")),
    Case("a python without hope_dist's dependencies",
         _script(lambda e: {"PATH": str(e.bare), "HOPE_VENV": str(_bare_venv(e))}),
         ("cannot import hope_dist's dependencies", "No module named", "HOPE_VENV")),
    Case("rendezvous port that is not a port", _script(lambda e: {"PATH": str(e.bare), "HOPE_RDZV_PORT": "20001x"}),
         ("HOPE_RDZV_PORT=20001x", "free port")),
    Case("rendezvous port in use", _node(_busy_port), ("rendezvous port", "already in use", "HOPE_RDZV_PORT")),
    Case("torchrun missing on a node", _node(lambda e: 29999, lambda e: str(e.bare)),
         ("torchrun is not in PATH", "HOPE_VENV")),
]


@pytest.mark.parametrize("case", [pytest.param(c, id=c.name, marks=[pytest.mark.slow] if c.slow else [])
                                  for c in CASES])
def test_launch_fails_clearly(case, tmp_path, bare_bin):
    command, env = case.run(Env(tmp_path, bare_bin))
    try:
        out = subprocess.run(command, cwd=REPO, env={"HOME": str(tmp_path), **env}, capture_output=True,
                             text=True, timeout=120)
    finally:
        while BUSY:
            BUSY.pop().close()
    problems = [f"exit status {out.returncode}, expected 2"] if out.returncode != 2 else []
    problems += [f"message lacks {f!r}" for f in case.expect if f not in out.stderr]
    if "Traceback" in out.stderr or "--rdzv-endpoint=:" in out.stdout:
        problems.append("a traceback or an empty rendezvous host")
    TABLE.add("launch", case.name, " ".join(command[:2]).replace(str(tmp_path), "TMP"),
              out.stderr.replace(str(tmp_path), "TMP"), not problems)
    assert not problems, f"{problems}\n--- stdout:\n{out.stdout[-2000:]}\n--- stderr:\n{out.stderr[-2000:]}"


def test_free_port_passes_the_node_check(tmp_path):
    """The port check does not get in the way: a free port on this host goes on to exec the command."""
    with socket.socket() as s:
        s.bind(("", 0))
        port = s.getsockname()[1]
    out = subprocess.run(["bash", "launch/node.sh", "python", "-c", "print('started')",
                          f"--rdzv-endpoint={socket.gethostname()}:{port}"], cwd=REPO, capture_output=True, text=True,
                         env={"PATH": f"{VENV_BIN}:/usr/bin:/bin", "HOME": str(tmp_path)}, timeout=60)
    assert out.returncode == 0 and out.stdout.strip() == "started", out.stderr


@pytest.mark.slow
def test_data_error_under_srun_reaches_the_job_log_as_one_message(slurm, random_dataset, tmp_path):  # noqa: F811
    """A real job (sbatch -> srun -> torchrun -> pretrain.py) on data whose ids exceed the model's
    vocabulary: the job fails, and torchrun's root-cause summary in the log shows the message."""
    run_dir = tmp_path / "run"
    job = submit(slurm, random_dataset, run_dir, tag="vocab", **{"model.vocab_size": 50})
    info = slurm.wait(job, timeout=180)
    log = job_log(run_dir)
    assert info["JobState"] == "FAILED", log
    assert "data error: model.vocab_size=50 is smaller than the data's vocabulary (96)" in log, log[-3000:]
    assert re.search(r"traceback : data error: model.vocab_size=50", log), log[-3000:]
    assert "error_file: <N/A>" not in log and 'hope_dist/trainer.py", line' not in log
