"""The PPO loop: rollout (lean KV-cache decode), the drop-in PPOConfig/PPOTrainer, checkpoints, logging."""
from rlhf_fast.trainer.ppo import (
    Advantages,
    KLController,
    PPOTrainer,
    PromptSampler,
    RolloutForward,
    compute_advantages,
    generate_rollout,
    left_pad,
    rollout_forward,
    score_rollout,
)
from rlhf_fast.trainer.ppo_config import PPOConfig
from rlhf_fast.trainer.rollout import Rollout, generate, sample_from_logits

__all__ = [
    "Advantages", "KLController", "PPOConfig", "PPOTrainer", "PromptSampler", "Rollout", "RolloutForward",
    "compute_advantages", "generate", "generate_rollout", "left_pad", "rollout_forward", "sample_from_logits",
    "score_rollout",
]
