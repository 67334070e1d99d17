"""parallel.engine=deepspeed (hope_dist/parallel/deepspeed_engine.py): real DeepSpeed 0.19 ZeRO on real gloo
ranks (its CPU accelerator) trains like the native engine and one process, keeps the CMS clocks' reductions
and optimizer steps on their ticks, resumes bit for bit between ticks, converts to the same export, and
refuses the layouts it does not support with errors that name the key.

One spawn of 2 ranks runs everything multi-process: native dp=2, ZeRO-1 dp=2 (saving between ticks and at
the end), ZeRO-2 dp=2, ZeRO-1 resumed from the mid-window checkpoint, and 3 steps of native and ZeRO-2 with a
skipped non-finite step.
"""
from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import hope_dist
from hope_dist.checkpoint import CheckpointError
from hope_dist.config import ConfigError, load_config
from hope_dist.faults import FaultHooks
from hope_dist.trainer import Trainer
from tools import convert

from helpers import tiny_overrides

pytest.importorskip("deepspeed")
pytestmark = pytest.mark.slow

STEPS = 20
PERIODS = (1, 2, 3)
SAVE_AT = 10  # cms.2 (period 3) ticked after step 8 and ticks next after step 11: its window is pending
SKIP_STEPS = 3
CLIP = 14.0  # some steps clip, some do not: the global norm spans DeepSpeed's and the clocked part
DP = {"parallel.dp_replicate": 2}


def job(dataset, run_dir, **extra) -> list[str]:
    prefix, vocab, eod = dataset
    cms = "[" + ", ".join(f"{{width: 32, period: {p}}}" for p in PERIODS) + "]"
    base = {"model.cms": cms, "training.steps": STEPS, "training.global_batch": 4, "training.micro_batch": 1,
            "optim.warmup_steps": 2, "optim.lr": 1e-3, "optim.grad_clip": CLIP, **extra}
    return tiny_overrides(prefix, vocab, eod, run_dir, **base)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, runs: list[tuple[str, list[str]]], out: str) -> None:
    """One rank: each run in turn on the same process group; a run named *resume* resumes first, one named
    *skip* gets a NaN loss at step 1 (training.nonfinite=skip) and stops after SKIP_STEPS."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    for name, args in runs:
        trainer = Trainer(load_config(None, args), faults=FaultHooks(nonfinite_step=1) if "skip" in name else None)
        if "resume" in name:
            trainer.maybe_resume()
        rows = []
        while trainer.step < (SKIP_STEPS if "skip" in name else STEPS):
            rows.append(trainer.train_step())
            if trainer.step == SAVE_AT and name == "zero1":
                trainer.save()
        trainer.save()
        sizes = {g.name: sum(p.numel() * 4 for _, p in g.params) for g in trainer.groups}
        torch.save({"rows": rows, "sizes": sizes, "params": {n: p.detach().clone() for n, p in
                                                              trainer.model.named_parameters()}},
                   f"{out}/{name}.rank{rank}.pt")
        dist.barrier()
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def runs(random_dataset, tmp_path_factory):
    """Every multi-process run (one spawn) and the single-process native reference."""
    tmp = tmp_path_factory.mktemp("ds")
    plan = [("native", job(random_dataset, tmp / "native", **DP)),
            ("zero1", job(random_dataset, tmp / "zero1", **DP, **{"parallel.engine": "deepspeed"})),
            ("zero2", job(random_dataset, tmp / "zero2", **DP, **{"parallel.engine": "deepspeed",
                                                                   "parallel.zero_stage": 2})),
            ("zero1_resume", job(random_dataset, tmp / "zero1_resume", **DP, **{
                "parallel.engine": "deepspeed",
                "checkpoint.resume": tmp / "zero1" / "checkpoints" / f"step-{SAVE_AT}"})),
            ("native_skip", job(random_dataset, tmp / "native_skip", **DP, **{"training.nonfinite": "skip"})),
            ("zero2_skip", job(random_dataset, tmp / "zero2_skip", **DP, **{"training.nonfinite": "skip",
                                                                             "parallel.engine": "deepspeed",
                                                                             "parallel.zero_stage": 2}))]
    mp.spawn(_worker, args=(2, _free_port(), plan, str(tmp)), nprocs=2, join=True)
    results = {name: [torch.load(tmp / f"{name}.rank{r}.pt", weights_only=False) for r in range(2)]
               for name, _ in plan}
    single = Trainer(load_config(None, job(random_dataset, tmp / "single")))
    results["single"] = [{"rows": [single.train_step() for _ in range(STEPS)],
                          "params": {n: p.detach().clone() for n, p in single.model.named_parameters()}}]
    return results, tmp


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


@pytest.mark.parametrize("name", ["zero1", "zero2"])
def test_zero_matches_native_and_one_process(runs, name):
    results, _ = runs
    for ref_name in ("native", "single"):
        ref = results[ref_name][0]
        assert any(r["grad_norm"] > CLIP for r in ref["rows"]) and any(r["grad_norm"] < CLIP for r in ref["rows"])
        for res in results[name]:
            for s, (row, row_ref) in enumerate(zip(res["rows"], ref["rows"], strict=True)):
                assert row["ticked"] == row_ref["ticked"], s
                for key in ("loss", "grad_norm"):
                    assert abs(row[key] - row_ref[key]) <= 1e-5 * abs(row_ref[key]), (ref_name, s, key, row, row_ref)
            assert res["params"].keys() == ref["params"].keys()
            for n, t in res["params"].items():
                assert rel_err(t, ref["params"][n]) <= 1e-5, (ref_name, n, rel_err(t, ref["params"][n]))


@pytest.mark.parametrize("name, reductions", [("zero1", 1), ("zero2", 2)])
def test_bytes_follow_the_clocked_formula(runs, name, reductions):
    """Clocked levels: their gradient bytes on their ticks only (native BucketSync). DeepSpeed's part (the
    period-1 groups): once per step under ZeRO-1 (at the accumulation boundary), once per micro-batch
    (2 here) under ZeRO-2, which reduces and partitions every backward's gradients."""
    results, _ = runs
    periods = {"base": 1, **{f"cms.{i}": p for i, p in enumerate(PERIODS)}}
    for res in results[name]:
        sizes = res["sizes"]
        every_step = sum(sizes[g] for g, p in periods.items() if p == 1)
        for s, row in enumerate(res["rows"]):
            clocked = {g: sizes[g] for g, p in periods.items() if p > 1 and (s + 1) % p == 0}
            assert row["bytes_reduced"] == {**clocked, "deepspeed": reductions * every_step}, (s, row["bytes_reduced"])
        mean = sum(sum(r["bytes_reduced"].values()) for r in res["rows"][:18]) / 18  # 3 whole windows of lcm 6
        formula = sum(sizes[g] * (reductions if p == 1 else 1) / p for g, p in periods.items())
        assert mean == pytest.approx(formula, rel=1e-12)


def test_resume_between_ticks_is_bit_exact(runs, random_dataset, tmp_path):
    results, tmp = runs
    for full, resumed in zip(results["zero1"], results["zero1_resume"], strict=True):
        assert len(resumed["rows"]) == STEPS - SAVE_AT
        assert [r["loss"] for r in resumed["rows"]] == [r["loss"] for r in full["rows"][SAVE_AT:]]
        for n, t in full["params"].items():
            assert torch.equal(resumed["params"][n], t), n
    native = Trainer(load_config(None, job(random_dataset, tmp_path, **{
        "checkpoint.resume": tmp / "zero1" / "checkpoints" / f"step-{SAVE_AT}"})))
    with pytest.raises(CheckpointError, match="written by parallel.engine=deepspeed: resume it with"):
        native.maybe_resume()


def test_nonfinite_step_is_skipped_like_native(runs):
    """A skipped step drops ZeRO's reduced partitions too: the next steps match the native engine's."""
    results, _ = runs
    ref = results["native_skip"][0]
    assert ref["rows"][1]["skipped_nonfinite"]
    for res in results["zero2_skip"]:
        assert [bool(r.get("skipped_nonfinite")) for r in res["rows"]] == [False, True, False]
        assert abs(res["rows"][2]["loss"] - ref["rows"][2]["loss"]) <= 1e-5 * ref["rows"][2]["loss"]
        for n, t in res["params"].items():
            assert rel_err(t, ref["params"][n]) <= 1e-5, n


def test_convert_reads_a_deepspeed_checkpoint(runs, tmp_path):
    """consolidate and export-hf from a DeepSpeed checkpoint: the trained weights exactly, and logits equal to
    the native run's export (to the engines' float32 agreement)."""
    from safetensors.torch import load_file

    results, tmp = runs
    ds_ckpt = tmp / "zero1" / "checkpoints" / f"step-{STEPS}"
    assert convert.main(["consolidate", str(ds_ckpt), str(tmp_path / "m.safetensors")]) == 0
    weights = load_file(str(tmp_path / "m.safetensors"))
    trained = results["zero1"][0]["params"]
    assert weights.keys() == trained.keys() and all(torch.equal(weights[n], trained[n]) for n in trained)
    assert convert.main(["export-hf", str(ds_ckpt), str(tmp_path / "ds_hf")]) == 0
    assert convert.main(["export-hf", str(tmp / "native" / "checkpoints" / f"step-{STEPS}"),
                         str(tmp_path / "native_hf")]) == 0
    tokens = torch.randint(1, 96, (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ds_logits = hope_dist.from_pretrained(tmp_path / "ds_hf").model(tokens)
        native_logits = hope_dist.from_pretrained(tmp_path / "native_hf").model(tokens)
    assert rel_err(ds_logits, native_logits) <= 1e-5
    assert convert.main(["reshard", str(ds_ckpt), str(tmp_path / "r")]) == 2  # DCP only: a named error


@pytest.mark.parametrize("extra, message", [
    ({"parallel.engine": "horovod"}, "parallel.engine='horovod' is not one of native, deepspeed"),
    ({"parallel.zero_stage": 3}, "parallel.zero_stage=3 is not supported: use 1 or 2"),
    ({"parallel.tp": 2}, "parallel.engine=deepspeed supports data parallelism only"),
    ({"parallel.pp": 2, "parallel.pp_microbatches": 2, "training.micro_batch": 2},
     "parallel.engine=deepspeed supports data parallelism only"),
    ({"optim.name": "m3"}, "optim.name='m3' needs parallel.engine=native"),
    ({"parallel.ds_config": "/nonexistent/ds.json"}, "parallel.ds_config='/nonexistent/ds.json' does not exist"),
])
def test_unsupported_settings_are_named(random_dataset, tmp_path, extra, message):
    args = job(random_dataset, tmp_path, **{"parallel.engine": "deepspeed", **extra})
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(".", r"\.").replace("[", r"\[")):
        load_config(None, args)


def test_user_ds_config_is_merged_and_checked(random_dataset, tmp_path):
    from hope_dist.parallel.deepspeed_engine import deepspeed_config

    good = tmp_path / "ds.yaml"
    good.write_text("zero_optimization: {reduce_bucket_size: 1000, overlap_comm: false}\nwall_clock_breakdown: false\n")
    cfg = load_config(None, job(random_dataset, tmp_path, **DP, **{"parallel.engine": "deepspeed",
                                                                    "parallel.ds_config": good}))
    ds = deepspeed_config(cfg)
    assert ds["zero_optimization"] == {"reduce_bucket_size": 1000, "overlap_comm": False, "stage": 1}
    assert ds["gradient_accumulation_steps"] == 2 and ds["gradient_allreduce_op"] == "sum"
    assert ds["wall_clock_breakdown"] is False
    clipping = "sets 'gradient_clipping', which hope_dist sets from optim.grad_clip"
    for text, message in (('{"gradient_clipping": 1.0}', clipping),
                          ('{"zero_optimization": {"stage": 2}}', "set --parallel.zero_stage=2")):
        bad = tmp_path / "bad.json"
        bad.write_text(text)
        with pytest.raises(ConfigError, match=message.replace(".", r"\.")):
            load_config(None, job(random_dataset, tmp_path, **{"parallel.engine": "deepspeed",
                                                                "parallel.ds_config": bad}))
