"""Masked whitening over the global batch (docs/design.md "Semantics we pin").

    μ = Σ m·x / n            σ² = Σ m·(x - μ)² / (n - 1)   (Bessel)          s = rsqrt(σ² + 1e-8)
    shift_mean=True:  y = (x - μ)·s
    shift_mean=False: y = (x - μ)·s + μ          (TRL's / veRL's convention: the scale changes, the mean stays)

n, Σx and Σ(x - μ)² are summed over every rank of ``group`` (a torch.distributed process group)
when one is given, so all ranks whiten with the same global statistics. Two passes over x for the
statistics (the second centred on the global mean, so no E[x²] - μ² cancellation) and one to write;
three small all-reduces' worth of data in two calls. Output is fp32 and 0 wherever mask is 0.
With fewer than 2 valid entries (globally) the variance is undefined: shift_mean=True returns
x - μ (only the shift), shift_mean=False returns zeros — never NaN.

Backends: the pure-torch reference; C++ (CPU; masked row sums from masked_mean's kernel, then the
centred sum of squares and the affine write, OpenMP over rows) and Triton (CUDA; same three
passes, statistics kept on the device — no host sync). A differentiable call (x requires grad)
runs the reference so autograd sees every step.
"""
from __future__ import annotations

import torch

from rlhf_fast._backend import dispatch, ext, should_check_values
from rlhf_fast.ops._checks import check_finite, check_floating, check_mask, check_same_shape
from rlhf_fast.ops._triton import KernelSpec, tl, triton
from rlhf_fast.ops.masked_mean import _row_sum_cpp, _row_sum_triton

WHITEN_EPS = 1e-8


def _all_reduce(t: torch.Tensor, group) -> torch.Tensor:
    if group is not None:
        import torch.distributed as dist

        dist.all_reduce(t, op=dist.ReduceOp.SUM, group=group)
    return t


def _affine_params(total: torch.Tensor, count: torch.Tensor, sqdev: torch.Tensor, shift_mean: bool):
    """(mean, scale, offset) as fp64 0-d tensors from the global sums (device ops only, no host sync).

    n < 2 (variance undefined): scale 1 and offset 0 (only the shift) or, without shift_mean,
    scale 0 and offset 0 (zeros) — never NaN."""
    mean = total / count.clamp_min(1.0)
    enough = count >= 2
    var = sqdev / (count - 1.0).clamp_min(1.0)
    scale = torch.where(enough, torch.rsqrt(var + WHITEN_EPS), torch.full_like(mean, 1.0 if shift_mean else 0.0))
    offset = mean * enough if not shift_mean else torch.zeros_like(mean)
    return mean, scale, offset


# --------------------------------------------------------------------------- torch reference
def masked_whiten_reference(
    x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, group=None
) -> torch.Tensor:
    """Pure-torch reference. x: [...] float; mask: same shape, bool or 0/1. Returns fp32 of x's shape."""
    m = mask.bool()
    xf = x.float()
    zero = torch.zeros((), dtype=torch.float32, device=x.device)
    sums = torch.stack([torch.where(m, xf, zero).sum(dtype=torch.float64), m.sum().double()])
    total, count = _all_reduce(sums, group).unbind()
    mean32 = (total / count.clamp_min(1.0)).float()
    sqdev = _all_reduce(torch.where(m, (xf - mean32) ** 2, zero).sum(dtype=torch.float64), group)
    mean, scale, offset = _affine_params(total, count, sqdev, shift_mean)
    out = (xf - mean.float()) * scale.float() + offset.float()
    return torch.where(m, out, zero)


# --------------------------------------------------------------------------- Triton
@triton.jit
def _masked_row_sqdev_kernel(
    x_ptr, mask_ptr, stats_ptr, out_ptr, R, C, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """out[r] = Σ_c mask·(x[r, c] - μ)², μ = stats[0] read on the device; fp32 accumulators."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < R
    base = rows.to(tl.int64)[:, None] * C
    mean = tl.load(stats_ptr)
    acc = tl.zeros((BLOCK_R, BLOCK_C), dtype=tl.float32)
    for c0 in range(0, C, BLOCK_C):
        cols = c0 + tl.arange(0, BLOCK_C)
        ok = row_ok[:, None] & (cols[None, :] < C)
        on = tl.load(mask_ptr + base + cols[None, :], mask=ok, other=0) != 0
        d = tl.load(x_ptr + base + cols[None, :], mask=ok, other=0.0).to(tl.float32) - mean
        acc += tl.where(on, d * d, 0.0)
    tl.store(out_ptr + rows, tl.sum(acc, axis=1), mask=row_ok)


@triton.jit
def _masked_affine_kernel(x_ptr, mask_ptr, stats_ptr, out_ptr, N, BLOCK: tl.constexpr):
    """out = mask ? (x - μ)·scale + offset : 0 with (μ, scale, offset) = stats[0:3] on the device."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < N
    mean = tl.load(stats_ptr)
    scale = tl.load(stats_ptr + 1)
    offset = tl.load(stats_ptr + 2)
    on = tl.load(mask_ptr + offs, mask=ok, other=0) != 0
    x = tl.load(x_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    tl.store(out_ptr + offs, tl.where(on, (x - mean) * scale + offset, 0.0), mask=ok)


def _sqdev_config(R: int, C: int) -> dict:
    block_c = min(triton.next_power_of_2(max(C, 1)), 2048)
    block_r = max(1, min(4096 // block_c, triton.next_power_of_2(max(R, 1))))
    return {"BLOCK_R": block_r, "BLOCK_C": block_c, "num_warps": 8 if block_r * block_c >= 4096 else 4}


def _affine_config(n: int) -> dict:
    block = min(1024, triton.next_power_of_2(max(n, 16)))
    return {"BLOCK": block, "num_warps": 8 if block >= 1024 else 4}


def aot_specs() -> list[KernelSpec]:
    specs = []
    for dtype in ("fp32", "bf16"):
        for R, C in ((512, 8192), (4096, 256)):
            cfg = _sqdev_config(R, C)
            specs.append(KernelSpec(
                _masked_row_sqdev_kernel,
                signature={"x_ptr": f"*{dtype}", "mask_ptr": "*u8", "stats_ptr": "*fp32", "out_ptr": "*fp32",
                           "R": "i32", "C": "i32", "BLOCK_R": "constexpr", "BLOCK_C": "constexpr"},
                constexprs={"BLOCK_R": cfg["BLOCK_R"], "BLOCK_C": cfg["BLOCK_C"]},
                num_warps=cfg["num_warps"], label=f"{dtype} R={R} C={C}",
            ))
        n = 512 * 8192
        acfg = _affine_config(n)
        specs.append(KernelSpec(
            _masked_affine_kernel,
            signature={"x_ptr": f"*{dtype}", "mask_ptr": "*u8", "stats_ptr": "*fp32", "out_ptr": "*fp32",
                       "N": "i64", "BLOCK": "constexpr"},
            constexprs={"BLOCK": acfg["BLOCK"]}, num_warps=acfg["num_warps"], label=f"{dtype} N={n}",
        ))
    return specs


# --------------------------------------------------------------------------- fused paths
def _whiten_triton(x2: torch.Tensor, m2: torch.Tensor, shift_mean: bool, group) -> torch.Tensor:
    R, C = x2.shape
    dev = x2.device
    row_sum = torch.empty(R, dtype=torch.float32, device=dev)
    row_cnt = torch.empty(R, dtype=torch.float32, device=dev)
    _row_sum_triton(x2, m2, row_sum, row_cnt)
    sums = torch.stack([row_sum.sum(dtype=torch.float64), row_cnt.sum(dtype=torch.float64)])
    total, count = _all_reduce(sums, group).unbind()
    mean_buf = (total / count.clamp_min(1.0)).float().reshape(1)
    row_sq = torch.empty(R, dtype=torch.float32, device=dev)
    cfg = _sqdev_config(R, C)
    _masked_row_sqdev_kernel[(triton.cdiv(R, cfg["BLOCK_R"]),)](
        x2, m2, mean_buf, row_sq, R, C, BLOCK_R=cfg["BLOCK_R"], BLOCK_C=cfg["BLOCK_C"], num_warps=cfg["num_warps"],
    )
    sqdev = _all_reduce(row_sq.sum(dtype=torch.float64), group)
    mean, scale, offset = _affine_params(total, count, sqdev, shift_mean)
    stats = torch.stack([mean, scale, offset]).float()
    out = torch.empty((R, C), dtype=torch.float32, device=dev)
    n = R * C
    acfg = _affine_config(n)
    _masked_affine_kernel[(triton.cdiv(n, acfg["BLOCK"]),)](
        x2, m2, stats, out, n, BLOCK=acfg["BLOCK"], num_warps=acfg["num_warps"],
    )
    return out


def _whiten_cpp(x2: torch.Tensor, m2: torch.Tensor, shift_mean: bool, group) -> torch.Tensor:
    R, C = x2.shape
    xf = x2 if x2.dtype == torch.float32 else x2.float()
    row_sum = torch.empty(R, dtype=torch.float32)
    row_cnt = torch.empty(R, dtype=torch.float32)
    _row_sum_cpp(xf, m2, row_sum, row_cnt)
    sums = torch.stack([row_sum.sum(dtype=torch.float64), row_cnt.sum(dtype=torch.float64)])
    total, count = _all_reduce(sums, group).unbind()
    mean32 = float((total / count.clamp_min(1.0)).float())
    row_sq = torch.empty(R, dtype=torch.float32)
    bad = ext().masked_row_sqdev_f32(xf.data_ptr(), m2.data_ptr(), mean32, row_sq.data_ptr(), R, C)
    # A non-finite valid entry shows up in its row's sums; masked-out garbage never reaches them.
    if bad or not torch.isfinite(total):
        raise ValueError("x contains NaN or inf at valid positions")
    sqdev = _all_reduce(row_sq.sum(dtype=torch.float64), group)
    mean, scale, offset = _affine_params(total, count, sqdev, shift_mean)
    out = torch.empty((R, C), dtype=torch.float32)
    ext().masked_affine_f32(xf.data_ptr(), m2.data_ptr(), out.data_ptr(), R * C, float(mean.float()),
                            float(scale.float()), float(offset.float()))
    return out


def masked_whiten(
    x: torch.Tensor,
    mask: torch.Tensor,
    shift_mean: bool = True,
    group=None,
    backend: str | None = None,
) -> torch.Tensor:
    """Whiten ``x`` with the masked mean and Bessel-corrected variance of the (global) batch.

    x: [...] float32/bf16/fp16 (typically advantages [B, T]). mask: same shape, bool or 0/1.
    shift_mean: subtract the mean (True) or keep it (False: (x - μ)·s + μ). group: optional
    torch.distributed process group; statistics are summed over all its ranks (every rank must
    call). Returns fp32 of x's shape, 0 where mask is 0. backend: None (automatic) or
    "triton" | "cpp" | "torch"; differentiable calls (x requires grad) always use the reference.
    """
    check_floating("x", x)
    check_same_shape("x", x, mask=mask)
    mask = check_mask("mask", mask)
    chosen = dispatch(x, backend)
    use_reference = chosen == "torch" or (x.requires_grad and torch.is_grad_enabled())
    if (use_reference or chosen == "triton") and should_check_values(x):  # C++ checks inside its passes
        check_finite("x (valid positions)", torch.where(mask, x, torch.zeros((), dtype=x.dtype, device=x.device)))
    if use_reference:
        return masked_whiten_reference(x, mask, shift_mean, group)
    C = x.shape[-1] if x.dim() > 0 else 1
    R = x.numel() // C if C else 0
    if R == 0 or C == 0:
        # Nothing local to whiten, but a group's collectives must still match the other ranks'.
        return masked_whiten_reference(x, mask, shift_mean, group)
    x2 = x.detach().reshape(R, C).contiguous()
    m2 = mask.reshape(R, C).contiguous().view(torch.uint8)
    if chosen == "triton":
        out = _whiten_triton(x2, m2, shift_mean, group)
    else:
        out = _whiten_cpp(x2, m2, shift_mean, group)
    return out.reshape(x.shape)
