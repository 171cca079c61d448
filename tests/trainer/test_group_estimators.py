"""PPOTrainer with the critic-free estimators (grpo / Dr.GRPO, rloo, reinforce_pp): issue 10.

Also a worker (``python -m tests.trainer.test_group_estimators OUT MODE``) for the DDP and resume
tests, which need a fresh process (torchrun) per run.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

import rlhf_fast.trainer.ppo_step as ppo_mod
from rlhf_fast.estimators import grpo_advantages, reinforce_pp_advantages, rloo_advantages
from rlhf_fast.ops.kl import kl_penalty, token_rewards
from rlhf_fast.trainer import PPOConfig, PPOTrainer, group_indices, group_reward_stats
from tests.trainer.test_checkpoint import load, run_worker
from tests.trainer.tiny import count_token_reward, make_tokenizer, prompt_rows, tiny_classifier, tiny_policy

V = 32
REPO = Path(__file__).resolve().parents[2]


def gconfig(tmp_path, **kw) -> PPOConfig:
    base = dict(output_dir=str(tmp_path / "out"), use_cpu=True, bf16=False, per_device_train_batch_size=8,
                gradient_accumulation_steps=1, num_mini_batches=1, num_ppo_epochs=1, total_episodes=16,
                response_length=5, learning_rate=1e-3, logging_steps=1, save_strategy="no", report_to="none",
                num_sample_generations=0, kl_coef=0.0, temperature=1.0, disable_tqdm=True,
                gradient_checkpointing=False, seed=3, advantage_estimator="grpo", num_generations=4)
    base.update(kw)
    return PPOConfig(**base)


def gtrainer(tmp_path, reward=None, rows=None, policy=None, **kw) -> PPOTrainer:
    return PPOTrainer(gconfig(tmp_path, **kw), make_tokenizer(V), policy if policy is not None else tiny_policy(V),
                      None, reward or count_token_reward("t5"), rows or prompt_rows(24, V))


def spy(monkeypatch, obj, name, record):
    orig = getattr(obj, name)

    def wrapped(*a, **k):
        out = orig(*a, **k)
        record.append((a, k, out))
        return out

    monkeypatch.setattr(obj, name, wrapped)


# ----------------------------------------------------------------------------- configuration / bad input
def test_config_errors_name_the_fix(tmp_path):
    with pytest.raises(ValueError, match="valid:.*'grpo', 'rloo', 'reinforce_pp'"):
        gconfig(tmp_path, advantage_estimator="dapo")
    with pytest.raises(ValueError, match="rloo' needs num_generations >= 2.*set num_generations=2 or more"):
        gconfig(tmp_path, advantage_estimator="rloo", num_generations=1)
    with pytest.raises(ValueError, match=r"8 x 1 = 8 completions\) is not divisible by num_generations=3.*e\.g\. 6 or 9"):
        gconfig(tmp_path, num_generations=3)
    with pytest.raises(ValueError, match="leave critic='auto'"):
        gconfig(tmp_path, critic="separate")
    with pytest.raises(ValueError, match="GAE needs a value model"):
        gconfig(tmp_path, advantage_estimator="gae", num_generations=1, critic="none")
    with pytest.raises(ValueError, match="per-batch scaling is not supported"):
        gconfig(tmp_path, scale_rewards="batch")
    # a group of one is legal for grpo (A = s) and reinforce_pp
    assert gconfig(tmp_path, num_generations=1).num_generations == 1


def test_value_model_with_a_group_estimator_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="pass value_model=None"):
        PPOTrainer(gconfig(tmp_path), make_tokenizer(V), tiny_policy(V), None, count_token_reward(),
                   prompt_rows(24, V), value_model=tiny_classifier(V))


# ----------------------------------------------------------------------------- no critic, no reference at beta 0
@pytest.mark.parametrize("estimator", ["grpo", "rloo", "reinforce_pp"])
def test_the_critic_is_not_built(tmp_path, estimator):
    tr = gtrainer(tmp_path, advantage_estimator=estimator)
    assert tr.critic_mode == "none" and tr.model.value_head is None and tr.model.critic_backbone is None
    names = [n for n, _ in tr.model.named_parameters()]
    assert not any("value" in n or "critic" in n for n in names), names
    opt_params = {id(p) for g in tr.optimizer.param_groups for p in g["params"]}
    assert opt_params == {id(p) for p in tr.model.policy.parameters() if p.requires_grad}
    # kl_coef (beta) == 0: no reference model either
    assert tr.reference_mode == "none" and tr.model.reference is None
    tr.train()
    entry = tr.state.log_history[-1]
    assert "loss/value_avg" not in entry and "val/clipfrac_avg" not in entry
    for k in ("objective/scores", "objective/kl", "reward_std", "frac_reward_zero_std", "loss/policy_avg",
              "policy/approxkl_avg", "objective/entropy"):
        assert k in entry, k
    tr.save_model(str(tmp_path / "saved"))
    assert not (tmp_path / "saved" / "value_head.pt").exists()


def test_policy_value_model_without_critic(tmp_path):
    from rlhf_fast.models import PolicyValueModel

    pv = PolicyValueModel(tiny_policy(V), reference="none", critic="none")
    assert pv.value_head is None and pv.critic_backbone is None and "value_head" not in pv.components()
    assert not any("value" in n for n, _ in pv.named_parameters())
    ids = torch.randint(3, V, (2, 7))
    out = pv(ids, torch.ones_like(ids), response_start=3, return_values=True)
    assert out.values is None and out.logprobs.shape == (2, 4)
    pv.save_pretrained(tmp_path / "pv")
    assert not (tmp_path / "pv" / "value_head.pt").exists()
    again = PolicyValueModel.from_pretrained(tmp_path / "pv", reference="none", critic="none")
    assert again.value_head is None
    with pytest.raises(ValueError, match="critic must be one of"):
        PolicyValueModel(tiny_policy(V), reference="none", critic="nothing")


def test_beta_builds_a_reference(tmp_path):
    tr = gtrainer(tmp_path, kl_coef=0.04)
    assert tr.reference_mode == "frozen" and tr.model.reference is not None


# ----------------------------------------------------------------------------- groups and seeds
def test_group_indices_repeat_contiguously_with_distinct_rank_independent_seeds():
    rows, seeds = group_indices(torch.tensor([5, 2, 9]), 4, run_seed=1, round_index=0)
    assert rows.tolist() == [5] * 4 + [2] * 4 + [9] * 4
    assert len(set(seeds.tolist())) == 12
    # the seed of (prompt 2, generation j, round 0) does not depend on the other prompts in the batch
    rows2, seeds2 = group_indices(torch.tensor([2]), 4, run_seed=1, round_index=0)
    assert seeds2.tolist() == seeds[4:8].tolist()
    # another round, other seeds
    _, seeds3 = group_indices(torch.tensor([2]), 4, run_seed=1, round_index=1)
    assert not set(seeds3.tolist()) & set(seeds2.tolist())


def _rollouts(monkeypatch, tmp_path, **kw):
    calls = []
    spy(monkeypatch, ppo_mod, "generate_rollout", calls)
    tr = gtrainer(tmp_path, **kw)
    tr.train()
    return calls


def test_rows_of_a_group_share_the_prompt_and_differ_in_samples(monkeypatch, tmp_path):
    calls = _rollouts(monkeypatch, tmp_path, response_length=8)
    assert len(calls) == 2
    for (args, kwargs, rollout) in calls:
        prompt_ids = args[1]
        assert prompt_ids.shape[0] == 8
        for g in range(2):
            block = prompt_ids[4 * g:4 * g + 4]
            assert (block == block[0]).all()
            responses = {tuple(r.tolist()) for r in rollout.responses[4 * g:4 * g + 4]}
            assert len(responses) > 1  # 4 samples of 8 tokens over 32 words: identical rows mean shared seeds
        seeds = kwargs["seeds"]
        assert len(set(seeds.tolist())) == 8
    again = _rollouts(monkeypatch, tmp_path / "again", response_length=8)
    for (_, _, r1), (_, _, r2) in zip(calls, again[-2:]):
        assert torch.equal(r1.responses, r2.responses)


# ----------------------------------------------------------------------------- advantages = the estimator functions
@pytest.mark.parametrize("estimator, scale", [("grpo", True), ("grpo", False), ("rloo", True), ("reinforce_pp", True)])
def test_trainer_advantages_equal_the_estimators(monkeypatch, tmp_path, estimator, scale):
    scored, updates = [], []
    spy(monkeypatch, ppo_mod, "score_rollout", scored)
    orig_update = PPOTrainer._update

    def update(self, rollout, prompt_mask, fwd, adv, first_out=None):
        updates.append((rollout, fwd, adv))
        return orig_update(self, rollout, prompt_mask, fwd, adv)

    monkeypatch.setattr(PPOTrainer, "_update", update)
    kl = 0.1 if estimator == "reinforce_pp" else 0.0
    def dense(prompts, completions):  # distinct scores within a group, so the check is not on zeros
        return [sum(int(w[1:]) for w in c.split()) / 100.0 for c in completions]

    tr = gtrainer(tmp_path, reward=dense, advantage_estimator=estimator, scale_rewards=scale, kl_coef=kl,
                  gamma=0.9, total_episodes=8, response_length=6)
    tr.train()
    (_, _, scores), = scored
    (rollout, fwd, adv), = updates
    mask = rollout.response_mask
    if estimator == "reinforce_pp":
        assert fwd.ref_logprobs is not None and fwd.logprobs is not None
        kl_tok = kl_penalty(fwd.logprobs, fwd.ref_logprobs, estimator="k1") * mask
        expected = reinforce_pp_advantages(token_rewards(scores, kl_tok, mask, 0.1), mask, gamma=0.9)
    else:
        per_seq = grpo_advantages(scores, 4, scale_by_std=scale) if estimator == "grpo" \
            else rloo_advantages(scores, 4)
        expected = per_seq.unsqueeze(1) * mask
    assert scores.std() > 0, "degenerate test: all scores equal"
    torch.testing.assert_close(adv.advantages, expected, atol=1e-6, rtol=1e-5)
    assert adv.returns is None and fwd.values is None


def test_group_reward_stats():
    s = torch.tensor([1.0, 1.0, 1.0, 1.0, 0.0, 1.0, 0.0, 1.0])
    st = group_reward_stats(s, 4)
    assert st["frac_reward_zero_std"] == 0.5
    assert st["reward_std"] == pytest.approx(0.5 * float(torch.tensor([0.0, 1.0, 0.0, 1.0]).std()))


# ----------------------------------------------------------------------------- the KL loss term
def _grad_norm_after_one_update(monkeypatch, tmp_path, kl_coef):
    """Constant reward -> every GRPO advantage is 0, so the policy-gradient term is exactly 0 and any
    gradient comes from the KL term. The policy is perturbed after the reference copy is taken, so
    k3's gradient (0 where policy == reference) is not 0."""
    norms = []
    orig = PPOTrainer._clip_grads

    def clip(self):
        n = orig(self)
        norms.append(float(n))
        return n

    monkeypatch.setattr(PPOTrainer, "_clip_grads", clip)
    tr = gtrainer(tmp_path, reward=lambda prompts, completions: [1.0] * len(completions), kl_coef=kl_coef,
                  reference="frozen", total_episodes=8)
    with torch.no_grad():
        g = torch.Generator().manual_seed(0)
        for p in tr.model.policy.parameters():
            p.add_(0.2 * torch.randn(p.shape, generator=g))
    tr.train()
    return norms[0], tr.state.log_history[-1]


def test_kl_loss_gradient_present_only_with_beta(monkeypatch, tmp_path):
    with_beta, log_b = _grad_norm_after_one_update(monkeypatch, tmp_path / "b", 0.1)
    without, log_0 = _grad_norm_after_one_update(monkeypatch, tmp_path / "z", 0.0)
    assert without == 0.0
    assert with_beta > 1e-4
    assert log_b["kl"] > 0 and log_b["objective/kl"] > 0 and "kl" not in log_0
    # objective/kl (summed per sequence) and kl (per token) describe the same k3 values
    assert log_b["objective/non_score_reward"] == pytest.approx(-0.1 * log_b["objective/kl"], rel=1e-5)


# ----------------------------------------------------------------------------- learning
@pytest.mark.parametrize("estimator, extra", [
    ("grpo", {}),
    ("rloo", {}),
    ("reinforce_pp", {"kl_coef": 0.01}),
])
def test_reward_rises(tmp_path, estimator, extra):
    """Reward = share of response words equal to t5 (chance 1/32); 16 completions (4 prompts x 4) per step."""
    tr = PPOTrainer(
        gconfig(tmp_path, advantage_estimator=estimator, per_device_train_batch_size=16, total_episodes=16 * 15,
                response_length=8, learning_rate=1e-2, num_ppo_epochs=4, **extra),
        make_tokenizer(V), tiny_policy(V), None, count_token_reward("t5"), prompt_rows(64, V))
    tr.train()
    scores = [h["objective/scores"] for h in tr.state.log_history]
    assert len(scores) == 15
    assert sum(scores[-3:]) / 3 > sum(scores[:3]) / 3 + 0.15, scores


def test_on_policy_update_skips_the_rollout_policy_forward(monkeypatch, tmp_path):
    fwds = []
    spy(monkeypatch, ppo_mod, "rollout_forward", fwds)
    tr = gtrainer(tmp_path, total_episodes=8, kl_coef=0.05)
    tr.train()
    (_, kwargs, out), = fwds
    assert kwargs["need_policy"] is False and out.logprobs is None and out.ref_logprobs is not None
    assert tr.state.log_history[-1]["val/ratio"] == pytest.approx(1.0)


# ----------------------------------------------------------------------------- DDP and resume (subprocesses)
GRPO_RUN = ["--estimator", "grpo", "--mini", "1"]  # 2 epochs, so old log-probs come from the rollout


def _run(out, mode, *extra, nproc=1):
    run_worker(out, mode, *GRPO_RUN, *extra, nproc=nproc)
    return load(out, mode)


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed unavailable")
def test_grpo_ddp_matches_one_process_and_resumes_bit_identically(tmp_path):
    w1, h1 = _run(tmp_path / "single", "straight")
    w2, h2 = _run(tmp_path / "ddp", "straight", nproc=2)
    assert w1.keys() == w2.keys()
    for k in w1:
        torch.testing.assert_close(w1[k], w2[k], atol=2e-5, rtol=1e-4, msg=k)
    for x, y in zip(h1, h2):
        for k in ("objective/scores", "objective/kl", "reward_std", "frac_reward_zero_std", "episode"):
            assert x[k] == pytest.approx(y[k], rel=1e-4, abs=1e-5), k
    _run(tmp_path / "split", "first")
    w3, h3 = _run(tmp_path / "split", "resume")
    for k in w1:
        assert torch.equal(w1[k], w3[k]), k
    assert h1 == h3
