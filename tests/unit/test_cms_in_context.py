"""In-context CMS levels (kernels/cms_in_context, docs/cms_in_context.md): the chunked path against
the per-token reference in float64, the inner step against its objective written with autograd,
causality, batch independence, carried state, document resets, the off switch, the trainer with
validation and the long-context eval, and bad inputs (tp=2 / pp=2 against one process:
tests/integration/test_parallel_equivalence.py)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from hope_dist.config import CMSLevel, ConfigError, ModelConfig, load_config
from hope_dist.evals import long_context as lc
from hope_dist.evals.loading import EvalError
from hope_dist.model import build_model, document_segments
from kernels.cms_in_context import CMSState, cms_in_context

from helpers import make_trainer, tiny_overrides

B, T, F_, D = 3, 37, 6, 5
TOL64 = 1e-10  # the memory op's float64 bound (docs/model.md section 3)


def problem(seed: int = 0, batch: int = B, seq: int = T, packed: bool = True, given_state: bool = False):
    """Random level inputs: h (B, T, f), W_down (d, f), z (B, T, d), seg (rows 1 and 2 packed), state."""
    g = torch.Generator().manual_seed(seed)
    rand = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)
    seg = None
    if packed:
        seg = torch.zeros(batch, seq, dtype=torch.long)
        seg[1 % batch, 10:] += 1
        seg[1 % batch, 16:] += 1  # a 6-token document inside one 8-token chunk
        seg[2 % batch, 8:] += 1  # a document starting on a chunk boundary
    state = CMSState(0.3 * rand(batch, D, F_), rand(batch, F_), rand(batch, D)) if given_state else None
    return rand(batch, seq, F_), 0.5 * rand(D, F_), rand(batch, seq, D), seg, state


def run(impl, h, w, z, seg, state, chunk_size, lr=0.5, stopgrad=False):
    return cms_in_context(h, h @ w.mT, z, chunk_size=chunk_size, lr=lr, seg=seg, initial_state=state,
                          stopgrad_writes=stopgrad, impl=impl)


def results_and_grads(impl, chunk_size, stopgrad, packed, given_state):
    """Outputs, final state and the gradients of a random functional of both w.r.t. every input."""
    h, w, z, seg, state = problem(packed=packed, given_state=given_state)
    leaves = [h, w, z] + (list(state) if state is not None else [])
    for x in leaves:
        x.requires_grad_(True)
    y, final = run(impl, h, w, z, seg, state, chunk_size, stopgrad=stopgrad)
    g = torch.Generator().manual_seed(7)
    outs = [y, *final]
    loss = sum((o * torch.randn(o.shape, generator=g, dtype=o.dtype)).sum() for o in outs)
    grads = torch.autograd.grad(loss, leaves, allow_unused=True)
    return outs, [torch.zeros_like(x) if gr is None else gr for x, gr in zip(leaves, grads)]


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm().clamp_min(1e-300)).item()


# ------------------------------------------------------------------ the chunked path == the reference
@pytest.mark.parametrize("chunk_size", [1, 4, 8, 16, 64])
@pytest.mark.parametrize("stopgrad,packed,given_state",
                         [(False, True, False), (True, True, True), (False, False, True), (True, False, False)])
def test_chunked_matches_naive_float64(chunk_size, stopgrad, packed, given_state):
    want, want_g = results_and_grads("naive", chunk_size, stopgrad, packed, given_state)
    got, got_g = results_and_grads("torch", chunk_size, stopgrad, packed, given_state)
    assert want[0].abs().max() > 1e-3 or chunk_size >= T and not given_state  # the read is not trivially zero
    for name, a, b in zip(("y_fast", "delta", "key", "key_out"), got, want):
        assert rel(a, b) <= TOL64, (name, rel(a, b))
    names = ["h", "w_down", "z", "state.delta", "state.key", "state.key_out"]
    for name, a, b in zip(names, got_g, want_g):
        only_writes = name in ("z", "state.key", "state.key_out")  # enter through the writes only
        assert (a.norm() > 0) == (not stopgrad or not only_writes), name
        assert rel(a, b) <= TOL64, (name, rel(a, b))


def test_inner_step_is_the_normalised_gradient_of_the_objective():
    """One chunk from delta = 0: the state after it is -lr * grad_W sum_j 1/2 ||W h_{j-1} - z_j||^2 at the
    slow weight, divided by sum_j ||h_{j-1}||^2 (pairs j = 1..C-1), written here with autograd."""
    h, w, z, _, _ = problem(packed=False)
    C, lr = 8, 0.3
    for impl in ("naive", "torch"):
        _, state = run(impl, h[:, :C], w, z[:, :C], None, None, C, lr=lr)
        dw = torch.zeros(B, D, F_, dtype=torch.float64, requires_grad=True)
        keys, values = h[:, :C - 1], z[:, 1:C]
        loss = 0.5 * ((keys @ (w + dw).mT - values) ** 2).sum()
        (grad,) = torch.autograd.grad(loss, dw)
        expected = -lr * grad / (keys.square().sum((1, 2)) + 1e-6)[:, None, None]
        assert rel(state.delta, expected) <= TOL64, impl
        assert torch.equal(state.key, h[:, C - 1]) and torch.allclose(state.key_out, h[:, C - 1] @ w.mT)


def test_stopgrad_writes_detach_the_targets():
    """z enters only through the writes: it gets a gradient through them unless stopgrad_writes."""
    h, w, z, seg, _ = problem()
    for stopgrad, nonzero in ((False, True), (True, False)):
        z1, h1 = z.clone().requires_grad_(True), h.clone().requires_grad_(True)
        y, _ = run("torch", h1, w, z1, seg, None, 4, stopgrad=stopgrad)
        g, gh = torch.autograd.grad(y.square().sum(), (z1, h1), allow_unused=True)
        assert (g is not None and g.norm() > 0) == nonzero and gh.norm() > 0


# ------------------------------------------------------------------ sequence properties
@pytest.mark.parametrize("impl", ["naive", "torch"])
def test_causal(impl):
    h, w, z, seg, _ = problem()
    y, _ = run(impl, h, w, z, seg, None, 4)
    t = 21
    h2, z2 = h.clone(), z.clone()
    h2[:, t + 1:] += 1.0
    z2[:, t + 1:] -= 2.0
    y2, _ = run(impl, h2, w, z2, seg, None, 4)
    assert torch.equal(y[:, :t + 1], y2[:, :t + 1])
    assert not torch.allclose(y[:, t + 4:], y2[:, t + 4:])


@pytest.mark.parametrize("impl", ["naive", "torch"])
def test_batch_equals_sequences(impl):
    h, w, z, seg, state = problem(given_state=True)
    y, final = run(impl, h, w, z, seg, state, 8)
    for b in range(B):
        one = CMSState(*(x[b:b + 1] for x in state))
        yb, fb = run(impl, h[b:b + 1], w, z[b:b + 1], seg[b:b + 1], one, 8)
        assert rel(yb, y[b:b + 1]) <= TOL64 and rel(fb.delta, final.delta[b:b + 1]) <= TOL64


@pytest.mark.parametrize("impl", ["naive", "torch"])
def test_two_segments_equal_one(impl):
    h, w, z, _, state = problem(given_state=True, packed=False)
    y, final = run(impl, h, w, z, None, state, 8)
    y1, mid = run(impl, h[:, :16], w, z[:, :16], None, state, 8)
    y2, end = run(impl, h[:, 16:], w, z[:, 16:], None, mid, 8)
    assert rel(torch.cat([y1, y2], 1), y) <= TOL64
    for a, b in zip(end, final):
        assert rel(a, b) <= TOL64


@pytest.mark.parametrize("impl", ["naive", "torch"])
def test_documents_reset(impl):
    """A document's outputs do not depend on the documents before it in its row, and one that starts on
    a chunk boundary equals itself run alone from a fresh state."""
    h, w, z, seg, state = problem(given_state=True)
    y, _ = run(impl, h, w, z, seg, state, 8)
    h2, z2 = h.clone(), z.clone()
    h2[:, :8] *= -3.0  # rewrite the first document of every row (and the carried state)
    z2[:, :8] += 1.0
    state2 = CMSState(*(2 * x + 1 for x in state))
    y2, _ = run(impl, h2, w, z2, seg, state2, 8)
    assert torch.equal(y[1:, 16:], y2[1:, 16:])  # rows 1, 2: documents starting at 16 and 8
    assert torch.equal(y[2, 8:], y2[2, 8:])
    assert not torch.allclose(y[0, 8:], y2[0, 8:])  # row 0 is one document: the change carries on
    alone, _ = run(impl, h[2:, 8:], w, z[2:, 8:], None, None, 8)
    assert rel(y[2:, 8:], alone) <= TOL64


# ------------------------------------------------------------------ the model
def tiny_cfg(**extra) -> ModelConfig:
    base = dict(vocab_size=50, d_model=32, n_layers=2, n_heads=2, chunk_size=8, proj_chunk_size=16,
                cms=[CMSLevel(32, 1, chunk_size=8), CMSLevel(32, 4, chunk_size=32), CMSLevel(32,
                                                                                             16)], cms_in_context=True)
    base.update(extra)
    return ModelConfig(**base)


def test_off_by_default_is_the_plain_chain():
    """cms_in_context=false (the default): the same parameters, no CMS state, and each level computes
    exactly z + down(silu(gate(x)) * up(x)), x = RMSNorm(z), bit for bit."""
    cfg = tiny_cfg(cms_in_context=False, cms=[CMSLevel(32, 1), CMSLevel(32, 4)])
    assert ModelConfig().cms_in_context is False and CMSLevel().chunk_size == 0
    torch.manual_seed(0)
    model = build_model(cfg)
    on = build_model(tiny_cfg(cms=[CMSLevel(32, 1, chunk_size=8), CMSLevel(32, 4)]))
    assert [n for n, _ in model.named_parameters()] == [n for n, _ in on.named_parameters()]
    z = torch.randn(2, 24, 32)
    for level in model.layers["0"].cms.levels:
        m = level.mlp
        x = level.norm(z)
        assert torch.equal(level(z)[0], z + m.down(F.silu(m.gate(x)) * m.up(x)))
    _, state = model(torch.randint(0, 50, (2, 24)), return_state=True)
    assert all("cms" not in s for s in state)


def test_model_segments_equal_one_long_forward():
    torch.manual_seed(0)
    model = build_model(tiny_cfg()).eval()
    assert model.cfg.state_span == 32
    x = torch.randint(1, 50, (2, 96), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full = model(x)
    torch.testing.assert_close(lc.segmented_logits(model, x, 32, carry=True), full, rtol=0, atol=1e-5)
    off = build_model(tiny_cfg(cms_in_context=False, cms=[CMSLevel(32, 1)])).eval()
    assert off.cfg.state_span == 16
    with pytest.raises(EvalError,
                       match=r"--segment 16 is not a multiple of model.proj_chunk_size=16 and the in-context "
                                        r"CMS chunks \[8, 32\] \(lcm 32\).*--segment 32 or 32"):
        lc.check_segment(model, 16)


def test_model_packed_rows_reset_at_eod():
    """A document after an EOD gives the same logits whatever precedes it, when it starts on a chunk
    boundary of every in-context level (32) and of the memory op's chunks."""
    torch.manual_seed(0)
    model = build_model(tiny_cfg()).eval()
    g = torch.Generator().manual_seed(2)
    doc = torch.randint(1, 50, (1, 32), generator=g)
    rows = torch.cat([torch.randint(1, 50, (2, 31), generator=g), torch.zeros(2, 1, dtype=torch.long),
                      doc.expand(2, 32)], 1)
    with torch.no_grad():
        packed = model(rows, document_segments(rows, 0))
        alone = model(doc)
    torch.testing.assert_close(packed[:, 32:], alone.expand(2, -1, -1), rtol=0, atol=1e-5)


def test_trainer_with_validation_and_long_context(random_dataset, tmp_path):
    extra = {"model.cms_in_context": True,
             "model.cms": "[{width: 32, period: 1, chunk_size: 8}, {width: 32, period: 2, "
             "chunk_size: 16}, {width: 32, period: 4}]", "training.steps": 3, "eval.every": 3,
             "data.valid_fraction": 0.1, "eval.tokens": 256}
    trainer = make_trainer(random_dataset, tmp_path / "run", **extra)
    rows = [trainer.train_step() for _ in range(3)]
    val = trainer.validate()
    assert all(np.isfinite(r["loss"]) for r in rows) and np.isfinite(val["val_loss"]) and val["val_tokens"] > 0
    model = trainer.model.eval()
    docs = [np.random.default_rng(i).integers(1, 96, 100) for i in range(3)]
    r = lc.long_context(model, docs, length=64, segment=32, max_docs=3, batch_size=2, progress=False)
    assert r["modes"] == ["carry", "reset"] and r["buckets"][0]["carry"] == pytest.approx(r["buckets"][0]["reset"],
                                                                                          abs=1e-5)
    x = torch.tensor(np.stack([d[:65] for d in docs]))
    with torch.no_grad():
        nll = F.cross_entropy(model(x[:, :-1]).transpose(1, 2), x[:, 1:], reduction="none").mean(0)
    assert r["buckets"][1]["carry"] == pytest.approx(float(nll[32:].mean()), abs=1e-5)


# ------------------------------------------------------------------ bad inputs
@pytest.mark.parametrize("args,words", [
    (["--model.cms=[{width: 32, period: 1, chunk_size: 12}]", "--model.cms_in_context=true"],
     "model.cms[0].chunk_size=12 does not divide training.seq_len=32"),
    (["--model.cms=[{width: 32, period: 1, chunk_size: -8}]", "--model.cms_in_context=true"],
     "model.cms[0].chunk_size=-8 must be >= 0"),
    (["--model.cms=[{width: 32, period: 1}, {width: 32, period: 1, chunk_size: 8}]"],
     "model.cms[1].chunk_size=8 is set but model.cms_in_context=false"),
    (["--model.cms_in_context=true"], "model.cms_in_context=true but every model.cms[i].chunk_size is 0"),
    (["--model.cms=[{width: 32, period: 1, chunk_size: 8}]", "--model.cms_in_context=true", "--model.cms_inner_lr=1.5"],
     "model.cms_inner_lr=1.5 must be in (0, 1]"),
])
def test_bad_config(random_dataset, tmp_path, args, words):
    prefix, vocab, eod = random_dataset
    with pytest.raises(ConfigError) as err:
        load_config(None, tiny_overrides(prefix, vocab, eod, tmp_path) + args)
    assert words in str(err.value)


def test_bad_op_inputs():
    h, w, z, seg, state = problem(given_state=True)
    y = h @ w.mT
    cases = [(dict(chunk_size=0), "chunk_size must be a positive int"), (dict(chunk_size=4, lr=0.0),
                                                                         "lr must be in (0, 1]"),
             (dict(chunk_size=4, seg=seg[:, :5]), "seg must have shape (3, 37)"),
             (dict(chunk_size=4, initial_state=CMSState(state.delta[:1], state.key, state.key_out)),
              "initial_state.delta has shape (1, 5, 6), expected (3, 5, 6)"),
             (dict(chunk_size=4, impl="triton"), "impl must be one of")]
    for kwargs, words in cases:
        with pytest.raises(ValueError) as err:
            cms_in_context(h, y, z, **{"lr": 0.5, **kwargs})
        assert words in str(err.value), (kwargs, str(err.value))
