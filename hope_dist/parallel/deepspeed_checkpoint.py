"""DeepSpeed checkpoint folders read without running code a pickle carries (docs/checkpoints.md).

A .pt file is a pickle: unpickling one from elsewhere can call any function it names. Our own
files (the model's weights, hope_rank{r}.pt) load with torch.load(weights_only=True): tensors and
plain containers only. DeepSpeed's resume unpickles its ZeRO files itself (weights_only=False), so
before it does, every .pt of the folder is checked to name no global beyond DEEPSPEED_GLOBALS.
Needs no DeepSpeed install: tools.convert reads these folders anywhere.
"""
from __future__ import annotations

import pickle
import re
from pathlib import Path
from typing import Any

import torch

from hope_dist.checkpoint import DEEPSPEED_MODEL, CheckpointError

# The non-tensor types DeepSpeed 0.19 pickles into its ZeRO optimizer files, and nothing else.
DEEPSPEED_GLOBALS = frozenset({"deepspeed.utils.tensor_fragment.fragment_address",
                               "deepspeed.runtime.zero.config.ZeroStageEnum",
                               "deepspeed.runtime.fp16.loss_scaler.LossScaler"})


def _refused(file: Path, what: str) -> CheckpointError:
    return CheckpointError(f"{file}: refused to unpickle {what}, which could run code when loaded; only tensors, "
                           f"plain containers and DeepSpeed's own types are read: use a checkpoint written by "
                           f"hope_dist, or re-save this one's tensors where you trust its source")


def check_globals(file: Path, allowed: frozenset[str] = frozenset()) -> None:
    """Raise a CheckpointError if the pickle `file` names a global beyond torch's safe types and `allowed`."""
    try:
        found = torch.serialization.get_unsafe_globals_in_checkpoint(str(file))
    except (RuntimeError, pickle.UnpicklingError, ValueError) as e:
        raise CheckpointError(f"{file}: not a readable torch checkpoint ({type(e).__name__}: {e})") from None
    unsafe = sorted(set(found) - allowed)
    if unsafe:
        raise _refused(file, ", ".join(unsafe))


def load_tensors(file: Path, map_location: str | torch.device = "cpu") -> Any:
    """torch.load of `file` with weights_only=True, a refused global named in one line."""
    file = Path(file)
    check_globals(file)
    try:
        return torch.load(file, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:  # what the globals scan cannot see (a blocked opcode)
        found = re.search(r"GLOBAL (\S+)", str(e))
        raise _refused(file, found.group(1) if found else "an object torch's safe loader blocks") from None


def check_folder(path: Path) -> None:
    """Before DeepSpeed's own loader reads `path`: every .pt in it names only DEEPSPEED_GLOBALS."""
    for file in sorted(Path(path).glob("*.pt")):
        check_globals(file, DEEPSPEED_GLOBALS)


def read_model(path: Path) -> dict[str, torch.Tensor]:
    """The model's full tensors from a DeepSpeed checkpoint folder, keyed as in HopeModel.state_dict()."""
    return load_tensors(Path(path) / DEEPSPEED_MODEL)["module"]
