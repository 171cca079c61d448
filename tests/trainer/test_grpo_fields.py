"""Every field of GRPOConfig (TRL 1.16's GRPOConfig, transformers' TrainingArguments, ours) is held to one rule:
honoured (a test here changes only that field and sees its effect), refused, warned by name, a no-op rlhf_fast
always applies, or read by scripts only. The walk at the bottom checks the categories and the tests."""
from __future__ import annotations

import dataclasses
import types
import warnings

import pytest
import torch
from transformers import TrainingArguments

from rlhf_fast import GRPOConfig, GRPOTrainer
from rlhf_fast.trainer import grpo_step, ppo_step
from rlhf_fast.trainer.grpo_config import (
    GRPO_HONOURED,
    GRPO_NO_OP,
    GRPO_REFUSED,
    GRPO_TRAINING_ARGUMENTS,
    GRPO_WARNED,
)
from rlhf_fast.trainer.ppo_config import REJECTED_TRAINING_ARGUMENTS, SCRIPT_TRAINING_ARGUMENTS
from tests.trainer.test_grpo_trainer import V, config, rows, share_t5, trainer
from tests.trainer.test_ppo_config_fields import count_calls as spy
from tests.trainer.tiny import make_tokenizer, tiny_policy


def weights(tr) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in tr.model.parameters() if p.requires_grad])


def trained(tmp_path, reward=share_t5, **kw):
    tr = trainer(tmp_path, reward, **kw)
    tr.train()
    return tr


def logs(tr) -> list[dict]:
    return [h for h in tr.state.log_history if "train_runtime" not in h]


def varied(prompts, completions, completion_ids, **kw):
    return [float(sum(ids)) / 100 for ids in completion_ids]


# ----------------------------------------------------------------------------- TRL's GRPOConfig fields
def test_num_generations(tmp_path, monkeypatch):
    calls = spy(monkeypatch, grpo_step, "group_advantages")
    tr = trained(tmp_path, per_device_train_batch_size=6, num_generations=3, max_steps=1)
    (per_func, _, g), _ = calls[0][0][:3], None
    assert g == 3 and per_func.shape[0] == 6 and tr.args.prompts_per_generation == 2


def test_max_completion_length(tmp_path, monkeypatch):
    calls = spy(monkeypatch, ppo_step, "generate_rollout")
    trained(tmp_path, max_completion_length=3, max_steps=1)
    assert calls[0][1]["response_length"] == 3


def test_temperature_and_top_k_top_p(tmp_path, monkeypatch):
    calls = spy(monkeypatch, ppo_step, "generate_rollout")
    base = logs(trained(tmp_path, varied, max_steps=1))[0]
    hot = logs(trained(tmp_path, varied, max_steps=1, temperature=3.0))[0]
    assert hot["entropy"] > base["entropy"]  # log-probs and entropies at the sampling temperature
    greedy = logs(trained(tmp_path, varied, max_steps=1, top_k=1))[0]
    nucleus = logs(trained(tmp_path, varied, max_steps=1, top_p=1e-6))[0]
    assert greedy["frac_reward_zero_std"] == nucleus["frac_reward_zero_std"] == 1.0  # one token left: groups agree
    assert [(c[1]["temperature"], c[1]["top_k"], c[1]["top_p"]) for c in calls] == [
        (1.0, 0, 1.0), (3.0, 0, 1.0), (1.0, 1, 1.0), (1.0, 0, 1e-6)]


def test_beta(tmp_path):
    off = trained(tmp_path, max_steps=2)
    on = trained(tmp_path, max_steps=2, beta=0.5)
    assert off.reference_mode == "none" and on.reference_mode == "frozen"
    assert "kl" not in logs(off)[0] and logs(on)[1]["kl"] > 0
    assert not torch.equal(weights(off), weights(on))


# Off-policy base for the clipping fields: two passes over each generation, a large step.
OFF_POLICY = dict(num_iterations=2, learning_rate=0.2, max_steps=2)


@pytest.mark.parametrize("field, value, base", [
    ("epsilon", 0.01, OFF_POLICY), ("epsilon_high", 0.01, OFF_POLICY), ("delta", 1.0001, OFF_POLICY),
    ("importance_sampling_level", "sequence", OFF_POLICY),
    ("use_bias_correction_kl", False, dict(OFF_POLICY, beta=0.5)),
    ("loss_type", "grpo", {}), ("loss_type", "dr_grpo", {}), ("loss_type", "bnpo", dict(steps_per_generation=2)),
    ("loss_type", "cispo", {}), ("loss_type", "luspo", {}), ("loss_type", "sapo", {}),
    ("sapo_temperature_pos", 3.0, dict(OFF_POLICY, loss_type="sapo")),
    ("sapo_temperature_neg", 3.0, dict(OFF_POLICY, loss_type="sapo")),
    ("scale_rewards", "none", {}), ("scale_rewards", "batch", {}),
    ("multi_objective_aggregation", "normalize_then_sum", {}),
    ("mask_truncated_completions", True, {}), ("top_entropy_quantile", 0.2, {}), ("entropy_coef", 5.0, {}),
])
def test_loss_fields_change_the_update(tmp_path, field, value, base):
    two = [varied, share_t5]
    before = trained(tmp_path, two, **base)
    after = trained(tmp_path, two, **base, **{field: value})
    assert not torch.equal(weights(before), weights(after))


def test_generation_schedule_fields(tmp_path, monkeypatch):
    """num_iterations, steps_per_generation and generation_batch_size set how often TRL generates and on how
    many rows; off-policy passes then read the old log-probs of a rollout forward."""
    def generations(**kw):
        calls = spy(monkeypatch, ppo_step, "generate_rollout")
        fwd = spy(monkeypatch, ppo_step, "rollout_forward")
        trained(tmp_path, max_steps=4, **kw)
        monkeypatch.undo()
        return [c[0][1].shape[0] for c in calls], len(fwd)

    assert generations() == ([8, 8, 8, 8], 0)  # one per optimizer step, on-policy: no old log-probs
    assert generations(num_iterations=2) == ([8, 8], 2)
    assert generations(steps_per_generation=2) == ([16, 16], 2)
    assert generations(generation_batch_size=32) == ([32], 1)


def test_log_completions_and_num_completions_to_print(tmp_path, capsys):
    trained(tmp_path, max_steps=1)
    assert not (tmp_path / "out" / "completions").exists()
    capsys.readouterr()
    trained(tmp_path, max_steps=1, log_completions=True, num_completions_to_print=3)
    assert capsys.readouterr().out.count("[completion]") == 3
    assert (tmp_path / "out" / "completions" / "completions_00001.parquet").is_file()


def test_reward_weights(tmp_path):
    def one(prompts, **kw):
        return [1.0] * len(prompts)

    def two(prompts, **kw):
        return [2.0] * len(prompts)

    assert logs(trained(tmp_path, [one, two], max_steps=1))[0]["reward"] == 3.0
    assert logs(trained(tmp_path, [one, two], max_steps=1, reward_weights=[0.5, -1.0]))[0]["reward"] == -1.5


def test_shuffle_dataset(tmp_path):
    assert trainer(tmp_path).sampler.next_batch()[0].tolist() != [0, 1]
    assert trainer(tmp_path, shuffle_dataset=False).sampler.next_batch()[0].tolist() == [0, 1]


def test_chat_template_kwargs(tmp_path):
    tok = make_tokenizer(V)
    tok.chat_template = "{% if greet %}t9 {% endif %}{% for m in messages %}{{ m['content'] }} {% endfor %}t4"
    plain = trainer(tmp_path, data=rows(16, chat=True), tokenizer=tok)._tokens(0)
    greeted = trainer(tmp_path, data=rows(16, chat=True), tokenizer=tok, chat_template_kwargs={"greet": True})._tokens(0)
    assert greeted == [9] + plain


def test_model_init_kwargs(tmp_path):
    path = tmp_path / "policy"
    tiny_policy(V).save_pretrained(path)
    args = config(tmp_path, model_init_kwargs={"rms_norm_eps": 0.25})
    tr = GRPOTrainer(str(path), share_t5, args=args, train_dataset=rows(), processing_class=make_tokenizer(V))
    assert tr.policy_model.config.rms_norm_eps == 0.25
    with pytest.warns(UserWarning, match="model_init_kwargs is ignored"):
        GRPOTrainer(tiny_policy(V), share_t5, args=args, train_dataset=rows(), processing_class=make_tokenizer(V))


# ----------------------------------------------------------------------------- ours
def test_max_prompt_length(tmp_path, monkeypatch):
    calls = spy(monkeypatch, ppo_step, "generate_rollout")
    trained(tmp_path, max_steps=1)
    trained(tmp_path, max_steps=1, max_prompt_length=2)
    assert calls[0][0][1].shape[1] > 2 and calls[1][0][1].shape[1] == 2


def test_dynamic_sampling_and_overlong_fields(tmp_path):
    flat = trained(tmp_path, lambda prompts, **kw: [1.0] * len(prompts), max_steps=1, dynamic_sampling=True,
                   dynamic_sampling_max_rounds=3)
    assert logs(flat)[0]["dynamic_sampling/rounds"] == 3
    short = logs(trained(tmp_path, varied, max_steps=1, overlong_buffer_length=2))[0]
    long = logs(trained(tmp_path, varied, max_steps=1, overlong_buffer_length=6, overlong_penalty_factor=2.0))[0]
    assert long["rewards/overlong_penalty/mean"] < short["rewards/overlong_penalty/mean"] < 0


def test_reference_fields(tmp_path):
    ref = trainer(tmp_path, beta=0.1, reference_dtype="bf16", reference_offload=True).model.reference
    assert next(ref.model.parameters()).dtype == torch.bfloat16 and ref.auto_offload
    assert not trainer(tmp_path, beta=0.1).model.reference.auto_offload


def test_max_nonfinite_steps(tmp_path, monkeypatch):
    from rlhf_fast.trainer import NonFiniteError

    monkeypatch.setattr(ppo_step, "clip_grad_norm", lambda model, max_norm: torch.tensor(float("nan")))
    with pytest.warns(UserWarning, match="non-finite"):
        tr = trained(tmp_path, max_steps=1, max_nonfinite_steps=2)
    assert torch.equal(weights(tr), weights(trainer(tmp_path)))  # the poisoned update was skipped
    with pytest.raises(NonFiniteError):
        trained(tmp_path, max_steps=3, max_nonfinite_steps=2)


def test_distributed_strategy(tmp_path, monkeypatch):
    """Under torchrun the shared wrapper receives it (tests/trainer/test_distributed.py runs the strategies)."""
    seen = []
    from rlhf_fast.trainer import distributed

    monkeypatch.setattr(distributed, "rank_and_world_size", lambda: (0, 2))
    monkeypatch.setattr(distributed, "limit_threads_per_rank", lambda n: None)
    monkeypatch.setattr(distributed, "wrap_model", lambda model, args, device: seen.append(args.distributed_strategy)
                        or model)
    trainer(tmp_path, distributed_strategy="ddp", per_device_train_batch_size=4)
    assert seen == ["ddp"]
    with pytest.raises(ValueError, match="distributed_strategy must be one of"):
        config(tmp_path, distributed_strategy="zero3")


# ----------------------------------------------------------------------------- TrainingArguments
def test_steps_epochs_and_batch_fields(tmp_path, monkeypatch):
    # 16 prompts, 2 per generation: 8 optimizer steps per epoch
    assert trainer(tmp_path, max_steps=-1).state.max_steps == 24  # num_train_epochs defaults to 3
    assert trainer(tmp_path, max_steps=-1, num_train_epochs=0.5).state.max_steps == 4
    assert trainer(tmp_path, max_steps=3).state.max_steps == 3
    calls = spy(monkeypatch, grpo_step, "micro_loss")
    steps = spy(monkeypatch, torch.optim.AdamW, "step")
    trained(tmp_path, max_steps=2, per_device_train_batch_size=4, gradient_accumulation_steps=2)
    assert [c[0][1].shape[0] for c in calls] == [4, 4, 4, 4] and len(steps) == 2


def test_seed_and_data_seed(tmp_path):
    def first(**kw):
        return trainer(tmp_path, **kw).sampler.next_batch()[0].tolist()

    assert first(seed=1, data_seed=5) == first(seed=2, data_seed=5) != first(seed=1, data_seed=6)
    assert not torch.equal(weights(trained(tmp_path, seed=1, max_steps=1)), weights(trained(tmp_path, seed=2,
                                                                                              max_steps=1)))


def test_logging_fields(tmp_path):
    def steps(**kw):
        return [h["step"] for h in logs(trained(tmp_path, max_steps=4, **kw))]

    assert steps(logging_steps=2) == [2, 4]
    assert steps(logging_steps=3, logging_first_step=True) == [1, 3, 4]
    assert steps(logging_strategy="no") == []
    tr = trained(tmp_path, max_steps=2, output_dir=str(tmp_path / "elsewhere"))
    assert (tmp_path / "elsewhere" / "metrics.jsonl").is_file() and len(logs(tr)) == 2


def test_save_fields(tmp_path):
    def checkpoints(name, **kw):
        out = tmp_path / name
        trained(tmp_path, output_dir=str(out), max_steps=3, **kw)
        return sorted(p.name for p in out.glob("checkpoint-*"))

    assert checkpoints("a", save_strategy="steps", save_steps=1) == ["checkpoint-1", "checkpoint-2", "checkpoint-3"]
    assert checkpoints("b", save_strategy="steps", save_steps=2) == ["checkpoint-2", "checkpoint-3"]  # + the end
    assert checkpoints("c", save_strategy="steps", save_steps=1, save_total_limit=1) == ["checkpoint-3"]
    assert checkpoints("d", save_strategy="no", save_steps=1) == []
    checkpoints("e", save_strategy="steps", save_steps=3, save_only_model=True)
    assert not (tmp_path / "e" / "checkpoint-3" / "optimizer.pt").exists()


def test_optimizer_and_schedule_fields(tmp_path):
    tr = trainer(tmp_path, learning_rate=0.5, weight_decay=0.1, adam_beta1=0.8, adam_beta2=0.9, adam_epsilon=1e-3,
                 optim="adamw_torch")
    g = tr.optimizer.param_groups[0]
    assert (g["lr"], g["weight_decay"], g["betas"], g["eps"]) == (0.5, 0.1, (0.8, 0.9), 1e-3)
    assert not tr.optimizer.defaults["fused"]
    assert trainer(tmp_path, optim="adamw_torch_fused").optimizer.defaults["fused"] is True

    def lrs(**kw):
        return [h["learning_rate"] for h in logs(trained(tmp_path, max_steps=4, learning_rate=1.0, **kw))]

    assert lrs() == pytest.approx([1.0, 0.75, 0.5, 0.25])  # transformers' linear schedule: the lr of each step
    assert lrs(lr_scheduler_type="constant_with_warmup", warmup_steps=2) == pytest.approx([0.0, 0.5, 1.0, 1.0])
    assert lrs(lr_scheduler_type="cosine_with_restarts", lr_scheduler_kwargs={"num_cycles": 2}) != pytest.approx(
        lrs(lr_scheduler_type="cosine_with_restarts"))


def test_max_grad_norm(tmp_path):
    unclipped = trained(tmp_path, max_steps=1, max_grad_norm=0.0)
    clipped = trained(tmp_path, max_steps=1, max_grad_norm=1e-4)  # Trainer clips (TRL's default 1.0)
    assert logs(clipped)[0]["grad_norm"] == logs(unclipped)[0]["grad_norm"] > 1e-4  # the norm before clipping
    assert not torch.equal(weights(clipped), weights(unclipped))


def test_precision_device_and_checkpointing_fields(tmp_path):
    from rlhf_fast.models.policy_value import is_checkpointing

    with trainer(tmp_path, bf16=True)._autocast():
        assert torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16
    with trainer(tmp_path, bf16=False, fp16=True)._autocast():
        assert torch.get_autocast_dtype("cpu") == torch.float16
    assert trainer(tmp_path).device == torch.device("cpu")
    assert is_checkpointing(trainer(tmp_path, gradient_checkpointing=True).model.policy)
    assert not is_checkpointing(trainer(tmp_path, gradient_checkpointing=False).model.policy)
    funcs = [m._gradient_checkpointing_func for m in trainer(
        tmp_path, gradient_checkpointing=True, gradient_checkpointing_kwargs={"use_reentrant": True}).model.policy.modules()
        if hasattr(m, "_gradient_checkpointing_func")]
    assert funcs and all(f.keywords.get("use_reentrant") for f in funcs)
    assert is_checkpointing(trainer(tmp_path, activation_checkpointing=True).model.policy)


def test_reporting_fields(tmp_path, monkeypatch, capsys):
    import sys

    names = []
    fake = types.SimpleNamespace(run=None, init=lambda name=None, config=None: names.append(name) or
                                 types.SimpleNamespace(log=lambda *a, **k: None))
    monkeypatch.setitem(sys.modules, "wandb", fake)
    trained(tmp_path, max_steps=1, report_to="wandb", run_name="alpha")
    assert names == ["alpha"]
    trained(tmp_path, max_steps=1, disable_tqdm=False)
    assert "GRPO" in capsys.readouterr().err


def test_hub_fields(tmp_path, monkeypatch):
    import huggingface_hub

    from tests.trainer.test_field_walk import FakeHub

    monkeypatch.setattr(huggingface_hub, "HfApi", FakeHub)
    FakeHub.calls = []
    tr = trained(tmp_path, max_steps=1, output_dir=str(tmp_path / "run"), push_to_hub=True, hub_model_id="org/m",
                 hub_token="tok", hub_private_repo=True, hub_revision="dev")
    tr.save_model()
    assert FakeHub.calls[0] == ("create_repo", "org/m", True, "tok") and FakeHub.calls[1][3:] == ("Model save", "dev")
    assert "GRPO" in (tmp_path / "run" / "README.md").read_text()


def test_ddp_timeout(tmp_path, monkeypatch):
    seen = []
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setattr(torch.distributed, "init_process_group", lambda backend=None, **kw: seen.append(kw))
    trainer(tmp_path, ddp_timeout=123)
    assert seen[0]["timeout"].total_seconds() == 123


# ----------------------------------------------------------------------------- the walk
OURS = {"max_prompt_length": "test_max_prompt_length", "dynamic_sampling": "test_dynamic_sampling_and_overlong_fields",
        "dynamic_sampling_max_rounds": "test_dynamic_sampling_and_overlong_fields",
        "overlong_buffer_length": "test_dynamic_sampling_and_overlong_fields",
        "overlong_penalty_factor": "test_dynamic_sampling_and_overlong_fields",
        "reference_dtype": "test_reference_fields", "reference_offload": "test_reference_fields",
        "max_nonfinite_steps": "test_max_nonfinite_steps", "distributed_strategy": "test_distributed_strategy"}
HONOURED_BY_TEST = {
    **{f: "test_num_generations" for f in ("num_generations",)}, "max_completion_length": "test_max_completion_length",
    **{f: "test_temperature_and_top_k_top_p" for f in ("temperature", "top_p", "top_k")}, "beta": "test_beta",
    **{f: "test_loss_fields_change_the_update" for f in (
        "epsilon", "epsilon_high", "delta", "importance_sampling_level", "use_bias_correction_kl", "loss_type",
        "sapo_temperature_pos", "sapo_temperature_neg", "scale_rewards", "multi_objective_aggregation",
        "mask_truncated_completions", "top_entropy_quantile", "entropy_coef")},
    **{f: "test_generation_schedule_fields" for f in ("num_iterations", "steps_per_generation", "generation_batch_size")},
    **{f: "test_log_completions_and_num_completions_to_print" for f in ("log_completions", "num_completions_to_print")},
    "reward_weights": "test_reward_weights", "shuffle_dataset": "test_shuffle_dataset",
    "chat_template_kwargs": "test_chat_template_kwargs", "model_init_kwargs": "test_model_init_kwargs",
    **OURS,
    **{f: "test_steps_epochs_and_batch_fields" for f in (
        "max_steps", "num_train_epochs", "per_device_train_batch_size", "gradient_accumulation_steps")},
    **{f: "test_seed_and_data_seed" for f in ("seed", "data_seed")},
    **{f: "test_logging_fields" for f in ("logging_steps", "logging_first_step", "logging_strategy", "output_dir")},
    **{f: "test_save_fields" for f in ("save_steps", "save_strategy", "save_total_limit", "save_only_model")},
    **{f: "test_optimizer_and_schedule_fields" for f in (
        "learning_rate", "weight_decay", "adam_beta1", "adam_beta2", "adam_epsilon", "optim", "lr_scheduler_type",
        "lr_scheduler_kwargs", "warmup_steps")},
    "max_grad_norm": "test_max_grad_norm",
    **{f: "test_precision_device_and_checkpointing_fields" for f in (
        "bf16", "fp16", "use_cpu", "gradient_checkpointing", "gradient_checkpointing_kwargs", "activation_checkpointing",
        "activation_checkpointing_kwargs")},
    **{f: "test_reporting_fields" for f in ("report_to", "run_name", "disable_tqdm")},
    **{f: "test_hub_fields" for f in ("push_to_hub", "hub_model_id", "hub_token", "hub_private_repo", "hub_revision")},
    "ddp_timeout": "test_ddp_timeout",
}


def _fields():
    return {f.name: f for f in dataclasses.fields(GRPOConfig) if f.init and not f.name.startswith("_")}


def _category(name: str) -> str:
    cats = []
    if name in HONOURED_BY_TEST:
        cats.append("honoured")
    if name in GRPO_REFUSED or name in REJECTED_TRAINING_ARGUMENTS:
        cats.append("refused")
    if name in GRPO_NO_OP:
        cats.append("no-op")
    if name in SCRIPT_TRAINING_ARGUMENTS:
        cats.append("script")
    trainer_fields = {f.name for f in dataclasses.fields(TrainingArguments)}
    if name in GRPO_WARNED or (name in trainer_fields and not cats):
        cats.append("warned")
    assert len(cats) == 1, f"{name}: categories {cats}"
    return cats[0]


def test_defaults_warn_nothing(tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        GRPOConfig(output_dir=str(tmp_path), use_cpu=True)


def test_every_field_has_one_category_and_the_honoured_ones_a_test():
    cats = {name: _category(name) for name in _fields()}
    assert GRPO_HONOURED | GRPO_TRAINING_ARGUMENTS | set(OURS) == {n for n, c in cats.items() if c == "honoured"}
    assert all(callable(globals()[test]) for test in HONOURED_BY_TEST.values())


def _non_default(f):
    special = {"eval_strategy": "steps", "hub_strategy": "end", "lr_scheduler_type": "linear", "debug": "underflow_overflow",
               "vllm_importance_sampling_mode": "token_mask", "vllm_importance_sampling_clip_max": 2.0,
               "pad_to_multiple_of": 8, "generation_kwargs": {"a": 1}, "transformers_continuous_batching_config": {"a": 1},
               "include_for_metrics": ["inputs"], "optim_target_modules": ["q_proj"], "torch_compile_mode": "default",
               "torch_compile_backend": "inductor", "metric_for_best_model": "loss", "eval_delay": 1,
               "log_level_replica": "info", "train_sampling_strategy": "sequential", "dataloader_prefetch_factor": 4,
               "dataloader_multiprocessing_context": "spawn", "optim_args": "a=1", "liger_kernel_config": {"rope": True},
               "accelerator_config": {"split_batches": True}, "length_column_name": "len", "project": "p",
               "trackio_space_id": "s", "trackio_bucket_id": "b", "trackio_static_space_id": "t"}
    if f.name in special:
        return special[f.name]
    default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
    if isinstance(default, bool):
        return not default
    if isinstance(default, (int, float)):
        return default + 1
    if default is None:
        return 1 if "int" in str(f.type) else True if "bool" in str(f.type) else 0.5 if "float" in str(f.type) else "x"
    return default + "x" if isinstance(default, str) and default else "x"


@pytest.mark.parametrize("name", sorted(n for n in _fields() if _category(n) == "warned"))
def test_warned_fields_warn_by_name(tmp_path, name):
    together = {"load_best_model_at_end": dict(eval_strategy="steps", save_strategy="steps", eval_steps=10,
                                               save_steps=10)}.get(name, {})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            GRPOConfig(output_dir=str(tmp_path), use_cpu=True, **{name: _non_default(_fields()[name])}, **together)
        except (ValueError, TypeError) as e:  # transformers refuses the value on its own: also never silent
            assert name in str(e) or name.replace("_", " ") in str(e), (name, e)
            return
    assert any(f"GRPOConfig.{name}=" in str(w.message) for w in caught), (name, [str(w.message) for w in caught])


@pytest.mark.parametrize("name", sorted(set(GRPO_REFUSED) | REJECTED_TRAINING_ARGUMENTS))
def test_refused_fields_raise(tmp_path, name):
    from accelerate import ParallelismConfig

    value = {"deepspeed": "ds.json", "fsdp": "full_shard", "fsdp_config": {"min_num_params": 1}, "tf32": True,
             "parallelism_config": ParallelismConfig(dp_shard_size=2), "off_policy_mask_threshold": 0.5}.get(name, True)
    with pytest.raises(ValueError, match=rf"(?s)GRPOConfig\.{name}=.* is not supported by rlhf_fast's GRPOTrainer"):
        GRPOConfig(output_dir=str(tmp_path), use_cpu=True, **{name: value})
    with pytest.raises(ValueError, match="loss_type='vespo' is not supported"):
        GRPOConfig(output_dir=str(tmp_path), use_cpu=True, loss_type="vespo")


@pytest.mark.parametrize("name", sorted(GRPO_NO_OP))
def test_no_op_fields_change_nothing(tmp_path, name):
    """rlhf_fast always computes log-probs in fp32 and disables dropout; every column reaches the rewards."""
    value = not _fields()[name].default
    assert torch.equal(weights(trained(tmp_path, max_steps=1)), weights(trained(tmp_path, max_steps=1, **{name: value})))
