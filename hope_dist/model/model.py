"""The HOPE network of docs/model.md section 1; single-device code, parallelism is applied outside.

Layers live in a ModuleDict keyed by their global index, so a pipeline stage that deletes the
layers it does not own keeps the same parameter names (and checkpoints stay layout-free);
`tok_embeddings`, `norm` and `output` may likewise be None on middle stages.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from hope_dist.config import ModelConfig
from hope_dist.model.cms import CMS
from hope_dist.model.norms import RMSNorm
from hope_dist.model.parallel_plan import check_plan, model_plan
from hope_dist.model.segments import Segments


class Block(nn.Module):
    """h = x + Mixer(RMSNorm(x)); y = CMS(h)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.mixer_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.mixer = cfg.mixer_spec.build(cfg)  # hope_dist/mixer_specs.py
        self.cms = CMS(cfg)

    @torch.no_grad()
    def init_weights(self, init_std: float, out_std: float) -> None:
        self.mixer_norm.init_weights()
        self.mixer.init_weights()
        for level in self.cms.levels:
            level.norm.init_weights()
            level.mlp.init_weights(init_std, out_std)

    def forward(self, x, segs=None, state=None, return_state=False):
        """state: the mixer's state dict, plus the in-context CMS levels' states under "cms"."""
        y, new_state = self.mixer(self.mixer_norm(x), segs, state, return_state)
        out, cms_state = self.cms(x + y, segs, state.get("cms") if state is not None else None)
        if return_state and self.cms.in_context:
            new_state = {**new_state, "cms": cms_state}
        return out, new_state


class HopeModel(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.layers = nn.ModuleDict({str(i): Block(cfg) for i in range(cfg.n_layers)})
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.output = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight
        check_plan(self)  # every parameter has a parallel plan, whatever the layout

    @torch.no_grad()
    def init_weights(self) -> None:
        """Initialise every parameter in place (after meta-device construction + to_empty)."""
        std = self.cfg.init_std
        out_std = std / math.sqrt(2 * self.cfg.n_layers)
        if self.tok_embeddings is not None:
            nn.init.normal_(self.tok_embeddings.weight, std=std)
        for layer in self.layers.values():
            layer.init_weights(std, out_std)
        if self.norm is not None:
            self.norm.init_weights()
        if self.output is not None and not self.cfg.tie_embeddings:
            nn.init.normal_(self.output.weight, std=self.cfg.d_model ** -0.5)

    def forward(self, tokens: torch.Tensor, segs: Segments | None = None,
                state: list | None = None, return_state: bool = False):
        """tokens (B, T) int64 (or hidden states (B, T, d) on a pipeline stage without the
        embedding). segs: document segments (see segments.document_segments) so the state
        resets inside packed rows. state / return_state: carry per-layer fast-weight state
        across calls. Returns logits (or hidden states), plus the new state if asked."""
        h = self.tok_embeddings(tokens) if self.tok_embeddings is not None else tokens
        new_states = []
        for i, layer in enumerate(self.layers.values()):
            h, st = layer(h, segs, state[i] if state is not None else None, return_state)
            new_states.append(st)
        if self.norm is not None:
            h = self.norm(h)
        if self.output is not None:
            h = self.output(h)
        return (h, new_states) if return_state else h


def materialize(model: HopeModel, device: str | torch.device) -> HopeModel:
    """Give a meta-device model uninitialised storage on `device`; to_empty allocates each
    parameter separately, so tied embeddings are tied again."""
    model.to_empty(device=device)
    if model.cfg.tie_embeddings:
        model.output.weight = model.tok_embeddings.weight
    return model


def build_model(cfg: ModelConfig, device: str | torch.device = "cpu") -> HopeModel:
    """Construct on the meta device (no memory touched), materialise on `device`, initialise."""
    with torch.device("meta"):
        model = HopeModel(cfg)
    materialize(model, device).init_weights()
    return model


def count_parameters(model: HopeModel) -> dict[str, int]:
    """Parameter counts by part (the parallel plan's); tied weights are counted once."""
    plan = model_plan(model)
    counts = {"embedding": 0, "mixer": 0, "cms": 0, "norms_and_head": 0}
    for name, p in model.named_parameters():  # tied weights appear once
        counts[plan[name].part] += p.numel()
    counts["total"] = sum(counts.values())
    return counts
