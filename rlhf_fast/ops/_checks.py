"""Argument checks shared by the ops' public functions.

Shape/dtype/device checks are free and always on. Value checks read data, so they run for CPU
tensors always and for CUDA tensors only under RLHF_FAST_DEBUG=1 (no host sync in the hot path).
"""
from __future__ import annotations

import torch

from rlhf_fast._backend import should_check_values

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def check_floating(name: str, t: torch.Tensor) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in FLOAT_DTYPES:
        raise ValueError(f"{name} must be float32, bfloat16 or float16, got {t.dtype}")


def check_same_shape(ref_name: str, ref: torch.Tensor, **others: torch.Tensor | None) -> None:
    for name, t in others.items():
        if t is None:
            continue
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.shape != ref.shape:
            raise ValueError(
                f"{name} must have the shape of {ref_name} {tuple(ref.shape)}, got {tuple(t.shape)}"
            )
        if t.device != ref.device:
            raise ValueError(f"{name} must be on {ref_name}'s device {ref.device}, got {t.device}")


def check_mask(name: str, mask: torch.Tensor) -> torch.Tensor:
    """Validate a 0/1 mask and return it as bool (free for bool masks)."""
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(mask).__name__}")
    if mask.dtype == torch.bool:
        return mask
    if should_check_values(mask) and mask.numel() > 0:
        bad = (mask != 0) & (mask != 1)
        if bool(bad.any()):
            raise ValueError(
                f"{name} must hold only 0 and 1, found {mask[bad].flatten()[0].item()!r}"
            )
    return mask != 0


def check_finite(name: str, t: torch.Tensor) -> None:
    if should_check_values(t) and t.numel() > 0 and not bool(torch.isfinite(t).all()):
        raise ValueError(f"{name} contains NaN or inf")


def check_positive(name: str, value: float, *, allow_zero: bool = False) -> None:
    if value is None or not (value > 0 or (allow_zero and value == 0)):
        bound = ">= 0" if allow_zero else "> 0"
        raise ValueError(f"{name} must be {bound}, got {value!r}")


def check_unit_interval(name: str, value: float) -> None:
    if not (0.0 <= float(value) <= 1.0):
        raise ValueError(f"{name} must be in [0, 1], got {value!r}")
