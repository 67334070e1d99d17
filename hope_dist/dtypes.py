"""The weight dtypes a user names (--dtype of the tools, lm-eval's dtype=, config.json's torch_dtype):
one map, spelled as torch and Hugging Face spell them."""
from __future__ import annotations

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float64": torch.float64}


def dtype_name(dtype: torch.dtype) -> str:
    """The DTYPES key of `dtype` (config.json's torch_dtype)."""
    return {v: k for k, v in DTYPES.items()}[dtype]
