"""kl_penalty and token_rewards: hand-worked values, every backend against the reference, gradients, bad input."""
import math

import pytest
import torch

from rlhf_fast import _backend
from rlhf_fast.memory.tracker import AllocationTracker
from rlhf_fast.ops.kl import (
    KL_ESTIMATORS,
    kl_penalty,
    kl_penalty_reference,
    token_rewards,
    token_rewards_reference,
)
from tests.utils import assert_close

needs_ext = pytest.mark.skipif(not _backend.HAS_EXT, reason="extension not built (RLHF_FAST_NO_EXT run)")
CPU_BACKENDS = ("torch", *(["cpp"] if _backend.HAS_EXT else []))


# --------------------------------------------------------------------------- hand-worked values
# r = logp - ref = [0, 1, -2, ln 2, 30, -30]
LOGP = torch.tensor([0.0, 1.0, -2.0, math.log(2.0), 30.0, -30.0])
REF = torch.zeros(6)
E = math.e
HAND = {
    # k1 = r, then clamp ±10: 30 -> 10, -30 -> -10
    "k1": [0.0, 1.0, -2.0, math.log(2.0), 10.0, -10.0],
    # k2 = r²/2: 0, 0.5, 4/2 = 2, (ln 2)²/2 = 0.240227, 450 -> 10, 450 -> 10
    "k2": [0.0, 0.5, 2.0, math.log(2.0) ** 2 / 2, 10.0, 10.0],
    # k3 = e^-r - 1 + r: 1 - 1 + 0 = 0; e^-1 - 1 + 1 = 0.367879; e^2 - 1 - 2 = 4.389056;
    # 1/2 - 1 + ln 2 = 0.193147; r=30 -> clamp to 20: e^-20 + 19 -> 10; r=-30 -> -20: e^20 - 21 -> 10
    "k3": [0.0, 1 / E, E**2 - 3.0, 0.5 - 1.0 + math.log(2.0), 10.0, 10.0],
    # abs = |r|: 30 -> 10, |-30| -> 10
    "abs": [0.0, 1.0, 2.0, math.log(2.0), 10.0, 10.0],
}


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("estimator", KL_ESTIMATORS)
def test_hand_worked_estimates(backend, estimator):
    got = kl_penalty(LOGP, REF, estimator, backend=backend)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, torch.tensor(HAND[estimator]), atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_k3_clamps_log_ratio_to_20_before_exp(backend):
    # clamp = 1e9 so only the ±20 log-ratio clamp acts: r = -30 gives e^20 - 1 - 20 = 485165174.4,
    # not e^30 - 31 = 1.07e13.
    got = kl_penalty(torch.tensor([-30.0]), torch.tensor([0.0]), "k3", clamp=1e9, backend=backend)
    torch.testing.assert_close(got, torch.tensor([math.exp(20.0) - 21.0]), rtol=1e-6, atol=0)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_hand_worked_gradients(backend):
    # r = [1, -2, ln 2]; k3' = 1 - e^-r = [1 - 1/e = 0.632121, 1 - e^2 = -6.389056, 1 - 1/2 = 0.5];
    # d/d ref = -d/d logp. With clamp 1.5 the r=-2 estimate (4.389) is clamped: gradient 0 there.
    lp = torch.tensor([1.0, -2.0, math.log(2.0)], requires_grad=True)
    rf = torch.zeros(3, requires_grad=True)
    kl_penalty(lp, rf, "k3", clamp=10.0, backend=backend).sum().backward()
    expect = torch.tensor([1 - 1 / E, 1 - E**2, 0.5])
    torch.testing.assert_close(lp.grad, expect, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(rf.grad, -expect, atol=1e-6, rtol=1e-6)
    lp.grad = rf.grad = None
    kl_penalty(lp, rf, "k3", clamp=1.5, backend=backend).sum().backward()
    torch.testing.assert_close(lp.grad, torch.tensor([1 - 1 / E, 0.0, 0.5]), atol=1e-6, rtol=1e-6)
    # k2' = r; abs' = sign(r)
    lp.grad = None
    kl_penalty(lp, rf.detach(), "k2", backend=backend).sum().backward()
    torch.testing.assert_close(lp.grad, torch.tensor([1.0, -2.0, math.log(2.0)]))
    lp.grad = None
    kl_penalty(lp, rf.detach(), "abs", backend=backend).sum().backward()
    torch.testing.assert_close(lp.grad, torch.tensor([1.0, -1.0, 1.0]))


def test_hand_worked_token_rewards():
    scores = torch.tensor([1.0, 2.0, 3.0])
    kl = torch.tensor([[0.1, 0.2, 0.3, 0.4]] * 3)
    mask = torch.tensor([
        [1, 1, 1, 0],  # right padding: score on t=2 -> -0.5*0.3 + 1 = 0.85
        [0, 1, 0, 1],  # left padding and a hole: score on t=3 -> -0.5*0.4 + 2 = 1.8
        [0, 0, 0, 0],  # no valid token: nothing, not even the score
    ])
    expect = torch.tensor([
        [-0.05, -0.1, 0.85, 0.0],
        [0.0, -0.1, 0.0, 1.8],
        [0.0, 0.0, 0.0, 0.0],
    ])
    for backend in CPU_BACKENDS:
        torch.testing.assert_close(token_rewards(scores, kl, mask, 0.5, backend=backend), expect)


# --------------------------------------------------------------------------- backends against the reference
def _masks(B, T, g):
    """Right-aligned (response then padding), left-aligned (padding then response), holes, empty rows."""
    lengths = torch.randint(0, T + 1, (B,), generator=g)
    pos = torch.arange(T)
    right = pos[None, :] < lengths[:, None]
    left = pos[None, :] >= (T - lengths)[:, None]
    holes = right & (torch.rand(B, T, generator=g) < 0.7)
    empty = holes.clone()
    empty[::2] = False
    return {"right": right, "left": left, "holes": holes, "empty_rows": empty}


def _check_kl(backend, shape, dtype, estimator, clamp):
    g = torch.Generator().manual_seed(1)
    lp = (torch.randn(shape, generator=g) * 3).to(dtype)
    rf = (torch.randn(shape, generator=g) * 3).to(dtype)
    ref = kl_penalty_reference(lp, rf, estimator, clamp)
    got = kl_penalty(lp, rf, estimator, clamp, backend=backend)
    assert got.dtype == torch.float32 and got.shape == lp.shape
    assert_close(got, ref, torch.float32)  # same rounded inputs, both in fp32
    a, b = lp.clone().requires_grad_(True), rf.clone().requires_grad_(True)
    c, d = lp.clone().requires_grad_(True), rf.clone().requires_grad_(True)
    up = torch.randn(shape, generator=g)
    (kl_penalty(a, b, estimator, clamp, backend=backend) * up).sum().backward()
    (kl_penalty_reference(c, d, estimator, clamp) * up).sum().backward()
    assert a.grad.dtype == dtype and b.grad.dtype == dtype
    assert_close(a.grad, c.grad, dtype)
    assert_close(b.grad, d.grad, dtype)


def _check_token_rewards(backend, B, T, dtype):
    g = torch.Generator().manual_seed(2)
    scores = torch.randn(B, generator=g).to(dtype)
    kl = torch.randn(B, T, generator=g).to(dtype)
    for name, mask in _masks(B, T, g).items():
        got = token_rewards(scores, kl, mask, 0.05, backend=backend)
        assert got.dtype == torch.float32
        assert_close(got, token_rewards_reference(scores, kl, mask, 0.05), torch.float32, msg=name)


@needs_ext
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("estimator", KL_ESTIMATORS)
@pytest.mark.parametrize("shape", [(1,), (1, 1), (5, 37), (3, 7000), (0, 4)])
def test_cpp_kl_matches_reference(shape, dtype, estimator):
    _check_kl("cpp", shape, dtype, estimator, 10.0)
    _check_kl("cpp", shape, dtype, estimator, 0.5)


@needs_ext
@pytest.mark.parametrize("estimator", KL_ESTIMATORS)
def test_cpp_kl_matches_reference_openmp_path(estimator):
    _check_kl("cpp", (16, 70000), torch.float32, estimator, 10.0)  # >= 2^20 elements: threaded


@needs_ext
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("B,T", [(1, 1), (1, 9), (7, 1), (6, 37), (1040, 1024), (0, 5), (3, 0)])
def test_cpp_token_rewards_matches_reference(B, T, dtype):
    _check_token_rewards("cpp", B, T, dtype)


@pytest.mark.interpret
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("estimator", KL_ESTIMATORS)
def test_triton_kl_matches_reference(dtype, estimator):
    for shape in [(1,), (5, 37), (3, 700)]:
        _check_kl("triton", shape, dtype, estimator, 10.0)
        _check_kl("triton", shape, dtype, estimator, 0.5)


@pytest.mark.interpret
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_token_rewards_matches_reference(dtype):
    for B, T in [(1, 1), (7, 1), (6, 37), (5, 1300)]:
        _check_token_rewards("triton", B, T, dtype)


@pytest.mark.interpret
def test_triton_hand_worked():
    got = kl_penalty(LOGP, REF, "k3", backend="triton")
    torch.testing.assert_close(got, torch.tensor(HAND["k3"]), atol=1e-6, rtol=1e-6)
    tr = token_rewards(torch.tensor([1.0, 2.0]), torch.tensor([[0.1, 0.2, 0.3]] * 2),
                       torch.tensor([[1, 1, 0], [0, 0, 0]]), 0.5, backend="triton")
    torch.testing.assert_close(tr, torch.tensor([[-0.05, 0.9, 0.0], [0.0, 0.0, 0.0]]))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_k3_small_ratios_keep_their_digits(backend):
    # e^-r - 1 + r at r = ±1e-4 is about r²/2 = 5e-9; the naive fp32 formula gives 0 or a multiple
    # of 6e-8 (the spacing of fp32 near 1). Expected values in double from the fp32 inputs.
    r = torch.tensor([1e-4, -1e-4])
    expect = torch.expm1(-r.double()) + r.double()
    got = kl_penalty(r, torch.zeros(2), "k3", backend=backend)
    torch.testing.assert_close(got.double(), expect, rtol=2e-3, atol=0)


@needs_ext
def test_cpp_kl_allocates_only_the_output():
    lp, rf = torch.randn(64, 4096), torch.randn(64, 4096)
    with AllocationTracker() as t:
        kl_penalty(lp, rf, "k3", backend="cpp")
    assert t.peak_live_bytes <= 64 * 4096 * 4 + 4096, t.largest()


# --------------------------------------------------------------------------- bad input
def test_bad_input_names_the_argument():
    x = torch.randn(2, 3)
    with pytest.raises(ValueError, match=r"estimator must be one of \['k1', 'k2', 'k3', 'abs'\], got 'k4'"):
        kl_penalty(x, x, "k4")
    with pytest.raises(ValueError, match="clamp must be > 0, got 0"):
        kl_penalty(x, x, clamp=0)
    with pytest.raises(ValueError, match="clamp must be > 0"):
        kl_penalty(x, x, clamp=-1.0)
    with pytest.raises(ValueError, match=r"ref_logprobs must have the shape of logprobs \(2, 3\), got \(3, 2\)"):
        kl_penalty(x, torch.randn(3, 2))
    with pytest.raises(ValueError, match="logprobs must be float32, bfloat16 or float16"):
        kl_penalty(torch.ones(2, 3, dtype=torch.long), x)
    for backend in CPU_BACKENDS:
        with pytest.raises(ValueError, match="NaN or inf"):
            kl_penalty(torch.tensor([0.0, float("nan")]), torch.zeros(2), backend=backend)
    scores = torch.randn(2)
    with pytest.raises(ValueError, match=r"scores must have shape \[B\] = \(2,\), got \(3,\)"):
        token_rewards(torch.randn(3), x, torch.ones(2, 3), 0.1)
    with pytest.raises(ValueError, match="mask must have the shape of kl"):
        token_rewards(scores, x, torch.ones(2, 4), 0.1)
    with pytest.raises(ValueError, match="mask must hold only 0 and 1"):
        token_rewards(scores, x, torch.full((2, 3), 2.0), 0.1)
    with pytest.raises(ValueError, match="kl must be \\[B, T\\]"):
        token_rewards(scores, torch.randn(2), torch.ones(2), 0.1)
    with pytest.raises(ValueError, match="kl_coef must be >= 0"):
        token_rewards(scores, x, torch.ones(2, 3), -0.1)
    for backend in CPU_BACKENDS:
        bad = x.clone()
        bad[0, 1] = float("inf")
        with pytest.raises(ValueError, match="NaN or inf"):
            token_rewards(scores, bad, torch.ones(2, 3), 0.1, backend=backend)
        # a non-finite value on padding is ignored, like the reference ignores it
        out = token_rewards(scores, bad, torch.tensor([[1, 0, 0], [1, 1, 1]]), 0.1, backend=backend)
        assert torch.isfinite(out).all()


# --------------------------------------------------------------------------- veRL's names and straight-through estimators
VERL_NAMES = ("low_var_kl", "k1+", "k3+", "abs+", "low_var_kl+")


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_verl_aliases_are_our_estimators(backend):
    for alias, base in (("kl", "k1"), ("mse", "k2"), ("low_var_kl", "k3")):
        torch.testing.assert_close(kl_penalty(LOGP, REF, alias, backend=backend),
                                   kl_penalty(LOGP, REF, base, backend=backend), atol=0, rtol=0)
    torch.testing.assert_close(kl_penalty(LOGP, REF, "low_var_kl", backend=backend), torch.tensor(HAND["k3"]),
                               atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("name,base", [("k1+", "k1"), ("k3+", "k3"), ("low_var_kl+", "k3"), ("abs+", "abs")])
def test_straight_through_hand_worked(backend, name, base):
    # value: the base estimator with its clamps (HAND); gradient: that of r²/2 without any clamp, i.e.
    # d/d logp = r = [0, 1, -2, ln 2, 30, -30] (even where the value is clamped at ±10), d/d ref = -r.
    lp, rf = LOGP.clone().requires_grad_(True), REF.clone().requires_grad_(True)
    got = kl_penalty(lp, rf, name, backend=backend)
    torch.testing.assert_close(got.detach(), torch.tensor(HAND[base]), atol=1e-6, rtol=1e-6)
    got.backward(torch.full((6,), 2.0))
    torch.testing.assert_close(lp.grad, 2.0 * LOGP, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(rf.grad, -2.0 * LOGP, atol=1e-6, rtol=1e-6)


def _verl_kl(logprob, ref_logprob, name):
    """veRL core_algos.kl_penalty (forward value, then the '+' straight-through), restated."""
    base = name.rstrip("+")
    if base == "k1":
        forward = logprob - ref_logprob
    elif base == "abs":
        forward = (logprob - ref_logprob).abs()
    else:  # low_var_kl / k3
        kl = torch.clamp(ref_logprob - logprob, min=-20, max=20)
        forward = torch.clamp(torch.exp(kl) - kl - 1, min=-10, max=10)
    if not name.endswith("+"):
        return forward
    backward = 0.5 * (logprob - ref_logprob).square()
    return backward - backward.detach() + forward.detach()


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("name", VERL_NAMES)
def test_matches_verl_formula(backend, name):
    g = torch.Generator().manual_seed(4)
    lp = (torch.randn(4, 33, generator=g) * 2).requires_grad_(True)  # |r| up to ~10: some k3 values clamp
    rf = (torch.randn(4, 33, generator=g) * 2).requires_grad_(True)
    a, b = lp.detach().clone().requires_grad_(True), rf.detach().clone().requires_grad_(True)
    up = torch.randn(4, 33, generator=g)
    want = _verl_kl(lp, rf, name)
    # k1 and abs: veRL does not clamp the value; ours does at ±clamp: a large clamp compares the formulas
    got = kl_penalty(a, b, name, clamp=1e6 if name[:2] in ("k1", "ab") else 10.0, backend=backend)
    torch.testing.assert_close(got, want.detach(), atol=1e-5, rtol=1e-5)
    (want * up).sum().backward()
    (got * up).sum().backward()
    torch.testing.assert_close(a.grad, lp.grad, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(b.grad, rf.grad, atol=1e-5, rtol=1e-5)


@needs_ext
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", VERL_NAMES)
def test_cpp_verl_names_match_reference(dtype, name):
    _check_kl("cpp", (5, 37), dtype, name, 10.0)
    _check_kl("cpp", (3, 700), dtype, name, 0.5)


@pytest.mark.interpret
@pytest.mark.parametrize("name", VERL_NAMES)
def test_triton_verl_names_match_reference(name):
    _check_kl("triton", (5, 37), torch.float32, name, 0.5)
    _check_kl("triton", (3, 70), torch.bfloat16, name, 10.0)
    if name == "k3+":
        test_straight_through_hand_worked("triton", "k3+", "k3")


def test_straight_through_names_refused_where_meaningless():
    with pytest.raises(ValueError, match=r"estimator must be one of .*got 'k2\+'"):
        kl_penalty(LOGP, REF, "k2+")
    with pytest.raises(ValueError, match=r"got 'k3\+\+'"):
        kl_penalty(LOGP, REF, "k3++")
