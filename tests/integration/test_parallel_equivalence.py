"""Every (dp, tp, pp) layout trains exactly like one process (docs/model.md sections 4 and 5).

Each layout is one spawn of real gloo ranks running the real Trainer on a real indexed dataset
for 6 steps with CMS periods (1, 2, 3); the per-step losses and the final parameters must equal
an in-process single-rank run with the same global batch and data order (rel. err <= 1e-5),
and the bytes each rank hands to the data-parallel collectives per step and clock group must be
exactly the sizes of the gradients of the groups that tick (its tp shard and pp stage's part).
"""
from __future__ import annotations

import pytest

from helpers.layouts import (check_bytes, check_equivalent, overrides, reference_model_params, run_layouts,
                             single_process)


@pytest.fixture(scope="module")
def references(random_dataset, tmp_path_factory) -> dict[int, dict]:
    """Single-process runs by layer count: per-step losses and final parameters."""
    return {n: single_process(random_dataset, tmp_path_factory.mktemp("ref"), **{"model.n_layers": n}) for n in (2, 4)}


# (dp_replicate, dp_shard, tp, pp, extra) by world size: the issue's meshes (dp, tp, pp), with dp
# as FSDP2 sharding or as pure replication, plus HSDP, GPipe, activation checkpointing and, on
# 8 ranks, interleaved 1F1B over 4 layers. One spawn per world size runs all of its layouts.
LAYOUTS = {
    2: {"dp2_shard": (1, 2, 1, 1, {}),
        "dp2_replicate": (2, 1, 1, 1, {}),
        "tp2": (1, 1, 2, 1, {}),
        "pp2_1f1b": (1, 1, 1, 2, {})},
    4: {"dp2_tp2_ac": (1, 2, 2, 1, {"parallel.activation_checkpoint": True}),
        "dp2_pp2_gpipe": (2, 1, 1, 2, {"parallel.pp_schedule": "gpipe"}),
        "tp2_pp2": (1, 1, 2, 2, {}),
        "hsdp2x2": (2, 2, 1, 1, {})},
    8: {"dp2_tp2_pp2_interleaved": (1, 2, 2, 2, {"parallel.pp_schedule": "interleaved_1f1b",
                                                 "model.n_layers": 4})},
}


@pytest.mark.slow
@pytest.mark.parametrize("world", list(LAYOUTS))
def test_layouts_match_single_process(random_dataset, references, tmp_path, world):
    runs = {}
    for name, (rep, shard, tp, pp, extra) in LAYOUTS[world].items():
        layout = {"parallel.dp_replicate": rep, "parallel.dp_shard": shard, "parallel.tp": tp,
                  "parallel.pp": pp, "parallel.pp_microbatches": 2, **extra}
        runs[name] = overrides(random_dataset, tmp_path / name, **layout)
    results = run_layouts(runs, world, tmp_path)
    for name, (rep, shard, tp, pp, extra) in LAYOUTS[world].items():
        res = results[name]
        full = sum(p.numel() for p in reference_model_params(res))
        for r in res:  # the layout was applied: each rank holds only its part
            assert f"dp_replicate={rep} dp_shard={shard} tp={tp}" in r["layout"], name
            assert r["local_numel"] < full if shard * tp * pp > 1 else r["local_numel"] == full, name
        check_equivalent(res, references[extra.get("model.n_layers", 2)])
        check_bytes(res)


# ------------------------------------------------------------------ M3 (unit tests: tests/unit/test_m3.py)
# by world size: FSDP2 alone (every hidden matrix sharded on one axis), TP alone (column- and
# row-parallel matrices), and both on a 2-D (dp_shard, tp) mesh
M3_LAYOUTS = {2: {"dp2_shard": {"parallel.dp_shard": 2}, "tp2": {"parallel.tp": 2}},
              4: {"dp2_shard_tp2": {"parallel.dp_shard": 2, "parallel.tp": 2}}}


@pytest.mark.slow
@pytest.mark.parametrize("world", list(M3_LAYOUTS))
def test_m3_layouts_match_single_process(random_dataset, tmp_path, world):
    """Each layout trains like one process: the gathered-matrix Newton-Schulz makes M3 independent
    of the layout. f = 2 puts slow steps inside the 6 steps."""
    m3 = {"optim.name": "m3", "optim.slow_every": 2}
    ref = single_process(random_dataset, tmp_path / "ref", **m3)
    runs = {name: overrides(random_dataset, tmp_path / name, **m3, **layout)
            for name, layout in M3_LAYOUTS[world].items()}
    results = run_layouts(runs, world, tmp_path)
    for name in runs:
        check_equivalent(results[name], ref)


# ------------------------------------------------------------------ in-context CMS levels, memory options
@pytest.mark.slow
def test_in_context_cms_memory_options_and_carried_state_tp2_and_pp2_match_single_process(random_dataset, tmp_path):
    """The in-context levels' deviation is sharded like the down projection under tp (the op sums over
    the tp group) and stays on its stage under pp. The same runs carry the memory options of
    docs/model.md section 2.10 (per-memory inputs split by head like `a`; retention toward M_0, whose
    anchor is each rank's own heads' initial weights; the curvature-bounded step, the projection memories'
    rate, the normalised rate read-outs and W2 without the delta factor, per head). One spawn covers
    all of it, and training.carry_state: each rank carries its own heads' (tp) or its stage's layers' (pp) state
    from step to step."""
    cms = {"model.cms_in_context": True, "model.cms": "[{width: 32, period: 1, chunk_size: 8}, {width: 32, period: 2, "
           "chunk_size: 16}, {width: 32, period: 3}]",
           "model.memory_inputs": "per_memory", "model.retain_init": True, "model.bound_step": True,
           "model.proj_rate": 0.5, "model.rate_norm": True, "model.rates_from": "input", "model.w2_delta": False,
           "training.carry_state": True,
           "data.lane_groups": 2}
    ref = single_process(random_dataset, tmp_path / "ref", **cms)
    layouts = {"tp2": {"parallel.tp": 2}, "pp2": {"parallel.pp": 2, "parallel.pp_microbatches": 2}}
    results = run_layouts({n: overrides(random_dataset, tmp_path / n, **cms, **lay) for n, lay in layouts.items()},
                          2, tmp_path)
    for name in layouts:
        check_equivalent(results[name], ref)
