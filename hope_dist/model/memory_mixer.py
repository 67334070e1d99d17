"""The `selfmod` (HOPE) and `titans` mixers of docs/model.md sections 1-2.

Both project x, run the memory op of kernels/hope_memory over the heads, then normalise each
head's read-out, gate it by silu(g) and project back. They differ only in where k, v, eta and
alpha come from: the four projection memories (selfmod) or outer linear maps (titans).
The head count is read from the parameters' shapes at run time, so a tensor-parallel layer
that hands this module only its own heads needs no change here.

Choices the spec leaves open (tested in tests/unit/test_model.py):
- q (and titans' k, v) are normalised with the op's own l2norm (x / sqrt(|x|^2 + 1e-6)).
- titans: k and v pass the same causal conv + SiLU as q, then L2 norm; eta and alpha are
  sigmoid read-outs of x (eta scaled by eta_max).
- Initial memories: W2 ~ N(0, 1/d_h) and W1 ~ N(0, init_std) (depth 2: M starts near the identity;
  `model.memory_w1_std` and `model.memory_w2_std` override the stds); depth 1 starts at I + N(0, init_std).
  alpha starts near `model.alpha_init`, eta near ETA_INIT = 0.1, gamma (momentum) near GAMMA_INIT = 0.9.
- The update rule (momentum as an EMA, W1's delta rule) and why: docs/model.md section 2.4 and
  docs/memory_op.md. The selfmod inputs (`model.memory_inputs`) and retention toward M_0
  (`model.retain_init`): docs/model.md section 2.10.
- The op runs with autocast off in at least float32 (the fast-weight state is float32 by contract).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from hope_dist.config import ModelConfig
from hope_dist.model.carry import end_states, row_documents, start_states, zero_rows
from hope_dist.model.conv import CausalConv
from hope_dist.model.memory_health import longest_document, memory_health
from hope_dist.model.norms import RMSNorm
from hope_dist.model.plan_types import ParamPlan, linear_plan, projections_plan
from hope_dist.model.segments import Segments
from kernels.hope_memory import has_triton_path, hope_memory, l2norm
from kernels.hope_memory.common import initial_memory_state
from kernels.hope_memory.types import MemoryParams


ETA_INIT, GAMMA_INIT = 0.1, 0.9
PER_MEMORY_INPUTS = ("a_k", "a_v", "a_eta", "a_alpha")  # memory_inputs: per_memory, in the op's memory order
# head axis of the mixer's own parameters (mem_w*: (n_mem, H, ., .); the rest: (H, ...))
HEAD_AXIS = {"mem_w1": 1, "mem_w2": 1, "eta_w": 0, "eta_b": 0, "alpha_w": 0, "alpha_b": 0, "gamma": 0}


def _logit(p: float) -> float:
    return math.log(p / (1 - p))


class MemoryMixer(nn.Module):
    """selfmod=True: the five self-modifying memories (HOPE); False: one Titans memory (hope_dist/mixer_specs.py)."""

    def __init__(self, cfg: ModelConfig, selfmod: bool):
        super().__init__()
        d, H = cfg.d_model, cfg.n_heads
        dh = cfg.head_dim
        dm = cfg.memory_hidden or dh
        self.cfg = cfg
        self.head_dim = dh
        self.selfmod = selfmod
        self.init_std = cfg.init_std
        self.out_std = cfg.init_std / math.sqrt(2 * cfg.n_layers)
        self.sources = self._sources(cfg.memory_inputs if selfmod else None)
        self.proj = nn.ModuleDict({name: nn.Linear(d, d, bias=False) for name in (*dict.fromkeys(self.sources.values()),
                                                                                   "g")})
        self.conv = nn.ModuleDict({name: CausalConv(d, cfg.conv_width) for name in self.sources})
        self.outer_rates = not selfmod or cfg.rates_from == "input"
        if self.outer_rates:
            # eta and alpha logits per head, one Linear each so a column split keeps heads whole
            self.rates = nn.ModuleDict({name: nn.Linear(d, H, bias=True) for name in ("eta", "alpha")})
        n_mem = 5 if self.selfmod else 1
        if cfg.memory_depth == 2:
            self.mem_w1 = nn.Parameter(torch.empty(n_mem, H, dh, dm))
            self.mem_w2 = nn.Parameter(torch.empty(n_mem, H, dm, dh))
        else:
            self.register_parameter("mem_w1", None)
            self.mem_w2 = nn.Parameter(torch.empty(n_mem, H, dh, dh))
        if not self.outer_rates:  # selfmod's read-outs of M_eta, M_alpha
            self.eta_w = nn.Parameter(torch.empty(H, dh))
            self.eta_b = nn.Parameter(torch.empty(H))
            self.alpha_w = nn.Parameter(torch.empty(H, dh))
            self.alpha_b = nn.Parameter(torch.empty(H))
        self.gamma = nn.Parameter(torch.empty(H)) if cfg.use_momentum else None
        self.out_norm = RMSNorm(dh, cfg.norm_eps)
        self.out = nn.Linear(d, d, bias=False)
        self.probe_health = False  # set by the trainer: the next forward records `health`
        self.health: dict[str, float] | None = None

    @staticmethod
    def _sources(memory_inputs: str | None) -> dict[str, str]:
        """Each convolved feature -> the projection of x it convolves (docs/model.md 2.1 and 2.10)."""
        if memory_inputs is None:  # titans
            return {"q": "q", "k": "k", "v": "v"}
        if memory_inputs == "shared":
            return {"a": "a", "q": "q"}
        if memory_inputs == "per_memory":
            return {**{n: n for n in PER_MEMORY_INPUTS}, "q": "q"}
        return {**{n: "a" for n in PER_MEMORY_INPUTS}, "q": "q"}  # per_memory_conv: one projection, four convs

    @torch.no_grad()
    def init_weights(self) -> None:
        for lin in self.proj.values():
            nn.init.normal_(lin.weight, std=self.init_std)
        nn.init.normal_(self.out.weight, std=self.out_std)
        for conv in self.conv.values():
            conv.init_weights()
        self.out_norm.init_weights()
        dh = self.head_dim
        if self.mem_w1 is not None:
            nn.init.normal_(self.mem_w1, std=self.cfg.memory_w1_std or self.init_std)
            nn.init.normal_(self.mem_w2, std=self.cfg.memory_w2_std or dh ** -0.5)
        else:
            nn.init.normal_(self.mem_w2, std=self.init_std)
            self.mem_w2.add_(torch.eye(dh, device=self.mem_w2.device, dtype=self.mem_w2.dtype))
        if not self.outer_rates:
            nn.init.normal_(self.eta_w, std=self.init_std)
            nn.init.normal_(self.alpha_w, std=self.init_std)
            nn.init.constant_(self.eta_b, _logit(ETA_INIT))
            nn.init.constant_(self.alpha_b, _logit(self.cfg.alpha_init))
        else:
            for name, p0 in (("eta", ETA_INIT), ("alpha", self.cfg.alpha_init)):
                nn.init.normal_(self.rates[name].weight, std=self.init_std)
                nn.init.constant_(self.rates[name].bias, _logit(p0))
        if self.gamma is not None:
            nn.init.constant_(self.gamma, _logit(GAMMA_INIT))

    def parallel_plan(self) -> dict[str, ParamPlan]:
        """Keys relative to the mixer (hope_dist/model/parallel_plan.py): heads are split over tp ranks."""
        plan = projections_plan(self)
        if self.outer_rates:  # rate read-outs of x: one output per head, split like the projections
            for name, lin in self.rates.items():
                plan.update(linear_plan(lin, f"rates.{name}", "colwise", "mixer"))
        for name in self.conv:  # channels are heads x d_h, head-major
            plan[f"conv.{name}.weight"] = ParamPlan("heads", "mixer", head_axis=0)
        for name, axis in HEAD_AXIS.items():
            if getattr(self, name, None) is not None:
                plan[name] = ParamPlan("heads", "mixer", head_axis=axis)
        plan["out_norm.weight"] = ParamPlan("local", "mixer")  # one RMSNorm shared by all heads
        return plan

    def _params(self) -> MemoryParams:
        if self.selfmod and not self.outer_rates:
            return MemoryParams(self.mem_w1, self.mem_w2, self.eta_w, self.eta_b,
                                self.alpha_w, self.alpha_b, self.gamma)
        return MemoryParams(self.mem_w1, self.mem_w2, gamma=self.gamma)

    def _op_flags(self) -> dict:
        c = self.cfg
        return dict(chunk_size=c.chunk_size, proj_chunk_size=c.proj_chunk_size, eta_max=c.eta_max,
                    proj_rate=c.proj_rate if self.selfmod else 1.0, selfgen=c.selfgen_values,
                    stopgrad_vhat=c.stopgrad_vhat, w1_delta=c.w1_delta, w2_delta=c.w2_delta,
                    retain_init=c.retain_init, bound_step=c.bound_step, rate_norm=c.rate_norm and self.selfmod)

    def _kernel(self, device: torch.device) -> str:
        """auto: Triton on CUDA (momentum and W1's delta rule included), the chunked PyTorch path on
        CPU and for the options the kernels lack (retain_init, bound_step, proj_rate, rate_norm,
        w2_delta, rates_from, per-memory inputs)."""
        c = self.cfg
        if c.kernel != "auto":
            return c.kernel
        triton_ok = has_triton_path(self._op_flags(), c.memory_inputs != "shared", self.selfmod and self.outer_rates)
        return "triton" if device.type == "cuda" and triton_ok else "torch"

    def forward(self, x: torch.Tensor, segs: Segments | None = None, state: dict | None = None,
                return_state: bool = False) -> tuple[torch.Tensor, dict | None]:
        """state: what an earlier call returned (None: a fresh sequence); return_state: give
        back the fast-weight and conv state to carry into the next segment."""
        B, T, _ = x.shape
        dh = self.head_dim
        conv_cache = {n: zero_rows(c, segs) for n, c in state["conv"].items()} if state is not None else {}
        new_conv = {}
        feats = {}
        seg = segs.seg if segs is not None else None
        projected = {name: lin(x) for name, lin in self.proj.items() if name != "g"}
        for name, conv in self.conv.items():
            y, new_conv[name] = conv(projected[self.sources[name]], seg, conv_cache.get(name))
            feats[name] = F.silu(y).view(B, T, -1, dh)
        q = l2norm(feats["q"])
        kwargs = {}
        if self.selfmod:
            per_memory = self.cfg.memory_inputs != "shared"
            kwargs["a"] = torch.stack([feats[n] for n in PER_MEMORY_INPUTS], 2) if per_memory else feats["a"]
        else:
            kwargs.update(k=l2norm(feats["k"]), v=l2norm(feats["v"]))
        if self.outer_rates:
            dt = torch.promote_types(x.dtype, torch.float32)
            eta_logit, alpha_logit = (self.rates[name](x).to(dt) for name in ("eta", "alpha"))
            kwargs.update(eta=self.cfg.eta_max * torch.sigmoid(eta_logit), alpha=torch.sigmoid(alpha_logit))
        o, mem_state = self._run_memory(q, kwargs, segs, state, return_state)
        if self.probe_health:
            self.probe_health = False
            self.health = self._probe(q, kwargs, seg)
        g = self.proj["g"](x).view(B, T, -1, dh)
        o = self.out_norm(o.to(g.dtype)) * F.silu(g)
        y = self.out(o.reshape(B, T, -1))
        return y, ({"memory": mem_state, "conv": new_conv} if return_state else None)

    def _probe(self, q, kwargs, seg) -> dict[str, float]:
        """memory_health of the longest document in row 0, in float32 outside autocast."""
        doc = longest_document(None if seg is None else seg[0], q.shape[1])
        f32 = lambda x: x[:1, doc].detach().float()
        common = dict(self._op_flags(), impl="torch")
        params = MemoryParams(*(None if p is None else p.detach().float() for p in self._params()))
        with torch.autocast(q.device.type, enabled=False):
            return memory_health(f32(q), params, {n: f32(x) for n, x in kwargs.items()}, common)

    def _run_memory(self, q, kwargs, segs, state, return_state):
        """Packed documents become one varlen call in which the state resets at each start.
        The op itself computes in at least float32 with autocast off."""
        B, T = q.shape[:2]
        common = dict(self._op_flags(), impl=self._kernel(q.device))
        q, kwargs = q.to(torch.promote_types(q.dtype, torch.float32)), {
            k: v.to(torch.promote_types(v.dtype, torch.float32)) for k, v in kwargs.items()}
        params = MemoryParams(*(p.to(q.dtype) if p is not None else None for p in self._params()))
        docs = row_documents(segs, B, T, q.device) if state is not None or return_state else None
        initial = None
        if state is not None:  # the rows' carried states where they continue (model/carry.py)
            fresh = initial_memory_state(params, docs.row.shape[0])
            initial = start_states(state["memory"], fresh, docs)
        if segs is not None and segs.cu_seqlens is not None:
            flat = {k: v.reshape(1, B * T, *v.shape[2:]) for k, v in kwargs.items()}
            # host offsets and max_seqlen made once per batch (segments.py): no sync in here
            o, final = hope_memory(q.reshape(1, B * T, *q.shape[2:]), params, cu_seqlens=segs.cu_seqlens,
                                   cu_seqlens_cpu=segs.cu_seqlens_cpu, max_seqlen=segs.max_seqlen,
                                   initial_state=initial, output_final_state=return_state, **flat, **common)
            o = o.view(B, T, *o.shape[2:])
        else:
            o, final = hope_memory(q, params, initial_state=initial, output_final_state=return_state,
                                   **kwargs, **common)
        return o, (end_states(final, docs) if return_state else None)
