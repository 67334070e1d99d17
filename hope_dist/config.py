"""Job configuration: small dataclasses, loaded from YAML, overridden by `--key.sub=value`.

Every error names the offending key and says how to fix it, because a typo in a 1000-GPU
job's config should fail in the first second, not after the first checkpoint interval.
"""
from __future__ import annotations

import dataclasses
import importlib.util
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from hope_dist.errors import UserError


class ConfigError(UserError, ValueError):
    """A configuration problem; the message names the key."""

    label = "config error"


@dataclass
class CMSLevel:
    """One level of the Continuum Memory System (docs/model.md section 4)."""

    width: int = 64
    period: int = 1
    lr_scale: float = 1.0
    chunk_size: int = 0  # tokens per in-context update of the down projection (model.cms_in_context); 0: not in context


@dataclass
class ModelConfig:
    vocab_size: int = 32000
    d_model: int = 64
    n_layers: int = 2
    n_heads: int = 4
    mixer: str = "selfmod"  # selfmod | titans | attention
    memory_depth: int = 2
    memory_hidden: int | None = None  # d_m; None means d_h
    chunk_size: int = 64
    proj_chunk_size: int = 64
    eta_max: float = 1.0
    selfgen_values: bool = True
    stopgrad_vhat: bool = True
    w1_delta: bool = True  # depth 2: the delta rule on W1 too (docs/memory_op.md); false: the spec's gated W1
    momentum: bool | None = None  # None: off for selfmod, on for titans (spec section 1)
    conv_width: int = 4
    kernel: str = "auto"  # auto (triton on CUDA, torch on CPU) | triton | torch | naive
    norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    tie_embeddings: bool = False
    init_std: float = 0.02
    memory_w1_std: float | None = None  # depth 2: std of the memories' initial W1; None: init_std (M starts ~identity)
    alpha_init: float = 0.99  # initial retention per token (memory horizon ~ 1 / (1 - alpha) tokens)
    cms: list[CMSLevel] = field(default_factory=lambda: [CMSLevel(64, p) for p in (1, 4, 16, 64)])
    cms_in_context: bool = False  # levels with cms[i].chunk_size > 0 learn in context (docs/cms_in_context.md)
    cms_inner_lr: float = 0.1  # in-context step per chunk, normalised by the chunk's key norms; in (0, 1]
    cms_stopgrad_writes: bool = False  # true: no outer gradient through the in-context writes

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def use_momentum(self) -> bool:
        return self.mixer == "titans" if self.momentum is None else self.momentum

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
    name: str = "adamw"  # adamw | m3 (Nested Learning Algorithm 1 on hidden matrices; docs/optim.md)
    lr: float = 4e-4
    min_lr_ratio: float = 0.1
    warmup_steps: int = 100
    weight_decay: float = 0.1
    beta1: float = 0.9  # first moment; m3: also the fast momentum M1
    beta2: float = 0.95  # second moment V
    eps: float = 1e-8
    grad_clip: float = 1.0  # <= 0 disables clipping
    beta3: float = 0.9  # m3: decay of the slow momentum M2 per slow step
    alpha: float = 1.0  # m3: weight of the slow momentum's orthogonalised update
    ns_steps: int = 5  # m3: Newton-Schulz iterations
    slow_every: int = 10  # m3: f, a matrix's slow momentum refreshes every f of its own steps
    precondition: str = "before_ns"  # m3: divide by sqrt(V) + eps before Newton-Schulz | after_ns (as printed)


@dataclass
class TrainingConfig:
    steps: int = 1000
    seq_len: int = 128
    global_batch: int = 8  # sequences per optimizer step, over all data-parallel ranks
    micro_batch: int = 8  # sequences per forward/backward on one rank
    seed: int = 1234
    mixed_precision: str = "auto"  # auto (bf16 on CUDA, fp32 on CPU) | bf16 | fp32
    nonfinite: str = "stop"  # stop | skip: what a non-finite loss does
    reset_state_at_eod: bool = True


@dataclass
class DataConfig:
    paths: list[str] = field(default_factory=list)  # Megatron prefixes (PREFIX.bin / PREFIX.idx)
    weights: list[float] | None = None
    tokenizer: str | None = None
    eod_id: int | None = None
    valid_paths: list[str] = field(default_factory=list)  # held-out Megatron prefixes
    valid_fraction: float = 0.0  # or: hold out this fraction of the training documents


@dataclass
class EvalConfig:
    every: int = 0  # validate every this many steps (and after the last); 0: never
    tokens: int = 65536  # validation tokens per evaluation (rounded up to whole global batches)


@dataclass
class ParallelConfig:
    pp: int = 1
    dp_replicate: int = 1
    dp_shard: int = 1
    tp: int = 1
    pp_microbatches: int = 1
    pp_schedule: str = "1f1b"  # 1f1b | gpipe | interleaved_1f1b
    activation_checkpoint: bool = False
    timeout_s: float = 600.0  # collective timeout: a hung rank fails the job after this long
    engine: str = "native"  # native (FSDP2 / replication) | deepspeed (ZeRO, docs/parallel.md "Engines")
    zero_stage: int = 1  # engine=deepspeed: ZeRO stage 1 or 2
    ds_config: str | None = None  # engine=deepspeed: a JSON/YAML DeepSpeed config merged into the generated one


@dataclass
class CheckpointConfig:
    interval: int = 100  # steps; <= 0 saves only at the end
    keep_last: int = 3
    async_save: bool = False
    resume: str = "auto"  # auto | never | a step-N folder
    dir: str | None = None  # default: RUN_DIR/checkpoints
    on_save_error: str = "stop"  # stop | continue: an interval save that fails for a full disk is skipped


@dataclass
class MetricsConfig:
    log_every: int = 1
    jsonl: bool = True
    wandb: bool = True  # offline when WANDB_API_KEY is unset
    wandb_project: str = "hope_dist"
    progress: bool = True
    memory_health: bool = True  # probe the fast weights at every log step (model/memory_health.py)


@dataclass
class JobConfig:
    run_dir: str = "runs/default"
    model: ModelConfig = field(default_factory=ModelConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    data: DataConfig = field(default_factory=DataConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)

    def validate(self) -> "JobConfig":
        validate(self)
        return self

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _choice(key: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ConfigError(f"{key}={value!r} is not one of {', '.join(allowed)}")


def _positive(key: str, value: float) -> None:
    if value is None or value < 1:
        raise ConfigError(f"{key}={value!r} must be >= 1")


def _validate_optim(o: OptimConfig) -> None:
    _choice("optim.name", o.name, ("adamw", "m3"))
    _choice("optim.precondition", o.precondition, ("before_ns", "after_ns"))
    for key in ("beta1", "beta2", "beta3"):
        value = getattr(o, key)
        if not 0 <= value < 1:
            raise ConfigError(f"optim.{key}={value} must be in [0, 1): it is a decay factor, e.g. 0.9")
    if o.alpha < 0:
        raise ConfigError(f"optim.alpha={o.alpha} must be >= 0: the slow momentum's weight (0 turns it off)")
    if o.ns_steps < 1:
        raise ConfigError(f"optim.ns_steps={o.ns_steps} must be >= 1: Newton-Schulz iterations, 5 as in Muon")
    if o.slow_every < 1:
        raise ConfigError(f"optim.slow_every={o.slow_every} must be >= 1: the slow momentum's period f, in each "
                          "matrix's own steps (1 refreshes it every step)")


def _validate_cms_in_context(m: ModelConfig, seq_len: int) -> None:
    for i, level in enumerate(m.cms):
        key = f"model.cms[{i}].chunk_size"
        if level.chunk_size < 0:
            raise ConfigError(f"{key}={level.chunk_size} must be >= 0 (0: the level does not learn in context)")
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
    if not 0 < m.cms_inner_lr <= 1:
        raise ConfigError(f"model.cms_inner_lr={m.cms_inner_lr} must be in (0, 1]: the normalised in-context step "
                          "(above 1 a step can overshoot along the chunk's dominant key direction)")


def _validate_engine(cfg: JobConfig) -> None:
    """parallel.engine=deepspeed: the layouts and settings the DeepSpeed path keeps the clocks' guarantees in."""
    p = cfg.parallel
    _choice("parallel.engine", p.engine, ("native", "deepspeed"))
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
    if p.ds_config is not None:  # its keys, before any process starts
        from hope_dist.parallel.deepspeed_engine import deepspeed_config
        deepspeed_config(cfg)


def validate(cfg: JobConfig) -> None:
    """Check cross-field constraints; every message names the key and the fix."""
    m = cfg.model
    _choice("model.mixer", m.mixer, ("selfmod", "titans", "attention"))
    _choice("model.kernel", m.kernel, ("auto", "triton", "torch", "naive"))
    for key in ("vocab_size", "d_model", "n_layers", "n_heads", "chunk_size", "proj_chunk_size", "conv_width"):
        _positive(f"model.{key}", getattr(m, key))
    if m.d_model % m.n_heads:
        raise ConfigError(
            f"model.n_heads={m.n_heads} does not divide model.d_model={m.d_model}: "
            f"pick n_heads from the divisors of d_model")
    if m.memory_depth not in (1, 2):
        raise ConfigError(f"model.memory_depth={m.memory_depth} must be 1 (linear) or 2 (residual MLP)")
    if m.memory_w1_std is not None and not m.memory_w1_std > 0:
        raise ConfigError(f"model.memory_w1_std={m.memory_w1_std} must be > 0 (or null for model.init_std)")
    if not 0 < m.alpha_init < 1:
        raise ConfigError(f"model.alpha_init={m.alpha_init} must be in (0, 1): the initial retention per token")
    if m.memory_hidden is not None:
        _positive("model.memory_hidden", m.memory_hidden)
    if m.proj_chunk_size % m.chunk_size:
        raise ConfigError(
            f"model.proj_chunk_size={m.proj_chunk_size} must be a multiple of model.chunk_size={m.chunk_size}")
    if not m.cms:
        raise ConfigError("model.cms is empty: give at least one CMS level (width, period)")
    for i, level in enumerate(m.cms):
        _positive(f"model.cms[{i}].width", level.width)
        if level.period < 1:
            raise ConfigError(f"model.cms[{i}].period={level.period} must be >= 1 (1 = every step)")
        if level.lr_scale <= 0:
            raise ConfigError(f"model.cms[{i}].lr_scale={level.lr_scale} must be > 0")
    _validate_cms_in_context(m, cfg.training.seq_len)
    t = cfg.training
    for key in ("steps", "seq_len", "global_batch", "micro_batch"):
        _positive(f"training.{key}", getattr(t, key))
    if not 0 <= t.seed < 2**63:
        raise ConfigError(f"training.seed={t.seed} must be >= 0 and < 2**63 (numpy and torch seeds)")
    _choice("training.mixed_precision", t.mixed_precision, ("auto", "bf16", "fp32"))
    _choice("training.nonfinite", t.nonfinite, ("stop", "skip"))
    p = cfg.parallel
    for key in ("pp", "dp_replicate", "dp_shard", "tp", "pp_microbatches"):
        _positive(f"parallel.{key}", getattr(p, key))
    _choice("parallel.pp_schedule", p.pp_schedule, ("1f1b", "gpipe", "interleaved_1f1b"))
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
    _validate_engine(cfg)
    if cfg.optim.lr <= 0:
        raise ConfigError(f"optim.lr={cfg.optim.lr} must be > 0")
    _validate_optim(cfg.optim)
    if cfg.data.weights is not None and len(cfg.data.weights) != len(cfg.data.paths):
        raise ConfigError(
            f"data.weights has {len(cfg.data.weights)} entries but data.paths has "
            f"{len(cfg.data.paths)}: give one weight per path")
    d, e = cfg.data, cfg.eval
    if not 0 <= d.valid_fraction < 1:
        raise ConfigError(f"data.valid_fraction={d.valid_fraction} must be in [0, 1): the share of training "
                          "documents held out for validation")
    if d.valid_fraction > 0 and d.valid_paths:
        raise ConfigError("data.valid_paths and data.valid_fraction are both set: hold out documents of the "
                          "training data (valid_fraction) or use separate files (valid_paths), not both")
    if e.every < 0:
        raise ConfigError(f"eval.every={e.every} must be >= 0 (0 turns validation off)")
    _positive("eval.tokens", e.tokens)
    if e.every > 0 and not d.valid_paths and d.valid_fraction == 0:
        raise ConfigError(f"eval.every={e.every} needs validation data: set data.valid_fraction (e.g. 0.01) "
                          "or data.valid_paths, or set eval.every=0")
    if cfg.checkpoint.keep_last < 1:
        raise ConfigError(f"checkpoint.keep_last={cfg.checkpoint.keep_last} must be >= 1")
    _choice("checkpoint.on_save_error", cfg.checkpoint.on_save_error, ("stop", "continue"))


# ---------------------------------------------------------------------------------------------
# Building dataclasses from nested dicts, with typed coercion and named errors.

def _coerce(key: str, tp: Any, value: Any) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            return None
        return _coerce(key, args[0], value)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{key} must be a mapping, got {value!r}")
        return from_dict(tp, value, prefix=key)
    if origin is list:
        (item,) = typing.get_args(tp)
        if isinstance(value, str):
            value = yaml.safe_load(value)
        if not isinstance(value, list):
            raise ConfigError(f"{key} must be a list, got {value!r}")
        return [_coerce(f"{key}[{i}]", item, v) for i, v in enumerate(value)]
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        raise ConfigError(f"{key} must be true or false, got {value!r}")
    if tp in (int, float):
        try:  # YAML reads yes/no/true/false as booleans: never take them for 1 and 0
            if isinstance(value, bool) or (tp is int and isinstance(value, float) and not value.is_integer()):
                raise ValueError
            number = tp(float(value)) if tp is int else tp(value)
        except (TypeError, ValueError, OverflowError):
            raise ConfigError(f"{key} must be {tp.__name__}, got {value!r}") from None
        if not math.isfinite(number):
            raise ConfigError(f"{key}={value!r} must be a finite number")
        return number
    if tp is str:
        return str(value)
    return value


def from_dict(cls: type, data: dict[str, Any], prefix: str = "") -> Any:
    """Build dataclass `cls` from a (nested) dict; unknown keys are errors naming the key."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        full = f"{prefix}.{key}" if prefix else key
        if key not in names:
            raise ConfigError(
                f"unknown config key {full!r}; valid keys here: {', '.join(sorted(names))}")
        kwargs[key] = _coerce(full, hints[key], value)
    return cls(**kwargs)


def _set_path(tree: dict, dotted: str, value: str) -> None:
    parts = dotted.split(".")
    node = tree
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"--{dotted}: {part!r} is not a section")
        node = child
    node[parts[-1]] = _load_yaml(value, f"--{dotted}={value!r}") if value != "" else ""


def _load_yaml(text: str, where: str) -> Any:
    """yaml.safe_load, with an error naming `where` (a file or an override) and the position."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(f"{where} is not valid YAML{at} ({problem}): close its brackets and quotes, or quote "
                          f"the whole value") from None


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
        tree = _load_yaml(text, f"config file {str(path)!r}") or {}
        if not isinstance(tree, dict):
            raise ConfigError(f"config file {str(path)!r} must hold a mapping at the top level")
    for arg in overrides:
        if not arg.startswith("--") or "=" not in arg:
            raise ConfigError(f"override {arg!r} must look like --key.sub=value")
        key, value = arg[2:].split("=", 1)
        _set_path(tree, key, value)
    return from_dict(JobConfig, tree).validate()


def parse_args(argv: list[str]) -> JobConfig:
    """`--config PATH`, `--resume[=auto|never|PATH]`, then `--key.sub=value` overrides."""
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
            raise SystemExit(
                "usage: pretrain.py --config configs/tiny.yaml [--resume[=auto|never|DIR]] "
                "[--key.sub=value ...]\nkeys: " + ", ".join(f.name for f in dataclasses.fields(JobConfig)))
        else:
            overrides.append(arg)
    return load_config(config_path, overrides)
