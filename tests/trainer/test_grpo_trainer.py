"""GRPOTrainer: TRL 1.16's constructor and surface, reward functions' arguments, None scores, chat prompts,
DAPO's dynamic sampling and overlong shaping, save / resume."""
from __future__ import annotations

import inspect
import math

import pytest
import torch
from datasets import Dataset

from rlhf_fast.trainer import grpo_step
from tests.trainer.tiny import EOS, make_tokenizer, tiny_classifier, tiny_policy

V = 32
TRL_SIGNATURE = ["model", "reward_funcs", "args", "train_dataset", "eval_dataset", "processing_class",
                 "reward_processing_classes", "callbacks", "optimizers", "quantization_config", "peft_config", "tools",
                 "rollout_func", "environment_factory"]


def share_t5(prompts, completions, **kwargs):
    return [c.split().count("t5") / max(len(c.split()), 1) for c in completions]


def rows(n=16, chat=False, **columns):
    g = torch.Generator().manual_seed(1)
    out = []
    for i in range(n):
        words = " ".join(f"t{int(t)}" for t in torch.randint(3, V, (2 + i % 3,), generator=g))
        out.append({"prompt": [{"role": "user", "content": words}] if chat else words,
                    **{k: v(i) for k, v in columns.items()}})
    return Dataset.from_list(out)


def config(tmp_path, **kw):
    from rlhf_fast import GRPOConfig

    base = dict(output_dir=str(tmp_path / "out"), use_cpu=True, bf16=False, per_device_train_batch_size=8,
                num_generations=4, max_completion_length=6, learning_rate=1e-2, logging_steps=1, report_to="none",
                save_strategy="no", max_steps=2, disable_tqdm=True, seed=0)
    base.update(kw)
    return GRPOConfig(**base)


def trainer(tmp_path, reward=share_t5, data=None, model=None, tokenizer=None, **kw):
    from rlhf_fast import GRPOTrainer

    return GRPOTrainer(model if model is not None else tiny_policy(V), reward, args=config(tmp_path, **kw),
                       train_dataset=data if data is not None else rows(),
                       processing_class=tokenizer if tokenizer is not None else make_tokenizer(V))


def test_constructor_is_trls():
    from rlhf_fast import GRPOConfig, GRPOTrainer

    assert list(inspect.signature(GRPOTrainer.__init__).parameters)[1:] == TRL_SIGNATURE
    assert GRPOTrainer.__module__ == "rlhf_fast.trainer.grpo" and GRPOConfig.__module__ == "rlhf_fast.trainer.grpo_config"


def test_model_as_a_path_and_default_args(tmp_path, monkeypatch):
    from rlhf_fast import GRPOConfig, GRPOTrainer
    from rlhf_fast.trainer import grpo

    path = tmp_path / "policy"
    tiny_policy(V).save_pretrained(path)
    make_tokenizer(V).save_pretrained(path)
    monkeypatch.chdir(tmp_path)
    # args=None builds GRPOConfig("<model>-GRPO") as TRL does; on a CPU-only machine that needs use_cpu (bf16 is
    # TRL's default), which TRL's default config would refuse there too
    import dataclasses

    @dataclasses.dataclass
    class CPUConfig(GRPOConfig):
        use_cpu: bool = True

    monkeypatch.setattr(grpo, "GRPOConfig", CPUConfig)
    tr = GRPOTrainer(str(path), share_t5, train_dataset=rows())  # tokenizer loaded from the path, TRL's defaults
    assert tr.args.output_dir.endswith("policy-GRPO") and tr.args.num_generations == 8
    assert tr.args.loss_type == "dapo" and tr.args.beta == 0.0 and tr.reference_mode == "none"
    assert tr.tokenizer.padding_side == "left"


def test_reward_functions_get_trls_arguments(tmp_path):
    seen = []

    def spy(prompts, completions, completion_ids, trainer_state, log_extra, log_metric, answer, index, **kw):
        seen.append(dict(prompts=prompts, completions=completions, completion_ids=completion_ids, answer=answer,
                         index=index, step=trainer_state.global_step))
        log_metric("my_metric", 2.0)
        log_extra("my_column", ["x"] * len(prompts))
        return [float(len(c)) for c in completion_ids]

    data = rows(16, answer=lambda i: f"a{i}", index=lambda i: i)
    tr = trainer(tmp_path, spy, data=data, log_completions=True)
    tr.train()
    assert [s["step"] for s in seen] == [0, 1]
    tok = make_tokenizer(V)
    for s in seen:
        assert len(s["prompts"]) == 8 and len(set(s["prompts"][:4])) == 1  # each prompt num_generations times
        for p, a, i in zip(s["prompts"], s["answer"], s["index"]):
            assert data[i]["prompt"] == p and a == f"a{i}"  # every column, aligned with its prompt
        assert s["completions"] == tok.batch_decode(s["completion_ids"], skip_special_tokens=True)
        assert all(len(ids) <= 6 and (len(ids) == 6 or ids[-1] == EOS) for ids in s["completion_ids"])
    log = tr.state.log_history[0]
    assert log["my_metric"] == 2.0 and log["rewards/spy/mean"] == pytest.approx(
        sum(map(len, seen[0]["completion_ids"])) / 8)
    import pandas as pd

    table = pd.read_parquet(tmp_path / "out" / "completions" / "completions_00001.parquet")
    assert list(table["my_column"]) == ["x"] * 8 and list(table["spy"]) == [float(len(c)) for c in seen[0]["completion_ids"]]


def test_none_scores_are_nan_and_excluded_as_trl_does():
    """nansum across functions; a row every function skipped is unscorable: left out of the group statistics and
    given advantage 0; rewards/<f>/mean averages the applicable rows only."""
    nan = math.nan
    per_func = torch.tensor([[1.0, nan], [3.0, 1.0], [nan, nan], [2.0, 2.0]])
    adv, rewards, zero = grpo_step.group_advantages(per_func, torch.tensor([1.0, 0.5]), 4)
    assert torch.isnan(rewards[2]) and rewards[[0, 1, 3]].tolist() == [1.0, 3.5, 3.0]
    mean, std = 2.5, float(torch.tensor([1.0, 3.5, 3.0]).std())
    assert adv.tolist() == pytest.approx([(1 - mean) / (std + 1e-4), (3.5 - mean) / (std + 1e-4), 0.0,
                                          (3 - mean) / (std + 1e-4)], rel=1e-6)
    m = grpo_step.reward_metrics(per_func, rewards, zero, ["f", "g"])
    assert m["rewards/f/mean"] == 2.0 and m["rewards/g/mean"] == 1.5 and m["reward"] == pytest.approx(2.5)


def test_none_scores_train(tmp_path):
    def sometimes(prompts, completions, **kw):
        return [None if i % 3 == 0 else float(len(c)) for i, c in enumerate(completions)]

    tr = trainer(tmp_path, [sometimes, share_t5])
    tr.train()
    assert all(math.isfinite(h["loss"]) for h in tr.state.log_history[:-1])


def test_chat_prompts_through_the_chat_template_and_a_reward_model(tmp_path):
    tok = make_tokenizer(V)
    tok.chat_template = ("{% for m in messages %}t3 {{ m['content'] }} {% endfor %}"
                         "{% if add_generation_prompt %}t4{% endif %}")
    data = rows(16, chat=True)
    ids = grpo_step.prompt_token_ids([[{"role": "user", "content": "t5 t9"}]], tok)[0]
    assert tok.convert_ids_to_tokens(ids) == ["t3", "t5", "t9", "t4"]  # the generation prompt added
    assert grpo_step.prompt_token_ids([[{"role": "user", "content": "t5 t9 t7"}]], tok, max_prompt_length=2)[0] == \
        tok.convert_tokens_to_ids(["t7", "t4"])
    seen = []

    def spy(prompts, completions, **kw):
        seen.append(completions)
        return [0.0] * len(prompts)

    rm = tiny_classifier(V)
    from rlhf_fast import GRPOTrainer

    tr = GRPOTrainer(tiny_policy(V), [spy, rm], args=config(tmp_path), train_dataset=data, processing_class=tok,
                     reward_processing_classes=[None, tok])
    tr.train()
    assert all(c[0]["role"] == "assistant" and isinstance(c[0]["content"], str) for c in seen[0])
    # an in-memory model without a name_or_path is named by its class (TRL would log "rewards//mean")
    assert {"rewards/spy/mean", "rewards/LlamaForSequenceClassification/mean"} <= set(tr.state.log_history[0])


def test_dynamic_sampling_keeps_only_groups_whose_rewards_vary(tmp_path):
    """Prompts of even length score a constant: their groups carry no signal. With dynamic_sampling the batch
    is refilled from more prompts until every group varies (DAPO); without it half the groups are flat."""
    def flat_for_even(prompts, completions, **kw):
        return [1.0 if len(p.split()) % 2 == 0 else float(len(c)) for p, c in zip(prompts, completions)]

    off = trainer(tmp_path, flat_for_even, data=rows(32))
    off.train()
    on = trainer(tmp_path, flat_for_even, data=rows(32), dynamic_sampling=True)
    on.train()
    assert any(h.get("frac_reward_zero_std", 0) > 0 for h in off.state.log_history)
    assert all(h["frac_reward_zero_std"] == 0 for h in on.state.log_history if "frac_reward_zero_std" in h)
    assert all(h["dynamic_sampling/rounds"] >= 1 for h in on.state.log_history if "dynamic_sampling/rounds" in h)
    assert on.sampler.position > off.sampler.position or on.sampler.epoch > off.sampler.epoch  # sampled more prompts


def test_dynamic_sampling_fills_with_flat_groups_after_the_round_limit(tmp_path):
    tr = trainer(tmp_path, lambda prompts, completions, **kw: [1.0] * len(prompts), dynamic_sampling=True,
                 dynamic_sampling_max_rounds=2, max_steps=1)
    tr.train()
    log = tr.state.log_history[0]
    assert log["dynamic_sampling/rounds"] == 2 and log["dynamic_sampling/filled_with_zero_std"] == 1.0


def test_overlong_reward_shaping():
    lengths = torch.tensor([3, 4, 5, 6])
    assert grpo_step.overlong_penalty(lengths, 6, 2).tolist() == [0.0, 0.0, -0.5, -1.0]
    assert grpo_step.overlong_penalty(lengths, 6, 2, factor=0.5).tolist() == [0.0, 0.0, -0.25, -0.5]


def test_overlong_penalty_joins_the_reward(tmp_path):
    tr = trainer(tmp_path, lambda prompts, completions, **kw: [0.0] * len(prompts), overlong_buffer_length=3,
                 max_steps=1)
    tr.train()
    log = tr.state.log_history[0]
    assert log["rewards/overlong_penalty/mean"] < 0 and log["reward"] == pytest.approx(log["rewards/overlong_penalty/mean"])


def test_save_and_resume_is_bit_identical(tmp_path):
    """Stopped after step 2 of 3 and resumed from its checkpoint, a run ends on the weights and logs of the run
    that went straight through (sampler position, optimizer, schedule and sampling seeds are restored)."""
    from transformers import AutoModelForCausalLM, TrainerCallback

    from tests.trainer.test_grpo_fields import weights

    class StopAt2(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            control.should_training_stop = state.global_step >= 2

    straight = trainer(tmp_path, max_steps=3, output_dir=str(tmp_path / "straight"))
    straight.train()
    first = trainer(tmp_path, max_steps=3, save_strategy="steps", save_steps=1)
    first.add_callback(StopAt2())
    first.train()
    first.save_model()
    saved = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert torch.equal(saved.get_output_embeddings().weight, first.policy_model.get_output_embeddings().weight.detach())
    again = trainer(tmp_path, max_steps=3)
    again.train(resume_from_checkpoint=str(tmp_path / "out" / "checkpoint-2"))
    assert again.state.global_step == 3 and torch.equal(weights(again), weights(straight))
    steps = [h for h in again.state.log_history if "loss" in h]
    assert [h["step"] for h in steps] == [1, 2, 3] and steps[-1]["reward"] == straight.state.log_history[2]["reward"]


def test_unsupported_constructor_arguments_are_refused(tmp_path):
    from rlhf_fast import GRPOTrainer

    with pytest.raises(ValueError, match="tools=.... is not supported"):
        GRPOTrainer(tiny_policy(V), share_t5, args=config(tmp_path), train_dataset=rows(),
                    processing_class=make_tokenizer(V), tools=[print])
    with pytest.raises(ValueError, match="Number of reward weights"):
        trainer(tmp_path, [share_t5], reward_weights=[1.0, 2.0])
    with pytest.raises(ValueError, match="'prompt' column"):
        trainer(tmp_path, data=Dataset.from_list([{"text": "t3"}] * 8))
