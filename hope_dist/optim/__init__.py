"""The trainer's optimizers (build.py) and M3 (Nested Learning, Algorithm 1); see docs/optim.md."""
from hope_dist.optim.build import build_adamw, build_m3, build_optimizer
from hope_dist.optim.m3 import M3, hidden_matrices
from hope_dist.optim.newton_schulz import newton_schulz, orthogonalize

__all__ = ["M3", "build_adamw", "build_m3", "build_optimizer", "hidden_matrices", "newton_schulz", "orthogonalize"]
