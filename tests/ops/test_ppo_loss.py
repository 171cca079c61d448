"""PPO policy loss, value loss and aggregation: hand-worked values, every backend against the
torch reference (values, stats, gradients), edge cases, memory, bad input."""
import math

import pytest
import torch

from rlhf_fast import _backend
from rlhf_fast.memory.tracker import AllocationTracker
from rlhf_fast.ops.ppo_loss import (
    AGG_MODES,
    PPOPolicyLossFunction,
    ValueLossFunction,
    aggregate_loss,
    ppo_policy_loss,
    ppo_policy_loss_reference,
    value_loss,
    value_loss_reference,
)
from tests.utils import assert_close, assert_low_precision_rule

needs_ext = pytest.mark.skipif(not _backend.HAS_EXT, reason="extension not built (RLHF_FAST_NO_EXT run)")
FUSED_CPU = [pytest.param("cpp", marks=needs_ext)]
ALL_CPU = [pytest.param("cpp", marks=needs_ext), "torch"]


def _close(got, want, tol=1e-6):
    got = got.detach() if isinstance(got, torch.Tensor) else got
    assert abs(float(got) - float(want)) <= tol * max(1.0, abs(float(want))), (float(got), float(want))


# --------------------------------------------------------------------------- hand-worked values
def _policy_hand_case():
    # One row, clip 0.2 both sides:
    #   t0: log-ratio 0,       ratio 1,   A = 2:  unclipped -2,   clipped -2    -> -2   (grad -A·ratio = -2)
    #   t1: log-ratio ln 1.5,  ratio 1.5, A = 1:  unclipped -1.5, clipped -1.2  -> -1.2 (clipped: grad 0)
    #   t2: log-ratio ln 0.5,  ratio 0.5, A = -1: unclipped 0.5,  clipped 0.8   -> 0.8  (clipped: grad 0)
    #   t3: log-ratio ln 0.5,  ratio 0.5, A = 1:  unclipped -0.5, clipped -0.8  -> -0.5 (grad -A·ratio = -0.5)
    #   t4: masked out (holds NaN: must not leak)
    old = torch.tensor([[-1.0, -1.0, -1.0, -1.0, 0.0]])
    lp = old + torch.tensor([[0.0, math.log(1.5), math.log(0.5), math.log(0.5), float("nan")]])
    adv = torch.tensor([[2.0, 1.0, -1.0, 1.0, 5.0]])
    mask = torch.tensor([[1, 1, 1, 1, 0]])
    return lp, old, adv, mask


@pytest.mark.parametrize("backend", ALL_CPU)
def test_policy_hand_worked(backend):
    lp, old, adv, mask = _policy_hand_case()
    x = lp.clone().requires_grad_(True)
    loss, stats = ppo_policy_loss(x, old, adv, mask, backend=backend)
    _close(loss, (-2 - 1.2 + 0.8 - 0.5) / 4)  # token-mean over 4 valid tokens = -0.725
    _close(stats.clipfrac, 2 / 4)  # t1, t2
    _close(stats.ratio_mean, (1 + 1.5 + 0.5 + 0.5) / 4)
    _close(stats.approx_kl, 0.5 * (math.log(1.5) ** 2 + 2 * math.log(0.5) ** 2) / 4)
    _close(stats.dual_clipfrac, 0.0)
    loss.backward(torch.tensor(2.0))  # upstream gradient 2: grads are 2·(-A·ratio)/4 on live tokens
    want = torch.tensor([[2 * -2 / 4, 0.0, 0.0, 2 * -0.5 / 4, 0.0]])
    torch.testing.assert_close(x.grad, want, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("backend", ALL_CPU)
def test_policy_dual_clip_hand_worked(backend):
    # c = 3, A = -1 on both tokens:
    #   t0: ratio e^2 ≈ 7.389: unclipped 7.389, clipped 1.2 -> 7.389; cap -c·A = 3 < 7.389 -> 3 (dual, grad 0)
    #   t1: ratio 2:            unclipped 2,     clipped 1.2 -> 2;     2 < 3 -> 2 (grad -A·ratio = 2)
    old = torch.zeros(1, 2)
    lp = torch.tensor([[2.0, math.log(2.0)]])
    adv = torch.tensor([[-1.0, -1.0]])
    x = lp.clone().requires_grad_(True)
    loss, stats = ppo_policy_loss(x, old, adv, torch.ones(1, 2), dual_clip=3.0, backend=backend)
    _close(loss, (3 + 2) / 2)
    _close(stats.dual_clipfrac, 1 / 2)
    _close(stats.clipfrac, 0.0)  # the unclipped branch is the larger on both tokens
    loss.backward()
    torch.testing.assert_close(x.grad, torch.tensor([[0.0, 2.0 / 2]]), atol=1e-6, rtol=1e-6)
    # Without the dual clip t0 keeps 7.389 and its gradient -A·ratio = e^2.
    x2 = lp.clone().requires_grad_(True)
    loss2, stats2 = ppo_policy_loss(x2, old, adv, torch.ones(1, 2), backend=backend)
    _close(loss2, (math.exp(2) + 2) / 2, 1e-5)
    loss2.backward()
    torch.testing.assert_close(x2.grad, torch.tensor([[math.exp(2) / 2, 1.0]]), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", ALL_CPU)
def test_value_hand_worked(backend):
    # clip 0.5 (all values exact in binary):
    #   t0: V 1,    V_old 0,   R 1: V_clip 0.5;  (V-R)² 0,      (V_clip-R)² 0.25   -> 0.125  (clipped, |ΔV| > clip: grad 0)
    #   t1: V 0.75, V_old 0.5, R 0: V_clip 0.75; both 0.5625                        -> 0.28125 (grad V-R = 0.75)
    #   t2: V 0,    V_old 1,   R 2: V_clip 0.5;  (V-R)² 4,      (V_clip-R)² 2.25   -> 2      (grad V-R = -2)
    v = torch.tensor([[1.0, 0.75, 0.0, 9.0]])
    v_old = torch.tensor([[0.0, 0.5, 1.0, 0.0]])
    ret = torch.tensor([[1.0, 0.0, 2.0, 100.0]])
    mask = torch.tensor([[True, True, True, False]])
    x = v.clone().requires_grad_(True)
    loss, clipfrac = value_loss(x, v_old, ret, mask, clip=0.5, backend=backend)
    _close(loss, (0.125 + 0.28125 + 2.0) / 3)
    _close(clipfrac, 1 / 3)
    loss.backward(torch.tensor(3.0))
    torch.testing.assert_close(x.grad, torch.tensor([[0.0, 0.75, -2.0, 0.0]]), atol=1e-6, rtol=1e-6)


def test_aggregation_hand_worked():
    loss_mat = torch.tensor([[1.0, 2.0, 3.0, 4.0], [10.0, 20.0, 30.0, 40.0], [5.0, 5.0, 5.0, 5.0]])
    mask = torch.tensor([[1, 1, 0, 0], [1, 0, 0, 0], [0, 0, 0, 0]])
    # valid sums: row0 1+2 = 3 (2 tokens), row1 10 (1 token), row2 empty (not counted as a sequence)
    assert aggregate_loss(loss_mat, mask, "token-mean").item() == pytest.approx(13 / 3)
    assert aggregate_loss(loss_mat, mask, "token-mean", num_tokens=13).item() == 1.0
    assert aggregate_loss(loss_mat, mask, "token-mean", num_tokens=torch.tensor(26)).item() == 0.5
    assert aggregate_loss(loss_mat, mask, "seq-mean-token-mean").item() == (1.5 + 10) / 2
    assert aggregate_loss(loss_mat, mask, "seq-mean-token-mean", num_seqs=4).item() == (1.5 + 10) / 4
    assert aggregate_loss(loss_mat, mask, "seq-mean-token-sum").item() == (3 + 10) / 2
    assert aggregate_loss(loss_mat, mask, "seq-mean-token-sum", num_seqs=4).item() == (3 + 10) / 4
    assert aggregate_loss(loss_mat, mask, "seq-mean-token-sum-norm").item() == 13 / (2 * 4)  # T = 4
    assert aggregate_loss(loss_mat, mask, "seq-mean-token-sum-norm", num_seqs=1, norm_length=2).item() == 13 / 2


# --------------------------------------------------------------------------- backends vs reference
def _policy_inputs(B, T, dtype=torch.float32, zero_row=True):
    old = -torch.rand(B, T) * 3
    lp = old + torch.randn(B, T) * 0.4  # ratios spread well past 1 ± 0.2: both branches active
    adv = torch.randn(B, T)
    mask = torch.rand(B, T) < 0.75  # holes
    if zero_row and B > 2:
        mask[1] = False  # an all-masked row
    lp[~mask] = float("nan")  # masked positions never leak
    return lp.to(dtype), old.to(dtype), adv.to(dtype), mask


def _value_inputs(B, T, dtype=torch.float32, zero_row=True):
    v_old = torch.randn(B, T)
    v = v_old + torch.randn(B, T) * 0.3
    ret = v_old + torch.randn(B, T)
    mask = torch.rand(B, T) < 0.75
    if zero_row and B > 2:
        mask[1] = False
    ret[~mask] = float("inf")
    return v.to(dtype), v_old.to(dtype), ret.to(dtype), mask


def _counts(kind, mask):
    if kind is None:
        return None, None
    if kind == "number":
        return int(mask.sum()) * 3 + 1, mask.shape[0] * 2 + 1  # global counts > local ones
    return torch.tensor(float(mask.sum() * 3 + 1)), torch.tensor(mask.shape[0] * 2 + 1)


def _check_policy(backend, B, T, dtype, dual_clip, agg, counts):
    lp, old, adv, mask = _policy_inputs(B, T, dtype)
    num_tokens, num_seqs = _counts(counts, mask)
    kw = dict(clip_low=0.2, clip_high=0.28, dual_clip=dual_clip, agg=agg, num_tokens=num_tokens, num_seqs=num_seqs)
    x = lp.clone().requires_grad_(True)
    loss, stats = ppo_policy_loss(x, old, adv, mask, backend=backend, **kw)
    assert isinstance(loss.grad_fn, PPOPolicyLossFunction._backward_cls), type(loss.grad_fn).__name__
    xr = torch.where(mask, lp, torch.zeros((), dtype=dtype)).requires_grad_(True)  # NaN-free for autograd
    ref, ref_stats = ppo_policy_loss_reference(xr, old, adv, mask, **kw)
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    assert_close(loss, ref, torch.float32)  # same rounded inputs, fp32 math in both
    if B * T >= 100:  # the inputs exercise every branch
        assert ref_stats.clipfrac > 0.05 and (dual_clip is None or ref_stats.dual_clipfrac > 0.02), ref_stats
    for got, want in zip(stats, ref_stats):
        assert_close(got, want, torch.float32)
    loss.backward(torch.tensor(-1.7))
    ref.backward(torch.tensor(-1.7))
    assert x.grad.dtype == dtype
    assert_close(x.grad, xr.grad, dtype)
    return loss, ref


def _check_value(backend, B, T, dtype, agg, counts):
    v, v_old, ret, mask = _value_inputs(B, T, dtype)
    num_tokens, num_seqs = _counts(counts, mask)
    kw = dict(clip=0.2, agg=agg, num_tokens=num_tokens, num_seqs=num_seqs)
    x = v.clone().requires_grad_(True)
    loss, clipfrac = value_loss(x, v_old, ret, mask, backend=backend, **kw)
    assert isinstance(loss.grad_fn, ValueLossFunction._backward_cls), type(loss.grad_fn).__name__
    xr = v.clone().requires_grad_(True)
    ref_ret = torch.where(mask, ret, torch.zeros((), dtype=dtype))
    ref, ref_clipfrac = value_loss_reference(xr, v_old, ref_ret, mask, **kw)
    assert_close(loss, ref, torch.float32)
    assert_close(clipfrac, ref_clipfrac, torch.float32)
    loss.backward(torch.tensor(2.5))
    ref.backward(torch.tensor(2.5))
    assert x.grad.dtype == dtype
    assert_close(x.grad, xr.grad, dtype)


SHAPES = [(1, 1), (1, 9), (4, 37), (3, 300)]


@pytest.mark.parametrize("backend", FUSED_CPU)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dual_clip", [None, 1.5])
@pytest.mark.parametrize("agg", AGG_MODES)
@pytest.mark.parametrize("counts", [None, "number", "tensor"])
def test_policy_cpp_matches_reference(backend, dtype, shape, dual_clip, agg, counts):
    _check_policy(backend, *shape, dtype, dual_clip, agg, counts)


@pytest.mark.parametrize("backend", FUSED_CPU)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("agg", AGG_MODES)
@pytest.mark.parametrize("counts", [None, "number"])
def test_value_cpp_matches_reference(backend, dtype, shape, agg, counts):
    _check_value(backend, *shape, dtype, agg, counts)


@pytest.mark.interpret
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(1, 1), (4, 37), (3, 300)])
@pytest.mark.parametrize("dual_clip", [None, 1.5])
@pytest.mark.parametrize("agg", AGG_MODES)
def test_policy_triton_interpreter_matches_reference(dtype, shape, dual_clip, agg):
    _check_policy("triton", *shape, dtype, dual_clip, agg, "tensor" if dual_clip else None)


@pytest.mark.interpret
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(1, 1), (4, 37), (3, 300)])
@pytest.mark.parametrize("agg", AGG_MODES)
@pytest.mark.parametrize("counts", [None, "number"])
def test_value_triton_interpreter_matches_reference(dtype, shape, agg, counts):
    _check_value("triton", *shape, dtype, agg, counts)


@pytest.mark.interpret
def test_triton_interpreter_hand_worked_and_zero_mask():
    test_policy_hand_worked("triton")
    test_policy_dual_clip_hand_worked("triton")
    test_value_hand_worked("triton")
    for agg in AGG_MODES:
        _check_zero_mask("triton", agg)
    _check_masked_nan_does_not_leak("triton")


@pytest.mark.parametrize("backend", FUSED_CPU)
def test_bf16_low_precision_rule(backend):
    lp, old, adv, mask = _policy_inputs(8, 200, torch.bfloat16, zero_row=False)
    lp = torch.where(mask, lp, torch.zeros((), dtype=lp.dtype))
    got, _ = ppo_policy_loss(lp, old, adv, mask, backend=backend)
    ref32, _ = ppo_policy_loss_reference(lp.float(), old.float(), adv.float(), mask)
    # the eager torch formula run in bf16 end to end, as a bf16 training loop would
    ratio = torch.exp(torch.clamp(lp - old, -20, 20))
    low = torch.maximum(-adv * ratio, -adv * torch.clamp(ratio, 0.8, 1.2))
    ref_low = (low * mask).sum() / mask.sum()
    assert_low_precision_rule(got, ref32, ref_low)


# --------------------------------------------------------------------------- edge cases
def _check_zero_mask(backend, agg):
    lp, old, adv, _ = _policy_inputs(3, 5)
    lp = torch.nan_to_num(lp)
    none = torch.zeros(3, 5, dtype=torch.bool)
    for num_tokens, num_seqs in ((None, None), (0, 0), (torch.tensor(0.0), torch.tensor(0))):
        x = lp.clone().requires_grad_(True)
        loss, stats = ppo_policy_loss(x, old, adv, none, agg=agg, num_tokens=num_tokens, num_seqs=num_seqs,
                                      dual_clip=2.0, backend=backend)
        loss.backward()
        assert loss.item() == 0.0 and torch.equal(x.grad, torch.zeros_like(lp))
        assert all(s.item() == 0.0 for s in stats)
        v = lp.clone().requires_grad_(True)
        vloss, clipfrac = value_loss(v, old, adv, none, agg=agg, num_tokens=num_tokens, num_seqs=num_seqs,
                                     backend=backend)
        vloss.backward()
        assert vloss.item() == 0.0 and clipfrac.item() == 0.0 and torch.equal(v.grad, torch.zeros_like(lp))


@pytest.mark.parametrize("backend", ALL_CPU)
@pytest.mark.parametrize("agg", AGG_MODES)
def test_zero_valid_tokens_give_zero_loss_and_grad(backend, agg):
    _check_zero_mask(backend, agg)


def _check_masked_nan_does_not_leak(backend):
    lp, old, adv, mask = _policy_inputs(3, 11)
    v, v_old, ret, vmask = _value_inputs(3, 11)
    for t in (old, adv):
        t[~mask] = float("nan")
    for t in (v, v_old):
        t[~vmask] = float("nan")
    x = lp.clone().requires_grad_(True)
    loss, stats = ppo_policy_loss(x, old, adv, mask, dual_clip=3.0, backend=backend)
    y = v.clone().requires_grad_(True)
    vloss, clipfrac = value_loss(y, v_old, ret, vmask, backend=backend)
    (loss + vloss).backward()
    assert all(torch.isfinite(t).all() for t in (loss, vloss, clipfrac, *stats, x.grad, y.grad))
    assert torch.equal(x.grad[~mask], torch.zeros_like(x.grad[~mask]))
    assert torch.equal(y.grad[~vmask], torch.zeros_like(y.grad[~vmask]))


@pytest.mark.parametrize("backend", FUSED_CPU)
def test_masked_nan_does_not_leak(backend):
    _check_masked_nan_does_not_leak(backend)


@pytest.mark.parametrize("backend", FUSED_CPU)
def test_empty_batch(backend):
    x = torch.zeros(0, 7, requires_grad=True)
    loss, stats = ppo_policy_loss(x, torch.zeros(0, 7), torch.zeros(0, 7), torch.zeros(0, 7), backend=backend)
    loss.backward()
    assert loss.item() == 0.0 and x.grad.shape == (0, 7)


@pytest.mark.parametrize("backend", FUSED_CPU)
def test_log_ratio_clamp_stops_gradient(backend):
    # log-ratio 25 > 20: ratio = e^20, and the clamp passes no gradient (A < 0 keeps the unclipped branch).
    x = torch.tensor([[25.0, 20.0]], requires_grad=True)
    loss, _ = ppo_policy_loss(x, torch.zeros(1, 2), torch.tensor([[-1.0, -1.0]]), torch.ones(1, 2), backend=backend)
    loss.backward()
    _close(loss, math.exp(20), 1e-5)
    # at exactly 20 the closed clamp interval still passes the gradient, as torch.clamp does
    torch.testing.assert_close(x.grad, torch.tensor([[0.0, math.exp(20) / 2]]), rtol=1e-5, atol=0)


@pytest.mark.parametrize("backend", FUSED_CPU)
def test_only_the_loss_is_differentiable(backend):
    lp, old, adv, mask = _policy_inputs(2, 6, zero_row=False)
    loss, stats = ppo_policy_loss(lp.nan_to_num().requires_grad_(True), old, adv, mask, backend=backend)
    assert loss.requires_grad and not any(s.requires_grad for s in stats)
    assert all(s.dim() == 0 and s.dtype == torch.float32 for s in stats)


@pytest.mark.parametrize("backend", FUSED_CPU)
def test_fused_memory_at_most_half_of_eager(backend):
    """Forward + backward at B=64, T=1024: tensors created beyond the inputs (live peak and total)."""
    B, T = 64, 1024
    lp, old, adv, mask = _policy_inputs(B, T, zero_row=False)
    lp = lp.nan_to_num()
    v, v_old, ret, _ = _value_inputs(B, T, zero_row=False)
    ret = ret.nan_to_num()

    def run(policy_fn, value_fn, **kw):
        x, y = lp.clone().requires_grad_(True), v.clone().requires_grad_(True)
        with AllocationTracker() as t:
            p, _ = policy_fn(x, old, adv, mask, **kw)
            q, _ = value_fn(y, v_old, ret, mask, **kw)
            (p + q).backward()
        return t

    ours = run(ppo_policy_loss, value_loss, backend=backend)
    eager = run(ppo_policy_loss_reference, value_loss_reference)
    assert ours.peak_live_bytes <= 0.5 * eager.peak_live_bytes, (ours.peak_live_bytes, eager.peak_live_bytes)
    assert ours.total_bytes <= 0.5 * eager.total_bytes, (ours.total_bytes, eager.total_bytes)
    # the only [B, T] tensors are the two gradients the caller asked for
    assert sum(a.nbytes >= B * T for a in ours.allocations) <= 2, [a for a in ours.allocations if a.nbytes >= B * T]


# --------------------------------------------------------------------------- bad input
def test_bad_input_names_the_argument():
    x = torch.zeros(2, 3)
    m = torch.ones(2, 3)
    with pytest.raises(ValueError, match="advantages must have the shape of logprobs"):
        ppo_policy_loss(x, x, torch.zeros(2, 4), m)
    with pytest.raises(ValueError, match="mask must have the shape of logprobs"):
        ppo_policy_loss(x, x, x, torch.ones(3, 2))
    with pytest.raises(ValueError, match=r"logprobs must be 2-D \[B, T\]"):
        ppo_policy_loss(torch.zeros(6), torch.zeros(6), torch.zeros(6), torch.ones(6))
    with pytest.raises(ValueError, match="clip_low must be > 0"):
        ppo_policy_loss(x, x, x, m, clip_low=0.0)
    with pytest.raises(ValueError, match="clip_high must be > 0"):
        ppo_policy_loss(x, x, x, m, clip_high=-0.1)
    with pytest.raises(ValueError, match="dual_clip must be None or > 1"):
        ppo_policy_loss(x, x, x, m, dual_clip=1.0)
    with pytest.raises(ValueError, match="agg must be one of .*token-mean.*seq-mean-token-sum-norm.*got 'mean'"):
        ppo_policy_loss(x, x, x, m, agg="mean")
    with pytest.raises(ValueError, match="num_tokens must be a finite count >= 0"):
        ppo_policy_loss(x, x, x, m, num_tokens=-1)
    with pytest.raises(ValueError, match="num_seqs must be a number or a 1-element tensor"):
        ppo_policy_loss(x, x, x, m, num_seqs=torch.ones(2))
    with pytest.raises(ValueError, match="norm_length must be > 0"):
        ppo_policy_loss(x, x, x, m, agg="seq-mean-token-sum-norm", norm_length=0)
    with pytest.raises(ValueError, match="mask must hold only 0 and 1"):
        ppo_policy_loss(x, x, x, torch.full((2, 3), 2.0))
    with pytest.raises(ValueError, match="old_logprobs must be float32, bfloat16 or float16"):
        ppo_policy_loss(x, torch.zeros(2, 3, dtype=torch.long), x, m)
    with pytest.raises(ValueError, match="clip must be > 0"):
        value_loss(x, x, x, m, clip=0)
    with pytest.raises(ValueError, match="returns must have the shape of values"):
        value_loss(x, x, torch.zeros(3, 2), m)
    with pytest.raises(ValueError, match="agg must be one of"):
        value_loss(x, x, x, m, agg="sum")
    with pytest.raises(ValueError, match="mask must have the shape of loss_mat"):
        aggregate_loss(x, torch.ones(3, 2))
    with pytest.raises(ValueError, match="agg must be one of"):
        aggregate_loss(x, m, agg="seq-mean")


@pytest.mark.parametrize("backend", ALL_CPU)
def test_non_finite_valid_input_is_rejected_on_cpu(backend):
    x = torch.zeros(2, 3)
    m = torch.ones(2, 3)
    bad = x.clone()
    bad[1, 2] = float("nan")
    with pytest.raises(ValueError, match="advantages contains NaN or inf"):
        ppo_policy_loss(x, x, bad, m, backend=backend)
    with pytest.raises(ValueError, match="old_logprobs contains NaN or inf"):
        ppo_policy_loss(x, bad.clone().fill_(float("-inf")), x, m, backend=backend)
    with pytest.raises(ValueError, match="returns contains NaN or inf"):
        value_loss(x, x, bad, m, backend=backend)
    m[1, 2] = 0  # the same NaN at a masked-out position is fine
    assert ppo_policy_loss(x, x, bad, m, backend=backend)[0].item() == 0.0


@pytest.mark.parametrize("backend", ["torch", "cpp"])
def test_value_clipfrac_is_exactly_zero_when_every_value_is_inside_the_clip_range(backend):
    """V_old + clamp(V - V_old) rounds; clamping V itself does not, so no in-range token counts as clipped."""
    if backend == "cpp" and not _backend.HAS_EXT:
        pytest.skip("extension not built")
    g = torch.Generator().manual_seed(5)
    v = torch.randn(64, 128, generator=g) * 3
    v_old = v + torch.randn(64, 128, generator=g) * 0.1
    ret = torch.randn(64, 128, generator=g) * 3
    mask = torch.ones(64, 128, dtype=torch.bool)
    loss, clipfrac = value_loss(v, v_old, ret, mask, clip=100.0, backend=backend)
    assert clipfrac.item() == 0.0
    assert loss.item() == pytest.approx(0.5 * ((v - ret) ** 2).mean().item(), rel=1e-5)
