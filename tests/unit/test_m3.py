"""M3 (optim.name=m3, docs/optim.md): Algorithm 1 against a hand-written float64 reference, AdamW
for the rest bit for bit, the CMS clocks, bit-exact resume, and FSDP2 / TP layouts equal to one
process (the tolerances of test_parallel_equivalence)."""
from __future__ import annotations

import re
import shutil

import pytest
import torch

from hope_dist.config import ConfigError, load_config
from hope_dist.optim import M3, newton_schulz
from hope_dist.optim.newton_schulz import NS_COEFFICIENTS, NS_EPS

from helpers import make_trainer, read_losses, tiny_overrides

HP = dict(betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1, beta3=0.8, alpha=0.7, ns_steps=5, slow_every=3)


def ns_reference(m: torch.Tensor, steps: int = 5) -> torch.Tensor:
    """Muon's quintic Newton-Schulz with Keller Jordan's published coefficients."""
    a, b, c = 3.4445, -4.7750, 2.0315
    tall = m.shape[0] > m.shape[1]
    x = m.T if tall else m
    x = x / max(x.norm().item(), 1e-7)
    for _ in range(steps):
        gram = x @ x.T
        x = a * x + (b * gram + c * gram @ gram) @ x
    return x.T if tall else x


def algorithm_1(theta, grads, lrs, precondition, betas, eps, weight_decay, beta3, alpha, ns_steps, slow_every):
    """Algorithm 1 in the paper's own loop structure (slow memory at the top of each window of f
    steps, fed the previous window's gradient sum), in float64; docs/optim.md for the reading."""
    (b1, b2), f = betas, slow_every
    theta = theta.double()
    m1, m2, v, o2 = (torch.zeros_like(theta) for _ in range(4))
    window = []
    for t, (g, lr) in enumerate(zip(grads, lrs), start=1):
        g = g.double()
        v = b2 * v + (1 - b2) * g * g
        d = (v / (1 - b2 ** t)).sqrt() + eps

        def n(m):
            return ns_reference(m / d if precondition == "before_ns" else m, ns_steps)

        if (t - 1) % f == 0:  # low-frequency loop k = (t - 1) / f
            m2 = beta3 * m2 + (1 - beta3) * sum(window, torch.zeros_like(theta))
            window = []
            o2 = n(m2)
        window.append(g)
        m1 = b1 * m1 + (1 - b1) * g
        update = n(m1) + alpha * o2
        if precondition == "after_ns":
            update = update / d
        theta = theta * (1 - lr * weight_decay) - lr * update
    return theta


def test_newton_schulz_is_torch_muons_iteration():
    torch.manual_seed(0)
    for shape in ((48, 16), (16, 48), (32, 32)):
        m = torch.randn(shape)
        o = newton_schulz(m, 5)
        assert o.dtype == torch.float32 and o.shape == shape
        s = torch.linalg.svdvals(o)
        assert 0.5 < s.min() and s.max() < 1.5  # Muon's approximate orthogonalisation
        torch.testing.assert_close(o, ns_reference(m.double()).float(), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(newton_schulz(1e-3 * m, 5), o, rtol=1e-4, atol=1e-5)  # scale-free
        torch_bf16 = torch.optim._muon._zeropower_via_newtonschulz(m, NS_COEFFICIENTS, 5, NS_EPS).float()
        assert ((o - torch_bf16).norm() / o.norm()).item() < 0.05  # the same iteration, in bfloat16
    assert torch.equal(newton_schulz(torch.zeros(4, 3), 5), torch.zeros(4, 3))


@pytest.mark.parametrize("precondition", ["before_ns", "after_ns"])
def test_m3_matches_algorithm_1_with_a_clocked_matrix(precondition):
    """A tall and a wide matrix; the wide one only gets a gradient every other step (a CMS level of
    period 2), so its state steps only then. 8 steps with f = 3 cross two slow steps."""
    torch.manual_seed(1)
    tall, wide = torch.nn.Parameter(torch.randn(6, 4)), torch.nn.Parameter(torch.randn(3, 5))
    start = {"tall": tall.detach().clone(), "wide": wide.detach().clone()}
    opt = M3([{"params": [tall, wide], "orthogonalize": True}], lr=1.0, precondition=precondition, **HP)
    lrs = [1e-2 * (1 - 0.1 * s) for s in range(8)]
    grads = {"tall": [], "wide": []}
    wide_lrs = []
    for s, lr in enumerate(lrs):
        opt.param_groups[0]["lr"] = lr
        tall.grad = torch.randn(6, 4)
        grads["tall"].append(tall.grad.clone())
        wide.grad = torch.randn(3, 5) if s % 2 == 1 else None
        if wide.grad is not None:
            grads["wide"].append(wide.grad.clone())
            wide_lrs.append(lr)
        opt.step()
    assert opt.state[tall]["step"].item() == 8 and opt.state[wide]["step"].item() == 4
    for name, p, step_lrs in (("tall", tall, lrs), ("wide", wide, wide_lrs)):
        ref = algorithm_1(start[name], grads[name], step_lrs, precondition, **HP)
        torch.testing.assert_close(p.detach().double(), ref, rtol=1e-5, atol=1e-6)


def test_non_matrix_groups_are_torch_adamw_bit_for_bit():
    torch.manual_seed(2)
    shapes = [(7,), (10, 4), (3,)]
    ours = [torch.nn.Parameter(torch.randn(s)) for s in shapes]
    theirs = [torch.nn.Parameter(p.detach().clone()) for p in ours]
    opt = M3([{"params": ours[:2]}, {"params": ours[2:], "weight_decay": 0.0}], lr=3e-3, precondition="before_ns", **HP)
    ref = torch.optim.AdamW([{"params": theirs[:2]}, {"params": theirs[2:], "weight_decay": 0.0}], lr=3e-3,
                            betas=HP["betas"], eps=HP["eps"], weight_decay=HP["weight_decay"])
    for _ in range(4):
        for a, b in zip(ours, theirs):
            a.grad = torch.randn_like(a)
            b.grad = a.grad.clone()
        opt.step()
        ref.step()
    for a, b in zip(ours, theirs):
        assert torch.equal(a, b)
        assert torch.equal(opt.state[a]["exp_avg_sq"], ref.state[b]["exp_avg_sq"])


@pytest.mark.parametrize("key, value", [("name", "sgd"), ("precondition", "inside"), ("beta1", 1.0),
                                        ("beta2", -0.1), ("beta3", 1.5), ("alpha", -1), ("ns_steps", 0),
                                        ("slow_every", 0)])
def test_bad_optim_values_name_the_key(random_dataset, tmp_path, key, value):
    prefix, vocab, eod = random_dataset
    with pytest.raises(ConfigError, match=f"optim.{key}="):
        load_config(None, tiny_overrides(prefix, vocab, eod, tmp_path, **{f"optim.{key}": value}))


def test_adamw_stays_the_default(random_dataset, tmp_path):
    assert type(make_trainer(random_dataset, tmp_path).optimizer) is torch.optim.AdamW


def test_clocked_levels_step_their_m3_state_only_on_ticks(random_dataset, tmp_path):
    """CMS periods (1, 2, 4), f = 2, 8 steps: a level's step count is its ticks, its weights change
    only at them, and its slow momentum refreshes every 2 of its own steps."""
    trainer = make_trainer(random_dataset, tmp_path, **{"optim.name": "m3", "optim.slow_every": 2})
    opt = trainer.optimizer
    names = {id(p): n for n, p in trainer.model.named_parameters()}
    m3_names = {names[id(p)] for g in opt.param_groups if g["orthogonalize"] for p in g["params"]}
    linear = {n for n in names.values() if re.search(r"mixer\.(proj\.\w+|out)\.weight$|mlp\.\w+\.weight$", n)}
    assert m3_names == linear and len(linear) == 2 * (4 + 3 * 3)  # per layer: mixer a, q, g, out; 3 x SwiGLU
    owners = [sum(any(p is q for q in g["params"]) for g in opt.param_groups) for p in trainer.model.parameters()]
    assert owners == [1] * len(owners)
    period = {"base": 1, "cms.0": 1, "cms.1": 2, "cms.2": 4}
    level2 = [p for g in opt.param_groups if g["clock"] == "cms.2" and g["orthogonalize"] for p in g["params"]]
    for s in range(8):
        before = [p.detach().clone() for p in level2]
        trainer.train_step()
        changed = [not torch.equal(b, p) for b, p in zip(before, level2)]
        assert all(changed) if (s + 1) % 4 == 0 else not any(changed), s
    for g in opt.param_groups:
        for p in g["params"]:
            st = opt.state[p]
            assert st["step"].item() == 8 // period[g["clock"]], (names[id(p)], st["step"])
            if g["orthogonalize"]:  # refreshed at own steps 1 (from zeros), 3, 5, 7
                assert (st["slow_update"].abs().sum() > 0) == (period[g["clock"]] <= 2), names[id(p)]


def test_resume_is_bit_exact(random_dataset, tmp_path):
    """Resume at step 3 (between slow steps, and between ticks of the period-4 level) reproduces
    the rest of the run and the final parameters and M3 state bit for bit."""
    prefix, vocab, eod = random_dataset
    extra = {"optim.name": "m3", "optim.slow_every": 2, "training.steps": 8, "checkpoint.interval": 3,
             "checkpoint.keep_last": 5}
    full_dir, resumed_dir = tmp_path / "full", tmp_path / "resumed"
    full = make_trainer(random_dataset, full_dir, **extra)
    full.train()
    (resumed_dir / "checkpoints").mkdir(parents=True)
    shutil.copytree(full_dir / "checkpoints" / "step-3", resumed_dir / "checkpoints" / "step-3")
    resumed = make_trainer(random_dataset, resumed_dir, **extra)
    resumed.train()
    a, b = read_losses(full_dir), read_losses(resumed_dir)
    assert sorted(b) == [3, 4, 5, 6, 7] and all(a[s] == b[s] for s in b), (a, b)
    for (n, p), q in zip(full.model.named_parameters(), resumed.model.parameters()):
        assert torch.equal(p, q), n
        for key, value in full.optimizer.state[p].items():
            assert torch.equal(value, resumed.optimizer.state[q][key]), (n, key)
