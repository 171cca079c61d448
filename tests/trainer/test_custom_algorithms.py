"""The trainer looks its advantage estimator, policy loss and KL estimator up by name: an algorithm that
matches no built-in trains through PPOTrainer with no edit to the trainer, and its outputs drive the update."""
from __future__ import annotations

import pytest
import torch

from rlhf_fast import algos
from rlhf_fast.trainer import PPOConfig, PPOTrainer
from tests.trainer.tiny import count_token_reward, make_tokenizer, prompt_rows, tiny_policy

V = 32


@pytest.fixture
def custom_algorithms():
    """A sequence-level estimator whose advantage is a constant set by the test (no group baseline, unlike
    every built-in), and a policy loss that is REINFORCE on those advantages (no ratio, no clip), recording
    what it was given. Both are removed afterwards."""
    record = {"estimator": [], "loss": [], "advantage": 1.0}

    def constant_advantages(scores, num_generations, *, offset=0.0):
        out = torch.full_like(scores, record["advantage"] + offset)
        record["estimator"].append(out)
        return out

    def reinforce_loss(logprobs, old_logprobs, advantages, mask, **kw):
        record["loss"].append(advantages.detach().clone())
        m = mask.to(logprobs.dtype)
        loss = -(advantages * logprobs * m).sum() / kw["num_tokens"].clamp_min(1).sum()
        zero = torch.zeros((), device=logprobs.device)
        return loss, type("Stats", (), {"approx_kl": zero, "clipfrac": zero, "ratio_mean": zero + 1})()

    algos.register_advantage_estimator("test-constant-seq", level="sequence", kl_in_reward=False,
                                       config_kwargs=(("offset", "lam"),))(constant_advantages)
    algos.register_policy_loss("test-reinforce")(reinforce_loss)
    try:
        yield record
    finally:
        algos.ADVANTAGE_ESTIMATORS._entries.pop("test-constant-seq", None)
        algos.ESTIMATOR_SPECS.pop("test-constant-seq", None)
        algos.POLICY_LOSSES._entries.pop("test-reinforce", None)


def _trainer(tmp_path, **kw) -> PPOTrainer:
    cfg = dict(output_dir=str(tmp_path / "out"), use_cpu=True, bf16=False, per_device_train_batch_size=8,
               gradient_accumulation_steps=1, num_mini_batches=1, num_ppo_epochs=1, total_episodes=8,
               response_length=5, learning_rate=1e-2, logging_steps=1, save_strategy="no", report_to="none",
               num_sample_generations=0, kl_coef=0.0, temperature=1.0, disable_tqdm=True,
               gradient_checkpointing=False, seed=3, advantage_estimator="test-constant-seq", num_generations=2,
               policy_loss="test-reinforce", lam=0.0, max_grad_norm=0.0)
    cfg.update(kw)
    return PPOTrainer(PPOConfig(**cfg), make_tokenizer(V), tiny_policy(V), None, count_token_reward("t5"),
                      prompt_rows(16, V))


def _policy_delta(tr: PPOTrainer) -> dict[str, torch.Tensor]:
    before = {n: p.detach().clone() for n, p in tr.model.named_parameters()}
    tr.train()
    return {n: p.detach() - before[n] for n, p in tr.model.named_parameters()}


def test_unregistered_names_are_refused(tmp_path):
    with pytest.raises(ValueError, match="advantage_estimator='test-constant-seq' is not registered"):
        _trainer(tmp_path)


def test_a_registered_estimator_and_policy_loss_drive_the_update(tmp_path, custom_algorithms):
    tr = _trainer(tmp_path, lam=0.5)
    assert tr.critic_mode == "none" and tr.model.value_head is None  # the spec says: no critic
    delta = _policy_delta(tr)
    # The estimator ran once per step, with its config kwarg (offset <- lam = 0.5), and its per-sequence
    # output (1 + 0.5) reached the policy loss broadcast over exactly the valid response tokens.
    assert len(custom_algorithms["estimator"]) == 1
    seen = custom_algorithms["loss"][0]
    mask = tr._last_rollout.response_mask
    torch.testing.assert_close(seen, mask.float()[:, :seen.shape[1]] * 1.5)
    assert any(d.abs().max() > 0 for d in delta.values())

    # Advantage 0: the REINFORCE loss has zero gradient, so no weight moves (SGD-like AdamW: no decay on 0 grads).
    custom_algorithms["estimator"].clear()
    custom_algorithms["loss"].clear()
    custom_algorithms["advantage"] = 0.0
    still = _policy_delta(_trainer(tmp_path / "zero", weight_decay=0.0))
    assert all(d.abs().max() == 0 for d in still.values())

    # Advantage -1: the update goes exactly the other way (first AdamW step: -lr * sign(grad) per weight).
    custom_algorithms["advantage"] = -1.0
    neg = _policy_delta(_trainer(tmp_path / "neg", weight_decay=0.0))
    custom_algorithms["advantage"] = 1.0
    pos = _policy_delta(_trainer(tmp_path / "pos", weight_decay=0.0))
    moved = [n for n, d in pos.items() if d.abs().max() > 0]
    assert moved
    for n in moved:
        torch.testing.assert_close(neg[n], -pos[n], rtol=1e-5, atol=1e-7)


def test_the_kl_estimator_is_looked_up_by_name(tmp_path, custom_algorithms):
    """A KL estimator registered by the test shapes the rewards of an estimator that keeps KL in the reward."""
    calls = []

    def doubled_k1(logprobs, ref_logprobs, clamp=10.0, backend=None):
        calls.append(1)
        return 2.0 * (logprobs - ref_logprobs)

    algos.register_kl_estimator("test-2k1")(doubled_k1)
    try:
        tr = _trainer(tmp_path, advantage_estimator="reinforce_pp", policy_loss="ppo", kl_coef=0.1,
                      kl_estimator="test-2k1")
        tr.train()
        assert calls and tr.reference_mode == "frozen"
        h = tr.state.log_history[-1]
        assert h["objective/non_score_reward"] == pytest.approx(-0.1 * h["objective/kl"], abs=1e-6)
    finally:
        algos.KL_ESTIMATORS._entries.pop("test-2k1", None)



def test_the_grpo_family_losses_train_through_the_ppo_trainer(tmp_path):
    """ops/policy_losses' registered entries follow the trainer's calling convention. On-policy (one epoch,
    one mini-batch: ratio 1) with one advantage per sequence, clip, GSPO, GSPO-token, CISPO and SAPO all
    have the gradient -A per token (times the aggregation weight): the gradient the trainer's loss sends
    to the log-probs must be the one "ppo" sends."""

    def distinct_words(prompts, completions):  # varies within a group: non-zero GRPO advantages
        return [float(len(set(c.split()))) for c in completions]

    def logprob_grads(name):
        grads, loss_fn = [], algos.get_policy_loss(name)

        def recording(logprobs, *args, **kw):
            logprobs.register_hook(lambda g: grads.append(g.detach().clone()))
            return loss_fn(logprobs, *args, **kw)

        algos.register_policy_loss("test-recording", overwrite=True)(recording)
        try:
            cfg = dict(output_dir=str(tmp_path / name), use_cpu=True, bf16=False, per_device_train_batch_size=4,
                       gradient_accumulation_steps=1, num_mini_batches=1, num_ppo_epochs=1, total_episodes=8,
                       response_length=5, learning_rate=1e-2, logging_steps=1, save_strategy="no",
                       report_to="none", num_sample_generations=0, kl_coef=0.0, temperature=1.0, disable_tqdm=True,
                       gradient_checkpointing=False, seed=3, advantage_estimator="grpo", num_generations=2,
                       policy_loss="test-recording", max_grad_norm=0.0)
            PPOTrainer(PPOConfig(**cfg), make_tokenizer(V), tiny_policy(V), None, distinct_words,
                       prompt_rows(16, V)).train()
        finally:
            algos.POLICY_LOSSES._entries.pop("test-recording", None)
        return grads

    want = logprob_grads("ppo")
    assert want and any(g.abs().max() > 0 for g in want)
    for name in ("clip", "gspo", "gspo_token", "cispo", "sapo"):
        got = logprob_grads(name)
        assert len(got) == len(want), name
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w, atol=1e-7, rtol=1e-5, msg=name)
