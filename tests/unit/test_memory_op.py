"""The HOPE memory op (kernels.hope_memory, docs/model.md sections 2-3): the chunked PyTorch path
against the per-token reference, and the properties every path must have (causality, batching,
carried state, packed documents, the spec's conventions, input validation)."""
from __future__ import annotations

import itertools
from dataclasses import dataclass, replace

import pytest
import torch
import torch.nn.functional as F

from kernels.hope_memory import MemoryParams, MemoryState, hope_memory, l2norm

IMPLS = ("naive", "torch")
HEADS, D_H, D_M = 2, 8, 12


@dataclass(frozen=True)
class Case:
    variant: str = "selfmod"
    depth: int = 2
    momentum: bool = True
    selfgen: bool = True
    stopgrad: bool = True
    chunk_size: int = 4
    proj_mult: int = 2
    seq: int = 40
    dtype: torch.dtype = torch.float64
    given_state: bool = False
    w1_delta: bool = True
    w2_delta: bool = True  # false: W2 by gradient descent with retention, without the factor (alpha I - eta k k^T)
    retain_init: bool = False  # retention decays the deviation from M_0 (the params' weights)
    per_memory_a: bool = False  # selfmod: one input per projection memory, a (B, T, 4, H, d_h)
    bound_step: bool = False  # inner gradients bounded by their curvature
    proj_rate: float = 1.0  # selfmod: the projection memories' share of each update
    rate_norm: bool = False  # selfmod: eta and alpha read RMS-normalised memory outputs
    given_rates: bool = False  # selfmod: eta and alpha given (read out of the input), no read-out params


FACTORS = {
    "variant": ("selfmod", "titans"),
    "depth": (1, 2),
    "momentum": (False, True),
    "selfgen": (False, True),
    "stopgrad": (False, True),
    "chunk_size": (1, 3, 16, 64),
    "proj_mult": (1, 4),
    "seq": (63, 100, 256),
    "dtype": (torch.float64, torch.float32),
    "given_state": (False, True),
}


def covering_design(factors: dict) -> list[Case]:
    """Greedy pairwise covering array: every value of every factor meets every value of every
    other factor in at least one case (the full product is too slow for CPU CI)."""
    names = list(factors)
    rows = list(itertools.product(*factors.values()))

    def pairs(row):
        return {(i, row[i], j, row[j]) for i, j in itertools.combinations(range(len(names)), 2)}

    uncovered = set().union(*map(pairs, rows))
    chosen = []
    while uncovered:
        best = max(rows, key=lambda row: len(pairs(row) & uncovered))
        uncovered -= pairs(best)
        chosen.append(Case(**dict(zip(names, best))))
    return chosen


def make_problem(case: Case, batch: int = 2, seed: int = 0):
    """Random, well-conditioned inputs: realistic eta and alpha (titans: 0.01-0.1 and 0.99-1, as trained
    tiny models have), so the fast weights neither vanish nor blow up over 256 tokens and errors stay visible."""
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape, scale=1.0, shift=0.0):
        return torch.randn(*shape, generator=gen, dtype=torch.float64).mul(scale).add(shift).to(case.dtype)

    def uniform(low, high, *shape):
        return (low + (high - low) * torch.rand(*shape, generator=gen, dtype=torch.float64)).to(case.dtype)

    n_mem = 5 if case.variant == "selfmod" else 1
    d_out = D_M if case.depth == 2 else D_H
    w2 = randn(n_mem, HEADS, d_out, D_H, scale=D_H ** -0.5)
    w1 = randn(n_mem, HEADS, D_H, D_M, scale=0.5 * D_M ** -0.5) if case.depth == 2 else None
    gamma = randn(HEADS, scale=0.5) if case.momentum else None
    shape = (batch, case.seq, HEADS, D_H)
    if case.variant == "selfmod":
        params = MemoryParams(w1, w2, randn(HEADS, D_H, scale=0.3), randn(HEADS, scale=0.3, shift=-2.0),
                              randn(HEADS, D_H, scale=0.3), randn(HEADS, scale=0.3, shift=5.5), gamma)
        a_shape = (batch, case.seq, 4, HEADS, D_H) if case.per_memory_a else shape
        inputs = {"a": F.silu(randn(*a_shape))}
        if case.given_rates:
            params = MemoryParams(w1, w2, gamma=gamma)
            inputs.update(eta=uniform(0.01, 0.1, *shape[:3]), alpha=uniform(0.99, 1.0, *shape[:3]))
    else:
        params = MemoryParams(w1, w2, gamma=gamma)
        inputs = {"k": l2norm(randn(*shape)), "v": l2norm(randn(*shape)),
                  "eta": uniform(0.01, 0.1, *shape[:3]), "alpha": uniform(0.99, 1.0, *shape[:3])}
    state = None
    if case.given_state:
        noise = lambda x: None if x is None else x.expand(batch, *x.shape) + randn(batch, *x.shape, scale=0.1)
        moms = [noise(torch.zeros_like(x)) if case.momentum and x is not None else None for x in (w1, w2)]
        state = MemoryState(noise(w1), noise(w2), *moms)
    return l2norm(randn(*shape)), params, inputs, state


def leaves_of(q, params, inputs, state, retain_init=False) -> dict[str, torch.Tensor]:
    """Every tensor the op is differentiable in, by name (params' weights only when they start the state
    or, with retain_init, anchor the retention)."""
    skip = {"w1", "w2"} if state is not None and not retain_init else set()
    leaves = {"q": q, **inputs}
    leaves.update({f"params.{n}": x for n, x in params._asdict().items() if x is not None and n not in skip})
    if state is not None:
        leaves.update({f"initial_state.{n}": x for n, x in state._asdict().items() if x is not None})
    return leaves


def differentiate(run, leaves: dict, seed: int = 1):
    """run() -> (o, final state); returns them detached with the gradients of every leaf (by name)
    under random upstream gradients of o and of the final state (drawn in that order from `seed`)."""
    for x in leaves.values():
        x.requires_grad_(True)
    o, final = run()
    gen = torch.Generator().manual_seed(seed)
    outputs = [o, *(x for x in final if x is not None)]
    loss = sum((x * torch.randn(x.shape, generator=gen, dtype=torch.float64).to(x.dtype)).sum() for x in outputs)
    grads = dict(zip(leaves, torch.autograd.grad(loss, list(leaves.values()))))
    for x in leaves.values():
        x.requires_grad_(False)
    return o.detach(), MemoryState(*(None if x is None else x.detach() for x in final)), grads


def forward_backward(q, params, inputs, state, **kwargs):
    """One call of the op, differentiated in every leaf."""
    def run():
        return hope_memory(q, params, **inputs, initial_state=state, output_final_state=True, **kwargs)

    return differentiate(run, leaves_of(q, params, inputs, state, kwargs.get("retain_init", False)))


def assert_rel_close(actual, expected, tol: float, what: str) -> None:
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    err = ((actual - expected).norm() / expected.norm()).item()
    assert err <= tol, f"{what}: relative RMS error {err:.3e} > {tol:.0e}"


def assert_same_results(got, want, tol: float, what: str) -> None:
    (o, state, grads), (o_ref, state_ref, grads_ref) = got, want
    assert_rel_close(o, o_ref, tol, f"{what} outputs")
    for name, x, ref in zip(MemoryState._fields, state, state_ref):
        assert (x is None) == (ref is None), f"{what} final state {name}: one path returned None"
        if x is not None:
            assert_rel_close(x, ref, tol, f"{what} final state {name}")
    assert grads.keys() == grads_ref.keys()
    for name, ref in grads_ref.items():
        assert_rel_close(grads[name], ref, tol, f"{what} gradient of {name}")


CASES = covering_design(FACTORS)


def _case_id(case: Case) -> str:
    return (f"{case.variant}-d{case.depth}-{'mom' if case.momentum else 'nomom'}-"
            f"{'selfgen' if case.selfgen else 'v'}-{'sg' if case.stopgrad else 'nosg'}-C{case.chunk_size}"
            f"x{case.proj_mult}-T{case.seq}-{str(case.dtype)[6:]}-{'state' if case.given_state else 'fresh'}"
            f"{'' if case.w1_delta else '-w1gated'}{'' if case.w2_delta else '-w2gd'}"
            f"{'-retain' if case.retain_init else ''}"
            f"{'-amem' if case.per_memory_a else ''}{'-bound' if case.bound_step else ''}"
            f"{'' if case.proj_rate == 1 else f'-prate{case.proj_rate}'}{'-ratenorm' if case.rate_norm else ''}"
            f"{'-givenrates' if case.given_rates else ''}")


@pytest.mark.parametrize("case", CASES + [replace(c, w1_delta=False) for c in CASES if c.depth == 2], ids=_case_id)
def test_chunked_matches_naive(case: Case):
    q, params, inputs, state = make_problem(case)
    kwargs = dict(chunk_size=case.chunk_size, proj_chunk_size=case.chunk_size * case.proj_mult, selfgen=case.selfgen,
                  stopgrad_vhat=case.stopgrad, w1_delta=case.w1_delta, w2_delta=case.w2_delta,
                  retain_init=case.retain_init,
                  bound_step=case.bound_step, proj_rate=case.proj_rate, rate_norm=case.rate_norm)
    want = forward_backward(q, params, inputs, state, impl="naive", **kwargs)
    got = forward_backward(q, params, inputs, state, impl="torch", **kwargs)
    tol = 1e-10 if case.dtype == torch.float64 else 1e-4
    assert_same_results(got, want, tol, "torch vs naive")
    if case.depth == 2:  # the memory's own contribution, without the residual q
        assert_rel_close(got[0] - q, want[0] - q, tol, "torch vs naive reads M(q) - q")
    assert want[1].w2.norm() > 0.05 * params.w2.norm(), "fast weights vanished: the case hides errors"


STRUCTURAL = ("variant", "depth", "momentum", "selfgen", "stopgrad")
STRUCTURES = [Case(**dict(zip(STRUCTURAL, flags)), chunk_size=3, proj_mult=2, seq=37, given_state=True)
              for flags in itertools.product(*(FACTORS[n] for n in STRUCTURAL))]


@pytest.mark.parametrize("case", STRUCTURES, ids=_case_id)
def test_chunked_matches_naive_every_structure(case: Case):
    """The full product of the structural flags in float64 (a short sequence with short chunks)."""
    test_chunked_matches_naive(case)


OPTIONS = [replace(c, retain_init=True, w1_delta=w1_delta) for c in STRUCTURES if c.stopgrad
           for w1_delta in ((True, False) if c.depth == 2 else (True,))]
OPTIONS += [replace(c, per_memory_a=True, retain_init=r) for c in STRUCTURES
            if c.variant == "selfmod" and c.stopgrad and c.selfgen for r in (False, True)]
OPTIONS += [replace(c, bound_step=True, w1_delta=w1_delta) for c in STRUCTURES if c.stopgrad
            for w1_delta in ((True, False) if c.depth == 2 else (True,))]
OPTIONS += [replace(c, proj_rate=r, retain_init=r == 0) for c in STRUCTURES
            if c.variant == "selfmod" for r in ((0.0, 0.4) if c.stopgrad else (0.4,))]
OPTIONS += [replace(c, rate_norm=True) for c in STRUCTURES if c.variant == "selfmod"]
OPTIONS += [replace(c, given_rates=True, proj_rate=0.5) for c in STRUCTURES if c.variant == "selfmod" and c.stopgrad]
OPTIONS += [replace(c, w2_delta=False, retain_init=c.momentum) for c in STRUCTURES if c.stopgrad]


@pytest.mark.parametrize("case", OPTIONS, ids=_case_id)
def test_chunked_matches_naive_with_options(case: Case):
    """Retention toward M_0, per-memory inputs, the bounded step, the projection memories' rate, normalised
    rate read-outs, rates given by the caller and W2 without the delta factor (docs/model.md section 2.10),
    every structure, float64, with an initial state (so the anchor M_0 differs from where the state starts)."""
    test_chunked_matches_naive(case)


@pytest.mark.parametrize("impl", ["naive", "torch"])
def test_w2_delta_factor_erases_the_hidden_features_of_the_key_written(impl):
    """Depth 2 with W1 = 0 (so W2's inner gradient is 0): one write at eta 1, alpha 1 leaves W2 (I - k k^T),
    whose hidden response to k is 0, so nothing W1 stores for k can be read back; w2_delta=False leaves W2
    as it was (docs/model.md 2.10, bench/bench_memory_capacity.py)."""
    d = 8
    params = MemoryParams(torch.zeros(1, 1, d, d, dtype=torch.float64), torch.randn(1, 1, d, d, dtype=torch.float64))
    k = F.normalize(torch.randn(1, 1, 1, d, dtype=torch.float64), dim=-1)  # exactly unit (l2norm has an eps)
    v = F.normalize(torch.randn(1, 1, 1, d, dtype=torch.float64), dim=-1)
    one = torch.ones(1, 1, 1, dtype=torch.float64)
    final = {flag: hope_memory(k, params, k=k, v=v, eta=one, alpha=one, chunk_size=1, proj_chunk_size=1,
                               selfgen=False, output_final_state=True, w2_delta=flag, impl=impl)[1].w2
             for flag in (True, False)}
    kk = k[0, 0, 0]
    assert (final[True][0, 0, 0] @ kk).abs().max() < 1e-12
    assert torch.equal(final[False], params.w2[None])


@pytest.mark.parametrize("variant", ["selfmod", "titans"])
def test_options_change_the_result(variant):
    """Each option acts: retention toward M_0 moves the final state toward M_0, and per-memory inputs
    differ from one shared input (the four memories see four inputs, not one)."""
    case = Case(variant=variant, given_state=True, seq=48)
    q, params, inputs, state = make_problem(case)
    run = lambda inp, **kw: hope_memory(q, params, **inp, initial_state=state, output_final_state=True, **kw)[1]
    plain, anchored = run(inputs), run(inputs, retain_init=True)
    frozen = hope_memory(q, params, **inputs, output_final_state=True, eta_max=0.0, retain_init=True)[1]
    if variant == "titans":
        frozen = hope_memory(q, params, **{**inputs, "eta": 0 * inputs["eta"]}, output_final_state=True,
                             retain_init=True)[1]
    assert (frozen.w2 - params.w2).abs().max() < 1e-13, "no writes + retention toward M_0 must stay at M_0"
    dist = lambda st: (st.w2 - params.w2).norm()
    assert dist(anchored) < 0.9 * dist(plain), "retention toward M_0 did not pull the state toward M_0"
    if variant == "selfmod":
        a4 = inputs["a"][:, :, None].expand(-1, -1, 4, -1, -1)
        same = run({"a": a4.contiguous()})
        assert all(torch.allclose(x, y, atol=1e-12) for x, y in zip(same, plain) if x is not None)
        other = a4.clone()
        other[:, :, 1] = inputs["a"].flip(1)  # M_v reads another sequence
        assert (run({"a": other}).w2 - plain.w2).norm() > 1e-3 * plain.w2.norm()


@pytest.mark.parametrize("impl", ["naive", "torch"])
def test_proj_rate_scales_the_projection_memories_update(impl):
    """proj_rate 0 leaves the four projection memories (and nothing else) at their start; 1 is the spec,
    bitwise; in between each projection memory moves part of the way (W + r (rule(W) - W) per token)."""
    case = Case(given_state=True, seq=32, momentum=False)
    q, params, inputs, state = make_problem(case)
    run = lambda **kw: hope_memory(q, params, **inputs, initial_state=state, output_final_state=True,
                                   chunk_size=4, proj_chunk_size=8, impl=impl, **kw)
    (o1, spec), (o_one, one) = run(), run(proj_rate=1.0)
    assert torch.equal(o1, o_one) and torch.equal(spec.w2, one.w2)
    (o0, frozen), (_, half) = run(proj_rate=0.0), run(proj_rate=0.5)
    for w, w_start in ((frozen.w1, state.w1), (frozen.w2, state.w2)):
        assert torch.equal(w[:, :4], w_start[:, :4]), "proj_rate 0 must leave the projection memories as they start"
    assert (frozen.w2[:, 4] - state.w2[:, 4]).norm() > 1e-2, "M_o must still learn with frozen projections"
    move = lambda st: (st.w2[:, :4] - state.w2[:, :4]).norm()
    assert 0.2 * move(spec) < move(half) < 0.8 * move(spec)
    assert (o0 - o1).norm() > 1e-3 * o1.norm()


@pytest.mark.parametrize("variant", ["selfmod", "titans"])
@pytest.mark.parametrize("impl", IMPLS)
def test_causal(impl, variant):
    case = Case(variant=variant, seq=40, chunk_size=4, proj_mult=2)
    q, params, inputs, _ = make_problem(case)
    o, _ = hope_memory(q, params, **inputs, chunk_size=4, proj_chunk_size=8, impl=impl)
    t = 21  # inside a chunk, so the same chunk holds perturbed and unperturbed tokens
    gen = torch.Generator().manual_seed(5)
    bumped = {name: x.clone() for name, x in inputs.items()}
    for x in [*bumped.values()]:
        x[:, t + 1:] += torch.rand(x[:, t + 1:].shape, generator=gen, dtype=x.dtype) * 0.05
    q2 = q.clone()
    q2[:, t + 1:] = l2norm(torch.randn(q2[:, t + 1:].shape, generator=gen, dtype=q.dtype))
    o2, _ = hope_memory(q2, params, **bumped, chunk_size=4, proj_chunk_size=8, impl=impl)
    assert torch.equal(o[:, :t + 1], o2[:, :t + 1]), "an output at or before t changed"
    assert not torch.equal(o[:, t + 1:], o2[:, t + 1:]), "the perturbation had no effect at all"


@pytest.mark.parametrize("impl", IMPLS)
def test_batch_equals_sequences(impl):
    case = Case(seq=30, given_state=True)
    q, params, inputs, state = make_problem(case, batch=3)
    kwargs = dict(chunk_size=4, proj_chunk_size=8, impl=impl)
    o, final = hope_memory(q, params, **inputs, initial_state=state, output_final_state=True, **kwargs)
    for b in range(3):
        one = slice(b, b + 1)
        o_b, final_b = hope_memory(q[one], params, **{n: x[one] for n, x in inputs.items()},
                                   initial_state=MemoryState(*(x[one] for x in state)), output_final_state=True,
                                   **kwargs)
        assert_rel_close(o[one], o_b, 1e-12, f"sequence {b} outputs")
        for name, x, x_b in zip(MemoryState._fields, final, final_b):
            assert_rel_close(x[one], x_b, 1e-12, f"sequence {b} final state {name}")


@pytest.mark.parametrize("variant", ["selfmod", "titans"])
@pytest.mark.parametrize("impl", IMPLS)
def test_two_segments_equal_one(impl, variant):
    case = Case(variant=variant, seq=24 + 13)  # first segment: a multiple of proj_chunk = 8
    q, params, inputs, _ = make_problem(case)
    kwargs = dict(chunk_size=4, proj_chunk_size=8, impl=impl)
    whole = forward_backward(q, params, inputs, None, **kwargs)

    def two_segments():
        o1, mid = hope_memory(q[:, :24], params, **{n: x[:, :24] for n, x in inputs.items()},
                              output_final_state=True, **kwargs)
        o2, final = hope_memory(q[:, 24:], params, **{n: x[:, 24:] for n, x in inputs.items()},
                                initial_state=mid, output_final_state=True, **kwargs)
        return torch.cat([o1, o2], 1), final

    split = differentiate(two_segments, leaves_of(q, params, inputs, None))
    assert_same_results(split, whole, 1e-12, "two segments vs one")


@pytest.mark.parametrize("given_state", [False, True])
@pytest.mark.parametrize("variant", ["selfmod", "titans"])
@pytest.mark.parametrize("impl", IMPLS)
def test_packed_documents_equal_separate(impl, variant, given_state):
    lengths = (13, 21, 9)
    case = Case(variant=variant, seq=sum(lengths), given_state=given_state)
    q, params, inputs, state = make_problem(case, batch=1)
    if given_state:
        _, _, _, state = make_problem(case, batch=len(lengths), seed=3)
    cu_seqlens = torch.tensor([0, *itertools.accumulate(lengths)])
    kwargs = dict(chunk_size=4, proj_chunk_size=8, impl=impl)
    packed = forward_backward(q, params, inputs, state, cu_seqlens=cu_seqlens, **kwargs)

    def one_by_one():
        outs, finals = [], []
        for i, (start, end) in enumerate(zip(cu_seqlens[:-1].tolist(), cu_seqlens[1:].tolist())):
            doc_state = None if state is None else MemoryState(*(None if x is None else x[i:i + 1] for x in state))
            o, final = hope_memory(q[:, start:end], params, **{n: x[:, start:end] for n, x in inputs.items()},
                                   initial_state=doc_state, output_final_state=True, **kwargs)
            outs.append(o)
            finals.append(final)
        return torch.cat(outs, 1), MemoryState(*(None if f[0] is None else torch.cat(f) for f in zip(*finals)))

    separate = differentiate(one_by_one, leaves_of(q, params, inputs, state))
    assert_same_results(packed, separate, 1e-12, "packed vs separate documents")


@pytest.mark.parametrize("variant", ["selfmod", "titans"])
@pytest.mark.parametrize("impl", IMPLS)
def test_no_write_keeps_state(impl, variant):
    """alpha = 1, eta = 0: the weights stay the initial ones and o_t = M_0(q_t)."""
    case = Case(variant=variant, momentum=False, seq=19)
    q, params, inputs, _ = make_problem(case)
    eta_max = 1.0
    if variant == "titans":
        inputs["eta"], inputs["alpha"] = torch.zeros_like(inputs["eta"]), torch.ones_like(inputs["alpha"])
    else:
        eta_max = 0.0
        params = params._replace(alpha_b=torch.full_like(params.alpha_b, torch.inf))
    o, final = hope_memory(q, params, **inputs, output_final_state=True, chunk_size=4, proj_chunk_size=8,
                           eta_max=eta_max, impl=impl)
    assert torch.equal(final.w2, params.w2.expand_as(final.w2))
    assert torch.equal(final.w1, params.w1.expand_as(final.w1))
    w1, w2 = params.w1[-1], params.w2[-1]  # M_o, (H, d_h, d_m) and (H, d_m, d_h)
    expected = q + torch.einsum("hdm,bthm->bthd", w1, F.silu(torch.einsum("hmd,bthd->bthm", w2, q)))
    assert_rel_close(o, expected, 1e-13, "o_t = M_0(q_t)")


@pytest.mark.parametrize("retain_init", [False, True])
@pytest.mark.parametrize("momentum", [False, True])
@pytest.mark.parametrize("impl", IMPLS)
def test_chunk_one_is_sequential_rule(impl, momentum, retain_init):
    """chunk = proj_chunk_size = 1 is the paper's fully sequential rule; written here independently for a
    linear titans memory: G_t = (W_{t-1} k - v) k^T, S_t = gamma S_{t-1} + (1 - gamma) G_t,
    W_t = W_{t-1} (alpha I - eta k k^T) - eta S_t (+ (1 - alpha) W_0 with retain_init), o_t = W_t q_t."""
    case = Case(variant="titans", depth=1, momentum=momentum, seq=23)
    q, params, inputs, _ = make_problem(case, batch=1)
    inputs["alpha"] = inputs["alpha"] - 0.2  # retention far enough from 1 that the anchor term shows
    o, final = hope_memory(q, params, **inputs, output_final_state=True, chunk_size=1, proj_chunk_size=1, impl=impl,
                           retain_init=retain_init)
    k, v, eta, alpha = inputs["k"][0], inputs["v"][0], inputs["eta"][0], inputs["alpha"][0]
    gamma = torch.sigmoid(params.gamma) if momentum else torch.zeros(HEADS, dtype=q.dtype)
    for h in range(HEADS):
        w, s = params.w2[0, h].clone(), torch.zeros(D_H, D_H, dtype=q.dtype)
        for t in range(case.seq):
            kt, et, at = k[t, h], eta[t, h], alpha[t, h]
            s = gamma[h] * s + (1 - gamma[h]) * torch.outer(w @ kt - v[t, h], kt)
            w = w @ (at * torch.eye(D_H, dtype=q.dtype) - et * torch.outer(kt, kt)) - et * s
            w = w + (1 - at) * params.w2[0, h] if retain_init else w
            assert_rel_close(o[0, t, h], w @ q[0, t, h], 1e-12, f"o at t={t}, head {h}")
        assert_rel_close(final.w2[0, 0, h], w, 1e-12, f"final W, head {h}")
        if momentum:
            assert_rel_close(final.s2[0, 0, h], s, 1e-12, f"final momentum, head {h}")


@pytest.mark.parametrize("chunk_size,proj_chunk_size", [(1, 1), (2, 4)])
@pytest.mark.parametrize("impl", IMPLS)
def test_selfmod_matches_rule_written_with_autograd(impl, chunk_size, proj_chunk_size):
    """Section 2 for one sequence, one head and memory at a time, with every inner gradient taken
    by autograd (independent of the op's closed forms): depth 2, momentum, self-generated targets,
    W1 on the delta rule along its unit input (docs/memory_op.md)."""
    case = Case(seq=11)
    q, params, inputs, _ = make_problem(case, batch=1)
    o, final = hope_memory(q, params, **inputs, output_final_state=True, chunk_size=chunk_size,
                           proj_chunk_size=proj_chunk_size, impl=impl)

    def memory(w1, w2, z):
        return z + w1 @ F.silu(w2 @ z)

    def unit(x):
        return x / torch.sqrt(x.square().sum() + 1e-6)

    a, eye, eye_m = inputs["a"][0], torch.eye(D_H, dtype=q.dtype), torch.eye(D_M, dtype=q.dtype)
    for h in range(HEADS):
        w1, w2 = list(params.w1[:, h]), list(params.w2[:, h])
        s1, s2 = [torch.zeros_like(x) for x in w1], [torch.zeros_like(x) for x in w2]
        gamma = torch.sigmoid(params.gamma[h])
        for t in range(case.seq):
            if t % proj_chunk_size == 0:
                start = [(w1[m], w2[m]) for m in range(4)] + start[4:] if t else list(zip(w1, w2))  # noqa: F821
            if t % chunk_size == 0:
                start[4] = (w1[4], w2[4])
            mk, mv, meta, malpha = (memory(*start[m], a[t, h]) for m in range(4))
            k, v = unit(mk), unit(mv)
            eta = torch.sigmoid(params.eta_w[h] @ meta + params.eta_b[h])
            alpha = torch.sigmoid(params.alpha_w[h] @ malpha + params.alpha_b[h])
            for m in range(5):
                c1, c2 = (x.detach().requires_grad_(True) for x in start[m])
                loss = 0.5 * (memory(c1, c2, k.detach()) - memory(*start[m], v).detach()).square().sum()
                g1, g2 = torch.autograd.grad(loss, (c1, c2))
                s1[m], s2[m] = gamma * s1[m] + (1 - gamma) * g1, gamma * s2[m] + (1 - gamma) * g2
                w2[m] = w2[m] @ (alpha * eye - eta * torch.outer(k, k)) - eta * s2[m]
                hn = unit(F.silu(c2 @ k))  # W1's input at the chunk start, as its gradient's
                w1[m] = w1[m] @ (alpha * eye_m - eta * torch.outer(hn, hn)) - eta * s1[m]
            assert_rel_close(o[0, t, h], memory(w1[4], w2[4], q[0, t, h]), 1e-12, f"o at t={t}, head {h}")
        for m in range(5):
            assert_rel_close(final.w1[0, m, h], w1[m], 1e-12, f"final W1 of memory {m}, head {h}")
            assert_rel_close(final.w2[0, m, h], w2[m], 1e-12, f"final W2 of memory {m}, head {h}")
            assert_rel_close(final.s2[0, m, h], s2[m], 1e-12, f"final S2 of memory {m}, head {h}")


@pytest.mark.parametrize("impl", IMPLS)
def test_stopgrad_detaches_only_self_generated_targets(impl):
    case = Case(seq=12)
    q, params, inputs, _ = make_problem(case)
    kwargs = dict(chunk_size=4, proj_chunk_size=4, impl=impl)

    def grad_w2(**flags):
        w2 = params.w2.clone().requires_grad_(True)
        o, _ = hope_memory(q, params._replace(w2=w2), **inputs, **kwargs, **flags)
        return torch.autograd.grad(o.square().sum(), w2)[0]

    assert not torch.allclose(grad_w2(selfgen=True, stopgrad_vhat=True), grad_w2(selfgen=True, stopgrad_vhat=False))
    assert torch.equal(grad_w2(selfgen=False, stopgrad_vhat=True), grad_w2(selfgen=False, stopgrad_vhat=False))


@pytest.mark.parametrize("impl", IMPLS)
def test_16bit_inputs_compute_in_float32(impl):
    """bf16 in: the result is the float32 computation on the same values, rounded once; autocast
    does not reach inside the op."""
    q, params, inputs, state = make_problem(Case(dtype=torch.bfloat16, seq=20, given_state=True))
    kwargs = dict(initial_state=state, output_final_state=True, chunk_size=4, proj_chunk_size=8, impl=impl)
    o, final = hope_memory(q, params, **inputs, **kwargs)
    up = lambda x: None if x is None else x.float()
    o32, final32 = hope_memory(up(q), MemoryParams(*map(up, params)), **{n: up(x) for n, x in inputs.items()},
                               **{**kwargs, "initial_state": MemoryState(*map(up, state))})
    assert o.dtype == final.w2.dtype == torch.bfloat16
    assert torch.equal(o, o32.bfloat16()) and torch.equal(final.w2, final32.w2.bfloat16())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        o_auto, _ = hope_memory(up(q), MemoryParams(*map(up, params)), **{n: up(x) for n, x in inputs.items()},
                                **{**kwargs, "initial_state": MemoryState(*map(up, state))})
    assert torch.equal(o_auto, o32)


def _bad_inputs():
    """(description, mutation of (q, params, kwargs), expected words in the error)."""
    def titans(q, params, kw):
        _, p, inputs, _ = make_problem(Case(variant="titans"))
        return q, p, inputs

    def drop(name):
        return lambda q, p, kw: (q, p, {n: x for n, x in kw.items() if n != name})

    def put(**new):
        return lambda q, p, kw: (q, p, {**kw, **new})

    def with_params(**new):
        return lambda q, p, kw: (q, p._replace(**{n: f(p) for n, f in new.items()}), kw)

    def then(first, second):
        return lambda q, p, kw: second(*first(q, p, kw))

    b, t = 2, 40
    return [
        ("missing a", drop("a"), "a (selfmod"),
        ("k for selfmod", put(k=torch.zeros(b, t, HEADS, D_H, dtype=torch.float64)), "k must be None"),
        ("a of wrong d_h", put(a=torch.zeros(b, t, HEADS, D_H + 1, dtype=torch.float64)), "a (selfmod"),
        ("a in float32", put(a=torch.zeros(b, t, HEADS, D_H)), "must match q"),
        ("proj_chunk_size not a multiple", put(proj_chunk_size=6), "proj_chunk_size"),
        ("chunk zero", put(chunk_size=0), "chunk_size must be"),
        ("bad impl", put(impl="cuda"), "impl"),
        ("negative eta_max", put(eta_max=-1.0), "eta_max"),
        ("selfgen not a bool", put(selfgen="yes"), "selfgen"),
        ("n_mem 3", with_params(w2=lambda p: p.w2[:3], w1=lambda p: p.w1[:3]), "n_mem"),
        ("w1 of wrong d_m", with_params(w1=lambda p: p.w1[..., :-1]), "params.w1"),
        ("missing eta_w", with_params(eta_w=lambda p: None), "params.eta_w"),
        ("selfmod eta with read-outs", put(eta=torch.zeros(b, t, HEADS, dtype=torch.float64),
                                           alpha=torch.ones(b, t, HEADS, dtype=torch.float64)),
         "params.eta_w must be None"),
        ("selfmod rates without alpha", then(with_params(eta_w=lambda p: None, eta_b=lambda p: None,
                                                         alpha_w=lambda p: None, alpha_b=lambda p: None),
                                             put(eta=torch.zeros(b, t, HEADS, dtype=torch.float64))), "alpha (selfmod"),
        ("proj_rate above 1", put(proj_rate=1.5), "proj_rate must be in"),
        ("gamma per memory", with_params(gamma=lambda p: torch.zeros(5, HEADS, dtype=torch.float64)), "params.gamma"),
        ("cu_seqlens with B > 1", put(cu_seqlens=torch.tensor([0, 20, 40])), "B = 1"),
        ("titans without eta", then(titans, drop("eta")), "eta (titans"),
        ("titans with a", then(titans, put(a=torch.zeros(b, t, HEADS, D_H, dtype=torch.float64))), "a must be None"),
        ("titans alpha per dim", then(titans, put(alpha=torch.ones(b, t, HEADS, D_H, dtype=torch.float64))),
         "alpha (titans"),
        ("state batch", put(initial_state=make_problem(Case(given_state=True), batch=3)[3]), "initial_state.w2"),
        ("state without momentum", put(initial_state=make_problem(Case(given_state=True))[3]._replace(s1=None)),
         "initial_state.s1"),
    ]


@pytest.mark.parametrize("mutate,words", [(m, w) for _, m, w in _bad_inputs()], ids=[d for d, _, _ in _bad_inputs()])
def test_bad_input_is_named(mutate, words):
    q, params, inputs, _ = make_problem(Case())
    q, params, kwargs = mutate(q, params, dict(inputs))
    with pytest.raises((ValueError, TypeError), match=words.replace("(", r"\(")):
        hope_memory(q, params, **kwargs)


@pytest.mark.parametrize("impl", ["naive", "torch"])
def test_packed_input_rejects_bad_offsets(impl):
    """One check for every path: empty documents are an error everywhere (test_memory_triton.py too)."""
    q, params, inputs, _ = make_problem(Case(seq=10), batch=1)
    for cu in ([0, 4, 4, 10], [0, 4, 9], [1, 10]):
        with pytest.raises(ValueError, match="cu_seqlens"):
            hope_memory(q, params, **inputs, cu_seqlens=torch.tensor(cu), impl=impl)
    with pytest.raises(ValueError, match="no empty documents"):
        hope_memory(q, params, **inputs, cu_seqlens=torch.tensor([0, 4, 4, 10]), impl=impl)
    with pytest.raises(ValueError, match="cu_seqlens"):
        hope_memory(q, params, **inputs, cu_seqlens=torch.tensor([0.0, 10.0]), impl=impl)
