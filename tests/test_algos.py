"""rlhf_fast.algos: built-in entries resolve to the ops, registering is one decorator, unknown
names list the valid ones."""
import pytest
import torch

from rlhf_fast import algos


def test_builtin_names():
    assert "gae" in algos.list_advantage_estimators()
    assert "ppo" in algos.list_policy_losses()
    assert set(algos.list_kl_estimators()) >= {"k1", "k2", "k3", "abs"}


def test_policy_loss_ppo_is_the_fused_op():
    from rlhf_fast.ops.ppo_loss import ppo_policy_loss

    fn = algos.get_policy_loss("ppo")
    assert fn is ppo_policy_loss
    lp = torch.tensor([[0.0, 0.5]], requires_grad=True)
    loss, stats = fn(lp, torch.zeros(1, 2), torch.tensor([[1.0, -1.0]]), torch.ones(1, 2), dual_clip=2.0)
    # t0: ratio 1 -> -1; t1: ratio e^0.5 ≈ 1.6487, A = -1: max(1.6487, 1.2) = 1.6487 < cap 2 -> 1.6487
    assert loss.item() == pytest.approx((-1.0 + 1.6487212707) / 2, rel=1e-6)


def test_advantage_estimator_gae_is_the_op():
    from rlhf_fast.ops.gae import gae

    fn = algos.get_advantage_estimator("gae")
    assert fn is gae
    # one row, gamma = lam = 1, values 0: advantages are reward-to-go: [1 + 2, 2]
    out = fn(torch.tensor([[1.0, 2.0]]), torch.zeros(1, 2), torch.ones(1, 2), gamma=1.0, lam=1.0)
    assert out[0].tolist() == [[3.0, 2.0]]


@pytest.mark.parametrize("name", ["k1", "k2", "k3", "abs"])
def test_kl_estimators_map_to_kl_penalty(name):
    from rlhf_fast.ops.kl import kl_penalty

    logp = torch.tensor([[-1.0, -2.0, -0.5]])
    ref = torch.tensor([[-1.5, -1.0, -0.5]])
    got = algos.get_kl_estimator(name)(logp, ref)
    torch.testing.assert_close(got, kl_penalty(logp, ref, estimator=name))
    # r = logp - ref = [0.5, -1, 0]; hand-worked per estimator
    r = torch.tensor([[0.5, -1.0, 0.0]])
    want = {"k1": r, "k2": r * r / 2, "k3": torch.exp(-r) - 1 + r, "abs": r.abs()}[name]
    torch.testing.assert_close(got, want)


def test_unknown_name_lists_valid_ones():
    with pytest.raises(ValueError, match=r"unknown policy loss 'ppo2'; valid names: .*ppo"):
        algos.get_policy_loss("ppo2")
    with pytest.raises(ValueError, match=r"unknown advantage estimator 'grpo2'; valid names: .*gae"):
        algos.get_advantage_estimator("grpo2")
    with pytest.raises(ValueError, match=r"unknown KL estimator 'k4'; valid names: abs, abs\+, k1, k1\+, k2, k3, k3\+, "
                                         r"low_var_kl, low_var_kl\+"):
        algos.get_kl_estimator("k4")


def test_registering_is_one_decorator():
    reg = algos.ADVANTAGE_ESTIMATORS
    try:
        @algos.register_advantage_estimator("test-constant")
        def constant(rewards, mask, **_):
            return torch.where(mask.bool(), torch.ones_like(rewards), torch.zeros_like(rewards))

        assert "test-constant" in algos.list_advantage_estimators()
        assert algos.get_advantage_estimator("test-constant") is constant
        with pytest.raises(ValueError, match="already registered"):
            algos.register_advantage_estimator("test-constant")(constant)
        algos.register_advantage_estimator("test-constant", overwrite=True)(constant)
    finally:
        reg._entries.pop("test-constant", None)


def test_registry_rejects_bad_entries():
    reg = algos.Registry("thing")
    with pytest.raises(ValueError, match="thing name must be a non-empty string"):
        reg.register("")
    with pytest.raises(TypeError, match="must be a callable or a 'module:attribute' path"):
        reg.register("x", 42)
    reg.register("lazy", "math:sqrt")
    import math

    assert reg.get("lazy") is math.sqrt


def test_policy_loss_registry_accepts_the_ppo_signature():
    @algos.register_policy_loss("test-ppo-doubled")
    def doubled(logprobs, old_logprobs, advantages, mask, **kw):
        loss, stats = algos.get_policy_loss("ppo")(logprobs, old_logprobs, advantages, mask, **kw)
        return 2 * loss, stats

    try:
        args = (torch.zeros(1, 2), torch.zeros(1, 2), torch.ones(1, 2), torch.ones(1, 2))
        kw = dict(clip_low=0.2, clip_high=0.28, dual_clip=3.0, agg="seq-mean-token-sum")
        base, _ = algos.get_policy_loss("ppo")(*args, **kw)
        got, _ = algos.get_policy_loss("test-ppo-doubled")(*args, **kw)
        assert got.item() == 2 * base.item() == -4.0  # ratio 1, A = 1: -1 per token, row sum -2
    finally:
        algos.POLICY_LOSSES._entries.pop("test-ppo-doubled", None)


def test_grpo_family_and_verl_kl_names_are_registered():
    assert {"clip", "gspo", "gspo_token", "cispo", "sapo"} <= set(algos.list_policy_losses())
    logp = torch.tensor([[-1.0, -2.0, -0.5]], requires_grad=True)
    ref = torch.tensor([[-1.5, -1.0, -0.5]])
    r = torch.tensor([[0.5, -1.0, 0.0]])
    torch.testing.assert_close(algos.get_kl_estimator("low_var_kl")(logp, ref).detach(), torch.exp(-r) - 1 + r)
    est = algos.get_kl_estimator("k3+")(logp, ref)
    torch.testing.assert_close(est.detach(), torch.exp(-r) - 1 + r)
    est.sum().backward()
    torch.testing.assert_close(logp.grad, r)  # the straight-through gradient: that of r²/2
