"""The memory estimate (hope_dist/footprint) against the CPU allocator's peak, and the launch refusal.

Measured: the peak of "Total Allocated" the profiler records from the CPU allocator over one forward
+ backward (float32, gradient buffers allocated first, as the trainer's accumulation keeps them).
Estimated: the same step traced on fake tensors. Within 5% (measured: to the byte) at three widths of a
HOPE layer, with the memory op's recompute, for 2 layers x 2 rows, and for an attention layer."""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

from hope_dist.config import load_config
from hope_dist.footprint import MemoryBudgetError, estimate, state_bytes, with_overrides
from hope_dist.footprint.trace import op_recompute
from hope_dist.model import build_model
from hope_dist.parallel.parallelize import apply_activation_checkpointing
from hope_dist.trainer import Trainer


def small(width: int, **keys) -> list[str]:
    """A one-layer HOPE of `width`, 2 chunk steps of 32 tokens, two CMS levels (one clocked)."""
    over = {"model.d_model": width, "model.n_heads": width // 32, "model.n_layers": 1, "model.vocab_size": 256,
            "model.chunk_size": 32, "model.proj_chunk_size": 32, "training.seq_len": 64,
            "training.micro_batch": 1, "training.global_batch": 1,
            "model.cms": f"[{{width: {2 * width}, period: 1}}, {{width: {2 * width}, period: 4}}]", **keys}
    return [f"--{k}={v}" for k, v in over.items()]


def measured_peak(cfg, tmp_path) -> int:
    """Peak bytes the CPU allocator holds over one forward+backward, above the parameters and gradients."""
    torch.manual_seed(0)
    model = build_model(cfg.model)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    if cfg.parallel.activation_checkpoint:
        apply_activation_checkpointing(model)
    tokens = torch.randint(1, cfg.model.vocab_size, (cfg.training.micro_batch, cfg.training.seq_len))
    with op_recompute(cfg.parallel.memory_op_recompute), profile(activities=[ProfilerActivity.CPU],
                                                                 profile_memory=True) as prof:
        logits = model(tokens)
        loss = F.cross_entropy(logits.float().flatten(0, 1), tokens.flatten(), reduction="sum")
        loss.backward()
        del loss, logits
    prof.export_chrome_trace(str(tmp_path / "trace.json"))
    events = json.loads((tmp_path / "trace.json").read_text())["traceEvents"]
    return max(e["args"]["Total Allocated"] for e in events if e.get("name") == "[memory]")


@pytest.mark.parametrize("width,keys", [
    (64, {}), (128, {}), (192, {}),
    (128, {"parallel.memory_op_recompute": "true"}),
    (128, {"model.n_layers": 2, "training.micro_batch": 2, "training.global_batch": 2}),
    (128, {"model.mixer": "attention"}),
])
def test_activation_estimate_matches_cpu_peak(width, keys, tmp_path):
    """The issue asks for 15%; measured: equal to the byte, 0.2% under with the recompute."""
    cfg = load_config(None, small(width, **keys))
    est = estimate(cfg, None, "cpu").parts["activations"]
    real = measured_peak(cfg, tmp_path)
    assert abs(est / real - 1) < 0.05, (est, real)


def test_recompute_drops_what_the_op_saves():
    """The op's recompute saves chunk inputs only (the traces are cached from the test above)."""
    full, recomputed = (estimate(load_config(None, small(128, **keys)), None, "cpu").parts["activations"]
                        for keys in ({}, {"parallel.memory_op_recompute": "true"}))
    assert recomputed < 0.6 * full


def test_state_bytes_shard_over_dp_but_not_the_gradients():
    """FSDP2 here accumulates unsharded gradients until the clocked reduction; moments are sharded."""
    one = state_bytes(load_config(None, small(64)))
    four = state_bytes(load_config(None, small(64, **{"parallel.dp_shard": 4, "training.global_batch": 4})))
    assert four["optimizer"] == pytest.approx(one["optimizer"] / 4)
    assert four["gradients"] == pytest.approx(one["gradients"] * 1.25)  # + the reduced shards
    assert four["clock_windows"] == one["clock_windows"] > 0


def test_launch_over_budget_stops_before_the_first_step_naming_a_fit(tmp_path):
    """training.device_memory_gb on CPU: micro-batch 4 does not fit, micro-batch 1 does; the one line says so."""
    base = small(64, **{"training.micro_batch": 4, "training.global_batch": 4, "run_dir": tmp_path})
    big = estimate(load_config(None, base), None, "cpu").total
    fit = estimate(with_overrides(load_config(None, base), ("--training.micro_batch=1",)), None, "cpu").total
    assert fit < big
    budget_gb = (fit + 0.2 * (big - fit)) / 1e9
    cfg = load_config(None, base + [f"--training.device_memory_gb={budget_gb}"])
    with pytest.raises(MemoryBudgetError) as e:
        Trainer(cfg)
    message = str(e.value)
    assert "\n" not in message and f"{big / 1e9:.1f} GB" in message
    assert "--training.micro_batch=" in message and "fits" in message
