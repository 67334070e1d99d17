"""The Triton path of the HOPE memory op (kernels/hope_memory/chunk.py, reached through the public
`hope_memory(..., impl="triton")`, which validates its inputs) against the per-token reference:
outputs, final state and the gradient of every input, on CPU under the Triton interpreter (float32
kernels vs the float64 reference), and bf16 on a GPU when one is there. Every case runs the
default W1 delta rule (w1_delta=True) unless it names the gated update; momentum cases add a
per-head gamma and, with a given state, random initial momenta."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():  # must precede the first @triton.jit definition
    os.environ.setdefault("TRITON_INTERPRET", "1")
pytest.importorskip("triton")

from kernels.hope_memory import MemoryParams, MemoryState, hope_memory, l2norm  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def make_problem(variant="selfmod", depth=2, batch=2, seq=63, heads=2, d_h=16, d_m=None, docs=None,
                 given_state=False, momentum=False, seed=0):
    """Float64 inputs in a realistic regime (eta about 0.05-0.3, alpha about 0.95-1) so the fast
    weights neither vanish nor blow up and every error stays visible. Returns (q, params,
    inputs, initial_state or None); docs: document lengths packed into one row (batch 1)."""
    gen = torch.Generator().manual_seed(seed)
    d_m = d_m or d_h
    randn = lambda *shape, scale=1.0, shift=0.0: torch.randn(*shape, generator=gen, dtype=torch.float64) * scale + shift
    uniform = lambda low, high, *shape: low + (high - low) * torch.rand(*shape, generator=gen, dtype=torch.float64)
    n_mem = 5 if variant == "selfmod" else 1
    w2 = randn(n_mem, heads, d_m if depth == 2 else d_h, d_h, scale=d_h ** -0.5)
    w1 = randn(n_mem, heads, d_h, d_m, scale=0.5 * d_m ** -0.5) if depth == 2 else None
    shape = (batch, seq, heads, d_h)
    if variant == "selfmod":
        params = MemoryParams(w1, w2, randn(heads, d_h, scale=0.3), randn(heads, scale=0.3, shift=-2.0),
                              randn(heads, d_h, scale=0.3), randn(heads, scale=0.3, shift=4.0))
        inputs = {"a": torch.nn.functional.silu(randn(*shape))}
    else:
        params = MemoryParams(w1, w2)
        inputs = {"k": l2norm(randn(*shape)), "v": l2norm(randn(*shape)),
                  "eta": uniform(0.05, 0.3, *shape[:3]), "alpha": uniform(0.95, 1.0, *shape[:3])}
    if momentum:
        params = params._replace(gamma=randn(heads, shift=1.0))
    n_seq = batch if docs is None else len(docs)
    state = None
    if given_state:
        noisy = lambda x: None if x is None else x.expand(n_seq, *x.shape) + randn(n_seq, *x.shape, scale=0.1)
        state = MemoryState(noisy(w1), noisy(w2))
        if momentum:
            small = lambda x: None if x is None else randn(n_seq, *x.shape, scale=0.1 / x.shape[-1] ** 0.5)
            state = state._replace(s1=small(w1), s2=small(w2))
    return l2norm(randn(*shape)), params, inputs, state


def cast(x, dtype):
    if isinstance(x, MemoryParams | MemoryState):
        return type(x)(*(cast(t, dtype) for t in x))
    return None if x is None else x.to(DEVICE, dtype)


def forward_backward(impl, dtype, q, params, inputs, state, seed=1, **kwargs):
    """Outputs, final state and {leaf name: gradient} under random upstream gradients of o and
    of the final state. Computed in `dtype` on DEVICE from the float64 problem."""
    q, params, state = cast(q, dtype), cast(params, dtype), cast(state, dtype)
    inputs = {n: cast(x, dtype) for n, x in inputs.items()}
    leaves = {"q": q, **inputs}
    leaves.update({f"params.{n}": x for n, x in params._asdict().items() if x is not None})
    if state is not None:
        leaves.update({f"state.{n}": x for n, x in state._asdict().items() if x is not None})
        leaves = {n: x for n, x in leaves.items() if n not in ("params.w1", "params.w2")}
    for x in leaves.values():
        x.requires_grad_(True)
    o, final = hope_memory(q, params, **inputs, initial_state=state, output_final_state=True, impl=impl, **kwargs)
    gen = torch.Generator().manual_seed(seed)
    outs = [o] + [x for x in final if x is not None]
    upstream = [torch.randn(x.shape, generator=gen, dtype=torch.float64).to(x) for x in outs]
    grads = torch.autograd.grad(outs, list(leaves.values()), upstream)
    return o.detach(), MemoryState(*(None if x is None else x.detach() for x in final)), dict(zip(leaves, grads))


def rel_rms(actual, expected) -> float:
    return ((actual.double().cpu() - expected.double().cpu()).norm() / expected.double().cpu().norm()).item()


def assert_matches(got, want, tol_out, tol_grad):
    (o, state, grads), (o_ref, state_ref, grads_ref) = got, want
    errors = {"o": rel_rms(o, o_ref)}
    for name, x, ref in zip(MemoryState._fields, state, state_ref):
        assert (x is None) == (ref is None), f"final state {name}: one path returned None"
        if x is not None:
            errors[f"final.{name}"] = rel_rms(x, ref)
    assert grads.keys() == grads_ref.keys()
    bad = [f"{n}: {e:.2e}" for n, e in errors.items() if not e <= tol_out]
    for name, g in grads.items():
        err = rel_rms(g, grads_ref[name])
        if not err <= tol_grad:
            bad.append(f"grad {name}: {err:.2e}")
    assert not bad, "relative RMS errors over tolerance: " + ", ".join(bad)


CASES = {  # name: (make_problem kwargs, op kwargs); small enough for the CPU interpreter
    "selfmod-T63-d16-C16x2": (dict(batch=1), dict(chunk_size=16, proj_chunk_size=32)),
    "selfmod-T100-d32-dm16-C32x2-etamax": (dict(batch=1, seq=100, heads=1, d_h=32, d_m=16),
                                           dict(chunk_size=32, proj_chunk_size=64, eta_max=0.5)),
    "selfmod-depth1-T63-C8x2-v": (dict(depth=1, batch=1, heads=1), dict(chunk_size=8, proj_chunk_size=16,
                                                                        selfgen=False)),
    "selfmod-packed3-nosg-state": (dict(batch=1, seq=99, heads=1, docs=(21, 37, 41), given_state=True),
                                   dict(chunk_size=16, proj_chunk_size=16, stopgrad_vhat=False)),
    "selfmod-gated-T40-C8x2": (dict(batch=1, seq=40, heads=1), dict(chunk_size=8, proj_chunk_size=16,
                                                                     w1_delta=False)),
    "selfmod-momentum-packed2-state-C8x2": (dict(batch=1, seq=32, heads=1, docs=(13, 19), given_state=True,
                                                 momentum=True), dict(chunk_size=8, proj_chunk_size=16)),
    "titans-T100-C16-state": (dict(variant="titans", seq=100, given_state=True), dict(chunk_size=16)),
    "titans-depth1-T63-C5x3": (dict(variant="titans", depth=1, heads=1), dict(chunk_size=5, proj_chunk_size=15)),
    "titans-momentum-T40-C16-state": (dict(variant="titans", seq=40, heads=1, given_state=True, momentum=True),
                                      dict(chunk_size=16)),
    "titans-momentum-packed3": (dict(variant="titans", batch=1, seq=63, heads=1, docs=(17, 30, 16), momentum=True),
                                dict(chunk_size=8, w1_delta=False)),
    "titans-depth1-momentum": (dict(variant="titans", depth=1, heads=1, seq=40, momentum=True),
                               dict(chunk_size=8, proj_chunk_size=16)),
}


@pytest.mark.parametrize("name", CASES)
def test_matches_reference(name):
    """float32 kernels == float64 naive reference, rel RMS <= 1e-4 (docs/model.md section 3)."""
    problem, op = CASES[name]
    docs = problem.get("docs")
    if docs is not None:
        op = dict(op, cu_seqlens=torch.tensor([0, *torch.tensor(docs).cumsum(0).tolist()], device=DEVICE))
    q, params, inputs, state = make_problem(**problem)
    got = forward_backward("triton", torch.float32, q, params, inputs, state, **op)
    want = forward_backward("naive", torch.float64, q, params, inputs, state, **op)
    assert_matches(got, want, 1e-4, 1e-4)


@pytest.mark.parametrize("chunk_size,proj_chunk_size", [(1, 2), (3, 9), (16, 16), (32, 64)])
def test_chunk_lengths_forward(chunk_size, proj_chunk_size):
    """Outputs and final state for chunk lengths below, at and above the 16-row tile."""
    q, params, inputs, _ = make_problem(batch=1, seq=40, heads=1)
    kw = dict(output_final_state=True, chunk_size=chunk_size, proj_chunk_size=proj_chunk_size)
    o, final = hope_memory(cast(q, torch.float32), cast(params, torch.float32),
                           **{n: cast(x, torch.float32) for n, x in inputs.items()}, **kw, impl="triton")
    o_ref, final_ref = hope_memory(q, params, **inputs, **kw, impl="naive")
    assert rel_rms(o, o_ref) <= 1e-4
    assert rel_rms(final.w1, final_ref.w1) <= 1e-4 and rel_rms(final.w2, final_ref.w2) <= 1e-4


def test_two_segments_equal_one():
    """Carrying the final state into a second call equals one long call (first segment a
    multiple of proj_chunk_size), and the public dispatch reaches the same kernels."""
    q, params, inputs, _ = make_problem(batch=1, seq=48, heads=1)
    q, params = cast(q, torch.float32), cast(params, torch.float32)
    inputs = {n: cast(x, torch.float32) for n, x in inputs.items()}
    kw = dict(output_final_state=True, chunk_size=8, proj_chunk_size=16, impl="triton")
    o, final = hope_memory(q, params, **inputs, **kw)
    first = {n: x[:, :32] for n, x in inputs.items()}
    second = {n: x[:, 32:] for n, x in inputs.items()}
    o1, mid = hope_memory(q[:, :32], params, **first, **kw)
    o2, end = hope_memory(q[:, 32:], params, **second, initial_state=mid, **kw)
    assert rel_rms(torch.cat([o1, o2], 1), o) <= 1e-6
    assert rel_rms(end.w2, final.w2) <= 1e-6 and rel_rms(end.w1, final.w1) <= 1e-6


def test_16bit_inputs():
    """bf16 inputs: float32 state and math inside, o and gradients in bf16 (CPU: the kernels
    upcast before every dot, which the interpreter needs)."""
    q, params, inputs, _ = make_problem(batch=1, seq=40, heads=1)
    rounded = lambda x: cast(cast(x, torch.bfloat16), torch.float64)
    q, params = rounded(q), cast(cast(params, torch.bfloat16), torch.float64)
    inputs = {n: rounded(x) for n, x in inputs.items()}
    got = forward_backward("triton", torch.bfloat16, q, params, inputs, None, chunk_size=8, proj_chunk_size=16)
    want = forward_backward("naive", torch.float64, q, params, inputs, None, chunk_size=8, proj_chunk_size=16)
    assert got[0].dtype == torch.bfloat16 and got[1].w2.dtype == torch.float32
    assert all(g.dtype == torch.bfloat16 for g in got[2].values())
    assert_matches(got, want, 5e-3, 1e-2)


def _triton_problem(**make):
    q, params, inputs, _ = make_problem(**make)
    return dict(q=q.float(), params=cast(params, torch.float32), a=inputs["a"].float(), chunk_size=16,
                proj_chunk_size=32)


@pytest.mark.parametrize("mutate,error,words", [
    (lambda p: p.update(_triton_problem(d_h=24)), ValueError, r"d_h .* = 24: .* power of two .* impl=\"torch\""),
    (lambda p: p.update(_triton_problem(d_m=48)), ValueError, r"d_m .* = 48: .* power of two"),
    (lambda p: p.update(q=p["q"].double(), a=p["a"].double(), params=cast(p["params"], torch.float64)),
     ValueError, "float32, bfloat16 or float16"),
    (lambda p: p.update(proj_chunk_size=24), ValueError, "multiple of chunk"),
    (lambda p: p.update(a=p["a"][:, :10]), ValueError, r"a \(selfmod, n_mem = 5\) has shape"),
    (lambda p: p.update(cu_seqlens=torch.tensor([0, 10, 63])), ValueError, "B = 1"),
])
def test_bad_input_is_named(mutate, error, words):
    """The public function's one check covers the Triton limits, naming the argument and the fix."""
    problem = _triton_problem()
    mutate(problem)
    with pytest.raises(error, match=words):
        hope_memory(problem.pop("q"), problem.pop("params"), **problem, impl="triton")


def test_empty_document_is_rejected_as_on_every_path():
    """Packed documents must be non-empty for the Triton path too (one check for all paths)."""
    problem = _triton_problem(batch=1)
    with pytest.raises(ValueError, match="no empty documents"):
        hope_memory(problem.pop("q"), problem.pop("params"), **problem, cu_seqlens=torch.tensor([0, 10, 10, 63]),
                    impl="triton")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("variant", ["selfmod", "titans"])
def test_bf16_on_gpu_matches_float32_reference(variant):
    """bf16 kernels vs the float32 reference: outputs <= 5e-3, gradients <= 1e-2 rel RMS. The
    caching allocator is filled with NaN first, so an element the kernels never write shows."""
    q, params, inputs, _ = make_problem(variant=variant, batch=2, seq=300, heads=4, d_h=64,
                                        momentum=variant == "titans")
    poison = torch.full((64 << 20,), float("nan"), device=DEVICE)
    del poison
    kw = dict(chunk_size=64, proj_chunk_size=128)  # the configs' defaults: W1 delta rule, titans with momentum
    got = forward_backward("triton", torch.bfloat16, q, params, inputs, None, **kw)
    want = forward_backward("naive", torch.float32, q, params, inputs, None, **kw)
    assert torch.isfinite(got[0]).all() and all(torch.isfinite(g).all() for g in got[2].values())
    assert_matches(got, want, 5e-3, 1e-2)


CONFIGS = Path(__file__).resolve().parents[2] / "configs"


@pytest.mark.parametrize("path", sorted(str(p.relative_to(CONFIGS)) for p in CONFIGS.rglob("*.yaml")))
def test_auto_picks_triton_on_cuda_for_every_config(path):
    """`model.kernel: auto` reaches the Triton kernels on CUDA for every shipped config with a memory
    mixer (momentum and W1's delta rule included), and its head width is one the kernels take."""
    from hope_dist.config import load_config

    cfg = load_config(CONFIGS / path).model
    if cfg.mixer == "attention":
        pytest.skip("attention mixer: no memory op")
    with torch.device("meta"):
        mixer = cfg.mixer_spec.build(cfg)
    assert mixer._kernel(torch.device("cuda")) == "triton"
    d_h = cfg.d_model // cfg.n_heads
    for d in (d_h, cfg.memory_hidden or d_h):
        assert d >= 16 and d & (d - 1) == 0, f"{path}: width {d} is not a power of two >= 16"
