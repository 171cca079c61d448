"""Generalised advantage estimation as one fused reverse scan (docs/design.md "Semantics we pin").

For each row, walking t from T-1 down to 0 over the **valid** positions only:

    δ_t = r_t + γ·V_next - V_t          A_t = δ_t + γλ·A_next          R_t = A_t + V_t

"next" is the next valid position: masked positions inside a response (tool output in multi-turn)
are skipped — they get A = R = 0 and carry V_next and A_next through unchanged (as veRL does).
After the last valid token V_next = 0 (terminal) unless ``bootstrap_values`` [B] are given
(truncated responses); A_next starts at 0. Returns are computed before any whitening.

Backends: Triton (CUDA; parallel over rows, each program walks t carrying [BLOCK_B] vectors), C++
(CPU; OpenMP over rows, 8 rows in lockstep on AVX2 CPUs), and the torch reference — the Python loop
over T that TRL / OpenRLHF / veRL write, kept as the baseline the benchmark measures against.
"""
from __future__ import annotations

from typing import NamedTuple

import torch

from rlhf_fast._backend import dispatch, ext, should_check_values
from rlhf_fast.ops._checks import (
    check_finite,
    check_floating,
    check_mask,
    check_same_shape,
    check_unit_interval,
)
from rlhf_fast.ops._triton import KernelSpec, tl, triton


class GAEOutput(NamedTuple):
    """advantages, returns: [B, T] fp32, 0 on masked positions."""

    advantages: torch.Tensor
    returns: torch.Tensor


# --------------------------------------------------------------------------- torch reference
def gae_reference(
    rewards: torch.Tensor,
    values: torch.Tensor,
    mask: torch.Tensor,
    gamma: float,
    lam: float,
    bootstrap_values: torch.Tensor | None = None,
) -> GAEOutput:
    """Pure-torch reference: the Python loop over T, vectorised over rows. Shapes as in ``gae``."""
    m = mask.bool()
    r, v = rewards.float(), values.float()
    B, T = r.shape
    zeros = torch.zeros(B, dtype=torch.float32, device=r.device)
    next_value = bootstrap_values.float().clone() if bootstrap_values is not None else zeros.clone()
    next_adv = zeros.clone()
    advantages = torch.zeros(B, T, dtype=torch.float32, device=r.device)
    for t in reversed(range(T)):
        valid = m[:, t]
        delta = r[:, t] + gamma * next_value - v[:, t]
        adv = delta + gamma * lam * next_adv
        advantages[:, t] = torch.where(valid, adv, zeros)
        # A masked position is invisible: what the next valid position left behind passes through.
        next_value = torch.where(valid, v[:, t], next_value)
        next_adv = torch.where(valid, adv, next_adv)
    returns = torch.where(m, advantages + v, torch.zeros((), dtype=torch.float32, device=r.device))
    return GAEOutput(advantages, returns)


# --------------------------------------------------------------------------- Triton
@triton.jit
def _gae_kernel(
    rew_ptr, val_ptr, mask_ptr, boot_ptr, adv_ptr, ret_ptr, B, T, gamma, lam,
    HAS_BOOT: tl.constexpr, BLOCK_B: tl.constexpr,
):
    """Rows vectorised: each program owns BLOCK_B rows of contiguous [B, T] inputs and walks t from
    T-1 down to 0 carrying next_value / next_adv as [BLOCK_B] fp32 vectors. Consecutive steps read
    neighbouring addresses of the same rows, so each cache line is fetched from HBM once."""
    rows = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    row_ok = rows < B
    base = rows.to(tl.int64) * T
    if HAS_BOOT:
        next_value = tl.load(boot_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)
    else:
        next_value = tl.zeros((BLOCK_B,), dtype=tl.float32)
    next_adv = tl.zeros((BLOCK_B,), dtype=tl.float32)
    gamma_lam = gamma * lam
    for i in range(0, T):
        t = T - 1 - i
        on = tl.load(mask_ptr + base + t, mask=row_ok, other=0) != 0
        r = tl.load(rew_ptr + base + t, mask=row_ok, other=0.0).to(tl.float32)
        v = tl.load(val_ptr + base + t, mask=row_ok, other=0.0).to(tl.float32)
        adv = (r + gamma * next_value - v) + gamma_lam * next_adv
        tl.store(adv_ptr + base + t, tl.where(on, adv, 0.0), mask=row_ok)
        tl.store(ret_ptr + base + t, tl.where(on, adv + v, 0.0), mask=row_ok)
        next_value = tl.where(on, v, next_value)
        next_adv = tl.where(on, adv, next_adv)


def _gae_config(B: int, T: int) -> dict:
    """One row per thread, one warp per program: B=512 gives 16 programs, and the serial T walk is
    the latency bound whatever the block, so more rows per program would only cut parallelism."""
    block_b = min(32, triton.next_power_of_2(max(B, 1)))
    return {"BLOCK_B": block_b, "num_warps": 1}


def aot_specs() -> list[KernelSpec]:
    specs = []
    for B, T in ((512, 8192), (8, 1024)):
        cfg = _gae_config(B, T)
        for dtype in ("fp32", "bf16"):
            for has_boot in (False, True):
                specs.append(KernelSpec(
                    _gae_kernel,
                    signature={"rew_ptr": f"*{dtype}", "val_ptr": f"*{dtype}", "mask_ptr": "*u8",
                               "boot_ptr": f"*{dtype}", "adv_ptr": "*fp32", "ret_ptr": "*fp32", "B": "i32",
                               "T": "i32", "gamma": "fp32", "lam": "fp32", "HAS_BOOT": "constexpr",
                               "BLOCK_B": "constexpr"},
                    constexprs={"HAS_BOOT": has_boot, "BLOCK_B": cfg["BLOCK_B"]},
                    num_warps=cfg["num_warps"], label=f"{dtype} B={B} T={T} bootstrap={has_boot}",
                ))
    return specs


# --------------------------------------------------------------------------- dispatcher
def _check_out(out, rewards: torch.Tensor) -> None:
    if not isinstance(out, (tuple, list)) or len(out) != 2:
        raise TypeError(f"out must be a pair (advantages, returns) of tensors, got {type(out).__name__}")
    for name, t in zip(("out[0] (advantages)", "out[1] (returns)"), out):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.shape != rewards.shape or t.dtype != torch.float32 or t.device != rewards.device:
            raise ValueError(
                f"{name} must be float32 of shape {tuple(rewards.shape)} on {rewards.device}, "
                f"got {t.dtype} {tuple(t.shape)} on {t.device}"
            )
        if not t.is_contiguous():
            raise ValueError(f"{name} must be contiguous")
    if out[0].data_ptr() == out[1].data_ptr() and out[0].numel() > 0:
        raise ValueError("out[0] and out[1] must be different buffers")


def _f32(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous() if t.dtype == torch.float32 else t.float().contiguous()


def gae(
    rewards: torch.Tensor,
    values: torch.Tensor,
    mask: torch.Tensor,
    gamma: float,
    lam: float,
    bootstrap_values: torch.Tensor | None = None,
    backend: str | None = None,
    out: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> GAEOutput:
    """Advantages and returns by GAE over the valid positions of each row.

    rewards, values: [B, T] float32/bf16/fp16 (per-token rewards, e.g. from token_rewards; value
    predictions). mask: [B, T] bool or 0/1 (response tokens; holes allowed). gamma, lam: in [0, 1].
    bootstrap_values: optional [B] float, V after the last valid token of truncated rows (else 0).
    Returns GAEOutput(advantages, returns), both [B, T] fp32, 0 where mask is 0. No gradient
    (inputs are detached rollout data). backend: None (automatic) or "triton" | "cpp" | "torch".
    out: optional (advantages, returns) buffers, contiguous fp32 [B, T] on the inputs' device, written
    in place and returned — a trainer reusing them every step skips two fresh allocations (on CPU
    their page faults cost more than the scan itself).
    """
    check_floating("rewards", rewards)
    check_floating("values", values)
    if rewards.dim() != 2:
        raise ValueError(f"rewards must be [B, T], got shape {tuple(rewards.shape)}")
    check_same_shape("rewards", rewards, values=values, mask=mask)
    if bootstrap_values is not None:
        check_floating("bootstrap_values", bootstrap_values)
        if bootstrap_values.shape != rewards.shape[:1]:
            raise ValueError(
                f"bootstrap_values must have shape [B] = {tuple(rewards.shape[:1])}, got {tuple(bootstrap_values.shape)}"
            )
        if bootstrap_values.device != rewards.device:
            raise ValueError(f"bootstrap_values must be on rewards' device {rewards.device}, got {bootstrap_values.device}")
        bootstrap_values = bootstrap_values.detach()
    check_unit_interval("gamma", gamma)
    check_unit_interval("lam", lam)
    if out is not None:
        _check_out(out, rewards)
    mask = check_mask("mask", mask)
    rewards, values = rewards.detach(), values.detach()
    chosen = dispatch(rewards, backend)
    if chosen != "cpp" and should_check_values(rewards):  # the C++ scan counts non-finite inputs itself
        zero = torch.zeros((), dtype=rewards.dtype, device=rewards.device)
        check_finite("rewards (valid positions)", torch.where(mask, rewards, zero))
        check_finite("values (valid positions)", torch.where(mask, values, zero.to(values.dtype)))
        if bootstrap_values is not None:
            check_finite("bootstrap_values", bootstrap_values)
    if chosen == "torch":
        ref = gae_reference(rewards, values, mask, float(gamma), float(lam), bootstrap_values)
        if out is None:
            return ref
        out[0].copy_(ref.advantages)
        out[1].copy_(ref.returns)
        return GAEOutput(out[0], out[1])

    B, T = rewards.shape
    if out is not None:
        advantages, returns = out
    else:
        advantages = torch.empty((B, T), dtype=torch.float32, device=rewards.device)
        returns = torch.empty((B, T), dtype=torch.float32, device=rewards.device)
    if advantages.numel() == 0:
        return GAEOutput(advantages, returns)
    m8 = mask.contiguous().view(torch.uint8)
    if chosen == "triton":
        cfg = _gae_config(B, T)
        rw, vl = rewards.contiguous(), values.contiguous()
        boot = bootstrap_values.contiguous() if bootstrap_values is not None else rw  # unused placeholder
        _gae_kernel[(triton.cdiv(B, cfg["BLOCK_B"]),)](
            rw, vl, m8, boot, advantages, returns, B, T, float(gamma), float(lam),
            HAS_BOOT=bootstrap_values is not None, BLOCK_B=cfg["BLOCK_B"], num_warps=cfg["num_warps"],
        )
    else:
        rw, vl = _f32(rewards), _f32(values)
        boot = _f32(bootstrap_values) if bootstrap_values is not None else None
        bad = ext().gae_f32(
            rw.data_ptr(), vl.data_ptr(), m8.data_ptr(), boot.data_ptr() if boot is not None else 0,
            advantages.data_ptr(), returns.data_ptr(), B, T, float(gamma), float(lam),
        )
        if bad:
            raise ValueError(f"rewards, values (valid positions) or bootstrap_values contain NaN or inf ({bad} values)")
    return GAEOutput(advantages, returns)
