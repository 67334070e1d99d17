"""Cluster scale on paper: step time, bytes per step and peak memory per GPU of a HOPE layout.

    python bench/cost_model.py --config configs/hope_760m.yaml --layout dp=8,tp=4,pp=1 --cluster h100-ib
    python bench/cost_model.py --config configs/hope_1b3.yaml --best --cluster h100-eth
    python bench/cost_model.py --validate      # predicted vs measured 1 Gbit/s netns runs
    python bench/cost_model.py --docs          # rewrite the tables in docs/parallel.md
    sudo .venv/bin/python bench/cost_model.py --calibrate   # re-measure (bench/cost_model_calibrate.py)

An alpha-beta model, small on purpose (docs/parallel.md, "Cost model"):
- parameters per clock group, per layer and per pipeline stage are exact (the model built on the
  meta device, the stack's own clock groups and pipeline split);
- collectives are rings, hierarchical across nodes (reduce-scatter in the node, ring over the
  nodes' NICs, which all GPUs of a node share, all-gather back): latency x steps + bytes / bandwidth;
- compute is counted FLOPs at an assumed MFU plus the memory op at a fraction of its HBM roofline
  (bench/bench_memory_triton.py's chunk_cost, the numbers of docs/triton.md); 1F1B adds the bubble;
- clocked sync: CMS level l's gradient collectives run on 1/P_l of the steps: the step time is
  given as the window average and as the worst (every level ticks) step;
- nothing is overlapped with compute except FSDP2's prefetched parameter all-gathers, as the stack
  runs it (its clocked reductions run after backward).
Link latency/bandwidth and the compute time of the 2-rank netns runs come from measurements here
(bench/cost_model_calibration.json); the H100 clusters use stated datasheet numbers.
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import math
import statistics
import sys
import weakref
from dataclasses import dataclass, field
from pathlib import Path

from hope_dist.config import ConfigError, JobConfig
from hope_dist.config import load_config as _load_config

ROOT = Path(__file__).resolve().parents[1]

CALIBRATION = ROOT / "bench" / "cost_model_calibration.json"
DOC = ROOT / "docs" / "parallel.md"
MARK = ("<!-- cost-model:begin (python bench/cost_model.py --docs) -->", "<!-- cost-model:end -->")
# native replication (BucketSync), native FSDP2, and parallel.engine=deepspeed with ZeRO stage 1/2
# (hope_dist/parallel/deepspeed_engine.py: ZeRO holds the period-1 groups; the clocked levels stay
# replicated on BucketSync, with their AdamW state)
ENGINES = ("ddp", "fsdp", "zero1", "zero2")
GRAD_BYTES = PARAM_BYTES = 4  # the stack keeps float32 parameters and reduces float32 gradients
ACT_BYTES = 2  # bf16 activations (autocast) in tp all-reduces and pipeline sends
SMALL_COLLECTIVES = 4  # per step: loss/token sums, memory-health all_gather_object (2), grad-norm


@dataclass(frozen=True)
class Link:
    bw: float  # bytes/s per direction: per GPU for NVLink, per node (the NIC) between nodes
    lat: float  # seconds per message step


@dataclass(frozen=True)
class Cluster:
    name: str
    nodes: int
    gpus_per_node: int
    intra: Link
    inter: Link
    flops: float = 989e12  # dense bf16 peak per GPU
    mfu: float = 0.40  # achieved fraction on the matmuls
    hbm_bw: float = 3.35e12
    op_efficiency: float = 0.5  # memory op at this fraction of its roofline (docs/triton.md)
    memory: float = 80e9

    @property
    def world(self) -> int:
        return self.nodes * self.gpus_per_node


NVLINK = Link(450e9, 3e-6)  # H100 SXM NVLink 4 through NVSwitch, per GPU and direction
CLUSTERS = {
    "h100-ib": Cluster("4 x 8 H100, 400 Gbit/s InfiniBand per node", 4, 8, NVLINK, Link(400e9 / 8 * 0.9, 5e-6)),
    "h100-eth": Cluster("4 x 8 H100, 25 Gbit/s Ethernet per node", 4, 8, NVLINK, Link(25e9 / 8 * 0.9, 30e-6)),
}


@functools.lru_cache(maxsize=64)
def _config(config: str | None, overrides: tuple[str, ...]) -> JobConfig:
    return _load_config(config, list(overrides))


def load_config(config: str | None, overrides=()) -> JobConfig:
    """hope_dist's load_config, cached (the layout search predicts thousands of layouts)."""
    return _config(config, tuple(overrides))


# ---------------------------------------------------------------------------------------------
# The model: exact parameter counts from the real module, FLOPs and activation bytes per token
# ---------------------------------------------------------------------------------------------

@dataclass
class Sizes:
    """Per-layer and per-group numbers of one config (parameters are element counts)."""

    n_layers: int
    d_model: int
    n_levels: int
    periods: dict[str, int]  # clock group -> period
    layer_groups: dict[str, int]  # parameters of one layer by clock group
    embed: int  # embedding (first stage, base group)
    head: int  # final norm + output (last stage, base group)
    layer_matmul: int  # Linear weights of one layer (6 FLOPs per token each, fwd + bwd)
    head_matmul: int
    op_flops: float  # memory op / attention per token and layer, fwd + bwd
    op_bytes: float  # its HBM bytes per token and layer
    op_fwd_share: float  # the forward's share of the op's bytes (what recomputation repeats)
    act_layer: float = 0.0  # saved activation bytes per token and layer (bf16 autocast, Triton op)
    act_layer_fixed: float = 0.0  # per layer and micro-batch in flight (bf16 weight copies)
    act_head: float = 0.0  # per token: embedding output, logits and loss

    def group_total(self, name: str) -> int:
        extra = self.embed + self.head if name == "base" else 0
        return self.n_layers * self.layer_groups[name] + extra


@functools.lru_cache(maxsize=8)
def model_sizes(config: str | None, overrides: tuple[str, ...] = ()) -> Sizes:
    """Build the model on the meta device; group its parameters as the CMS clock does."""
    import torch
    from torch import nn

    from bench.bench_memory_triton import chunk_cost, model_flops_and_bytes
    from hope_dist.clock import build_clock_groups
    from hope_dist.model import HopeModel

    cfg = load_config(config, list(overrides))
    m = cfg.model
    with torch.device("meta"):
        model = HopeModel(m)
    groups = build_clock_groups(model)
    group_of = {name: g.name for g in groups for name, _ in g.params}
    layer = {g.name: 0 for g in groups}
    for name, p in model.named_parameters():
        if name.startswith("layers.0."):
            layer[group_of[name]] += p.numel()
    embed = model.tok_embeddings.weight.numel()
    head = sum(p.numel() for n, p in model.named_parameters() if not n.startswith(("layers.", "tok_embeddings")))
    linear = {n: mod.weight.numel() for n, mod in model.named_modules() if isinstance(mod, nn.Linear)}
    T = cfg.training.seq_len
    if m.mixer == "attention":  # FlashAttention-2 with recomputation: 7 T d per token (docs/triton.md)
        op_flops, op_bytes, op_saved, fwd_share = 7 * T * m.d_model, 0.0, 0.0, 2 / 7
    else:  # the Triton kernels' numbers (docs/triton.md); they save per chunk and head every
        # memory's chunk-end state and k, v, eta, alpha (float32), and q, a, o (bf16)
        n_mem, C, D = (5 if m.mixer == "selfmod" else 1), m.chunk_size, m.head_dim
        f, b = model_flops_and_bytes(1, T, m.n_heads, D, n_mem, C)
        op_flops, op_bytes = f / T, b / T
        _, _, fwd_bytes, bwd_bytes = chunk_cost(C, D, n_mem)
        fwd_share = fwd_bytes / (fwd_bytes + bwd_bytes)
        op_saved = m.n_heads * (n_mem * (2 * D * D * 4 + 2 * C * D * 4 + 2 * C * 4) + 3 * C * D * 2) / C
    a, c, e = activation_bytes(config, overrides)
    return Sizes(m.n_layers, m.d_model, len(m.cms), {g.name: g.period for g in groups}, layer, embed, head,
                 sum(v for n, v in linear.items() if n.startswith("layers.0.")), linear.get("output", 0),
                 op_flops, op_bytes, fwd_share, a + op_saved, c, e)


def _key(config: str | None, overrides: tuple[str, ...]) -> str:
    if config is not None:
        path = Path(config).resolve()
        config = str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)
    return " ".join([str(config), *overrides])


def activation_bytes(config: str | None, overrides: tuple[str, ...] = ()) -> tuple[float, float, float]:
    """(a, c, e) of measure_activations, from the calibration file's cache when it has them
    (measuring a 1b3-wide model takes minutes on this machine)."""
    cache = load_calibration().get("activations", {}) if CALIBRATION.exists() else {}
    key = _key(config, overrides)
    return tuple(cache[key]) if key in cache else measure_activations(config, overrides)


def measure_activations(config: str | None, overrides: tuple[str, ...] = ()) -> tuple[float, float, float]:
    """Bytes saved for backward outside the memory op, measured: forward of 1- and 2-layer copies
    of the config at 2 and 4 chunks of tokens on CPU under bf16 autocast (as on GPU), counted by
    saved-tensor hooks (each storage the graph still holds, once). What the memory op saves is left out: its CPU path
    keeps every chunk's intermediates, the Triton kernels only the chunk states and inputs (added
    in model_sizes). Fits bytes(L, T) = L (a T + c) + e T + f; returns (a, c, e)."""
    import torch

    import hope_dist.model.memory_mixer as mixer
    from hope_dist.model import HopeModel

    cfg = load_config(config, list(overrides))
    chunk_size, op = cfg.model.chunk_size, mixer.hope_memory
    inside = [False]

    def hope_memory(*args, **kwargs):
        inside[0] = True
        try:
            return op(*args, **kwargs)
        finally:
            inside[0] = False

    def saved(n_layers: int, T: int) -> int:
        mc = dataclasses.replace(cfg.model, n_layers=n_layers, kernel="torch")
        torch.manual_seed(0)
        model = HopeModel(mc)
        refs: list[tuple[weakref.ref, bool]] = []

        def pack(t):
            refs.append((weakref.ref(t), inside[0]))
            return t

        tokens = torch.randint(1, mc.vocab_size, (1, T))
        mixer.hope_memory = hope_memory
        try:
            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), torch.autocast("cpu", torch.bfloat16):
                logits = model(tokens)
                loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), tokens.flatten(),
                                                         reduction="sum")
        finally:
            mixer.hope_memory = op
        # what the graph still holds (a detached branch's saved tensors are gone), each storage once
        alive: dict[int, int] = {}
        for ref, in_op in refs:
            t = ref()
            if t is not None:
                alive.setdefault(t.untyped_storage().data_ptr(), 0 if in_op else t.untyped_storage().nbytes())
        del loss, logits
        return sum(alive.values())

    t1, t2 = 2 * chunk_size, 4 * chunk_size
    b = {(n, t): saved(n, t) for n in (1, 2) for t in (t1, t2)}
    layer_t1, layer_t2 = b[2, t1] - b[1, t1], b[2, t2] - b[1, t2]
    a = (layer_t2 - layer_t1) / (t2 - t1)
    c = layer_t1 - a * t1
    e = (b[1, t2] - b[1, t1]) / (t2 - t1) - a
    return a, c, e


# ---------------------------------------------------------------------------------------------
# Collectives: alpha-beta rings, hierarchical over nodes
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Group:
    """A process group: `per_node` of its ranks on each of `nodes` nodes."""

    per_node: int
    nodes: int

    @property
    def size(self) -> int:
        return self.per_node * self.nodes


def reduce_scatter(nbytes: float, group: Group, cluster: Cluster) -> float:
    """Seconds for a reduce-scatter of `nbytes` (the input on each rank); also an all-gather of an
    `nbytes` output. Ring in the node (p-1 steps of nbytes/p), then a ring over the nodes of the
    node-reduced 1/per_node share; all GPUs of a node use its NIC at once."""
    g, n = group.per_node, group.nodes
    t = (g - 1) * (cluster.intra.lat + nbytes / g / cluster.intra.bw) if g > 1 else 0.0
    if n > 1:
        nic_bw = cluster.inter.bw / cluster.gpus_per_node
        t += (n - 1) * (cluster.inter.lat + nbytes / g / n / nic_bw)
    return t


all_gather = reduce_scatter


def all_reduce(nbytes: float, group: Group, cluster: Cluster) -> float:
    """Reduce-scatter then all-gather: 2 (p-1) steps of nbytes/p each, per level."""
    return 2 * reduce_scatter(nbytes, group, cluster)


def wire_bytes(nbytes: float, p: int, kind: str) -> float:
    """Bytes one rank sends in a ring collective over p ranks."""
    return {"all_reduce": 2, "reduce_scatter": 1, "all_gather": 1}[kind] * (p - 1) / p * nbytes


# ---------------------------------------------------------------------------------------------
# Layouts
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Layout:
    dp: int = 1
    tp: int = 1
    pp: int = 1
    engine: str = "fsdp"
    micro_batch: int | None = None  # sequences per forward/backward; None: the config's (pp: all)
    microbatches: int | None = None  # pipeline microbatches per micro-batch; None: one per sequence
    activation_checkpoint: bool = False

    def __str__(self) -> str:
        ac = ",ac=1" if self.activation_checkpoint else ""
        mb = f",mb={self.micro_batch}" if self.micro_batch else ""
        micro = f",microbatches={self.microbatches}" if self.microbatches and self.pp > 1 else ""
        return f"dp={self.dp},tp={self.tp},pp={self.pp},engine={self.engine}{mb}{micro}{ac}"


def parse_layout(text: str) -> Layout:
    """`dp=8,tp=4,pp=1,engine=fsdp` (also mb=, microbatches=, ac=1)."""
    keys = {"dp": "dp", "tp": "tp", "pp": "pp", "engine": "engine", "mb": "micro_batch",
            "microbatches": "microbatches", "ac": "activation_checkpoint"}
    out = {}
    for item in filter(None, text.split(",")):
        k, _, v = item.partition("=")
        if k not in keys or not v:
            raise ConfigError(f"--layout {text!r}: {item!r} is not KEY=VALUE with KEY one of {', '.join(keys)}; "
                              f"e.g. --layout dp=8,tp=4,pp=1,engine=fsdp")
        out[keys[k]] = v if k == "engine" else bool(int(v)) if k == "ac" else int(v)
    return Layout(**out)


def check_layout(layout: Layout, cluster: Cluster, cfg: JobConfig) -> tuple[int, int]:
    """Errors name the argument and the fix. Returns (micro_batch, pipeline microbatches)."""
    dp, tp, pp = layout.dp, layout.tp, layout.pp
    world, gpn = cluster.world, cluster.gpus_per_node
    if layout.engine not in ENGINES:
        raise ConfigError(f"--layout engine={layout.engine}: use one of {', '.join(ENGINES)}")
    if dp * tp * pp != world:
        raise ConfigError(f"--layout dp={dp},tp={tp},pp={pp}: dp x tp x pp = {dp * tp * pp}, but --cluster "
                          f"{cluster.name!r} has {world} GPUs; e.g. dp={max(1, world // (tp * pp))} "
                          f"with this tp and pp, or pass --nodes/--gpus-per-node")
    if tp > gpn or gpn % tp:
        raise ConfigError(f"--layout tp={tp}: tensor parallelism must stay inside one node of {gpn} GPUs "
                          f"(its all-reduces run every layer); use a divisor of {gpn} and raise dp or pp")
    if layout.engine in ("zero1", "zero2") and (tp > 1 or pp > 1):
        raise ConfigError(f"--layout engine={layout.engine} with tp={tp}, pp={pp}: the stack's DeepSpeed engine "
                          f"is data-parallel only (parallel.engine=deepspeed needs tp=1, pp=1); use engine=fsdp or ddp")
    if cfg.model.n_heads % tp:
        raise ConfigError(f"--layout tp={tp} does not divide model.n_heads={cfg.model.n_heads}")
    if pp > cfg.model.n_layers:
        raise ConfigError(f"--layout pp={pp} > model.n_layers={cfg.model.n_layers}: one layer per stage at least")
    gb = cfg.training.global_batch
    if gb % dp:
        raise ConfigError(f"--layout dp={dp} does not divide training.global_batch={gb}: pick dp from its divisors "
                          f"or pass --training.global_batch=...")
    per_rank = gb // dp
    mb = layout.micro_batch or (per_rank if pp > 1 else min(cfg.training.micro_batch, per_rank))
    if per_rank % mb:
        raise ConfigError(f"--layout mb={mb} must divide the {per_rank} sequences per dp rank "
                          f"(training.global_batch / dp)")
    micro = layout.microbatches or (mb if pp > 1 else 1)
    if mb % micro or (pp > 1 and micro < pp):
        raise ConfigError(f"--layout microbatches={micro}: must divide mb={mb} and be >= pp={pp} (1F1B)")
    return mb, micro


def placement(layout: Layout, cluster: Cluster) -> dict[str, Group]:
    """The tp and dp groups in the stack's mesh order (pp, dp, tp): tp innermost, ranks filled
    node by node, so each pipeline stage is a block of dp x tp consecutive ranks."""
    gpn, dp, tp = cluster.gpus_per_node, layout.dp, layout.tp
    dp_per_node = max(1, min(dp, gpn // tp))
    return {"tp": Group(tp, 1), "dp": Group(dp_per_node, dp // dp_per_node)}


# ---------------------------------------------------------------------------------------------
# One step
# ---------------------------------------------------------------------------------------------

@dataclass
class Prediction:
    layout: Layout
    compute: float  # seconds, with the pipeline bubble
    tp: float
    pp: float
    dp_avg: float  # data-parallel communication, average over the slowest level's window
    dp_worst: float  # the step on which every level ticks
    small: float  # per-step scalar collectives
    bytes_reduced_avg: float  # the stack's `bytes_reduced`: gradient collective inputs per rank
    bytes_sent_avg: float  # bytes one rank puts on the wire per step (all collectives)
    bytes_sent_worst: float
    memory: float  # peak bytes per GPU
    memory_parts: dict = field(default_factory=dict)

    @property
    def step_avg(self) -> float:
        return self.compute + self.tp + self.pp + self.dp_avg + self.small

    @property
    def step_worst(self) -> float:
        return self.compute + self.tp + self.pp + self.dp_worst + self.small


def stages(sizes: Sizes, pp: int) -> list[list[int]]:
    """The stack's balanced split of layers over pipeline stages (parameter counts)."""
    from hope_dist.parallel.pipeline import balanced_split

    per_layer = sum(sizes.layer_groups.values())
    return balanced_split([per_layer] * sizes.n_layers, pp, sizes.embed, sizes.head)


def predict(config: str, layout: Layout, cluster: Cluster, clocked: bool = True,
            compute_s: float | None = None, overrides: tuple[str, ...] = ()) -> Prediction:
    """Step time, bytes and peak memory per GPU of the busiest pipeline stage. compute_s replaces
    the FLOP-based compute time (the netns reproduction uses the measured one)."""
    cfg = load_config(config, list(overrides))
    mb, micro = check_layout(layout, cluster, cfg)
    s = model_sizes(config, overrides)
    dp, tp, pp = layout.dp, layout.tp, layout.pp
    groups = placement(layout, cluster)
    T = cfg.training.seq_len
    seqs = cfg.training.global_batch // dp  # per dp rank and step
    runs = seqs // mb  # forward/backward passes (pipeline schedules) per step
    periods = s.periods if clocked else {g: 1 for g in s.periods}
    split = stages(s, pp)

    def stage_params(i: int) -> dict[str, float]:
        """Parameters of stage i on one tp rank, by clock group (every weight is tp-sharded but
        the norms; they are < 0.1% and counted as sharded)."""
        n = len(split[i])
        out = {g: n * v / tp for g, v in s.layer_groups.items()}
        out["base"] += ((s.embed if i == 0 else 0) + (s.head if i == pp - 1 else 0)) / tp
        return out

    # compute: the slowest stage, times the 1F1B bubble (m + pp - 1) / m per pipeline schedule
    def stage_compute(i: int) -> float:
        n = len(split[i])
        flops = 6 * (n * s.layer_matmul + (s.head_matmul if i == pp - 1 else 0)) * seqs * T / tp
        op = n * seqs * T / tp * max(s.op_flops / cluster.flops, s.op_bytes / cluster.hbm_bw) / cluster.op_efficiency
        if layout.activation_checkpoint:  # the forward once more
            flops, op = flops * 8 / 6, op * (1 + s.op_fwd_share)
        return flops / (cluster.flops * cluster.mfu) + op

    busiest = max(range(pp), key=stage_compute)
    compute = compute_s if compute_s is not None else stage_compute(busiest) * (micro + pp - 1) / micro
    params = stage_params(busiest)
    n_local = sum(params.values())

    # tensor parallel: per layer 1 + n_levels row-parallel all-reduces forward, as many backward
    tp_time = tp_bytes = 0.0
    if tp > 1:
        per_mb = mb // micro * T * s.d_model * ACT_BYTES
        calls = runs * micro * (2 * (1 + s.n_levels) * len(split[busiest]) + 2)  # + embedding, head
        tp_time = calls * all_reduce(per_mb, groups["tp"], cluster)
        tp_bytes = calls * wire_bytes(per_mb, tp, "all_reduce")

    # pipeline: one activation forward and one gradient backward per microbatch and boundary;
    # 1F1B waits on (m + pp - 1) of each. With more than one node some boundary crosses nodes
    # (stages are blocks of consecutive ranks); there every rank of the stage in that node sends
    # its whole activation (tp ranks too) through the node's NIC at once
    pp_time = pp_bytes = 0.0
    if pp > 1:
        msg = mb // micro * T * s.d_model * ACT_BYTES
        cross = cluster.nodes > 1
        link = cluster.inter if cross else cluster.intra
        bw = link.bw / min(dp * tp, cluster.gpus_per_node) if cross else link.bw
        pp_time = runs * 2 * (micro + pp - 1) * (link.lat + msg / bw)
        pp_bytes = runs * 2 * micro * msg

    # data parallel, per clock group that ticks (each reduced on its own: one bucket / unit set)
    zero = layout.engine in ("zero1", "zero2")

    def dp_comm(ticking: list[str]) -> tuple[float, float, float]:
        """(seconds, bytes_reduced, wire bytes) for a step on which `ticking` groups tick."""
        if dp == 1:
            return 0.0, 0.0, 0.0
        g = groups["dp"]
        t = red = wire = 0.0
        for name in ticking:
            nbytes = GRAD_BYTES * params[name]
            if layout.engine == "ddp" or (zero and periods[name] > 1):  # clocked levels: BucketSync
                t += all_reduce(nbytes, g, cluster)
                red += nbytes
                wire += wire_bytes(nbytes, dp, "all_reduce")
            elif zero:  # reduce-scatter (ZeRO-2: after every backward), all-gather the updated partitions
                passes = runs if layout.engine == "zero2" else 1
                t += passes * reduce_scatter(nbytes, g, cluster) + all_gather(PARAM_BYTES * params[name], g, cluster)
                red += passes * nbytes
                wire += passes * wire_bytes(nbytes, dp, "reduce_scatter") + wire_bytes(nbytes, dp, "all_gather")
            else:  # fsdp: the ticking units' window sums, reduce-scattered once
                t += reduce_scatter(nbytes, g, cluster)
                red += nbytes
                wire += wire_bytes(nbytes, dp, "reduce_scatter")
        if layout.engine == "fsdp":  # every unit gathered in forward and again in backward, per
            # micro-batch (and pipeline microbatch: the stack reshards after every forward)
            gathers = 2 * runs * micro
            t += max(0.0, gathers * all_gather(PARAM_BYTES * n_local, g, cluster) - compute)  # prefetched
            wire += gathers * wire_bytes(PARAM_BYTES * n_local, dp, "all_gather")
        return t, red, wire

    window = math.lcm(*periods.values())
    per_step = [dp_comm([g for g, p in periods.items() if (k + 1) % p == 0]) for k in range(window)]
    dp_avg = statistics.fmean(x[0] for x in per_step)
    worst = dp_comm(list(periods))
    small = SMALL_COLLECTIVES * all_reduce(8, groups["dp"], cluster) if dp > 1 else 0.0

    # peak memory per GPU: parameters, gradients, optimizer, clock windows, activations
    clocked_params = sum(v for g, v in params.items() if periods[g] > 1)
    in_flight = min(pp, micro)  # 1F1B: the first stage holds pp microbatches' activations
    tokens = mb // micro * T
    act = len(split[busiest]) * (s.act_layer * tokens + s.act_layer_fixed) * in_flight / tp
    if layout.activation_checkpoint:  # keep block inputs only, recompute one block at a time
        act = (len(split[busiest]) * tokens * s.d_model * 4 * in_flight + s.act_layer * tokens + s.act_layer_fixed) / tp
    act += s.act_head * tokens * in_flight / tp
    level = (s.group_total("cms.0") // s.n_layers) if s.n_levels else 0
    unit = max(s.layer_groups["base"], level, s.embed, s.head) / tp  # FSDP: the largest unit, gathered + prefetched
    engine_part = n_local - clocked_params if zero else n_local  # what ZeRO partitions: the period-1 groups
    shard = dp if layout.engine != "ddp" else 1
    mem = {"params": PARAM_BYTES * n_local / (dp if layout.engine == "fsdp" else 1)
           + (2 * PARAM_BYTES * unit if layout.engine == "fsdp" and dp > 1 else 0)
           + (4 * engine_part / dp if zero else 0),  # ZeRO's float32 partition of its flat groups
           # the stack's FSDP2 path keeps unsharded gradients until its post-backward reduce
           "grads": GRAD_BYTES * (n_local - (engine_part * (1 - 1 / dp) if layout.engine == "zero2" else 0)),
           "optimizer": 2 * 4 * (engine_part / shard + (n_local - engine_part)),  # AdamW moments, float32
           "clock_windows": GRAD_BYTES * clocked_params,  # whole over dp in every engine
           "activations": act}
    return Prediction(layout, compute, tp_time, pp_time, dp_avg, worst[0], small,
                      statistics.fmean(x[1] for x in per_step),
                      statistics.fmean(x[2] for x in per_step) + tp_bytes + pp_bytes,
                      worst[2] + tp_bytes + pp_bytes, sum(mem.values()), mem)


def layouts(cluster: Cluster, cfg: JobConfig):
    """dp x tp x pp = world, tp a divisor of the node inside it, every engine, micro-batches of
    powers of two sequences (pp: one pipeline schedule per step, microbatches of powers of two
    sequences), with and without activation checkpointing; layouts the config cannot take are skipped."""
    world, gpn = cluster.world, cluster.gpus_per_node
    powers = [2**i for i in range(12)]
    for tp in (t for t in range(1, gpn + 1) if gpn % t == 0):
        for pp in (p for p in range(1, world // tp + 1) if world % (tp * p) == 0):
            dp = world // (tp * pp)
            per_rank = cfg.training.global_batch // dp if cfg.training.global_batch % dp == 0 else 0
            for engine in ENGINES if dp > 1 else ("ddp",):
                for mb in (b for b in powers if b <= per_rank):
                    if pp > 1 and mb != per_rank:
                        continue
                    for micro in ((m for m in powers if pp <= m <= mb) if pp > 1 else (1,)):
                        for ac in (False, True):
                            lay = Layout(dp, tp, pp, engine, mb, micro, ac)
                            try:
                                check_layout(lay, cluster, cfg)
                            except ConfigError:
                                continue
                            yield lay


def best(config: str, cluster: Cluster, clocked: bool = True) -> list[Prediction]:
    """Every layout that fits in GPU memory, fastest (window average) first."""
    cfg = load_config(config, [])
    preds = [predict(config, lay, cluster, clocked) for lay in layouts(cluster, cfg)]
    return sorted((p for p in preds if p.memory <= cluster.memory), key=lambda p: p.step_avg)


# ---------------------------------------------------------------------------------------------
# Calibration: the measured 1 Gbit/s netns runs
# ---------------------------------------------------------------------------------------------

def fit_link(allreduce: list[dict]) -> Link:
    """The link from the measured 2-rank gloo all-reduces (a 2-rank ring all-reduce is 2 steps of
    bytes/2: t = 2 lat + bytes / bw): latency from the smallest, bandwidth from the slope between
    the smallest and the largest (a least-squares intercept would be set by the big ones' noise).
    Repeated sizes (several timings) count by their median."""
    lo, hi = min(r["bytes"] for r in allreduce), max(r["bytes"] for r in allreduce)
    t_lo, t_hi = (statistics.median(r["s"] for r in allreduce if r["bytes"] == n) for n in (lo, hi))
    return Link(bw=(hi - lo) / (t_hi - t_lo), lat=t_lo / 2)


def load_calibration(path: Path = CALIBRATION) -> dict:
    return json.loads(path.read_text())


def netns_cluster(cal: dict) -> Cluster:
    """The two namespace "hosts", one rank each; only the inter-node link is used. Bandwidth from
    back-to-back all-reduces; latency from a 4-byte all-reduce whose peer was asleep in it (in a
    training step every collective follows local work, and waking the peer on this loaded machine
    costs ~10x the back-to-back latency)."""
    runs = [cal["runs"][r] for r in ("clocked", "all_period_1")]
    link = fit_link([row for run in runs for key in ("allreduce", "allreduce_after") for row in run.get(key, [])])
    late = statistics.median(run[k] for run in runs for k in ("late_peer_s", "late_peer_after_s") if k in run)
    link = Link(link.bw, late / 2)
    return Cluster("2 netns hosts x 1 CPU rank, 1 Gbit/s veth", 2, 1, link, link)


def netns_config(cal: dict, periods: tuple[int, ...]) -> tuple[None, tuple[str, ...]]:
    """bench_parallel_clocked's model as (config, overrides) for predict(): defaults + its keys."""
    m = dict(cal["model"])
    m["model.cms"] = "[" + ", ".join(f"{{width: 2048, period: {p}}}" for p in periods) + "]"
    return None, tuple(f"--{k}={v}" for k, v in {
        **m, "training.global_batch": 2, "parallel.dp_replicate": 2}.items())


def validate(cal: dict) -> list[dict]:
    """Predicted vs measured mean step of the two 2-rank netns runs. The machine is shared (load
    average 5-15), so compute is not predicted: it is the same run's step time outside its
    collectives; the communication is predicted from the link fit alone. The 1-rank runs' step
    time (same periods, no communication) is given for comparison."""
    cluster = netns_cluster(cal)
    rows = []
    for name, periods in (("clocked", (1, 4, 16, 64)), ("all_period_1", (1, 1, 1, 1))):
        steps = cal["runs"][name]["steps"][2:]
        step, comm = statistics.fmean(r["step_s"] for r in steps), statistics.fmean(r["comm_s"] for r in steps)
        config, over = netns_config(cal, periods)
        p = predict(config, Layout(2, 1, 1, "ddp"), cluster, compute_s=step - comm, overrides=over)
        rows.append({"run": name, "predicted_s": p.step_avg, "measured_s": step,
                     "predicted_comm_s": p.dp_avg + p.small, "measured_comm_s": comm, "compute_s": step - comm,
                     "one_rank_s": statistics.fmean(r["step_s"] for r in cal["runs"][f"compute_{name}"]["steps"][2:]),
                     "cpu_s": statistics.fmean(r["cpu_s"] for r in steps),
                     "load": (cal["runs"][name]["load_before"], cal["runs"][name]["load_after"]),
                     "predicted_bytes": p.bytes_reduced_avg,
                     "measured_bytes": statistics.fmean(r["bytes"] for r in cal["runs"][name]["steps"])})
    return rows


# ---------------------------------------------------------------------------------------------
# Output
# ---------------------------------------------------------------------------------------------

def gib(x: float) -> str:
    return f"{x / 2**30:.1f}"


def report(config: str, lay: Layout, cluster: Cluster) -> str:
    c, f = predict(config, lay, cluster, True), predict(config, lay, cluster, False)
    lines = [f"{config} on {cluster.name}, {lay}",
             f"  step (s): clocked {c.step_avg:.3f} avg / {c.step_worst:.3f} worst; all periods 1 {f.step_avg:.3f}; "
             f"gain {f.step_avg / c.step_avg:.2f}x",
             f"  parts (s): compute {c.compute:.3f}, tp {c.tp:.3f}, pp {c.pp:.3f}, dp {c.dp_avg:.3f} "
             f"(all-1 {f.dp_avg:.3f}), small {c.small:.4f}",
             f"  bytes_reduced / step: {c.bytes_reduced_avg / 1e6:.1f} MB (all-1 {f.bytes_reduced_avg / 1e6:.1f}); "
             f"sent / step: {c.bytes_sent_avg / 1e9:.2f} GB avg, {c.bytes_sent_worst / 1e9:.2f} worst "
             f"(all-1 {f.bytes_sent_avg / 1e9:.2f})",
             f"  peak memory / GPU: {gib(c.memory)} GiB ("
             + ", ".join(f"{k} {gib(v)}" for k, v in c.memory_parts.items()) + ")"]
    return "\n".join(lines)


def docs_tables() -> str:
    cal = load_calibration()
    link = netns_cluster(cal).inter
    out = [f"Validation (`{cal['command']}`, {cal['date']}; link fit: {link.bw / 1e6:.1f} MB/s, "
           f"{link.lat * 1e3:.2f} ms per ring step):", "",
           "| run | communication predicted / measured (s) | error | step predicted / measured (s) | error "
           "| bytes_reduced predicted / measured (MB) | compute (s) | 1 rank alone (s) | main-thread CPU (s) | load |",
           "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in validate(cal):
        out.append(f"| {r['run']} | {r['predicted_comm_s']:.3f} / {r['measured_comm_s']:.3f} | "
                   f"{(r['predicted_comm_s'] / r['measured_comm_s'] - 1) * 100:+.1f}% | "
                   f"{r['predicted_s']:.3f} / {r['measured_s']:.3f} | "
                   f"{(r['predicted_s'] / r['measured_s'] - 1) * 100:+.1f}% | "
                   f"{r['predicted_bytes'] / 1e6:.2f} / {r['measured_bytes'] / 1e6:.2f} | {r['compute_s']:.3f} | "
                   f"{r['one_rank_s']:.3f} | {r['cpu_s']:.3f} | {r['load'][0]:.0f}-{r['load'][1]:.0f} |")
    for config in ("configs/hope_760m.yaml", "configs/hope_1b3.yaml"):
        for key in ("h100-ib", "h100-eth"):
            cluster = CLUSTERS[key]
            ranked, seen = [], set()
            for p in best(config, cluster):  # the fastest micro-batch / checkpointing choice of each
                if (p.layout.dp, p.layout.tp, p.layout.pp, p.layout.engine) not in seen:
                    seen.add((p.layout.dp, p.layout.tp, p.layout.pp, p.layout.engine))
                    ranked.append(p)
            shown = ranked[:5] + [next(p for p in ranked if p.layout.engine == e) for e in ENGINES
                                  if any(p.layout.engine == e for p in ranked[5:])]
            out += ["", f"**{Path(config).stem} on {cluster.name}** (`--config {config} --cluster {key}`): "
                        f"{len(ranked)} of (dp, tp, pp, engine) fit in {cluster.memory / 1e9:.0f} GB; the 5 fastest "
                        "and the best of each other engine:", "",
                    "| layout | step clocked avg / worst (s) | all periods 1 (s) | gain | compute / tp / pp / dp (s) "
                    "| bytes_reduced (MB) | sent / step clocked, all-1 (GB) | peak memory / GPU (GiB) |",
                    "|---|---:|---:|---:|---|---:|---:|---:|"]
            for c in (p for i, p in enumerate(shown) if p not in shown[:i]):
                f = predict(config, c.layout, cluster, False)
                out.append(f"| {c.layout} | {c.step_avg:.3f} / {c.step_worst:.3f} | {f.step_avg:.3f} | "
                           f"{f.step_avg / c.step_avg:.2f}x | "
                           f"{c.compute:.3f} / {c.tp:.3f} / {c.pp:.3f} / {c.dp_avg:.3f} | "
                           f"{c.bytes_reduced_avg / 1e6:.0f} | "
                           f"{c.bytes_sent_avg / 1e9:.2f}, {f.bytes_sent_avg / 1e9:.2f} "
                           f"| {gib(c.memory)} |")
            flat = best(config, cluster, clocked=False)[0]
            out += ["", f"Best layout with all periods 1: {flat.layout}, {flat.step_avg:.3f} s; clocked sync at each "
                        f"one's best layout: **{flat.step_avg / ranked[0].step_avg:.2f}x** "
                        f"({flat.step_avg:.3f} / {ranked[0].step_avg:.3f} s)."]
    return "\n".join(out)


def write_docs(path: Path = DOC) -> None:
    text = path.read_text()
    begin, end = MARK
    if begin not in text or end not in text:
        raise SystemExit(f"{path} has no {begin} ... {end} markers: add them where the tables go")
    head, rest = text.split(begin, 1)
    path.write_text(head + begin + "\n" + docs_tables() + "\n" + end + rest.split(end, 1)[1])


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="configs/hope_760m.yaml")
    ap.add_argument("--layout",
                    help="dp=8,tp=4,pp=1,engine=fsdp (engines: ddp fsdp zero1 zero2; mb=, microbatches=, ac=1)")
    ap.add_argument("--cluster", choices=list(CLUSTERS), default="h100-ib")
    ap.add_argument("--nodes", type=int)
    ap.add_argument("--gpus-per-node", type=int)
    ap.add_argument("--best", action="store_true", help="rank every layout that fits")
    ap.add_argument("--validate", action="store_true")
    ap.add_argument("--docs", action="store_true")
    ap.add_argument("--calibrate", action="store_true")
    ap.add_argument("--measure-activations", action="store_true",
                    help="measure --config's activation bytes into the calibration file's cache")
    a = ap.parse_args(argv)
    cluster = CLUSTERS[a.cluster]
    if a.nodes or a.gpus_per_node:
        cluster = dataclasses.replace(cluster, nodes=a.nodes or cluster.nodes,
                                      gpus_per_node=a.gpus_per_node or cluster.gpus_per_node)
    if a.measure_activations:
        cal = load_calibration()
        cal.setdefault("activations", {})[_key(a.config, ())] = measure_activations(a.config)
        CALIBRATION.write_text(json.dumps(cal, indent=1) + "\n")
        print(f"{a.config}: {cal['activations'][_key(a.config, ())]}")
    elif a.calibrate:
        import subprocess
        subprocess.run([sys.executable, str(ROOT / "bench" / "cost_model_calibrate.py")], check=True)
    elif a.validate:
        for r in validate(load_calibration()):
            print(f"{r['run']}: step predicted {r['predicted_s']:.3f} s, measured {r['measured_s']:.3f} s "
                  f"({(r['predicted_s'] / r['measured_s'] - 1) * 100:+.1f}%); communication predicted "
                  f"{r['predicted_comm_s']:.3f} s, measured {r['measured_comm_s']:.3f} s "
                  f"({(r['predicted_comm_s'] / r['measured_comm_s'] - 1) * 100:+.1f}%)")
    elif a.docs:
        write_docs()
        print(f"wrote the tables into {DOC}")
    elif a.best:
        for p in best(a.config, cluster)[:10]:
            print(report(a.config, p.layout, cluster))
    else:
        lay = parse_layout(a.layout or f"dp={cluster.world}")
        try:
            print(report(a.config, lay, cluster))
        except ConfigError as e:
            raise SystemExit(f"error: {e}") from None


if __name__ == "__main__":
    main()
