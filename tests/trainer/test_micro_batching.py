"""Token-budget micro-batches and padding-free passes change memory and time, never the update: every way
of splitting a minibatch (rows per device x gradient accumulation, a token budget) and packed or padded
forwards give the same gradients (1e-6 relative) and, with plain SGD, the same weights after a step."""
from __future__ import annotations

from unittest import mock

import pytest
import torch

from rlhf_fast.trainer import PPOConfig, PPOTrainer, ppo_step, token_budget_micro_batches
from tests.trainer.tiny import count_token_reward, make_tokenizer, prompt_rows, tiny_policy

V = 32


def _one_step(tmp_path, **kw):
    cfg = dict(output_dir=str(tmp_path / "out"), use_cpu=True, bf16=False, per_device_train_batch_size=8,
               gradient_accumulation_steps=1, num_mini_batches=1, num_ppo_epochs=1, total_episodes=8,
               response_length=6, logging_steps=1, save_strategy="no", report_to="none", num_sample_generations=0,
               kl_coef=0.05, temperature=1.0, disable_tqdm=True, seed=3, stop_token="eos")
    cfg.update(kw)
    policy = tiny_policy(V)
    tr = PPOTrainer(PPOConfig(**cfg), make_tokenizer(V), policy, None, count_token_reward("t5"),
                    prompt_rows(16, V, min_len=2, max_len=9),
                    optimizers=(torch.optim.SGD([p for p in policy.parameters()], lr=0.5), None))
    grads = []
    orig = tr.optimizer.step

    def capture(*a, **k):
        grads.append(torch.cat([p.grad.flatten() for p in policy.parameters() if p.grad is not None]).clone())
        return orig(*a, **k)

    tr.optimizer.step = capture
    micro = []
    orig_micro = ppo_step.micro_step

    def count(rollout, masks, fwd, adv, idx, *a, **k):
        micro.append(len(idx))
        return orig_micro(rollout, masks, fwd, adv, idx, *a, **k)

    with mock.patch.object(ppo_step, "micro_step", count):
        tr.train()
    return grads[0], torch.cat([p.detach().flatten() for p in policy.parameters()]), micro


@pytest.mark.parametrize("split", [dict(per_device_train_batch_size=2, gradient_accumulation_steps=4),
                                   dict(per_device_train_batch_size=4, gradient_accumulation_steps=2),
                                   dict(micro_batch_token_budget=24), dict(micro_batch_token_budget=7),
                                   dict(padding_free=False), dict(padding_free=False, micro_batch_token_budget=24)])
def test_every_split_gives_the_same_update(tmp_path, split):
    g0, w0, micro0 = _one_step(tmp_path / "a")
    g1, w1, micro1 = _one_step(tmp_path / "b", **split)
    assert micro0 == [8] and sum(micro1) == 8
    if "padding_free" not in split or len(split) > 1:
        assert len(micro1) > 1, micro1  # the split really differs
    torch.testing.assert_close(g1, g0, rtol=1e-6, atol=1e-6 * float(g0.abs().max()))
    torch.testing.assert_close(w1, w0, rtol=1e-6, atol=1e-7)


def test_token_budget_micro_batches_balance_tokens():
    rows = torch.arange(8)
    tokens = torch.tensor([30, 5, 12, 12, 7, 30, 4, 20])  # 120 tokens
    parts = token_budget_micro_batches(rows, tokens, budget=40)
    assert len(parts) == 3  # ceil(120 / 40)
    assert sorted(torch.cat(parts).tolist()) == list(range(8))
    loads = sorted(int(tokens[p].sum()) for p in parts)
    assert loads[-1] - loads[0] <= 30  # longest first into the lightest: within one long row of each other
    assert len(token_budget_micro_batches(rows, tokens, budget=10)) == 8  # capped at one row each
    assert len(token_budget_micro_batches(rows, tokens, budget=10_000)) == 1
