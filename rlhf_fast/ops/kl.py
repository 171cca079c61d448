"""KL penalty estimators and per-token rewards (docs/design.md "Semantics we pin").

kl_penalty(logprobs, ref_logprobs, estimator, clamp): per-token estimate of KL(policy || ref) from
the log-ratio r = logp - ref_logp:

    k1 = r        k2 = r²/2        k3 = exp(-r) - 1 + r        abs = |r|

The log-ratio is clamped to ±20 before the exponential (k3), and every estimate to ±clamp. Output
is fp32 whatever the input dtype; differentiable in both inputs (gradients follow torch.clamp's
rule: zero outside a clamp, passed at its boundary).

veRL's names are accepted too: "kl" = k1, "mse" = k2, "low_var_kl" = k3 (veRL's low_var_kl is exactly
our k3: log-ratio clamped to ±20, estimate to ±10 at the default clamp). A "+" suffix ("k1+", "k3+",
"abs+", "low_var_kl+", ...) is veRL's straight-through estimator: the forward value of the named estimator
(with its clamps) and the gradient of the unclamped k2, d/d logp = r, d/d ref = -r (veRL's
``backward_score - backward_score.detach() + forward_score.detach()`` with backward_score = r²/2). "k2+"
would be k2 itself and is refused.

token_rewards(scores, kl, mask, kl_coef): -kl_coef·kl on every valid token, plus the sequence score
on the last valid token of each row (the EOS token itself when present), never on padding; rows
with no valid token get all zeros. Inputs are data (no gradient).

Both run as one fused element-wise pass on Triton (CUDA) and C++ (CPU), with a torch reference.
"""
from __future__ import annotations

import torch

from rlhf_fast._backend import dispatch, ext, should_check_values
from rlhf_fast.ops._checks import check_finite, check_floating, check_mask, check_positive, check_same_shape
from rlhf_fast.ops._triton import KernelSpec, tl, triton

KL_ESTIMATORS = ("k1", "k2", "k3", "abs")
KL_ALIASES = {"kl": "k1", "mse": "k2", "low_var_kl": "k3"}  # veRL's names
ST_GRAD = len(KL_ESTIMATORS)  # backward id of the straight-through estimators: the gradient of unclamped k2
LOG_RATIO_CLAMP = 20.0


def parse_estimator(estimator: str) -> tuple[int, bool]:
    """(id in KL_ESTIMATORS, straight-through?) for a name, an alias or a "+" name; ValueError otherwise."""
    name = estimator if isinstance(estimator, str) else ""
    straight = name.endswith("+")
    base = KL_ALIASES.get(name[:-1] if straight else name, name[:-1] if straight else name)
    if base not in KL_ESTIMATORS or (straight and base == "k2"):
        raise ValueError(
            f"estimator must be one of {list(KL_ESTIMATORS)}, got {estimator!r} (also accepted: veRL's "
            f"{sorted(KL_ALIASES)} and the straight-through names with a '+' suffix, e.g. 'k3+', except 'k2+')"
        )
    return KL_ESTIMATORS.index(base), straight


def estimator_id(estimator: str) -> int:
    """Index in KL_ESTIMATORS of the estimator whose value ``estimator`` computes (the forward id the kernels take)."""
    return parse_estimator(estimator)[0]


# --------------------------------------------------------------------------- torch reference
def kl_penalty_reference(
    logprobs: torch.Tensor, ref_logprobs: torch.Tensor, estimator: str = "k1", clamp: float = 10.0
) -> torch.Tensor:
    """Pure-torch reference. logprobs, ref_logprobs: same shape, any float dtype. Returns fp32."""
    est_id, straight = parse_estimator(estimator)
    r = logprobs.float() - ref_logprobs.float()
    if est_id == 0:
        est = r
    elif est_id == 1:
        est = 0.5 * r * r
    elif est_id == 2:
        rc = r.clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
        est = torch.expm1(-rc) + rc  # exp(-r) - 1 + r, keeping the digits of small ratios
    else:
        est = r.abs()
    est = est.clamp(-clamp, clamp)
    if straight:  # veRL: value of the estimator, gradient of r²/2
        k2 = 0.5 * r * r
        est = k2 - k2.detach() + est.detach()
    return est


def token_rewards_reference(
    scores: torch.Tensor, kl: torch.Tensor, mask: torch.Tensor, kl_coef: float
) -> torch.Tensor:
    """Pure-torch reference. scores [B], kl [B, T], mask [B, T] (bool or 0/1). Returns [B, T] fp32."""
    m = mask.bool()
    B, T = kl.shape
    out = torch.where(m, kl.float() * (-kl_coef), torch.zeros((), dtype=torch.float32, device=kl.device))
    positions = torch.arange(T, device=kl.device).expand(B, T)
    last = torch.where(m, positions, -1).amax(dim=1) if T > 0 else torch.full((B,), -1, device=kl.device)
    rows = torch.nonzero(last >= 0).flatten()
    out[rows, last[rows]] += scores.float()[rows]
    return out


# --------------------------------------------------------------------------- Triton
@triton.jit
def _kl_fwd_kernel(logp_ptr, ref_ptr, out_ptr, N, clamp, EST: tl.constexpr, BLOCK: tl.constexpr):
    """out[i] = clamp(estimate(logp[i] - ref[i]), ±clamp) in fp32; EST = index in KL_ESTIMATORS."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < N
    r = tl.load(logp_ptr + offs, mask=ok, other=0.0).to(tl.float32) - tl.load(
        ref_ptr + offs, mask=ok, other=0.0
    ).to(tl.float32)
    if EST == 0:
        est = r
    elif EST == 1:
        est = 0.5 * r * r
    elif EST == 2:
        rc = tl.where(r > 20.0, 20.0, tl.where(r < -20.0, -20.0, r))
        # exp(-r) - 1 + r cancels for small |r|: there the Taylor series (next term r^7/5040) is exact
        # to fp32; tl has no expm1 that also runs in the interpreter.
        series = rc * rc * (0.5 - rc * (1.0 / 6.0 - rc * (1.0 / 24.0 - rc * (1.0 / 120.0 - rc * (1.0 / 720.0)))))
        est = tl.where(tl.abs(rc) < 0.25, series, tl.exp(-rc) - 1.0 + rc)
    else:
        est = tl.abs(r)
    # where-based clamp: NaN stays NaN (fmin/fmax would replace it with a bound).
    est = tl.where(est > clamp, clamp, tl.where(est < -clamp, -clamp, est))
    tl.store(out_ptr + offs, est, mask=ok)


@triton.jit
def _kl_bwd_kernel(
    logp_ptr, ref_ptr, grad_out_ptr, grad_logp_ptr, grad_ref_ptr, N, clamp,
    EST: tl.constexpr, NEED_LOGP: tl.constexpr, NEED_REF: tl.constexpr, BLOCK: tl.constexpr,
):
    """grad_logp = g·d est/d r (0 where a clamp is active), grad_ref = -grad_logp; stored in the inputs' dtypes.
    EST = 4 (ST_GRAD): the straight-through gradient g·r, no clamp."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < N
    r = tl.load(logp_ptr + offs, mask=ok, other=0.0).to(tl.float32) - tl.load(
        ref_ptr + offs, mask=ok, other=0.0
    ).to(tl.float32)
    g = tl.load(grad_out_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    if EST == 0:
        est = r
        d = tl.full(r.shape, 1.0, tl.float32)
    elif EST == 1:
        est = 0.5 * r * r
        d = r
    elif EST == 2:
        rc = tl.where(r > 20.0, 20.0, tl.where(r < -20.0, -20.0, r))
        small = tl.abs(rc) < 0.25
        series = rc * rc * (0.5 - rc * (1.0 / 6.0 - rc * (1.0 / 24.0 - rc * (1.0 / 120.0 - rc * (1.0 / 720.0)))))
        e = tl.exp(-rc)
        est = tl.where(small, series, e - 1.0 + rc)
        # 1 - exp(-r), series form for small |r| for the same reason as above.
        d_series = rc * (1.0 - rc * (0.5 - rc * (1.0 / 6.0 - rc * (1.0 / 24.0 - rc * (1.0 / 120.0)))))
        d = tl.where(small, d_series, 1.0 - e)
        d = tl.where((r > 20.0) | (r < -20.0), 0.0, d)
    elif EST == 3:
        est = tl.abs(r)
        d = tl.where(r > 0, 1.0, tl.where(r < 0, -1.0, 0.0))
    else:
        est = tl.zeros_like(r)  # straight-through: the gradient of the unclamped k2
        d = r
    grad = tl.where((est >= -clamp) & (est <= clamp), g * d, 0.0)
    if NEED_LOGP:
        tl.store(grad_logp_ptr + offs, grad.to(grad_logp_ptr.dtype.element_ty), mask=ok)
    if NEED_REF:
        tl.store(grad_ref_ptr + offs, (-grad).to(grad_ref_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _token_rewards_kernel(
    scores_ptr, kl_ptr, mask_ptr, out_ptr, B, T, kl_coef, BLOCK_B: tl.constexpr, BLOCK_T: tl.constexpr
):
    """One program owns BLOCK_B rows: pass 1 finds each row's last valid position (mask bytes only),
    pass 2 writes -kl_coef·kl on valid tokens plus the score at that position."""
    rows = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    row_ok = rows < B
    base = rows.to(tl.int64)[:, None] * T
    last = tl.full((BLOCK_B,), -1, tl.int32)
    for t0 in range(0, T, BLOCK_T):
        cols = t0 + tl.arange(0, BLOCK_T)
        ok = row_ok[:, None] & (cols[None, :] < T)
        m = tl.load(mask_ptr + base + cols[None, :], mask=ok, other=0)
        last = tl.maximum(last, tl.max(tl.where(m != 0, cols[None, :], -1), axis=1))
    score = tl.load(scores_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)
    for t0 in range(0, T, BLOCK_T):
        cols = t0 + tl.arange(0, BLOCK_T)
        ok = row_ok[:, None] & (cols[None, :] < T)
        on = tl.load(mask_ptr + base + cols[None, :], mask=ok, other=0) != 0
        kl = tl.load(kl_ptr + base + cols[None, :], mask=ok, other=0.0).to(tl.float32)
        val = tl.where(on, kl * (-kl_coef), 0.0)
        val = tl.where(cols[None, :] == last[:, None], val + score[:, None], val)
        tl.store(out_ptr + base + cols[None, :], val, mask=ok)


def _elementwise_config(n: int) -> dict:
    """1-D element-wise kernels: 4 elements per thread at 8 warps once there is enough work."""
    block = min(1024, triton.next_power_of_2(max(n, 16)))
    return {"BLOCK": block, "num_warps": 8 if block >= 1024 else 4}


def _token_rewards_config(B: int, T: int) -> dict:
    """~4k-element tiles: BLOCK_T up to 1024 columns, the rest rows."""
    block_t = min(1024, triton.next_power_of_2(max(T, 1)))
    block_b = max(1, min(4096 // block_t, triton.next_power_of_2(max(B, 1))))
    return {"BLOCK_B": block_b, "BLOCK_T": block_t, "num_warps": 8 if block_b * block_t >= 4096 else 4}


def aot_specs() -> list[KernelSpec]:
    specs = []
    n = 512 * 8192  # realistic: a rollout batch of 512 sequences x 8k tokens
    cfg = _elementwise_config(n)
    for dtype in ("fp32", "bf16"):
        for est, name in enumerate((*KL_ESTIMATORS, "st")):
            if est < ST_GRAD:
                specs.append(KernelSpec(
                    _kl_fwd_kernel,
                    signature={"logp_ptr": f"*{dtype}", "ref_ptr": f"*{dtype}", "out_ptr": "*fp32", "N": "i64",
                               "clamp": "fp32", "EST": "constexpr", "BLOCK": "constexpr"},
                    constexprs={"EST": est, "BLOCK": cfg["BLOCK"]},
                    num_warps=cfg["num_warps"], label=f"{dtype} {name} N={n}",
                ))
            specs.append(KernelSpec(
                _kl_bwd_kernel,
                signature={"logp_ptr": f"*{dtype}", "ref_ptr": f"*{dtype}", "grad_out_ptr": "*fp32",
                           "grad_logp_ptr": f"*{dtype}", "grad_ref_ptr": f"*{dtype}", "N": "i64", "clamp": "fp32",
                           "EST": "constexpr", "NEED_LOGP": "constexpr", "NEED_REF": "constexpr",
                           "BLOCK": "constexpr"},
                constexprs={"EST": est, "NEED_LOGP": True, "NEED_REF": True, "BLOCK": cfg["BLOCK"]},
                num_warps=cfg["num_warps"], label=f"{dtype} {name} N={n}",
            ))
    for B, T in ((512, 8192), (64, 256)):
        tcfg = _token_rewards_config(B, T)
        for dtype in ("fp32", "bf16"):
            specs.append(KernelSpec(
                _token_rewards_kernel,
                signature={"scores_ptr": f"*{dtype}", "kl_ptr": f"*{dtype}", "mask_ptr": "*u8", "out_ptr": "*fp32",
                           "B": "i32", "T": "i32", "kl_coef": "fp32", "BLOCK_B": "constexpr", "BLOCK_T": "constexpr"},
                constexprs={"BLOCK_B": tcfg["BLOCK_B"], "BLOCK_T": tcfg["BLOCK_T"]},
                num_warps=tcfg["num_warps"], label=f"{dtype} B={B} T={T}",
            ))
    return specs


# --------------------------------------------------------------------------- autograd + dispatcher
def _f32(t: torch.Tensor) -> torch.Tensor:
    """Contiguous fp32 view/copy (the C++ kernels read fp32)."""
    return t.contiguous() if t.dtype == torch.float32 else t.float().contiguous()


class KLPenaltyFunction(torch.autograd.Function):
    """Forward: one fused element-wise pass. Backward: one fused pass recomputing r from the inputs
    (nothing but the inputs is saved). est_bwd: est, or ST_GRAD for the straight-through estimators."""

    @staticmethod
    def forward(ctx, logprobs, ref_logprobs, est, clamp, backend, est_bwd=None):
        lp, rf = logprobs.contiguous(), ref_logprobs.contiguous()
        out = torch.empty(lp.shape, dtype=torch.float32, device=lp.device)
        n = lp.numel()
        if n > 0:
            if backend == "triton":
                cfg = _elementwise_config(n)
                _kl_fwd_kernel[(triton.cdiv(n, cfg["BLOCK"]),)](
                    lp, rf, out, n, float(clamp), EST=est, BLOCK=cfg["BLOCK"], num_warps=cfg["num_warps"]
                )
            else:
                lp32, rf32 = _f32(lp), _f32(rf)
                bad = ext().kl_penalty_f32(lp32.data_ptr(), rf32.data_ptr(), out.data_ptr(), n, est, float(clamp))
                if bad:
                    raise ValueError(f"logprobs - ref_logprobs contains NaN or inf at {bad} positions")
        ctx.save_for_backward(lp, rf)
        ctx.est = est if est_bwd is None else est_bwd
        ctx.clamp, ctx.backend = float(clamp), backend
        return out

    @staticmethod
    def backward(ctx, grad_out):
        lp, rf = ctx.saved_tensors
        need_lp, need_rf = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        g = grad_out.contiguous().float()
        n = lp.numel()
        if ctx.backend == "triton":
            grad_lp = torch.empty_like(lp) if need_lp else None
            grad_rf = torch.empty_like(rf) if need_rf else None
            if n > 0:
                cfg = _elementwise_config(n)
                _kl_bwd_kernel[(triton.cdiv(n, cfg["BLOCK"]),)](
                    lp, rf, g, grad_lp if need_lp else g, grad_rf if need_rf else g, n, ctx.clamp,
                    EST=ctx.est, NEED_LOGP=need_lp, NEED_REF=need_rf, BLOCK=cfg["BLOCK"], num_warps=cfg["num_warps"],
                )
        else:
            grad_lp32 = torch.empty(lp.shape, dtype=torch.float32) if need_lp else None
            grad_rf32 = torch.empty(rf.shape, dtype=torch.float32) if need_rf else None
            if n > 0:
                lp32, rf32 = _f32(lp), _f32(rf)
                ext().kl_penalty_backward_f32(
                    lp32.data_ptr(), rf32.data_ptr(), g.data_ptr(),
                    grad_lp32.data_ptr() if need_lp else 0, grad_rf32.data_ptr() if need_rf else 0,
                    n, ctx.est, ctx.clamp,
                )
            grad_lp = grad_lp32.to(lp.dtype) if need_lp else None
            grad_rf = grad_rf32.to(rf.dtype) if need_rf else None
        return grad_lp, grad_rf, None, None, None, None


def kl_penalty(
    logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor,
    estimator: str = "k1",
    clamp: float = 10.0,
    backend: str | None = None,
) -> torch.Tensor:
    """Per-token KL estimate between the policy and the reference model.

    logprobs, ref_logprobs: same shape (typically [B, T]), float32/bf16/fp16. estimator: one of
    KL_ESTIMATORS ("k1", "k2", "k3", "abs"), veRL's aliases ("kl", "mse", "low_var_kl") or a
    straight-through "+" name (module docstring). clamp: > 0, bound on |estimate|. Returns fp32 of the
    input shape, differentiable in both inputs. Padding positions are not special: mask the result.
    backend: None (automatic) or "triton" | "cpp" | "torch".
    """
    check_floating("logprobs", logprobs)
    check_floating("ref_logprobs", ref_logprobs)
    check_same_shape("logprobs", logprobs, ref_logprobs=ref_logprobs)
    est, straight = parse_estimator(estimator)
    check_positive("clamp", clamp)
    chosen = dispatch(logprobs, backend)
    if chosen != "cpp":  # the C++ kernel counts non-finite log-ratios itself, for free
        check_finite("logprobs", logprobs)
        check_finite("ref_logprobs", ref_logprobs)
    if chosen == "torch":
        return kl_penalty_reference(logprobs, ref_logprobs, estimator, clamp)
    return KLPenaltyFunction.apply(logprobs, ref_logprobs, est, float(clamp), chosen, ST_GRAD if straight else None)


def token_rewards(
    scores: torch.Tensor,
    kl: torch.Tensor,
    mask: torch.Tensor,
    kl_coef: float,
    backend: str | None = None,
) -> torch.Tensor:
    """Per-token rewards for PPO: -kl_coef·kl on valid tokens, plus the score on each row's last valid token.

    scores: [B] float (one sequence-level reward per row). kl: [B, T] float (e.g. from kl_penalty).
    mask: [B, T] bool or 0/1, the response tokens (holes allowed; left- or right-padded). kl_coef: >= 0.
    Returns [B, T] fp32: 0 on padding; a row with no valid token is all zeros. Not differentiable
    (inputs are rollout data). backend: None (automatic) or "triton" | "cpp" | "torch".
    """
    check_floating("kl", kl)
    check_floating("scores", scores)
    if kl.dim() != 2:
        raise ValueError(f"kl must be [B, T], got shape {tuple(kl.shape)}")
    if scores.shape != kl.shape[:1]:
        raise ValueError(f"scores must have shape [B] = {tuple(kl.shape[:1])}, got {tuple(scores.shape)}")
    if scores.device != kl.device:
        raise ValueError(f"scores must be on kl's device {kl.device}, got {scores.device}")
    check_same_shape("kl", kl, mask=mask)
    check_positive("kl_coef", kl_coef, allow_zero=True)
    mask = check_mask("mask", mask)
    chosen = dispatch(kl, backend)
    if chosen != "cpp" and should_check_values(kl):
        check_finite("kl (valid positions)", torch.where(mask, kl, 0))
        check_finite("scores", scores)
    kl, scores = kl.detach(), scores.detach()
    if chosen == "torch":
        return token_rewards_reference(scores, kl, mask, kl_coef)
    B, T = kl.shape
    out = torch.empty((B, T), dtype=torch.float32, device=kl.device)
    if out.numel() == 0:
        return out
    m8 = mask.contiguous().view(torch.uint8)
    if chosen == "triton":
        cfg = _token_rewards_config(B, T)
        _token_rewards_kernel[(triton.cdiv(B, cfg["BLOCK_B"]),)](
            scores.contiguous(), kl.contiguous(), m8, out, B, T, float(kl_coef),
            BLOCK_B=cfg["BLOCK_B"], BLOCK_T=cfg["BLOCK_T"], num_warps=cfg["num_warps"],
        )
    else:
        sc32, kl32 = _f32(scores), _f32(kl)
        bad = ext().token_rewards_f32(sc32.data_ptr(), kl32.data_ptr(), m8.data_ptr(), out.data_ptr(), B, T,
                                      float(kl_coef))
        if bad:
            raise ValueError(f"kl (valid positions) or scores contains NaN or inf ({bad} values)")
    return out
