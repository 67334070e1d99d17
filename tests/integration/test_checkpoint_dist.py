"""Checkpoints across real multi-process layouts (torchrun, gloo on CPU): bit-exact resume under
(dp=2, tp=2) with async saves and under pp=2; a (dp=2, tp=2) checkpoint resumed under dp=1 (clock
window sums folded) and loaded under pp=2 (identical logits)."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from hope_dist.checkpoint import read_flat, read_model, stored_keys
from hope_dist.config import load_config
from hope_dist.trainer import Trainer

from helpers import REPO, tiny_overrides

pytestmark = pytest.mark.slow


def torchrun(nproc: int, args: list[str]) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), "WANDB_MODE": "disabled"}
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                             f"--nproc_per_node={nproc}", "hope_dist/pretrain.py", *args],
                            cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]


def losses(run_dir: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows}


def resume_matches(run_dir: Path, tmp_path: Path, nproc: int, args: list[str]) -> None:
    """Copy the run's step-3 checkpoint into a new run, resume it with the same layout, and check
    losses and final parameters against the uninterrupted run, bit for bit."""
    (tmp_path / "checkpoints").mkdir(parents=True)
    shutil.copytree(run_dir / "checkpoints" / "step-3", tmp_path / "checkpoints" / "step-3")
    torchrun(nproc, args)
    ref, got = losses(run_dir), losses(tmp_path)
    assert sorted(got) == [3, 4, 5] and all(got[s] == ref[s] for s in got), (got, ref)
    a, b = read_model(run_dir / "checkpoints" / "step-6"), read_model(tmp_path / "checkpoints" / "step-6")
    for name in a:
        assert torch.equal(a[name], b[name]), name


MESH = {"training.steps": 6, "checkpoint.interval": 3, "parallel.dp_replicate": 2, "parallel.tp": 2,
        "checkpoint.async_save": True}
PP2 = {"training.steps": 6, "checkpoint.interval": 3, "parallel.pp": 2, "parallel.pp_microbatches": 2}


@pytest.fixture(scope="module")
def mesh_run(random_dataset, tmp_path_factory):
    """6 steps under (dp=2, tp=2) on 4 ranks, async saves at steps 3 (between ticks) and 6."""
    prefix, vocab, eod = random_dataset
    run_dir = tmp_path_factory.mktemp("mesh")
    torchrun(4, tiny_overrides(prefix, vocab, eod, run_dir, **MESH))
    return run_dir


def test_mesh_dp2_tp2_resume_is_bit_exact(random_dataset, tmp_path, mesh_run):
    prefix, vocab, eod = random_dataset
    resume_matches(mesh_run, tmp_path, 4, tiny_overrides(prefix, vocab, eod, tmp_path, **MESH))


def test_pp2_resume_is_bit_exact(random_dataset, tmp_path):
    """With training.carry_state in two lane groups, so each stage's carried states (per group and
    microbatch) resume too."""
    prefix, vocab, eod = random_dataset
    full = tmp_path / "full"
    pp2 = {**PP2, "training.carry_state": True, "data.lane_groups": 2}
    torchrun(2, tiny_overrides(prefix, vocab, eod, full, **pp2))
    assert {"carry.rank0", "carry.rank1"} <= stored_keys(full / "checkpoints" / "step-3")
    resumed = tmp_path / "resumed"
    resume_matches(full, resumed, 2, tiny_overrides(prefix, vocab, eod, resumed, **pp2))


def test_mesh_checkpoint_resumes_under_dp1(random_dataset, tmp_path, mesh_run):
    """Model and optimizer load unchanged; the two dp ranks' pending window sums land, added, on
    the single rank; training goes on as under (dp=2, tp=2), to float32 reassociation."""
    prefix, vocab, eod = random_dataset
    step3 = mesh_run / "checkpoints" / "step-3"
    trainer = Trainer(load_config(None, tiny_overrides(prefix, vocab, eod, tmp_path, **{
        "training.steps": 6, "checkpoint.interval": 3, "checkpoint.resume": str(step3)})))
    trainer.maybe_resume()
    saved = read_flat(step3)
    assert trainer.step == 3
    for name, p in trainer.model.named_parameters():
        assert torch.equal(p, saved[f"model.{name}"]), name
    for name, acc in trainer.clock.acc.items():
        total = saved[f"clock.dp0.acc.{name}"] + saved[f"clock.dp1.acc.{name}"]
        assert saved[f"clock.dp1.acc.{name}"].abs().sum() > 0 and torch.equal(acc, total), name
    trainer.train()
    ref, got = losses(mesh_run), losses(tmp_path)
    for s in (3, 4, 5):
        assert got[s] == pytest.approx(ref[s], rel=1e-5), (s, got[s], ref[s])


# ------------------------------------------------------------------ layouts of the parallel layer
def fixed_tokens() -> torch.Tensor:
    return torch.randint(1, 96, (2, 32), generator=torch.Generator().manual_seed(3))


def layout_logits(ckpt: str, overrides: list[str], out: str) -> None:
    """torchrun worker: build the model under the layout of `overrides` with the parallel layer,
    load the model of `ckpt` into it (DCP reshards), and write the logits of fixed_tokens()."""
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, set_model_state_dict

    from hope_dist.checkpoint import Checkpointer
    from hope_dist.model import build_model
    from hope_dist.parallel.mesh import build_mesh
    from hope_dist.parallel.parallelize import parallelize

    dist.init_process_group("gloo")
    cfg = load_config(None, overrides)
    dims = build_mesh(cfg.parallel, "cpu")
    pm = parallelize(build_model(cfg.model), cfg, dims, torch.device("cpu"))
    state = {"model": get_model_state_dict(pm.model)}
    Checkpointer.load(Path(ckpt), state)
    set_model_state_dict(pm.model, state["model"])
    p, pp_group = cfg.parallel, dims.group("pp")
    with torch.no_grad():
        x = fixed_tokens()
        if p.pp > 1 and dims.pp_rank > 0:
            x = torch.empty(2, 32, cfg.model.d_model)
            dist.recv(x, group=pp_group, group_src=dims.pp_rank - 1)
        y = pm.model(x)
        if p.pp > 1 and dims.pp_rank < p.pp - 1:
            dist.send(y, group=pp_group, group_dst=dims.pp_rank + 1)
        elif p.tp > 1:
            parts = [torch.empty_like(y) for _ in range(p.tp)]
            dist.all_gather(parts, y.contiguous(), group=dims.group("tp"))
            y = torch.cat(parts, dim=-1)
    if dist.get_rank() == dist.get_world_size() - 1:
        torch.save(y, out)
    dist.destroy_process_group()


def run_layout_logits(nproc: int, ckpt: Path, overrides: list[str], out: Path) -> torch.Tensor:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": f"{REPO}:{REPO / 'tests'}"}
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                             f"--nproc_per_node={nproc}", __file__, str(ckpt), str(out), *overrides],
                            cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return torch.load(out)


def test_mesh_checkpoint_gives_identical_logits_under_dp1_and_pp2(random_dataset, tmp_path, mesh_run):
    """Saved under (dp=2, tp=2): loaded whole by one process and under pp=2, bit for bit."""
    prefix, vocab, eod = random_dataset
    step6 = mesh_run / "checkpoints" / "step-6"
    trainer = Trainer(load_config(None, tiny_overrides(prefix, vocab, eod, tmp_path, **{
        "checkpoint.resume": str(step6)})))
    trainer.maybe_resume()
    with torch.no_grad():
        ref = trainer.model(fixed_tokens())
    pp2 = run_layout_logits(2, step6, tiny_overrides(prefix, vocab, eod, tmp_path, **PP2), tmp_path / "pp2.pt")
    assert torch.equal(pp2, ref)


if __name__ == "__main__":
    layout_logits(sys.argv[1], sys.argv[3:], sys.argv[2])
