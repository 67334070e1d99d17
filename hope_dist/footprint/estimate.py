"""Memory per GPU of a training job, before it starts: training state by counting, activations by tracing.

- Training state, from the model built on the meta device and the layout (docs/memory.md): float32
  parameters (sharded over dp_shard under FSDP2, plus two gathered units in flight), float32
  gradients (unsharded: this stack's FSDP2 accumulates each unit's full gradient until its clocked
  reduction, plus the reduced shards), the CMS clock's float32 window accumulators of the clocked
  levels (unsharded), and the optimizer's moments (sharded); all divided by tp, for the busiest
  pipeline stage (its layers, the embedding and the head).
- Activations, traced (footprint/trace.py) at the job's micro-batch and sequence length for a 1- and a
  2-block copy of the model: each block after the first adds what it saves for backward (the peak
  comes at the start of the backward), so L blocks hold peak(1) + (L - 1) (peak(2) - peak(1)). Times
  the microbatches a pipeline stage holds, divided by tp. The peak does not scale exactly with the
  tokens (a micro-batch of 2 x 4096 tokens holds 7% more than twice 1 x 4096 at hope_1b3), so each
  micro-batch is traced, not extrapolated.
"""
from __future__ import annotations

import dataclasses
import math

import torch

from hope_dist.clock import build_clock_groups
from hope_dist.config import ConfigError, JobConfig
from hope_dist.footprint.trace import Recompute, trace_step
from hope_dist.model import HopeModel
from hope_dist.model.parallel_plan import fsdp_units
from hope_dist.optim.m3 import hidden_matrices

FLOAT32 = 4


@dataclasses.dataclass(frozen=True)
class Estimate:
    """Bytes per GPU by part, and the activation bytes each layer adds."""

    parts: dict[str, float]
    layer_bytes: float

    @property
    def total(self) -> float:
        return sum(self.parts.values())

    def describe(self) -> str:
        return f"{self.total / 1e9:.1f} GB (" + ", ".join(f"{k} {v / 1e9:.1f}" for k, v in self.parts.items()) + ")"


_traced: dict[tuple, int] = {}


def activation_peak(cfg: JobConfig, blocks: int, rows: int, amp_dtype: torch.dtype | None,
                    recompute: Recompute) -> int:
    """Traced peak of a `blocks`-block copy of the model at `rows` x seq_len tokens (cached)."""
    key = (repr(cfg.model), blocks, rows, cfg.training.seq_len, amp_dtype, recompute)
    if key not in _traced:  # a 1.3B model's two traces take a minute or more on a CPU
        _traced[key] = trace_step(cfg.model, blocks, rows, cfg.training.seq_len, amp_dtype, recompute)
    return _traced[key]


def _stage_counts(cfg: JobConfig) -> dict[str, int]:
    """Parameter counts of the busiest pipeline stage (ceil(L / pp) layers, with the embedding and the
    head), per tensor-parallel rank: all, clocked (period > 1), M3's hidden matrices, the largest FSDP unit."""
    with torch.device("meta"):
        model = HopeModel(cfg.model)
    keep = math.ceil(cfg.model.n_layers / cfg.parallel.pp)
    for name in list(model.layers.keys())[keep:]:
        del model.layers[name]
    params = {id(p): p.numel() for p in model.parameters()}
    clocked = {id(p) for g in build_clock_groups(model) if g.period > 1 for _, p in g.params}
    counted, unit = set(), 0
    for module, _ in fsdp_units(model):  # inner units first: each unit gathers only its own parameters
        own = {id(p) for p in module.parameters()} - counted
        counted |= own
        unit = max(unit, sum(params[i] for i in own))
    tp = cfg.parallel.tp
    return {"all": sum(params.values()) // tp, "clocked": sum(params[i] for i in clocked) // tp,
            "hidden": sum(params[i] for i in hidden_matrices(model) if i in params) // tp, "unit": unit // tp}


def state_bytes(cfg: JobConfig) -> dict[str, float]:
    """Parameters, gradients, clock windows and optimizer state per GPU (module docstring)."""
    p = cfg.parallel
    n = _stage_counts(cfg)
    moments = 2 * n["all"] + (2 * n["hidden"] if cfg.optim.name == "m3" else 0)  # m3: + slow momentum, update
    windows = FLOAT32 * n["clocked"]
    if p.engine == "deepspeed":  # ZeRO partitions the period-1 groups over dp; the clocked ones stay whole
        dp = p.dp_replicate * p.dp_shard
        base = n["all"] - n["clocked"]
        grads = n["all"] - (base * (1 - 1 / dp) if p.zero_stage == 2 else 0)
        return {"parameters": FLOAT32 * (n["all"] + base / dp), "gradients": FLOAT32 * grads,
                "clock_windows": windows, "optimizer": FLOAT32 * (2 * base / dp + 2 * n["clocked"])}
    shard = p.dp_shard
    gathered = 2 * n["unit"] if shard > 1 else 0  # FSDP2: the unit in use and the one prefetched
    return {"parameters": FLOAT32 * (n["all"] / shard + gathered),
            "gradients": FLOAT32 * (n["all"] + (n["all"] / shard if shard > 1 else 0)),
            "clock_windows": windows, "optimizer": FLOAT32 * moments / shard}


def estimate(cfg: JobConfig, amp_dtype: torch.dtype | None, device_type: str = "cuda") -> Estimate:
    """The job's memory per GPU with its own settings on a `device_type` device; amp_dtype: the forward's
    autocast dtype (None: float32). The memory op is traced on its chunked PyTorch path; where it runs
    Triton (which saves the chunk states and inputs, as the op's recompute does) with the recompute."""
    p, t = cfg.parallel, cfg.training
    recompute = Recompute(p.activation_checkpoint, p.memory_op_recompute or runs_triton(cfg, device_type))
    rows = t.micro_batch // p.pp_microbatches if p.pp > 1 else t.micro_batch
    in_flight = min(p.pp, p.pp_microbatches) if p.pp > 1 else 1
    blocks = math.ceil(cfg.model.n_layers / p.pp)  # each block after the first adds what it saves
    one = activation_peak(cfg, 1, rows, amp_dtype, recompute)
    two = activation_peak(cfg, 2, rows, amp_dtype, recompute) if blocks > 1 else one
    parts = state_bytes(cfg)
    parts["activations"] = (one + (blocks - 1) * (two - one)) * in_flight / p.tp
    return Estimate(parts, (two - one) * in_flight / p.tp)


def runs_triton(cfg: JobConfig, device_type: str) -> bool:
    """Whether the memory mixer's `model.kernel` resolves to Triton on this device type."""
    if not cfg.model.mixer_spec.triton:
        return False
    with torch.device("meta"):
        mixer = HopeModel(dataclasses.replace(cfg.model, n_layers=1)).layers["0"].mixer
    return mixer._kernel(torch.device(device_type)) == "triton"


def with_overrides(cfg: JobConfig, overrides: tuple[str, ...]) -> JobConfig | None:
    """cfg with `--section.key=value` overrides (bool and int keys) applied and validated; None if invalid."""
    sections: dict[str, dict] = {}
    for arg in overrides:
        key, value = arg[2:].split("=", 1)
        section, name = key.split(".")
        kind = type(getattr(getattr(cfg, section), name))
        sections.setdefault(section, {})[name] = value == "true" if kind is bool else kind(value)
    try:
        return dataclasses.replace(cfg, **{s: dataclasses.replace(getattr(cfg, s), **v)
                                           for s, v in sections.items()}).validate()
    except ConfigError:
        return None


def cheapest_fit(cfg: JobConfig, amp_dtype: torch.dtype | None, budget: float, device_type: str = "cuda"):
    """(overrides, Estimate) of the setting that fits in `budget` bytes and costs least: the least recompute
    (none, the memory op's, whole blocks, both: each repeats more of the forward), then the largest
    micro-batch; None if none fits. Activations grow with the micro-batch, so each recompute setting
    tries the micro-batches upwards and stops at the first that does not fit."""
    t, p = cfg.training, cfg.parallel
    per_rank = t.global_batch // (p.dp_replicate * p.dp_shard)
    ops = (False, True) if cfg.model.mixer_spec.recurrent else (False,)  # the memory op's recompute
    for blocks, op in ((b, o) for b in (False, True) for o in ops):
        best = None
        for mb in (b for b in range(1, per_rank + 1) if per_rank % b == 0):
            overrides = (f"--training.micro_batch={mb}", f"--parallel.activation_checkpoint={str(blocks).lower()}",
                         f"--parallel.memory_op_recompute={str(op).lower()}")
            job = with_overrides(cfg, overrides)
            if job is None:
                continue
            est = estimate(job, amp_dtype, device_type)
            if est.total > budget:
                break
            best = (overrides, est)
        if best is not None:
            return best
    return None
