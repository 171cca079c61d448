"""SwiGLU: ``silu(gate) * up``, the gated activation of Llama / Qwen2 / Mistral MLPs.

    out = gate * sigmoid(gate) * up                      (fp32 math, stored in the input dtype)
    d gate = d out * up * s * (1 + gate * (1 - s)),  d up = d out * gate * s,   s = sigmoid(gate)

Memory: autograd keeps only ``gate`` and ``up`` (which it needs anyway) and recomputes the sigmoid in
backward; HF's ``act_fn(gate) * up`` also keeps ``silu(gate)``: 2 tensors of [tokens, I] against 3.
``swiglu_recompute(gate, up)`` rebuilds the product without autograd, so a caller can drop the product
itself from what the next layer saves (the backbone patch does this for ``down_proj``'s input,
rlhf_fast.models.patching).

HBM traffic (Triton): forward reads 2 and writes 1 element per position, backward reads 3 and writes
2; no other pass.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from rlhf_fast._backend import dispatch, ext
from rlhf_fast.ops._checks import check_floating
from rlhf_fast.ops._cpu import cpp_backend_for, dtype_code
from rlhf_fast.ops._triton import KernelSpec, tl, triton


# --------------------------------------------------------------------------- torch reference
def swiglu_reference(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """HF's ``act_fn(gate_proj(x)) * up_proj(x)`` with act_fn = silu."""
    return F.silu(gate) * up


# --------------------------------------------------------------------------- Triton
@triton.jit
def _swiglu_fwd_kernel(gate_ptr, up_ptr, out_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < n
    g = tl.load(gate_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    u = tl.load(up_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    tl.store(out_ptr + offs, (g * tl.sigmoid(g) * u).to(out_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _swiglu_bwd_kernel(grad_ptr, gate_ptr, up_ptr, dgate_ptr, dup_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < n
    d = tl.load(grad_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    g = tl.load(gate_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    u = tl.load(up_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    s = tl.sigmoid(g)
    tl.store(dup_ptr + offs, (d * g * s).to(dup_ptr.dtype.element_ty), mask=ok)
    tl.store(dgate_ptr + offs, (d * u * s * (1.0 + g * (1.0 - s))).to(dgate_ptr.dtype.element_ty), mask=ok)


def _elementwise_config(n: int) -> dict:
    """1-D element-wise kernels: 1024 elements (4 a thread at 8 warps) once there is enough work."""
    block = min(1024, triton.next_power_of_2(max(n, 16)))
    return {"BLOCK": block, "num_warps": 8 if block >= 1024 else 4}


def _fwd_triton(gate, up, out):
    n = gate.numel()
    cfg = _elementwise_config(n)
    _swiglu_fwd_kernel[(triton.cdiv(n, cfg["BLOCK"]),)](gate, up, out, n, BLOCK=cfg["BLOCK"],
                                                          num_warps=cfg["num_warps"])


def _bwd_triton(grad, gate, up, dgate, dup):
    n = gate.numel()
    cfg = _elementwise_config(n)
    _swiglu_bwd_kernel[(triton.cdiv(n, cfg["BLOCK"]),)](grad, gate, up, dgate, dup, n, BLOCK=cfg["BLOCK"],
                                                          num_warps=cfg["num_warps"])


def aot_specs() -> list[KernelSpec]:
    """8k tokens x intermediate 28672 (the widest MLP in range, 235M elements: n fits i32, as the launcher
    passes it), fp32 and bf16."""
    n = 8192 * 28672
    cfg = _elementwise_config(n)
    specs = []
    for dtype in ("fp32", "bf16"):
        specs.append(KernelSpec(
            _swiglu_fwd_kernel,
            signature={"gate_ptr": f"*{dtype}", "up_ptr": f"*{dtype}", "out_ptr": f"*{dtype}", "n": "i32",
                       "BLOCK": "constexpr"},
            constexprs={"BLOCK": cfg["BLOCK"]}, num_warps=cfg["num_warps"], label=f"{dtype} n=8192x28672",
        ))
        specs.append(KernelSpec(
            _swiglu_bwd_kernel,
            signature={"grad_ptr": f"*{dtype}", "gate_ptr": f"*{dtype}", "up_ptr": f"*{dtype}",
                       "dgate_ptr": f"*{dtype}", "dup_ptr": f"*{dtype}", "n": "i32", "BLOCK": "constexpr"},
            constexprs={"BLOCK": cfg["BLOCK"]}, num_warps=cfg["num_warps"], label=f"{dtype} n=8192x28672",
        ))
    return specs


# --------------------------------------------------------------------------- C++
def _fwd_cpp(gate, up, out):
    ext().swiglu_fwd(dtype_code(gate.dtype), gate.data_ptr(), up.data_ptr(), out.data_ptr(), gate.numel())


def _bwd_cpp(grad, gate, up, dgate, dup):
    ext().swiglu_bwd(dtype_code(gate.dtype), grad.data_ptr(), gate.data_ptr(), up.data_ptr(), dgate.data_ptr(),
                     dup.data_ptr(), gate.numel())


_LAUNCH = {"triton": (_fwd_triton, _bwd_triton), "cpp": (_fwd_cpp, _bwd_cpp)}


def _forward(gate: torch.Tensor, up: torch.Tensor, backend: str) -> torch.Tensor:
    gate, up = gate.contiguous(), up.contiguous()
    out = torch.empty_like(gate)
    if gate.numel():
        _LAUNCH[backend][0](gate, up, out)
    return out


# --------------------------------------------------------------------------- autograd + dispatcher
class SwiGLUFunction(torch.autograd.Function):
    """Forward: one pass. Saves gate and up only; backward recomputes the sigmoid in one pass."""

    @staticmethod
    def forward(ctx, gate, up, backend):
        gate, up = gate.contiguous(), up.contiguous()
        ctx.save_for_backward(gate, up)
        ctx.backend = backend
        return _forward(gate, up, backend)

    @staticmethod
    def backward(ctx, grad):
        gate, up = ctx.saved_tensors
        grad = grad.contiguous()
        dgate, dup = torch.empty_like(gate), torch.empty_like(up)
        if gate.numel():
            _LAUNCH[ctx.backend][1](grad, gate, up, dgate, dup)
        return dgate, dup, None


def _check(gate: torch.Tensor, up: torch.Tensor) -> None:
    check_floating("gate", gate)
    check_floating("up", up)
    if up.shape != gate.shape or up.dtype != gate.dtype or up.device != gate.device:
        raise ValueError(f"up must have gate's shape {tuple(gate.shape)}, dtype {gate.dtype} and device "
                         f"{gate.device}, got {tuple(up.shape)}, {up.dtype}, {up.device}")


def swiglu(gate: torch.Tensor, up: torch.Tensor, backend: str | None = None) -> torch.Tensor:
    """``silu(gate) * up``. gate, up: same shape, dtype (float32/bf16/fp16) and device.

    Returns the input dtype. Differentiable in both. backend: None (automatic) or "triton" | "cpp" |
    "torch" (fp16 on CPU runs the torch reference).
    """
    _check(gate, up)
    chosen = cpp_backend_for(dispatch(gate, backend), gate.dtype)
    if chosen == "torch":
        return swiglu_reference(gate, up)
    return SwiGLUFunction.apply(gate, up, chosen)


def swiglu_recompute(gate: torch.Tensor, up: torch.Tensor, backend: str | None = None) -> torch.Tensor:
    """The forward of ``swiglu`` without autograd (contiguous output): rebuilds a product in backward."""
    _check(gate, up)
    chosen = cpp_backend_for(dispatch(gate, backend), gate.dtype)
    with torch.no_grad():
        if chosen == "torch":
            return swiglu_reference(gate, up).contiguous()
        return _forward(gate.detach(), up.detach(), chosen)


__all__ = ["swiglu", "swiglu_reference", "swiglu_recompute", "SwiGLUFunction"]
