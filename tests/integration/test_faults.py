"""Faults: stop signals in the trainer; in a real SLURM job a killed rank, an injected non-finite
loss and torchrun restarts."""
import math
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from helpers import REPO, tiny_overrides
from hope_dist.checkpoint import committed_steps
from hope_dist.config import load_config
from hope_dist.trainer import Trainer
from helpers.slurm_jobs import STEPS, cluster, job_log, kill_rank, metrics, slurm, submit, wait_for_step  # noqa: F401



@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGUSR1], ids=["SIGTERM", "SIGUSR1"])
def test_stop_signal_saves_at_a_step_boundary_and_resume_finishes(random_dataset, tmp_path, sig):
    """In one process: the signal arrives mid-run (from another thread, as from SLURM), the
    trainer saves a committed checkpoint at the next step, writes PREEMPTED and returns; a new
    trainer resumes there without flags and finishes."""
    run_dir = tmp_path / "run"
    cfg = load_config(None, tiny_overrides(*random_dataset, run_dir, **{"training.steps": 400,
                                                                        "checkpoint.interval": 2}))
    saved = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGUSR1)}

    def send_when_running():
        while len(metrics(run_dir)) < 3:
            time.sleep(0.01)
        os.kill(os.getpid(), sig)

    sender = threading.Thread(target=send_when_running, daemon=True)
    try:
        sender.start()
        trainer = Trainer(cfg)
        trainer.train()
    finally:
        for s, handler in saved.items():
            signal.signal(s, handler)
    stopped = trainer.step
    assert 3 <= stopped < 400
    assert (run_dir / "PREEMPTED").read_text().split() == [sig.name, str(stopped)]
    assert committed_steps(run_dir / "checkpoints")[-1] == stopped and not (run_dir / "COMPLETE").exists()
    resumed = Trainer(load_config(None, tiny_overrides(*random_dataset, run_dir, **{"training.steps": stopped + 2})))
    resumed.train()
    assert [r["step"] for r in metrics(run_dir)] == list(range(stopped + 2))
    assert (run_dir / "COMPLETE").exists() and not (run_dir / "PREEMPTED").exists()


@pytest.mark.slow
def test_killed_rank_ends_the_job_naming_the_rank(slurm, random_dataset, tmp_path):  # noqa: F811
    run_dir = tmp_path / "run"
    job = submit(slurm, random_dataset, run_dir, tag="kill")
    wait_for_step(slurm, job, run_dir, step=2)
    killed_at = time.monotonic()
    kill_rank("kill", rank=1)
    info = slurm.wait(job, timeout=60)
    elapsed = time.monotonic() - killed_at
    log = job_log(run_dir)
    assert info["JobState"] == "FAILED" and info["ExitCode"] != "0:0", (info, log)
    assert elapsed < 60
    assert re.search(r"rank\s*: 1 \(local_rank: 1\)\s+exitcode\s*: -9", log), log[-3000:]
    assert "Signal 9 (SIGKILL)" in log
    assert "not requeueing" in log and info["Restarts"] == "0"
    assert not (run_dir / "COMPLETE").exists()


@pytest.mark.slow
@pytest.mark.parametrize("policy", ["stop", "skip"])
def test_injected_nonfinite_loss_follows_the_policy(slurm, random_dataset, tmp_path, policy):  # noqa: F811
    """Rank 1's loss (the last replica's) turns NaN at step 5; the all-reduced loss carries it to
    every rank."""
    run_dir = tmp_path / "run"
    job = submit(slurm, random_dataset, run_dir, tag=f"nan-{policy}", env={"HOPE_INJECT_NONFINITE_STEP": "5"},
                 **{"training.steps": 8, "training.nonfinite": policy, "checkpoint.interval": 4})
    info = slurm.wait(job, timeout=180)
    log = job_log(run_dir)
    rows = metrics(run_dir)
    if policy == "stop":
        assert info["JobState"] == "FAILED", log
        assert "FloatingPointError: non-finite loss (nan) at step 5" in log, log[-3000:]
        assert "[rank 0 of 2, step 5]" in log and "[rank 1 of 2, step 5]" in log
        assert [r["step"] for r in rows] == [0, 1, 2, 3, 4]
        assert (run_dir / "checkpoints" / "step-4" / "COMMITTED").exists()
        assert not (run_dir / "COMPLETE").exists()
    else:
        assert info["JobState"] == "COMPLETED", log
        assert "step 5: non-finite loss, update skipped (training.nonfinite=skip)" in log
        assert [r["step"] for r in rows] == list(range(8))
        assert rows[5]["skipped_nonfinite"] and math.isnan(rows[5]["loss"])
        assert all(math.isfinite(r["loss"]) and not r.get("skipped_nonfinite") for i, r in enumerate(rows) if i != 5)


@pytest.mark.slow
def test_max_restarts_resumes_from_the_newest_checkpoint(slurm, random_dataset, tmp_path):  # noqa: F811
    """torchrun restarts the workers after a rank dies; they resume from the newest committed
    checkpoint and redo the lost steps bit for bit."""
    run_dir = tmp_path / "run"
    job = submit(slurm, random_dataset, run_dir, tag="restart", env={"HOPE_MAX_RESTARTS": "1"},
                 **{"checkpoint.interval": 5, "checkpoint.keep_last": 10})
    wait_for_step(slurm, job, run_dir, step=6)
    kill_rank("restart", rank=1)
    info = slurm.wait(job, timeout=180)
    log = job_log(run_dir)
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "0", log
    resumed = re.search(r"resumed from \S+/step-(\d+) at step (\d+)", log)
    assert resumed, log[-3000:]
    step = int(resumed.group(1))
    assert step >= 5 and step % 5 == 0
    rows = metrics(run_dir)
    split = next(i for i in range(1, len(rows)) if rows[i]["step"] <= rows[i - 1]["step"])
    first, redone = rows[:split], rows[split:]
    assert [r["step"] for r in first] == list(range(split)) and step <= split
    assert [r["step"] for r in redone] == list(range(step, STEPS))
    assert [r["loss"] for r in first[step:]] == [r["loss"] for r in redone[: split - step]]
    assert (run_dir / "COMPLETE").read_text().strip() == str(STEPS)


def worker_pid(agent: subprocess.Popen, rank: int) -> int | None:
    """The pid of torchrun's worker of `rank` (its child with RANK set), or None before it starts."""
    for d in Path("/proc").iterdir():
        try:
            if d.name.isdigit() and int((d / "stat").read_text().rsplit(")", 1)[1].split()[1]) == agent.pid \
                    and f"RANK={rank}".encode() in (d / "environ").read_bytes().split(b"\0"):
                return int(d.name)
        except OSError:
            continue
    return None


def test_hung_rank_ends_the_job_within_the_collective_timeout(random_dataset, tmp_path):
    """Real torchrun, 2 gloo ranks; rank 1 is stopped (SIGSTOP) mid-run and never resumed. Rank 0
    fails its next collective after parallel.timeout_s with the note [rank 0 of 2, step S] (S the step
    rank 1 hung in, or the next), and torchrun ends the job: it kills the hung rank at most 30 s
    later (its stop timeout). Bound: timeout_s + 30 s + 15 s of slack on a busy machine."""
    run_dir, timeout_s = tmp_path / "run", 10  # also bounds the ranks' first connect: not lower on a busy host
    args = tiny_overrides(*random_dataset, run_dir, **{"training.steps": 10000, "parallel.dp_replicate": 2,
                                                       "parallel.timeout_s": timeout_s, "data.tokenizer": "null"})
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"}
    agent = subprocess.Popen([str(REPO / ".venv/bin/torchrun"), "--standalone", "--nproc_per_node=2",
                              "--monitor-interval=0.1", str(REPO / "hope_dist/pretrain.py"), *args],
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=REPO,
                             start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while len(metrics(run_dir)) < 3 and agent.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        hung = worker_pid(agent, rank=1)
        assert hung is not None, agent.communicate(timeout=60)[0][-3000:]
        os.kill(hung, signal.SIGSTOP)
        stopped, step = time.monotonic(), len(metrics(run_dir))  # the step in progress
        out = agent.communicate(timeout=timeout_s + 60)[0]
        elapsed = time.monotonic() - stopped
    finally:
        if agent.poll() is None:
            os.killpg(agent.pid, signal.SIGKILL)
    assert agent.returncode != 0, out[-3000:]
    assert timeout_s <= elapsed < timeout_s + 45, (elapsed, out[-3000:])
    assert f"Timed out waiting {timeout_s * 1000}ms" in out, out[-3000:]
    noted = re.search(r"\[rank 0 of 2, step (\d+)\]", out)
    assert noted and int(noted.group(1)) in (step, step + 1), (step, out[-3000:])
    assert not (run_dir / "COMPLETE").exists()


def test_deadline_ends_a_hung_call_with_a_message():
    """A body that outlives its deadline ends the process (torchrun can restart it) and says what hung."""
    code = ("import time\nfrom hope_dist.deadline import deadline\n"
            "with deadline(1, 'the test group construction'):\n    time.sleep(60)\n")
    t0 = time.monotonic()
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=60)
    assert out.returncode == 75, out
    assert time.monotonic() - t0 < 30
    assert "the test group construction did not finish in 1 s" in out.stderr


def test_deadline_is_silent_when_the_body_finishes():
    code = ("from hope_dist.deadline import deadline\nimport time\n"
            "with deadline(1, 'x'):\n    pass\ntime.sleep(2)\nprint('ok')\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=60)
    assert out.returncode == 0 and out.stdout.strip() == "ok" and out.stderr == "", out


RESTART_WORKER = """
import os, sys, time
import torch, torch.distributed as dist
from hope_dist.parallel.process_group import init_default_group
attempt, rank = int(os.environ["TORCHELASTIC_RESTART_COUNT"]), int(os.environ["RANK"])
if attempt == 1 and rank == 1:
    time.sleep(8)  # rank 0 looks up rank 1's address before rank 1 writes this attempt's
init_default_group("gloo", 20)
t = torch.ones(1)
dist.all_reduce(t)
print(f"attempt {attempt} rank {rank} sum {t.item():.0f}", flush=True)
if attempt == 0 and rank == 1:
    sys.exit(3)  # torchrun restarts the group on the store it keeps
dist.destroy_process_group()
"""


def test_a_restarted_group_does_not_read_the_previous_attempts_addresses(tmp_path):
    """torchrun keeps its TCPStore across restarts; without init_default_group's per-attempt prefix,
    rank 0 of the second attempt reads rank 1's dead address and fails (`connectFullMesh ... Connect
    timeout`, checked by hand with dist.init_process_group), or hangs (docs/reliability.md)."""
    script = tmp_path / "worker.py"
    script.write_text(RESTART_WORKER)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    out = subprocess.run([str(REPO / ".venv/bin/torchrun"), "--standalone", "--nproc_per_node=2", "--max-restarts=1",
                          "--monitor-interval=0.1", str(script)], capture_output=True, text=True, env=env,
                         cwd=tmp_path, timeout=300)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-4000:]
    assert "attempt 1 rank 0 sum 2" in out.stdout and "attempt 1 rank 1 sum 2" in out.stdout
