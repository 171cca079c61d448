"""rlhf_fast: a custom-kernel, performance-first RLHF engine."""
from rlhf_fast._backend import describe as backend_info
from rlhf_fast.ops import masked_mean
from rlhf_fast.ops import fused_linear_logprobs, fused_linear_logprobs_reference, logprobs_from_logits  # issue 3
from rlhf_fast.ops import ppo_policy_loss, value_loss  # issue 4B
from rlhf_fast.ops import gae, kl_penalty, masked_whiten, token_rewards  # issue 4A
from rlhf_fast.models import ModelOutput, PolicyValueModel, make_reward  # issue 5 (imports no transformers)

__version__ = "0.1.0"

__all__ = ["__version__", "backend_info", "masked_mean"]
__all__ += ["fused_linear_logprobs", "fused_linear_logprobs_reference", "logprobs_from_logits"]  # issue 3
__all__ += ["ppo_policy_loss", "value_loss"]  # issue 4B
__all__ += ["gae", "kl_penalty", "masked_whiten", "token_rewards"]  # issue 4A
__all__ += ["ModelOutput", "PolicyValueModel", "make_reward"]  # issue 5

# The trainers import transformers (seconds): load them on first use, not on `import rlhf_fast`.
_LAZY = {
    "PPOConfig": "rlhf_fast.trainer.ppo_config",
    "PPOTrainer": "rlhf_fast.trainer.ppo",
    "DPOConfig": "rlhf_fast.dpo",  # issue 10
    "DPOTrainer": "rlhf_fast.dpo",  # issue 10
}
__all__ += list(_LAZY)


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'rlhf_fast' has no attribute {name!r}")
