"""The GRPO-era policy-loss family: clip (asymmetric, dual, TRL's two-sided delta), GSPO, CISPO, SAPO,
with optional rollout correction against sampling-time log-probs, on padded or packed tokens.

A sibling of ppo_loss.py rather than more of it: these losses need a per-sequence reduction before
the token pass (the GSPO ratio, sequence-level importance weights), an optional fifth input and a
packed layout, which would have turned ppo_loss's single-pass kernels into a different thing. The
aggregation (AGG_MODES, global counts) is ppo_loss's own, imported; ``ppo_policy_loss`` is untouched.

Layouts (every input the same shape):
    padded  [B, T] with a 0/1 ``mask`` [B, T]; row b is sequence b.
    packed  [N] (the valid tokens of S sequences concatenated) with ``cu_seqlens`` [S + 1] (int32 or
            int64, 0 = cu[0] <= cu[1] <= ... <= cu[S] = N); sequence s is tokens cu[s]..cu[s+1]-1.
            ``mask`` [N] is optional (e.g. tool-output tokens inside a turn); None = all valid.
Packed and padded give the same loss, stats and gradients (per-sequence quantities run over segments).

Per valid token t of sequence b, with lr_t = logp_t - old_t:

  importance ratio, ``ratio_level``:
    "token"           r = exp(clamp(lr_t, -20, 20))
    "sequence"        r_b = exp(clamp(mean_b(lr), -20, 20)), mean over the sequence's valid tokens, with the
                      gradient THROUGH the mean (d mean / d logp_t = 1/n_b): TRL's importance_sampling_level=
                      "sequence" (GSPO). TRL does not clamp; the ±20 clamp is our pinned ratio clamp.
    "sequence_token"  value r_b, gradient as if r were exp(sg(mean_b(lr)) + logp_t - sg(logp_t)) clamped to
                      <= e^10: veRL's "gspo" (the paper's GSPO-token, stop-gradient construction; veRL clamps
                      the log-ratio at max 10 only, so do we here). With one advantage per sequence this
                      equals "sequence" (same loss, same gradient); they differ when advantages vary within
                      a sequence.

  per-token loss, ``loss``:
    "clip"   u = min(r, delta) (delta None: u = r; TRL's two-sided clip), c = clamp(r, 1 - clip_low,
             1 + clip_high);  l = max(-A u, -A c)  (= -min(u A, c A), TRL);  dual clip d > 1 where A < 0:
             l = min(l, -d A).  With delta and dual_clip None this is ppo_policy_loss's formula.
    "cispo"  l = -sg(clamp(r, 1 - clip_low, 1 + clip_high)) · A · logp  (veRL's definition; TRL's
             ``min(r, epsilon_high)`` is clip_low=1, clip_high=epsilon_high - 1: the lower bound 0 never
             binds, and clip_high may then be negative). Gradient -w·A, none through r.
    "sapo"   tau = tau_pos if A > 0 else tau_neg;  l = -sigmoid(tau (r - 1)) · 4/tau · A  (TRL, veRL).

  rollout correction (optional, ``sampling_logprobs`` = the log-probs recorded by the sampler; no gradient):
    d_t = old_t - sampling_t (NaN sampling log-prob = not recorded: d_t = 0, TRL's rule);
    x = exp(clamp(d_t, ±20)) per token ("token_*") or exp(clamp(sum_b d, ±20)) per sequence
    ("sequence_*": the product of the token ratios, TRL and veRL alike);
    "*_truncate"  w = clamp(x, rollout_is_min, rollout_is_max)          (TIS; veRL: min None)
    "*_mask"      w = x if rollout_is_min <= x <= rollout_is_max else 0  (TRL's mask modes; the dropped
                  tokens stay in the counts, as in TRL; veRL's rejection also drops them from its local
                  token count: pass num_tokens counted after rejection for that)
    None bounds are open. The token loss becomes w · l (the KL or entropy terms, added by the caller,
    are not weighted, as in TRL and veRL). Without rollout correction w = 1.

  aggregation: ppo_loss.AGG_MODES over sequences (rows or segments) with global num_tokens / num_seqs;
  packed "seq-mean-token-sum-norm" needs norm_length (there is no T).

TRL 1.16 GRPOConfig.loss_type -> this module (eps = epsilon, eps_h = epsilon_high or epsilon; ratio
level "sequence" when importance_sampling_level="sequence"; GA = gradient accumulation steps):
    grpo     loss="clip", clip_low=eps, clip_high=eps_h, delta=delta; agg "seq-mean-token-mean",
             num_seqs = sequences per optimizer step (all ranks, empty ones included: TRL counts them)
    bnpo     loss="clip" as grpo; agg "token-mean". TRL divides by each micro-batch's own token count
             (then by GA): num_tokens = micro-batch tokens x GA reproduces it; the global count is our
             split-independent default
    dr_grpo  loss="clip" as grpo; agg "seq-mean-token-sum-norm", norm_length = max_completion_length,
             num_seqs = sequences per optimizer step
    dapo     loss="clip" as grpo; agg "token-mean", num_tokens = num_items_in_batch x GA /
             steps_per_generation (the optimizer step's valid tokens on all ranks when, as by default,
             steps_per_generation == GA)
    cispo    loss="cispo", clip_low=1.0, clip_high=eps_h - 1; agg and num_tokens as dapo
    sapo     loss="sapo", tau_pos=sapo_temperature_pos, tau_neg=sapo_temperature_neg; agg as grpo
    luspo    loss="clip", ratio_level="sequence"; agg "seq-mean-token-sum", num_seqs as grpo
    vespo    not here (its gamma weights are another op)
  vllm_importance_sampling_correction -> sampling_logprobs, rollout_is=vllm_importance_sampling_mode,
  rollout_is_min / rollout_is_max = vllm_importance_sampling_clip_min / _max (TRL's default max 3.0).
  TRL's clip metrics: clip_ratio/low_mean = stats.clip_low_frac, high_mean = clip_high_frac, region_mean =
  their sum (local token means; per-sequence values for low_min / high_max from stats.per_row), and
  cispo_clip_ratio = clip_high_frac. With ratio_level "sequence" TRL averages those over sequences, not
  tokens: per_row[1:] / per_row[0] gives each sequence's value.

Stats (PolicyLossFamilyStats, detached fp32, LOCAL masked token means, no host sync): clipfrac (the
clipped branch strictly larger, or for cispo the weight clamped), approx_kl = 0.5 mean(lr_t^2) on the raw
token log-ratio, ratio_mean (of r, the sequence ratio at sequence levels), dual_clipfrac, clip_low_frac
(u < 1 - clip_low and A < 0), clip_high_frac (u > 1 + clip_high and A > 0; u = r for cispo), both 0 for
sapo, is_weight_mean (mean w; 1 without rollout correction), is_dropped_frac (tokens a mask mode zeroed),
per_row [3, S] (valid, low-clipped and high-clipped tokens per sequence).

Fused paths (Triton kernel / C++, one code path for every combination, chosen by constexprs): the
forward is one program per block of sequences: a first loop over each sequence for the per-sequence sums
(only at sequence levels or sequence-level IS), then the token loop writing per-sequence partial sums
[14, S]; the aggregation then combines S-sized vectors. The backward is one pass recomputing each token's
coefficient from the inputs and the saved per-sequence values ([4, S]), so nothing token-sized is saved
beyond the inputs. Gradient conventions as ppo_loss (closed clamp intervals; at an exact tie of the two
clip branches the unclipped one takes the gradient, where torch would split it).
"""
from __future__ import annotations

import inspect
import math
from typing import NamedTuple

import torch

from rlhf_fast._backend import dispatch, ext, should_check_values
from rlhf_fast.ops._checks import check_floating, check_mask, check_positive, check_same_shape
from rlhf_fast.ops._triton import KernelSpec, tl, triton
from rlhf_fast.ops.ppo_loss import (
    LOG_RATIO_CLAMP,
    _check_agg,
    _check_inputs,
    _f32,
    _masked_token_mean,
    _raise_non_finite,
    _row_weights,
    _rowblock_config,
    aggregate_loss,
)

LOSSES = ("clip", "cispo", "sapo")
RATIO_LEVELS = ("token", "sequence", "sequence_token")
ROLLOUT_IS_MODES = ("token_truncate", "token_mask", "sequence_truncate", "sequence_mask")
GSPO_TOKEN_LOG_RATIO_MAX = 10.0  # veRL's clamp of the GSPO-token log-ratio (upper bound only)

# Rows of the per-sequence partial sums the fused forward writes ([_ROWS, S] fp32). Rows 2..10 are
# numerators of the stats (divided by the valid-token count); 11..13 are per-sequence values.
(_LOSS, _COUNT, _CLIP, _HALF_LR2, _RATIO, _DUAL, _BAD, _LOW, _HIGH, _ISW, _ISDROP, _SEQ_Q, _SEQ_LR,
 _SEQ_IS) = range(14)
_ROWS = 14
# Rows of the per-sequence values the backward reads ([4, S] fp32).
_B_SCALE, _B_SEQ_LR, _B_SEQ_IS, _B_SEQ_COEF = range(4)


class PolicyLossFamilyStats(NamedTuple):
    """Detached fp32 tensors: 0-dim local masked token means, and per_row [3, S] counts (module docstring)."""

    clipfrac: torch.Tensor
    approx_kl: torch.Tensor
    ratio_mean: torch.Tensor
    dual_clipfrac: torch.Tensor
    clip_low_frac: torch.Tensor
    clip_high_frac: torch.Tensor
    is_weight_mean: torch.Tensor
    is_dropped_frac: torch.Tensor
    per_row: torch.Tensor


class _Config(NamedTuple):
    """The resolved options: integer codes (kernel constexprs) and fp32-bound floats."""

    loss: int  # index in LOSSES
    seq: int  # index in RATIO_LEVELS
    is_level: int  # 0 none, 1 token, 2 sequence
    is_mask: int  # 0 truncate, 1 mask
    ratio_lo: float
    ratio_hi: float
    dual_clip: float  # +inf: off
    delta: float  # +inf: off
    lr_lo: float
    lr_hi: float
    tau_pos: float
    tau_neg: float
    is_lo: float  # -inf: open
    is_hi: float  # +inf: open

    def floats(self) -> tuple[float, ...]:
        return self[4:]


def _config(loss, ratio_level, clip_low, clip_high, dual_clip, delta, tau_pos, tau_neg, rollout_is,
            rollout_is_min, rollout_is_max) -> _Config:
    inf = math.inf
    if ratio_level == "sequence_token":
        lr_lo, lr_hi = -inf, GSPO_TOKEN_LOG_RATIO_MAX
    else:
        lr_lo, lr_hi = -LOG_RATIO_CLAMP, LOG_RATIO_CLAMP
    is_level = 0 if rollout_is is None else (1 if rollout_is.startswith("token") else 2)
    return _Config(
        loss=LOSSES.index(loss), seq=RATIO_LEVELS.index(ratio_level), is_level=is_level,
        is_mask=int(rollout_is is not None and rollout_is.endswith("mask")),
        ratio_lo=1.0 - float(clip_low), ratio_hi=1.0 + float(clip_high),
        dual_clip=inf if dual_clip is None else float(dual_clip), delta=inf if delta is None else float(delta),
        lr_lo=lr_lo, lr_hi=lr_hi, tau_pos=float(tau_pos), tau_neg=float(tau_neg),
        is_lo=-inf if rollout_is_min is None else float(rollout_is_min),
        is_hi=inf if rollout_is_max is None else float(rollout_is_max),
    )


# --------------------------------------------------------------------------- torch reference
def _segments(cu_seqlens: torch.Tensor, n: int):
    """(index [S, L] into the packed axis, valid [S, L]) for the segments of cu_seqlens (host sync: L)."""
    cu = cu_seqlens.to(torch.int64)
    lengths = cu[1:] - cu[:-1]
    width = int(lengths.max()) if lengths.numel() else 0
    pos = torch.arange(width, device=cu.device)
    valid = pos[None, :] < lengths[:, None]
    index = (cu[:-1, None] + pos[None, :]).clamp(max=max(n - 1, 0))
    return index, valid


def policy_loss_reference(
    logprobs, old_logprobs, advantages, mask=None, *, loss="clip", ratio_level="token", clip_low=0.2,
    clip_high=0.2, dual_clip=None, delta=None, tau_pos=1.0, tau_neg=1.05, sampling_logprobs=None,
    rollout_is=None, rollout_is_min=None, rollout_is_max=2.0, cu_seqlens=None, agg="token-mean",
    num_tokens=None, num_seqs=None, norm_length=None,
) -> tuple[torch.Tensor, PolicyLossFamilyStats]:
    """Eager torch, written as the frameworks write it (autograd gives the gradients, detach() the
    stop-gradients). Packed inputs are gathered into a padded [S, L] batch first (the gradient flows
    back through the gather), so packed and padded share one formula. Arguments as policy_loss."""
    if cu_seqlens is not None:
        index, valid = _segments(cu_seqlens, logprobs.shape[0])
        m = valid if mask is None else valid & mask.bool()[index]
        if norm_length is None and agg == "seq-mean-token-sum-norm":
            raise ValueError("norm_length is required for agg='seq-mean-token-sum-norm' with packed inputs")
        padded = [None if t is None else t[index] for t in (logprobs, old_logprobs, advantages, sampling_logprobs)]
        return policy_loss_reference(
            *padded[:3], m, loss=loss, ratio_level=ratio_level, clip_low=clip_low, clip_high=clip_high,
            dual_clip=dual_clip, delta=delta, tau_pos=tau_pos, tau_neg=tau_neg, sampling_logprobs=padded[3],
            rollout_is=rollout_is, rollout_is_min=rollout_is_min, rollout_is_max=rollout_is_max, agg=agg,
            num_tokens=num_tokens, num_seqs=num_seqs, norm_length=norm_length,
        )
    cfg = _config(loss, ratio_level, clip_low, clip_high, dual_clip, delta, tau_pos, tau_neg, rollout_is,
                  rollout_is_min, rollout_is_max)
    m = mask.bool()
    # Out of place and before any arithmetic: NaN padding never reaches the loss or the gradient.
    lp = logprobs.float().masked_fill(~m, 0.0)
    old = old_logprobs.float().masked_fill(~m, 0.0)
    adv = advantages.float().masked_fill(~m, 0.0)
    lr_tok = lp - old
    n = m.sum(-1, keepdim=True).clamp_min(1).float()
    if ratio_level == "token":
        lr = lr_tok
    elif ratio_level == "sequence":  # TRL: the mean log-ratio, differentiated as a mean
        lr = lr_tok.sum(-1, keepdim=True) / n
    else:  # veRL GSPO-token: value of the sequence mean, gradient of each token's own log-prob
        lr = lp - lp.detach() + (lr_tok.sum(-1, keepdim=True) / n).detach()
    ratio = torch.exp(torch.clamp(lr, cfg.lr_lo, cfg.lr_hi))
    lo, hi = cfg.ratio_lo, cfg.ratio_hi
    false = torch.zeros_like(m)
    dual_on = false
    if loss == "clip":
        u = ratio if delta is None else torch.clamp(ratio, max=delta)
        unclipped, clipped = -adv * u, -adv * torch.clamp(ratio, lo, hi)
        loss_mat = torch.maximum(unclipped, clipped)
        clip_on = clipped > unclipped
        if dual_clip is not None:
            cap = -dual_clip * adv
            dual_on = (adv < 0) & (cap < loss_mat)
            loss_mat = torch.where(adv < 0, torch.minimum(loss_mat, cap), loss_mat)
        low, high = (u < lo) & (adv < 0), (u > hi) & (adv > 0)
    elif loss == "cispo":
        loss_mat = -torch.clamp(ratio, lo, hi).detach() * adv * lp
        clip_on = (ratio < lo) | (ratio > hi)
        low, high = (ratio < lo) & (adv < 0), (ratio > hi) & (adv > 0)
    else:  # sapo
        tau = torch.where(adv > 0, cfg.tau_pos, cfg.tau_neg)
        loss_mat = -torch.sigmoid(tau * (ratio - 1.0)) * (4.0 / tau) * adv
        clip_on = low = high = false
    weight, dropped = torch.ones_like(lr_tok), false
    if rollout_is is not None:
        with torch.no_grad():
            d = old_logprobs.float() - sampling_logprobs.float()
            d = torch.where(m & ~torch.isnan(d), d, 0.0)  # NaN sampling log-prob: not recorded, weight 1
            if cfg.is_level == 2:
                d = d.sum(-1, keepdim=True)
            x = torch.exp(torch.clamp(d, -LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)).expand_as(lr_tok)
            if cfg.is_mask:
                keep = (x >= cfg.is_lo) & (x <= cfg.is_hi)
                weight, dropped = torch.where(keep, x, 0.0), ~keep
            else:
                weight = torch.clamp(x, cfg.is_lo, cfg.is_hi)
        loss_mat = loss_mat * weight
    out = aggregate_loss(loss_mat, m, agg, num_tokens, num_seqs, norm_length)
    with torch.no_grad():
        full = lr_tok.shape

        def mean(x):
            return _masked_token_mean(x.expand(full).float(), m)

        stats = PolicyLossFamilyStats(
            clipfrac=mean(clip_on), approx_kl=0.5 * mean(lr_tok.detach() ** 2), ratio_mean=mean(ratio.detach()),
            dual_clipfrac=mean(dual_on), clip_low_frac=mean(low), clip_high_frac=mean(high),
            is_weight_mean=mean(weight), is_dropped_frac=mean(dropped),
            per_row=torch.stack([(x.expand(full) & m).sum(-1) for x in (m, low, high)]).float(),
        )
    return out, stats


# --------------------------------------------------------------------------- Triton
@triton.jit
def _policy_family_kernel(
    lp_ptr, old_ptr, adv_ptr, samp_ptr, mask_ptr, cu_ptr, part_ptr, rowv_ptr, grad_ptr, R, T,
    ratio_lo, ratio_hi, dual_clip, delta, lr_lo, lr_hi, tau_pos, tau_neg, is_lo, is_hi,
    LOSS: tl.constexpr, SEQ: tl.constexpr, IS: tl.constexpr, IS_MASK: tl.constexpr, PACKED: tl.constexpr,
    HAS_MASK: tl.constexpr, BACKWARD: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_T: tl.constexpr,
):
    """BLOCK_R sequences per program (rows of T, or segments of cu_seqlens when PACKED).
    Forward: part[k, r] for the 14 rows of the module's layout. Backward: grad from rowv[4, R]."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < R
    if PACKED:
        start = tl.load(cu_ptr + rows, mask=row_ok, other=0)
        length = tl.load(cu_ptr + rows + 1, mask=row_ok, other=0) - start
        n_cols = tl.max(length, axis=0)
    else:
        start = rows.to(tl.int64) * T
        length = tl.where(row_ok, T, 0)
        n_cols = T
    seq_lr = tl.zeros((BLOCK_R,), dtype=tl.float32)
    seq_is = tl.zeros((BLOCK_R,), dtype=tl.float32)
    if BACKWARD:
        scale = tl.load(rowv_ptr + 0 * R + rows, mask=row_ok, other=0.0)
        seq_lr = tl.load(rowv_ptr + 1 * R + rows, mask=row_ok, other=0.0)
        seq_is = tl.load(rowv_ptr + 2 * R + rows, mask=row_ok, other=0.0)
        seq_coef = tl.load(rowv_ptr + 3 * R + rows, mask=row_ok, other=0.0)
    elif SEQ != 0 or IS == 2:
        # Segment reduction: the per-sequence sums the token pass needs first.
        s_n = tl.zeros((BLOCK_R,), dtype=tl.float32)
        for t0 in range(0, n_cols, BLOCK_T):
            cols = t0 + tl.arange(0, BLOCK_T)
            ok = row_ok[:, None] & (cols[None, :] < length[:, None])
            offs = start[:, None] + cols[None, :]
            on = ok
            if HAS_MASK:
                on = on & (tl.load(mask_ptr + offs, mask=ok, other=0) != 0)
            old = tl.load(old_ptr + offs, mask=ok, other=0.0).to(tl.float32)
            if SEQ != 0:
                lr = tl.load(lp_ptr + offs, mask=ok, other=0.0).to(tl.float32) - old
                seq_lr += tl.sum(tl.where(on, lr, 0.0), axis=1)
            if IS == 2:
                d = old - tl.load(samp_ptr + offs, mask=ok, other=0.0).to(tl.float32)
                seq_is += tl.sum(tl.where(on & (d == d), d, 0.0), axis=1)
            s_n += tl.sum(on.to(tl.float32), axis=1)
        seq_lr = seq_lr / tl.maximum(s_n, 1.0)
    s_loss = tl.zeros((BLOCK_R,), dtype=tl.float32)
    s_cnt = tl.zeros((BLOCK_R,), dtype=tl.float32)
    s_clip = tl.zeros((BLOCK_R,), dtype=tl.float32)
    s_lr2 = tl.zeros((BLOCK_R,), dtype=tl.float32)
    s_ratio = tl.zeros((BLOCK_R,), dtype=tl.float32)
    s_dual = tl.zeros((BLOCK_R,), dtype=tl.float32)
    s_bad = tl.zeros((BLOCK_R,), dtype=tl.float32)
    s_low = tl.zeros((BLOCK_R,), dtype=tl.float32)
    s_high = tl.zeros((BLOCK_R,), dtype=tl.float32)
    s_w = tl.zeros((BLOCK_R,), dtype=tl.float32)
    s_drop = tl.zeros((BLOCK_R,), dtype=tl.float32)
    s_q = tl.zeros((BLOCK_R,), dtype=tl.float32)
    for t0 in range(0, n_cols, BLOCK_T):
        cols = t0 + tl.arange(0, BLOCK_T)
        ok = row_ok[:, None] & (cols[None, :] < length[:, None])
        offs = start[:, None] + cols[None, :]
        on = ok
        if HAS_MASK:
            on = on & (tl.load(mask_ptr + offs, mask=ok, other=0) != 0)
        lp = tl.load(lp_ptr + offs, mask=ok, other=0.0).to(tl.float32)
        old = tl.load(old_ptr + offs, mask=ok, other=0.0).to(tl.float32)
        a = tl.load(adv_ptr + offs, mask=ok, other=0.0).to(tl.float32)
        lr_tok = lp - old
        if SEQ == 0:
            lr = lr_tok
        else:
            lr = seq_lr[:, None] + tl.zeros_like(lr_tok)
        ratio = tl.exp(tl.minimum(tl.maximum(lr, lr_lo), lr_hi))
        live = (lr >= lr_lo) & (lr <= lr_hi)
        # rollout-correction weight w (data: no gradient)
        w = tl.full(lr_tok.shape, 1.0, tl.float32)
        drop = lr_tok != lr_tok  # placeholder, only read under IS_MASK
        if IS != 0:
            if IS == 1:
                d = old - tl.load(samp_ptr + offs, mask=ok, other=0.0).to(tl.float32)
                d = tl.where(d == d, d, 0.0)
            else:
                d = seq_is[:, None] + tl.zeros_like(lr_tok)
            x = tl.exp(tl.minimum(tl.maximum(d, -20.0), 20.0))
            if IS_MASK:
                drop = (x < is_lo) | (x > is_hi)
                w = tl.where(drop, 0.0, x)
            else:
                w = tl.minimum(tl.maximum(x, is_lo), is_hi)
        # per-token loss l, d l / d ratio (dratio) and d l / d logp not through the ratio (direct)
        direct = tl.zeros_like(lr_tok)
        if LOSS == 0:
            u = tl.minimum(ratio, delta)
            unclipped = -a * u
            clipped = -a * tl.minimum(tl.maximum(ratio, ratio_lo), ratio_hi)
            clip_on = clipped > unclipped
            loss = tl.maximum(unclipped, clipped)
            cap = -dual_clip * a
            dual_on = (a < 0) & (cap < loss)
            loss = tl.where(dual_on, cap, loss)
            in_clip = (ratio >= ratio_lo) & (ratio <= ratio_hi)
            dratio = tl.where(clip_on, tl.where(in_clip, -a, 0.0), tl.where(ratio <= delta, -a, 0.0))
            dratio = tl.where(dual_on, 0.0, dratio)
            low = (u < ratio_lo) & (a < 0)
            high = (u > ratio_hi) & (a > 0)
        elif LOSS == 1:
            c = tl.minimum(tl.maximum(ratio, ratio_lo), ratio_hi)
            loss = -c * a * lp
            direct = -c * a
            dratio = tl.zeros_like(lr_tok)
            clip_on = (ratio < ratio_lo) | (ratio > ratio_hi)
            low = (ratio < ratio_lo) & (a < 0)
            high = (ratio > ratio_hi) & (a > 0)
        else:
            tau = tl.where(a > 0, tau_pos, tau_neg)
            sig = 1.0 / (1.0 + tl.exp(-tau * (ratio - 1.0)))
            loss = -sig * (4.0 / tau) * a
            dratio = -a * 4.0 * sig * (1.0 - sig)
        q = tl.where(live, w * dratio * ratio, 0.0)  # d (w l) / d lr
        if BACKWARD:
            if SEQ == 1:
                coef = w * direct + seq_coef[:, None]
            else:
                coef = w * direct + q
            grad = tl.where(on, coef * scale[:, None], 0.0)
            tl.store(grad_ptr + offs, grad.to(grad_ptr.dtype.element_ty), mask=ok)
        else:
            # x - x is 0 for finite x and NaN for NaN/inf: one test covers logp, old and A.
            bad = (lr_tok - lr_tok + a - a) != 0
            s_loss += tl.sum(tl.where(on, w * loss, 0.0), axis=1)
            s_cnt += tl.sum(on.to(tl.float32), axis=1)
            s_lr2 += tl.sum(tl.where(on, 0.5 * lr_tok * lr_tok, 0.0), axis=1)
            s_ratio += tl.sum(tl.where(on, ratio, 0.0), axis=1)
            s_bad += tl.sum((on & bad).to(tl.float32), axis=1)
            s_w += tl.sum(tl.where(on, w, 0.0), axis=1)
            s_q += tl.sum(tl.where(on, q, 0.0), axis=1)
            if LOSS != 2:
                s_clip += tl.sum((on & clip_on).to(tl.float32), axis=1)
                s_low += tl.sum((on & low).to(tl.float32), axis=1)
                s_high += tl.sum((on & high).to(tl.float32), axis=1)
            if LOSS == 0:
                s_dual += tl.sum((on & dual_on).to(tl.float32), axis=1)
            if IS_MASK:
                s_drop += tl.sum((on & drop).to(tl.float32), axis=1)
    if not BACKWARD:
        tl.store(part_ptr + 0 * R + rows, s_loss, mask=row_ok)
        tl.store(part_ptr + 1 * R + rows, s_cnt, mask=row_ok)
        tl.store(part_ptr + 2 * R + rows, s_clip, mask=row_ok)
        tl.store(part_ptr + 3 * R + rows, s_lr2, mask=row_ok)
        tl.store(part_ptr + 4 * R + rows, s_ratio, mask=row_ok)
        tl.store(part_ptr + 5 * R + rows, s_dual, mask=row_ok)
        tl.store(part_ptr + 6 * R + rows, s_bad, mask=row_ok)
        tl.store(part_ptr + 7 * R + rows, s_low, mask=row_ok)
        tl.store(part_ptr + 8 * R + rows, s_high, mask=row_ok)
        tl.store(part_ptr + 9 * R + rows, s_w, mask=row_ok)
        tl.store(part_ptr + 10 * R + rows, s_drop, mask=row_ok)
        tl.store(part_ptr + 11 * R + rows, s_q, mask=row_ok)
        tl.store(part_ptr + 12 * R + rows, seq_lr, mask=row_ok)
        tl.store(part_ptr + 13 * R + rows, seq_is, mask=row_ok)


def _launch_config(R: int, T: int, packed: bool, n: int) -> dict:
    """ppo_loss's row-block config; packed segments use their mean length as the row length."""
    return _rowblock_config(R, max(1, n // max(R, 1)) if packed else T)


def aot_specs() -> list[KernelSpec]:
    """Realistic shapes: 512 sequences x 8k tokens, padded and packed; the heaviest variants (sequence
    ratio + sequence-level IS for every loss, forward and backward) and the plain token clip."""
    R, T = 512, 8192
    cases = [(loss, 1, 2, 1, 1, 1, "bf16") for loss in range(3)]  # packed, sequence ratio, sequence IS mask
    cases += [(0, 2, 1, 0, 0, 1, "fp32"), (0, 0, 0, 0, 0, 1, "fp32")]  # padded: gspo_token + token TIS; clip
    specs = []
    for loss, seq, is_level, is_mask, packed, has_mask, dtype in cases:
        cfg = _launch_config(R, T, bool(packed), R * T)
        ptr = f"*{dtype}"
        sig = {"lp_ptr": ptr, "old_ptr": ptr, "adv_ptr": ptr, "samp_ptr": ptr, "mask_ptr": "*u8", "cu_ptr": "*i64",
               "part_ptr": "*fp32", "rowv_ptr": "*fp32", "grad_ptr": ptr, "R": "i32", "T": "i32"}
        sig.update({k: "fp32" for k in _Config._fields[4:]})
        for backward in (0, 1):
            cx = {"LOSS": loss, "SEQ": seq, "IS": is_level, "IS_MASK": is_mask, "PACKED": packed,
                  "HAS_MASK": has_mask, "BACKWARD": backward, "BLOCK_R": cfg["BLOCK_R"], "BLOCK_T": cfg["BLOCK_T"]}
            full = {**sig, **{k: "constexpr" for k in cx}}
            label = (f"{dtype} {LOSSES[loss]} {RATIO_LEVELS[seq]} is={is_level}/{is_mask} "
                     f"{'packed' if packed else 'padded'} {'bwd' if backward else 'fwd'} S={R} T={T}")
            specs.append(KernelSpec(_policy_family_kernel, signature=full, constexprs=cx,
                                    num_warps=cfg["num_warps"], label=label))
    return specs


# --------------------------------------------------------------------------- launchers (Triton / C++)
def _run(backend, backward, lp, old, adv, samp, m8, cu, out, rowv, cfg: _Config, R, T):
    """One fused pass: forward writes ``out`` = part [_ROWS, R]; backward writes ``out`` = grad (returned)."""
    packed = cu is not None
    if backend == "triton":
        lc = _launch_config(R, T, packed, lp.numel())
        dummy = lp
        _policy_family_kernel[(triton.cdiv(R, lc["BLOCK_R"]),)](
            lp, old, adv, dummy if samp is None else samp, dummy if m8 is None else m8, dummy if cu is None else cu,
            dummy if backward else out, rowv if backward else dummy, out if backward else dummy, R, T,
            *cfg.floats(), LOSS=cfg.loss, SEQ=cfg.seq, IS=cfg.is_level, IS_MASK=cfg.is_mask, PACKED=packed,
            HAS_MASK=m8 is not None, BACKWARD=backward, BLOCK_R=lc["BLOCK_R"], BLOCK_T=lc["BLOCK_T"],
            num_warps=lc["num_warps"],
        )
        return out
    lp, old, adv = _f32(lp), _f32(old), _f32(adv)
    samp = None if samp is None else _f32(samp)

    def ptr(t):
        return 0 if t is None else t.data_ptr()

    ints = (cfg.loss, cfg.seq, cfg.is_level, cfg.is_mask)
    ins = (lp.data_ptr(), old.data_ptr(), adv.data_ptr(), ptr(samp), ptr(m8), ptr(cu))
    if not backward:
        ext().policy_family_fwd_f32(*ins, out.data_ptr(), R, T, *ints, *cfg.floats())
        return out
    g32 = out if out.dtype == torch.float32 else torch.empty(out.shape, dtype=torch.float32)
    ext().policy_family_bwd_f32(*ins, rowv.data_ptr(), g32.data_ptr(), R, T, *ints, *cfg.floats())
    return g32 if g32 is out else g32.to(out.dtype)


# --------------------------------------------------------------------------- autograd
class PolicyLossFamilyFunction(torch.autograd.Function):
    """One forward pass (segment sums + token pass), one backward pass; gradient for logprobs only."""

    @staticmethod
    def forward(ctx, logprobs, old_logprobs, advantages, sampling, mask8, cu, cfg, agg, num_tokens, num_seqs,
                norm_length, backend):
        R = logprobs.shape[0] if cu is None else cu.numel() - 1
        T = logprobs.shape[1] if cu is None else logprobs.shape[0]
        part = torch.zeros(_ROWS, R, dtype=torch.float32, device=logprobs.device)
        if logprobs.numel() > 0 and R > 0:
            _run(backend, False, logprobs, old_logprobs, advantages, sampling, mask8, cu, part, None, cfg, R, T)
        totals = part[:_SEQ_Q].sum(1)
        count = part[_COUNT]
        weight = _row_weights(count, agg, num_tokens, num_seqs, norm_length, T, totals[_COUNT])
        loss = (part[_LOSS] * weight).sum()
        means = totals / totals[_COUNT].clamp_min(1.0)
        stats = (*means[[_CLIP, _HALF_LR2, _RATIO, _DUAL, _LOW, _HIGH, _ISW, _ISDROP]].unbind(0),
                 part[[_COUNT, _LOW, _HIGH]], totals[_BAD])
        rowv = torch.stack([weight, part[_SEQ_LR], part[_SEQ_IS], part[_SEQ_Q] / count.clamp_min(1.0)])
        ctx.save_for_backward(logprobs, old_logprobs, advantages, sampling, mask8, cu, rowv)
        ctx.cfg, ctx.backend, ctx.R, ctx.T = cfg, backend, R, T
        ctx.mark_non_differentiable(*stats)
        return (loss, *stats)

    @staticmethod
    def backward(ctx, grad_loss, *_unused_stat_grads):
        logprobs, old_logprobs, advantages, sampling, mask8, cu, rowv = ctx.saved_tensors
        grad = torch.empty_like(logprobs, memory_format=torch.contiguous_format)
        if logprobs.numel() > 0 and ctx.R > 0:
            rowv = rowv.clone()
            rowv[_B_SCALE] *= grad_loss.float()
            grad = _run(ctx.backend, True, logprobs, old_logprobs, advantages, sampling, mask8, cu, grad, rowv,
                        ctx.cfg, ctx.R, ctx.T)
        return (grad,) + (None,) * 11


# --------------------------------------------------------------------------- checks + public API
def _check_cu_seqlens(cu_seqlens, n: int, device) -> torch.Tensor:
    """Validate cu_seqlens [S+1] against N packed tokens; returns it as contiguous int64."""
    if not isinstance(cu_seqlens, torch.Tensor):
        raise TypeError(f"cu_seqlens must be a torch.Tensor, got {type(cu_seqlens).__name__}")
    if cu_seqlens.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"cu_seqlens must be int32 or int64, got {cu_seqlens.dtype}")
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 1:
        raise ValueError(f"cu_seqlens must be 1-D [S + 1] with S >= 0, got shape {tuple(cu_seqlens.shape)}")
    if cu_seqlens.device != device:
        raise ValueError(f"cu_seqlens must be on logprobs's device {device}, got {cu_seqlens.device}")
    if should_check_values(cu_seqlens):
        first, last = int(cu_seqlens[0]), int(cu_seqlens[-1])
        if first != 0:
            raise ValueError(f"cu_seqlens must start at 0, got {first}")
        if last != n:
            raise ValueError(f"cu_seqlens must end at N = {n} (the packed length of logprobs), got {last}")
        if cu_seqlens.numel() > 1 and bool((cu_seqlens[1:] < cu_seqlens[:-1]).any()):
            raise ValueError(f"cu_seqlens must be non-decreasing, got {cu_seqlens.tolist()[:16]}")
    return cu_seqlens.to(torch.int64).contiguous()


def _check_family_options(loss, ratio_level, clip_low, clip_high, dual_clip, delta, tau_pos, tau_neg,
                          sampling_logprobs, rollout_is, rollout_is_min, rollout_is_max):
    if loss not in LOSSES:
        raise ValueError(f"loss must be one of {LOSSES}, got {loss!r}")
    if ratio_level not in RATIO_LEVELS:
        raise ValueError(f"ratio_level must be one of {RATIO_LEVELS}, got {ratio_level!r}")
    check_positive("clip_low", clip_low)
    if loss == "cispo":  # TRL's epsilon_high < 1 makes clip_high negative: only the bound 1 + clip_high > 0 matters
        if not 1.0 + clip_high > max(0.0, 1.0 - clip_low):
            raise ValueError(f"clip_high must give an upper bound 1 + clip_high above max(0, 1 - clip_low), "
                             f"got clip_high={clip_high!r}, clip_low={clip_low!r}")
    else:
        check_positive("clip_high", clip_high)
    if dual_clip is not None and not dual_clip > 1:
        raise ValueError(f"dual_clip must be None or > 1, got {dual_clip!r}")
    if delta is not None:
        check_positive("delta", delta)
    if loss != "clip" and (dual_clip is not None or delta is not None):
        raise ValueError(f"dual_clip and delta apply to loss='clip' only, got loss={loss!r} with "
                         f"dual_clip={dual_clip!r}, delta={delta!r}")
    check_positive("tau_pos", tau_pos)
    check_positive("tau_neg", tau_neg)
    if rollout_is is None:
        if sampling_logprobs is not None:
            raise ValueError("sampling_logprobs is given but rollout_is is None: name a mode of "
                             f"{ROLLOUT_IS_MODES} to use it")
        return
    if rollout_is not in ROLLOUT_IS_MODES:
        raise ValueError(f"rollout_is must be None or one of {ROLLOUT_IS_MODES}, got {rollout_is!r}")
    if sampling_logprobs is None:
        raise ValueError(f"rollout_is={rollout_is!r} needs sampling_logprobs (the sampler's log-probs)")
    if rollout_is_min is not None:
        check_positive("rollout_is_min", rollout_is_min, allow_zero=True)
    if rollout_is_max is not None:
        check_positive("rollout_is_max", rollout_is_max)
    if rollout_is_min is not None and rollout_is_max is not None and not rollout_is_min < rollout_is_max:
        raise ValueError(f"rollout_is_min must be < rollout_is_max, got {rollout_is_min!r} >= {rollout_is_max!r}")
    if rollout_is.endswith("truncate") and rollout_is_min is None and rollout_is_max is None:
        raise ValueError(f"rollout_is={rollout_is!r} needs rollout_is_min or rollout_is_max")


def _check_layout(names, tensors, mask, sampling_logprobs, cu_seqlens):
    """Shapes, dtypes and devices of both layouts; returns (bool mask or None, int64 cu_seqlens or None)."""
    if sampling_logprobs is not None:
        check_floating("sampling_logprobs", sampling_logprobs)
        check_same_shape(names[0], tensors[0], sampling_logprobs=sampling_logprobs)
    if cu_seqlens is None:
        return _check_inputs(names, tensors, mask), None
    for name, t in zip(names, tensors):
        check_floating(name, t)
    first = tensors[0]
    if first.dim() != 1:
        raise ValueError(f"{names[0]} must be 1-D [N] packed tokens when cu_seqlens is given, "
                         f"got shape {tuple(first.shape)}")
    check_same_shape(names[0], first, **dict(zip(names[1:], tensors[1:])), mask=mask)
    cu = _check_cu_seqlens(cu_seqlens, first.shape[0], first.device)
    return (None if mask is None else check_mask("mask", mask)), cu


def policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor | None = None,
    *,
    loss: str = "clip",
    ratio_level: str = "token",
    clip_low: float = 0.2,
    clip_high: float = 0.2,
    dual_clip: float | None = None,
    delta: float | None = None,
    tau_pos: float = 1.0,
    tau_neg: float = 1.05,
    sampling_logprobs: torch.Tensor | None = None,
    rollout_is: str | None = None,
    rollout_is_min: float | None = None,
    rollout_is_max: float | None = 2.0,
    cu_seqlens: torch.Tensor | None = None,
    agg: str = "token-mean",
    num_tokens=None,
    num_seqs=None,
    norm_length: float | None = None,
    backend: str | None = None,
) -> tuple[torch.Tensor, PolicyLossFamilyStats]:
    """The policy-loss family (formulas, TRL mapping and stats: the module docstring).

    logprobs (differentiable), old_logprobs, advantages, sampling_logprobs: float32/bf16/fp16, all
    [B, T] with mask [B, T] (bool or 0/1), or all [N] packed with cu_seqlens [S + 1] and mask [N] or
    None. loss: LOSSES; ratio_level: RATIO_LEVELS; clip_low / clip_high > 0 (cispo: see the docstring);
    dual_clip None or > 1 and delta None or > 0 (clip only); tau_pos, tau_neg > 0 (sapo);
    rollout_is: None or ROLLOUT_IS_MODES, with sampling_logprobs and bounds rollout_is_min >= 0 /
    rollout_is_max > 0 (None = open). agg / num_tokens / num_seqs / norm_length as ppo_policy_loss
    (packed "seq-mean-token-sum-norm" needs norm_length). Returns (fp32 0-dim loss,
    PolicyLossFamilyStats); the gradient flows to logprobs only, in its dtype.
    backend: None (automatic) or "triton" | "cpp" | "torch".
    """
    names = ("logprobs", "old_logprobs", "advantages")
    tensors = (logprobs, old_logprobs, advantages)
    m, cu = _check_layout(names, tensors, mask, sampling_logprobs, cu_seqlens)
    _check_family_options(loss, ratio_level, clip_low, clip_high, dual_clip, delta, tau_pos, tau_neg,
                          sampling_logprobs, rollout_is, rollout_is_min, rollout_is_max)
    _check_agg(agg, num_tokens, num_seqs, norm_length)
    if cu is not None and agg == "seq-mean-token-sum-norm" and norm_length is None:
        raise ValueError("norm_length is required for agg='seq-mean-token-sum-norm' with packed inputs "
                         "(there is no padded T to default to)")
    options = dict(loss=loss, ratio_level=ratio_level, clip_low=clip_low, clip_high=clip_high, dual_clip=dual_clip,
                   delta=delta, tau_pos=tau_pos, tau_neg=tau_neg, rollout_is=rollout_is,
                   rollout_is_min=rollout_is_min, rollout_is_max=rollout_is_max)
    chosen = dispatch(logprobs, backend)
    check = should_check_values(logprobs)

    def valid():  # only on the checking paths: no token-sized tensor otherwise
        return m if m is not None else torch.ones(logprobs.shape, dtype=torch.bool, device=logprobs.device)

    if chosen == "torch":
        if check:
            for name, t in zip(names, tensors):
                if bool((~torch.isfinite(t) & valid()).any()):
                    raise ValueError(f"{name} contains NaN or inf at valid (mask=1) positions")
        return policy_loss_reference(logprobs, old_logprobs, advantages, m, sampling_logprobs=sampling_logprobs,
                                     cu_seqlens=cu_seqlens, agg=agg, num_tokens=num_tokens, num_seqs=num_seqs,
                                     norm_length=norm_length, **options)
    cfg = _config(**options)
    m8 = None if m is None else m.contiguous().view(torch.uint8)
    samp = None if sampling_logprobs is None else sampling_logprobs.detach().contiguous()
    out = PolicyLossFamilyFunction.apply(
        logprobs.contiguous(), old_logprobs.contiguous(), advantages.contiguous(), samp, m8, cu, cfg, agg,
        num_tokens, num_seqs, norm_length, chosen,
    )
    loss_value, *stat_values, per_row, bad = out
    if check and bool(bad > 0):
        _raise_non_finite(names, tensors, valid())
    return loss_value, PolicyLossFamilyStats(*stat_values, per_row)


# --------------------------------------------------------------------------- registered losses
def _registered(name: str, loss: str, ratio_level: str, summary: str):
    """A policy loss for rlhf_fast.algos: policy_loss with ``loss`` fixed and ``ratio_level`` defaulted,
    called as ppo_policy_loss is (the first four positionally, the rest by keyword)."""

    def fn(logprobs, old_logprobs, advantages, mask=None, **options):
        options.setdefault("ratio_level", ratio_level)
        return policy_loss(logprobs, old_logprobs, advantages, mask, loss=loss, **options)

    params = [p.replace(default=ratio_level) if p.name == "ratio_level" else p
              for p in inspect.signature(policy_loss).parameters.values() if p.name != "loss"]
    fn.__signature__ = inspect.Signature(params, return_annotation=inspect.signature(policy_loss).return_annotation)
    fn.__name__ = fn.__qualname__ = f"{name}_policy_loss"
    fn.__doc__ = f"{summary}\n\npolicy_loss(loss={loss!r}, ratio_level={ratio_level!r} by default); see its docstring."
    return fn


clip_policy_loss = _registered(
    "clip", "clip", "token", "Clipped surrogate with asymmetric clip, optional dual clip and TRL's two-sided delta.")
gspo_policy_loss = _registered(
    "gspo", "clip", "sequence", "GSPO: the clipped surrogate on the per-sequence geometric-mean ratio (TRL).")
gspo_token_policy_loss = _registered(
    "gspo_token", "clip", "sequence_token", "GSPO-token: the sequence ratio with per-token gradients (veRL 'gspo').")
cispo_policy_loss = _registered(
    "cispo", "cispo", "token", "CISPO: a clipped, stop-gradient importance weight times the log-prob.")
sapo_policy_loss = _registered(
    "sapo", "sapo", "token", "SAPO: a temperature-controlled sigmoid gate instead of a hard clip.")
