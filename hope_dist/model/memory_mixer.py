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
- Initial memories: W2 ~ N(0, 1/d_h) and W1 ~ N(0, init_std) (depth 2: M starts near the
  identity; `model.memory_w1_std` overrides W1's std); depth 1 starts at I + N(0, init_std). alpha
  starts near `model.alpha_init` (0.99: a horizon of ~100 tokens), eta near ETA_INIT = 0.1, and with
  momentum gamma near GAMMA_INIT = 0.9. The op's momentum is an
  EMA of the inner gradients (S_t = gamma S_{t-1} + (1 - gamma) G_t, docs/memory_op.md "Momentum"),
  so its step is eta whatever gamma is: the heavy-ball form's eta / (1 - gamma) made the
  chunk-start gradient, repeated on repetitive text, overshoot and diverge (issue 18).
- Depth 2: W1 follows the delta rule along its unit input, W1 (alpha I - eta hn hn^T) - eta S1 with
  hn = l2norm(h) (`model.w1_delta`, default on; docs/memory_op.md "W1's delta rule"): with the spec's
  gated update alpha W1 - eta S1 the stale chunk-start gradient of W1 accumulates with every repeat
  of a key and HOPE's M_alpha/M_eta memories reached norms of 1e12 in training.
- The op runs with autocast off in at least float32 (the fast-weight state is float32 by contract).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from hope_dist.config import ModelConfig
from hope_dist.model.conv import CausalConv
from hope_dist.model.memory_health import longest_document, memory_health
from hope_dist.model.norms import RMSNorm
from hope_dist.model.segments import Segments
from kernels.hope_memory import hope_memory, l2norm
from kernels.hope_memory.types import MemoryParams


ETA_INIT, GAMMA_INIT = 0.1, 0.9


def _logit(p: float) -> float:
    return math.log(p / (1 - p))


class MemoryMixer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        d, H = cfg.d_model, cfg.n_heads
        dh = cfg.head_dim
        dm = cfg.memory_hidden or dh
        self.cfg = cfg
        self.head_dim = dh
        self.selfmod = cfg.mixer == "selfmod"
        self.init_std = cfg.init_std
        self.out_std = cfg.init_std / math.sqrt(2 * cfg.n_layers)
        inputs = ("a", "q") if self.selfmod else ("q", "k", "v")
        self.proj = nn.ModuleDict({name: nn.Linear(d, d, bias=False) for name in (*inputs, "g")})
        self.conv = nn.ModuleDict({name: CausalConv(d, cfg.conv_width) for name in inputs})
        if not self.selfmod:
            # eta and alpha logits per head, one Linear each so a column split keeps heads whole
            self.rates = nn.ModuleDict({name: nn.Linear(d, H, bias=True) for name in ("eta", "alpha")})
        n_mem = 5 if self.selfmod else 1
        if cfg.memory_depth == 2:
            self.mem_w1 = nn.Parameter(torch.empty(n_mem, H, dh, dm))
            self.mem_w2 = nn.Parameter(torch.empty(n_mem, H, dm, dh))
        else:
            self.register_parameter("mem_w1", None)
            self.mem_w2 = nn.Parameter(torch.empty(n_mem, H, dh, dh))
        if self.selfmod:
            self.eta_w = nn.Parameter(torch.empty(H, dh))
            self.eta_b = nn.Parameter(torch.empty(H))
            self.alpha_w = nn.Parameter(torch.empty(H, dh))
            self.alpha_b = nn.Parameter(torch.empty(H))
        self.gamma = nn.Parameter(torch.empty(H)) if cfg.use_momentum else None
        self.out_norm = RMSNorm(dh, cfg.norm_eps)
        self.out = nn.Linear(d, d, bias=False)
        self.probe_health = False  # set by the trainer: the next forward records `health`
        self.health: dict[str, float] | None = None

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
            nn.init.normal_(self.mem_w2, std=dh ** -0.5)
        else:
            nn.init.normal_(self.mem_w2, std=self.init_std)
            self.mem_w2.add_(torch.eye(dh, device=self.mem_w2.device, dtype=self.mem_w2.dtype))
        if self.selfmod:
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

    def _params(self) -> MemoryParams:
        if self.selfmod:
            return MemoryParams(self.mem_w1, self.mem_w2, self.eta_w, self.eta_b,
                                self.alpha_w, self.alpha_b, self.gamma)
        return MemoryParams(self.mem_w1, self.mem_w2, gamma=self.gamma)

    def _op_flags(self) -> dict:
        c = self.cfg
        return dict(chunk_size=c.chunk_size, proj_chunk_size=c.proj_chunk_size, eta_max=c.eta_max,
                    selfgen=c.selfgen_values,
                    stopgrad_vhat=c.stopgrad_vhat, w1_delta=c.w1_delta)

    def _kernel(self, device: torch.device) -> str:
        """auto: Triton on CUDA, the chunked PyTorch path on CPU, with momentum and with W1's delta
        rule at depth 2 (both of which the Triton kernels leave to the PyTorch paths)."""
        if self.cfg.kernel != "auto":
            return self.cfg.kernel
        triton_ok = self.gamma is None and (self.mem_w1 is None or not self.cfg.w1_delta)
        return "triton" if device.type == "cuda" and triton_ok else "torch"

    def forward(self, x: torch.Tensor, segs: Segments | None = None, state: dict | None = None,
                return_state: bool = False) -> tuple[torch.Tensor, dict | None]:
        """state: what an earlier call returned (None: a fresh sequence); return_state: give
        back the fast-weight and conv state to carry into the next segment."""
        B, T, _ = x.shape
        dh = self.head_dim
        conv_cache = state["conv"] if state is not None else {}
        new_conv = {}
        feats = {}
        seg = segs.seg if segs is not None else None
        for name, conv in self.conv.items():
            y, new_conv[name] = conv(self.proj[name](x), seg, conv_cache.get(name))
            feats[name] = F.silu(y).view(B, T, -1, dh)
        q = l2norm(feats["q"])
        kwargs = {}
        if self.selfmod:
            kwargs["a"] = feats["a"]
        else:
            dt = torch.promote_types(x.dtype, torch.float32)
            eta_logit, alpha_logit = (self.rates[name](x).to(dt) for name in ("eta", "alpha"))
            kwargs.update(k=l2norm(feats["k"]), v=l2norm(feats["v"]),
                          eta=self.cfg.eta_max * torch.sigmoid(eta_logit),
                          alpha=torch.sigmoid(alpha_logit))
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
        if segs is not None and segs.cu_seqlens is not None:
            if state is not None or return_state:
                raise ValueError("carrying fast-weight state across calls is not supported together "
                                 "with document resets inside the batch; pass one document per row")
            flat = {k: v.reshape(1, B * T, *v.shape[2:]) for k, v in kwargs.items()}
            # host offsets and max_seqlen made once per batch (segments.py): no sync in here
            o, _ = hope_memory(q.reshape(1, B * T, *q.shape[2:]), params, cu_seqlens=segs.cu_seqlens,
                               cu_seqlens_cpu=segs.cu_seqlens_cpu, max_seqlen=segs.max_seqlen,
                               **flat, **common)
            return o.view(B, T, *o.shape[2:]), None
        initial = state["memory"] if state is not None else None
        return hope_memory(q, params, initial_state=initial, output_final_state=return_state,
                           **kwargs, **common)
