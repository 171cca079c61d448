"""The policy-loss family (ops/policy_losses.py): hand-worked values and gradients per loss, TRL's and
veRL's formulas transcribed on identical inputs (the loss_type mapping of the module docstring), every
backend against the reference, packed == padded, edge cases, memory, bad input, registry entries."""
import math

import pytest
import torch

from rlhf_fast import _backend, algos
from rlhf_fast.memory.tracker import AllocationTracker
from rlhf_fast.ops.policy_losses import (
    PolicyLossFamilyFunction,
    policy_loss,
    policy_loss_reference,
)
from rlhf_fast.ops.ppo_loss import AGG_MODES, ppo_policy_loss
from tests.utils import assert_close, assert_low_precision_rule

needs_ext = pytest.mark.skipif(not _backend.HAS_EXT, reason="extension not built (RLHF_FAST_NO_EXT run)")
ALL_CPU = [pytest.param("cpp", marks=needs_ext), "torch"]
LN = math.log


def _close(got, want, tol=1e-6):
    got, want = (float(v.detach()) if isinstance(v, torch.Tensor) else float(v) for v in (got, want))
    assert abs(got - want) <= tol * max(1.0, abs(want)), (got, want)


def _run(backend, lp, old, adv, mask, upstream=1.0, **kw):
    x = lp.clone().requires_grad_(True)
    loss, stats = policy_loss(x, old, adv, mask, backend=backend, **kw)
    loss.backward(torch.tensor(upstream))
    return loss, stats, x.grad


# --------------------------------------------------------------------------- hand-worked values
def _clip_case():
    # old = 0, clip_low 0.2, clip_high 0.28 (DAPO's clip-higher): bounds [0.8, 1.28]
    #   t0: r 1.5,  A 1:  unclipped -1.5, clipped -1.28 -> -1.28 (clipped: grad 0; high-clipped)
    #   t1: r 1.25, A 1:  inside [0.8, 1.28] -> -1.25, grad -A r = -1.25 (symmetric 0.2 would clip it at 1.2)
    #   t2: r 0.5,  A -1: unclipped 0.5, clipped 0.8 -> 0.8 (clipped: grad 0; low-clipped)
    #   t3: r 2,    A -1: unclipped 2, clipped 1.28 -> 2, grad -A r = 2
    #   t4: r 0.75, A 1:  unclipped -0.75, clipped -0.8 -> -0.75, grad -0.75
    #   t5: masked (NaN must not leak)
    lp = torch.tensor([[LN(1.5), LN(1.25), LN(0.5), LN(2.0), LN(0.75), float("nan")]])
    adv = torch.tensor([[1.0, 1.0, -1.0, -1.0, 1.0, 7.0]])
    mask = torch.tensor([[1, 1, 1, 1, 1, 0]])
    return lp, torch.zeros(1, 6), adv, mask


@pytest.mark.parametrize("backend", ALL_CPU)
def test_asymmetric_clip_hand_worked(backend):
    lp, old, adv, mask = _clip_case()
    loss, st, grad = _run(backend, lp, old, adv, mask, upstream=5.0, clip_low=0.2, clip_high=0.28)
    _close(loss, (-1.28 - 1.25 + 0.8 + 2.0 - 0.75) / 5, 1e-6)
    torch.testing.assert_close(grad, torch.tensor([[0.0, -1.25, 0.0, 2.0, -0.75, 0.0]]), atol=1e-6, rtol=1e-6)
    _close(st.clipfrac, 2 / 5)  # t0, t2
    _close(st.clip_low_frac, 1 / 5)  # t2: TRL's clip_ratio/low_mean
    _close(st.clip_high_frac, 1 / 5)  # t0: clip_ratio/high_mean
    _close(st.ratio_mean, (1.5 + 1.25 + 0.5 + 2 + 0.75) / 5, 1e-6)
    _close(st.is_weight_mean, 1.0)
    assert st.per_row.tolist() == [[5.0], [1.0], [1.0]]
    # the same inputs through ppo_policy_loss: clip_low / clip_high are already epsilon_low / epsilon_high
    ref, ref_st = ppo_policy_loss(lp, old, adv, mask, clip_low=0.2, clip_high=0.28, backend=backend)
    _close(ref, loss)
    _close(ref_st.clipfrac, st.clipfrac)


@pytest.mark.parametrize("backend", ALL_CPU)
def test_two_sided_delta_clip_hand_worked(backend):
    # TRL's delta = 1.5 caps the unclipped ratio: t3 (r 2, A -1) becomes min(2, 1.5) = 1.5 against the clipped
    # 1.28 -> 1.5 with gradient 0 (the cap is active); every other token is unchanged.
    lp, old, adv, mask = _clip_case()
    loss, st, grad = _run(backend, lp, old, adv, mask, clip_low=0.2, clip_high=0.28, delta=1.5)
    _close(loss, (-1.28 - 1.25 + 0.8 + 1.5 - 0.75) / 5, 1e-6)
    torch.testing.assert_close(grad, torch.tensor([[0.0, -1.25, 0.0, 0.0, -0.75, 0.0]]) / 5, atol=1e-6, rtol=1e-6)
    # a dual clip at the same bound gives the same loss (for delta >= 1 + clip_high they coincide)
    dual, dual_st, dual_grad = _run(backend, lp, old, adv, mask, clip_low=0.2, clip_high=0.28, dual_clip=1.5)
    _close(dual, loss)
    torch.testing.assert_close(dual_grad, grad)
    _close(dual_st.dual_clipfrac, 1 / 5)
    # delta below 1 + clip_high, A < 0 and r inside the clip range: the clipped branch wins and carries the
    # gradient (TRL: -min(min(r, delta) A, clamp(r) A) = -A r here): r 1.25, A -1, delta 1.1 -> loss 1.25, grad 1.
    loss2, _, grad2 = _run(backend, torch.tensor([[LN(1.25)]]), torch.zeros(1, 1), torch.tensor([[-1.0]]),
                           torch.ones(1, 1), clip_low=0.2, clip_high=0.28, delta=1.1)
    _close(loss2, 1.25, 1e-6)
    _close(grad2[0, 0], 1.25, 1e-6)


def _gspo_case():
    # row 0: log-ratios [0.2, (masked), 0.0] -> mean 0.1, r = e^0.1 inside [0.8, 1.2]; A = [1, (9), 3]
    # row 1: log-ratios [0.6, 0.2, (masked)] -> mean 0.4, r = e^0.4 = 1.4918 > 1.2 with A > 0: clipped
    # row 2: no valid token (not a sequence for seq-mean)
    lp = torch.tensor([[0.2, 5.0, 0.0], [0.6, 0.2, float("nan")], [1.0, 2.0, 3.0]]) - 1.0
    old = torch.full((3, 3), -1.0)
    adv = torch.tensor([[1.0, 9.0, 3.0], [1.0, 2.0, 0.0], [1.0, 1.0, 1.0]])
    mask = torch.tensor([[1, 0, 1], [1, 1, 0], [0, 0, 0]], dtype=torch.bool)
    return lp, old, adv, mask


@pytest.mark.parametrize("backend", ALL_CPU)
def test_gspo_sequence_ratio_hand_worked(backend):
    lp, old, adv, mask = _gspo_case()
    e1, e4 = math.exp(0.1), math.exp(0.4)
    kw = dict(agg="seq-mean-token-mean", clip_low=0.2, clip_high=0.2)
    # loss per token: row 0: -A r = [-e1, -3 e1]; row 1 clipped: -1.2 A = [-1.2, -2.4]
    # seq-mean-token-mean over the 2 non-empty rows: ((-4 e1) / 2 + (-3.6) / 2) / 2
    want = ((-4 * e1) / 2 + (-3.6) / 2) / 2
    loss, st, grad = _run(backend, lp, old, adv, mask, ratio_level="sequence", **kw)
    _close(loss, want, 1e-6)
    # TRL (gradient through the mean): row weight 1/(2 rows x 2 tokens); d/d logp_j = w sum_t(-A_t r) / n
    # = 0.25 x (-4 e1) / 2 on both valid tokens of row 0; row 1 is clipped: 0
    g_seq = 0.25 * (-4 * e1) / 2
    torch.testing.assert_close(grad, torch.tensor([[g_seq, 0.0, g_seq], [0.0, 0.0, 0.0], [0.0, 0.0, 0.0]]),
                               atol=1e-6, rtol=1e-6)
    _close(st.ratio_mean, (2 * e1 + 2 * e4) / 4, 1e-6)
    _close(st.clip_high_frac, 2 / 4)
    _close(st.approx_kl, 0.5 * (0.2**2 + 0.6**2 + 0.2**2) / 4, 1e-6)
    # veRL's GSPO-token: same value, each token gets its own advantage's gradient: 0.25 x (-A_j e1)
    loss_t, _, grad_t = _run(backend, lp, old, adv, mask, ratio_level="sequence_token", **kw)
    _close(loss_t, want, 1e-6)
    torch.testing.assert_close(grad_t, torch.tensor([[-0.25 * e1, 0.0, -0.75 * e1], [0.0] * 3, [0.0] * 3]),
                               atol=1e-6, rtol=1e-6)
    _close(grad_t.sum(), grad.sum(), 1e-6)  # same total, distributed differently
    # with one advantage per sequence the two coincide exactly (the GRPO case)
    adv1 = torch.tensor([[2.0], [1.0], [1.0]]).expand(3, 3)
    _, _, g_a = _run(backend, lp, old, adv1, mask, ratio_level="sequence", **kw)
    _, _, g_b = _run(backend, lp, old, adv1, mask, ratio_level="sequence_token", **kw)
    torch.testing.assert_close(g_a, g_b, atol=1e-7, rtol=1e-6)


@pytest.mark.parametrize("backend", ALL_CPU)
def test_gspo_token_clamps_log_ratio_at_10_like_verl(backend):
    # mean log-ratio 12 > 10: veRL clamps it (value e^10, gradient 0); the sequence level clamps at 20 only.
    lp, old, adv, mask = torch.tensor([[12.0]]), torch.zeros(1, 1), torch.tensor([[-1.0]]), torch.ones(1, 1)
    loss, _, grad = _run(backend, lp, old, adv, mask, ratio_level="sequence_token")
    _close(loss, math.exp(10.0), 1e-6)
    assert grad.item() == 0.0
    loss, _, grad = _run(backend, lp, old, adv, mask, ratio_level="sequence")
    _close(loss, math.exp(12.0), 1e-5)
    _close(grad[0, 0], math.exp(12.0), 1e-5)


def _cispo_case():
    # old = -1; r = [1.5, 0.5, 1]; logp = old + ln r; A = [2, -1, 0.5]
    old = torch.full((1, 3), -1.0)
    lp = old + torch.tensor([[LN(1.5), LN(0.5), 0.0]])
    return lp, old, torch.tensor([[2.0, -1.0, 0.5]]), torch.ones(1, 3)


@pytest.mark.parametrize("backend", ALL_CPU)
def test_cispo_hand_worked(backend):
    lp, old, adv, mask = _cispo_case()
    lpv = lp[0].tolist()
    # veRL: w = sg(clamp(r, 0.8, 1.28)) = [1.28, 0.8, 1]; loss = -w A logp; grad = -w A (no gradient through r)
    loss, st, grad = _run(backend, lp, old, adv, mask, loss="cispo", clip_low=0.2, clip_high=0.28)
    _close(loss, (-1.28 * 2 * lpv[0] - 0.8 * -1 * lpv[1] - 1 * 0.5 * lpv[2]) / 3, 1e-6)
    torch.testing.assert_close(grad, torch.tensor([[-2.56, 0.8, -0.5]]) / 3, atol=1e-6, rtol=1e-6)
    _close(st.clipfrac, 2 / 3)  # veRL: r != clamp(r)
    _close(st.clip_high_frac, 1 / 3)  # TRL's cispo_clip_ratio: r > max and A > 0
    _close(st.clip_low_frac, 1 / 3)
    # TRL: min(r, epsilon_high) with epsilon_high = 5 is clip_low=1 (lower bound 0), clip_high=4: w = r
    loss, _, grad = _run(backend, lp, old, adv, mask, loss="cispo", clip_low=1.0, clip_high=4.0)
    _close(loss, (-1.5 * 2 * lpv[0] - 0.5 * -1 * lpv[1] - 0.5 * lpv[2]) / 3, 1e-6)
    torch.testing.assert_close(grad, torch.tensor([[-3.0, 0.5, -0.5]]) / 3, atol=1e-6, rtol=1e-6)
    # TRL's default epsilon_high = 0.2 for cispo: w = min(r, 0.2) = 0.2 everywhere (clip_high = -0.8)
    _, _, grad = _run(backend, lp, old, adv, mask, loss="cispo", clip_low=1.0, clip_high=-0.8)
    torch.testing.assert_close(grad, -0.2 * adv / 3, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("backend", ALL_CPU)
def test_sapo_hand_worked(backend):
    # tau_pos 1, tau_neg 1.05 (TRL's defaults); l = -sigmoid(tau (r - 1)) 4/tau A; dl/dlogp = -4 A s (1 - s) r
    #   t0: r 1, A 1:   s = 0.5 -> l = -2, grad -4 x 0.25 x 1 = -1
    #   t1: r 2, A -1:  tau 1.05, s = sigmoid(1.05) -> l = 4 s / 1.05, grad 4 s (1 - s) x 2
    #   t2: r 1, A 0:   tau_neg (A is not > 0), l = 0, grad 0
    s = 1 / (1 + math.exp(-1.05))
    lp = torch.tensor([[0.0, LN(2.0), 0.0]])
    adv = torch.tensor([[1.0, -1.0, 0.0]])
    loss, st, grad = _run(backend, lp, torch.zeros(1, 3), adv, torch.ones(1, 3), loss="sapo",
                          agg="seq-mean-token-mean")
    _close(loss, (-2.0 + 4 * s / 1.05 + 0.0) / 3, 1e-6)
    torch.testing.assert_close(grad, torch.tensor([[-1.0, 8 * s * (1 - s), 0.0]]) / 3, atol=1e-6, rtol=1e-6)
    assert st.clipfrac.item() == st.clip_low_frac.item() == st.clip_high_frac.item() == 0.0


@pytest.mark.parametrize("backend", ALL_CPU)
def test_rollout_correction_hand_worked(backend):
    # ratio 1 (logp = old), A = 1: every token's loss is -1, gradient -1, times the weight w.
    # old - sampling = [ln 3, ln 0.5, NaN (not recorded: 0)], x = [3, 0.5, 1]
    old = torch.full((1, 3), -2.0)
    samp = old - torch.tensor([[LN(3.0), LN(0.5), 0.0]])
    samp[0, 2] = float("nan")
    lp, adv, mask = old.clone(), torch.ones(1, 3), torch.ones(1, 3)

    def run(mode, lo, hi):
        return _run(backend, lp, old, adv, mask, sampling_logprobs=samp, rollout_is=mode, rollout_is_min=lo,
                    rollout_is_max=hi)

    loss, st, grad = run("token_truncate", None, 2.0)  # w = [2, 0.5, 1]
    _close(loss, -3.5 / 3, 1e-6)
    torch.testing.assert_close(grad, torch.tensor([[-2.0, -0.5, -1.0]]) / 3, atol=1e-6, rtol=1e-6)
    _close(st.is_weight_mean, 3.5 / 3, 1e-6)
    loss, st, grad = run("token_truncate", 0.6, 2.0)  # w = [2, 0.6, 1]
    _close(loss, -3.6 / 3, 1e-6)
    loss, st, grad = run("token_mask", 0.6, 2.0)  # x outside [0.6, 2] -> 0; kept tokens keep x: w = [0, 0, 1]
    _close(loss, -1 / 3, 1e-6)
    torch.testing.assert_close(grad, torch.tensor([[0.0, 0.0, -1.0]]) / 3, atol=1e-6, rtol=1e-6)
    _close(st.is_dropped_frac, 2 / 3)
    # sequence level: the product of the token ratios, 3 x 0.5 x 1 = 1.5, on every token
    loss, _, _ = run("sequence_truncate", None, 2.0)
    _close(loss, -1.5, 1e-6)
    loss, _, _ = run("sequence_truncate", None, 1.2)
    _close(loss, -1.2, 1e-6)
    loss, st, grad = run("sequence_mask", 0.5, 1.4)  # 1.5 > 1.4: the whole sequence is dropped
    assert loss.item() == 0.0 and torch.equal(grad, torch.zeros(1, 3)) and st.is_dropped_frac.item() == 1.0


# --------------------------------------------------------------------------- TRL's and veRL's formulas
def _trl_loss(lp, old, adv, mask, loss_type, level="token", eps=0.2, eps_high=None, delta=None, is_mode=None,
              samp=None, is_min=None, is_max=3.0, max_len=None):
    """TRL 1.16 GRPOTrainer._compute_loss's policy term (one process, no accumulation), restated:
    advantages [B], mask [B, T], importance-sampling correction from the sampling log-probs."""
    eps_high = eps if eps_high is None else eps_high
    mask = mask.float()
    log_ratio = lp - old
    if level == "token":
        log_w = log_ratio
    else:
        log_w = ((log_ratio * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).unsqueeze(-1)
    coef_1 = torch.exp(log_w)
    a = adv.unsqueeze(1)
    if loss_type == "cispo":
        per_token = -torch.clamp(coef_1, max=eps_high).detach() * a * lp
    elif loss_type == "sapo":
        tau = torch.where(a > 0, 1.0, 1.05)
        per_token = -torch.sigmoid(tau * (coef_1 - 1)) * 4 / tau * a
    else:
        coef_2 = torch.clamp(coef_1, 1 - eps, 1 + eps_high)
        if delta is not None:
            coef_1 = torch.clamp(coef_1, max=delta)
        per_token = -torch.min(coef_1 * a, coef_2 * a)
    if is_mode is not None:
        diff = torch.nan_to_num((old - samp) * mask, nan=0.0)
        if is_mode.startswith("sequence"):
            diff = diff.sum(-1, keepdim=True)
        w = torch.exp(diff)
        if is_mode.endswith("truncate"):
            w = torch.clamp(w, min=is_min, max=is_max)
        else:
            lo = -math.inf if is_min is None else is_min
            hi = math.inf if is_max is None else is_max
            w = w.masked_fill((w < lo) | (w > hi), 0.0)
        per_token = per_token * w
    if loss_type in ("grpo", "sapo"):
        return ((per_token * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).mean()
    if loss_type == "bnpo":
        return (per_token * mask).sum() / mask.sum().clamp(min=1.0)
    if loss_type == "dr_grpo":
        return (per_token * mask).sum() / (per_token.size(0) * max_len)
    if loss_type == "luspo":
        return (per_token * mask).sum(-1).mean()
    return (per_token * mask).sum() / mask.sum().clamp(min=1.0)  # dapo, cispo: num_items_in_batch


def _trl_mapping(loss_type, mask, eps=0.2, eps_high=None, max_len=None):
    """The module docstring's table: TRL loss_type -> policy_loss keywords (one process, GA = 1)."""
    eps_high = eps if eps_high is None else eps_high
    B = mask.shape[0]
    clip = dict(loss="clip", clip_low=eps, clip_high=eps_high)
    return {
        "grpo": dict(clip, agg="seq-mean-token-mean", num_seqs=B),
        "bnpo": dict(clip, agg="token-mean"),
        "dr_grpo": dict(clip, agg="seq-mean-token-sum-norm", num_seqs=B, norm_length=max_len),
        "dapo": dict(clip, agg="token-mean", num_tokens=mask.sum()),
        "cispo": dict(loss="cispo", clip_low=1.0, clip_high=eps_high - 1.0, agg="token-mean", num_tokens=mask.sum()),
        "sapo": dict(loss="sapo", tau_pos=1.0, tau_neg=1.05, agg="seq-mean-token-mean", num_seqs=B),
        "luspo": dict(clip, agg="seq-mean-token-sum", num_seqs=B),
    }[loss_type]


def _grpo_inputs(B=6, T=11, seed=3):
    g = torch.Generator().manual_seed(seed)
    old = -torch.rand(B, T, generator=g) * 3
    lp = old + torch.randn(B, T, generator=g) * 0.3
    samp = old + torch.randn(B, T, generator=g) * 0.2
    adv = torch.randn(B, generator=g)
    mask = torch.rand(B, T, generator=g) < 0.8
    mask[2] = False  # an empty completion: TRL still counts it in grpo's mean over sequences
    samp[0, 0] = float("nan")  # a token the sampler did not score
    return lp, old, adv, mask, samp


TRL_CASES = [
    ("grpo", "token", {}), ("grpo", "sequence", {}), ("grpo", "token", {"delta": 1.25}),
    ("bnpo", "token", {"eps_high": 0.28}), ("dr_grpo", "token", {}), ("dapo", "token", {"eps_high": 0.28}),
    ("dapo", "sequence", {"delta": 1.3}), ("cispo", "token", {"eps_high": 1.1}), ("cispo", "sequence", {"eps_high": 5.0}),
    ("sapo", "token", {}), ("sapo", "sequence", {}), ("luspo", "sequence", {}),
    ("dapo", "token", {"is_mode": "token_truncate", "is_max": 1.1}),
    ("grpo", "token", {"is_mode": "token_mask", "is_min": 0.9, "is_max": 1.15}),
    ("dapo", "token", {"is_mode": "sequence_truncate", "is_max": 1.2}),
    ("cispo", "token", {"eps_high": 1.1, "is_mode": "sequence_mask", "is_min": 0.7, "is_max": 1.5}),
]


@pytest.mark.parametrize("backend", ALL_CPU)
@pytest.mark.parametrize("loss_type,level,extra", TRL_CASES, ids=[f"{c[0]}-{c[1]}-{i}" for i, c in enumerate(TRL_CASES)])
def test_matches_trl_formulas(backend, loss_type, level, extra):
    lp, old, adv, mask, samp = _grpo_inputs()
    max_len = 16
    extra = dict(extra)
    is_mode, is_min, is_max = extra.pop("is_mode", None), extra.pop("is_min", None), extra.pop("is_max", 3.0)
    a = lp.clone().requires_grad_(True)
    want = _trl_loss(a, old, adv, mask, loss_type, level, is_mode=is_mode, samp=samp, is_min=is_min, is_max=is_max,
                     max_len=max_len, **extra)
    want.backward()
    kw = _trl_mapping(loss_type, mask, eps_high=extra.get("eps_high"), max_len=max_len)
    if "delta" in extra:
        kw["delta"] = extra["delta"]
    if is_mode is not None:
        kw.update(sampling_logprobs=samp, rollout_is=is_mode, rollout_is_min=is_min, rollout_is_max=is_max)
    got, _, grad = _run(backend, lp, old, adv[:, None].expand_as(lp), mask, ratio_level=level, **kw)
    assert_close(got, want.detach())
    assert_close(grad, a.grad)


def _verl_agg(loss_mat, mask, mode):
    m = mask.float()
    if mode == "token-mean":
        return (loss_mat * m).sum() / m.sum()
    seq_tokens = m.sum(-1)
    seq_loss = (loss_mat * m).sum(-1) / (seq_tokens + 1e-8)
    seq_mask = (seq_tokens > 0).float()
    return (seq_loss * seq_mask).sum() / seq_mask.sum()


def _verl_loss(lp, old, adv, mask, name, cl=0.2, ch=0.28, is_weights=None):
    """veRL core_algos.compute_policy_loss_{vanilla (no dual clip), gspo, cispo, sapo}, restated."""
    m = mask.float()
    if name == "gspo":
        seq = ((lp - old) * m).sum(-1) / m.sum(-1).clamp(min=1)
        log_r = torch.clamp(lp - lp.detach() + seq.detach().unsqueeze(-1), max=10.0)
        r = torch.exp(log_r)
        loss = torch.maximum(-adv * r, -adv * torch.clamp(r, 1 - cl, 1 + ch))
        mode = "seq-mean-token-mean"
    else:
        r = torch.exp(torch.clamp(lp - old, -20.0, 20.0))
        mode = "seq-mean-token-mean" if name == "sapo" else "token-mean"
        if name == "vanilla":
            loss = torch.maximum(-adv * r, -adv * torch.clamp(r, 1 - cl, 1 + ch))
        elif name == "cispo":
            loss = -torch.clamp(r, 1 - cl, 1 + ch).detach() * adv * lp
        else:
            tau = torch.where(adv > 0, 1.0, 1.05)
            loss = -torch.sigmoid(tau * (r - 1.0)) * (4.0 / tau) * adv
    if is_weights is not None:
        loss = loss * is_weights
    return _verl_agg(loss, mask, mode), mode


def _verl_tis(old, samp, mask, level, threshold):
    """veRL rollout_corr_helper.compute_rollout_correction_weights (truncated IS), restated."""
    log_ratio = old - samp
    if level == "sequence":
        log_ratio = (log_ratio * mask).sum(-1, keepdim=True)
    w = torch.exp(torch.clamp(log_ratio, -20.0, 20.0)).expand_as(old) * mask
    return w.clamp(max=threshold)


@pytest.mark.parametrize("backend", ALL_CPU)
@pytest.mark.parametrize("name,is_level", [("vanilla", None), ("vanilla", "token"), ("vanilla", "sequence"),
                                           ("gspo", None), ("cispo", None), ("sapo", "token")])
def test_matches_verl_formulas(backend, name, is_level):
    lp, old, adv_b, mask, samp = _grpo_inputs(seed=5)
    samp = torch.nan_to_num(samp)  # veRL has no unscored-token convention
    adv = adv_b[:, None] + 0.2 * torch.randn(lp.shape)  # token-varying advantages: GSPO-token differs from GSPO
    w = None if is_level is None else _verl_tis(old, samp, mask.float(), is_level, 1.5)
    a = lp.clone().requires_grad_(True)
    want, mode = _verl_loss(a, old, adv, mask, name, is_weights=w)
    want.backward()
    kw = {"vanilla": dict(loss="clip"), "gspo": dict(loss="clip", ratio_level="sequence_token"),
          "cispo": dict(loss="cispo"), "sapo": dict(loss="sapo")}[name]
    if is_level is not None:
        kw.update(sampling_logprobs=samp, rollout_is=f"{is_level}_truncate", rollout_is_max=1.5)
    got, _, grad = _run(backend, lp, old, adv, mask, clip_low=0.2, clip_high=0.28, agg=mode, **kw)
    assert_close(got, want.detach())
    assert_close(grad, a.grad)


# --------------------------------------------------------------------------- backends against the reference
VARIANTS = {
    "clip": dict(loss="clip", clip_low=0.2, clip_high=0.28),
    "clip_dual": dict(loss="clip", clip_low=0.2, clip_high=0.2, dual_clip=1.6),
    "clip_delta": dict(loss="clip", clip_low=0.2, clip_high=0.28, delta=1.4),
    "cispo": dict(loss="cispo", clip_low=0.2, clip_high=0.28),
    "sapo": dict(loss="sapo", tau_pos=1.0, tau_neg=1.05),
}
LEVELS = ("token", "sequence", "sequence_token")
IS_MODES = (None, "token_truncate", "token_mask", "sequence_truncate", "sequence_mask")


def _inputs(B, T, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    old = -torch.rand(B, T, generator=g) * 3
    lp = old + torch.randn(B, T, generator=g) * 0.4  # ratios spread past every clip bound
    adv = torch.randn(B, 1, generator=g) + 0.3 * torch.randn(B, T, generator=g)
    samp = old + torch.randn(B, T, generator=g) * 0.1
    mask = torch.rand(B, T, generator=g) < 0.75  # holes
    if B > 2:
        mask[1] = False  # an all-masked row
    lp[~mask] = float("nan")  # masked positions never leak
    samp[~mask] = float("nan")
    return lp.to(dtype), old.to(dtype), adv.to(dtype), samp.to(dtype), mask


def _pack(mask, span: bool):
    """Positions to keep and cu_seqlens: the valid tokens only (span False), or each row up to its last
    valid token, holes included (span True: the packed mask marks them)."""
    if span:
        T = mask.shape[1]
        last = torch.where(mask, torch.arange(T), -1).amax(1)
        keep = torch.arange(T)[None, :] <= last[:, None]
    else:
        keep = mask
    cu = torch.zeros(mask.shape[0] + 1, dtype=torch.int32)
    cu[1:] = torch.cumsum(keep.sum(1), 0)
    return keep, cu


def _options(variant, level, rollout_is, samp, agg, T):
    kw = dict(VARIANTS[variant], ratio_level=level, agg=agg)
    if rollout_is is not None:
        kw.update(sampling_logprobs=samp, rollout_is=rollout_is, rollout_is_min=0.9, rollout_is_max=1.1)
    if agg == "seq-mean-token-sum-norm":
        kw["norm_length"] = T + 3
    return kw


def _check(backend, B, T, dtype, variant, level, rollout_is, agg, counts=False, span=False):
    lp, old, adv, samp, mask = _inputs(B, T, dtype)
    kw = _options(variant, level, rollout_is, samp, agg, T)
    if counts:  # global counts larger than the local ones, as tensors
        kw.update(num_tokens=torch.tensor(float(mask.sum() * 3 + 1)), num_seqs=torch.tensor(2.0 * B + 1))
    loss, stats, grad = _run(backend, lp, old, adv, mask, upstream=-1.7, **kw)
    if backend != "torch":  # the fused path ran, not a fallback
        assert isinstance(loss.grad_fn, PolicyLossFamilyFunction._backward_cls), type(loss.grad_fn).__name__
    xr = torch.where(mask, lp, torch.zeros((), dtype=dtype)).requires_grad_(True)
    ref, ref_stats = policy_loss_reference(xr, old, adv, mask, **kw)
    ref.backward(torch.tensor(-1.7))
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    assert_close(loss, ref, torch.float32)  # same rounded inputs, fp32 math in both
    for got, want in zip(stats, ref_stats):
        assert_close(got, want, torch.float32)
    assert grad.dtype == dtype
    assert_close(grad, xr.grad, dtype)
    # packed: the same sequences as segments give the same loss, stats and gradient
    keep, cu = _pack(mask, span)
    pkw = dict(kw, sampling_logprobs=None if rollout_is is None else samp[keep])
    p_loss, p_stats, p_grad = _run(backend, lp[keep], old[keep], adv[keep], mask[keep] if span else None,
                                   upstream=-1.7, cu_seqlens=cu, **pkw)
    assert_close(p_loss, loss, torch.float32)
    for got, want in zip(p_stats, stats):
        assert_close(got, want, torch.float32)
    assert_close(p_grad, grad[keep], dtype)
    return loss


def _cases():
    """Every variant x ratio level x rollout-correction mode, the aggregation modes and count kinds cycled."""
    out = []
    i = 0
    for variant in VARIANTS:
        for level in LEVELS:
            for rollout_is in IS_MODES:
                out.append((variant, level, rollout_is, AGG_MODES[i % 4], i % 3 == 0, i % 2 == 0))
                i += 1
    return out


CASES = _cases()


@needs_ext
@pytest.mark.parametrize("variant,level,rollout_is,agg,counts,span", CASES)
def test_cpp_matches_reference_padded_and_packed(variant, level, rollout_is, agg, counts, span):
    _check("cpp", 5, 37, torch.float32, variant, level, rollout_is, agg, counts, span)


@needs_ext
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("level", LEVELS)
def test_cpp_bf16_and_long_rows(variant, level):
    _check("cpp", 3, 300, torch.bfloat16, variant, level, "sequence_truncate", "seq-mean-token-mean", span=True)
    _check("cpp", 1, 1, torch.float32, variant, level, "token_mask", "token-mean")


@pytest.mark.parametrize("variant,level,rollout_is,agg,counts,span", CASES[::7])
def test_torch_packed_matches_padded(variant, level, rollout_is, agg, counts, span):
    _check("torch", 4, 9, torch.float32, variant, level, rollout_is, agg, counts, span)


INTERPRET_CASES = [(v, lv, ris, agg, c, s) for (v, lv, ris, agg, c, s) in CASES[::4]]


@pytest.mark.interpret
@pytest.mark.parametrize("variant,level,rollout_is,agg,counts,span", INTERPRET_CASES)
def test_triton_interpreter_matches_reference(variant, level, rollout_is, agg, counts, span):
    _check("triton", 5, 37, torch.float32, variant, level, rollout_is, agg, counts, span)


@pytest.mark.interpret
def test_triton_interpreter_bf16_hand_worked_and_edges():
    for variant in VARIANTS:
        _check("triton", 3, 70, torch.bfloat16, variant, "sequence", "sequence_mask", "seq-mean-token-sum", span=True)
    test_asymmetric_clip_hand_worked("triton")
    test_two_sided_delta_clip_hand_worked("triton")
    test_gspo_sequence_ratio_hand_worked("triton")
    test_cispo_hand_worked("triton")
    test_sapo_hand_worked("triton")
    test_rollout_correction_hand_worked("triton")
    _check_zero_valid_tokens("triton")
    _check_empty_segments("triton")


@pytest.mark.parametrize("backend", [pytest.param("cpp", marks=needs_ext)])
def test_bf16_low_precision_rule(backend):
    lp, old, adv, _, mask = _inputs(8, 200, torch.bfloat16)
    lp = torch.where(mask, lp, torch.zeros((), dtype=lp.dtype))
    kw = dict(loss="clip", ratio_level="sequence", agg="seq-mean-token-mean")
    got, _ = policy_loss(lp, old, adv, mask, backend=backend, **kw)
    ref32, _ = policy_loss_reference(lp.float(), old.float(), adv.float(), mask, **kw)
    # GSPO run in bf16 end to end, as a bf16 training loop would
    n = mask.sum(-1, keepdim=True).clamp_min(1).to(lp.dtype)
    ratio = torch.exp(((lp - old) * mask).sum(-1, keepdim=True) / n)
    low = torch.maximum(-adv * ratio, -adv * torch.clamp(ratio, 0.8, 1.2))
    ref_low = (((low * mask).sum(-1) / n[:, 0]).sum() / (mask.sum(-1) > 0).sum()).float()
    assert_low_precision_rule(got, ref32, ref_low)


# --------------------------------------------------------------------------- edge cases
def _check_zero_valid_tokens(backend):
    lp, old, adv, samp, _ = _inputs(3, 5)
    lp, samp = torch.nan_to_num(lp), torch.nan_to_num(samp)
    none = torch.zeros(3, 5, dtype=torch.bool)
    for variant in VARIANTS:
        for level in LEVELS:
            for agg in AGG_MODES:
                kw = _options(variant, level, "sequence_mask", samp, agg, 5)
                loss, stats, grad = _run(backend, lp, old, adv, none, num_seqs=0, **kw)
                assert loss.item() == 0.0 and torch.equal(grad, torch.zeros_like(lp)), (variant, level, agg)
                assert all(float(s.abs().sum()) == 0.0 for s in stats)


def _check_empty_segments(backend):
    # S = 3 segments of lengths 0, 2, 0 and an empty packed batch (N = 0, S = 0 and S = 2)
    lp = torch.tensor([-1.0, -2.0])
    cu = torch.tensor([0, 0, 2, 2])
    for variant in VARIANTS:
        kw = dict(VARIANTS[variant], ratio_level="sequence", agg="seq-mean-token-mean")
        loss, stats, grad = _run(backend, lp + 0.1, lp, torch.tensor([1.0, -1.0]), None, cu_seqlens=cu, **kw)
        ref, _ = policy_loss_reference(lp + 0.1, lp, torch.tensor([1.0, -1.0]), torch.ones(1, 2, dtype=torch.bool)[0],
                                       cu_seqlens=torch.tensor([0, 2]), **kw)
        assert_close(loss, ref)
        assert stats.per_row[0].tolist() == [0.0, 2.0, 0.0]
        for empty_cu in (torch.tensor([0]), torch.tensor([0, 0, 0])):
            loss, stats, grad = _run(backend, torch.zeros(0), torch.zeros(0), torch.zeros(0), None,
                                     cu_seqlens=empty_cu, **kw)
            assert loss.item() == 0.0 and grad.shape == (0,)


@pytest.mark.parametrize("backend", ALL_CPU)
def test_zero_valid_tokens_give_zero_loss_and_grad(backend):
    _check_zero_valid_tokens(backend)


@pytest.mark.parametrize("backend", ALL_CPU)
def test_empty_segments_and_empty_batch(backend):
    _check_empty_segments(backend)


@needs_ext
def test_masked_nan_does_not_leak():
    lp, old, adv, samp, mask = _inputs(3, 11)
    for t in (old, adv):
        t[~mask] = float("nan")
    for variant in VARIANTS:
        kw = _options(variant, "sequence", "sequence_truncate", samp, "token-mean", 11)
        loss, stats, grad = _run("cpp", lp, old, adv, mask, **kw)
        assert all(torch.isfinite(t).all() for t in (loss, *stats, grad))
        assert torch.equal(grad[~mask], torch.zeros_like(grad[~mask]))


@needs_ext
def test_fused_creates_no_token_sized_tensor_but_the_gradient():
    B, T = 64, 512
    lp, old, adv, samp, mask = _inputs(B, T)
    lp, samp = torch.nan_to_num(lp), torch.nan_to_num(samp)
    x = lp.clone().requires_grad_(True)
    with AllocationTracker() as t:
        loss, _ = policy_loss(x, old, adv, mask, loss="clip", ratio_level="sequence", sampling_logprobs=samp,
                              rollout_is="sequence_mask", backend="cpp")
        loss.backward()
    big = [a for a in t.allocations if a.nbytes >= B * T]
    assert len(big) <= 1, big  # the gradient the caller asked for
    keep, cu = _pack(mask, span=False)
    x = lp[keep].clone().requires_grad_(True)
    old_p, adv_p, samp_p = old[keep].contiguous(), adv[keep].contiguous(), samp[keep].contiguous()
    with AllocationTracker() as t:
        loss, _ = policy_loss(x, old_p, adv_p, None, cu_seqlens=cu, loss="cispo", ratio_level="sequence",
                              sampling_logprobs=samp_p, rollout_is="token_truncate", backend="cpp")
        loss.backward()
    big = [a for a in t.allocations if a.nbytes >= x.numel()]
    assert len(big) <= 1, big


# --------------------------------------------------------------------------- registry + bad input
REGISTERED = {"clip": ("clip", "token"), "gspo": ("clip", "sequence"), "gspo_token": ("clip", "sequence_token"),
              "cispo": ("cispo", "token"), "sapo": ("sapo", "token")}


@pytest.mark.parametrize("name", REGISTERED)
def test_registered_losses_follow_the_trainer_convention(name):
    fn = algos.get_policy_loss(name)
    lp, old, adv, samp, mask = _inputs(4, 9)
    lp = torch.nan_to_num(lp).requires_grad_(True)
    # exactly the call trainer/ppo_step.micro_step makes
    loss, st = fn(lp, old, adv, mask, clip_low=0.2, clip_high=0.28, dual_clip=None, agg="seq-mean-token-mean",
                  num_tokens=torch.tensor([20.0]), num_seqs=torch.tensor([4.0]), norm_length=9)
    loss.backward()
    assert {"approx_kl", "clipfrac", "ratio_mean"} <= set(st._fields)
    loss_kind, level = REGISTERED[name]
    want, _ = policy_loss(lp.detach(), old, adv, mask, loss=loss_kind, ratio_level=level, clip_low=0.2,
                          clip_high=0.28, agg="seq-mean-token-mean", num_tokens=torch.tensor([20.0]),
                          num_seqs=torch.tensor([4.0]))
    assert_close(loss, want)
    params = __import__("inspect").signature(fn).parameters
    assert "loss" not in params and params["ratio_level"].default == level and "cu_seqlens" in params


def test_clip_with_defaults_equals_ppo_policy_loss():
    lp, old, adv, _, mask = _inputs(6, 40)
    for agg in AGG_MODES:
        for backend in [b for b in ("cpp", "torch") if b != "cpp" or _backend.HAS_EXT]:
            kw = dict(clip_low=0.2, clip_high=0.28, dual_clip=1.7, agg=agg)
            a, sa, ga = _run(backend, lp, old, adv, mask, **kw)
            x = lp.clone().requires_grad_(True)
            b, sb = ppo_policy_loss(x, old, adv, mask, backend=backend, **kw)
            b.backward()
            assert_close(a, b)
            assert_close(ga, x.grad)
            for f in ("clipfrac", "approx_kl", "ratio_mean", "dual_clipfrac"):
                assert_close(getattr(sa, f), getattr(sb, f))


def test_bad_input_names_the_argument():
    x, m = torch.zeros(2, 3), torch.ones(2, 3)
    p, cu = torch.zeros(5), torch.tensor([0, 2, 5])
    cases = [
        (dict(args=(x, x, torch.zeros(2, 4), m)), ValueError, "advantages must have the shape of logprobs"),
        (dict(args=(x, x, x, None)), TypeError, "mask must be a torch.Tensor"),
        (dict(args=(p, p, p, None)), ValueError, r"logprobs must be 2-D \[B, T\]"),
        (dict(args=(x, x, x, None), cu_seqlens=torch.tensor([0, 6])), ValueError, r"logprobs must be 1-D \[N\] packed"),
        (dict(args=(p, p, p, None), cu_seqlens=cu.float()), ValueError, "cu_seqlens must be int32 or int64"),
        (dict(args=(p, p, p, None), cu_seqlens=cu[None]), ValueError, r"cu_seqlens must be 1-D \[S \+ 1\]"),
        (dict(args=(p, p, p, None), cu_seqlens=torch.tensor([1, 2, 5])), ValueError, "cu_seqlens must start at 0"),
        (dict(args=(p, p, p, None), cu_seqlens=torch.tensor([0, 2, 4])), ValueError, "cu_seqlens must end at N = 5"),
        (dict(args=(p, p, p, None), cu_seqlens=torch.tensor([0, 3, 2, 5])), ValueError, "cu_seqlens must be non-decreasing"),
        (dict(args=(p, p, p, torch.ones(4)), cu_seqlens=cu), ValueError, "mask must have the shape of logprobs"),
        (dict(args=(p, p, p, None), cu_seqlens=cu, agg="seq-mean-token-sum-norm"), ValueError, "norm_length is required"),
        (dict(args=(x, x, x, m), loss="ppo"), ValueError, "loss must be one of"),
        (dict(args=(x, x, x, m), ratio_level="geometric"), ValueError, "ratio_level must be one of"),
        (dict(args=(x, x, x, m), clip_high=0.0), ValueError, "clip_high must be > 0"),
        (dict(args=(x, x, x, m), loss="cispo", clip_high=-1.0), ValueError, "clip_high must give an upper bound"),
        (dict(args=(x, x, x, m), dual_clip=1.0), ValueError, "dual_clip must be None or > 1"),
        (dict(args=(x, x, x, m), delta=0.0), ValueError, "delta must be > 0"),
        (dict(args=(x, x, x, m), loss="sapo", delta=2.0), ValueError, "dual_clip and delta apply to loss='clip' only"),
        (dict(args=(x, x, x, m), loss="sapo", tau_neg=0.0), ValueError, "tau_neg must be > 0"),
        (dict(args=(x, x, x, m), rollout_is="token"), ValueError, "rollout_is must be None or one of"),
        (dict(args=(x, x, x, m), rollout_is="token_mask"), ValueError, "needs sampling_logprobs"),
        (dict(args=(x, x, x, m), sampling_logprobs=x), ValueError, "sampling_logprobs is given but rollout_is is None"),
        (dict(args=(x, x, x, m), sampling_logprobs=torch.zeros(3, 2), rollout_is="token_mask"), ValueError,
         "sampling_logprobs must have the shape of logprobs"),
        (dict(args=(x, x, x, m), sampling_logprobs=x, rollout_is="token_mask", rollout_is_min=2.0,
              rollout_is_max=1.0), ValueError, "rollout_is_min must be < rollout_is_max"),
        (dict(args=(x, x, x, m), sampling_logprobs=x, rollout_is="token_truncate", rollout_is_max=None),
         ValueError, "needs rollout_is_min or rollout_is_max"),
        (dict(args=(x, x, x, m), agg="mean"), ValueError, "agg must be one of"),
        (dict(args=(x, x, x, torch.full((2, 3), 2.0))), ValueError, "mask must hold only 0 and 1"),
        (dict(args=(x, x.long(), x, m)), ValueError, "old_logprobs must be float32, bfloat16 or float16"),
    ]
    for kw, exc, msg in cases:
        kw = dict(kw)
        with pytest.raises(exc, match=msg):
            policy_loss(*kw.pop("args"), **kw)


@pytest.mark.parametrize("backend", ALL_CPU)
def test_non_finite_valid_input_is_rejected_on_cpu(backend):
    x, m = torch.zeros(2, 3), torch.ones(2, 3)
    bad = x.clone()
    bad[1, 2] = float("nan")
    with pytest.raises(ValueError, match="advantages contains NaN or inf"):
        policy_loss(x, x, bad, m, ratio_level="sequence", backend=backend)
    with pytest.raises(ValueError, match="logprobs contains NaN or inf"):
        policy_loss(bad.flatten(), x.flatten(), x.flatten(), None, cu_seqlens=torch.tensor([0, 6]), backend=backend)
    # a NaN sampling log-prob is "not recorded" (weight 1), not an error
    loss, _ = policy_loss(x, x, -torch.ones(2, 3), m, sampling_logprobs=bad, rollout_is="token_truncate",
                          backend=backend)
    assert loss.item() == 1.0
    m[1, 2] = 0  # the same NaN at a masked-out position is fine
    assert policy_loss(x, x, bad, m, backend=backend)[0].item() == 0.0
