"""The frozen reference policy: a low-precision copy of the initial policy, optionally parked on the CPU.

``FrozenReference(model, dtype=torch.bfloat16, offload=True)`` deep-copies a causal LM, casts it
(bf16/fp16 by default, fp32 on request), freezes it (``copy=False`` takes a model nobody trains, such as
the ``ref_model`` a TRL script passes, in place: no second copy of its weights), and with ``offload`` keeps its parameters in host
memory between uses: ``offload()`` moves every parameter's storage to the CPU (pinned when CUDA is
available) and leaves an empty tensor on the compute device, ``onload(device)`` brings it back. The
reference is deliberately not an ``nn.Module`` child of the policy-value model, so ``model.to(...)``,
``model.parameters()`` and the optimizer never see it.
"""
from __future__ import annotations

import copy

import torch
from torch import nn

from rlhf_fast.models.loading import get_backbone, get_lm_head

_REFERENCE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


class FrozenReference:
    """A frozen copy of a causal LM. ``backbone`` / ``lm_head`` as in ``rlhf_fast.models.loading``."""

    def __init__(self, model: nn.Module, dtype: torch.dtype = torch.bfloat16, offload: bool = False,
                 copy_model: bool = True):
        if dtype not in _REFERENCE_DTYPES:
            raise ValueError(f"reference_dtype must be one of float32/bfloat16/float16, got {dtype}")
        # In place (copy_model=False) the caller's module is cast and frozen: it must not be trained elsewhere.
        self.model = (copy.deepcopy(model) if copy_model else model).to(dtype).eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.backbone = get_backbone(self.model)
        self.lm_head = get_lm_head(self.model)
        self.dtype = dtype
        self.auto_offload = bool(offload)
        self.device = next(self.model.parameters()).device
        self._host: dict[str, torch.Tensor] | None = None  # host copy of every parameter, made once
        self._offloaded = False
        if self.auto_offload:
            self.offload()

    @property
    def is_offloaded(self) -> bool:
        return self._offloaded

    def resident_bytes(self) -> int:
        """Parameter bytes currently held on the compute device (0 while offloaded)."""
        return sum(p.numel() * p.element_size() for p in self.model.parameters())

    def offload(self) -> None:
        """Release the compute-device parameters; they live in host memory until ``onload``.

        The weights never change, so the host copy is made once (pinned when CUDA is available) and
        every later offload only drops the device storage: no device-to-host traffic per rollout.
        """
        if self._offloaded:
            return
        if self._host is None:
            pin = torch.cuda.is_available()
            host = {}
            for name, p in self.model.named_parameters():  # tied weights appear once
                if p.device.type == "cpu":
                    host[name] = p.data  # already in host memory: keep the storage itself, no copy
                else:
                    h = torch.empty(p.shape, dtype=p.dtype, device="cpu", pin_memory=pin)
                    h.copy_(p.data)
                    host[name] = h
            self._host = host
        for p in self.model.parameters():
            p.data = torch.empty(0, dtype=p.dtype, device=p.device)
        self._offloaded = True

    def onload(self, device: torch.device | str | None = None) -> None:
        """Bring the parameters back to ``device`` (default: where they were)."""
        device = torch.device(device) if device is not None else self.device
        if not self._offloaded:
            if next(self.model.parameters()).device != device:
                self.model.to(device)
                self._host = None  # the host copy no longer mirrors where the weights live
                self.device = device
            return
        params = dict(self.model.named_parameters())
        for name, h in self._host.items():
            params[name].data = h if device.type == "cpu" else h.to(device, non_blocking=True)
        self.model.to(device)  # buffers (e.g. rotary tables) follow
        self.device = device
        self._offloaded = False

    def __repr__(self) -> str:
        return (f"FrozenReference({type(self.model).__name__}, dtype={self.dtype}, "
                f"offloaded={self.is_offloaded}, device={self.device})")
