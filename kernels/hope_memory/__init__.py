"""The HOPE memory op (docs/model.md section 2): self-modifying Titans memories, read per token.

Conventions this op fixes where the spec leaves them open (all paths follow them):
- Memory order on the n_mem axis: (k, v, eta, alpha, o) for selfmod, (o,) for titans (types.py).
  A depth-1 memory is M(z) = W z (no residual); depth 2 is M(z) = z + W1 silu(W2 z).
- l2norm(x) = x / sqrt(||x||^2 + 1e-6) (common.l2norm), for the self-modifying k and v.
- titans has no self-generated targets: vhat = v whatever `selfgen` says, and v keeps its gradient.
  With selfmod, `stopgrad_vhat` detaches only self-generated targets (selfgen=True).
- gamma = sigmoid(params.gamma) is a constant per head; momenta start at 0 unless initial_state
  carries them, and the state carries them (s1, s2) exactly when momentum is on.
- Chunks are counted from the start of every call (and of every packed document): a state passed
  between calls carries no chunk phase, so two segments equal one long sequence when the first
  segment's length is a multiple of proj_chunk_size. The last chunk of a sequence may be short.
- The PyTorch paths (naive, torch) compute in float32 for 16-bit inputs, outside autocast.
- proj_chunk_size must be a multiple of chunk for titans too (where it has no other effect). Packed
  documents (cu_seqlens) must be non-empty, on every path.
- Inputs are validated once, here, for every path (errors name the argument and the fix); the
  paths themselves trust their arguments. impl="triton" adds its own limits to the same check:
  d_h and d_m powers of two >= 16 and float32/bfloat16/float16 inputs.
- The chunked path clamps alpha to the dtype's smallest normal number before taking its log, so
  alpha must be > 0 for it to match the reference exactly (sigmoid outputs are). The values of
  eta and alpha are not range-checked (that would need a device sync).
- No host-device synchronisation inside the op: packed offsets come twice, on q's device
  (`cu_seqlens`) and on the host (`cu_seqlens_cpu`, int CPU tensor, with `max_seqlen`, the longest
  document; flash-linear-attention's and flash-attn's conventions). The host copy is read for the
  checks and loop bounds; without it, a CPU `cu_seqlens` is its own host copy and a GPU one is copied
  once (one sync per call; hope_dist's Segments carry the host copy, made once per batch). Under
  torch.compile the host values are not read (that would break the graph): `max_seqlen` must be
  given, and the offsets are trusted as validated where they were made.
"""
from __future__ import annotations

import torch

from .torch_chunked import torch_chunked_hope_memory
from .common import l2norm
from .naive import naive_hope_memory
from .types import MEMORY_NAMES, MemoryParams, MemoryState

__all__ = ["MEMORY_NAMES", "MemoryParams", "MemoryState", "has_triton_path", "hope_memory", "l2norm"]

IMPLS = ("naive", "torch", "triton")
TRITON_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# options only the PyTorch paths implement so far, with the default at which the Triton kernels run
TORCH_ONLY = {"retain_init": False, "bound_step": False, "proj_rate": 1.0, "rate_norm": False, "w2_delta": True}


def has_triton_path(options: dict, per_memory_inputs: bool = False, given_rates: bool = False) -> bool:
    """Whether the Triton kernels implement a call with these keyword arguments of hope_memory (others are
    ignored), per-memory inputs a (B, T, 4, H, d_h), and selfmod rates given by the caller."""
    return not (per_memory_inputs or given_rates) and all(options.get(n, d) == d for n, d in TORCH_ONLY.items())


def hope_memory(
    q: torch.Tensor,
    params: MemoryParams,
    *,
    a: torch.Tensor | None = None,
    k: torch.Tensor | None = None,
    v: torch.Tensor | None = None,
    eta: torch.Tensor | None = None,
    alpha: torch.Tensor | None = None,
    initial_state: MemoryState | None = None,
    output_final_state: bool = False,
    cu_seqlens: torch.Tensor | None = None,
    cu_seqlens_cpu: torch.Tensor | None = None,
    max_seqlen: int | None = None,
    chunk_size: int = 64,
    proj_chunk_size: int = 64,
    eta_max: float = 1.0,
    proj_rate: float = 1.0,
    selfgen: bool = True,
    stopgrad_vhat: bool = True,
    w1_delta: bool = True,
    w2_delta: bool = True,
    retain_init: bool = False,
    bound_step: bool = False,
    rate_norm: bool = False,
    impl: str = "torch",
) -> tuple[torch.Tensor, MemoryState | None]:
    """o_t = M_{o,t}(q_t), per head, inclusive of token t's own write.

    q: (B, T, H, d_h), conv+SiLU'd and L2-normalised by the model. Variant from params:
    n_mem = 5 (selfmod: give `a`, (B, T, H, d_h), or (B, T, 4, H, d_h): one input per projection
    memory k, v, eta, alpha; and eta, alpha (B, T, H) when params has no eta_w, eta_b, alpha_w, alpha_b:
    rates read out of the input, not of M_eta, M_alpha) or 1 (titans: give k, v (B, T, H, d_h),
    L2-normalised, and eta in [0, eta_max], alpha in [0, 1], (B, T, H)). Depth 1 iff params.w1 is
    None; momentum iff params.gamma is not None. initial_state: None starts from the params'
    weights with zero momenta. cu_seqlens: (N+1,) int offsets of packed documents (B = 1); every
    document starts from its own state (initial_state batch N, or the params) and the final state
    has batch N. cu_seqlens_cpu: the same offsets on the host (saves the device sync that reading
    them would need); max_seqlen: the longest document (computed from the host offsets when None;
    required under torch.compile). chunk_size: M_o's chunk length;
    proj_chunk_size (a multiple of chunk_size): the projection memories'.
    proj_rate (selfmod, in [0, 1]): the share of each update the projection memories take (their eta
    scaled by it and so is 1 - alpha; common.proj_rates); 0 freezes them at M_0, 1 is the spec.
    selfgen: vhat_* = M_{*,c}(v_t) (selfmod only); stopgrad_vhat detaches those targets.
    w1_delta (depth 2): W1 follows the delta rule along its unit input l2norm(h) (the default, stable;
    docs/memory_op.md), else the spec's gated update alpha W1 - eta S1.
    w2_delta: W2 (depth 1: the memory's W) takes the spec's factor (alpha I - eta k k^T) (the default), else
    gradient descent with retention alpha W2 - eta S2 (at depth 2 the factor erases the hidden
    features of the key just written; at depth 1, false is the plain delta rule: docs/model.md 2.10).
    retain_init: retention alpha decays the deviation from the memories' initial weights M_0 (the
    params' w1, w2), W_t = (rule's W_t) + (1 - alpha_t) M_0, instead of the weights themselves.
    bound_step: each token's inner gradient is divided by the inner loss's curvature along it when that
    exceeds 1 (common.bound_inner_step), so no write overshoots (issue 25's Titans runaway).
    rate_norm (selfmod): eta and alpha read M_eta's and M_alpha's outputs RMS-normalised (common.projections).
    impl: "naive" (per-token reference), "torch" (chunked PyTorch) or "triton" (kernels.hope_memory.chunk).
    Returns (o (B, T, H, d_h), final MemoryState if output_final_state else None).
    """
    flags = dict(output_final_state=output_final_state, selfgen=selfgen, stopgrad_vhat=stopgrad_vhat,
                 w1_delta=w1_delta, w2_delta=w2_delta, retain_init=retain_init, bound_step=bound_step,
                 rate_norm=rate_norm)
    max_seqlen = _check_inputs(q, params, a, k, v, eta, alpha, initial_state, cu_seqlens, cu_seqlens_cpu,
                               max_seqlen, chunk_size, proj_chunk_size, eta_max, proj_rate, impl, flags)
    kwargs = dict(a=a, k=k, v=v, eta=eta, alpha=alpha, initial_state=initial_state,
                  output_final_state=output_final_state, cu_seqlens=cu_seqlens, max_seqlen=max_seqlen,
                  chunk_size=chunk_size, proj_chunk_size=proj_chunk_size, eta_max=eta_max, proj_rate=proj_rate,
                  selfgen=selfgen, stopgrad_vhat=stopgrad_vhat, w1_delta=w1_delta, w2_delta=w2_delta,
                  retain_init=retain_init, bound_step=bound_step, rate_norm=rate_norm)
    if impl == "triton":
        from .chunk import chunk_hope_memory

        return chunk_hope_memory(q, params, **{n: x for n, x in kwargs.items() if n not in TORCH_ONLY})
    if impl == "naive":
        kwargs["cu_seqlens"] = _host_offsets(cu_seqlens, cu_seqlens_cpu)
        return _run_torch(naive_hope_memory, q, params, {n: x for n, x in kwargs.items() if n != "max_seqlen"})
    return _run_torch(torch_chunked_hope_memory, q, params, kwargs)


def _host_offsets(cu_seqlens, cu_seqlens_cpu):
    """The packed offsets on the host: the given copy, a CPU cu_seqlens itself, or (one sync) a copy."""
    if cu_seqlens is None:
        return None
    if cu_seqlens_cpu is not None:
        return cu_seqlens_cpu
    return cu_seqlens if cu_seqlens.device.type == "cpu" else cu_seqlens.cpu()


def _run_torch(fn, q, params, kwargs):
    """The PyTorch paths compute in float32 for 16-bit inputs (solve_triangular has no 16-bit
    kernel, and a recurrence should not accumulate in bf16) and ignore autocast; o and the final
    state come back in q's dtype."""
    dtype = torch.float32 if q.dtype in (torch.float16, torch.bfloat16) else q.dtype
    cast = lambda x: x.to(dtype) if isinstance(x, torch.Tensor) and x.is_floating_point() else x
    with torch.autocast(q.device.type, enabled=False):
        state = kwargs["initial_state"]
        kwargs = {**{n: cast(x) for n, x in kwargs.items()},
                  "initial_state": None if state is None else MemoryState(*map(cast, state))}
        o, final = fn(cast(q), MemoryParams(*map(cast, params)), **kwargs)
    if final is not None:
        final = MemoryState(*(None if x is None else x.to(q.dtype) for x in final))
    return o.to(q.dtype), final


def _check_shape(name: str, x, shape: tuple, ref: torch.Tensor) -> None:
    if x is None:
        raise ValueError(f"{name} is required here: expected a tensor of shape {shape}")
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape {shape}, got {type(x).__name__}")
    if tuple(x.shape) != shape:
        raise ValueError(f"{name} has shape {tuple(x.shape)}, expected {shape}")
    if x.dtype != ref.dtype or x.device != ref.device:
        raise ValueError(f"{name} is {x.dtype} on {x.device}; it must match q ({ref.dtype} on {ref.device})")


def _check_absent(name: str, x, why: str) -> None:
    if x is not None:
        raise ValueError(f"{name} must be None {why}")


def _check_selfmod_rates(params: MemoryParams, eta, alpha, q) -> None:
    """selfmod's eta and alpha: read out of M_eta, M_alpha (params.eta_w, ... given, eta and alpha None) or
    given by the caller (eta and alpha (B, T, H), no read-out params)."""
    batch, seq, heads, d_h = q.shape
    given = eta is not None or alpha is not None
    for name in ("eta_w", "eta_b", "alpha_w", "alpha_b"):
        p = getattr(params, name)
        if given:
            _check_absent(f"params.{name}", p, "when selfmod's eta and alpha are given (rates read out of the input)")
        else:
            _check_shape(f"params.{name}", p, (heads, d_h) if name.endswith("_w") else (heads,), q)
    if given:
        for name, x in (("eta", eta), ("alpha", alpha)):
            _check_shape(f"{name} (selfmod, given rates)", x, (batch, seq, heads), q)


def _check_inputs(q, params, a, k, v, eta, alpha, initial_state, cu_seqlens, cu_seqlens_cpu, max_seqlen,
                  chunk_size, proj_chunk_size, eta_max, proj_rate, impl, flags: dict) -> int | None:
    """Every shape, dtype and flag combination, with errors naming the argument, and the limits of
    the chosen impl: the one validation of the op, for every path. Reads packed offsets only on the
    host; returns max_seqlen (None without cu_seqlens)."""
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    for name, flag in flags.items():
        if not isinstance(flag, bool):
            raise TypeError(f"{name} must be a bool, got {flag!r}")
    if not isinstance(q, torch.Tensor) or q.dim() != 4 or not q.is_floating_point():
        raise ValueError("q must be a floating-point tensor of shape (B, T, H, d_h)")
    if not isinstance(params, MemoryParams):
        raise TypeError(f"params must be a MemoryParams, got {type(params).__name__}")
    batch, seq, heads, d_h = q.shape
    if seq == 0:
        raise ValueError("q has T = 0 tokens; the op needs at least one")
    if params.w2.dim() != 4:
        raise ValueError(f"params.w2 must be (n_mem, H, d_m, d_h), got shape {tuple(params.w2.shape)}")
    n_mem, d_m = params.w2.shape[0], params.w2.shape[2]
    if n_mem not in (1, 5):
        raise ValueError(f"params.w2 has n_mem = {n_mem}; expected 5 (selfmod) or 1 (titans)")
    if params.w1 is None:
        _check_shape("params.w2 (depth 1)", params.w2, (n_mem, heads, d_h, d_h), q)
    else:
        _check_shape("params.w2", params.w2, (n_mem, heads, d_m, d_h), q)
        _check_shape("params.w1", params.w1, (n_mem, heads, d_h, d_m), q)
    if n_mem == 5:
        a_shape = (batch, seq, heads, d_h) if a is None or a.dim() != 5 else (batch, seq, 4, heads, d_h)
        _check_shape("a (selfmod, n_mem = 5)", a, a_shape, q)
        for name, x in (("k", k), ("v", v)):
            _check_absent(name, x, "for selfmod (n_mem = 5): the projection memories produce it from a")
        _check_selfmod_rates(params, eta, alpha, q)
    else:
        _check_absent("a", a, "for titans (n_mem = 1): give k, v, eta, alpha instead")
        for name, x in (("k", k), ("v", v)):
            _check_shape(f"{name} (titans, n_mem = 1)", x, (batch, seq, heads, d_h), q)
        for name, x in (("eta", eta), ("alpha", alpha)):
            _check_shape(f"{name} (titans, n_mem = 1)", x, (batch, seq, heads), q)
        for name in ("eta_w", "eta_b", "alpha_w", "alpha_b"):
            _check_absent(f"params.{name}", getattr(params, name), "for titans (n_mem = 1): it has no M_eta/M_alpha")
    if params.gamma is not None:
        _check_shape("params.gamma", params.gamma, (heads,), q)
    if not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
    if not isinstance(proj_chunk_size, int) or proj_chunk_size < 1 or proj_chunk_size % chunk_size:
        raise ValueError(f"proj_chunk_size must be a positive multiple of chunk_size = {chunk_size}, "
                         f"got {proj_chunk_size!r}")
    if not eta_max >= 0:
        raise ValueError(f"eta_max must be >= 0, got {eta_max!r}")
    if not 0 <= proj_rate <= 1:
        raise ValueError(f"proj_rate must be in [0, 1], got {proj_rate!r}")
    n_seq = batch
    if cu_seqlens is not None:
        if (not isinstance(cu_seqlens, torch.Tensor) or cu_seqlens.dim() != 1
                or cu_seqlens.dtype not in (torch.int32, torch.int64)):
            raise ValueError("cu_seqlens must be a 1-D int32/int64 tensor of document offsets (N+1,)")
        if batch != 1:
            raise ValueError(f"cu_seqlens needs packed input with B = 1, got B = {batch}")
        if cu_seqlens.device != q.device:
            raise ValueError(f"cu_seqlens is on {cu_seqlens.device}; it must be on q's device {q.device}")
        if cu_seqlens.numel() < 2:
            raise ValueError(f"cu_seqlens must hold at least 2 offsets (0 and T = {seq})")
        n_seq = cu_seqlens.numel() - 1
        if cu_seqlens_cpu is not None and (
                not isinstance(cu_seqlens_cpu, torch.Tensor) or cu_seqlens_cpu.device.type != "cpu"
                or cu_seqlens_cpu.shape != cu_seqlens.shape or cu_seqlens_cpu.is_floating_point()):
            raise ValueError("cu_seqlens_cpu must be an int CPU tensor with cu_seqlens' shape (N+1,): "
                             "the same offsets on the host")
        if max_seqlen is not None and (not isinstance(max_seqlen, int) or max_seqlen < 1):
            raise ValueError(f"max_seqlen must be a positive int (the longest document), got {max_seqlen!r}")
        if torch.compiler.is_compiling():  # host values would break the graph; trusted as made
            if max_seqlen is None:
                raise ValueError("under torch.compile, packed input needs max_seqlen (an int): "
                                 "reading the offsets would break the graph")
        else:
            cu = _host_offsets(cu_seqlens, cu_seqlens_cpu).tolist()
            if cu[0] != 0 or cu[-1] != seq or any(e <= s for s, e in zip(cu[:-1], cu[1:])):
                raise ValueError(f"cu_seqlens must rise strictly from 0 to T = {seq} (no empty documents), got {cu}")
            longest = max(e - s for s, e in zip(cu[:-1], cu[1:]))
            if max_seqlen is not None and max_seqlen < longest:
                raise ValueError(f"max_seqlen = {max_seqlen} is shorter than the longest document ({longest})")
            max_seqlen = longest if max_seqlen is None else max_seqlen
    elif cu_seqlens_cpu is not None or max_seqlen is not None:
        raise ValueError("cu_seqlens_cpu and max_seqlen go with cu_seqlens (packed input); it is None")
    if initial_state is not None:
        _check_state(initial_state, params, n_seq, q)
    if impl == "triton":
        _check_triton(q, params)
        if not has_triton_path({**flags, "proj_rate": proj_rate}, a is not None and a.dim() == 5,
                               a is not None and eta is not None):
            raise ValueError(f"{', '.join(TORCH_ONLY)} away from their defaults, per-memory inputs a (B, T, 4, H, "
                             'd_h) and selfmod with given eta, alpha have no Triton kernel yet: use impl="torch"')
    return max_seqlen


def _check_triton(q: torch.Tensor, params: MemoryParams) -> None:
    """The Triton kernels' own limits, on inputs that passed _check_inputs (so params and any
    initial_state already agree with q and with each other)."""
    if q.dtype not in TRITON_DTYPES:
        raise ValueError(f"q is {q.dtype}; the Triton kernels take float32, bfloat16 or float16: "
                         'cast the inputs or use impl="torch"')
    d_h = q.shape[-1]
    d_m = d_h if params.w1 is None else params.w2.shape[2]
    for name, d in (("d_h (q's last axis)", d_h), ("d_m (params.w2's third axis)", d_m)):
        if d < 16 or d & (d - 1):
            raise ValueError(f"{name} = {d}: the Triton kernels need a power of two >= 16; "
                             'use impl="torch" for other sizes')


def _check_state(state, params: MemoryParams, n_seq: int, q: torch.Tensor) -> None:
    if not isinstance(state, MemoryState):
        raise TypeError(f"initial_state must be a MemoryState, got {type(state).__name__}")
    what = "the number of documents in cu_seqlens" if n_seq != q.shape[0] else "B"
    w2_shape = (n_seq, *params.w2.shape)
    _check_shape(f"initial_state.w2 (batch = {what})", state.w2, w2_shape, q)
    momentum = params.gamma is not None
    for name in ("w1", "s1", "s2"):
        x = getattr(state, name)
        ref = params.w1 if name != "s2" else params.w2
        wanted = ref is not None and (name == "w1" or momentum)
        if not wanted:
            why = "(depth 1: params.w1 is None)" if ref is None else "(momentum off: params.gamma is None)"
            _check_absent(f"initial_state.{name}", x, why)
        else:
            _check_shape(f"initial_state.{name} (batch = {what})", x, (n_seq, *ref.shape), q)
