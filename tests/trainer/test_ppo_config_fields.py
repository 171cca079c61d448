"""Every TRL 1.12 PPOConfig field a user sets has an effect a test can see."""
from __future__ import annotations

import math

import pytest
import torch

import rlhf_fast.ops.kl as kl_mod
import rlhf_fast.trainer.ppo_step as ppo_mod
from rlhf_fast import algos
from rlhf_fast.trainer import PPOConfig, PPOTrainer
from tests.trainer.test_ppo_trainer import V, config
from tests.trainer.tiny import (
    EOS,
    count_token_reward,
    make_tokenizer,
    prompt_rows,
    tiny_classifier,
    tiny_policy,
)


def make(tmp_path, reward=None, rows=None, policy=None, **kw) -> PPOTrainer:
    return PPOTrainer(config(tmp_path, **kw), make_tokenizer(V), policy if policy is not None else tiny_policy(V),
                      None, reward or count_token_reward("t5"), rows or prompt_rows(24, V))


def count_calls(monkeypatch, obj, name):
    calls = []
    orig = getattr(obj, name)

    def spy(*a, **k):
        calls.append((a, k))
        return orig(*a, **k)

    monkeypatch.setattr(obj, name, spy)
    return calls


def count_registry_calls(monkeypatch, registry, name):
    """Spy on the entry the trainer looks up by name in an rlhf_fast.algos registry."""
    calls = []
    orig = registry.get(name)

    def spy(*a, **k):
        calls.append((a, k))
        return orig(*a, **k)

    monkeypatch.setitem(registry._entries, name, spy)
    return calls


def test_output_dir(tmp_path):
    tr = make(tmp_path, output_dir=str(tmp_path / "elsewhere"))
    tr.train()
    assert (tmp_path / "elsewhere" / "metrics.jsonl").is_file()


def test_learning_rate(tmp_path):
    tr = make(tmp_path, learning_rate=0.0)
    before = {n: p.detach().clone() for n, p in tr.model.named_parameters()}
    tr.train()
    assert all(torch.equal(before[n], p) for n, p in tr.model.named_parameters())
    tr = make(tmp_path, learning_rate=1e-3)
    tr.train()
    assert tr.state.log_history[0]["lr"] == pytest.approx(1e-3)


@pytest.mark.parametrize("pdtbs, gas, mini, epochs", [(4, 2, 2, 1), (2, 4, 1, 2), (8, 1, 2, 3)])
def test_batch_fields_set_micro_and_optimizer_steps(tmp_path, monkeypatch, pdtbs, gas, mini, epochs):
    """per_device_train_batch_size, gradient_accumulation_steps, num_mini_batches, num_ppo_epochs."""
    tr = make(tmp_path, per_device_train_batch_size=pdtbs, gradient_accumulation_steps=gas, num_mini_batches=mini,
              num_ppo_epochs=epochs, total_episodes=pdtbs * gas)
    micro = count_calls(monkeypatch, ppo_mod, "micro_step")
    steps = count_calls(monkeypatch, tr.optimizer, "step")
    tr.train()
    assert tr.args.batch_size == pdtbs * gas and tr.state.global_step == 1
    local_mini = pdtbs * gas // mini
    assert len(steps) == epochs * mini
    assert len(micro) == epochs * mini * math.ceil(local_mini / pdtbs)
    assert all(len(a[4]) == min(pdtbs, local_mini) for a, _ in micro)  # micro-batch rows


def test_total_episodes_and_num_train_epochs(tmp_path):
    tr = make(tmp_path, total_episodes=24)  # batch 8 -> 3 steps
    tr.train()
    assert tr.state.global_step == 3 and tr.state.episode == 24
    tr = make(tmp_path, total_episodes=None, num_train_epochs=0.5)  # 24 prompts -> 12 episodes -> 2 steps
    assert tr.args.total_episodes == 12 and tr.args.num_total_batches == 2


def test_response_length(tmp_path, monkeypatch):
    rolls = count_calls(monkeypatch, ppo_mod, "generate_rollout")
    make(tmp_path, response_length=3, total_episodes=8).train()
    ro = ppo_mod.generate_rollout(*rolls[0][0], **rolls[0][1])
    assert ro.responses.shape[1] <= 3 and rolls[0][1]["response_length"] == 3


def _boost(policy, token_id, amount=50.0):
    with torch.no_grad():
        policy.lm_head.bias = None
        policy.lm_head.weight[token_id] *= 0
        policy.lm_head.weight[token_id] += amount * torch.sign(torch.randn(policy.lm_head.weight.shape[1]))
    return policy


def test_stop_token_eos_and_stop_token_id(tmp_path):
    tr = make(tmp_path, stop_token="eos", response_length=8, total_episodes=8)
    assert tr.stop_token_id == EOS
    tr = make(tmp_path, stop_token_id=7, response_length=8, total_episodes=8)
    assert tr.stop_token_id == 7
    tr.train()
    ro = tr._last_rollout
    for row, m in zip(ro.responses, ro.response_mask):
        hits = (row == 7).nonzero()
        if len(hits):
            assert not m[int(hits[0]) + 1:].any()
    tr = make(tmp_path, response_length=8, total_episodes=8)  # no stop token: full length
    tr.train()
    assert tr._last_rollout.response_mask.all()
    with pytest.raises(ValueError, match="either stop_token or stop_token_id"):
        config(tmp_path, stop_token="eos", stop_token_id=3)


def test_temperature_zero_is_greedy_and_scales_logprobs(tmp_path):
    same_prompt = [{"input_ids": [5, 9, 11]}] * 24
    greedy = make(tmp_path, rows=same_prompt, temperature=0.0, total_episodes=8)
    greedy.train()
    r = greedy._last_rollout.responses
    assert (r == r[0]).all()  # greedy: every copy of the prompt gets the same response
    sampled = make(tmp_path, rows=same_prompt, temperature=1.0, total_episodes=8)
    sampled.train()
    assert not (sampled._last_rollout.responses == sampled._last_rollout.responses[0]).all()
    def sharp():  # random init is near-uniform; sharpen the logits so temperature matters
        p = tiny_policy(V)
        with torch.no_grad():
            p.lm_head.weight *= 30
        return p

    hot = make(tmp_path, policy=sharp(), temperature=2.0, total_episodes=8)
    cold = make(tmp_path, policy=sharp(), temperature=0.5, total_episodes=8)
    hot.train()
    cold.train()
    assert hot.state.log_history[0]["objective/entropy"] > cold.state.log_history[0]["objective/entropy"]


def test_missing_eos_penalty(tmp_path):
    rows = prompt_rows(24, V)
    plain = make(tmp_path, rows=rows, stop_token="eos", reward=lambda p, c: [1.0] * len(c), total_episodes=8)
    plain.train()
    pen = make(tmp_path, rows=rows, stop_token="eos", reward=lambda p, c: [1.0] * len(c), total_episodes=8,
               missing_eos_penalty=2.0)
    pen.train()
    no_eos = (~(pen._last_rollout.responses == EOS).any(1)).float().mean().item()
    assert no_eos > 0
    assert pen.state.log_history[0]["objective/scores"] == pytest.approx(1.0 - 2.0 * no_eos)
    assert plain.state.log_history[0]["objective/scores"] == pytest.approx(1.0)


@pytest.mark.parametrize("coef", [0.0, 0.3])
def test_kl_coef(tmp_path, coef):
    tr = make(tmp_path, kl_coef=coef, total_episodes=16, learning_rate=1e-2)
    tr.train()
    last = tr.state.log_history[-1]
    assert last["objective/non_score_reward"] == pytest.approx(-coef * last["objective/kl"], abs=1e-6)
    if coef:
        assert last["objective/kl"] != 0


def test_kl_estimator(tmp_path, monkeypatch):
    calls = count_calls(monkeypatch, kl_mod, "kl_penalty")  # what the registry's "k3" runs
    make(tmp_path, kl_estimator="k3", total_episodes=8).train()
    assert calls[0][1]["estimator"] == "k3"
    with pytest.raises(ValueError, match="k1"):
        make(tmp_path, kl_estimator="k9", total_episodes=8).train()


def test_cliprange_and_cliprange_value(tmp_path):
    tight = make(tmp_path, cliprange=1e-4, cliprange_value=1e-4, num_ppo_epochs=3, learning_rate=1e-2, total_episodes=8)
    tight.train()
    h = tight.state.log_history[0]
    assert h["policy/clipfrac_avg"] > 0 and h["val/clipfrac_avg"] > 0
    loose = make(tmp_path, cliprange=10.0, cliprange_value=100.0, num_ppo_epochs=3, learning_rate=1e-2, total_episodes=8)
    loose.train()
    assert loose.state.log_history[0]["policy/clipfrac_avg"] == 0 and loose.state.log_history[0]["val/clipfrac_avg"] == 0


def test_vf_coef(tmp_path):
    """vf_coef = 0: only the policy loss trains; the value head never gets a gradient."""
    tr = make(tmp_path, vf_coef=0.0, total_episodes=8)
    before = tr.model.value_head.weight.detach().clone()
    tr.train()
    assert torch.equal(before, tr.model.value_head.weight)
    tr = make(tmp_path, vf_coef=0.5, total_episodes=8)
    before = tr.model.value_head.weight.detach().clone()
    tr.train()
    assert not torch.equal(before, tr.model.value_head.weight)


def test_gamma_lam_and_whiten_rewards_reach_the_kernels(tmp_path, monkeypatch):
    gae_calls = count_registry_calls(monkeypatch, algos.ADVANTAGE_ESTIMATORS, "gae")
    white = count_calls(monkeypatch, ppo_mod, "masked_whiten")
    make(tmp_path, gamma=0.9, lam=0.7, whiten_rewards=True, total_episodes=8).train()
    assert gae_calls[0][0][3:5] == (0.9, 0.7)
    assert [k.get("shift_mean") for _, k in white] == [False, True]  # rewards (mean kept), then advantages
    white.clear()
    make(tmp_path, whiten_rewards=False, total_episodes=8).train()
    assert [k.get("shift_mean") for _, k in white] == [True]


def test_seed(tmp_path):
    runs = []
    for seed in (1, 1, 2):
        tr = make(tmp_path, seed=seed, total_episodes=8)
        tr.train()
        runs.append(tr._last_rollout.responses)
    assert torch.equal(runs[0], runs[1]) and not torch.equal(runs[0], runs[2])


def _logged_steps(tmp_path, **kw) -> list[int]:
    tr = make(tmp_path, total_episodes=40, **kw)  # batch 8, 24 prompts: 5 steps, a pass over the prompts every 3
    tr.train()
    return [h["step"] for h in tr.state.log_history]


def test_logging_steps(tmp_path):
    assert _logged_steps(tmp_path, logging_steps=2) == [2, 4, 5]  # every 2, and the last


def test_logging_first_step(tmp_path):
    assert _logged_steps(tmp_path, logging_steps=2, logging_first_step=True) == [1, 2, 4, 5]


def test_logging_strategy(tmp_path):
    assert _logged_steps(tmp_path, logging_strategy="no") == []
    assert _logged_steps(tmp_path, logging_strategy="epoch") == [3, 5]  # a pass over the prompts, and the last


def test_save_steps_and_save_strategy(tmp_path):
    tr = make(tmp_path, save_strategy="steps", save_steps=2, total_episodes=40)
    tr.train()
    names = sorted(p.name for p in (tmp_path / "out").glob("checkpoint-*"))
    assert names == ["checkpoint-2", "checkpoint-4", "checkpoint-5"]  # every 2 steps, and at the end (HF)
    tr = make(tmp_path, output_dir=str(tmp_path / "nosave"), save_strategy="no", total_episodes=24)
    tr.train()
    assert not list((tmp_path / "nosave").glob("checkpoint-*"))


def test_report_to(tmp_path):
    import importlib.util

    if importlib.util.find_spec("tensorboard") is None:
        with pytest.warns(UserWarning, match="TensorBoard is unavailable"):
            make(tmp_path, report_to=["tensorboard"], total_episodes=8).train()
    else:
        make(tmp_path, report_to=["tensorboard"], total_episodes=8).train()
        assert list((tmp_path / "out" / "runs").iterdir())
    with pytest.warns(UserWarning, match="report_to='mlflow' is not supported"):
        make(tmp_path, report_to=["mlflow"], total_episodes=8).train()


def test_bf16_autocasts_the_forwards(tmp_path, monkeypatch):
    seen = []
    import rlhf_fast.models.policy_value as pv

    orig = pv.fused_linear_logprobs

    def spy(h, w, *a, **k):
        seen.append(torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else None)
        return orig(h, w, *a, **k)

    monkeypatch.setattr(pv, "fused_linear_logprobs", spy)
    make(tmp_path, bf16=True, total_episodes=8).train()
    assert seen and all(s == torch.bfloat16 for s in seen)
    seen.clear()
    make(tmp_path, bf16=False, total_episodes=8).train()
    assert seen and all(s is None for s in seen)


def test_use_cpu(tmp_path):
    tr = make(tmp_path, use_cpu=True, total_episodes=8)
    assert tr.device.type == "cpu" and tr.model.lm_head.weight.device.type == "cpu"


def test_num_sample_generations(tmp_path, monkeypatch):
    args = config(tmp_path, num_sample_generations=2, total_episodes=32)  # 4 steps -> every 2 steps
    tr = PPOTrainer(args, make_tokenizer(V), tiny_policy(V), None, count_token_reward(), prompt_rows(24, V),
                    eval_dataset=prompt_rows(4, V, seed=5))
    calls = count_calls(monkeypatch, tr, "generate_completions")
    tr.train()
    assert len(calls) == 2


def test_local_rollout_forward_batch_size(tmp_path, monkeypatch):
    import rlhf_fast.trainer.rollout as ro

    calls = count_calls(monkeypatch, ppo_mod, "generate")
    make(tmp_path, local_rollout_forward_batch_size=3, total_episodes=8).train()
    assert [c[0][1].shape[0] for c in calls] == [3, 3, 2]
    assert ro.generate is not None


def test_sft_and_reward_model_paths(tmp_path):
    tiny_policy(V, seed=4).save_pretrained(tmp_path / "sft")
    tiny_classifier(V, seed=5).save_pretrained(tmp_path / "rm")
    args = config(tmp_path, sft_model_path=str(tmp_path / "sft"), reward_model_path=str(tmp_path / "rm"),
                  total_episodes=8)
    tr = PPOTrainer(args, make_tokenizer(V), None, None, None, prompt_rows(24, V))
    assert torch.equal(tr.model.lm_head.weight, tiny_policy(V, seed=4).lm_head.weight)
    assert torch.equal(tr.reward.head.weight, tiny_classifier(V, seed=5).score.weight)
    tr.train()
    args = config(tmp_path, reward_model_path=str(tmp_path / "missing"), total_episodes=8)
    with pytest.raises(FileNotFoundError, match="missing"):
        PPOTrainer(args, make_tokenizer(V), tiny_policy(V), None, None, prompt_rows(24, V))


def test_lr_scheduler_type_and_warmup_steps(tmp_path):
    lin = make(tmp_path, lr_scheduler_type="linear", total_episodes=32, learning_rate=1e-3)
    lin.train()
    assert [h["lr"] for h in lin.state.log_history] == pytest.approx([1e-3, 7.5e-4, 5e-4, 2.5e-4])
    const = make(tmp_path, lr_scheduler_type="constant", total_episodes=32, learning_rate=1e-3)
    const.train()
    assert [h["lr"] for h in const.state.log_history] == pytest.approx([1e-3] * 4)
    warm = make(tmp_path, lr_scheduler_type="constant_with_warmup", warmup_steps=2, total_episodes=32, learning_rate=1e-3)
    warm.train()
    assert [h["lr"] for h in warm.state.log_history] == pytest.approx([0.0, 5e-4, 1e-3, 1e-3])


def test_max_grad_norm(tmp_path, monkeypatch):
    seen = []
    orig = torch.nn.utils.clip_grad_norm_

    def spy(params, max_norm, *a, **k):
        seen.append(max_norm)
        return orig(params, max_norm, *a, **k)

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", spy)
    # TRL 1.12's PPO loop never clips, whatever max_grad_norm says: by default the norm is only measured.
    make(tmp_path, max_grad_norm=0.25, total_episodes=8).train()
    assert seen and all(s == float("inf") for s in seen)
    seen.clear()
    make(tmp_path, max_grad_norm=0.25, clip_grad_norm=True, total_episodes=8).train()
    assert seen and all(s == 0.25 for s in seen)
    # a tiny max norm bounds the update: Adam's first step moves each weight by ~lr regardless, so check the norm
    tr = make(tmp_path, max_grad_norm=1e-6, clip_grad_norm=True, total_episodes=8, learning_rate=1e-3)
    tr.train()
    assert all(math.isfinite(h["loss/policy_avg"]) for h in tr.state.log_history)


def test_gradient_checkpointing_flag_reaches_the_model(tmp_path):
    tr = make(tmp_path, gradient_checkpointing=True, total_episodes=8)
    assert tr.model.policy.is_gradient_checkpointing
    tr.train()


def test_dataclass_defaults_match_trl():
    c = PPOConfig(output_dir="/tmp/x", use_cpu=True)
    assert (c.num_mini_batches, c.num_ppo_epochs, c.response_length, c.temperature, c.kl_coef, c.kl_estimator,
            c.cliprange, c.vf_coef, c.cliprange_value, c.gamma, c.lam, c.whiten_rewards, c.logging_steps,
            c.local_rollout_forward_batch_size, c.num_sample_generations, c.gradient_checkpointing, c.bf16) == (
        1, 4, 53, 0.7, 0.05, "k1", 0.2, 0.1, 0.2, 1.0, 0.95, False, 10, 64, 10, None, True)
    assert c.learning_rate == 3e-6  # TRL's PPOConfig default (TrainingArguments' is 5e-5)
    # gradient_checkpointing: TRL 1.12 defaults to True but its PPO loop never enables it; None decides from
    # the memory predictor (documented in docs/migrating_from_trl.md). The rest are TRL's values.


def test_group_estimators_are_accepted_and_validated(tmp_path):
    c = config(tmp_path, advantage_estimator="grpo", num_generations=4, per_device_train_batch_size=4,
               gradient_accumulation_steps=2)
    assert (c.advantage_estimator, c.num_generations, c.uses_critic, c.scale_rewards) == ("grpo", 4, False, True)
    assert config(tmp_path, advantage_estimator="grpo", scale_rewards="none", num_generations=2,
                  per_device_train_batch_size=4).scale_rewards is False
    with pytest.raises(ValueError, match=r"valid: \['gae', 'grpo', 'rloo', 'reinforce_pp'\]"):
        config(tmp_path, advantage_estimator="ppo-gae")
    with pytest.raises(ValueError, match="num_generations=2 or more"):
        config(tmp_path, advantage_estimator="rloo", num_generations=1)
    with pytest.raises(ValueError, match=r"not divisible by num_generations=3.*multiple of 3 \(e\.g\. 6 or 9\)"):
        config(tmp_path, advantage_estimator="grpo", num_generations=3, per_device_train_batch_size=4,
               gradient_accumulation_steps=2)
    with pytest.raises(ValueError, match="GAE samples one response per prompt"):
        config(tmp_path, num_generations=4)
