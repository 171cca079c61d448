"""rlhf_fast: a custom-kernel, performance-first RLHF engine."""
from rlhf_fast._backend import describe as backend_info
from rlhf_fast.models import ModelOutput, PolicyValueModel, make_reward  # imports no transformers
from rlhf_fast.ops import (
    fused_linear_logprobs,
    fused_linear_logprobs_reference,
    gae,
    kl_penalty,
    logprobs_from_logits,
    masked_mean,
    masked_whiten,
    policy_loss,
    ppo_policy_loss,
    token_rewards,
    value_loss,
)

__version__ = "0.1.0"

__all__ = ["__version__", "backend_info", "masked_mean"]
__all__ += ["fused_linear_logprobs", "fused_linear_logprobs_reference", "logprobs_from_logits"]
__all__ += ["policy_loss", "ppo_policy_loss", "value_loss"]
__all__ += ["gae", "kl_penalty", "masked_whiten", "token_rewards"]
__all__ += ["ModelOutput", "PolicyValueModel", "make_reward"]

# The trainers import transformers (seconds): load them on first use, not on `import rlhf_fast`.
_LAZY = {
    "PPOConfig": "rlhf_fast.trainer",
    "PPOTrainer": "rlhf_fast.trainer",
    "GRPOConfig": "rlhf_fast.trainer",
    "GRPOTrainer": "rlhf_fast.trainer",
    "SFTConfig": "rlhf_fast.stages.sft",
    "train_sft": "rlhf_fast.stages.sft",
    "RewardConfig": "rlhf_fast.stages.reward",
    "train_reward_model": "rlhf_fast.stages.reward",
    "run_pipeline": "rlhf_fast.stages.pipeline",
    "DPOConfig": "rlhf_fast.stages.dpo",
    "DPOTrainer": "rlhf_fast.stages.dpo",
}
__all__ += list(_LAZY)


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'rlhf_fast' has no attribute {name!r}")
