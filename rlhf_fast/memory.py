"""Per-component byte accounting: parameters, gradients and AdamW state, dtype-aware.

Everything here reads only ``numel`` and ``dtype`` of parameters, so it works on modules built on the
``meta`` device (no storage): a later ``rlhf-fast memory`` builds a model from a config with
``torch.device("meta")`` and accounts it with the same functions the tests check against real
allocations.

Conventions (what torch actually allocates):
- a gradient has the dtype and numel of its parameter, and only trainable parameters get one;
- ``torch.optim.AdamW`` keeps ``exp_avg`` and ``exp_avg_sq`` in the parameter's dtype (``amsgrad``
  adds ``max_exp_avg_sq``) plus one fp32 ``step`` scalar per parameter tensor;
- tied parameters (same ``nn.Parameter`` reached twice, e.g. embeddings tied to the LM head) count once.
"""
from __future__ import annotations

from collections.abc import Iterable
from typing import NamedTuple

import torch
from torch import nn


class ComponentBytes(NamedTuple):
    """Bytes one component holds. ``params = trainable_params + frozen_params``."""

    trainable_params: int
    frozen_params: int
    grads: int
    optimizer: int

    @property
    def params(self) -> int:
        return self.trainable_params + self.frozen_params

    @property
    def total(self) -> int:
        return self.params + self.grads + self.optimizer

    def __add__(self, other):  # component sums, not tuple concatenation
        return ComponentBytes(*(a + b for a, b in zip(self, other)))


ZERO = ComponentBytes(0, 0, 0, 0)


def _unique_params(params: Iterable[nn.Parameter]) -> list[nn.Parameter]:
    seen, out = set(), []
    for p in params:
        if id(p) not in seen:
            seen.add(id(p))
            out.append(p)
    return out


def _params_of(obj) -> list[nn.Parameter]:
    if obj is None:
        return []
    if isinstance(obj, nn.Module):
        return _unique_params(obj.parameters())
    return _unique_params(obj)


def tensor_bytes(numel: int, dtype: torch.dtype) -> int:
    """Bytes of ``numel`` elements of ``dtype``."""
    return int(numel) * torch.empty((), dtype=dtype, device="meta").element_size()


def param_bytes(module_or_params, trainable: bool | None = None) -> int:
    """Parameter bytes; ``trainable=True/False`` restricts to parameters with/without requires_grad."""
    return sum(
        tensor_bytes(p.numel(), p.dtype)
        for p in _params_of(module_or_params)
        if trainable is None or p.requires_grad == trainable
    )


def grad_bytes(module_or_params) -> int:
    """Bytes of the gradients a backward pass allocates: one per trainable parameter, same dtype."""
    return param_bytes(module_or_params, trainable=True)


def adamw_state_bytes(module_or_params, amsgrad: bool = False, state_dtype: torch.dtype | None = None) -> int:
    """Bytes of ``torch.optim.AdamW`` state over the trainable parameters after its first step.

    Two moments (three with ``amsgrad``) in the parameter dtype (or ``state_dtype`` for optimizers that
    keep fp32 moments of low-precision weights) plus a 4-byte fp32 ``step`` per parameter tensor.
    """
    moments = 3 if amsgrad else 2
    total = 0
    for p in _params_of(module_or_params):
        if p.requires_grad:
            total += moments * tensor_bytes(p.numel(), state_dtype or p.dtype) + 4
    return total


def component_bytes(module_or_params, optimizer: str | None = "adamw") -> ComponentBytes:
    """Account one component. ``optimizer``: "adamw" (state for trainable params) or None (no optimizer)."""
    if optimizer not in ("adamw", None):
        raise ValueError(f"optimizer must be 'adamw' or None, got {optimizer!r}")
    return ComponentBytes(
        trainable_params=param_bytes(module_or_params, trainable=True),
        frozen_params=param_bytes(module_or_params, trainable=False),
        grads=grad_bytes(module_or_params),
        optimizer=adamw_state_bytes(module_or_params) if optimizer == "adamw" else 0,
    )


def layout_bytes(components: dict[str, object], optimizer: str | None = "adamw") -> dict[str, ComponentBytes]:
    """Account several components, parameters shared between them counted once (first one wins).

    ``components``: name -> module or iterable of parameters. Returns name -> ComponentBytes plus a
    ``"total"`` entry. Use it on ``PolicyValueModel.components()``.
    """
    seen: set[int] = set()
    out: dict[str, ComponentBytes] = {}
    total = ZERO
    for name, obj in components.items():
        own = [p for p in _params_of(obj) if id(p) not in seen]
        seen.update(id(p) for p in own)
        out[name] = component_bytes(own, optimizer)
        total = total + out[name]
    out["total"] = total
    return out


def logits_bytes(batch: int, seq: int, vocab: int, dtype: torch.dtype = torch.float32) -> int:
    """Bytes of one full ``[batch, seq, vocab]`` logits tensor (what a non-fused log-prob path holds, often 2-3x)."""
    return tensor_bytes(batch * seq * vocab, dtype)


def format_layout(table: dict[str, ComponentBytes]) -> str:
    """A fixed-width text table of ``layout_bytes`` output in MiB."""
    mib = 2.0 ** 20
    lines = [f"{'component':<12} {'trainable':>10} {'frozen':>10} {'grads':>10} {'adamw':>10} {'total':>10}  (MiB)"]
    for name, c in table.items():
        lines.append(
            f"{name:<12} {c.trainable_params / mib:>10.2f} {c.frozen_params / mib:>10.2f} "
            f"{c.grads / mib:>10.2f} {c.optimizer / mib:>10.2f} {c.total / mib:>10.2f}"
        )
    return "\n".join(lines)


__all__ = [
    "ComponentBytes", "tensor_bytes", "param_bytes", "grad_bytes", "adamw_state_bytes", "component_bytes",
    "layout_bytes", "logits_bytes", "format_layout",
]
