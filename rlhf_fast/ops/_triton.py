"""Triton import shim and the ahead-of-time (AOT) compile spec every kernel module publishes.

Op modules do ``from rlhf_fast.ops._triton import triton, tl`` and define kernels at module
level. Where triton is not installed (macOS, Windows) the shim's ``jit`` returns the Python
function unchanged so the module still imports; such kernels are never dispatched to.

Each op module with kernels defines ``aot_specs() -> list[KernelSpec]``: the signatures and the
constexprs/num_warps its launcher's own config function picks for realistic shapes. The AOT
harness (rlhf_fast.testing.aot) compiles every spec for sm_80 and sm_90 and fails any
``@triton.jit`` found in rlhf_fast.ops that has no spec.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from rlhf_fast._backend import HAS_TRITON

if HAS_TRITON:
    import triton
    import triton.language as tl
else:  # pragma: no cover - exercised only where triton is missing

    class _NoTriton:
        @staticmethod
        def jit(fn=None, **_):
            return fn if fn is not None else (lambda f: f)

        @staticmethod
        def cdiv(a, b):
            return -(-a // b)

        @staticmethod
        def next_power_of_2(n):
            return 1 << max(0, int(n) - 1).bit_length()

    class _NoTl:
        constexpr = object

    triton = _NoTriton()
    tl = _NoTl()

TORCH_TO_TRITON = {"torch.float32": "fp32", "torch.bfloat16": "bf16", "torch.float16": "fp16"}


def triton_dtype(dtype) -> str:
    """'fp32' | 'bf16' | 'fp16' for a torch floating dtype (pointer signatures in AOT specs)."""
    return TORCH_TO_TRITON[str(dtype)]


@dataclass
class KernelSpec:
    """One ahead-of-time compilation of one kernel.

    kernel: the @triton.jit function. signature: {arg name: "*fp32" | "i32" | "constexpr" ...}
    for every argument. constexprs: values of the constexpr arguments. label: the realistic
    shape this config was chosen for (shown in the kernel report).
    """

    kernel: Any
    signature: dict[str, str]
    constexprs: dict[str, Any]
    num_warps: int = 4
    num_stages: int = 3
    label: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def name(self) -> str:
        fn = getattr(self.kernel, "fn", self.kernel)
        return f"{fn.__module__.rsplit('.', 1)[-1]}.{fn.__name__}"
