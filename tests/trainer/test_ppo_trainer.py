"""PPOTrainer: the drop-in API, learning, callbacks, metrics, bad input."""
from __future__ import annotations

import json
import math
import warnings

import pytest
import torch
from transformers import TrainerCallback

from rlhf_fast.trainer import PPOConfig, PPOTrainer
from rlhf_fast.trainer.ppo import NonFiniteError
from tests.trainer.tiny import count_token_reward, make_tokenizer, prompt_rows, tiny_classifier, tiny_policy

V = 32


def config(tmp_path, **kw) -> PPOConfig:
    base = dict(output_dir=str(tmp_path / "out"), use_cpu=True, bf16=False, per_device_train_batch_size=4,
                gradient_accumulation_steps=2, num_mini_batches=2, num_ppo_epochs=1, total_episodes=16,
                response_length=5, learning_rate=1e-3, logging_steps=1, save_strategy="no", report_to="none",
                num_sample_generations=0, kl_coef=0.05, temperature=1.0, disable_tqdm=True,
                gradient_checkpointing=False, seed=3)
    base.update(kw)
    return PPOConfig(**base)


def trainer(tmp_path, reward=None, rows=None, **kw) -> PPOTrainer:
    args = kw.pop("args", None) or config(tmp_path, **kw)
    return PPOTrainer(args, make_tokenizer(V), tiny_policy(V), None,
                      reward or count_token_reward("t5"), rows or prompt_rows(24, V))


TRL_METRICS = ["objective/kl", "objective/entropy", "objective/non_score_reward", "objective/rlhf_reward",
               "objective/scores", "policy/approxkl_avg", "policy/clipfrac_avg", "loss/policy_avg", "loss/value_avg",
               "val/clipfrac_avg", "policy/entropy_avg", "val/ratio", "val/num_eos_tokens", "lr", "episode"]


def test_metrics_under_trl_names_and_phase_timings(tmp_path):
    tr = trainer(tmp_path)
    tr.train()
    assert tr.state.global_step == 2 and len(tr.state.log_history) == 2
    for entry in tr.state.log_history:
        for k in TRL_METRICS + ["time/generate", "time/score", "time/forward", "time/update", "tokens_per_second"]:
            assert k in entry, k
            assert isinstance(entry[k], (int, float)) and math.isfinite(entry[k]), (k, entry[k])
    first = tr.state.log_history[0]
    assert first["episode"] == 8
    # TRL: rlhf_reward = non_score_reward + scores; non_score_reward = -kl_coef * objective/kl (summed per seq)
    assert first["objective/rlhf_reward"] == pytest.approx(first["objective/non_score_reward"] + first["objective/scores"])
    assert first["objective/non_score_reward"] == pytest.approx(-0.05 * first["objective/kl"], rel=1e-5, abs=1e-7)
    lines = (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["step"] for x in lines] == [1, 2]


def test_reward_rises_on_a_simple_reward(tmp_path):
    """Reward = share of response tokens equal to t5 (chance level 1/32)."""
    tr = PPOTrainer(
        config(tmp_path, per_device_train_batch_size=16, gradient_accumulation_steps=1, num_mini_batches=1,
               num_ppo_epochs=4, total_episodes=16 * 15, response_length=8, learning_rate=1e-2, kl_coef=0.0,
               clip_grad_norm=True, position_rules="eos"),
        # lr 1e-2 needs the clipping TRL's loop does not do; and the tiny vocabulary's pad token "t0" is sampled
        # like any other, which under TRL's rules ends a response early (TRL's PPOTrainer does the same)
        make_tokenizer(V), tiny_policy(V), None, count_token_reward("t5"), prompt_rows(64, V))
    tr.train()
    scores = [h["objective/scores"] for h in tr.state.log_history]
    assert len(scores) == 15
    assert sum(scores[-3:]) / 3 > sum(scores[:3]) / 3 + 0.15, scores


def test_callbacks_fire_at_the_usual_events(tmp_path):
    events = []

    class Recorder(TrainerCallback):
        def on_train_begin(self, args, state, control, **kw):
            events.append("train_begin")

        def on_step_end(self, args, state, control, **kw):
            events.append(f"step_end:{state.global_step}")

        def on_log(self, args, state, control, logs=None, **kw):
            events.append(f"log:{state.global_step}:{'objective/kl' in logs}")

        def on_save(self, args, state, control, **kw):
            events.append(f"save:{state.global_step}")

        def on_train_end(self, args, state, control, **kw):
            events.append("train_end")

    args = config(tmp_path, save_strategy="steps", save_steps=2)
    tr = PPOTrainer(args, make_tokenizer(V), tiny_policy(V), None, count_token_reward(), prompt_rows(24, V),
                    callbacks=[Recorder()])
    tr.train()
    assert events == ["train_begin", "log:1:True", "step_end:1", "log:2:True", "step_end:2", "save:2", "train_end"]


def test_value_model_becomes_separate_critic_and_ref_model_the_reference(tmp_path):
    value_model = tiny_classifier(V)
    ref = tiny_policy(V, seed=7)
    tr = PPOTrainer(config(tmp_path), make_tokenizer(V), tiny_policy(V), ref, count_token_reward(),
                    prompt_rows(24, V), value_model=value_model)
    assert tr.critic_mode == "separate" and tr.model.critic_backbone is not None
    # the reference is the ref_model we passed (seed 7 weights), not a copy of the policy, and used in place:
    # the script holds it anyway, so a copy would double the reference's bytes
    assert tr.model.reference.model is ref and not any(p.requires_grad for p in ref.parameters())
    ref_w = tr.model.reference.model.get_output_embeddings().weight
    assert torch.allclose(ref_w.float(), ref.get_output_embeddings().weight.float())
    assert not torch.allclose(ref_w.float(), tr.model.lm_head.weight.float())
    # the critic starts from the value model's score head
    assert torch.allclose(tr.model.value_head.weight, value_model.score.weight.float())
    tr.train()


def test_shared_critic_is_announced_when_a_value_model_is_passed(tmp_path):
    tr = PPOTrainer(config(tmp_path, critic="shared"), make_tokenizer(V), tiny_policy(V), None, count_token_reward(),
                    prompt_rows(24, V), value_model=tiny_classifier(V))
    assert tr.critic_mode == "shared" and tr.model.critic_backbone is None
    assert any("critic='shared'" in m and "value_model" in m for m in tr.log_messages)


def test_peft_config_gives_lora_reference(tmp_path):
    from peft import LoraConfig

    tr = PPOTrainer(config(tmp_path), make_tokenizer(V), tiny_policy(V), None, count_token_reward(), prompt_rows(24, V),
                    peft_config=LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))
    assert tr.reference_mode == "lora"
    trainable = [n for n, p in tr.model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n or "value_head" in n for n in trainable)
    tr.train()


def test_model_reward_and_save_model(tmp_path):
    tr = PPOTrainer(config(tmp_path), make_tokenizer(V), tiny_policy(V), None, tiny_classifier(V), prompt_rows(24, V))
    tr.train()
    tr.save_model(str(tmp_path / "final"))
    from transformers import AutoModelForCausalLM

    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "final")
    assert torch.equal(reloaded.get_output_embeddings().weight, tr.model.lm_head.weight.detach())
    assert (tmp_path / "final" / "value_head.pt").is_file()


def test_generate_completions_uses_eval_dataset(tmp_path):
    tr = PPOTrainer(config(tmp_path), make_tokenizer(V), tiny_policy(V), None, count_token_reward(), prompt_rows(24, V),
                    eval_dataset=prompt_rows(6, V, seed=9))
    rows = tr.generate_completions()
    assert len(rows) == 6 and {"query", "model response", "score"} <= set(rows[0])
    assert len((tmp_path / "out" / "completions.jsonl").read_text().splitlines()) == 6


def test_non_finite_reward_skips_the_update_and_stops_after_the_limit(tmp_path):
    calls = {"n": 0}

    def flaky(prompts, completions):
        calls["n"] += 1
        return [float("nan")] * len(completions) if calls["n"] in (2, 3) else [0.5] * len(completions)

    tr = trainer(tmp_path, reward=flaky, total_episodes=8 * 4, max_nonfinite_steps=5)
    before = {n: p.detach().clone() for n, p in tr.model.named_parameters() if p.requires_grad}
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        tr.train()
    assert tr.nonfinite_steps == 2 and tr.state.global_step == 4
    assert sum("non-finite reward" in str(x.message) for x in w) == 2
    skipped = [h for h in tr.state.log_history if "nonfinite/skipped_steps" in h]
    assert [h["step"] for h in skipped] == [2, 3]
    assert any(not torch.equal(before[n], p) for n, p in tr.model.named_parameters() if p.requires_grad)

    always_nan = trainer(tmp_path, reward=lambda p, c: [float("inf")] * len(c), total_episodes=8 * 4,
                         max_nonfinite_steps=2)
    with pytest.warns(UserWarning, match="non-finite"), pytest.raises(NonFiniteError, match="2 steps"):
        always_nan.train()
    assert not list((tmp_path / "out").glob("checkpoint-*"))


@pytest.mark.parametrize(
    "rows, match",
    [([], "empty"), ([{"text": "t3 t4"}], "input_ids"), ([{"input_ids": []}], "row 0 has an empty prompt")],
)
def test_bad_datasets_name_the_fix(tmp_path, rows, match):
    with pytest.raises(ValueError, match=match):
        PPOTrainer(config(tmp_path), make_tokenizer(V), tiny_policy(V), None, count_token_reward(), rows)


def test_prompt_longer_than_context_is_refused(tmp_path):
    rows = [{"input_ids": [5] * 126}] * 8
    tr = trainer(tmp_path, rows=rows)
    with pytest.raises(ValueError, match="exceeds the model's context of 128"):
        tr.train()


def test_response_length_must_be_positive(tmp_path):
    with pytest.raises(ValueError, match="response_length must be > 0"):
        config(tmp_path, response_length=0)


def test_missing_pad_token_is_set_from_eos_with_a_warning(tmp_path):
    tok = make_tokenizer(V, pad=False)
    with pytest.warns(UserWarning, match="no pad token"):
        tr = PPOTrainer(config(tmp_path), tok, tiny_policy(V), None, count_token_reward(), prompt_rows(24, V))
    assert tr.pad_token_id == tok.eos_token_id
    tr.train()


def test_same_model_as_reference_is_refused(tmp_path):
    m = tiny_policy(V)
    with pytest.raises(ValueError, match="cannot be the same object"):
        PPOTrainer(config(tmp_path), make_tokenizer(V), m, m, count_token_reward(), prompt_rows(24, V))


def test_unsupported_training_arguments_warn_by_name(tmp_path):
    with pytest.warns(UserWarning, match="label_smoothing_factor=0.1 is not used"):
        config(tmp_path, label_smoothing_factor=0.1)


@pytest.mark.parametrize("critic", ["shared", "separate"])
def test_first_update_reusing_the_rollout_forward_changes_nothing_but_the_work(tmp_path, critic):
    """One micro-batch holding the whole batch: the first update's forward doubles as the rollout forward.
    Same weights and metrics as the separate no-grad pass, one policy forward fewer per step."""
    kw = dict(per_device_train_batch_size=8, gradient_accumulation_steps=1, num_mini_batches=1, num_ppo_epochs=2,
              total_episodes=24, critic=critic)
    results = []
    for reuse in (True, False):
        tr = PPOTrainer(config(tmp_path / str(reuse), **kw), make_tokenizer(V), tiny_policy(V), None,
                        count_token_reward("t5"), prompt_rows(24, V),
                        value_model=tiny_classifier(V) if critic == "separate" else None)
        tr.reuse_rollout_forward = reuse
        calls = []
        tr.ddp_model.register_forward_pre_hook(lambda *_, calls=calls: calls.append(1))
        tr.train()
        weights = {n: p.detach().clone() for n, p in tr.model.named_parameters() if p.requires_grad}
        results.append((weights, tr.state.log_history, len(calls)))
    (w_reuse, h_reuse, n_reuse), (w_sep, h_sep, n_sep) = results
    assert (n_reuse, n_sep) == (3 * 2, 3 * 3)  # 3 steps: 2 epochs of updates, plus the rollout pass without reuse
    for n in w_sep:
        torch.testing.assert_close(w_reuse[n], w_sep[n], atol=2e-6, rtol=1e-5, msg=n)
    for a, b in zip(h_reuse, h_sep):
        for k in ("objective/kl", "objective/scores", "objective/entropy", "loss/policy_avg", "loss/value_avg",
                  "policy/approxkl_avg", "val/ratio"):
            assert a[k] == pytest.approx(b[k], rel=1e-4, abs=1e-6), k


def test_first_update_reuse_needs_one_micro_batch_of_the_whole_batch(tmp_path):
    tr = trainer(tmp_path, per_device_train_batch_size=4, gradient_accumulation_steps=2, num_mini_batches=1)
    calls = []
    tr.ddp_model.register_forward_pre_hook(lambda *_, calls=calls: calls.append(1))
    tr.train()
    assert len(calls) == 2 * (1 + 2)  # 2 steps: a rollout pass + 2 micro-batches each
