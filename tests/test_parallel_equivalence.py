"""Every (dp, tp, pp) layout trains exactly like one process (HOPE_SPEC sections 4 and 5).

Each layout is one spawn of real gloo ranks running the real Trainer on a real indexed dataset
for 6 steps with CMS periods (1, 2, 3); the per-step losses and the final parameters must equal
an in-process single-rank run with the same global batch and data order (rel. err <= 1e-5),
and the bytes each rank hands to the data-parallel collectives per step and clock group must be
exactly the sizes of the gradients of the groups that tick (its tp shard and pp stage's part).
"""
from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.distributed.tensor import DTensor, Shard

from hope_dist.config import load_config
from hope_dist.trainer import Trainer

from conftest import tiny_overrides

STEPS = 6
PERIODS = (1, 2, 3)


def overrides(dataset, run_dir, **extra) -> list[str]:
    prefix, vocab, eod = dataset
    cms = "[" + ", ".join(f"{{width: 32, period: {p}}}" for p in PERIODS) + "]"
    base = {"model.n_heads": 4, "model.cms": cms, "training.steps": STEPS, "training.global_batch": 8,
            "training.micro_batch": 2, "optim.warmup_steps": 2}
    base.update(extra)
    return tiny_overrides(prefix, vocab, eod, run_dir, **base)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _full(p: torch.Tensor) -> torch.Tensor:
    return (p.full_tensor() if isinstance(p, DTensor) else p).detach().clone()


def _tp_local_bytes(p: torch.Tensor) -> int:
    """Bytes of this rank's gradient of p before data-parallel sharding: tp shards count, dp not."""
    n = p.numel()
    if isinstance(p, DTensor):
        for name, placement in zip(p.device_mesh.mesh_dim_names, p.placements):
            if name == "tp" and isinstance(placement, Shard):
                n //= p.device_mesh.size(p.device_mesh.mesh_dim_names.index("tp"))
    return n * 4


def _worker(rank: int, world: int, port: int, args: list[str], out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    trainer = Trainer(load_config(None, args))
    group_bytes = {g.name: sum(_tp_local_bytes(p) for _, p in g.params) for g in trainer.groups}
    rows = [trainer.train_step() for _ in range(STEPS)]
    params = {n: _full(p) for n, p in trainer.model.named_parameters()}
    local = sum((p.to_local() if isinstance(p, DTensor) else p).numel() for p in trainer.model.parameters())
    torch.save({"rows": rows, "params": params, "group_bytes": group_bytes, "dp_size": trainer.dp_size,
                "layout": trainer.parallel.description, "local_numel": local}, f"{out}/rank{rank}.pt")
    dist.barrier()
    dist.destroy_process_group()


def run_layout(args: list[str], world: int, out) -> list[dict]:
    mp.spawn(_worker, args=(world, _free_port(), args, str(out)), nprocs=world, join=True)
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(world)]


def reference(dataset, tmp_path, **extra) -> dict:
    trainer = Trainer(load_config(None, overrides(dataset, tmp_path / "ref", **extra)))
    rows = [trainer.train_step() for _ in range(STEPS)]
    return {"losses": [r["loss"] for r in rows],
            "params": {n: p.detach().clone() for n, p in trainer.model.named_parameters()}}


def reference_model_params(results: list[dict]) -> list[torch.Tensor]:
    merged = {}
    for res in results:
        merged.update(res["params"])
    return list(merged.values())


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def check_equivalent(results: list[dict], ref: dict) -> None:
    for res in results:
        losses = [r["loss"] for r in res["rows"]]
        for s, (a, b) in enumerate(zip(losses, ref["losses"])):
            assert abs(a - b) <= 1e-5 * abs(b), (s, losses, ref["losses"])
    merged = {}
    for res in results:
        for name, t in res["params"].items():
            if name in merged:  # replicas of the same parameter agree too
                assert rel_err(t, merged[name]) <= 1e-6, name
            merged[name] = t
    assert merged.keys() == ref["params"].keys()
    for name, t in merged.items():
        assert rel_err(t, ref["params"][name]) <= 1e-5, (name, rel_err(t, ref["params"][name]))


def check_bytes(results: list[dict]) -> None:
    """Measured bytes per step and group == sizes of the ticking groups' gradients, exactly;
    over a window of lcm(PERIODS) steps their mean is |other| + sum_l |theta_l| / P_l."""
    for res in results:
        sizes = res["group_bytes"]
        periods = {"base": 1, **{f"cms.{i}": p for i, p in enumerate(PERIODS)}}
        for s, row in enumerate(res["rows"]):
            ticking = {g for g, p in periods.items() if (s + 1) % p == 0}
            assert set(row["ticked"]) == ticking
            expected = {g: sizes[g] if res["dp_size"] > 1 else 0 for g in ticking}
            assert row["bytes_reduced"] == expected, (s, row["bytes_reduced"], expected)
        if res["dp_size"] > 1:
            mean = sum(sum(r["bytes_reduced"].values()) for r in res["rows"]) / STEPS
            formula = sum(sizes[g] / p for g, p in periods.items())
            assert mean == pytest.approx(formula, rel=1e-12)


# (dp_replicate, dp_shard, tp, pp, schedule, extra): the meshes (dp, tp, pp), with dp
# as FSDP2 sharding or pure replication, plus HSDP, interleaved 1F1B and activation checkpointing
LAYOUTS = {
    "dp2_shard": (1, 2, 1, 1, "1f1b", {}),
    "dp2_replicate": (2, 1, 1, 1, "1f1b", {}),
    "tp2": (1, 1, 2, 1, "1f1b", {}),
    "pp2_1f1b": (1, 1, 1, 2, "1f1b", {}),
    "dp2_tp2": (1, 2, 2, 1, "1f1b", {"parallel.activation_checkpoint": True}),
    "dp2_pp2_gpipe": (2, 1, 1, 2, "gpipe", {}),
    "tp2_pp2": (1, 1, 2, 2, "1f1b", {}),
    "hsdp2x2": (2, 2, 1, 1, "1f1b", {}),
}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(LAYOUTS))
def test_layout_matches_single_process(random_dataset, tmp_path, name):
    rep, shard, tp, pp, schedule, extra = LAYOUTS[name]
    layout = {"parallel.dp_replicate": rep, "parallel.dp_shard": shard, "parallel.tp": tp,
              "parallel.pp": pp, "parallel.pp_schedule": schedule, "parallel.microbatches": 2}
    results = run_layout(overrides(random_dataset, tmp_path / "run", **layout, **extra),
                         rep * shard * tp * pp, tmp_path)
    full = sum(p.numel() for p in reference_model_params(results))
    for res in results:  # the layout was applied: each rank holds only its part
        assert f"dp_replicate={rep} dp_shard={shard} tp={tp}" in res["layout"]
        assert res["local_numel"] < full if shard * tp * pp > 1 else res["local_numel"] == full
    check_equivalent(results, reference(random_dataset, tmp_path))
    check_bytes(results)


@pytest.mark.slow
def test_eight_ranks_dp2_tp2_pp2_interleaved(random_dataset, tmp_path):
    """8 ranks, (dp, tp, pp) = (2, 2, 2) with FSDP2 and interleaved 1F1B over 4 layers."""
    layout = {"parallel.dp_shard": 2, "parallel.tp": 2, "parallel.pp": 2, "parallel.microbatches": 2,
              "parallel.pp_schedule": "interleaved_1f1b", "model.n_layers": 4}
    results = run_layout(overrides(random_dataset, tmp_path / "run", **layout), 8, tmp_path)
    check_equivalent(results, reference(random_dataset, tmp_path, **{"model.n_layers": 4}))
    check_bytes(results)
