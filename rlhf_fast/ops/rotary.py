"""Rotary position embedding applied to q and k, as HF Llama / Qwen2 / Mistral apply it.

    q_embed = q * cos + rotate_half(q) * sin,   rotate_half(x) = cat(-x2, x1)   (x1, x2: halves of D)

the signature and layouts of HF's ``apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=1)``: q [B, Hq, T, D]
and k [B, Hk, T, D] (any strides with a contiguous last dim: HF's transposed projections; Hq and Hk may
differ, GQA), cos / sin [B, T, D] or [1, T, D] (or [T, D]) exactly as the model's own ``rotary_emb``
returns them, so every rope-scaling variant (linear, dynamic, yarn, llama3, longrope, ...) and position
ids that restart per packed sequence work without this op knowing about them: the positions are already
gathered into cos / sin. ``unsqueeze_dim=2`` takes q [B, T, Hq, D] and k [B, T, Hk, D].

Outputs take the promoted dtype of q (k) and cos / sin, as HF's ``q * cos`` does (under a bf16 autocast,
bf16 q times fp32 cos gives fp32), with q's memory layout. The math runs in fp32 with HF's operation
order (two products, then one add), so fp32 results equal HF's. Backward applies the transpose,
dq1 = g1 c1 + g2 s2, dq2 = g2 c2 - g1 s1, for any cos / sin; cos and sin get no gradient (when they
require one, the torch reference runs).

Memory: autograd keeps cos and sin (shared by all layers, as in HF). Time: one read and one write of q
and k per pass, where HF's expression makes about six passes forward and more backward.
"""
from __future__ import annotations

import torch

from rlhf_fast._backend import dispatch, ext
from rlhf_fast.ops._checks import check_floating
from rlhf_fast.ops._cpu import cpp_backend_for, dtype_code
from rlhf_fast.ops._triton import KernelSpec, tl, triton


# --------------------------------------------------------------------------- torch reference
def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2 :]
    return torch.cat((-x2, x1), dim=-1)


def rotary_reference(q, k, cos, sin, unsqueeze_dim: int = 1):
    """HF's ``apply_rotary_pos_emb``, line for line."""
    cos, sin = cos.unsqueeze(unsqueeze_dim), sin.unsqueeze(unsqueeze_dim)
    return (q * cos) + (_rotate_half(q) * sin), (k * cos) + (_rotate_half(k) * sin)


# --------------------------------------------------------------------------- Triton
@triton.jit
def _rotary_kernel(
    x_ptr, cos_ptr, sin_ptr, y_ptr, T, heads, x_b, x_h, x_t, y_b, y_h, y_t, c_b, c_t,
    HALF: tl.constexpr, BACKWARD: tl.constexpr, BLOCK_HEADS: tl.constexpr, BLOCK_HALF: tl.constexpr,
):
    """One (batch, position) per program, all heads: y = x cos + rotate_half(x) sin (or its transpose)."""
    pid = tl.program_id(0)
    b = (pid // T).to(tl.int64)
    t = (pid % T).to(tl.int64)
    hs = tl.arange(0, BLOCK_HEADS)
    d = tl.arange(0, BLOCK_HALF)
    d_ok = d < HALF
    ok = (hs < heads)[:, None] & d_ok[None, :]
    c_row = b * c_b + t * c_t
    c1 = tl.load(cos_ptr + c_row + d, mask=d_ok, other=0.0).to(tl.float32)[None, :]
    c2 = tl.load(cos_ptr + c_row + HALF + d, mask=d_ok, other=0.0).to(tl.float32)[None, :]
    s1 = tl.load(sin_ptr + c_row + d, mask=d_ok, other=0.0).to(tl.float32)[None, :]
    s2 = tl.load(sin_ptr + c_row + HALF + d, mask=d_ok, other=0.0).to(tl.float32)[None, :]
    x_offs = b * x_b + t * x_t + hs[:, None].to(tl.int64) * x_h + d[None, :]
    x1 = tl.load(x_ptr + x_offs, mask=ok, other=0.0).to(tl.float32)
    x2 = tl.load(x_ptr + x_offs + HALF, mask=ok, other=0.0).to(tl.float32)
    if BACKWARD:
        y1 = x1 * c1 + x2 * s2
        y2 = x2 * c2 - x1 * s1
    else:
        y1 = x1 * c1 - x2 * s1
        y2 = x2 * c2 + x1 * s2
    y_offs = b * y_b + t * y_t + hs[:, None].to(tl.int64) * y_h + d[None, :]
    tl.store(y_ptr + y_offs, y1.to(y_ptr.dtype.element_ty), mask=ok)
    tl.store(y_ptr + y_offs + HALF, y2.to(y_ptr.dtype.element_ty), mask=ok)


def _rotary_config(heads: int, D: int) -> dict:
    """All heads of one position in one [heads, D/2] tile (64 x 64 at most in range): 4 warps, 8 from
    4k elements."""
    block_heads = triton.next_power_of_2(max(heads, 1))
    block_half = triton.next_power_of_2(max(D // 2, 1))
    return {"BLOCK_HEADS": block_heads, "BLOCK_HALF": block_half,
            "num_warps": 8 if block_heads * block_half >= 4096 else 4}


def _launch_triton(x, cos, sin, y, backward):
    B, heads, T, D = x.shape
    cfg = _rotary_config(heads, D)
    _rotary_kernel[(B * T,)](
        x, cos, sin, y, T, heads, x.stride(0), x.stride(1), x.stride(2), y.stride(0), y.stride(1), y.stride(2),
        cos.stride(0) if cos.shape[0] > 1 else 0, cos.stride(1),
        HALF=D // 2, BACKWARD=backward, BLOCK_HEADS=cfg["BLOCK_HEADS"], BLOCK_HALF=cfg["BLOCK_HALF"],
        num_warps=cfg["num_warps"],
    )


def aot_specs() -> list[KernelSpec]:
    """Forward and backward at 0.5B (14 / 2 heads of 64), 8B (32 / 8 of 128) and 70B (64 / 8 of 128)
    head layouts (q's head count: the larger tile), for the dtype pairs a model meets: fp32, bf16, and
    bf16 q with fp32 cos (autocast: fp32 out, fp32 gradient in, bf16 gradient out)."""
    specs = []
    for heads, D in ((14, 64), (32, 128), (64, 128)):
        cfg = _rotary_config(heads, D)
        for backward in (False, True):
            for x_dt, c_dt, y_dt in (("fp32", "fp32", "fp32"), ("bf16", "bf16", "bf16"),
                                     ("fp32", "fp32", "bf16") if backward else ("bf16", "fp32", "fp32")):
                specs.append(KernelSpec(
                    _rotary_kernel,
                    signature={"x_ptr": f"*{x_dt}", "cos_ptr": f"*{c_dt}", "sin_ptr": f"*{c_dt}", "y_ptr": f"*{y_dt}",
                               **dict.fromkeys(("T", "heads", "x_b", "x_h", "x_t", "y_b", "y_h", "y_t", "c_b", "c_t"),
                                               "i32"),
                               "HALF": "constexpr", "BACKWARD": "constexpr", "BLOCK_HEADS": "constexpr",
                               "BLOCK_HALF": "constexpr"},
                    constexprs={"HALF": D // 2, "BACKWARD": backward, "BLOCK_HEADS": cfg["BLOCK_HEADS"],
                                "BLOCK_HALF": cfg["BLOCK_HALF"]},
                    num_warps=cfg["num_warps"],
                    label=f"{'bwd' if backward else 'fwd'} {x_dt}->{y_dt} cos {c_dt} heads={heads} D={D}",
                ))
    return specs


# --------------------------------------------------------------------------- C++
def _launch_cpp(x, cos, sin, y, backward):
    B, heads, T, D = x.shape
    c32, s32 = cos.float(), sin.float()
    ext().rotary(dtype_code(x.dtype), dtype_code(y.dtype), x.data_ptr(), c32.data_ptr(), s32.data_ptr(),
                 y.data_ptr(), B, heads, T, D, x.stride(0), x.stride(1), x.stride(2), y.stride(0), y.stride(1),
                 y.stride(2), c32.stride(0) if c32.shape[0] > 1 else 0, c32.stride(1), backward)


_LAUNCH = {"triton": _launch_triton, "cpp": _launch_cpp}


def _last_dim_contiguous(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def _apply(x, cos, sin, out_dtype, backend, backward):
    x = _last_dim_contiguous(x)
    y = torch.empty_like(x, dtype=out_dtype)  # keeps x's layout (HF's transposed projections)
    if x.numel():
        _LAUNCH[backend](x, cos, sin, y, backward)
    return y


# --------------------------------------------------------------------------- autograd + dispatcher
class RotaryFunction(torch.autograd.Function):
    """Forward: one pass over q and one over k. Saves cos and sin; backward: the transposed rotation."""

    @staticmethod
    def forward(ctx, q, k, cos, sin, backend):
        ctx.save_for_backward(cos, sin)
        ctx.backend, ctx.q_dtype, ctx.k_dtype = backend, q.dtype, k.dtype
        cs_dtype = torch.promote_types(cos.dtype, sin.dtype)
        q_out = _apply(q, cos, sin, torch.promote_types(q.dtype, cs_dtype), backend, False)
        k_out = _apply(k, cos, sin, torch.promote_types(k.dtype, cs_dtype), backend, False)
        return q_out, k_out

    @staticmethod
    def backward(ctx, grad_q, grad_k):
        cos, sin = ctx.saved_tensors
        dq = _apply(grad_q, cos, sin, ctx.q_dtype, ctx.backend, True) if ctx.needs_input_grad[0] else None
        dk = _apply(grad_k, cos, sin, ctx.k_dtype, ctx.backend, True) if ctx.needs_input_grad[1] else None
        return dq, dk, None, None, None


def _check(q, k, cos, sin, unsqueeze_dim):
    for name, t in (("q", q), ("k", k), ("cos", cos), ("sin", sin)):
        check_floating(name, t)
    if unsqueeze_dim not in (1, 2):
        raise ValueError(f"unsqueeze_dim must be 1 (q [B, H, T, D]) or 2 (q [B, T, H, D]), got {unsqueeze_dim}")
    if q.dim() != 4 or k.dim() != 4:
        raise ValueError(f"q and k must be 4-D, got {tuple(q.shape)} and {tuple(k.shape)}")
    t_dim = 2 if unsqueeze_dim == 1 else 1
    B, T, D = q.shape[0], q.shape[t_dim], q.shape[-1]
    if (k.shape[0], k.shape[t_dim], k.shape[-1]) != (B, T, D):
        raise ValueError(f"k must match q in batch, length and head_dim, got q {tuple(q.shape)}, k {tuple(k.shape)}")
    if D % 2:
        raise ValueError(f"head_dim must be even, got {D}")
    if sin.shape != cos.shape:
        raise ValueError(f"sin must have cos's shape {tuple(cos.shape)}, got {tuple(sin.shape)}")
    ok = (cos.dim() == 2 and tuple(cos.shape) == (T, D)) or (
        cos.dim() == 3 and cos.shape[0] in (1, B) and tuple(cos.shape[1:]) == (T, D))
    if not ok:
        raise ValueError(f"cos and sin must be [B or 1, T, D] or [T, D] = [{B} or 1, {T}, {D}], got {tuple(cos.shape)}")
    for name, t in (("k", k), ("cos", cos), ("sin", sin)):
        if t.device != q.device:
            raise ValueError(f"{name} must be on q's device {q.device}, got {t.device}")


def rotary(q, k, cos, sin, unsqueeze_dim: int = 1, backend: str | None = None):
    """``apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim)`` (module docstring). Returns (q_embed, k_embed).

    Differentiable in q and k. backend: None (automatic) or "triton" | "cpp" | "torch"; fp16 on CPU and
    cos / sin that require grad run the torch reference.
    """
    _check(q, k, cos, sin, unsqueeze_dim)
    chosen = cpp_backend_for(dispatch(q, backend), q.dtype, k.dtype, cos.dtype, sin.dtype)
    if chosen == "torch" or cos.requires_grad or sin.requires_grad:
        return rotary_reference(q, k, cos, sin, unsqueeze_dim)
    if cos.dim() == 2:
        cos, sin = cos.unsqueeze(0), sin.unsqueeze(0)
    cos, sin = _last_dim_contiguous(cos), _last_dim_contiguous(sin)
    if unsqueeze_dim == 2:
        q_out, k_out = RotaryFunction.apply(q.transpose(1, 2), k.transpose(1, 2), cos, sin, chosen)
        return q_out.transpose(1, 2), k_out.transpose(1, 2)
    return RotaryFunction.apply(q, k, cos, sin, chosen)


__all__ = ["rotary", "rotary_reference", "RotaryFunction"]
