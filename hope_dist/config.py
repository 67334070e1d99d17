"""Job configuration: small dataclasses, loaded from YAML, overridden by `--key.sub=value`.

Every error names the offending key and says how to fix it, because a typo in a 1000-GPU
job's config should fail in the first second, not after the first checkpoint interval. Each field's
docstring (the line after it) says its meaning and range; `pretrain.py --help` lists them. A section's
`__post_init__` checks its own fields one by one; `validate()` checks how fields of a job fit together.
Loading (YAML, overrides, coercion by type hint, `Literal` choices) is in hope_dist.config_loading.
"""
from __future__ import annotations

import dataclasses
import importlib.util
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from hope_dist.mixer_specs import MIXERS, MixerSpec
from hope_dist.config_loading import (ConfigError, check_choices, field_docs, from_dict, help_text,  # noqa: F401
                                      load_yaml, set_path)
from hope_dist.parallel.deepspeed_config import read_user_config


MixerName = Literal[tuple(MIXERS)]  # the choices of model.mixer: hope_dist/mixer_specs.py

def _check(section: Any, name: str, ok: bool, requirement: str) -> None:
    """Unless ok: `NAME=VALUE requirement` (from_dict puts the section's prefix in front)."""
    if not ok:
        raise ConfigError(f"{name}={getattr(section, name)!r} {requirement}")


def _positive(section: Any, *names: str) -> None:
    for name in names:
        _check(section, name, getattr(section, name) >= 1, "must be >= 1")


@dataclass
class CMSLevel:
    """One level of the Continuum Memory System (docs/model.md section 4)."""

    width: int = 64
    """hidden width of the level's MLP; >= 1, a multiple of parallel.tp"""
    period: int = 1
    """optimizer steps between the level's updates; >= 1 (1 = every step)"""
    lr_scale: float = 1.0
    """factor on the learning rate at the level's updates; > 0"""
    chunk_size: int = 0
    """tokens per in-context update of the down projection (model.cms_in_context); 0: not in context"""

    def __post_init__(self) -> None:
        _positive(self, "width")
        _check(self, "period", self.period >= 1, "must be >= 1 (1 = every step)")
        _check(self, "lr_scale", self.lr_scale > 0, "must be > 0")
        _check(self, "chunk_size", self.chunk_size >= 0, "must be >= 0 (0: the level does not learn in context)")


@dataclass
class ModelConfig:
    """The HOPE model (docs/model.md)."""

    vocab_size: int = 32000
    """token ids are in [0, vocab_size); a multiple of parallel.tp when tp > 1"""
    d_model: int = 64
    """width of the residual stream; a multiple of n_heads"""
    n_layers: int = 2
    """HOPE blocks (sequence mixer + CMS); >= 1"""
    n_heads: int = 4
    """heads of the sequence mixer (head_dim = d_model / n_heads)"""
    mixer: MixerName = "selfmod"
    """sequence mixer, a name in hope_dist/mixer_specs.py: selfmod (HOPE), titans, or attention (Transformer++)"""
    memory_depth: int = 2
    """layers of each memory: 1 (linear W z) or 2 (residual MLP z + W1 silu(W2 z))"""
    memory_hidden: int | None = None
    """d_m, the hidden width of depth-2 memories; null: head_dim"""
    chunk_size: int = 64
    """tokens per chunk of the output memory's parallel update; >= 1"""
    proj_chunk_size: int = 64
    """tokens per chunk of the selfmod projection memories; a multiple of chunk_size"""
    eta_max: float = 1.0
    """upper bound of the memories' inner learning rate eta_t"""
    selfgen_values: bool = True
    """selfmod: memories write self-generated targets vhat = M(v); false: vhat = v"""
    stopgrad_vhat: bool = True
    """no outer gradient through the self-generated targets"""
    w1_delta: bool = True
    """depth 2: the delta rule on W1 too (docs/memory_op.md); false: the spec's gated W1"""
    w2_delta: bool = True
    """the spec's factor (alpha I - eta k k^T) on W2 (depth 1: the memory's W); false: gradient descent with
    retention, which at depth 2 keeps the hidden features of the key just written (docs/model.md 2.10)"""
    momentum: bool | None = None
    """an EMA of the memories' inner gradients; null: off for selfmod, on for titans (spec section 1)"""
    conv_width: int = 4
    """taps of the causal depthwise convolution before the memories; >= 1"""
    kernel: Literal["auto", "triton", "torch", "naive"] = "auto"
    """memory op: auto (triton on CUDA, torch on CPU), triton, torch (chunked) or naive (token loop)"""
    norm_eps: float = 1e-6
    """epsilon of the RMS norms"""
    rope_theta: float = 10000.0
    """RoPE base of the attention mixer"""
    attn_impl: Literal["auto", "flash", "flex", "sdpa"] = "auto"
    """attention kernel: auto (flash-attn on CUDA when installed, else FlexAttention on CUDA, SDPA on CPU)"""
    tie_embeddings: bool = False
    """the output head shares the token embedding's weights"""
    init_std: float = 0.02
    """std of the linear layers' initial weights"""
    memory_w1_std: float | None = None
    """depth 2: std of the memories' initial W1, > 0; null: init_std (M starts ~identity)"""
    memory_w2_std: float | None = None
    """depth 2: std of the memories' initial W2, > 0; null: 1/sqrt(d_h) (unit keys give hidden pre-activations
    of std 1/sqrt(d_h), where silu is nearly linear and a write stores little: docs/model.md 2.10)"""
    alpha_init: float = 0.99
    """initial retention per token, in (0, 1) (memory horizon ~ 1 / (1 - alpha) tokens)"""
    retain_init: bool = False
    """retention decays the fast weights' deviation from their learned initial weights M_0, not the weights"""
    bound_step: bool = False
    """each inner gradient divided by the inner loss's curvature along it when above 1 (docs/model.md 2.10)"""
    proj_rate: float = 1.0
    """selfmod: share of each update the projection memories take, in [0, 1]; 0: static k, v, eta, alpha maps"""
    rate_norm: bool = False
    """selfmod: eta and alpha read M_eta's and M_alpha's outputs RMS-normalised (docs/model.md 2.10)"""
    rates_from: Literal["memories", "input"] = "memories"
    """selfmod: eta and alpha read out of M_eta, M_alpha (paper) or, as titans, linear read-outs of x"""
    memory_inputs: Literal["shared", "per_memory", "per_memory_conv"] = "shared"
    """selfmod: k, v, eta, alpha memories read one input (paper), one projection+conv each, or a conv each"""
    cms: list[CMSLevel] = field(default_factory=lambda: [CMSLevel(64, p) for p in (1, 4, 16, 64)])
    """the CMS levels, at least one: an MLP each, updated every `period` steps"""
    cms_in_context: bool = False
    """levels with cms[i].chunk_size > 0 learn in context (docs/cms_in_context.md)"""
    cms_inner_lr: float = 0.1
    """in-context step per chunk, normalised by the chunk's key norms; in (0, 1]"""
    cms_stopgrad_writes: bool = False
    """true: no outer gradient through the in-context writes"""

    def __post_init__(self) -> None:
        check_choices(self)
        _positive(self, "vocab_size", "d_model", "n_layers", "n_heads", "chunk_size", "proj_chunk_size", "conv_width")
        _check(self, "memory_depth", self.memory_depth in (1, 2), "must be 1 (linear) or 2 (residual MLP)")
        _check(self, "memory_w1_std", self.memory_w1_std is None or self.memory_w1_std > 0,
               "must be > 0 (or null for model.init_std)")
        _check(self, "memory_w2_std", self.memory_w2_std is None or self.memory_w2_std > 0,
               "must be > 0 (or null for 1/sqrt(d_h))")
        _check(self, "proj_rate", 0 <= self.proj_rate <= 1, "must be in [0, 1]: the projection memories' share of "
               "each update (1: the paper, 0: frozen at M_0)")
        _check(self, "alpha_init", 0 < self.alpha_init < 1, "must be in (0, 1): the initial retention per token")
        if self.memory_hidden is not None:
            _positive(self, "memory_hidden")
        if not self.cms:
            raise ConfigError("cms is empty: give at least one CMS level (width, period)")
        _check(self, "cms_inner_lr", 0 < self.cms_inner_lr <= 1, "must be in (0, 1]: the normalised in-context "
               "step (above 1 a step can overshoot along the chunk's dominant key direction)")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def mixer_spec(self) -> MixerSpec:
        """What the mixer is and can do (hope_dist/mixer_specs.py)."""
        return MIXERS[self.mixer]

    @property
    def use_momentum(self) -> bool:
        return self.mixer_spec.default_momentum if self.momentum is None else self.momentum

    @property
    def cms_chunks(self) -> list[int]:
        """Each level's in-context chunk (0: not in context); all 0 unless cms_in_context."""
        return [lvl.chunk_size if self.cms_in_context else 0 for lvl in self.cms]

    @property
    def state_span(self) -> int:
        """Segments of a multiple of this many tokens carry the state exactly (two equal one long
        forward): every chunk that counts from the start of a call divides it (proj_chunk_size, and the
        in-context CMS chunks); proj_chunk_size when no CMS level learns in context."""
        return math.lcm(self.proj_chunk_size, *(c for c in self.cms_chunks if c))


@dataclass
class OptimConfig:
    """The optimizer and learning-rate schedule (docs/optim.md)."""

    name: Literal["adamw", "m3"] = "adamw"
    """adamw, or m3 (Nested Learning Algorithm 1 on hidden matrices; docs/optim.md)"""
    lr: float = 4e-4
    """peak learning rate, > 0: linear warmup to it, then cosine decay to min_lr_ratio * lr"""
    min_lr_ratio: float = 0.1
    """the last step's learning rate as a fraction of lr"""
    warmup_steps: int = 100
    """steps of linear warmup"""
    weight_decay: float = 0.1
    """decoupled weight decay, on tensors of 2 or more dimensions"""
    beta1: float = 0.9
    """first moment decay, in [0, 1); m3: also the fast momentum M1"""
    beta2: float = 0.95
    """second moment V decay, in [0, 1)"""
    eps: float = 1e-8
    """added to sqrt(V)"""
    grad_clip: float = 1.0
    """max global gradient norm; <= 0 disables clipping"""
    beta3: float = 0.9
    """m3: decay of the slow momentum M2 per slow step, in [0, 1)"""
    alpha: float = 1.0
    """m3: weight of the slow momentum's orthogonalised update, >= 0 (0 turns it off)"""
    ns_steps: int = 5
    """m3: Newton-Schulz iterations, >= 1"""
    slow_every: int = 10
    """m3: f, a matrix's slow momentum refreshes every f of its own steps; >= 1"""
    precondition: Literal["before_ns", "after_ns"] = "before_ns"
    """m3: divide by sqrt(V) + eps before Newton-Schulz, or after it (as printed)"""

    def __post_init__(self) -> None:
        check_choices(self)
        _check(self, "lr", self.lr > 0, "must be > 0")
        for name in ("beta1", "beta2", "beta3"):
            _check(self, name, 0 <= getattr(self, name) < 1, "must be in [0, 1): it is a decay factor, e.g. 0.9")
        _check(self, "alpha", self.alpha >= 0, "must be >= 0: the slow momentum's weight (0 turns it off)")
        _check(self, "ns_steps", self.ns_steps >= 1, "must be >= 1: Newton-Schulz iterations, 5 as in Muon")
        _check(self, "slow_every", self.slow_every >= 1, "must be >= 1: the slow momentum's period f, in each "
               "matrix's own steps (1 refreshes it every step)")


@dataclass
class TrainingConfig:
    """The training loop."""

    steps: int = 1000
    """optimizer steps to run; >= 1"""
    seq_len: int = 128
    """tokens per training sequence; >= 1"""
    global_batch: int = 8
    """sequences per optimizer step, over all data-parallel ranks; a multiple of dp x micro_batch"""
    micro_batch: int = 8
    """sequences per forward/backward on one rank; >= 1"""
    seed: int = 1234
    """seed of the initialisation and the data order; in [0, 2**63)"""
    mixed_precision: Literal["auto", "bf16", "fp32"] = "auto"
    """compute dtype: auto (bf16 on CUDA, fp32 on CPU), bf16 or fp32"""
    nonfinite: Literal["stop", "skip"] = "stop"
    """what a non-finite loss does: stop the run, or skip the step"""
    reset_state_at_eod: bool = True
    """the memories start afresh at every document of a packed row"""
    carry_state: bool = False
    """hand each row's fast-weight state to the next step: the data is read in lanes, so a row's next
    segment continues its documents (truncated BPTT, one segment; recurrent mixers, one dataset)"""
    device_memory_gb: float | None = None
    """memory per device the job must fit in, checked before the first step (docs/memory.md); null: the
    CUDA device's total, no check on CPU; 0: no check"""

    def __post_init__(self) -> None:
        check_choices(self)
        _positive(self, "steps", "seq_len", "global_batch", "micro_batch")
        _check(self, "seed", 0 <= self.seed < 2**63, "must be >= 0 and < 2**63 (numpy and torch seeds)")
        _check(self, "device_memory_gb", self.device_memory_gb is None or self.device_memory_gb >= 0,
               "must be >= 0 (0: no memory check; null: the CUDA device's total)")


@dataclass
class DataConfig:
    """Tokenized training and validation data (data_prep/)."""

    paths: list[str] = field(default_factory=list)
    """training data: Megatron prefixes (PREFIX.bin / PREFIX.idx)"""
    weights: list[float] | None = None
    """sampling weight per path, >= 0; null: in proportion to each dataset's tokens"""
    tokenizer: str | None = None
    """the tokenizer.json the data was tokenized with (checked against the data); null: unchecked"""
    eod_id: int | None = None
    """end-of-document token id; null: the tokenizer's"""
    valid_paths: list[str] = field(default_factory=list)
    """held-out Megatron prefixes for validation"""
    valid_fraction: float = 0.0
    """or: hold out this fraction of the training documents, in [0, 1)"""
    order: Literal["shuffled", "lanes"] = "shuffled"
    """shuffled samples, or lanes: row b of every global batch reads the next segment of lane b (one dataset;
    training.carry_state reads lanes whatever this says)"""
    lane_groups: int = 1
    """with lanes: lane_groups x global_batch lanes in groups of global_batch, step s reading group
    s % lane_groups, so consecutive steps read different documents (more: less correlated batches, one
    carried state per group)"""

    def __post_init__(self) -> None:
        check_choices(self)
        _positive(self, "lane_groups")
        _check(self, "valid_fraction", 0 <= self.valid_fraction < 1, "must be in [0, 1): the share of training "
               "documents held out for validation")


@dataclass
class EvalConfig:
    """Validation during training."""

    every: int = 0
    """validate every this many steps (and after the last); 0: never"""
    tokens: int = 65536
    """validation tokens per evaluation (rounded up to whole global batches); >= 1"""

    def __post_init__(self) -> None:
        _check(self, "every", self.every >= 0, "must be >= 0 (0 turns validation off)")
        _positive(self, "tokens")


@dataclass
class ParallelConfig:
    """The device mesh: pp x dp_replicate x dp_shard x tp ranks (docs/parallel.md)."""

    pp: int = 1
    """pipeline stages; at most model.n_layers"""
    dp_replicate: int = 1
    """data-parallel replicas (a full copy of the state each)"""
    dp_shard: int = 1
    """data-parallel ranks that shard parameters, gradients and optimizer state"""
    tp: int = 1
    """tensor-parallel ranks; divides model.n_heads"""
    pp_microbatches: int = 1
    """pipeline microbatches per micro-batch; a multiple of pp except for gpipe"""
    pp_schedule: Literal["1f1b", "gpipe", "interleaved_1f1b"] = "1f1b"
    """pipeline schedule; interleaved_1f1b puts 2 stages on each rank"""
    activation_checkpoint: bool = False
    """recompute each layer's activations in the backward pass"""
    memory_op_recompute: bool = False
    """the chunked PyTorch memory op saves only each chunk step's inputs and recomputes it in backward"""
    timeout_s: float = 600.0
    """collective timeout in seconds: a hung rank fails the job after this long"""
    engine: Literal["native", "deepspeed"] = "native"
    """native (FSDP2 / replication) or deepspeed (ZeRO, docs/parallel.md "Engines")"""
    zero_stage: int = 1
    """engine=deepspeed: ZeRO stage 1 or 2"""
    ds_config: str | None = None
    """engine=deepspeed: a JSON/YAML DeepSpeed config merged into the generated one"""

    def __post_init__(self) -> None:
        check_choices(self)
        _positive(self, "pp", "dp_replicate", "dp_shard", "tp", "pp_microbatches")


@dataclass
class CheckpointConfig:
    """Checkpoints and resuming (docs/checkpoints.md)."""

    interval: int = 100
    """steps between checkpoints; <= 0 saves only at the end"""
    keep_last: int = 3
    """checkpoints kept on disk; >= 1"""
    async_save: bool = False
    """write checkpoints in the background while training goes on"""
    resume: str = "auto"
    """auto (the latest checkpoint, if any), never, or a step-N folder"""
    dir: str | None = None
    """the checkpoints' folder; null: RUN_DIR/checkpoints"""
    on_save_error: Literal["stop", "continue"] = "stop"
    """stop, or continue: an interval save that fails for a full disk is skipped"""

    def __post_init__(self) -> None:
        check_choices(self)
        _positive(self, "keep_last")


@dataclass
class MetricsConfig:
    """Metrics and logging."""

    log_every: int = 1
    """steps between metric rows"""
    jsonl: bool = True
    """append the metrics to RUN_DIR/metrics.jsonl"""
    wandb: bool = True
    """log to Weights & Biases (offline when WANDB_API_KEY is unset)"""
    wandb_project: str = "hope_dist"
    """the wandb project"""
    progress: bool = True
    """show a progress bar"""
    memory_health: bool = True
    """probe the fast weights at every log step (model/memory_health.py)"""


@dataclass
class JobConfig:
    """A whole training job."""

    run_dir: str = "runs/default"
    """the run's folder: metrics, logs and (by default) checkpoints"""
    model: ModelConfig = field(default_factory=ModelConfig)
    """the HOPE model (docs/model.md)"""
    training: TrainingConfig = field(default_factory=TrainingConfig)
    """the training loop"""
    optim: OptimConfig = field(default_factory=OptimConfig)
    """the optimizer and learning-rate schedule (docs/optim.md)"""
    data: DataConfig = field(default_factory=DataConfig)
    """tokenized training and validation data"""
    eval: EvalConfig = field(default_factory=EvalConfig)
    """validation during training"""
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    """the device mesh and parallelism engine (docs/parallel.md)"""
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    """checkpoints and resuming (docs/checkpoints.md)"""
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    """metrics and logging"""

    def validate(self) -> "JobConfig":
        validate(self)
        return self

    @property
    def data_in_lanes(self) -> bool:
        """The train stream reads lanes (data/samples.py): data.order=lanes, or carried state needing them."""
        return self.training.carry_state or self.data.order == "lanes"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _validate_cms_in_context(m: ModelConfig, seq_len: int) -> None:
    for i, level in enumerate(m.cms):
        key = f"model.cms[{i}].chunk_size"
        if level.chunk_size and not m.cms_in_context:
            raise ConfigError(f"{key}={level.chunk_size} is set but model.cms_in_context=false: set "
                              f"model.cms_in_context=true to use it, or {key}=0")
        if level.chunk_size and seq_len % level.chunk_size:
            raise ConfigError(f"{key}={level.chunk_size} does not divide training.seq_len={seq_len}: a level updates "
                              f"every chunk tokens from the start of each row; pick a divisor of {seq_len}")
    if m.cms_in_context and not any(level.chunk_size for level in m.cms):
        raise ConfigError("model.cms_in_context=true but every model.cms[i].chunk_size is 0: give the levels that "
                          "learn in context a token chunk size, "
                          "e.g. model.cms=[{width: 64, period: 1, chunk_size: 64}, ...]")


def _validate_carry_state(cfg: JobConfig) -> None:
    if cfg.data_in_lanes and len(cfg.data.paths) > 1:
        raise ConfigError(f"data in lanes (data.order=lanes or training.carry_state=true) reads one dataset, but "
                          f"data.paths holds {len(cfg.data.paths)}: tokenize them into one dataset, or use "
                          f"data.order=shuffled and training.carry_state=false")
    if cfg.data.lane_groups > 1 and not cfg.data_in_lanes:
        raise ConfigError(f"data.lane_groups={cfg.data.lane_groups} groups lanes, but the data is shuffled: set "
                          f"data.order=lanes or training.carry_state=true, or data.lane_groups=1")
    if not cfg.training.carry_state:
        return
    if not cfg.model.mixer_spec.recurrent:
        raise ConfigError(f"training.carry_state=true needs a recurrent model.mixer (one of "
                          f"{[n for n, s in MIXERS.items() if s.recurrent]}), got {cfg.model.mixer!r}: "
                          f"its state is a KV cache that grows with the context; set training.carry_state=false")
    if cfg.parallel.engine != "native":
        raise ConfigError("training.carry_state=true needs parallel.engine=native: DeepSpeed's checkpoints do not "
                          "hold the carried states; set parallel.engine=native or training.carry_state=false")


def _validate_engine(cfg: JobConfig) -> None:
    """parallel.engine=deepspeed: the layouts and settings the DeepSpeed path keeps the clocks' guarantees in."""
    p = cfg.parallel
    if p.engine == "native":
        return
    if p.zero_stage not in (1, 2):
        raise ConfigError(
            f"parallel.zero_stage={p.zero_stage} is not supported: use 1 or 2. Stage 3 partitions the parameters "
            f"themselves and gathers them in hooks on the whole model, which this engine does not verify to keep the "
            f"CMS clocks' guarantees; for sharded parameters use parallel.engine=native with parallel.dp_shard")
    if p.tp > 1 or p.pp > 1:
        raise ConfigError(
            f"parallel.engine=deepspeed supports data parallelism only (parallel.tp=1, parallel.pp=1; dp = "
            f"dp_replicate x dp_shard ranks, ZeRO stage 1 or 2), got tp={p.tp}, pp={p.pp}: DeepSpeed's ZeRO "
            f"cannot flatten the tensor-parallel DTensor parameters nor reduce across torch pipeline stages. "
            f"Use parallel.engine=native for tp/pp layouts")
    if cfg.optim.name != "adamw":
        raise ConfigError(f"optim.name={cfg.optim.name!r} needs parallel.engine=native: ZeRO flattens the "
                          f"parameters into one vector per group, M3 orthogonalises whole matrices; "
                          f"use optim.name=adamw")
    if cfg.checkpoint.async_save:
        raise ConfigError("checkpoint.async_save=true needs parallel.engine=native: DeepSpeed's save_checkpoint "
                          "writes synchronously; set checkpoint.async_save=false")
    if p.ds_config is not None and not Path(p.ds_config).is_file():
        raise ConfigError(f"parallel.ds_config={p.ds_config!r} does not exist: give a DeepSpeed JSON/YAML config "
                          f"file, or leave it unset for the generated one")
    if importlib.util.find_spec("deepspeed") is None:
        raise ConfigError("parallel.engine=deepspeed needs DeepSpeed 0.19: pip install -e .[deepspeed]")
    read_user_config(p.ds_config, p.zero_stage)  # its keys, before any process starts


def _validate_layout(cfg: JobConfig) -> None:
    """The batch and the model split over the mesh."""
    m, t, p = cfg.model, cfg.training, cfg.parallel
    dp = p.dp_replicate * p.dp_shard
    if t.global_batch % (dp * t.micro_batch):
        raise ConfigError(
            f"training.global_batch={t.global_batch} must be a multiple of data-parallel size "
            f"({dp} = parallel.dp_replicate x parallel.dp_shard) x training.micro_batch={t.micro_batch}")
    if m.n_heads % p.tp:
        raise ConfigError(
            f"parallel.tp={p.tp} does not divide model.n_heads={m.n_heads}: heads are split over "
            f"tensor-parallel ranks, so tp must be a divisor of n_heads")
    if p.pp > m.n_layers:
        raise ConfigError(
            f"parallel.pp={p.pp} is larger than model.n_layers={m.n_layers}: every pipeline stage "
            f"needs at least one layer")
    if p.tp > 1 and m.vocab_size % p.tp:
        raise ConfigError(
            f"model.vocab_size={m.vocab_size} is not divisible by parallel.tp={p.tp}: the embedding "
            f"and head are vocab-parallel; round the vocabulary up to a multiple of {p.tp}")
    for i, level in enumerate(m.cms):
        if level.width % p.tp:
            raise ConfigError(f"model.cms[{i}].width={level.width} is not divisible by parallel.tp={p.tp}: "
                              f"CMS levels are split column/row-wise over tp; pick a multiple of {p.tp}")
    if p.pp > 1:
        if t.micro_batch % p.pp_microbatches:
            raise ConfigError(
                f"training.micro_batch={t.micro_batch} must be a multiple of parallel.pp_microbatches="
                f"{p.pp_microbatches}: the pipeline splits every micro-batch into that many microbatches")
        if p.pp_schedule != "gpipe" and p.pp_microbatches % p.pp:
            raise ConfigError(
                f"parallel.pp_microbatches={p.pp_microbatches} must be a multiple of parallel.pp={p.pp} for "
                f"pp_schedule={p.pp_schedule} (fewer cannot fill the pipeline); or use pp_schedule=gpipe")
        if p.pp_schedule == "interleaved_1f1b" and m.n_layers < 2 * p.pp:
            raise ConfigError(
                f"pp_schedule=interleaved_1f1b puts 2 stages on each of parallel.pp={p.pp} ranks, so "
                f"model.n_layers={m.n_layers} must be >= {2 * p.pp}; use pp_schedule=1f1b")


def validate(cfg: JobConfig) -> None:
    """Check how the fields fit together (each field's own range is checked on construction); every
    message names the key and the fix."""
    m = cfg.model
    if m.d_model % m.n_heads:
        raise ConfigError(
            f"model.n_heads={m.n_heads} does not divide model.d_model={m.d_model}: "
            f"pick n_heads from the divisors of d_model")
    if m.proj_chunk_size % m.chunk_size:
        raise ConfigError(
            f"model.proj_chunk_size={m.proj_chunk_size} must be a multiple of model.chunk_size={m.chunk_size}")
    _validate_cms_in_context(m, cfg.training.seq_len)
    _validate_carry_state(cfg)
    _validate_layout(cfg)
    _validate_engine(cfg)
    d, e = cfg.data, cfg.eval
    if d.weights is not None and len(d.weights) != len(d.paths):
        raise ConfigError(
            f"data.weights has {len(d.weights)} entries but data.paths has "
            f"{len(d.paths)}: give one weight per path")
    if d.valid_fraction > 0 and d.valid_paths:
        raise ConfigError("data.valid_paths and data.valid_fraction are both set: hold out documents of the "
                          "training data (valid_fraction) or use separate files (valid_paths), not both")
    if e.every > 0 and not d.valid_paths and d.valid_fraction == 0:
        raise ConfigError(f"eval.every={e.every} needs validation data: set data.valid_fraction (e.g. 0.01) "
                          "or data.valid_paths, or set eval.every=0")


USAGE = "usage: pretrain.py --config configs/tiny.yaml [--resume[=auto|never|DIR]] [--key.sub=value ...]"


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> JobConfig:
    """YAML file (optional) + `--key.sub=value` overrides -> validated JobConfig."""
    tree: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {str(path)!r} does not exist (see configs/ for examples)")
        try:
            text = path.read_text()
        except (OSError, UnicodeDecodeError) as e:
            raise ConfigError(f"config file {str(path)!r} cannot be read ({e}); pass a YAML file") from None
        tree = load_yaml(text, f"config file {str(path)!r}") or {}
        if not isinstance(tree, dict):
            raise ConfigError(f"config file {str(path)!r} must hold a mapping at the top level")
    for arg in overrides:
        if not arg.startswith("--") or "=" not in arg:
            raise ConfigError(f"override {arg!r} must look like --key.sub=value")
        key, value = arg[2:].split("=", 1)
        set_path(tree, key, value)
    return from_dict(JobConfig, tree).validate()


def parse_args(argv: list[str]) -> JobConfig:
    """`--config PATH`, `--resume[=auto|never|PATH]`, then `--key.sub=value` overrides; `--help` prints
    every key (type, default, meaning) to stdout and exits 0."""
    config_path = None
    overrides = []
    it = iter(argv)
    for arg in it:
        if arg == "--config":
            config_path = next(it, None)
            if config_path is None:
                raise ConfigError("--config needs a path, e.g. --config configs/tiny.yaml")
        elif arg.startswith("--config="):
            config_path = arg.split("=", 1)[1]
        elif arg == "--resume":
            overrides.append("--checkpoint.resume=auto")
        elif arg.startswith("--resume="):
            overrides.append("--checkpoint.resume=" + arg.split("=", 1)[1])
        elif arg in ("-h", "--help"):
            print(help_text(JobConfig, USAGE))
            raise SystemExit(0)
        else:
            overrides.append(arg)
    return load_config(config_path, overrides)
