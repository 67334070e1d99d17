"""The sequence mixers this stack builds, by `model.mixer` name, and what each of them can do.

One entry per mixer: the class that implements it and the capabilities the model, trainer, evals
and tools ask about instead of comparing names or classes. A new mixer is its module under
hope_dist/model/ (a class taking the ModelConfig, with forward, init_weights and parallel_plan)
plus one entry here. Free of torch and of hope_dist.model, so the config checks a name when it loads.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass


@dataclass(frozen=True)
class MixerSpec:
    impl: str
    """"module:Class" of the implementation, built as Class(cfg, **dict(kwargs))"""
    summary: str
    """one line for --help and reports"""
    recurrent: bool
    """carries a fixed-size state across calls (False: a KV cache that grows with the context)"""
    memory_health: bool
    """records memory-health probes (probe_health / health) for the trainer's metrics"""
    triton: bool
    """has Triton kernels (used on CUDA where the configuration allows, model.kernel=auto)"""
    default_momentum: bool = False
    """model.momentum: null means this"""
    kwargs: tuple = ()
    """constructor keyword arguments, as (name, value) pairs"""

    def build(self, cfg):
        module, cls = self.impl.split(":")
        return getattr(importlib.import_module(module), cls)(cfg, **dict(self.kwargs))


MIXERS = {
    "selfmod": MixerSpec("hope_dist.model.memory_mixer:MemoryMixer", "self-modifying Titans memories (HOPE)",
                         recurrent=True, memory_health=True, triton=True, kwargs=(("selfmod", True),)),
    "titans": MixerSpec("hope_dist.model.memory_mixer:MemoryMixer", "one Titans memory (the ablation)",
                        recurrent=True, memory_health=True, triton=True, default_momentum=True,
                        kwargs=(("selfmod", False),)),
    "attention": MixerSpec("hope_dist.model.attention:AttentionMixer", "causal softmax attention with RoPE "
                           "(Transformer++)", recurrent=False, memory_health=False, triton=False),
}
