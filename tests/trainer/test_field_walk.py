"""Every field of PPOConfig (TRL 1.12's fields, transformers' TrainingArguments, ours) is held to one of:
honoured (a test changes only that field and sees a different outcome), warned by name, refused, read by
scripts only (as transformers' Trainer ignores it too), or derived (written by the trainer, as TRL does).

The honoured fields' tests live here and in test_ppo_config_fields.py / test_trl_parity.py; the walk at the
bottom checks that each named test exists."""
from __future__ import annotations

import dataclasses
import importlib
import sys
import types
import warnings
from pathlib import Path

import pytest
import torch
from transformers import TrainingArguments

import rlhf_fast.trainer.ppo_step as ppo_step
from rlhf_fast.trainer import PPOConfig, PPOTrainer
from rlhf_fast.trainer.ppo_config import (
    DERIVED_FIELDS,
    HONOURED_TRAINING_ARGUMENTS,
    REJECTED_TRAINING_ARGUMENTS,
    SCRIPT_TRAINING_ARGUMENTS,
    SCRIPT_TRL_FIELDS,
    UNUSED_TRL_FIELDS,
)
from tests.trainer.test_ppo_config_fields import count_calls, make
from tests.trainer.test_ppo_trainer import V, config
from tests.trainer.tiny import count_token_reward, make_tokenizer, prompt_rows, tiny_policy


def _weights(tr) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in tr.model.parameters() if p.requires_grad])


def _trained(tmp_path, **kw):
    tr = make(tmp_path, total_episodes=8, **kw)
    tr.train()
    return tr


# ----------------------------------------------------------------------------- honoured TrainingArguments fields
def test_per_device_eval_batch_size(tmp_path, monkeypatch):
    sizes = []
    orig = ppo_step.generate_rollout

    def spy(model, ids, *a, **k):
        sizes.append(ids.shape[0])
        return orig(model, ids, *a, **k)

    for bs in (2, 4):
        tr = PPOTrainer(config(tmp_path, per_device_eval_batch_size=bs), make_tokenizer(V), tiny_policy(V), None,
                        count_token_reward(), prompt_rows(16, V), eval_dataset=prompt_rows(8, V))
        monkeypatch.setattr(ppo_step, "generate_rollout", spy)
        tr.generate_completions()
        monkeypatch.undo()
    assert sizes == [2, 2, 2, 2, 4, 4]


def test_data_seed(tmp_path):
    def first_batch(**kw):
        return make(tmp_path, **kw).sampler.next_batch()[0].tolist()

    assert first_batch(seed=1, data_seed=5) == first_batch(seed=2, data_seed=5)
    assert first_batch(seed=1, data_seed=5) != first_batch(seed=1, data_seed=6)


def test_save_total_limit(tmp_path):
    def checkpoints(**kw):
        out = tmp_path / str(len(kw))
        make(tmp_path, output_dir=str(out), save_strategy="steps", save_steps=1, total_episodes=24, **kw).train()
        return sorted(p.name for p in out.glob("checkpoint-*"))

    assert checkpoints() == ["checkpoint-1", "checkpoint-2", "checkpoint-3"]
    assert checkpoints(save_total_limit=1) == ["checkpoint-3"]


def test_save_only_model(tmp_path):
    full = make(tmp_path, output_dir=str(tmp_path / "full"), save_strategy="steps", save_steps=1, total_episodes=8)
    full.train()
    assert (tmp_path / "full" / "checkpoint-1" / "optimizer.pt").is_file()
    only = make(tmp_path, output_dir=str(tmp_path / "only"), save_strategy="steps", save_steps=1, total_episodes=8,
                save_only_model=True)
    only.train()
    ckpt = tmp_path / "only" / "checkpoint-1"
    assert (ckpt / "model.safetensors").is_file() or any(ckpt.glob("*.safetensors"))
    assert not (ckpt / "optimizer.pt").exists()
    again = make(tmp_path, output_dir=str(tmp_path / "only"), total_episodes=16, save_only_model=True)
    with pytest.raises(ValueError, match="save_only_model=True.*cannot resume"):
        again.train(resume_from_checkpoint=str(ckpt))


def test_run_name(tmp_path, monkeypatch):
    names = []
    fake = types.SimpleNamespace(run=None, init=lambda name=None, config=None: names.append(name) or
                                 types.SimpleNamespace(log=lambda *a, **k: None, finish=lambda: None))
    monkeypatch.setitem(sys.modules, "wandb", fake)
    _trained(tmp_path, report_to="wandb", run_name="alpha")
    _trained(tmp_path, report_to="wandb", run_name="beta")
    assert names == ["alpha", "beta"]


def test_lr_scheduler_kwargs_and_warmup_share(tmp_path):
    def lrs(**kw):
        tr = make(tmp_path, total_episodes=32, learning_rate=1e-3, **kw)
        tr.train()
        return [h["lr"] for h in tr.state.log_history]

    cos = lrs(lr_scheduler_type="cosine_with_restarts")
    assert lrs(lr_scheduler_type="cosine_with_restarts", lr_scheduler_kwargs={"num_cycles": 2}) != pytest.approx(cos)
    # warmup_steps below 1 is a share of the steps (transformers 5 folded warmup_ratio into it)
    assert lrs(lr_scheduler_type="constant_with_warmup", warmup_steps=0.5) == pytest.approx([0.0, 5e-4, 1e-3, 1e-3])


@pytest.mark.parametrize("field, value", [("weight_decay", 0.5), ("adam_beta1", 0.5), ("adam_beta2", 0.5),
                                          ("adam_epsilon", 1.0)])
def test_optimizer_fields(tmp_path, field, value):
    base = _trained(tmp_path)
    changed = _trained(tmp_path, **{field: value})
    group = changed.optimizer.param_groups[0]
    key = {"adam_beta1": "betas", "adam_beta2": "betas", "adam_epsilon": "eps"}.get(field, field)
    assert value in (group[key] if isinstance(group[key], tuple) else (group[key],))
    assert not torch.equal(_weights(base), _weights(changed))


def test_gradient_checkpointing_kwargs_and_activation_checkpointing(tmp_path):
    from rlhf_fast.models.policy_value import is_checkpointing

    def reentrant(tr):
        funcs = [m._gradient_checkpointing_func for m in tr.model.policy.modules()
                 if hasattr(m, "_gradient_checkpointing_func")]
        assert funcs
        return {f.keywords.get("use_reentrant") for f in funcs}

    assert reentrant(make(tmp_path, gradient_checkpointing=True,
                          gradient_checkpointing_kwargs={"use_reentrant": True})) == {True}
    assert reentrant(make(tmp_path, gradient_checkpointing=True)) == {False}
    assert is_checkpointing(make(tmp_path, activation_checkpointing=True, gradient_checkpointing=None).model.policy)
    assert not is_checkpointing(make(tmp_path, activation_checkpointing=False, gradient_checkpointing=None).model.policy)


def test_eval_steps(tmp_path):
    assert make(tmp_path, total_episodes=32, eval_steps=2).state.eval_steps == 2
    assert make(tmp_path, total_episodes=32, eval_steps=0.5).state.eval_steps == 2  # a share of max_steps (4)
    assert make(tmp_path, total_episodes=32, logging_steps=3).state.eval_steps == 3  # unset: logging_steps


class FakeHub:
    calls: list = []

    def __init__(self, token=None):
        self.token = token

    def create_repo(self, repo_id, private=None, exist_ok=False):
        FakeHub.calls.append(("create_repo", repo_id, private, self.token))
        return types.SimpleNamespace(repo_id=f"user/{repo_id}")

    def upload_folder(self, repo_id, folder_path, commit_message, revision=None, run_as_future=False):
        FakeHub.calls.append(("upload_folder", repo_id, sorted(p.name for p in Path(folder_path).iterdir()),
                              commit_message, revision))
        return "commit-info"


def test_push_to_hub_and_hub_fields(tmp_path, monkeypatch):
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "HfApi", FakeHub)
    FakeHub.calls = []
    tr = _trained(tmp_path, output_dir=str(tmp_path / "my-run"))
    tr.save_model()
    assert FakeHub.calls == []  # push_to_hub off: save_model only writes
    info = tr.push_to_hub(dataset_name="prompts")
    assert info == "commit-info"
    (op, repo, private, token), (op2, repo2, files, message, revision) = FakeHub.calls
    assert (op, repo, private, token, op2, repo2, message, revision) == (
        "create_repo", "my-run", None, None, "upload_folder", "user/my-run", "End of training", None)
    assert {"config.json", "README.md"} <= set(files)
    assert "dataset_name: prompts" in (tmp_path / "my-run" / "README.md").read_text()
    FakeHub.calls = []
    tr = _trained(tmp_path, output_dir=str(tmp_path / "run2"), push_to_hub=True, hub_model_id="org/model",
                  hub_token="tok", hub_private_repo=True, hub_revision="dev")
    tr.save_model()  # as transformers' Trainer: with push_to_hub, save_model pushes
    assert FakeHub.calls[0] == ("create_repo", "org/model", True, "tok")
    assert FakeHub.calls[1][3:] == ("Model save", "dev")


def test_ddp_timeout(tmp_path, monkeypatch):
    seen = []
    configs = [config(tmp_path, ddp_timeout=123), config(tmp_path)]
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setattr(torch.distributed, "init_process_group", lambda backend=None, **kw: seen.append((backend, kw)))
    for c in configs:
        PPOTrainer(c, make_tokenizer(V), tiny_policy(V), None, count_token_reward(), prompt_rows(16, V))
    assert seen[0] == ("gloo", {"timeout": __import__("datetime").timedelta(seconds=123)})
    assert seen[1][1]["timeout"].total_seconds() == 1800


def test_max_steps(tmp_path):
    tr = make(tmp_path, total_episodes=64, max_steps=2)
    tr.train()
    assert tr.state.global_step == 2 and tr.args.num_total_batches == 2


def test_fp16(tmp_path):
    with make(tmp_path, fp16=True, bf16=False)._autocast():
        assert torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.float16
    with make(tmp_path, bf16=False)._autocast():
        assert not torch.is_autocast_enabled("cpu")


def test_optim(tmp_path):
    assert make(tmp_path, optim="adamw_torch_fused").optimizer.defaults["fused"] is True
    assert not make(tmp_path, optim="adamw_torch").optimizer.defaults["fused"]
    with pytest.raises(ValueError, match="optim='sgd' is not supported"):
        make(tmp_path, optim="sgd")


def test_disable_tqdm(tmp_path, capsys):
    _trained(tmp_path, disable_tqdm=False)
    assert "PPO" in capsys.readouterr().err
    _trained(tmp_path, disable_tqdm=True)
    assert "PPO" not in capsys.readouterr().err


def test_layout_fields(tmp_path):
    from tests.trainer.tiny import tiny_classifier

    tr = PPOTrainer(config(tmp_path, critic="separate"), make_tokenizer(V), tiny_policy(V), None,
                    count_token_reward(), prompt_rows(16, V), value_model=tiny_classifier(V))
    assert tr.critic_mode == "separate" and tr.model.critic_backbone is not None
    assert make(tmp_path, critic="shared").model.critic_backbone is None
    assert make(tmp_path, reference="none", kl_coef=0.0).model.reference is None
    assert make(tmp_path, reference="frozen").model.reference is not None
    ref = make(tmp_path, reference_dtype="bf16").model.reference
    assert next(ref.model.parameters()).dtype == torch.bfloat16
    assert make(tmp_path, reference_offload=True).model.reference.auto_offload
    assert not make(tmp_path).model.reference.auto_offload


def test_padding_free(tmp_path, monkeypatch):
    import rlhf_fast.models.policy_value as pv

    calls = count_calls(monkeypatch, pv, "packed_hidden")
    packed = _trained(tmp_path, padding_free=True, stop_token="eos")
    assert calls and packed.model.padding_free
    calls.clear()
    padded = _trained(tmp_path, padding_free=False, stop_token="eos")
    assert not calls and not padded.model.padding_free
    torch.testing.assert_close(_weights(packed), _weights(padded), rtol=1e-5, atol=1e-6)  # same numbers


def test_fused_backbone(tmp_path):
    from rlhf_fast.models import is_patched

    fused = _trained(tmp_path, fused_backbone=True)
    plain = _trained(tmp_path, fused_backbone=False)
    assert fused.model.patch_report.patched and any(is_patched(m) for m in fused.model.policy.modules())
    assert plain.model.patch_report is None and not any(is_patched(m) for m in plain.model.policy.modules())
    assert any(is_patched(m) for m in fused.model.reference.model.modules())  # the reference copy inherits it
    torch.testing.assert_close(_weights(fused), _weights(plain), rtol=1e-5, atol=1e-6)  # same numbers


def test_decode_compile(tmp_path, monkeypatch):
    """The per-token step goes through torch.compile (aot_eager here: inductor's compile takes ~45 s on
    this CPU) and samples the same responses as the eager step."""
    import rlhf_fast.trainer.rollout as rollout

    steps, responses = [], {}
    orig = rollout.compiled_decode_step

    def spy(mode):
        fn = orig(mode)

        def counted(*a):
            steps.append(mode)
            return fn(*a)
        return counted

    monkeypatch.setattr(rollout, "compiled_decode_step", spy)
    orig_generate = ppo_step.generate_rollout

    def keep(*a, **k):
        ro = orig_generate(*a, **k)
        responses.setdefault(k["decode_compile"], []).append(ro.responses)
        return ro

    monkeypatch.setattr(ppo_step, "generate_rollout", keep)
    compiled = _trained(tmp_path, decode_compile="aot_eager")
    assert steps and set(steps) == {"aot_eager"}
    steps.clear()
    eager = _trained(tmp_path)
    assert not steps
    for a, b in zip(responses["aot_eager"], responses[None], strict=True):
        assert torch.equal(a, b)
    torch.testing.assert_close(_weights(compiled), _weights(eager), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="decode_compile must be one of"):
        config(tmp_path, decode_compile="fast")


# ----------------------------------------------------------------------------- honoured PPOConfig fields
def test_adapter_names_select_the_trained_and_the_reference_adapter(tmp_path):
    from peft import LoraConfig, get_peft_model

    def peft_policy():
        torch.manual_seed(0)
        m = get_peft_model(tiny_policy(V), LoraConfig(r=4, target_modules=["q_proj", "v_proj"], lora_dropout=0.0,
                                                      init_lora_weights=False), adapter_name="trained")
        m.add_adapter("ref", LoraConfig(r=4, target_modules=["q_proj", "v_proj"], lora_dropout=0.0,
                                        init_lora_weights=False))
        return m

    def ref_logprobs(**kw):
        tr = PPOTrainer(config(tmp_path, **kw), make_tokenizer(V), peft_policy(), None, count_token_reward(),
                        prompt_rows(16, V))
        ids = torch.tensor([[5, 6, 7, 8, 9]])
        out = tr.model.reference_logprobs(ids, torch.ones_like(ids), response_start=2)
        active = tr.model.policy.active_adapter
        return out, active, tr

    disabled, active, _ = ref_logprobs(model_adapter_name="trained")
    with_ref, active_after, tr = ref_logprobs(model_adapter_name="trained", ref_adapter_name="ref")
    assert active == active_after == "trained"
    assert not torch.allclose(disabled, with_ref)
    trainable = {n for n, p in tr.model.policy.named_parameters() if p.requires_grad}
    assert trainable and all(".trained." in n for n in trainable)
    with pytest.raises(ValueError, match="adapter 'nope' is not in the peft model"):
        ref_logprobs(ref_adapter_name="nope")


@pytest.mark.parametrize("field, value", [("entropy_coef", 0.5), ("loss_agg_mode", "seq-mean-token-sum"),
                                          ("whiten_advantages", False), ("cliprange_high", 0.5),
                                          ("reward_clip", 1e-3), ("dual_clip", 1.01), ("reward_norm", True)])
def test_loss_fields_change_the_update(tmp_path, field, value):
    kw = dict(cliprange=0.01, num_ppo_epochs=3, learning_rate=1e-2) if field in ("cliprange_high", "dual_clip") else {}
    base = _trained(tmp_path, **kw)
    assert not torch.equal(_weights(base), _weights(_trained(tmp_path, **kw, **{field: value})))


def test_kl_target_and_horizon(tmp_path):
    def coef(**kw):  # 3 steps: the KL of step 1 is 0 (policy = reference), later ones are not
        tr = make(tmp_path, kl_controller="adaptive", kl_coef=0.1, kl_estimator="k3", total_episodes=24, **kw)
        tr.train()
        return tr.state.log_history[-1]["objective/kl_coef"]

    base = coef()
    assert coef(kl_target=1e-6) != base and coef(kl_horizon=10) != base


# ----------------------------------------------------------------------------- the walk
def _tests_named(*names) -> list[str]:
    return list(names)


HONOURED_BY_TEST = {
    # TrainingArguments
    "output_dir": "test_ppo_config_fields:test_output_dir", "learning_rate": "test_ppo_config_fields:test_learning_rate",
    "per_device_train_batch_size": "test_ppo_config_fields:test_batch_fields_set_micro_and_optimizer_steps",
    "gradient_accumulation_steps": "test_ppo_config_fields:test_batch_fields_set_micro_and_optimizer_steps",
    "per_device_eval_batch_size": "test_field_walk:test_per_device_eval_batch_size",
    "num_train_epochs": "test_ppo_config_fields:test_total_episodes_and_num_train_epochs",
    "max_steps": "test_field_walk:test_max_steps", "seed": "test_ppo_config_fields:test_seed",
    "data_seed": "test_field_walk:test_data_seed", "logging_steps": "test_ppo_config_fields:test_logging_steps",
    "logging_strategy": "test_ppo_config_fields:test_logging_strategy",
    "logging_first_step": "test_ppo_config_fields:test_logging_first_step",
    "save_steps": "test_ppo_config_fields:test_save_steps_and_save_strategy",
    "save_strategy": "test_ppo_config_fields:test_save_steps_and_save_strategy",
    "save_total_limit": "test_field_walk:test_save_total_limit", "save_only_model": "test_field_walk:test_save_only_model",
    "report_to": "test_ppo_config_fields:test_report_to", "run_name": "test_field_walk:test_run_name",
    "bf16": "test_ppo_config_fields:test_bf16_autocasts_the_forwards", "fp16": "test_field_walk:test_fp16",
    "use_cpu": "test_ppo_config_fields:test_use_cpu",
    "lr_scheduler_type": "test_ppo_config_fields:test_lr_scheduler_type_and_warmup_steps",
    "warmup_steps": "test_ppo_config_fields:test_lr_scheduler_type_and_warmup_steps",
    "lr_scheduler_kwargs": "test_field_walk:test_lr_scheduler_kwargs_and_warmup_share",
    "max_grad_norm": "test_ppo_config_fields:test_max_grad_norm",
    "weight_decay": "test_field_walk:test_optimizer_fields", "adam_beta1": "test_field_walk:test_optimizer_fields",
    "adam_beta2": "test_field_walk:test_optimizer_fields", "adam_epsilon": "test_field_walk:test_optimizer_fields",
    "optim": "test_field_walk:test_optim",
    "gradient_checkpointing": "test_ppo_config_fields:test_gradient_checkpointing_flag_reaches_the_model",
    "gradient_checkpointing_kwargs": "test_field_walk:test_gradient_checkpointing_kwargs_and_activation_checkpointing",
    "activation_checkpointing": "test_field_walk:test_gradient_checkpointing_kwargs_and_activation_checkpointing",
    "activation_checkpointing_kwargs":
        "test_field_walk:test_gradient_checkpointing_kwargs_and_activation_checkpointing",
    "disable_tqdm": "test_field_walk:test_disable_tqdm", "eval_steps": "test_field_walk:test_eval_steps",
    "push_to_hub": "test_field_walk:test_push_to_hub_and_hub_fields",
    "hub_model_id": "test_field_walk:test_push_to_hub_and_hub_fields",
    "hub_token": "test_field_walk:test_push_to_hub_and_hub_fields",
    "hub_private_repo": "test_field_walk:test_push_to_hub_and_hub_fields",
    "hub_revision": "test_field_walk:test_push_to_hub_and_hub_fields",
    "ddp_timeout": "test_field_walk:test_ddp_timeout",
    # TRL 1.12's PPOConfig
    "num_mini_batches": "test_ppo_config_fields:test_batch_fields_set_micro_and_optimizer_steps",
    "num_ppo_epochs": "test_ppo_config_fields:test_batch_fields_set_micro_and_optimizer_steps",
    "total_episodes": "test_ppo_config_fields:test_total_episodes_and_num_train_epochs",
    "local_rollout_forward_batch_size": "test_ppo_config_fields:test_local_rollout_forward_batch_size",
    "num_sample_generations": "test_ppo_config_fields:test_num_sample_generations",
    "response_length": "test_ppo_config_fields:test_response_length",
    "stop_token": "test_ppo_config_fields:test_stop_token_eos_and_stop_token_id",
    "stop_token_id": "test_ppo_config_fields:test_stop_token_eos_and_stop_token_id",
    "temperature": "test_ppo_config_fields:test_temperature_zero_is_greedy_and_scales_logprobs",
    "missing_eos_penalty": "test_ppo_config_fields:test_missing_eos_penalty",
    "sft_model_path": "test_ppo_config_fields:test_sft_and_reward_model_paths",
    "reward_model_path": "test_ppo_config_fields:test_sft_and_reward_model_paths",
    "model_adapter_name": "test_field_walk:test_adapter_names_select_the_trained_and_the_reference_adapter",
    "ref_adapter_name": "test_field_walk:test_adapter_names_select_the_trained_and_the_reference_adapter",
    "whiten_rewards": "test_ppo_config_fields:test_gamma_lam_and_whiten_rewards_reach_the_kernels",
    "kl_coef": "test_ppo_config_fields:test_kl_coef", "kl_estimator": "test_ppo_config_fields:test_kl_estimator",
    "cliprange": "test_ppo_config_fields:test_cliprange_and_cliprange_value",
    "cliprange_value": "test_ppo_config_fields:test_cliprange_and_cliprange_value",
    "vf_coef": "test_ppo_config_fields:test_vf_coef",
    "gamma": "test_ppo_config_fields:test_gamma_lam_and_whiten_rewards_reach_the_kernels",
    "lam": "test_ppo_config_fields:test_gamma_lam_and_whiten_rewards_reach_the_kernels",
    # ours
    "critic": "test_field_walk:test_layout_fields", "reference": "test_field_walk:test_layout_fields",
    "reference_dtype": "test_field_walk:test_layout_fields", "reference_offload": "test_field_walk:test_layout_fields",
    "cliprange_high": "test_field_walk:test_loss_fields_change_the_update",
    "dual_clip": "test_field_walk:test_loss_fields_change_the_update", "loss_agg_mode": "test_field_walk:test_loss_fields_change_the_update",
    "entropy_coef": "test_field_walk:test_loss_fields_change_the_update",
    "whiten_advantages": "test_field_walk:test_loss_fields_change_the_update",
    "reward_clip": "test_field_walk:test_loss_fields_change_the_update",
    "reward_norm": "test_field_walk:test_loss_fields_change_the_update",
    "micro_batch_token_budget": "test_micro_batching:test_every_split_gives_the_same_update",
    "padding_free": "test_field_walk:test_padding_free", "fused_backbone": "test_field_walk:test_fused_backbone",
    "decode_compile": "test_field_walk:test_decode_compile",
    "position_rules": "test_trl_parity:test_each_improvement_switched_on_moves_results_beyond_the_tolerance",
    "padding_aware_metrics": "test_trl_parity:test_each_improvement_switched_on_moves_results_beyond_the_tolerance",
    "kl_clamp": "test_trl_parity:test_each_improvement_switched_on_moves_results_beyond_the_tolerance",
    "clip_grad_norm": "test_trl_parity:test_each_improvement_switched_on_moves_results_beyond_the_tolerance",
    "kl_controller": "test_field_walk:test_kl_target_and_horizon", "kl_target": "test_field_walk:test_kl_target_and_horizon",
    "kl_horizon": "test_field_walk:test_kl_target_and_horizon",
    "advantage_estimator": "test_group_estimators:test_the_critic_is_not_built",
    "policy_loss": "test_custom_algorithms:test_a_registered_estimator_and_policy_loss_drive_the_update",
    "num_generations": "test_group_estimators:test_rows_of_a_group_share_the_prompt_and_differ_in_samples",
    "scale_rewards": "test_group_estimators:test_trainer_advantages_equal_the_estimators",
    "max_nonfinite_steps": "test_ppo_trainer:test_non_finite_reward_skips_the_update_and_stops_after_the_limit",
    "distributed_strategy": "test_distributed:test_fsdp2_matches_ddp",
}

# Non-default values for the warned fields whose type alone does not give a valid one.
WARNED_VALUES = {
    "hub_strategy": "end", "lr_scheduler_type": "linear", "eval_strategy": "steps", "debug": "underflow_overflow",
    "optim_target_modules": ["q_proj"], "torch_compile_mode": "default", "torch_compile_backend": "inductor", "include_for_metrics": ["inputs"],
    "metric_for_best_model": "loss", "eval_delay": 1, "log_level_replica": "info", "project": "p",
    "trackio_space_id": "s", "trackio_bucket_id": "b", "trackio_static_space_id": "t",
    "train_sampling_strategy": "sequential", "dataloader_prefetch_factor": 4, "dataloader_multiprocessing_context": "spawn",
    "optim_args": "a=1", "liger_kernel_config": {"rope": True}, "accelerator_config": {"split_batches": True}, "length_column_name": "len",
}


# Fields transformers only accepts together with others (each of the others is warned about too).
WARNED_TOGETHER = {"load_best_model_at_end": dict(eval_strategy="steps", save_strategy="steps", eval_steps=10,
                                                 save_steps=10)}


def _fields():
    return {f.name: f for f in dataclasses.fields(PPOConfig) if f.init and not f.name.startswith("_")}


def _category(name: str) -> str:
    trainer_fields = {f.name for f in dataclasses.fields(TrainingArguments)}
    cats = []
    if name in HONOURED_BY_TEST:
        cats.append("honoured")
    if name in REJECTED_TRAINING_ARGUMENTS:
        cats.append("refused")
    if name in SCRIPT_TRAINING_ARGUMENTS or name in SCRIPT_TRL_FIELDS:
        cats.append("script")
    if name in DERIVED_FIELDS:
        cats.append("derived")
    if name in UNUSED_TRL_FIELDS or (name in trainer_fields and not cats and name not in HONOURED_TRAINING_ARGUMENTS):
        cats.append("warned")
    assert len(cats) == 1, f"{name}: categories {cats}"
    return cats[0]


def test_every_field_has_one_category():
    cats = {name: _category(name) for name in _fields()}
    assert set(HONOURED_TRAINING_ARGUMENTS) <= {n for n, c in cats.items() if c == "honoured"}
    assert not set(HONOURED_BY_TEST) - set(cats), "honoured fields that PPOConfig does not have"


def test_honoured_fields_have_their_test():
    here = Path(__file__).parent
    missing = []
    for name, ref in HONOURED_BY_TEST.items():
        module, func = ref.split(":")
        if not (here / f"{module}.py").is_file():
            missing.append(f"{name}: tests/trainer/{module}.py")
            continue
        if not hasattr(importlib.import_module(f"tests.trainer.{module}"), func):
            missing.append(f"{name}: {ref}")
    assert not missing, missing


def _non_default(f):
    if f.name in WARNED_VALUES:
        return WARNED_VALUES[f.name]
    default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
    if isinstance(default, bool):
        return not default
    if isinstance(default, int):
        return default + 1
    if isinstance(default, float):
        return default + 0.5
    if default is None:
        return 1 if "int" in str(f.type) else True if "bool" in str(f.type) else "x"
    if isinstance(default, str):
        return default + "x" if default else "x"
    raise AssertionError(f"no non-default value for {f.name} ({f.type}, default {default!r}): add it to WARNED_VALUES")


@pytest.mark.parametrize("name", sorted(n for n in _fields() if _category(n) == "warned"))
def test_warned_fields_warn_by_name(tmp_path, name):
    value = _non_default(_fields()[name])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            PPOConfig(output_dir=str(tmp_path), use_cpu=True, **{name: value}, **WARNED_TOGETHER.get(name, {}))
        except (ValueError, TypeError) as e:  # transformers refuses the value on its own: also never silent
            assert name in str(e) or name.replace("_", " ") in str(e), (name, e)
            return
    assert any(f"PPOConfig.{name}=" in str(w.message) for w in caught), (name, [str(w.message) for w in caught])


@pytest.mark.parametrize("name", sorted(REJECTED_TRAINING_ARGUMENTS))
def test_refused_fields_raise(tmp_path, name):
    from accelerate import ParallelismConfig

    value = {"deepspeed": "ds.json", "fsdp": "full_shard", "fsdp_config": {"min_num_params": 1}, "tf32": True,
             "parallelism_config": ParallelismConfig(dp_shard_size=2)}[name]
    with pytest.raises(ValueError, match=rf"(?s)PPOConfig\.{name}=.* is not supported by rlhf_fast"):
        PPOConfig(output_dir=str(tmp_path), use_cpu=True, **{name: value})


def test_derived_fields_are_written_by_the_trainer(tmp_path):
    tr = make(tmp_path, per_device_train_batch_size=4, gradient_accumulation_steps=2, num_mini_batches=2,
              total_episodes=16)
    a = tr.args
    assert (a.world_size, a.local_batch_size, a.micro_batch_size, a.batch_size, a.mini_batch_size,
            a.local_mini_batch_size, a.num_total_batches) == (1, 8, 4, 8, 4, 4, 2)


# ----------------------------------------------------------------------------- the Trainer surface scripts touch
def test_trainer_attributes_a_script_may_touch(tmp_path, capsys):
    from transformers import TrainerCallback

    tr = make(tmp_path, total_episodes=16)
    assert tr.processing_class is tr.tokenizer and tr.policy_model is tr.model.policy
    acc = tr.accelerator
    assert (acc.is_main_process, acc.is_local_main_process, acc.process_index, acc.num_processes) == (True, True, 0, 1)
    assert acc.unwrap_model(tr.ddp_model) is tr.model and acc.device == tr.device
    assert acc.gather_for_metrics(torch.tensor(2.0)).tolist() == [2.0]
    assert float(acc.reduce(torch.tensor(3.0), "mean")) == 3.0
    acc.wait_for_everyone()
    acc.print("hello from the stand-in")
    assert "hello from the stand-in" in capsys.readouterr().out
    assert tr.is_world_process_zero() and tr.is_local_process_zero()

    steps = []

    class Count(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            steps.append(state.global_step)

    tr.add_callback(Count)  # a class, as transformers accepts
    popped = tr.pop_callback(Count)
    assert isinstance(popped, Count)
    cb = Count()
    tr.add_callback(cb)
    tr.train()
    assert steps == [1, 2]
    tr.remove_callback(cb)
    assert not any(isinstance(c, Count) for c in tr.callback_handler.callbacks)
