"""Backend detection (computed once, at import) and the one dispatch rule every op uses.

Rule: CUDA tensors go to Triton; CPU tensors go to the C++ extension when it is built, else to
the pure-torch reference. CPU tensors never go to Triton unless forced with ``backend="triton"``
(tests do that in a process started with ``TRITON_INTERPRET=1``).
"""
from __future__ import annotations

import os

import torch

BACKENDS = ("triton", "cpp", "torch")

# Triton 3.9 warns when this is unset; keep its long-standing default (FMA fusion on) explicitly.
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

try:
    import triton  # noqa: F401

    HAS_TRITON = True
    TRITON_IMPORT_ERROR: str | None = None
except Exception as exc:  # ImportError, or a broken install on an unsupported platform
    HAS_TRITON = False
    TRITON_IMPORT_ERROR = repr(exc)

try:
    from rlhf_fast import _C  # type: ignore[attr-defined]

    HAS_EXT = True
    EXT_IMPORT_ERROR: str | None = None
except Exception as exc:
    _C = None
    HAS_EXT = False
    EXT_IMPORT_ERROR = repr(exc)

TRITON_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
DEBUG = os.environ.get("RLHF_FAST_DEBUG", "0") not in ("", "0")


def ext():
    """The compiled C++ module; raises with the build error if it is missing."""
    if _C is None:
        raise RuntimeError(f"rlhf_fast C++ extension is not built ({EXT_IMPORT_ERROR}); run `make ext`")
    return _C


def dispatch(tensor: torch.Tensor, backend: str | None = None) -> str:
    """Pick the backend for an op whose main input is ``tensor``.

    backend: None (automatic) or one of "triton", "cpp", "torch" to force one.
    Returns the backend name. Raises ValueError for an unknown or unusable forced backend.
    """
    if backend is None:
        if tensor.is_cuda:
            return "triton" if HAS_TRITON else "torch"
        if tensor.device.type == "cpu" and HAS_EXT:
            return "cpp"
        return "torch"
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS} or None, got {backend!r}")
    if backend == "triton":
        if not HAS_TRITON:
            raise ValueError(f"backend='triton' forced but triton is not importable ({TRITON_IMPORT_ERROR})")
        if not tensor.is_cuda and not TRITON_INTERPRET:
            raise ValueError(
                "backend='triton' on a CPU tensor needs a process started with TRITON_INTERPRET=1 "
                f"(got a tensor on {tensor.device})"
            )
    elif backend == "cpp":
        if not HAS_EXT:
            raise ValueError(f"backend='cpp' forced but the C++ extension is not built ({EXT_IMPORT_ERROR})")
        if tensor.device.type != "cpu":
            raise ValueError(f"backend='cpp' needs CPU tensors, got a tensor on {tensor.device}")
    return backend


def should_check_values(tensor: torch.Tensor) -> bool:
    """Value checks read data: always for CPU tensors, for CUDA only under RLHF_FAST_DEBUG=1."""
    return tensor.device.type == "cpu" or DEBUG


def describe() -> dict:
    """Backend facts for logs and benchmark rows."""
    return {
        "triton": HAS_TRITON,
        "cpp_ext": HAS_EXT,
        "triton_interpret": TRITON_INTERPRET,
        "torch": torch.__version__,
        "triton_version": getattr(__import__("triton"), "__version__", None) if HAS_TRITON else None,
    }
