"""The trainer end to end on real indexed data: metrics, checkpoints, resume, bad input."""
import json
import shutil

import pytest
import torch

from hope_dist.checkpoint import MARKER, committed_steps
from hope_dist.config import load_config
from hope_dist.trainer import Trainer

from helpers import tiny_overrides


def run(prefix, vocab, eod, run_dir, **extra):
    cfg = load_config(None, tiny_overrides(prefix, vocab, eod, run_dir, **extra))
    trainer = Trainer(cfg)
    trainer.train()
    return trainer


def metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_run_writes_metrics_checkpoints_and_run_info(random_dataset, tmp_path):
    prefix, vocab, eod = random_dataset
    run_dir = tmp_path / "run"
    run(prefix, vocab, eod, run_dir, **{"training.steps": 6, "checkpoint.interval": 2, "checkpoint.keep_last": 2})
    rows = metrics(run_dir)
    assert [r["step"] for r in rows] == list(range(6))
    for r in rows:
        assert {"loss", "lr", "grad_norm", "tokens_per_s", "ticked", "bytes_reduced"} <= r.keys()
    assert rows[1]["ticked"] == ["base", "cms.0", "cms.1"] and rows[3]["ticked"][-1] == "cms.2"
    assert committed_steps(run_dir / "checkpoints") == [4, 6]  # keep_last=2, the final one included
    assert (run_dir / "COMPLETE").read_text().strip() == "6"
    assert (run_dir / "config.yaml").is_file() and "git_commit" in (run_dir / "run_info.jsonl").read_text()


def test_resume_continues_exactly(random_dataset, tmp_path):
    """Resuming from the step-4 checkpoint of a run (between CMS ticks of the period-4 level
    at steps 3 and 7) reproduces its remaining steps and final parameters bit for bit."""
    prefix, vocab, eod = random_dataset
    full_dir, resumed_dir = tmp_path / "full", tmp_path / "resumed"
    extra = {"training.steps": 8, "checkpoint.interval": 3, "checkpoint.keep_last": 5}
    full = run(prefix, vocab, eod, full_dir, **extra)
    (resumed_dir / "checkpoints").mkdir(parents=True)
    shutil.copytree(full_dir / "checkpoints" / "step-3", resumed_dir / "checkpoints" / "step-3")
    resumed = run(prefix, vocab, eod, resumed_dir, **extra)
    a = {r["step"]: r["loss"] for r in metrics(full_dir)}
    b = {r["step"]: r["loss"] for r in metrics(resumed_dir)}
    assert sorted(b) == [3, 4, 5, 6, 7]
    assert all(a[s] == b[s] for s in b), (a, b)
    for (n, p), q in zip(full.model.named_parameters(), resumed.model.parameters()):
        assert torch.equal(p, q), n


def test_uncommitted_checkpoint_is_ignored(random_dataset, tmp_path):
    prefix, vocab, eod = random_dataset
    run_dir = tmp_path / "run"
    run(prefix, vocab, eod, run_dir, **{"training.steps": 2})
    (run_dir / "checkpoints" / "step-2" / MARKER).unlink()  # as if the save had crashed
    (run_dir / "COMPLETE").unlink()
    trainer = run(prefix, vocab, eod, run_dir, **{"training.steps": 2})
    assert trainer.step == 2 and [r["step"] for r in metrics(run_dir)] == [0, 1, 0, 1]
    assert committed_steps(run_dir / "checkpoints") == [2]


@pytest.mark.parametrize("policy", ["stop", "skip"])
def test_nonfinite_loss_policy(random_dataset, tmp_path, policy):
    prefix, vocab, eod = random_dataset
    cfg = load_config(None, tiny_overrides(prefix, vocab, eod, tmp_path / "run",
                                           **{"training.nonfinite": policy, "training.steps": 3}))
    trainer = Trainer(cfg)
    trainer.train_step()
    with torch.no_grad():
        trainer.model.output.weight[0, 0] = float("nan")  # poisons every logit's softmax
    before = {n: p.clone() for n, p in trainer.model.named_parameters()}
    if policy == "stop":
        with pytest.raises(FloatingPointError, match="step 1"):
            trainer.train_step()
        return
    m = trainer.train_step()
    assert m["skipped_nonfinite"] and trainer.step == 2
    for n, p in trainer.model.named_parameters():
        assert torch.equal(p.nan_to_num(), before[n].nan_to_num()), n


def test_missing_data_file_is_a_clear_error(tmp_path, random_dataset):
    _, vocab, eod = random_dataset
    cfg = load_config(None, tiny_overrides(tmp_path / "nowhere" / "corpus", vocab, eod, tmp_path / "run"))
    with pytest.raises((FileNotFoundError, ValueError), match="nowhere"):
        Trainer(cfg)
