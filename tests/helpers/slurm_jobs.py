"""Tiny CPU HOPE jobs on the test cluster: submit launch/hope_1b3.sh, watch and read the run.

The job runs the real launch path (sbatch -> common.sh -> srun -> launch/node.sh -> torchrun ->
pretrain.py) with the GPU defaults overridden the way docs/launch.md tells users to: sbatch
options or HOPE_* variables for the allocation, HOPE_NPROC_PER_NODE=2 for two gloo ranks, and
pretrain.py overrides for a tiny model on the synthetic corpus of conftest.py.
"""
from __future__ import annotations

import json
import math
import os
import signal
import time
from pathlib import Path

import pytest

from helpers import REPO, tiny_overrides
from helpers.slurm_cluster import SlurmCluster, SlurmUnavailable, start_cluster

STEPS = 40
ALLOCATION = ("--nodes=1", "--gpus-per-node=0", "--cpus-per-task=2", "--time=10")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    try:
        c = start_cluster(tmp_path_factory.mktemp("slurm"))
    except SlurmUnavailable as e:
        pytest.skip(str(e))
    yield c
    c.stop()


@pytest.fixture
def slurm(cluster):
    """The module's cluster; a test's jobs are cancelled when it ends, passed or failed, so the
    next test finds the node free."""
    yield cluster
    cluster.cancel_all()


def job_args(dataset, run_dir: Path, **extra) -> list[str]:
    prefix, vocab, eod = dataset
    base = {"training.steps": STEPS, "parallel.dp_replicate": 2, "data.tokenizer": "null"}
    return tiny_overrides(prefix, vocab, eod, run_dir, **{**base, **extra})


def job_env(tag: str, **extra: str) -> dict[str, str]:
    """HOPE_TEST_TAG marks every process of the job, so a test can find its ranks in /proc."""
    return {"HOPE_NPROC_PER_NODE": "2", "HOPE_TEST_TAG": tag, "WANDB_MODE": "disabled", **extra}


def submit(cluster: SlurmCluster, dataset, run_dir: Path, tag: str, env: dict | None = None, **extra) -> int:
    """`sbatch <allocation> launch/hope_1b3.sh <overrides>`; its log goes to RUN_DIR.out."""
    return cluster.sbatch(*ALLOCATION, f"--output={run_dir}.out", "launch/hope_1b3.sh",
                          *job_args(dataset, run_dir, **extra), env=job_env(tag, **(env or {})), cwd=REPO)


def metrics(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def final_loss(run_dir: Path) -> float:
    loss = metrics(run_dir)[-1]["loss"]
    assert math.isfinite(loss)
    return loss


def job_log(run_dir: Path) -> str:
    out = Path(f"{run_dir}.out")
    return out.read_text(errors="replace") if out.exists() else "(no job output yet)"


def wait_for_step(cluster: SlurmCluster, job_id: int, run_dir: Path, step: int, timeout: float = 120) -> None:
    """Block until the job has logged `step` (so it is mid-run); fail if it ends first."""
    deadline = time.monotonic() + timeout
    while not any(r["step"] >= step for r in metrics(run_dir)):
        state = cluster.job(job_id)["JobState"]
        if state not in ("PENDING", "RUNNING", "CONFIGURING") or time.monotonic() > deadline:
            raise AssertionError(f"job {job_id} is {state} before logging step {step}\n{job_log(run_dir)}")
        time.sleep(0.1)


def rank_pid(tag: str, rank: int) -> int:
    """PID of the training process of `rank` in the job tagged `tag` (found through /proc)."""
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            env = dict(kv.split("=", 1) for kv in (proc / "environ").read_text().split("\0") if "=" in kv)
        except OSError:
            continue
        if env.get("HOPE_TEST_TAG") == tag and env.get("RANK") == str(rank):
            return int(proc.name)
    raise AssertionError(f"no process of rank {rank} in job {tag}")


def kill_rank(tag: str, rank: int) -> None:
    os.kill(rank_pid(tag, rank), signal.SIGKILL)
