"""The PPO loop: the step as plain functions (ppo_step), the drop-in PPOConfig/PPOTrainer (TRL 1.12) and
GRPOConfig/GRPOTrainer (TRL 1.16, on the same engine; its step pieces in grpo_step), prompt batching,
controllers, rollout (lean KV-cache decode), checkpoints, distributed plumbing and logging."""
from rlhf_fast.trainer.batching import PromptSampler, group_indices, left_pad, prompt_token_lists
from rlhf_fast.trainer.controllers import KLController, RunningMoments
from rlhf_fast.trainer.grpo import GRPOTrainer
from rlhf_fast.trainer.grpo_config import GRPOConfig
from rlhf_fast.trainer.logging import StepStats, group_reward_stats, step_metrics
from rlhf_fast.trainer.ppo import NonFiniteError, PPOTrainer
from rlhf_fast.trainer.ppo_config import PPOConfig
from rlhf_fast.trainer.ppo_step import (
    Advantages,
    RolloutForward,
    compute_advantages,
    compute_group_advantages,
    generate_rollout,
    micro_step,
    ppo_update,
    rollout_forward,
    score_rollout,
    token_budget_micro_batches,
    trim_batch,
)
from rlhf_fast.trainer.rollout import Rollout, generate, sample_from_logits

__all__ = [
    "Advantages", "GRPOConfig", "GRPOTrainer", "KLController", "NonFiniteError", "PPOConfig", "PPOTrainer", "PromptSampler", "Rollout",
    "RolloutForward", "RunningMoments", "StepStats", "compute_advantages", "compute_group_advantages", "generate",
    "generate_rollout", "group_indices", "group_reward_stats", "left_pad", "micro_step", "ppo_update",
    "prompt_token_lists", "rollout_forward", "sample_from_logits", "score_rollout", "step_metrics", "token_budget_micro_batches", "trim_batch",
]
