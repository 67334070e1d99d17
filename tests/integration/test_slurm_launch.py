"""launch/hope_1b3.sh on a real single-node SLURM: dry run, a complete run, preemption + requeue."""
import re
import subprocess
import time

import pytest

from helpers.slurm_jobs import (REPO, STEPS, cluster, final_loss, job_args, job_env, job_log, metrics, slurm,  # noqa: F401
                        submit, wait_for_step)

pytestmark = pytest.mark.slow


def test_dry_run_prints_the_gpu_job_and_validates_the_config():
    out = subprocess.run(["bash", "launch/hope_1b3.sh", "--dry-run", "--training.steps=7"], cwd=REPO,
                         capture_output=True, text=True, timeout=120, env={"PATH": "/usr/bin:/bin"})
    assert out.returncode == 0, out.stderr
    text = out.stdout
    assert "sbatch " in text and text.count("launch/hope_1b3.sh --training.steps=7") == 1
    srun = next(line for line in text.splitlines() if line.startswith("srun "))
    for expected in ("--nodes=4", "--ntasks-per-node=1", "--cpus-per-task=96", "--kill-on-bad-exit=1",
                     "launch/node.sh torchrun", "--nnodes=4", "--nproc-per-node=8", "--rdzv-backend=c10d",
                     "--config configs/hope_1b3.yaml", "--training.steps=7", "--parallel.dp_shard=32"):
        assert expected in srun, (expected, srun)
    assert "NCCL_DEBUG=WARN" in text and "TORCH_NCCL_ASYNC_ERROR_HANDLING=3" in text

    bad = subprocess.run(["bash", "launch/hope_760m.sh", "--dry-run", "--parallel.tp=5"], cwd=REPO,
                         capture_output=True, text=True, timeout=120, env={"PATH": "/usr/bin:/bin"})
    assert bad.returncode == 2 and "parallel.tp=5" in bad.stderr, bad.stderr


def test_dry_run_honours_hope_variables():
    env = {"PATH": "/usr/bin:/bin", "HOPE_NNODES": "2", "HOPE_GPUS_PER_NODE": "0", "HOPE_NPROC_PER_NODE": "4",
           "HOPE_CPUS_PER_TASK": "8", "HOPE_TIME": "1:00:00", "HOPE_RUN_DIR": "/tmp/hope-dry",
           "HOPE_MAX_RESTARTS": "2", "NCCL_DEBUG": "INFO", "HOPE_ENGINE": "deepspeed"}
    out = subprocess.run(["bash", "launch/hope_760m.sh", "--dry-run"], cwd=REPO, capture_output=True,
                         text=True, timeout=120, env=env)
    assert out.returncode == 0, out.stderr
    sbatch = next(line for line in out.stdout.splitlines() if line.startswith("sbatch "))
    assert re.search(r"--nodes=2 --gpus-per-node=0 --cpus-per-task=8 --time=1:00:00 \S*launch/hope_760m.sh", sbatch)
    srun = next(line for line in out.stdout.splitlines() if line.startswith("srun "))
    assert "--nnodes=2 --nproc-per-node=4" in srun and "--max-restarts=2" in srun
    assert "--run_dir=/tmp/hope-dry" in srun and "--parallel.dp_shard=8" in srun
    assert "--parallel.engine=deepspeed" in srun  # validated on the way: deepspeed is installed
    assert "# run dir: /tmp/hope-dry" in out.stdout and "NCCL_DEBUG=INFO" in out.stdout
    assert "OMP_NUM_THREADS=2" in out.stdout


@pytest.fixture(scope="module")
def reference_run(cluster, random_dataset, tmp_path_factory):  # noqa: F811
    """An uninterrupted tiny run: `sbatch launch/hope_1b3.sh` with a CPU override."""
    run_dir = tmp_path_factory.mktemp("reference") / "run"
    job = submit(cluster, random_dataset, run_dir, tag="reference")
    info = cluster.wait(job, timeout=180)
    return job, info, run_dir


def test_sbatch_tiny_run_completes_and_records_the_run(reference_run):
    job, info, run_dir = reference_run
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", job_log(run_dir)
    assert info["Restarts"] == "0"  # a finished run does not requeue
    assert [r["step"] for r in metrics(run_dir)] == list(range(STEPS))
    assert final_loss(run_dir) < metrics(run_dir)[0]["loss"]
    assert (run_dir / "COMPLETE").read_text().strip() == str(STEPS)
    assert not (run_dir / "PREEMPTED").exists()
    # What reproduces the run: resolved config, git commit, environment summary, logs, metrics.
    assert f"steps: {STEPS}" in (run_dir / "config.yaml").read_text()
    assert '"git_commit"' in (run_dir / "run_info.jsonl").read_text()
    summary = (run_dir / "env" / f"job-{job}-restart-0.txt").read_text()
    assert re.search(r"^git_commit: [0-9a-f]{40}$", summary, re.M), summary[:500]
    assert "--nproc-per-node=2" in summary and "SLURM_JOB_ID=" in summary and "torch==" in summary
    log = (run_dir / "logs" / f"slurm-{job}.log").read_text()
    assert "launch: run complete at step 40" in log and "parameters:" in log


def test_usr1_saves_requeues_and_resumes_to_the_same_loss(slurm, random_dataset, reference_run, tmp_path):  # noqa: F811
    """The time-limit warning (USR1 to the batch shell, as --signal=B:USR1@180 sends it) stops
    every rank at one step with a checkpoint; the job requeues itself and resumes there."""
    run_dir = tmp_path / "run"
    env = {**job_env("preempt"), "HOPE_NNODES": "1", "HOPE_GPUS_PER_NODE": "0", "HOPE_CPUS_PER_TASK": "2",
           "HOPE_TIME": "10", "HOPE_SBATCH_ARGS": f"--output={run_dir}.out"}
    submitted = slurm.run("bash", "launch/hope_1b3.sh", *job_args(random_dataset, run_dir), env=env, cwd=REPO)
    job = int(re.search(r"Submitted batch job (\d+)", submitted.stdout).group(1))
    wait_for_step(slurm, job, run_dir, step=3)
    slurm.run("scancel", "--signal=USR1", "--batch", str(job))

    # Requeued: pending again, with Restarts=1. SLURM holds a requeued job for cred_expire seconds
    # (10 on the test cluster, 120 by default) so the old job credential cannot be reused; starting
    # it earlier (scontrol update StartTime=now) fails it with "Job credential revoked".
    deadline = time.monotonic() + 60
    while (info := slurm.job(job))["Restarts"] != "1":
        assert time.monotonic() < deadline and info["JobState"] != "COMPLETED", job_log(run_dir)
        time.sleep(0.2)
    info = slurm.wait(job, timeout=180)
    log = job_log(run_dir)
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "1", log

    stopped = re.search(r"stop requested: saved \S+/step-(\d+) at step (\d+)", log)
    assert stopped and stopped.group(1) == stopped.group(2), log
    step = int(stopped.group(1))
    assert 3 < step < STEPS
    assert f"resumed from {run_dir}/checkpoints/step-{step} at step {step}" in log
    assert "requeueing job" in log and log.count("launch: run complete") == 1
    rows = metrics(run_dir)
    assert [r["step"] for r in rows] == list(range(STEPS))  # no step lost, none repeated
    _, _, reference_dir = reference_run
    assert final_loss(run_dir) == final_loss(reference_dir)
    assert [r["loss"] for r in rows] == [r["loss"] for r in metrics(reference_dir)]
    assert len((run_dir / "run_info.jsonl").read_text().splitlines()) == 2
