"""Fault hooks are passed in (hope_dist/faults.py), not read from the environment by the trainer or the
checkpointer: a real Checkpointer calls the injected sleep before its marker, the environment reaches
them only through the entry point's FaultHooks.from_env, and the NaN lands on the last replica alone."""
from __future__ import annotations

import math

import torch

from hope_dist.checkpoint import MARKER, Checkpointer, committed_steps
from hope_dist.config import CheckpointConfig
from hope_dist.faults import DELAY_ENV, NONFINITE_ENV, STALL_ENV, STALL_S, FaultHooks


def test_stall_and_delay_happen_before_the_marker(tmp_path):
    seen = []
    ckpt = Checkpointer(CheckpointConfig(keep_last=5), tmp_path)
    hooks = FaultHooks(stall_before_commit=3, commit_delay_s=0.25,
                       sleep=lambda s: seen.append((s, committed_steps(ckpt.dir))))
    ckpt.before_commit = hooks.before_commit
    state = {"w": torch.arange(4.0)}
    ckpt.save(2, state, {"step": 2})
    ckpt.save(3, state, {"step": 3})
    assert seen == [(0.25, []), (STALL_S, [2]), (0.25, [2])]  # step 3 uncommitted while it stalls
    assert committed_steps(ckpt.dir) == [2, 3] and (ckpt.path(3) / MARKER).is_file()


def test_the_environment_reaches_them_only_through_from_env():
    assert FaultHooks.from_env({}) == FaultHooks()
    hooks = FaultHooks.from_env({NONFINITE_ENV: "5", STALL_ENV: "4", DELAY_ENV: "300"})
    assert (hooks.nonfinite_step, hooks.stall_before_commit, hooks.commit_delay_s) == (5, 4, 0.3)
    assert FaultHooks.from_env({NONFINITE_ENV: "-1"}).nonfinite_step is None


def test_nonfinite_loss_only_at_its_step_on_the_last_replica():
    hooks, loss = FaultHooks(nonfinite_step=5), torch.tensor(2.0)
    assert math.isnan(hooks.loss(loss, 5, last_replica=True).item())
    assert hooks.loss(loss, 5, last_replica=False).item() == 2.0
    assert hooks.loss(loss, 4, last_replica=True).item() == 2.0
    assert FaultHooks().loss(loss, 0, last_replica=True).item() == 2.0
