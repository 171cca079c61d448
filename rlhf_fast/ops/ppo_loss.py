"""PPO clipped policy loss (optional dual clip), clipped value loss, and loss aggregation.

All per-token inputs are [B, T] (B sequences, T response positions) with a 0/1 ``mask`` [B, T].

Policy loss, per valid token (docs/design.md "Semantics we pin"):
    log_ratio = logp - old_logp;   ratio = exp(clamp(log_ratio, -20, 20))
    unclipped = -A * ratio;        clipped = -A * clamp(ratio, 1 - clip_low, 1 + clip_high)
    loss = max(unclipped, clipped)
    dual clip c > 1, only where A < 0:  loss = min(loss, -c * A)
Value loss, per valid token:
    V_clip = V_old + clamp(V - V_old, -clip, clip)
    loss = 0.5 * max((V - R)^2, (V_clip - R)^2)

Aggregation of a per-token loss l [B, T] with mask m (n_b = valid tokens of row b):
    "token-mean"              Σ l·m / num_tokens           (num_tokens: global count when given,
                                                             else the local Σ n_b)
    "seq-mean-token-mean"     Σ_b (Σ_t l·m / n_b) / num_seqs
    "seq-mean-token-sum"      Σ_b (Σ_t l·m) / num_seqs
    "seq-mean-token-sum-norm" Σ l·m / (num_seqs · norm_length)   (Dr.GRPO; norm_length defaults to T)
``num_seqs`` defaults to the local number of rows with at least one valid token: a row with no
valid token (padding of a micro-batch) does not dilute the mean (veRL's choice). Every count
below 1 is taken as 1, so zero valid tokens or sequences give a loss of exactly 0 with zero
gradient, never NaN. Counts may be Python numbers or 1-element tensors (e.g. an all-reduced
device count: no host sync).

Stats (detached fp32 0-dim tensors, masked token means over the LOCAL valid tokens, no host sync):
    clipfrac       fraction where the clipped branch is strictly larger (TRL's pg_clipfrac:
                   (pg_losses2 > pg_losses).float() masked mean); the dual clip is not counted here
    dual_clipfrac  fraction where the dual clip is active (A < 0 and -c·A < loss); 0 without it
    approx_kl      0.5 · mean(log_ratio^2) on the raw (unclamped) log-ratio, TRL's
                   ``policy/approxkl_avg``
    ratio_mean     mean of the (clamped-exp) ratio
Value clipfrac: fraction where (V_clip - R)^2 > (V - R)^2 strictly (TRL's vf_clipfrac).

Gradient conventions (identical to autograd of the reference everywhere except measure-zero ties
that random data never hits): clamp passes the gradient on its closed interval [lo, hi]; at an
exact tie of the two max branches outside the clip range, or of the dual cap and the loss, the
fused backward gives the whole gradient of the unclipped branch where torch would split it.

Fused paths: the forward is ONE row-block pass (Triton kernel / C++ call, OpenMP over rows) that
writes per-row partial sums [K, B] (loss, count, clip count, ...); the aggregation then combines
those B-sized vectors. The backward is ONE pass that recomputes each token's coefficient from
the inputs, so nothing [B, T]-sized is saved beyond the inputs themselves. The same forward pass
counts non-finite inputs at valid positions, so the CPU finiteness check reads no extra memory.
"""
from __future__ import annotations

import math
import numbers
from typing import NamedTuple

import torch

from rlhf_fast._backend import dispatch, ext, should_check_values
from rlhf_fast.ops._checks import check_floating, check_mask, check_positive, check_same_shape
from rlhf_fast.ops._triton import KernelSpec, tl, triton

AGG_MODES = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm")
LOG_RATIO_CLAMP = 20.0

# Row layout of the per-row partial sums the fused forward passes write.
# Rows 2..5 are the numerators of the stats, in PolicyLossStats order, so one slice / count gives all four.
_P_LOSS, _P_COUNT, _P_CLIP, _P_HALF_LR2, _P_RATIO, _P_DUAL, _P_BAD = range(7)
_POLICY_ROWS = 7
_V_LOSS, _V_COUNT, _V_CLIP, _V_BAD = range(4)
_VALUE_ROWS = 4


class PolicyLossStats(NamedTuple):
    """Detached fp32 0-dim tensors (local masked token means; see the module docstring)."""

    clipfrac: torch.Tensor
    approx_kl: torch.Tensor
    ratio_mean: torch.Tensor
    dual_clipfrac: torch.Tensor


# --------------------------------------------------------------------------- aggregation
def _count(value, device) -> torch.Tensor | float | None:
    """A count argument as a Python float or an fp32 device tensor (no host sync)."""
    if value is None or not isinstance(value, torch.Tensor):
        return None if value is None else float(value)
    return value.to(device=device, dtype=torch.float32).reshape(())


def _at_least_one(x):
    return x.clamp_min(1.0) if isinstance(x, torch.Tensor) else max(float(x), 1.0)


def _row_weights(row_count, agg, num_tokens, num_seqs, norm_length, T, total_count=None):
    """w [B] fp32 such that loss = Σ_b w_b · Σ_t l[b,t]·m[b,t] (the gradient of the aggregation).
    total_count: row_count.sum() when the caller has it already."""
    dev = row_count.device
    if agg == "token-mean":
        n = _count(num_tokens, dev)
        if n is None:
            n = row_count.sum() if total_count is None else total_count
        if isinstance(n, torch.Tensor):
            return n.clamp_min(1.0).reciprocal().expand(row_count.shape).contiguous()
        return torch.full_like(row_count, 1.0 / _at_least_one(n))
    d = _count(num_seqs, dev)
    seqs = _at_least_one((row_count > 0).sum().float() if d is None else d)
    if agg == "seq-mean-token-mean":
        return 1.0 / (row_count.clamp_min(1.0) * seqs)
    if agg == "seq-mean-token-sum":
        return torch.ones_like(row_count) / seqs
    length = float(T if norm_length is None else norm_length)
    return torch.ones_like(row_count) / (seqs * length)


def aggregate_loss(
    loss_mat: torch.Tensor,
    mask: torch.Tensor,
    agg: str = "token-mean",
    num_tokens=None,
    num_seqs=None,
    norm_length: float | None = None,
) -> torch.Tensor:
    """Reduce a per-token loss [B, T] to a scalar with one of AGG_MODES (pure torch, differentiable).

    mask: [B, T] bool or 0/1. num_tokens / num_seqs: None (local counts), a number or a 1-element
    tensor (global counts). norm_length: Dr.GRPO's constant length, default T. Returns fp32.
    Masked-out entries never contribute, even when they hold NaN.
    """
    check_floating("loss_mat", loss_mat)
    if loss_mat.dim() != 2:
        raise ValueError(f"loss_mat must be 2-D [B, T], got shape {tuple(loss_mat.shape)}")
    check_same_shape("loss_mat", loss_mat, mask=mask)
    _check_agg(agg, num_tokens, num_seqs, norm_length)
    m = mask.bool()
    zero = torch.zeros((), dtype=torch.float32, device=loss_mat.device)
    lm = torch.where(m, loss_mat.float(), zero)
    tokens = m.sum(-1).float()
    if agg == "token-mean":
        n = _count(num_tokens, loss_mat.device)
        return lm.sum() / _at_least_one(tokens.sum() if n is None else n)
    d = _count(num_seqs, loss_mat.device)
    seqs = _at_least_one((tokens > 0).sum().float() if d is None else d)
    if agg == "seq-mean-token-mean":
        return (lm.sum(-1) / tokens.clamp_min(1.0)).sum() / seqs
    if agg == "seq-mean-token-sum":
        return lm.sum(-1).sum() / seqs
    length = float(loss_mat.shape[-1] if norm_length is None else norm_length)
    return lm.sum() / (seqs * length)


def _masked_token_mean(x: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    zero = torch.zeros((), dtype=torch.float32, device=x.device)
    return torch.where(m, x.float(), zero).sum() / m.sum().clamp_min(1).float()


# --------------------------------------------------------------------------- torch references
def ppo_policy_loss_reference(
    logprobs, old_logprobs, advantages, mask, clip_low=0.2, clip_high=0.2, dual_clip=None,
    agg="token-mean", num_tokens=None, num_seqs=None, norm_length=None,
) -> tuple[torch.Tensor, PolicyLossStats]:
    """Eager torch PPO policy loss (the formula as every framework writes it). Inputs [B, T]
    float (any of fp32/bf16/fp16, computed in fp32); mask [B, T] bool or 0/1. Returns (fp32 loss,
    PolicyLossStats). Masked-out entries never reach the loss; for the gradient only logprobs /
    old_logprobs may hold NaN there (the fused paths accept NaN in every input there)."""
    m = mask.bool()
    # In place (no extra memory): NaN padding in logprobs must not turn the gradient into NaN.
    log_ratio = (logprobs.float() - old_logprobs.float()).masked_fill_(~m, 0.0)
    ratio = torch.exp(torch.clamp(log_ratio, -LOG_RATIO_CLAMP, LOG_RATIO_CLAMP))
    adv = advantages.float()
    pg_unclipped = -adv * ratio
    pg_clipped = -adv * torch.clamp(ratio, 1.0 - clip_low, 1.0 + clip_high)
    loss_mat = torch.maximum(pg_unclipped, pg_clipped)
    if dual_clip is not None:
        cap = -dual_clip * adv
        dual_on = (adv < 0) & (cap < loss_mat)
        loss_mat = torch.where(adv < 0, torch.minimum(loss_mat, cap), loss_mat)
    else:
        dual_on = torch.zeros_like(m)
    loss = aggregate_loss(loss_mat, m, agg, num_tokens, num_seqs, norm_length)
    with torch.no_grad():
        stats = PolicyLossStats(
            clipfrac=_masked_token_mean((pg_clipped > pg_unclipped).float(), m),
            approx_kl=0.5 * _masked_token_mean(log_ratio.detach() ** 2, m),
            ratio_mean=_masked_token_mean(ratio.detach(), m),
            dual_clipfrac=_masked_token_mean(dual_on.float(), m),
        )
    return loss, stats


def value_loss_reference(
    values, old_values, returns, mask, clip=0.2, agg="token-mean", num_tokens=None, num_seqs=None,
    norm_length=None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Eager torch clipped value loss. Inputs [B, T] float; returns (fp32 loss, fp32 clipfrac).
    Masked-out entries never reach the loss, but must be finite for a finite gradient (the fused
    paths accept NaN there)."""
    m = mask.bool()
    v, v_old, ret = values.float(), old_values.float(), returns.float()
    # Clamp V itself: inside the range this is V exactly (V_old + clamp(V - V_old) can round).
    v_clipped = torch.minimum(torch.maximum(v, v_old - clip), v_old + clip)
    err_unclipped = (v - ret) ** 2
    err_clipped = (v_clipped - ret) ** 2
    loss_mat = 0.5 * torch.maximum(err_unclipped, err_clipped)
    loss = aggregate_loss(loss_mat, m, agg, num_tokens, num_seqs, norm_length)
    with torch.no_grad():
        clipfrac = _masked_token_mean((err_clipped > err_unclipped).float(), m)
    return loss, clipfrac


# --------------------------------------------------------------------------- Triton
@triton.jit
def _ppo_policy_fwd_kernel(
    logp_ptr, old_ptr, adv_ptr, mask_ptr, part_ptr, R, T, clip_low, clip_high, dual_clip,
    BLOCK_R: tl.constexpr, BLOCK_T: tl.constexpr,
):
    """Per-row partial sums part[k, r] for k in (loss, count, clip, 0.5·log_ratio^2, ratio, dual,
    non-finite), BLOCK_R rows per program, fp32. dual_clip = +inf disables the dual clip."""
    pid = tl.program_id(0)
    rows = pid * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < R
    base = rows[:, None].to(tl.int64) * T
    s_loss = tl.zeros((BLOCK_R,), dtype=tl.float32)
    s_cnt = tl.zeros((BLOCK_R,), dtype=tl.float32)
    s_clip = tl.zeros((BLOCK_R,), dtype=tl.float32)
    s_dual = tl.zeros((BLOCK_R,), dtype=tl.float32)
    s_lr2 = tl.zeros((BLOCK_R,), dtype=tl.float32)
    s_ratio = tl.zeros((BLOCK_R,), dtype=tl.float32)
    s_bad = tl.zeros((BLOCK_R,), dtype=tl.float32)
    for t0 in range(0, T, BLOCK_T):
        cols = t0 + tl.arange(0, BLOCK_T)
        ok = row_ok[:, None] & (cols[None, :] < T)
        offs = base + cols[None, :]
        on = tl.load(mask_ptr + offs, mask=ok, other=0) != 0
        lp = tl.load(logp_ptr + offs, mask=ok, other=0.0).to(tl.float32)
        old = tl.load(old_ptr + offs, mask=ok, other=0.0).to(tl.float32)
        a = tl.load(adv_ptr + offs, mask=ok, other=0.0).to(tl.float32)
        log_ratio = lp - old
        ratio = tl.exp(tl.minimum(tl.maximum(log_ratio, -20.0), 20.0))
        unclipped = -a * ratio
        clipped = -a * tl.minimum(tl.maximum(ratio, 1.0 - clip_low), 1.0 + clip_high)
        clip_on = clipped > unclipped
        loss = tl.maximum(unclipped, clipped)
        cap = -dual_clip * a
        dual_on = (a < 0) & (cap < loss)
        loss = tl.where(dual_on, cap, loss)
        # x - x is 0 for finite x and NaN for NaN/inf: one test covers all three inputs.
        bad = (log_ratio - log_ratio + a - a) != 0
        s_loss += tl.sum(tl.where(on, loss, 0.0), axis=1)
        s_cnt += tl.sum(on.to(tl.float32), axis=1)
        s_clip += tl.sum((on & clip_on).to(tl.float32), axis=1)
        s_dual += tl.sum((on & dual_on).to(tl.float32), axis=1)
        s_lr2 += tl.sum(tl.where(on, 0.5 * log_ratio * log_ratio, 0.0), axis=1)
        s_ratio += tl.sum(tl.where(on, ratio, 0.0), axis=1)
        s_bad += tl.sum((on & bad).to(tl.float32), axis=1)
    tl.store(part_ptr + 0 * R + rows, s_loss, mask=row_ok)
    tl.store(part_ptr + 1 * R + rows, s_cnt, mask=row_ok)
    tl.store(part_ptr + 2 * R + rows, s_clip, mask=row_ok)
    tl.store(part_ptr + 3 * R + rows, s_lr2, mask=row_ok)
    tl.store(part_ptr + 4 * R + rows, s_ratio, mask=row_ok)
    tl.store(part_ptr + 5 * R + rows, s_dual, mask=row_ok)
    tl.store(part_ptr + 6 * R + rows, s_bad, mask=row_ok)


@triton.jit
def _ppo_policy_bwd_kernel(
    logp_ptr, old_ptr, adv_ptr, mask_ptr, weight_ptr, gout_ptr, grad_ptr, R, T,
    clip_low, clip_high, dual_clip,
    BLOCK_R: tl.constexpr, BLOCK_T: tl.constexpr,
):
    """grad[r, t] = g · w[r] · mask · [unclipped branch active] · [|log_ratio| <= 20] · (-A · ratio)."""
    pid = tl.program_id(0)
    rows = pid * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < R
    base = rows[:, None].to(tl.int64) * T
    scale = tl.load(weight_ptr + rows, mask=row_ok, other=0.0) * tl.load(gout_ptr)
    for t0 in range(0, T, BLOCK_T):
        cols = t0 + tl.arange(0, BLOCK_T)
        ok = row_ok[:, None] & (cols[None, :] < T)
        offs = base + cols[None, :]
        on = tl.load(mask_ptr + offs, mask=ok, other=0) != 0
        lp = tl.load(logp_ptr + offs, mask=ok, other=0.0).to(tl.float32)
        old = tl.load(old_ptr + offs, mask=ok, other=0.0).to(tl.float32)
        a = tl.load(adv_ptr + offs, mask=ok, other=0.0).to(tl.float32)
        log_ratio = lp - old
        ratio = tl.exp(tl.minimum(tl.maximum(log_ratio, -20.0), 20.0))
        unclipped = -a * ratio
        clipped = -a * tl.minimum(tl.maximum(ratio, 1.0 - clip_low), 1.0 + clip_high)
        loss = tl.maximum(unclipped, clipped)
        dual_on = (a < 0) & (-dual_clip * a < loss)
        live = on & (clipped <= unclipped) & (~dual_on) & (tl.abs(log_ratio) <= 20.0)
        grad = tl.where(live, unclipped * scale[:, None], 0.0)
        tl.store(grad_ptr + offs, grad.to(grad_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _value_fwd_kernel(
    v_ptr, vold_ptr, ret_ptr, mask_ptr, part_ptr, R, T, clip,
    BLOCK_R: tl.constexpr, BLOCK_T: tl.constexpr,
):
    """Per-row partial sums part[k, r] for k in (loss, count, clip, non-finite)."""
    pid = tl.program_id(0)
    rows = pid * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < R
    base = rows[:, None].to(tl.int64) * T
    s_loss = tl.zeros((BLOCK_R,), dtype=tl.float32)
    s_cnt = tl.zeros((BLOCK_R,), dtype=tl.float32)
    s_clip = tl.zeros((BLOCK_R,), dtype=tl.float32)
    s_bad = tl.zeros((BLOCK_R,), dtype=tl.float32)
    for t0 in range(0, T, BLOCK_T):
        cols = t0 + tl.arange(0, BLOCK_T)
        ok = row_ok[:, None] & (cols[None, :] < T)
        offs = base + cols[None, :]
        on = tl.load(mask_ptr + offs, mask=ok, other=0) != 0
        v = tl.load(v_ptr + offs, mask=ok, other=0.0).to(tl.float32)
        v_old = tl.load(vold_ptr + offs, mask=ok, other=0.0).to(tl.float32)
        ret = tl.load(ret_ptr + offs, mask=ok, other=0.0).to(tl.float32)
        delta = v - v_old
        v_clipped = tl.minimum(tl.maximum(v, v_old - clip), v_old + clip)  # exact inside the range
        err_u = (v - ret) * (v - ret)
        err_c = (v_clipped - ret) * (v_clipped - ret)
        loss = 0.5 * tl.maximum(err_u, err_c)
        bad = (delta - delta + ret - ret) != 0
        s_loss += tl.sum(tl.where(on, loss, 0.0), axis=1)
        s_cnt += tl.sum(on.to(tl.float32), axis=1)
        s_clip += tl.sum((on & (err_c > err_u)).to(tl.float32), axis=1)
        s_bad += tl.sum((on & bad).to(tl.float32), axis=1)
    tl.store(part_ptr + 0 * R + rows, s_loss, mask=row_ok)
    tl.store(part_ptr + 1 * R + rows, s_cnt, mask=row_ok)
    tl.store(part_ptr + 2 * R + rows, s_clip, mask=row_ok)
    tl.store(part_ptr + 3 * R + rows, s_bad, mask=row_ok)


@triton.jit
def _value_bwd_kernel(
    v_ptr, vold_ptr, ret_ptr, mask_ptr, weight_ptr, gout_ptr, grad_ptr, R, T, clip,
    BLOCK_R: tl.constexpr, BLOCK_T: tl.constexpr,
):
    """grad = g·w[r]·mask·(clipped branch strictly larger ? [|V - V_old| <= clip]·(V_clip - R) : V - R)."""
    pid = tl.program_id(0)
    rows = pid * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < R
    base = rows[:, None].to(tl.int64) * T
    scale = tl.load(weight_ptr + rows, mask=row_ok, other=0.0) * tl.load(gout_ptr)
    for t0 in range(0, T, BLOCK_T):
        cols = t0 + tl.arange(0, BLOCK_T)
        ok = row_ok[:, None] & (cols[None, :] < T)
        offs = base + cols[None, :]
        on = tl.load(mask_ptr + offs, mask=ok, other=0) != 0
        v = tl.load(v_ptr + offs, mask=ok, other=0.0).to(tl.float32)
        v_old = tl.load(vold_ptr + offs, mask=ok, other=0.0).to(tl.float32)
        ret = tl.load(ret_ptr + offs, mask=ok, other=0.0).to(tl.float32)
        delta = v - v_old
        v_clipped = tl.minimum(tl.maximum(v, v_old - clip), v_old + clip)  # exact inside the range
        err_u = (v - ret) * (v - ret)
        err_c = (v_clipped - ret) * (v_clipped - ret)
        in_range = tl.abs(delta) <= clip
        coef = tl.where(err_c > err_u, tl.where(in_range, v_clipped - ret, 0.0), v - ret)
        grad = tl.where(on, coef * scale[:, None], 0.0)
        tl.store(grad_ptr + offs, grad.to(grad_ptr.dtype.element_ty), mask=ok)


def _rowblock_config(R: int, T: int) -> dict:
    """Block sizes for a [R, T] element-wise pass with per-row sums: ~1k elements per tile, whole
    rows per program (the per-row partials need no atomics)."""
    block_t = min(triton.next_power_of_2(max(T, 1)), 1024)
    block_r = max(1, min(1024 // block_t, triton.next_power_of_2(max(R, 1))))
    return {"BLOCK_R": block_r, "BLOCK_T": block_t, "num_warps": 4}


def _launch(kernel, R, T, *args):
    cfg = _rowblock_config(R, T)
    grid = (triton.cdiv(R, cfg["BLOCK_R"]),)
    kernel[grid](*args, BLOCK_R=cfg["BLOCK_R"], BLOCK_T=cfg["BLOCK_T"], num_warps=cfg["num_warps"])


def aot_specs() -> list[KernelSpec]:
    specs = []
    for dtype in ("fp32", "bf16"):
        for R, T in ((64, 1024), (512, 8192)):
            cfg = _rowblock_config(R, T)
            cx = {"BLOCK_R": cfg["BLOCK_R"], "BLOCK_T": cfg["BLOCK_T"]}
            ptr, common = f"*{dtype}", {"R": "i32", "T": "i32", "BLOCK_R": "constexpr", "BLOCK_T": "constexpr"}
            clips = {"clip_low": "fp32", "clip_high": "fp32", "dual_clip": "fp32"}
            policy_in = {"logp_ptr": ptr, "old_ptr": ptr, "adv_ptr": ptr, "mask_ptr": "*u8"}
            value_in = {"v_ptr": ptr, "vold_ptr": ptr, "ret_ptr": ptr, "mask_ptr": "*u8"}
            bwd_io = {"weight_ptr": "*fp32", "gout_ptr": "*fp32", "grad_ptr": ptr}
            sigs = [
                (_ppo_policy_fwd_kernel, {**policy_in, "part_ptr": "*fp32", **common, **clips}),
                (_ppo_policy_bwd_kernel, {**policy_in, **bwd_io, **common, **clips}),
                (_value_fwd_kernel, {**value_in, "part_ptr": "*fp32", **common, "clip": "fp32"}),
                (_value_bwd_kernel, {**value_in, **bwd_io, **common, "clip": "fp32"}),
            ]
            for kernel, sig in sigs:
                # The signature must list the arguments in the kernel's order.
                order = kernel.arg_names if hasattr(kernel, "arg_names") else list(sig)
                sig = {name: sig[name] for name in order}
                specs.append(KernelSpec(kernel, signature=sig, constexprs=cx, num_warps=cfg["num_warps"],
                                        label=f"{dtype} B={R} T={T}"))
    return specs


# --------------------------------------------------------------------------- C++
def _f32(t: torch.Tensor) -> torch.Tensor:
    """The C++ kernels read contiguous fp32 (bf16/fp16 inputs are upcast here)."""
    return t.contiguous() if t.dtype == torch.float32 else t.float().contiguous()


def _policy_fwd(backend, lp, old, adv, m8, part, clips):
    R, T = lp.shape
    if backend == "triton":
        _launch(_ppo_policy_fwd_kernel, R, T, lp, old, adv, m8, part, R, T, *clips)
    else:
        lp, old, adv = _f32(lp), _f32(old), _f32(adv)
        ext().ppo_policy_loss_fwd_f32(lp.data_ptr(), old.data_ptr(), adv.data_ptr(), m8.data_ptr(),
                                      part.data_ptr(), R, T, *clips)


def _policy_bwd(backend, lp, old, adv, m8, weight, gout, grad, clips):
    R, T = lp.shape
    if backend == "triton":
        _launch(_ppo_policy_bwd_kernel, R, T, lp, old, adv, m8, weight, gout, grad, R, T, *clips)
        return grad
    lp, old, adv = _f32(lp), _f32(old), _f32(adv)
    g32 = grad if grad.dtype == torch.float32 else torch.empty(grad.shape, dtype=torch.float32)
    ext().ppo_policy_loss_bwd_f32(lp.data_ptr(), old.data_ptr(), adv.data_ptr(), m8.data_ptr(),
                                  weight.data_ptr(), gout.data_ptr(), g32.data_ptr(), R, T, *clips)
    return g32.to(grad.dtype)


def _value_fwd(backend, v, v_old, ret, m8, part, clip):
    R, T = v.shape
    if backend == "triton":
        _launch(_value_fwd_kernel, R, T, v, v_old, ret, m8, part, R, T, clip)
    else:
        v, v_old, ret = _f32(v), _f32(v_old), _f32(ret)
        ext().value_loss_fwd_f32(v.data_ptr(), v_old.data_ptr(), ret.data_ptr(), m8.data_ptr(),
                                 part.data_ptr(), R, T, clip)


def _value_bwd(backend, v, v_old, ret, m8, weight, gout, grad, clip):
    R, T = v.shape
    if backend == "triton":
        _launch(_value_bwd_kernel, R, T, v, v_old, ret, m8, weight, gout, grad, R, T, clip)
        return grad
    v, v_old, ret = _f32(v), _f32(v_old), _f32(ret)
    g32 = grad if grad.dtype == torch.float32 else torch.empty(grad.shape, dtype=torch.float32)
    ext().value_loss_bwd_f32(v.data_ptr(), v_old.data_ptr(), ret.data_ptr(), m8.data_ptr(),
                             weight.data_ptr(), gout.data_ptr(), g32.data_ptr(), R, T, clip)
    return g32.to(grad.dtype)


# --------------------------------------------------------------------------- autograd
class PPOPolicyLossFunction(torch.autograd.Function):
    """Fused PPO policy loss: one forward pass, one backward pass; gradient for logprobs only."""

    @staticmethod
    def forward(ctx, logprobs, old_logprobs, advantages, mask8, clips, agg, num_tokens, num_seqs,
                norm_length, backend):
        R, T = logprobs.shape
        part = torch.zeros(_POLICY_ROWS, R, dtype=torch.float32, device=logprobs.device)
        if logprobs.numel() > 0:
            _policy_fwd(backend, logprobs, old_logprobs, advantages, mask8, part, clips)
        totals = part.sum(1)
        weight = _row_weights(part[_P_COUNT], agg, num_tokens, num_seqs, norm_length, T, totals[_P_COUNT])
        loss = (part[_P_LOSS] * weight).sum()
        # clipfrac, approx_kl, ratio_mean, dual_clipfrac: one division over the stat rows
        stats = (*(totals[_P_CLIP:_P_DUAL + 1] / totals[_P_COUNT].clamp_min(1.0)).unbind(0), totals[_P_BAD])
        # Inputs are held by the caller anyway: saving them costs no memory; the per-token
        # coefficient is recomputed in backward rather than stored.
        ctx.save_for_backward(logprobs, old_logprobs, advantages, mask8, weight)
        ctx.clips, ctx.backend = clips, backend
        ctx.mark_non_differentiable(*stats)
        return (loss, *stats)

    @staticmethod
    def backward(ctx, grad_loss, *_unused_stat_grads):
        logprobs, old_logprobs, advantages, mask8, weight = ctx.saved_tensors
        grad = torch.empty_like(logprobs, memory_format=torch.contiguous_format)
        if logprobs.numel() > 0:
            gout = grad_loss.float().contiguous()
            grad = _policy_bwd(ctx.backend, logprobs, old_logprobs, advantages, mask8, weight, gout,
                               grad, ctx.clips)
        return grad, None, None, None, None, None, None, None, None, None


class ValueLossFunction(torch.autograd.Function):
    """Fused clipped value loss: one forward pass, one backward pass; gradient for values only."""

    @staticmethod
    def forward(ctx, values, old_values, returns, mask8, clip, agg, num_tokens, num_seqs, norm_length,
                backend):
        R, T = values.shape
        part = torch.zeros(_VALUE_ROWS, R, dtype=torch.float32, device=values.device)
        if values.numel() > 0:
            _value_fwd(backend, values, old_values, returns, mask8, part, clip)
        totals = part.sum(1)
        weight = _row_weights(part[_V_COUNT], agg, num_tokens, num_seqs, norm_length, T, totals[_V_COUNT])
        loss = (part[_V_LOSS] * weight).sum()
        clipfrac = totals[_V_CLIP] / totals[_V_COUNT].clamp_min(1.0)
        bad = totals[_V_BAD]
        ctx.save_for_backward(values, old_values, returns, mask8, weight)
        ctx.clip, ctx.backend = clip, backend
        ctx.mark_non_differentiable(clipfrac, bad)
        return loss, clipfrac, bad

    @staticmethod
    def backward(ctx, grad_loss, *_unused_stat_grads):
        values, old_values, returns, mask8, weight = ctx.saved_tensors
        grad = torch.empty_like(values, memory_format=torch.contiguous_format)
        if values.numel() > 0:
            gout = grad_loss.float().contiguous()
            grad = _value_bwd(ctx.backend, values, old_values, returns, mask8, weight, gout, grad, ctx.clip)
        return grad, None, None, None, None, None, None, None, None, None


# --------------------------------------------------------------------------- public API
def _check_count(name, value):
    if value is None:
        return
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(f"{name} must be a number or a 1-element tensor, got shape {tuple(value.shape)}")
        if should_check_values(value) and not bool(value.float().reshape(()) >= 0):
            raise ValueError(f"{name} must be >= 0, got {value.item()!r}")
        return
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be None, a number or a 1-element tensor, got {type(value).__name__}")
    if not value >= 0 or math.isinf(value):
        raise ValueError(f"{name} must be a finite count >= 0, got {value!r}")


def _check_agg(agg, num_tokens, num_seqs, norm_length):
    if agg not in AGG_MODES:
        raise ValueError(f"agg must be one of {AGG_MODES}, got {agg!r}")
    _check_count("num_tokens", num_tokens)
    _check_count("num_seqs", num_seqs)
    if norm_length is not None:
        check_positive("norm_length", norm_length)


def _check_inputs(names, tensors, mask):
    first_name, first = names[0], tensors[0]
    for name, t in zip(names, tensors):
        check_floating(name, t)
    if first.dim() != 2:
        raise ValueError(f"{first_name} must be 2-D [B, T], got shape {tuple(first.shape)}")
    check_same_shape(first_name, first, **dict(zip(names[1:], tensors[1:])))
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"mask must be a torch.Tensor, got {type(mask).__name__}")
    check_same_shape(first_name, first, mask=mask)
    return check_mask("mask", mask)


def _raise_non_finite(names, tensors, mask):
    """Cold path: name the first input holding NaN/inf at a valid position."""
    for name, t in zip(names, tensors):
        if bool((~torch.isfinite(t) & mask).any()):
            raise ValueError(f"{name} contains NaN or inf at valid (mask=1) positions")
    raise ValueError(f"{', '.join(names)}: an intermediate became NaN or inf at a valid position")


def ppo_policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_low: float = 0.2,
    clip_high: float = 0.2,
    dual_clip: float | None = None,
    agg: str = "token-mean",
    num_tokens=None,
    num_seqs=None,
    norm_length: float | None = None,
    backend: str | None = None,
) -> tuple[torch.Tensor, PolicyLossStats]:
    """PPO clipped policy loss (see the module docstring for the formulas and aggregation modes).

    logprobs (differentiable), old_logprobs, advantages: [B, T] float32/bf16/fp16 (computed in
    fp32). mask: [B, T] bool or 0/1. clip_low, clip_high > 0; dual_clip None or > 1.
    agg: one of AGG_MODES. num_tokens / num_seqs: global counts (number or 1-element tensor) or
    None for the local counts. norm_length: Dr.GRPO length (default T).
    Returns (loss: fp32 0-dim, PolicyLossStats). Gradient flows to logprobs only, in its dtype.
    backend: None (automatic) or "triton" | "cpp" | "torch".
    """
    names = ("logprobs", "old_logprobs", "advantages")
    tensors = (logprobs, old_logprobs, advantages)
    m = _check_inputs(names, tensors, mask)
    check_positive("clip_low", clip_low)
    check_positive("clip_high", clip_high)
    if dual_clip is not None and not dual_clip > 1:
        raise ValueError(f"dual_clip must be None or > 1, got {dual_clip!r}")
    _check_agg(agg, num_tokens, num_seqs, norm_length)
    chosen = dispatch(logprobs, backend)
    check = should_check_values(logprobs)
    if chosen == "torch":
        if check:
            for name, t in zip(names, tensors):
                if bool((~torch.isfinite(t) & m).any()):
                    raise ValueError(f"{name} contains NaN or inf at valid (mask=1) positions")
        return ppo_policy_loss_reference(logprobs, old_logprobs, advantages, m, clip_low, clip_high,
                                         dual_clip, agg, num_tokens, num_seqs, norm_length)
    clips = (float(clip_low), float(clip_high), float("inf") if dual_clip is None else float(dual_clip))
    loss, clipfrac, approx_kl, ratio_mean, dual_clipfrac, bad = PPOPolicyLossFunction.apply(
        logprobs.contiguous(), old_logprobs.contiguous(), advantages.contiguous(),
        m.contiguous().view(torch.uint8), clips, agg, num_tokens, num_seqs, norm_length, chosen,
    )
    if check and bool(bad > 0):
        _raise_non_finite(names, tensors, m)
    return loss, PolicyLossStats(clipfrac, approx_kl, ratio_mean, dual_clipfrac)


def value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    clip: float = 0.2,
    agg: str = "token-mean",
    num_tokens=None,
    num_seqs=None,
    norm_length: float | None = None,
    backend: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Clipped value loss 0.5·max((V - R)^2, (V_old + clamp(V - V_old, ±clip) - R)^2), aggregated.

    values (differentiable), old_values, returns: [B, T] float32/bf16/fp16 (computed in fp32).
    mask: [B, T] bool or 0/1. clip > 0. agg / num_tokens / num_seqs / norm_length as in
    ppo_policy_loss. Returns (loss: fp32 0-dim, clipfrac: detached fp32 0-dim).
    """
    names = ("values", "old_values", "returns")
    tensors = (values, old_values, returns)
    m = _check_inputs(names, tensors, mask)
    check_positive("clip", clip)
    _check_agg(agg, num_tokens, num_seqs, norm_length)
    chosen = dispatch(values, backend)
    check = should_check_values(values)
    if chosen == "torch":
        if check:
            for name, t in zip(names, tensors):
                if bool((~torch.isfinite(t) & m).any()):
                    raise ValueError(f"{name} contains NaN or inf at valid (mask=1) positions")
        return value_loss_reference(values, old_values, returns, m, clip, agg, num_tokens, num_seqs, norm_length)
    loss, clipfrac, bad = ValueLossFunction.apply(
        values.contiguous(), old_values.contiguous(), returns.contiguous(),
        m.contiguous().view(torch.uint8), float(clip), agg, num_tokens, num_seqs, norm_length, chosen,
    )
    if check and bool(bad > 0):
        _raise_non_finite(names, tensors, m)
    return loss, clipfrac
