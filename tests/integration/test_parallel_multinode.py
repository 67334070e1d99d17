"""`torchrun --nnodes=2 --rdzv-backend=c10d` on localhost trains like one node (issue item 6).

Two torchrun agents, one rank each, meet at a c10d rendezvous and run the real entry point
(hope_dist/pretrain.py) with FSDP2 over the two "nodes"; its per-step losses must match a
single-node `torchrun --standalone --nproc_per_node=2` run of the same job, and both finish
with a committed checkpoint.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import REPO, tiny_overrides



def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(launch: list[str], job: list[str], log: Path) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"}
    return subprocess.Popen([sys.executable, "-m", "torch.distributed.run", *launch, "hope_dist/pretrain.py", *job],
                            cwd=REPO, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT)


def _losses(run_dir: Path) -> list[float]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows]


def _wait(procs: list[subprocess.Popen], logs: list[Path]) -> None:
    for proc, log in zip(procs, logs):
        assert proc.wait(timeout=300) == 0, log.read_text()[-4000:]


@pytest.mark.slow
def test_two_node_run_matches_single_node(random_dataset, tmp_path):
    prefix, vocab, eod = random_dataset
    extra = {"parallel.dp_shard": 2, "training.steps": 4, "training.global_batch": 4, "training.micro_batch": 2}
    port = _free_port()
    multi = ["--nnodes=2", "--nproc_per_node=1", "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{port}",
             "--rdzv-id=hope-two-node", "--max-restarts=0"]
    job = tiny_overrides(prefix, vocab, eod, tmp_path / "two_node", **extra)
    logs = [tmp_path / f"node{i}.log" for i in range(2)]
    _wait([_torchrun(multi, job, log) for log in logs], logs)

    single = ["--standalone", "--nproc_per_node=2"]
    log = tmp_path / "single.log"
    _wait([_torchrun(single, tiny_overrides(prefix, vocab, eod, tmp_path / "one_node", **extra), log)], [log])

    a, b = _losses(tmp_path / "two_node"), _losses(tmp_path / "one_node")
    assert len(a) == len(b) == 4
    assert all(abs(x - y) <= 1e-6 * abs(y) for x, y in zip(a, b)), (a, b)
    for run in ("two_node", "one_node"):
        assert (tmp_path / run / "COMPLETE").read_text().strip() == "4"
