"""The model's parallel plan (hope_dist/model/parallel_plan.py) is the one place that names its
structure: it covers every parameter of every mixer, and a parameter added without an entry fails
when the model is built, on every layout (the single-process one included)."""
import pytest
import torch
from torch import nn

from hope_dist.config import load_config
from hope_dist.model import HopeModel, build_model
from hope_dist.model.memory_mixer import MemoryMixer
from hope_dist.model.parallel_plan import TP_KINDS, PlanError, check_plan, fsdp_units

MIXERS = ["selfmod", "titans", "attention"]


def cfg(mixer, *extra):
    return load_config("configs/tiny.yaml", [f"--model.mixer={mixer}", "--model.vocab_size=64", *extra]).model


@pytest.mark.parametrize("mixer", MIXERS)
@pytest.mark.parametrize("extra", [[], ["--model.memory_depth=1", "--model.momentum=true"],
                                   ["--model.tie_embeddings=true"]])
def test_plan_covers_every_parameter_once(mixer, extra):
    model = build_model(cfg(mixer, *extra))
    plan = check_plan(model)
    assert set(plan) == {n for n, _ in model.named_parameters()}
    assert {p.tp for p in plan.values()} <= set(TP_KINDS)
    assert all(p.head_axis is not None for p in plan.values() if p.tp == "heads")
    levels = len(model.cfg.cms)
    assert {p.clock for p in plan.values()} == {"base", *(f"cms.{i}" for i in range(levels))}
    for name, p in plan.items():  # a CMS level's parameters, and only they, follow its clock
        assert (p.clock != "base") == (".cms.levels." in name), name


def test_fsdp_units_are_levels_then_blocks_then_ends():
    model = build_model(cfg("selfmod"))
    units = fsdp_units(model)
    n_levels, n_layers = len(model.cfg.cms), model.cfg.n_layers
    assert len(units) == n_layers * (n_levels + 1) + 3
    assert [g for _, g in units[:n_levels + 1]] == [f"cms.{i}" for i in range(n_levels)] + ["base"]
    assert units[n_levels][0] is model.layers["0"]
    covered = {id(p) for m, _ in units for p in m.parameters()}
    assert covered == {id(p) for p in model.parameters()}


def test_a_parameter_added_to_the_mixer_fails_when_the_model_is_built(monkeypatch):
    init = MemoryMixer.__init__

    def with_extra(self, c, **kw):
        init(self, c, **kw)
        self.scale = nn.Parameter(torch.ones(c.n_heads))

    monkeypatch.setattr(MemoryMixer, "__init__", with_extra)
    with pytest.raises(PlanError, match=r"'layers\.0\.mixer\.scale'.*no entry in HopeModel's parallel plan "
                                        r"\(hope_dist/model/parallel_plan\.py\)"):
        HopeModel(cfg("selfmod"))
