"""RMSNorm, optionally fused with the residual add before it: the Llama / Qwen2 / Mistral norm.

    h   = residual + x            (only when ``residual`` is given; rounded to its dtype as torch does)
    out = weight * (h32 * rsqrt(mean(h32^2, -1) + eps)).to(h.dtype)      h32 = h in fp32

exactly what HF's ``LlamaRMSNorm`` computes (normalise in fp32, cast back to the input dtype, then
multiply by the weight, the output taking the promoted dtype of weight and input). Returns ``out``, or
``(out, h)`` with a residual: ``h`` is the new residual stream the decoder layer adds the MLP output to.

Memory: autograd keeps ``h`` (the input, or the new residual), one fp32 ``rstd`` per row and the weight;
the backward recomputes the normalised row. HF's module keeps the fp32 input (a copy for bf16 input),
the fp32 normalised tensor and ``rstd``; with the residual add in front, that is 2 [tokens, H] fp32
tensors against our one in the input dtype.

Backward: with n = h32 * rstd and g the output gradient,
    dh = rstd * (g w - n * mean(g w n, -1)) (+ the gradient reaching the returned ``h``)
    dw = sum over rows of g * n.to(h.dtype)
The weight gradient is summed in fixed row blocks, so it does not depend on the thread count (C++)
or the GPU (Triton). HBM traffic (Triton): forward reads x (and residual) once and writes out (and h):
2-4 x tokens x H elements; backward reads g, h (and the residual gradient) and writes dh.
"""
from __future__ import annotations

import torch

from rlhf_fast._backend import dispatch, ext
from rlhf_fast.ops._checks import check_floating, check_positive
from rlhf_fast.ops._cpu import cpp_backend_for, dtype_code, ptr
from rlhf_fast.ops._triton import KernelSpec, tl, triton

# Widest row the Triton kernels hold in registers (hidden sizes up to 16384); wider rows use torch.
TRITON_MAX_HIDDEN = 16384


# --------------------------------------------------------------------------- torch reference
def rms_norm_reference(
    x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6, residual: torch.Tensor | None = None
):
    """HF LlamaRMSNorm, line for line (with the decoder layer's ``residual + x`` in front when given)."""
    h = x if residual is None else residual + x
    h32 = h.to(torch.float32)
    variance = h32.pow(2).mean(-1, keepdim=True)
    normed = h32 * torch.rsqrt(variance + eps)
    out = weight * normed.to(h.dtype)
    return out if residual is None else (out, h)


# --------------------------------------------------------------------------- Triton
@triton.jit
def _rms_norm_fwd_kernel(
    x_ptr, res_ptr, w_ptr, out_ptr, h_ptr, rstd_ptr, R, H, eps,
    HAS_RESIDUAL: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_H: tl.constexpr,
):
    """BLOCK_R whole rows per program: h = x (+ residual), rstd, out = w * round(h * rstd)."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.arange(0, BLOCK_H)
    ok = (rows < R)[:, None] & (cols < H)[None, :]
    offs = rows[:, None].to(tl.int64) * H + cols[None, :]
    h = tl.load(x_ptr + offs, mask=ok, other=0.0)
    if HAS_RESIDUAL:
        r = tl.load(res_ptr + offs, mask=ok, other=0.0)
        h = (r.to(tl.float32) + h.to(tl.float32)).to(h_ptr.dtype.element_ty)
        tl.store(h_ptr + offs, h, mask=ok)
    hf = h.to(tl.float32)
    rstd = 1.0 / tl.sqrt_rn(tl.sum(hf * hf, axis=1) / H + eps)
    n = (hf * rstd[:, None]).to(h.dtype).to(tl.float32)
    w = tl.load(w_ptr + cols, mask=cols < H, other=0.0).to(tl.float32)
    tl.store(out_ptr + offs, (w[None, :] * n).to(out_ptr.dtype.element_ty), mask=ok)
    tl.store(rstd_ptr + rows, rstd, mask=rows < R)


@triton.jit
def _rms_norm_bwd_kernel(
    g_ptr, gres_ptr, h_ptr, w_ptr, rstd_ptr, dh_ptr, dw_ptr, R, H, rows_per_program,
    HAS_GRAD_RES: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_H: tl.constexpr,
):
    """Rows [pid * rows_per_program, +rows_per_program): dh per row, and this program's partial dw
    (one fp32 row of dw_ptr [programs, H], summed over programs by the launcher)."""
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_H)
    col_ok = cols < H
    w = tl.load(w_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
    dw = tl.zeros((BLOCK_R, BLOCK_H), dtype=tl.float32)
    start = pid * rows_per_program
    stop = tl.minimum(start + rows_per_program, R)
    for r0 in range(start, stop, BLOCK_R):
        rows = r0 + tl.arange(0, BLOCK_R)
        row_ok = rows < stop
        ok = row_ok[:, None] & col_ok[None, :]
        offs = rows[:, None].to(tl.int64) * H + cols[None, :]
        g = tl.load(g_ptr + offs, mask=ok, other=0.0).to(tl.float32)
        h = tl.load(h_ptr + offs, mask=ok, other=0.0)
        rstd = tl.load(rstd_ptr + rows, mask=row_ok, other=0.0)
        n = h.to(tl.float32) * rstd[:, None]
        gw = g * w[None, :]
        c = tl.sum(gw * n, axis=1) / H
        dh = rstd[:, None] * (gw - n * c[:, None])
        if HAS_GRAD_RES:
            dh += tl.load(gres_ptr + offs, mask=ok, other=0.0).to(tl.float32)
        tl.store(dh_ptr + offs, dh.to(dh_ptr.dtype.element_ty), mask=ok)
        dw += g * n.to(h.dtype).to(tl.float32)
    tl.store(dw_ptr + pid.to(tl.int64) * H + cols, tl.sum(dw, axis=0), mask=col_ok)


# At most this many backward programs: each keeps one fp32 [H] partial of dw. The count depends on
# the shape only, so dw is summed in the same order on every GPU.
_BWD_MAX_PROGRAMS = 256


def _rms_config(R: int, H: int) -> dict:
    """Whole rows in registers: BLOCK_H = next power of 2 >= H, rows per tile up to 4k elements; the
    forward at 8 elements a thread, the backward at 4 (``bwd_warps``), 4 to 32 warps. From the AOT
    resource table: a backward at 16 elements a thread needs ~190 registers for H = 4096 and spills at
    8192, at 8 it still spills at 8192 (the 128-register cap of 16 warps); at 4 it stays under 65."""
    block_h = triton.next_power_of_2(max(H, 1))
    block_r = max(1, min(4096 // block_h, triton.next_power_of_2(max(R, 1))))
    tile = block_r * block_h
    return {"BLOCK_R": block_r, "BLOCK_H": block_h, "num_warps": min(32, max(4, tile // 256)),
            "bwd_warps": min(32, max(4, tile // 128))}


def _bwd_grid(R: int, block_r: int) -> tuple[int, int]:
    """(programs, rows per program) for the backward: rows split evenly in BLOCK_R multiples."""
    tiles = triton.cdiv(max(R, 1), block_r)
    per_program = triton.cdiv(tiles, min(tiles, _BWD_MAX_PROGRAMS)) * block_r
    return triton.cdiv(max(R, 1), per_program), per_program


def _fwd_triton(x2, r2, w, out, h2, rstd, eps):
    R, H = x2.shape
    cfg = _rms_config(R, H)
    _rms_norm_fwd_kernel[(triton.cdiv(R, cfg["BLOCK_R"]),)](
        x2, r2 if r2 is not None else x2, w, out, h2, rstd, R, H, eps,
        HAS_RESIDUAL=r2 is not None, BLOCK_R=cfg["BLOCK_R"], BLOCK_H=cfg["BLOCK_H"], num_warps=cfg["num_warps"],
    )


def _bwd_triton(g2, gr2, h2, w, rstd, dh, need_dw):
    R, H = h2.shape
    cfg = _rms_config(R, H)
    programs, per_program = _bwd_grid(R, cfg["BLOCK_R"])
    partial = torch.empty(programs, H, dtype=torch.float32, device=h2.device)
    _rms_norm_bwd_kernel[(programs,)](
        g2, gr2 if gr2 is not None else g2, h2, w, rstd, dh, partial, R, H, per_program,
        HAS_GRAD_RES=gr2 is not None, BLOCK_R=cfg["BLOCK_R"], BLOCK_H=cfg["BLOCK_H"], num_warps=cfg["bwd_warps"],
    )
    return partial.sum(0) if need_dw else None


def aot_specs() -> list[KernelSpec]:
    """Both kernels at the hidden sizes of 0.5B (896), 8B (4096) and 70B (8192) models, 8k tokens,
    fp32 and bf16 (bf16 input with an fp32 output: fp32 norm weights on a bf16 stream), residual on."""
    specs = []
    R = 8192
    for H in (896, 4096, 8192):
        cfg = _rms_config(R, H)
        cx = {"BLOCK_R": cfg["BLOCK_R"], "BLOCK_H": cfg["BLOCK_H"]}
        for dtype, out in (("fp32", "fp32"), ("bf16", "bf16"), ("bf16", "fp32")):
            specs.append(KernelSpec(
                _rms_norm_fwd_kernel,
                signature={"x_ptr": f"*{dtype}", "res_ptr": f"*{dtype}", "w_ptr": f"*{out}", "out_ptr": f"*{out}",
                           "h_ptr": f"*{dtype}", "rstd_ptr": "*fp32", "R": "i32", "H": "i32", "eps": "fp32",
                           "HAS_RESIDUAL": "constexpr", "BLOCK_R": "constexpr", "BLOCK_H": "constexpr"},
                constexprs={"HAS_RESIDUAL": True, **cx}, num_warps=cfg["num_warps"],
                label=f"{dtype}->{out} R={R} H={H}",
            ))
            specs.append(KernelSpec(
                _rms_norm_bwd_kernel,
                signature={"g_ptr": f"*{out}", "gres_ptr": f"*{dtype}", "h_ptr": f"*{dtype}", "w_ptr": f"*{out}",
                           "rstd_ptr": "*fp32", "dh_ptr": f"*{dtype}", "dw_ptr": "*fp32", "R": "i32", "H": "i32",
                           "rows_per_program": "i32", "HAS_GRAD_RES": "constexpr", "BLOCK_R": "constexpr",
                           "BLOCK_H": "constexpr"},
                constexprs={"HAS_GRAD_RES": True, **cx}, num_warps=cfg["bwd_warps"],
                label=f"{dtype}<-{out} R={R} H={H}",
            ))
    return specs


# --------------------------------------------------------------------------- C++
def _fwd_cpp(x2, r2, w, out, h2, rstd, eps):
    R, H = x2.shape
    w32 = w.float().contiguous()  # held until the kernel returns
    ext().rms_norm_fwd(dtype_code(x2.dtype), dtype_code(out.dtype), x2.data_ptr(), ptr(r2), w32.data_ptr(),
                       out.data_ptr(), ptr(h2 if r2 is not None else None), rstd.data_ptr(), R, H, float(eps))


def _bwd_cpp(g2, gr2, h2, w, rstd, dh, need_dw):
    R, H = h2.shape
    dw = torch.empty(H, dtype=torch.float32) if need_dw else None
    w32 = w.float().contiguous()
    ext().rms_norm_bwd(dtype_code(h2.dtype), dtype_code(g2.dtype), g2.data_ptr(), ptr(gr2), h2.data_ptr(),
                       w32.data_ptr(), rstd.data_ptr(), dh.data_ptr(), ptr(dw), R, H)
    return dw


_LAUNCH = {"triton": (_fwd_triton, _bwd_triton), "cpp": (_fwd_cpp, _bwd_cpp)}


# --------------------------------------------------------------------------- autograd + dispatcher
class RMSNormFunction(torch.autograd.Function):
    """Forward: one pass per row (residual add, sum of squares, scaled output). Saves h, rstd, weight.
    Backward: one pass per row recomputing the normalised row; dw from per-block partial sums."""

    @staticmethod
    def forward(ctx, x, weight, residual, eps, backend):
        shape, H = x.shape, x.shape[-1]
        x2 = x.reshape(-1, H).contiguous()
        r2 = residual.reshape(-1, H).contiguous() if residual is not None else None
        R = x2.shape[0]
        out = torch.empty(R, H, dtype=torch.promote_types(weight.dtype, x.dtype), device=x.device)
        h2 = torch.empty_like(x2) if r2 is not None else x2
        rstd = torch.empty(R, dtype=torch.float32, device=x.device)
        if R:
            _LAUNCH[backend][0](x2, r2, weight, out, h2, rstd, eps)
        ctx.save_for_backward(h2, weight, rstd)
        ctx.backend, ctx.shape, ctx.has_residual = backend, shape, r2 is not None
        if r2 is None:
            return out.view(shape)
        return out.view(shape), h2.view(shape)

    @staticmethod
    def backward(ctx, grad_out, grad_h=None):
        h2, weight, rstd = ctx.saved_tensors
        H = h2.shape[1]
        g2 = grad_out.reshape(-1, H).contiguous()
        gr2 = grad_h.reshape(-1, H).contiguous() if grad_h is not None else None
        dh = torch.empty_like(h2)
        need_dw = ctx.needs_input_grad[1]
        dw = None
        if h2.shape[0]:
            dw = _LAUNCH[ctx.backend][1](g2, gr2, h2, weight, rstd, dh, need_dw)
        elif need_dw:
            dw = torch.zeros(H, dtype=torch.float32, device=h2.device)
        grad_x = dh.view(ctx.shape)
        grad_w = dw.to(weight.dtype) if need_dw else None
        grad_res = grad_x if ctx.has_residual and ctx.needs_input_grad[2] else None
        return grad_x if ctx.needs_input_grad[0] else None, grad_w, grad_res, None, None


def rms_norm(
    x: torch.Tensor,
    weight: torch.Tensor,
    eps: float = 1e-6,
    residual: torch.Tensor | None = None,
    backend: str | None = None,
):
    """RMSNorm over the last dim (module docstring), optionally after ``h = residual + x``.

    x: [..., H] float32/bf16/fp16; weight: [H]; residual: None or x's shape (its dtype may differ:
    h takes the promoted dtype, as ``residual + x`` does). Returns ``out`` (dtype promoted from weight
    and h), or ``(out, h)`` when a residual is given. Differentiable in x, weight and residual.
    backend: None (automatic) or "triton" | "cpp" | "torch". fp16 on CPU and rows wider than 16384
    on the GPU run the torch reference.
    """
    check_floating("x", x)
    check_floating("weight", weight)
    check_positive("eps", eps, allow_zero=True)
    if x.dim() < 1 or weight.dim() != 1 or weight.shape[0] != x.shape[-1]:
        raise ValueError(f"weight must be [H] with H = x.shape[-1], got x {tuple(x.shape)} and weight "
                         f"{tuple(weight.shape)}")
    if weight.device != x.device:
        raise ValueError(f"weight must be on x's device {x.device}, got {weight.device}")
    if residual is not None:
        check_floating("residual", residual)
        if residual.shape != x.shape or residual.device != x.device:
            raise ValueError(f"residual must have x's shape {tuple(x.shape)} and device {x.device}, got "
                             f"{tuple(residual.shape)} on {residual.device}")
        h_dtype = torch.promote_types(residual.dtype, x.dtype)
        x, residual = x.to(h_dtype), residual.to(h_dtype)
    chosen = cpp_backend_for(dispatch(x, backend), x.dtype, weight.dtype)
    if chosen == "triton" and x.shape[-1] > TRITON_MAX_HIDDEN:
        chosen = "torch"
    if chosen == "torch":
        return rms_norm_reference(x, weight, eps, residual)
    return RMSNormFunction.apply(x, weight, residual, float(eps), chosen)


__all__ = ["rms_norm", "rms_norm_reference", "RMSNormFunction", "TRITON_MAX_HIDDEN"]
