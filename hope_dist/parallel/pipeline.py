"""Pipeline parallelism: whole layers per stage, balanced by parameter count, torch schedules.

The rank keeps ONE HopeModel holding only the layers of its stages (plus the embedding on the
first stage and the norm and head on the last); parameter names stay global, so the clock,
optimizer and checkpoints do not see the pipeline. Each stage is a shallow view of that model
with its own layer subset, run by torch.distributed.pipelining. A layer's fast-weight state
lives in its stage's forward and never leaves the rank.

Document segments cannot travel through the pipeline with the activations, so every stage
computes them from the tokens it loaded itself (all pp ranks of a dp rank read the same batch)
and takes them in microbatch order, which is the forward order of every schedule here. The
stages' input and output shapes are given up front, so the pipeline runs no extra forward to
infer them (that would also take a microbatch's segments).
"""
from __future__ import annotations

import copy
from collections import deque

import torch
from torch import nn
from torch.distributed.pipelining import PipelineStage
from torch.distributed.pipelining.schedules import (Schedule1F1B, ScheduleGPipe,
                                                    ScheduleInterleaved1F1B)

from hope_dist.config import JobConfig
from hope_dist.model import HopeModel

SCHEDULES = {"1f1b": Schedule1F1B, "gpipe": ScheduleGPipe, "interleaved_1f1b": ScheduleInterleaved1F1B}


def stages_per_rank(schedule: str) -> int:
    return 2 if schedule == "interleaved_1f1b" else 1


def balanced_split(costs: list[int], n_stages: int, first_extra: int = 0, last_extra: int = 0) -> list[list[int]]:
    """Contiguous split of layers with `costs` into n_stages non-empty stages minimising the
    largest stage (embedding on the first stage, head on the last); exact dynamic program."""
    n = len(costs)
    if n_stages > n:
        raise ValueError(f"{n_stages} pipeline stages need at least {n_stages} layers, the model has {n}")
    prefix = [0]
    for c in costs:
        prefix.append(prefix[-1] + c)

    def cost(s: int, i: int, j: int) -> int:
        return prefix[j] - prefix[i] + (first_extra if s == 0 else 0) + (last_extra if s == n_stages - 1 else 0)

    inf = float("inf")
    best = [[inf] * (n + 1) for _ in range(n_stages + 1)]
    cut = [[0] * (n + 1) for _ in range(n_stages + 1)]
    best[0][0] = 0
    for s in range(1, n_stages + 1):
        for j in range(s, n + 1):
            for i in range(s - 1, j):
                value = max(best[s - 1][i], cost(s - 1, i, j))
                if value < best[s][j]:
                    best[s][j], cut[s][j] = value, i
    bounds, j = [], n
    for s in range(n_stages, 0, -1):
        bounds.append((cut[s][j], j))
        j = cut[s][j]
    return [list(range(i, j)) for i, j in reversed(bounds)]


def _numel(module: nn.Module | None) -> int:
    return sum(p.numel() for p in module.parameters()) if module is not None else 0


def plan_stages(model: HopeModel, n_stages: int) -> list[list[int]]:
    costs = [_numel(layer) for layer in model.layers.values()]
    return balanced_split(costs, n_stages, _numel(model.tok_embeddings),
                          _numel(model.norm) + _numel(model.output))


def describe_split(model: HopeModel, split: list[list[int]], pp: int) -> str:
    """One line per stage: rank, layers, parameters (embedding/head included)."""
    lines = []
    last = len(split) - 1
    for s, layers in enumerate(split):
        n = sum(_numel(model.layers[str(i)]) for i in layers)
        n += _numel(model.tok_embeddings) if s == 0 else 0
        n += _numel(model.norm) + _numel(model.output) if s == last else 0
        extra = (" + embedding" if s == 0 else "") + (" + norm/head" if s == last else "")
        lines.append(f"stage {s} (pp rank {s % pp}): layers {layers[0]}-{layers[-1]}{extra}, {n:,} parameters")
    return "\n".join(lines)


class _StageView(nn.Module):
    """One stage for PipelineStage: runs `part` (a view of the rank's model) with the document
    segments queued for its microbatches and, under training.carry_state, the key of each one's
    carried state in `store` (hope_dist/carried_state.py: this stage's layers' state)."""

    def __init__(self, part: HopeModel):
        super().__init__()
        self.part = part
        self.segs: deque = deque()
        self.keys: deque = deque()
        self.store = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        segs = self.segs.popleft() if self.segs else None
        key = self.keys.popleft() if self.keys else None
        if key is None:
            return self.part(x, segs)
        out, state = self.part(x, segs, state=self.store.get(key), return_state=True)
        self.store.put(key, state)
        return out


def _view(model: HopeModel, layers: list[int], first: bool, last: bool) -> HopeModel:
    view = copy.copy(model)  # shares parameters, submodules and hooks; own module dict
    view._modules = dict(model._modules)
    view.layers = nn.ModuleDict({str(i): model.layers[str(i)] for i in layers})
    if not first:
        view.tok_embeddings = None
    if not last:
        view.norm = view.output = None
    return view


def split_model(model: HopeModel, cfg: JobConfig, pp_rank: int) -> tuple[list[_StageView], list[int], int, str]:
    """Prune `model` in place to this rank's stages; return their views, stage ids, the stage
    count and a description of the whole split."""
    pp = cfg.parallel.pp
    n_stages = pp * stages_per_rank(cfg.parallel.pp_schedule)
    split = plan_stages(model, n_stages)
    description = describe_split(model, split, pp)
    stage_ids = list(range(pp_rank, n_stages, pp))
    owned = {i for s in stage_ids for i in split[s]}
    for name in list(model.layers.keys()):
        if int(name) not in owned:
            del model.layers[name]
    if 0 not in stage_ids:
        model.tok_embeddings = None
    if n_stages - 1 not in stage_ids:
        model.norm = model.output = None
    views = [_StageView(_view(model, split[s], s == 0, s == n_stages - 1)) for s in stage_ids]
    return views, stage_ids, n_stages, description


class Pipeline:
    """Schedule + stages of this rank; `step` runs one slice of the local batch through it."""

    def __init__(self, views: list[_StageView], stage_ids: list[int], n_stages: int, cfg: JobConfig,
                 device: torch.device, group, loss_fn, logits_dtype: torch.dtype):
        self.views, self.stage_ids = views, stage_ids
        self.n_micro = cfg.parallel.pp_microbatches
        self.first = 0 in stage_ids
        self.last = n_stages - 1 in stage_ids
        m = cfg.model
        shape = (cfg.training.micro_batch // self.n_micro, cfg.training.seq_len)

        def meta(*size, dtype=torch.float32, grad=False):
            return torch.empty(*size, dtype=dtype, device="meta", requires_grad=grad)

        tokens, hidden = meta(*shape, dtype=torch.int64), meta(*shape, m.d_model, grad=True)
        logits = meta(*shape, m.vocab_size // cfg.parallel.tp, dtype=logits_dtype, grad=True)
        stages = [PipelineStage(v, s, n_stages, device, group=group,
                                input_args=tokens if s == 0 else hidden,
                                output_args=logits if s == n_stages - 1 else hidden)
                  for v, s in zip(views, stage_ids)]
        cls = SCHEDULES[cfg.parallel.pp_schedule]
        arg = stages if cls is ScheduleInterleaved1F1B else stages[0]
        self.schedule = cls(arg, self.n_micro, loss_fn=loss_fn, scale_grads=False)

    def step(self, tokens: torch.Tensor, labels: torch.Tensor, segs_of, backward: bool = True,
             carried: tuple | None = None) -> torch.Tensor:
        """Forward+backward (or forward only) `tokens` in `n_micro` microbatches; returns this rank's
        loss sum (zero off the last stage). segs_of(tokens, carry) -> Segments or None, per microbatch.
        carried: (CarriedState, the micro-batch's key, its rows' carry mask) under training.carry_state."""
        masks = carried[2].tensor_split(self.n_micro) if carried else [None] * self.n_micro
        for view, stage in zip(self.views, self.stage_ids):
            view.segs.extend(segs_of(t, m) for t, m in zip(tokens.tensor_split(self.n_micro), masks))
            if carried:
                view.store = carried[0]
                view.keys.extend(f"{carried[1]}.s{stage}.p{j}" for j in range(self.n_micro))
        losses: list[torch.Tensor] = []
        args = (tokens,) if self.first else ()
        kwargs = {"target": labels, "losses": losses} if self.last else {}
        (self.schedule.step if backward else self.schedule.eval)(*args, **kwargs)
        if any(view.segs or view.keys for view in self.views):
            raise RuntimeError("a pipeline stage ran fewer forwards than microbatches")
        return torch.stack(losses).sum().detach() if losses else torch.zeros((), device=tokens.device)
