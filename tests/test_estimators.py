"""Critic-free advantage estimators: hand-worked values, edge cases, errors, and a bandit check that each
estimator's advantages push a REINFORCE step toward the better sample."""
from __future__ import annotations

import math

import pytest
import torch

from rlhf_fast import algos
from rlhf_fast._backend import HAS_EXT
from rlhf_fast.estimators import grpo_advantages, reinforce_pp_advantages, rloo_advantages
from rlhf_fast.ops import token_rewards

BACKENDS = ["torch"] + (["cpp"] if HAS_EXT else [])


def test_registered_by_name():
    assert algos.get_advantage_estimator("grpo") is grpo_advantages
    assert algos.get_advantage_estimator("rloo") is rloo_advantages
    assert algos.get_advantage_estimator("reinforce_pp") is reinforce_pp_advantages
    assert {"gae", "grpo", "rloo", "reinforce_pp"} <= set(algos.list_advantage_estimators())


def test_grpo_hand_worked():
    # group 0: [1, 2, 3] mean 2, unbiased std 1 -> [-1, 0, 1] / (1 + 1e-6)
    # group 1: [0, 0, 6] mean 2, unbiased std sqrt((4 + 4 + 16) / 2) = sqrt(12)
    scores = torch.tensor([1.0, 2.0, 3.0, 0.0, 0.0, 6.0])
    got = grpo_advantages(scores, num_generations=3)
    s12 = math.sqrt(12.0)
    want = torch.tensor([-1.0, 0.0, 1.0, -2.0 / (s12 + 1e-6), -2.0 / (s12 + 1e-6), 4.0 / (s12 + 1e-6)]) / torch.tensor(
        [1 + 1e-6] * 3 + [1.0] * 3)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)
    assert got.dtype == torch.float32 and got.shape == (6,)
    # Dr.GRPO: only the group mean is subtracted
    torch.testing.assert_close(grpo_advantages(scores, 3, scale_by_std=False),
                               torch.tensor([-1.0, 0.0, 1.0, -2.0, -2.0, 4.0]))


def test_grpo_equal_scores_give_zero_not_nan():
    got = grpo_advantages(torch.tensor([5.0, 5.0, -1.0, 3.0]), num_generations=2)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got[:2], torch.zeros(2))
    # [-1, 3]: mean 1, unbiased std sqrt(8) -> ±2/sqrt(8)
    torch.testing.assert_close(got[2:], torch.tensor([-2.0, 2.0]) / (math.sqrt(8.0) + 1e-6))


def test_grpo_group_of_one_uses_mean_zero_std_one():
    scores = torch.tensor([0.5, -2.0, 3.0], dtype=torch.bfloat16)
    for scale in (True, False):
        got = grpo_advantages(scores, num_generations=1, scale_by_std=scale)
        assert got.dtype == torch.float32
        torch.testing.assert_close(got, scores.float(), rtol=0, atol=0)  # A = s exactly (no eps)


def test_rloo_hand_worked_is_score_minus_mean_of_others():
    scores = torch.tensor([1.0, 2.0, 6.0, 4.0, 0.0, -4.0])
    got = rloo_advantages(scores, num_generations=3)
    want = torch.tensor([1 - 4.0, 2 - 3.5, 6 - 1.5, 4 - (-2.0), 0 - 0.0, -4 - 2.0])
    torch.testing.assert_close(got, want)
    # the n/(n-1) form
    grouped = scores.reshape(2, 3)
    torch.testing.assert_close(got, (3 / 2 * (grouped - grouped.mean(1, keepdim=True))).reshape(-1))
    torch.testing.assert_close(rloo_advantages(torch.tensor([3.0, 1.0]), 2), torch.tensor([2.0, -2.0]))


@pytest.mark.parametrize("fn", [grpo_advantages, rloo_advantages])
def test_sequence_estimator_errors(fn):
    name = fn.__name__.split("_")[0]
    with pytest.raises(ValueError, match=rf"{name}: the batch of 5 scores is not divisible by num_generations=2.*multiple of 2"):
        fn(torch.zeros(5), 2)
    with pytest.raises(ValueError, match=r"1-D \[B\]"):
        fn(torch.zeros(2, 2), 2)
    with pytest.raises(ValueError, match="scores must be float32, bfloat16 or float16, got torch.int64"):
        fn(torch.zeros(4, dtype=torch.long), 2)
    with pytest.raises(TypeError, match="num_generations must be an int"):
        fn(torch.zeros(4), 2.0)
    with pytest.raises(ValueError, match="scores.*(NaN|nan|finite)"):
        fn(torch.tensor([0.0, float("nan")]), 2)
    with pytest.raises(ValueError, match=r"needs num_generations >= [12], got 0"):
        fn(torch.zeros(4), 0)


def test_rloo_needs_two_generations():
    with pytest.raises(ValueError, match=r"rloo needs num_generations >= 2, got 1: sample at least 2 responses"):
        rloo_advantages(torch.zeros(4), 1)


@pytest.mark.parametrize("backend", BACKENDS)
def test_reinforce_pp_hand_worked(backend):
    # row 0: 3 valid tokens then padding; row 1: a hole at t=1 (e.g. tool output) and 4 tokens in all.
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 0, 1, 1, 1]], dtype=torch.bool)
    rewards = torch.tensor([[0.1, -0.2, 1.0, 9.0, 9.0], [0.0, 7.0, 0.5, 0.0, 2.0]])  # garbage under the mask
    gamma = 0.5
    # row 0: G2 = 1, G1 = -0.2 + 0.5·1 = 0.3, G0 = 0.1 + 0.5·0.3 = 0.25 (padding adds nothing)
    # row 1: G4 = 2, G3 = 0 + 1 = 1, G2 = 0.5 + 0.5 = 1, hole skipped, G0 = 0 + 0.5·1 = 0.5
    returns = torch.tensor([[0.25, 0.3, 1.0, 0, 0], [0.5, 0, 1.0, 1.0, 2.0]])
    valid = returns[mask]
    mean, std = valid.mean(), valid.std(unbiased=True)
    want = torch.where(mask, (returns - mean) / torch.sqrt(std**2 + 1e-8), torch.zeros(()))
    got = reinforce_pp_advantages(rewards, mask, gamma=gamma, backend=backend)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert got.dtype == torch.float32 and (got[~mask] == 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_reinforce_pp_from_token_rewards_left_padded(backend):
    # Left padding: the score sits on the last valid token, nothing leaks into the padding before.
    mask = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1]], dtype=torch.bool)
    kl = torch.tensor([[5.0, 5.0, 0.2, 0.4], [0.1, 0.1, 0.1, 0.1]])
    scores = torch.tensor([1.0, -1.0])
    r = token_rewards(scores, kl, mask, kl_coef=0.5)
    got = reinforce_pp_advantages(r, mask, gamma=1.0, backend=backend)
    # returns with gamma = 1: row 0: [_, _, -0.1 + (-0.2 + 1), -0.2 + 1] = [0.7, 0.8];
    # row 1: per token -0.05, last + (-1): G = [-1.2, -1.15, -1.1, -1.05]
    ret = torch.tensor([[0, 0, 0.7, 0.8], [-1.2, -1.15, -1.1, -1.05]])
    v = ret[mask]
    want = torch.where(mask, (ret - v.mean()) / torch.sqrt(v.var() + 1e-8), torch.zeros(()))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_reinforce_pp_gamma_zero_and_errors():
    mask = torch.ones(2, 3, dtype=torch.bool)
    r = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    got = reinforce_pp_advantages(r, mask, gamma=0.0)  # returns are the rewards themselves
    torch.testing.assert_close(got, (r - r.mean()) / torch.sqrt(r.var() + 1e-8))
    with pytest.raises(ValueError, match=r"gamma must be a number in \[0, 1\], got 1.5"):
        reinforce_pp_advantages(r, mask, gamma=1.5)
    with pytest.raises(ValueError, match=r"token_rewards must be \[B, T\]"):
        reinforce_pp_advantages(r[0], mask[0])
    with pytest.raises(ValueError, match="mask"):
        reinforce_pp_advantages(r, mask[:, :2])
    # one valid token: whitening cannot scale, only shifts -> 0, never NaN
    one = reinforce_pp_advantages(r, torch.tensor([[0, 0, 1], [0, 0, 0]], dtype=torch.bool))
    assert torch.isfinite(one).all() and (one == 0).all()


# --------------------------------------------------------------------------- bandit checks
def _expected_score(logits, rewards):
    return (torch.softmax(logits, -1) * rewards).sum().item()


@pytest.mark.parametrize("estimator", ["grpo", "dr_grpo", "rloo"])
def test_one_reinforce_step_raises_expected_score(estimator):
    """A categorical policy over 6 arms; 4 prompts × 8 samples; one REINFORCE step with the estimator's
    advantages (−Σ A·log π(a)) must raise the expected score, and a step with negated advantages lowers it."""
    g = torch.Generator().manual_seed(0)
    arm_rewards = torch.tensor([0.0, 0.2, 1.0, -0.5, 0.3, 0.6])
    n, prompts = 8, 4

    def step(sign):
        logits = torch.zeros(6, requires_grad=True)
        actions = torch.multinomial(torch.softmax(logits.detach(), -1), n * prompts, replacement=True, generator=g)
        scores = arm_rewards[actions] + 0.05 * torch.randn(n * prompts, generator=g)
        if estimator == "rloo":
            adv = rloo_advantages(scores, n)
        else:
            adv = grpo_advantages(scores, n, scale_by_std=estimator == "grpo")
        loss = -(sign * adv * torch.log_softmax(logits, -1)[actions]).mean()
        loss.backward()
        with torch.no_grad():
            logits -= 0.5 * logits.grad
        return _expected_score(logits.detach(), arm_rewards)

    before = _expected_score(torch.zeros(6), arm_rewards)
    assert step(+1) > before + 1e-3
    assert step(-1) < before - 1e-3


def test_reinforce_pp_step_raises_expected_score():
    """Token-level bandit: 2-token responses from a per-position categorical policy; the score (on the last
    token) rewards arm 2 at both positions. A REINFORCE++ step raises the expected per-token reward."""
    g = torch.Generator().manual_seed(1)
    B, T, A = 64, 2, 4
    good = torch.tensor([0.0, 0.0, 1.0, 0.0])
    logits = torch.zeros(T, A, requires_grad=True)
    actions = torch.multinomial(torch.full((A,), 1.0 / A), B * T, replacement=True, generator=g).reshape(B, T)
    scores = good[actions].sum(1)
    mask = torch.ones(B, T, dtype=torch.bool)
    kl = torch.zeros(B, T)
    adv = reinforce_pp_advantages(token_rewards(scores, kl, mask, kl_coef=0.1), mask, gamma=1.0)
    logp = torch.log_softmax(logits, -1)[torch.arange(T).expand(B, T), actions]
    (-(adv * logp).mean()).backward()
    with torch.no_grad():
        new = logits - 1.0 * logits.grad
    before = (torch.softmax(torch.zeros(T, A), -1) * good).sum()
    after = (torch.softmax(new, -1) * good).sum()
    assert after > before + 1e-2
