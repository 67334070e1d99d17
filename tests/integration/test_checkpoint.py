"""Checkpoints: bit-exact resume (sync and async, between CMS ticks), a real SIGKILL mid-save,
keep-last-k, and clear errors for damaged or mismatched checkpoints."""
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from hope_dist.checkpoint import MARKER, CheckpointError, committed_steps, read_flat, verify
from hope_dist.faults import STALL_ENV
from hope_dist.checkpoint_manager import RNGState
from hope_dist.clock import ClockGroup, CMSClock

from helpers import REPO, make_trainer as make, read_losses as losses, tiny_overrides


@pytest.fixture(scope="module")
def uninterrupted(random_dataset, tmp_path_factory):
    """8 steps in one go: the reference every interrupted run must reproduce bit for bit."""
    run_dir = tmp_path_factory.mktemp("full")
    trainer = make(random_dataset, run_dir, **{"training.steps": 8})
    trainer.train()
    return losses(run_dir), {n: p.detach().clone() for n, p in trainer.model.named_parameters()}


@pytest.mark.parametrize("async_save", [False, True])
def test_stop_and_resume_is_bit_exact_between_ticks(random_dataset, tmp_path, uninterrupted, async_save):
    """3 steps, save, drop the process state, resume 5 more == 8 uninterrupted steps. Step 3 lies
    between ticks of the period-2 and period-4 CMS levels, so their window sums are pending."""
    ref_losses, ref_params = uninterrupted
    extra = {"training.steps": 8, "checkpoint.async_save": async_save}
    first = make(random_dataset, tmp_path, **extra)
    first_losses = [first.train_step()["loss"] for _ in range(3)]
    pending = {n: a.abs().sum().item() for n, a in first.clock.acc.items()}
    assert all(v > 0 for v in pending.values()), "the test must save non-empty window sums"
    first.save()
    first.checkpointer.wait()
    del first
    resumed = make(random_dataset, tmp_path, **extra)
    resumed.train()
    assert first_losses == [ref_losses[s] for s in range(3)]
    got = losses(tmp_path)
    assert sorted(got) == list(range(3, 8))
    assert all(got[s] == ref_losses[s] for s in got), (got, ref_losses)
    for n, p in resumed.model.named_parameters():
        assert torch.equal(p, ref_params[n]), n


def test_async_save_snapshots_the_state_before_returning(random_dataset, tmp_path):
    """Each async save holds the state of the moment save() returned, also the second one,
    which reuses the first one's staging buffers."""
    trainer = make(random_dataset, tmp_path, **{"checkpoint.async_save": True})
    for step in (1, 2):
        trainer.train_step()
        before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
        path = trainer.save()
        with torch.no_grad():
            for p in trainer.model.parameters():
                p.add_(1.0)  # training goes on while the write is in flight
        trainer.checkpointer.wait()
        assert (path / MARKER).is_file() and verify(path) == []
        saved = read_flat(path)
        assert saved["train.step"] == step and saved["train.data.consumed_samples"] == 4 * step
        for n, p in before.items():
            assert torch.equal(saved[f"model.{n}"], p), n
        with torch.no_grad():
            for n, p in trainer.model.named_parameters():
                p.copy_(before[n])


def test_sigkill_during_save_keeps_previous_checkpoint(random_dataset, tmp_path, uninterrupted):
    """A real process, SIGKILLed after writing step 4's shards but before its marker: step 2
    loads, step 4 is ignored and removed, and the resumed run matches the uninterrupted one."""
    ref_losses, ref_params = uninterrupted
    prefix, vocab, eod = random_dataset
    args = tiny_overrides(prefix, vocab, eod, tmp_path, **{"training.steps": 8, "checkpoint.interval": 2})
    env = {**os.environ, STALL_ENV: "4", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-m", "hope_dist.pretrain", *args], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        for line in proc.stdout:
            if "stalling before committing" in line:
                break
        else:
            pytest.fail(f"the training process ended without reaching the save (rc {proc.wait()})")
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    ckpts = tmp_path / "checkpoints"
    assert committed_steps(ckpts) == [2]
    assert (ckpts / "step-4" / ".metadata").is_file() and not (ckpts / "step-4" / MARKER).exists()
    trainer = make(random_dataset, tmp_path, **{"training.steps": 8, "checkpoint.interval": 2})
    trainer.maybe_resume()
    assert trainer.step == 2 and not (ckpts / "step-4").exists()
    trainer.train()
    got = losses(tmp_path)  # steps 0-3 from the killed process, then 2-7 resumed (appended)
    assert all(got[s] == ref_losses[s] for s in range(8)), (got, ref_losses)
    for n, p in trainer.model.named_parameters():
        assert torch.equal(p, ref_params[n]), n


def test_keep_last_never_deletes_newest_complete(random_dataset, tmp_path):
    trainer = make(random_dataset, tmp_path, **{"training.steps": 5, "checkpoint.interval": 1,
                                                 "checkpoint.keep_last": 2})
    (tmp_path / "checkpoints" / "step-9").mkdir(parents=True)  # a stale half-written folder
    trainer.train()
    assert committed_steps(tmp_path / "checkpoints") == [4, 5]
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-4", "step-5"]


@pytest.fixture
def saved_run(random_dataset, tmp_path):
    trainer = make(random_dataset, tmp_path, **{"training.steps": 2})
    trainer.train()
    return tmp_path, tmp_path / "checkpoints" / "step-2"


def _shard(path: Path) -> Path:
    (shard,) = path.glob("*.distcp")
    return shard


def test_corrupt_shard_is_named(random_dataset, saved_run):
    run_dir, path = saved_run
    shard = _shard(path)
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=f"{shard}: crc32 mismatch"):
        make(random_dataset, run_dir, **{"training.steps": 4}).maybe_resume()


def test_missing_or_truncated_shard_is_named(random_dataset, saved_run):
    run_dir, path = saved_run
    shard = _shard(path)
    data = shard.read_bytes()
    shard.write_bytes(data[:100])
    with pytest.raises(CheckpointError, match=f"{shard}: 100 bytes, expected {len(data)}"):
        make(random_dataset, run_dir, **{"training.steps": 4}).maybe_resume()
    shard.unlink()
    with pytest.raises(CheckpointError, match=f"{shard}: shard missing"):
        make(random_dataset, run_dir, **{"training.steps": 4}).maybe_resume()
    result = subprocess.run([sys.executable, "-m", "tools.inspect_ckpt", str(path)], cwd=REPO,
                            capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert result.returncode == 1 and f"{shard}: shard missing" in result.stdout


@pytest.mark.parametrize("override, what", [({"model.d_model": 64}, "a different model configuration"),
                                            ({"model.mixer": "attention"}, "another architecture")])
def test_wrong_model_config_is_named(random_dataset, saved_run, override, what):
    run_dir, path = saved_run
    with pytest.raises(CheckpointError, match=what) as err:
        make(random_dataset, run_dir, **{"training.steps": 4, **override}).maybe_resume()
    key = next(iter(override)).split(".")[1]
    assert str(path / "meta.json") in str(err.value) and f"{key}: saved" in str(err.value)


def test_checkpoint_of_another_model_is_rejected(random_dataset, saved_run):
    run_dir, path = saved_run
    meta = json.loads((path / "meta.json").read_text())
    (path / "meta.json").write_text(json.dumps({**meta, "architecture": "LlamaForCausalLM"}))
    with pytest.raises(CheckpointError, match=f"{path / 'meta.json'}.*LlamaForCausalLM"):
        make(random_dataset, run_dir, **{"training.steps": 4}).maybe_resume()
    (path / "meta.json").unlink()
    with pytest.raises(CheckpointError, match="DCP checkpoint without hope_dist metadata"):
        make(random_dataset, run_dir, **{"training.steps": 4}).maybe_resume()


def test_uncommitted_folder_named_for_resume_is_refused(random_dataset, saved_run):
    run_dir, path = saved_run
    (path / MARKER).unlink()
    with pytest.raises(CheckpointError, match="no COMMITTED marker"):
        make(random_dataset, run_dir, **{"training.steps": 4, "checkpoint.resume": str(path)}).maybe_resume()


def test_full_training_state_is_stored(saved_run):
    """Every part the issue lists: model, optimizer state of every CMS level (even one that has
    not ticked), clock accumulators and windows, RNG, counters, data position, config, commit."""
    _, path = saved_run
    flat = read_flat(path)
    meta = json.loads((path / "meta.json").read_text())
    assert flat["train.step"] == 2 and flat["train.tokens_seen"] == 2 * 4 * 32
    assert flat["train.data.consumed_samples"] == 8
    assert any(k.startswith("rng.rank0.cpu") for k in flat)
    for level in (0, 1, 2):
        assert f"optim.state.layers.0.cms.levels.{level}.mlp.up.weight.exp_avg" in flat
    assert flat["optim.state.layers.0.cms.levels.2.mlp.up.weight.step"].item() == 0  # period 4: no tick yet
    assert flat["clock.dp0.window_tokens.cms.2"] == 2 * 4 * 32
    assert flat["clock.dp0.acc.layers.0.cms.levels.2.mlp.up.weight"].abs().sum() > 0
    assert meta["config"]["model"]["d_model"] == 32 and len(meta["git_commit"]) >= 7
    assert meta["layout"] == {"dp": 1, "tp": 1, "pp": 1} and meta["next_lr"] > 0


def test_clock_and_rng_own_their_keys_and_resplit_keeps_window_totals():
    """The clock's per-dp-rank entries survive a flatten/parse round trip and a dp-size change keeps
    their total on new rank 0 (zeros elsewhere); the RNG's rank keys parse and nothing else does."""
    clock = CMSClock([ClockGroup("base", 1, 1.0, [("b", torch.nn.Parameter(torch.zeros(2)))]),
                      ClockGroup("cms.1", 2, 1.0, [("layers.0.w", torch.nn.Parameter(torch.zeros(3)))])])
    saved = [{"acc": {"layers.0.w": torch.full((3,), float(r + 1))}, "window_tokens": {"base": 0, "cms.1": 64}}
             for r in range(3)]
    flat = {"model.x": torch.zeros(1), "rng.rank5.cpu": torch.zeros(1)}
    for r, state in enumerate(saved):
        flat.update(CMSClock.flat_state(r, state))
    assert CMSClock.parse_key("clock.dp2.acc.layers.0.w") == (2, "acc", "layers.0.w")
    assert CMSClock.parse_key("clock.dp1.window_tokens.cms.1") == (1, "window_tokens", "cms.1")
    assert [CMSClock.parse_key(k) for k in ("rng.rank5.cpu", "clock.dpx.acc.w", "clock.dp0.other.w")] == [None] * 3
    assert [RNGState.parse_key(k) for k in ("rng.rank5.cpu", "rng.rank5", "clock.dp0.acc.w")] == [5, None, None]
    popped = CMSClock.pop_flat(flat)
    assert set(flat) == {"model.x", "rng.rank5.cpu"} and len(popped) == 3
    assert all(torch.equal(p["acc"]["layers.0.w"], s["acc"]["layers.0.w"]) for p, s in zip(popped, saved))
    assert CMSClock.resplit(popped, 1, 3) is popped[1]  # same dp size: each rank its own
    one = CMSClock.resplit(popped, 0, 1)
    assert torch.equal(one["acc"]["layers.0.w"], torch.full((3,), 6.0)) and one["window_tokens"]["cms.1"] == 64
    assert not CMSClock.resplit(popped, 1, 2)["acc"]["layers.0.w"].any()
    clock.load_checkpoint_state({CMSClock.rank_key(r): s for r, s in enumerate(popped)}, 0, 2)
    assert torch.equal(clock.acc["layers.0.w"], torch.full((3,), 6.0)) and clock.groups[1].window_tokens == 64
