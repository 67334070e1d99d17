"""Running a tiny job under several parallel layouts and checking each equals one process.

`run_layouts` spawns real gloo ranks once for a set of layouts, each training the real Trainer on
a real indexed dataset for STEPS steps with CMS periods PERIODS; `check_equivalent` compares their
per-step losses, validation loss, memory health and final parameters with `single_process`.
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

from helpers import tiny_overrides

STEPS = 6
HEALTH_TOL = 1e-5
PERIODS = (1, 2, 3)


def overrides(dataset, run_dir, **extra) -> list[str]:
    prefix, vocab, eod = dataset
    cms = "[" + ", ".join(f"{{width: 32, period: {p}}}" for p in PERIODS) + "]"
    # lr 1e-3: Adam's first steps normalise every gradient element, float rounding included
    base = {"model.n_heads": 4, "model.cms": cms, "training.steps": STEPS, "training.global_batch": 8,
            "training.micro_batch": 2, "optim.warmup_steps": 2, "optim.lr": 1e-3,
            "data.valid_fraction": 0.1, "eval.every": STEPS, "eval.tokens": 512}
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


def _worker(rank: int, world: int, port: int, runs: dict[str, list[str]], out: str) -> None:
    """One rank: train every layout of `runs` in turn on the same process group."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    for name, args in runs.items():
        trainer = Trainer(load_config(None, args))
        group_bytes = {g.name: sum(_tp_local_bytes(p) for _, p in g.params) for g in trainer.groups}
        rows = [trainer.train_step() for _ in range(STEPS)]
        rows[-1].update(trainer.validate())
        params = {n: _full(p) for n, p in trainer.model.named_parameters()}
        local = sum((p.to_local() if isinstance(p, DTensor) else p).numel() for p in trainer.model.parameters())
        torch.save({"rows": rows, "params": params, "group_bytes": group_bytes, "dp_size": trainer.dp_size,
                    "layout": trainer.parallel.description, "local_numel": local}, f"{out}/{name}.rank{rank}.pt")
        dist.barrier()
    dist.destroy_process_group()


def run_layouts(runs: dict[str, list[str]], world: int, out) -> dict[str, list[dict]]:
    """One spawn of `world` ranks for all `runs`; returns each run's per-rank results."""
    mp.spawn(_worker, args=(world, _free_port(), runs, str(out)), nprocs=world, join=True)
    return {name: [torch.load(out / f"{name}.rank{r}.pt", weights_only=False) for r in range(world)]
            for name in runs}


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
        val, val_ref = res["rows"][-1], ref["rows"][-1]
        assert val["val_tokens"] == val_ref["val_tokens"] > 0
        assert abs(val["val_loss"] - val_ref["val_loss"]) <= 1e-5 * val_ref["val_loss"], (val, val_ref)
        for s, (row, row_ref) in enumerate(zip(res["rows"], ref["rows"])):  # memory health, as one process
            health = {k: v for k, v in row_ref.items() if k.startswith("mem/")}
            assert health and {k: v for k, v in row.items() if k.startswith("mem/")}.keys() == health.keys()
            for k, v in health.items():
                assert abs(row[k] - v) <= HEALTH_TOL * abs(v), (s, k, row[k], v)
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


def single_process(dataset, run_dir, **extra) -> dict:
    """The reference: the same job in this process, one rank: per-step rows (validation on the last),
    losses and final parameters."""
    trainer = Trainer(load_config(None, overrides(dataset, run_dir, **extra)))
    rows = [trainer.train_step() for _ in range(STEPS)]
    rows[-1].update(trainer.validate())
    return {"losses": [r["loss"] for r in rows], "rows": rows,
            "params": {n: p.detach().clone() for n, p in trainer.model.named_parameters()}}
