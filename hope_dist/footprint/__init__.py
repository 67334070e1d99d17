"""Memory per device of a training job, estimated before it starts (docs/memory.md)."""
from hope_dist.footprint.check import MemoryBudgetError, check_memory, device_budget
from hope_dist.footprint.estimate import Estimate, cheapest_fit, estimate, state_bytes, with_overrides

__all__ = ["Estimate", "MemoryBudgetError", "check_memory", "cheapest_fit", "device_budget", "estimate",
           "state_bytes", "with_overrides"]
