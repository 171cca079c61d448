"""What the backbone ops' C++ kernels (csrc/backbone.cpp) read: fp32 and bf16, named by a dtype code.

fp16 CPU tensors take the op's torch reference instead (``cpp_backend_for``): fp16 compute on CPU is
rare, and an fp16 path would mean a third set of rounding rules in C++ for no user.
"""
from __future__ import annotations

import torch

CPP_DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1}


def dtype_code(dtype: torch.dtype) -> int:
    """0 for fp32, 1 for bf16 (csrc/ops.h kF32 / kBF16)."""
    return CPP_DTYPE_CODES[dtype]


def cpp_backend_for(chosen: str, *dtypes: torch.dtype) -> str:
    """``chosen``, or "torch" when it is "cpp" and a dtype is one the C++ kernels do not read."""
    if chosen == "cpp" and any(d not in CPP_DTYPE_CODES for d in dtypes):
        return "torch"
    return chosen


def ptr(t: torch.Tensor | None) -> int:
    """Data pointer for the C++ kernels (0 for an absent optional tensor)."""
    return 0 if t is None else t.data_ptr()
