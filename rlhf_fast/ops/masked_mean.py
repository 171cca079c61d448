"""Masked mean: the foundation's proof op, travelling every backend and the AOT harness.

masked_mean(x, mask, dim=None) = sum(x * mask) / sum(mask), accumulated in fp32, returned as fp32.
An all-masked reduction gives exactly 0 (and zero gradient), never NaN. Masked-out entries never
contribute, even when they hold NaN or inf; a NaN in a valid entry gives NaN.
"""
from __future__ import annotations

import torch

from rlhf_fast._backend import dispatch, ext
from rlhf_fast.ops._checks import check_floating, check_mask
from rlhf_fast.ops._triton import KernelSpec, tl, triton


# --------------------------------------------------------------------------- torch reference
def masked_mean_reference(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Pure-torch reference. x: [...] float; mask: same shape, bool or 0/1. Returns fp32."""
    m = mask.bool()
    xf = torch.where(m, x.float(), torch.zeros((), dtype=torch.float32, device=x.device))
    if dim is None:
        return xf.sum() / m.sum().clamp_min(1).float()
    return xf.sum(dim) / m.sum(dim).clamp_min(1).float()


# --------------------------------------------------------------------------- Triton
@triton.jit
def _masked_row_sum_kernel(
    x_ptr, mask_ptr, sum_ptr, cnt_ptr, R, C, stride_x, stride_m,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """sum[r] = Σ_c x[r, c]·[mask], cnt[r] = Σ_c mask[r, c]; BLOCK_R rows per program, fp32 accumulators."""
    pid = tl.program_id(0)
    rows = pid * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < R
    acc = tl.zeros((BLOCK_R, BLOCK_C), dtype=tl.float32)
    cnt = tl.zeros((BLOCK_R, BLOCK_C), dtype=tl.float32)
    for c0 in range(0, C, BLOCK_C):
        cols = c0 + tl.arange(0, BLOCK_C)
        ok = row_ok[:, None] & (cols[None, :] < C)
        m = tl.load(mask_ptr + rows[:, None].to(tl.int64) * stride_m + cols[None, :], mask=ok, other=0)
        x = tl.load(x_ptr + rows[:, None].to(tl.int64) * stride_x + cols[None, :], mask=ok, other=0.0)
        on = m != 0
        acc += tl.where(on, x.to(tl.float32), 0.0)
        cnt += on.to(tl.float32)
    tl.store(sum_ptr + rows, tl.sum(acc, axis=1), mask=row_ok)
    tl.store(cnt_ptr + rows, tl.sum(cnt, axis=1), mask=row_ok)


def _row_sum_config(R: int, C: int) -> dict:
    """Block sizes and warps for an [R, C] masked row sum: ~4k elements per tile."""
    block_c = min(triton.next_power_of_2(max(C, 1)), 2048)
    block_r = max(1, min(4096 // block_c, triton.next_power_of_2(max(R, 1))))
    num_warps = 8 if block_r * block_c >= 4096 else 4
    return {"BLOCK_R": block_r, "BLOCK_C": block_c, "num_warps": num_warps}


def _row_sum_triton(x2: torch.Tensor, m2: torch.Tensor, out_sum: torch.Tensor, out_cnt: torch.Tensor) -> None:
    R, C = x2.shape
    cfg = _row_sum_config(R, C)
    grid = (triton.cdiv(R, cfg["BLOCK_R"]),)
    _masked_row_sum_kernel[grid](
        x2, m2, out_sum, out_cnt, R, C, x2.stride(0), m2.stride(0),
        BLOCK_R=cfg["BLOCK_R"], BLOCK_C=cfg["BLOCK_C"], num_warps=cfg["num_warps"],
    )


def aot_specs() -> list[KernelSpec]:
    specs = []
    for dtype in ("fp32", "bf16"):
        for R, C in ((4096, 8192), (64, 1 << 20)):
            cfg = _row_sum_config(R, C)
            specs.append(
                KernelSpec(
                    _masked_row_sum_kernel,
                    signature={
                        "x_ptr": f"*{dtype}", "mask_ptr": "*u8", "sum_ptr": "*fp32", "cnt_ptr": "*fp32",
                        "R": "i32", "C": "i32", "stride_x": "i32", "stride_m": "i32",
                        "BLOCK_R": "constexpr", "BLOCK_C": "constexpr",
                    },
                    constexprs={"BLOCK_R": cfg["BLOCK_R"], "BLOCK_C": cfg["BLOCK_C"]},
                    num_warps=cfg["num_warps"],
                    label=f"{dtype} R={R} C={C}",
                )
            )
    return specs


# --------------------------------------------------------------------------- C++
def _row_sum_cpp(x2: torch.Tensor, m2: torch.Tensor, out_sum: torch.Tensor, out_cnt: torch.Tensor) -> None:
    xf = x2 if x2.dtype == torch.float32 else x2.float()  # the C++ kernel reads fp32
    ext().masked_row_sum_f32(
        xf.data_ptr(), m2.data_ptr(), out_sum.data_ptr(), out_cnt.data_ptr(),
        xf.shape[0], xf.shape[1], xf.stride(0), m2.stride(0),
    )


# --------------------------------------------------------------------------- autograd + dispatcher
class MaskedMeanFunction(torch.autograd.Function):
    """Forward: one fused masked row-sum pass (Triton / C++). Backward: grad·mask/count."""

    @staticmethod
    def forward(ctx, x, mask, dim, backend):
        xm = x if dim is None else x.movedim(dim, -1)
        mm = mask if dim is None else mask.movedim(dim, -1)
        C = xm.shape[-1] if xm.dim() > 0 else 1
        R = xm.numel() // C if C else xm.shape[:-1].numel()
        x2 = xm.reshape(R, C).contiguous()
        m2 = mm.reshape(R, C).contiguous().view(torch.uint8)
        sums = torch.zeros(R, dtype=torch.float32, device=x.device)
        cnts = torch.zeros(R, dtype=torch.float32, device=x.device)
        if x2.numel() > 0:
            (_row_sum_triton if backend == "triton" else _row_sum_cpp)(x2, m2, sums, cnts)
        if dim is None:
            total, count = sums.sum(), cnts.sum()
        else:
            total, count = sums.reshape(xm.shape[:-1]), cnts.reshape(xm.shape[:-1])
        count = count.clamp_min(1.0)
        ctx.save_for_backward(mask, count)
        ctx.dim = dim
        ctx.x_dtype = x.dtype
        return total / count

    @staticmethod
    def backward(ctx, grad_out):
        mask, count = ctx.saved_tensors
        g = grad_out / count
        if ctx.dim is not None:
            g = g.unsqueeze(ctx.dim)
        grad_x = torch.where(mask, g, torch.zeros((), dtype=g.dtype, device=g.device)).to(ctx.x_dtype)
        return grad_x, None, None, None


def masked_mean(
    x: torch.Tensor, mask: torch.Tensor, dim: int | None = None, backend: str | None = None
) -> torch.Tensor:
    """Mean of ``x`` over entries where ``mask`` is set.

    x: [...] float32/bf16/fp16. mask: same shape, bool or 0/1. dim: None (all entries -> scalar)
    or one dimension to reduce. Returns fp32, shape x.shape without ``dim`` (scalar for None).
    Differentiable in x. backend: None (automatic) or "triton" | "cpp" | "torch".
    """
    check_floating("x", x)
    if not isinstance(mask, torch.Tensor) or mask.shape != x.shape:
        got = tuple(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__
        raise ValueError(f"mask must have the shape of x {tuple(x.shape)}, got {got}")
    if mask.device != x.device:
        raise ValueError(f"mask must be on x's device {x.device}, got {mask.device}")
    if dim is not None:
        if not -x.dim() <= dim < max(x.dim(), 1):
            raise ValueError(f"dim must be in [{-x.dim()}, {x.dim() - 1}] for x of shape {tuple(x.shape)}, got {dim}")
        dim = dim % x.dim()
    mask = check_mask("mask", mask)
    chosen = dispatch(x, backend)
    if chosen == "torch":
        return masked_mean_reference(x, mask, dim)
    return MaskedMeanFunction.apply(x, mask, dim, chosen)
