"""The optimizer, LR schedules and autocast shared by every trainer and stage (SFT, RM, DPO, PPO).

``build_adamw``: AdamW over the trainable parameters, with no weight decay on biases and norm
weights (ndim < 2); fused (one kernel for all tensors) when every parameter is a CPU or CUDA tensor
in fp32/bf16/fp16 and the caller allows it, else the multi-tensor (foreach) path.

Two schedules, because two conventions are pinned by tests:
- ``lr_multiplier`` / ``build_lr_scheduler``: the stages' own (linear warmup from 1/(warmup+1), then
  cosine / linear / constant decay to ``min_lr_ratio`` of the peak);
- ``build_hf_scheduler``: transformers' ``get_scheduler`` (TRL's numbers, for the drop-in PPO trainer),
  with TRL's reading of warmup (``warmup_steps`` < 1 is a ratio of the steps; else ``warmup_ratio``).
"""
from __future__ import annotations

import contextlib
import math
from collections.abc import Iterable

import torch

__all__ = ["FUSED_DTYPES", "build_adamw", "lr_multiplier", "build_lr_scheduler", "build_hf_scheduler", "autocast_ctx"]

FUSED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def build_adamw(params: Iterable[torch.nn.Parameter], *, lr: float, weight_decay: float = 0.0,
                betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                fused_allowed: bool = True) -> torch.optim.AdamW:
    """AdamW over the parameters that require grad: two groups, ``weight_decay`` on ndim >= 2 tensors and
    0 on the rest (biases, norm weights).

    fused_allowed: False forces the unfused multi-tensor path (FSDP2's DTensors; CPU runs whose numbers
    must stay those of the unfused update: fused CPU AdamW rounds differently in the last bit).
    """
    params = [p for p in params if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    fused = fused_allowed and all(p.device.type in ("cpu", "cuda") and p.dtype in FUSED_DTYPES for p in params)
    return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, fused=fused or None, foreach=None if fused else True)


def lr_multiplier(step: int, warmup_steps: int, total_steps: int, schedule: str, min_lr_ratio: float = 0.0) -> float:
    """LR / peak LR before optimizer step ``step`` (0-based): linear warmup from 1/(warmup+1), then decay.

    cosine: min + (1 − min)·½(1 + cos(π·p)); linear: min + (1 − min)·(1 − p); constant: 1;
    with p = (step − warmup) / max(1, total − warmup), clamped to [0, 1].
    """
    if step < warmup_steps:
        return (step + 1) / (warmup_steps + 1)
    if schedule == "constant":
        return 1.0
    p = min(1.0, max(0.0, (step - warmup_steps) / max(1, total_steps - warmup_steps)))
    if schedule == "cosine":
        return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * p))
    if schedule == "linear":
        return min_lr_ratio + (1.0 - min_lr_ratio) * (1.0 - p)
    raise ValueError(f"lr_scheduler_type must be 'cosine', 'linear' or 'constant', got {schedule!r}")


def build_lr_scheduler(optimizer: torch.optim.Optimizer, *, schedule: str, total_steps: int, warmup_steps: int = 0,
                       warmup_ratio: float = 0.0, min_lr_ratio: float = 0.0) -> torch.optim.lr_scheduler.LambdaLR:
    """``lr_multiplier`` as a LambdaLR; warmup = ``warmup_steps`` when > 0, else round(warmup_ratio · total_steps)."""
    warmup = warmup_steps if warmup_steps > 0 else int(round(warmup_ratio * total_steps))
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_multiplier(s, warmup, total_steps, schedule, min_lr_ratio)
    )


def build_hf_scheduler(optimizer: torch.optim.Optimizer, schedule: str, *, total_steps: int, warmup_steps: float = 0,
                       warmup_ratio: float | None = None, scheduler_kwargs: dict | None = None):
    """transformers' ``get_scheduler(schedule, ...)`` with TRL's warmup: ``warmup_steps`` >= 1 (or 0) is a
    step count, 0 < ``warmup_steps`` < 1 a share of ``total_steps`` (rounded up); with no warmup from
    those, ``warmup_ratio`` · total_steps (rounded up)."""
    from transformers import get_scheduler

    warmup = warmup_steps if warmup_steps >= 1 or warmup_steps == 0 else math.ceil(warmup_steps * total_steps)
    if not warmup and warmup_ratio:
        warmup = math.ceil(warmup_ratio * total_steps)
    return get_scheduler(schedule, optimizer, num_warmup_steps=int(warmup), num_training_steps=total_steps,
                         scheduler_specific_kwargs=scheduler_kwargs or {})


def autocast_ctx(device: torch.device, bf16: bool, fp16: bool = False):
    """bf16 (else fp16) autocast on ``device``'s type, or a no-op context when neither is on."""
    if bf16:
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    if fp16:
        return torch.autocast(device_type=device.type, dtype=torch.float16)
    return contextlib.nullcontext()
