"""GRPOConfig: the drop-in for TRL 1.16's ``trl.GRPOConfig`` (a ``transformers.TrainingArguments``).

Every field of TRL 1.16's GRPOConfig keeps its name, type and default, so a TRL script (and its command
line, through HfArgumentParser) runs unchanged. Each field is held to one rule
(tests/trainer/test_grpo_fields.py walks them all):

- honoured (``GRPO_HONOURED``): a test changes only that field and sees its effect; with them the
  TrainingArguments fields PPOConfig honours (``HONOURED_TRAINING_ARGUMENTS``);
- refused when set (``GRPO_REFUSED``): vLLM, continuous batching, the reference-sync and off-policy-mask
  variants, VESPO, and DeepSpeed / FSDP / tf32 / parallelism_config, each with a message saying why;
- warned by name when set to a non-default value (``GRPO_WARNED``): generation knobs the lean decoder has
  no equivalent for, hub-logging extras, tool calling, MoE aux loss, and unused TrainingArguments;
- accepted as no-ops (``GRPO_NO_OP``): what rlhf_fast always does anyway (fp32 log-probs, dropout off).

rlhf_fast's own knobs follow TRL's fields: ``max_prompt_length`` (left-truncates prompts, as TRL did
before 1.0), DAPO's ``dynamic_sampling`` and overlong reward shaping, the reference's dtype and offload,
the non-finite guard and the distributed strategy. All are off (TRL's behaviour) by default.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from transformers import TrainingArguments

from rlhf_fast.trainer.ppo_config import (
    HONOURED_TRAINING_ARGUMENTS,
    SCRIPT_TRAINING_ARGUMENTS,
    finish_post_init,
    unused_training_arguments,
)

LOSS_TYPES = ("grpo", "dr_grpo", "bnpo", "dapo", "cispo", "sapo", "luspo")

# TRL GRPOConfig fields with a visible effect here (each has a test).
GRPO_HONOURED = {
    "num_generations", "max_completion_length", "temperature", "top_p", "top_k", "beta", "epsilon",
    "epsilon_high", "delta", "loss_type", "scale_rewards", "importance_sampling_level", "num_iterations",
    "steps_per_generation", "generation_batch_size", "mask_truncated_completions", "top_entropy_quantile",
    "log_completions", "num_completions_to_print", "reward_weights", "multi_objective_aggregation",
    "sapo_temperature_neg", "sapo_temperature_pos", "entropy_coef", "use_bias_correction_kl", "shuffle_dataset",
    "chat_template_kwargs", "model_init_kwargs",
}
# Set to anything but the default, these would change what TRL computes in ways not reproduced here.
GRPO_REFUSED = {
    "use_vllm": (False, "rlhf_fast generates with its own KV-cache decoder; drop use_vllm"),
    "use_transformers_continuous_batching": (False, "rlhf_fast generates with its own KV-cache decoder"),
    "use_transformers_paged": (False, "rlhf_fast generates with its own KV-cache decoder"),
    "sync_ref_model": (False, "reference-model syncing (TR-DPO) is not implemented"),
    "off_policy_mask_threshold": (None, "the off-policy sequence mask is not implemented"),
    "use_adaptive_entropy": (False, "the adaptive entropy controller is not implemented; use entropy_coef"),
}
# No equivalent here: warned by name when set to a non-default value (the run is otherwise TRL's).
GRPO_WARNED = {
    "min_p": None, "repetition_penalty": 1.0, "generation_kwargs": None, "cache_implementation": None,
    "pad_to_multiple_of": None, "num_generations_eval": None, "ds3_gather_for_generation": True,
    "trust_remote_code": False, "router_aux_loss_coef": None, "max_tool_calling_iterations": None,
    "log_multimodal": True, "log_unique_prompts": False, "log_completions_hub_repo": None,
    "transformers_continuous_batching_config": None, "vllm_mode": "colocate", "vllm_model_impl": "vllm",
    "vllm_enable_sleep_mode": False, "vllm_structured_outputs_regex": None, "vllm_server_base_url": None,
    "vllm_server_host": "0.0.0.0", "vllm_server_port": 8000, "vllm_server_timeout": 240.0, "vllm_group_port": 51216,
    "vllm_gpu_memory_utilization": 0.3, "vllm_max_model_length": None, "vllm_tensor_parallel_size": 1,
    "vllm_importance_sampling_correction": True, "vllm_importance_sampling_mode": "sequence_mask",
    "vllm_importance_sampling_clip_max": 3.0, "vllm_importance_sampling_clip_min": None,
    "vllm_importance_sampling_cap": None, "ref_model_mixup_alpha": 0.6, "ref_model_sync_steps": 512,
    "entropy_coef_min": 0.0, "entropy_coef_max": 1.0, "entropy_coef_delta": 0.005, "entropy_target": 0.2,
    "vespo_k_pos": 2.0, "vespo_lambda_pos": 3.0, "vespo_k_neg": 3.0, "vespo_lambda_neg": 2.0,
}
# What rlhf_fast always does: log-probs accumulate in fp32 (the fused LM head), dropout is off in every
# model (PPO ratios are 1 on-policy), the dataset's columns all reach the reward functions.
GRPO_NO_OP = {"cast_lm_head_to_fp32", "disable_dropout", "remove_unused_columns"}
# The TrainingArguments fields GRPOTrainer reads: PPOConfig's honoured ones but the evaluation fields (TRL's
# per-step evaluation is not run here; eval_steps and per_device_eval_batch_size warn, as eval_strategy does).
GRPO_TRAINING_ARGUMENTS = HONOURED_TRAINING_ARGUMENTS - {"per_device_eval_batch_size", "eval_steps"}


@dataclass
class GRPOConfig(TrainingArguments):
    """Configuration of rlhf_fast's GRPOTrainer: TRL 1.16's GRPOConfig fields and defaults, then ours.

    Batch arithmetic as TRL: a generation batch of ``generation_batch_size`` completions (default
    per_device_train_batch_size x world size x steps_per_generation, steps_per_generation defaulting to
    gradient_accumulation_steps) = generation_batch_size / num_generations prompts, sampled once and split into
    ``steps_per_generation`` micro-batches; ``num_iterations`` passes over it; one optimizer step per
    gradient_accumulation_steps micro-batches. The module docstring lists which fields are honoured, refused,
    warned or no-ops.
    """

    _VALID_DICT_FIELDS = TrainingArguments._VALID_DICT_FIELDS + [
        "model_init_kwargs", "transformers_continuous_batching_config", "generation_kwargs", "chat_template_kwargs"]

    # ---- TrainingArguments defaults TRL overrides
    learning_rate: float = field(default=1e-6, metadata={"help": "AdamW learning rate."})
    logging_steps: float = field(default=10, metadata={"help": "Log every X optimizer steps (or a ratio < 1)."})
    gradient_checkpointing: bool | None = field(
        default=None,
        metadata={"help": "Recompute activations in backward: True / False force it; None (ours) decides from the "
                          "memory predictor and logs the decision. TRL defaults to True; it changes time and memory, "
                          "never the numbers."},
    )
    bf16: bool | None = field(default=None, metadata={"help": "bf16 autocast; None -> not fp16 (TRL)."})
    lr_scheduler_kwargs: dict | str | None = field(default=None, metadata={"help": "Scheduler keyword arguments."})
    remove_unused_columns: bool | None = field(default=False, metadata={"help": "Kept False: columns reach rewards."})

    # ---- model and reference
    model_init_kwargs: dict[str, Any] | str | None = field(
        default=None, metadata={"help": "from_pretrained kwargs when `model` is a path (dtype default float32)."})
    trust_remote_code: bool = field(default=False, metadata={"help": "Not used (local directories only)."})
    router_aux_loss_coef: float | None = field(default=None, metadata={"help": "MoE aux loss: not used."})
    disable_dropout: bool = field(default=False, metadata={"help": "No-op: rlhf_fast always disables dropout."})
    cast_lm_head_to_fp32: bool = field(default=False, metadata={"help": "No-op: log-probs accumulate in fp32."})

    # ---- data and generation
    num_generations: int | None = field(default=8, metadata={"help": "Completions per prompt (G)."})
    num_generations_eval: int | None = field(default=None, metadata={"help": "Not used (no per-step eval)."})
    max_completion_length: int | None = field(default=512, metadata={"help": "Maximum completion tokens."})
    ds3_gather_for_generation: bool = field(default=True, metadata={"help": "DeepSpeed-only (not used)."})
    shuffle_dataset: bool | None = field(default=True, metadata={"help": "Shuffle the prompts each epoch."})
    pad_to_multiple_of: int | str | None = field(default="auto", metadata={"help": "Not used."})
    generation_batch_size: int | None = field(default=None, metadata={"help": "Completions per generation."})
    steps_per_generation: int | None = field(default=None, metadata={"help": "Micro-batches per generation."})
    temperature: float = field(default=1.0, metadata={"help": "Sampling temperature."})
    top_p: float = field(default=1.0, metadata={"help": "Nucleus sampling mass (1.0: off)."})
    top_k: int = field(default=0, metadata={"help": "Top-k sampling (0: off)."})
    min_p: float | None = field(default=None, metadata={"help": "Not used (warned)."})
    generation_kwargs: dict | str | None = field(default=None, metadata={"help": "Not used (warned)."})
    chat_template_kwargs: dict | str | None = field(default=None, metadata={"help": "apply_chat_template kwargs."})
    repetition_penalty: float = field(default=1.0, metadata={"help": "Not used (warned)."})
    cache_implementation: str | None = field(default=None, metadata={"help": "Not used (warned)."})

    # ---- vLLM (refused / warned)
    use_vllm: bool = field(default=False, metadata={"help": "Refused: rlhf_fast decodes itself."})
    vllm_mode: str = field(default="colocate", metadata={"help": "vLLM only."})
    vllm_model_impl: str = field(default="vllm", metadata={"help": "vLLM only."})
    vllm_enable_sleep_mode: bool = field(default=False, metadata={"help": "vLLM only."})
    vllm_structured_outputs_regex: str | None = field(default=None, metadata={"help": "vLLM only."})
    vllm_server_base_url: str | None = field(default=None, metadata={"help": "vLLM only."})
    vllm_server_host: str = field(default="0.0.0.0", metadata={"help": "vLLM only."})
    vllm_server_port: int = field(default=8000, metadata={"help": "vLLM only."})
    vllm_server_timeout: float = field(default=240.0, metadata={"help": "vLLM only."})
    vllm_group_port: int = field(default=51216, metadata={"help": "vLLM only."})
    vllm_gpu_memory_utilization: float = field(default=0.3, metadata={"help": "vLLM only."})
    vllm_max_model_length: int | None = field(default=None, metadata={"help": "vLLM only."})
    vllm_tensor_parallel_size: int = field(default=1, metadata={"help": "vLLM only."})

    # ---- the loss
    beta: float = field(default=0.0, metadata={"help": "KL coefficient (0: no reference model)."})
    num_iterations: int = field(default=1, metadata={"help": "Passes over each generation batch (mu)."})
    epsilon: float = field(default=0.2, metadata={"help": "Lower clip range."})
    delta: float | None = field(default=None, metadata={"help": "Two-sided clip: the unclipped ratio capped here."})
    epsilon_high: float | None = field(default=None, metadata={"help": "Upper clip range (default: epsilon)."})
    sapo_temperature_neg: float = field(default=1.05, metadata={"help": "SAPO tau for A < 0."})
    sapo_temperature_pos: float = field(default=1.0, metadata={"help": "SAPO tau for A > 0."})
    vespo_k_pos: float = field(default=2.0, metadata={"help": "VESPO only (not supported)."})
    vespo_lambda_pos: float = field(default=3.0, metadata={"help": "VESPO only (not supported)."})
    vespo_k_neg: float = field(default=3.0, metadata={"help": "VESPO only (not supported)."})
    vespo_lambda_neg: float = field(default=2.0, metadata={"help": "VESPO only (not supported)."})
    importance_sampling_level: str = field(default="token", metadata={"help": "token | sequence (GSPO)."})
    reward_weights: list[float] | None = field(default=None, metadata={"help": "One weight per reward function."})
    multi_objective_aggregation: str = field(
        default="sum_then_normalize", metadata={"help": "sum_then_normalize | normalize_then_sum."})
    scale_rewards: str = field(default="group", metadata={"help": "group | batch | none (True/False: group/none)."})
    loss_type: str = field(default="dapo", metadata={"help": "grpo | dr_grpo | bnpo | dapo | cispo | sapo | luspo."})
    mask_truncated_completions: bool = field(default=False, metadata={"help": "No loss on truncated completions."})
    sync_ref_model: bool = field(default=False, metadata={"help": "Refused (not implemented)."})
    ref_model_mixup_alpha: float = field(default=0.6, metadata={"help": "sync_ref_model only."})
    ref_model_sync_steps: int = field(default=512, metadata={"help": "sync_ref_model only."})
    top_entropy_quantile: float = field(default=1.0, metadata={"help": "Policy loss on the top-rho entropy tokens."})
    entropy_coef: float = field(default=0.0, metadata={"help": "Entropy bonus coefficient."})
    use_adaptive_entropy: bool = field(default=False, metadata={"help": "Refused (not implemented)."})
    entropy_coef_min: float = field(default=0.0, metadata={"help": "use_adaptive_entropy only."})
    entropy_coef_max: float = field(default=1.0, metadata={"help": "use_adaptive_entropy only."})
    entropy_coef_delta: float = field(default=0.005, metadata={"help": "use_adaptive_entropy only."})
    entropy_target: float = field(default=0.2, metadata={"help": "use_adaptive_entropy only."})
    max_tool_calling_iterations: int | None = field(default=None, metadata={"help": "Tools: not supported."})
    vllm_importance_sampling_correction: bool = field(default=True, metadata={"help": "vLLM only."})
    vllm_importance_sampling_mode: str = field(default="sequence_mask", metadata={"help": "vLLM only."})
    vllm_importance_sampling_clip_max: float | None = field(default=3.0, metadata={"help": "vLLM only."})
    vllm_importance_sampling_clip_min: float | None = field(default=None, metadata={"help": "vLLM only."})
    off_policy_mask_threshold: float | None = field(default=None, metadata={"help": "Refused (not implemented)."})
    use_bias_correction_kl: bool = field(default=True, metadata={"help": "KL term x the importance ratio."})

    # ---- logging
    log_completions: bool = field(default=False, metadata={"help": "Print and save completions when logging."})
    log_multimodal: bool = field(default=True, metadata={"help": "Not used (text only)."})
    num_completions_to_print: int | None = field(default=None, metadata={"help": "Rows printed (None: all)."})
    log_unique_prompts: bool = field(default=False, metadata={"help": "wandb tables only (warned)."})
    log_completions_hub_repo: str | None = field(default=None, metadata={"help": "Not used (warned)."})
    use_transformers_continuous_batching: bool = field(default=False, metadata={"help": "Refused."})
    transformers_continuous_batching_config: dict | str | None = field(default=None, metadata={"help": "Not used."})
    use_transformers_paged: bool = field(default=False, metadata={"help": "Refused (deprecated in TRL)."})
    vllm_importance_sampling_cap: float | None = field(default=None, metadata={"help": "vLLM only (deprecated)."})

    # ---- rlhf_fast knobs (off by default: TRL's behaviour)
    max_prompt_length: int | None = field(
        default=None, metadata={"help": "Keep the last N prompt tokens (TRL < 1.0's field; None: no truncation)."})
    dynamic_sampling: bool = field(
        default=False, metadata={"help": "DAPO: drop groups whose rewards do not vary, sample again to fill the batch."})
    dynamic_sampling_max_rounds: int = field(
        default=8, metadata={"help": "Generation rounds per batch at most; then zero-variance groups fill the rest."})
    overlong_buffer_length: int | None = field(
        default=None, metadata={"help": "DAPO overlong shaping: the soft-penalty window L_cache (None: off)."})
    overlong_penalty_factor: float = field(default=1.0, metadata={"help": "Scale of the overlong penalty."})
    reference_dtype: str = field(default="auto", metadata={"help": "auto | bf16 | fp16 | fp32 (frozen reference)."})
    reference_offload: bool = field(default=False, metadata={"help": "Keep the frozen reference on CPU."})
    max_nonfinite_steps: int = field(default=3, metadata={"help": "Stop after this many non-finite skipped steps."})
    distributed_strategy: str = field(default="ddp", metadata={"help": "Under torchrun: ddp | fsdp2."})

    def __post_init__(self):
        self.bf16 = (not self.fp16) if self.bf16 is None else self.bf16
        self.scale_rewards = {True: "group", False: "none"}.get(self.scale_rewards, self.scale_rewards)
        if isinstance(self.pad_to_multiple_of, str) and self.pad_to_multiple_of != "auto":
            self.pad_to_multiple_of = None if self.pad_to_multiple_of.lower() in ("none", "null") \
                else int(self.pad_to_multiple_of)
        if self.pad_to_multiple_of == "auto":
            self.pad_to_multiple_of = None
        self._check_values()
        for name, (default, why) in GRPO_REFUSED.items():
            if getattr(self, name) != default:
                raise ValueError(f"GRPOConfig.{name}={getattr(self, name)!r} is not supported by rlhf_fast's "
                                 f"GRPOTrainer: {why}")
        finish_post_init(self, "GRPOTrainer")
        self._batch_arithmetic()

    def _check_values(self) -> None:
        if self.loss_type == "vespo":
            raise ValueError("GRPOConfig.loss_type='vespo' is not supported by rlhf_fast's GRPOTrainer (its gamma "
                             f"weights are not implemented); use one of {LOSS_TYPES}")
        choices = {"loss_type": LOSS_TYPES, "scale_rewards": ("group", "batch", "none"),
                   "importance_sampling_level": ("token", "sequence"),
                   "multi_objective_aggregation": ("sum_then_normalize", "normalize_then_sum"),
                   "reference_dtype": ("auto", "bf16", "fp16", "fp32"), "distributed_strategy": ("ddp", "fsdp2")}
        for name, valid in choices.items():
            if getattr(self, name) not in valid:
                raise ValueError(f"GRPOConfig.{name} must be one of {valid}, got {getattr(self, name)!r}")
        if self.num_generations is None or self.num_generations < 2:
            raise ValueError("GRPO requires at least 2 generations per prompt to calculate the advantages, got "
                             f"num_generations={self.num_generations}")
        if self.max_completion_length is None or self.max_completion_length < 1:
            raise ValueError(f"max_completion_length must be >= 1, got {self.max_completion_length}")
        if self.max_prompt_length is not None and self.max_prompt_length < 1:
            raise ValueError(f"max_prompt_length must be >= 1 or None, got {self.max_prompt_length}")
        if self.temperature <= 0:
            raise ValueError(f"temperature must be > 0 (GRPO samples), got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0: off), got {self.top_k}")
        if not 0.0 < self.top_entropy_quantile <= 1.0:
            raise ValueError(f"top_entropy_quantile must be in (0, 1], got {self.top_entropy_quantile}")
        if self.beta < 0:
            raise ValueError(f"beta must be >= 0, got {self.beta}")
        for name in ("num_iterations", "dynamic_sampling_max_rounds", "max_nonfinite_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.overlong_buffer_length is not None and not 0 < self.overlong_buffer_length <= self.max_completion_length:
            raise ValueError(f"overlong_buffer_length must be in [1, max_completion_length={self.max_completion_length}]"
                             f" or None, got {self.overlong_buffer_length}")

    def _batch_arithmetic(self) -> None:
        """TRL's generation batch: generation_batch_size and steps_per_generation, one derived from the other."""
        world = self.world_size
        global_micro = self.per_device_train_batch_size * world
        if self.generation_batch_size is None and self.steps_per_generation is None:
            self.steps_per_generation = self.gradient_accumulation_steps
            self.generation_batch_size = global_micro * self.steps_per_generation
        elif self.generation_batch_size is not None and self.steps_per_generation is None:
            if self.generation_batch_size % global_micro:
                raise ValueError(f"generation_batch_size ({self.generation_batch_size}) must be divisible by the global "
                                 f"batch size ({global_micro})")
            self.steps_per_generation = self.generation_batch_size // global_micro
        elif self.generation_batch_size is None:
            self.generation_batch_size = global_micro * self.steps_per_generation
        elif self.generation_batch_size != global_micro * self.steps_per_generation:
            raise ValueError("'generation_batch_size' and 'steps_per_generation' can not be both configured at the "
                             "same time")
        if self.generation_batch_size % self.num_generations:
            raise ValueError(f"generation_batch_size ({self.generation_batch_size}) must be divisible by "
                             f"num_generations ({self.num_generations})")
        local = self.generation_batch_size // world
        if local % self.num_generations:
            raise ValueError(f"each rank's share of the generation batch ({local} completions) must hold whole groups "
                             f"of num_generations={self.num_generations} (rlhf_fast keeps a prompt's completions on "
                             "one rank): make per_device_train_batch_size x steps_per_generation a multiple of "
                             f"{self.num_generations}")

    # ------------------------------------------------------------------ what the shared machinery reads
    @property
    def prompts_per_generation(self) -> int:
        return self.generation_batch_size // self.num_generations

    def unsupported_settings(self) -> dict:
        """Fields set to a non-default value that this trainer does not read: {name: value}."""
        out = unused_training_arguments(self, GRPOConfig,
                                        GRPO_TRAINING_ARGUMENTS | SCRIPT_TRAINING_ARGUMENTS | GRPO_NO_OP)
        out.update({name: getattr(self, name) for name, default in GRPO_WARNED.items()
                    if getattr(self, name) != default})
        return out

    def engine_view(self):
        """The PPOConfig-named fields the shared set-up functions read (build_policy_value and the memory
        planner): a critic-free "grpo" layout, the reference from beta, the completion length."""
        from types import SimpleNamespace

        return SimpleNamespace(
            critic="none", uses_critic=False, advantage_estimator="grpo", num_generations=self.num_generations,
            reference="auto", kl_coef=self.beta, reference_dtype=self.reference_dtype,
            reference_offload=self.reference_offload, gradient_checkpointing=self.gradient_checkpointing,
            gradient_checkpointing_kwargs=self.gradient_checkpointing_kwargs,
            per_device_train_batch_size=self.per_device_train_batch_size, response_length=self.max_completion_length,
            bf16=self.bf16, fp16=self.fp16, local_rollout_forward_batch_size=self.per_device_train_batch_size,
            distributed_strategy=self.distributed_strategy, model_adapter_name=None, ref_adapter_name=None,
            temperature=self.temperature,
            # Parity with TRL 1.16 was proven on padded forwards and HF's modules; the fused backbone and
            # packed forwards are PPOConfig options not yet offered (and parity-tested) for GRPO.
            fused_backbone=False, padding_free=False)
