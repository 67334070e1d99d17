"""CMS clocks (docs/model.md section 4): levels change exactly at their ticks, and the trainer's
step equals a hand-written reference loop of the same clocks (separate AdamW per level, window
sums in float32, window-token normalisation, one global clip over what steps)."""
import copy
import math

import pytest
import torch
import torch.nn.functional as F

from hope_dist.clock import build_clock_groups
from hope_dist.config import load_config
from hope_dist.data import build_train_stream
from hope_dist.model import build_model, document_segments
from hope_dist.trainer import Trainer

from helpers import tiny_overrides

PERIODS = (1, 2, 4)


def test_groups_follow_levels_and_ticks():
    cfg = load_config("configs/tiny.yaml", [
        "--model.cms=[{width: 8, period: 1}, {width: 8, period: 2, lr_scale: 0.5}, {width: 8, period: 4}]"])
    groups = {g.name: g for g in build_clock_groups(build_model(cfg.model))}
    assert [(n, g.period, g.lr_scale) for n, g in groups.items()] == [
        ("base", 1, 1.0), ("cms.0", 1, 1.0), ("cms.1", 2, 0.5), ("cms.2", 4, 1.0)]
    assert all(".cms.levels.2." in n for n, _ in groups["cms.2"].params)
    assert len(groups["cms.2"].params) == cfg.model.n_layers * 4  # norm, gate, up, down per layer
    assert [s for s in range(12) if groups["cms.2"].ticks(s)] == [3, 7, 11]
    assert [s for s in range(6) if groups["cms.1"].ticks(s)] == [1, 3, 5]


def _reference_lr(step, lr, warmup, total, min_ratio):
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return lr * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def test_trainer_matches_hand_written_clocked_loop(random_dataset, tmp_path):
    prefix, vocab, eod = random_dataset
    steps = 9
    cms = ", ".join(f"{{width: 32, period: {p}}}" for p in PERIODS)
    cfg = load_config(None, tiny_overrides(prefix, vocab, eod, tmp_path / "run", **{
        "model.cms": f"[{cms}]", "training.steps": steps, "optim.grad_clip": 0.05}))
    trainer = Trainer(cfg)
    ref = copy.deepcopy(trainer.model)
    o, t = cfg.optim, cfg.training

    # the reference: one AdamW per clock group, its own accumulators and token windows
    levels = {g.name: (g.period, [dict(ref.named_parameters())[n] for n, _ in g.params])
              for g in build_clock_groups(ref)}
    opts = {}
    for name, (_, params) in levels.items():
        opts[name] = torch.optim.AdamW(
            [{"params": [p for p in params if p.ndim >= 2], "weight_decay": o.weight_decay},
             {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}],
            lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps)
    window = {id(p): torch.zeros_like(p) for _, ps in levels.values() for p in ps}
    window_tokens = {name: 0 for name in levels}
    stream = build_train_stream([str(prefix)], None, seq_len=t.seq_len, global_batch=t.global_batch,
                                dp_rank=0, dp_size=1, seed=t.seed, eod_id=eod)

    for step in range(steps):
        before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
        metrics = trainer.train_step()

        batch = stream.next_batch()
        loss_sum = 0.0
        for tok, lab in zip(batch["tokens"].split(t.micro_batch), batch["labels"].split(t.micro_batch)):
            logits = ref(tok, document_segments(tok, eod))
            loss = F.cross_entropy(logits.flatten(0, 1), lab.flatten(), reduction="sum")
            loss.backward()
            loss_sum += loss.item()
        assert metrics["loss"] == pytest.approx(loss_sum / batch["labels"].numel(), rel=1e-6)
        ticking = []
        for name, (period, params) in levels.items():
            window_tokens[name] += batch["labels"].numel()
            for p in params:
                window[id(p)] += p.grad
                p.grad = None
            if (step + 1) % period == 0:
                ticking.append(name)
                for p in params:
                    p.grad = window[id(p)] / window_tokens[name]
                    window[id(p)] = torch.zeros_like(p)
                window_tokens[name] = 0
        grads = [p.grad for name in ticking for p in levels[name][1]]
        norm = math.sqrt(sum(g.double().pow(2).sum().item() for g in grads))  # float64, as the trainer
        coef = o.grad_clip / (norm + 1e-6)
        if coef < 1:
            for g in grads:
                g.mul_(coef)
        for name in ticking:
            for group in opts[name].param_groups:
                group["lr"] = _reference_lr(step, o.lr, o.warmup_steps, t.steps, o.min_lr_ratio)
            opts[name].step()
        ref.zero_grad(set_to_none=True)
        assert sorted(metrics["ticked"]) == sorted(ticking)
        assert metrics["grad_norm"] == pytest.approx(norm, rel=1e-6)

        # a level's parameters change exactly at its ticks
        for name, (_period, params) in levels.items():
            names = [n for n, p in ref.named_parameters() if any(p is q for q in params)]
            changed = [not torch.equal(before[n], dict(trainer.model.named_parameters())[n]) for n in names]
            if name in ticking:
                assert all(changed), (step, name)
            else:
                assert not any(changed), (step, name)

        for (n, p), q in zip(trainer.model.named_parameters(), ref.parameters()):
            torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-7, msg=lambda m: f"step {step} {n}: {m}")
