"""The default process group, on a store that a torchrun restart cannot confuse.

torchrun's c10d rendezvous hands its own TCPStore to the workers (TORCHELASTIC_USE_AGENT_STORE) and
keeps it across `--max-restarts` restarts, and torch (2.13) writes the workers' keys without a
per-attempt prefix ("We create a new TCPStore for every retry", torch/distributed/rendezvous.py,
which is not what the shared store does). A restarted rank can then read its peer's gloo address
from the attempt before: `Connection refused` until gloo's retries run out, or a connect to a port
that a new process now owns, which hangs in `tcp::Pair::waitUntilConnected` past every timeout
(measured in the chaos runs, docs/reliability.md). Prefixing the store with TORCHELASTIC_RESTART_COUNT
gives each attempt its own keys; every group made later (device mesh, async-save group) inherits it.
"""
from __future__ import annotations

import os
from datetime import timedelta

import torch.distributed as dist


def init_default_group(backend: str, timeout_s: float) -> None:
    timeout = timedelta(seconds=timeout_s)
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":  # plain env:// (rank 0 hosts a fresh store)
        dist.init_process_group(backend, timeout=timeout)
        return
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    agent_store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world,
                                is_master=False, timeout=timeout)
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    store = dist.PrefixStore(f"hope_dist/attempt_{attempt}/", agent_store)
    dist.init_process_group(backend, store=store, rank=rank, world_size=world, timeout=timeout)
