"""Fused ops: for each, a pure-torch reference, Triton kernels, a C++ CPU path and one dispatcher.

Callers never branch on device: every public function here picks its backend with
rlhf_fast._backend.dispatch (or takes ``backend=`` to force one).
"""
from rlhf_fast.ops.few_rows import few_row_linear, few_row_linear_reference
from rlhf_fast.ops.gae import GAEOutput, gae, gae_reference
from rlhf_fast.ops.kl import (
    KL_ESTIMATORS,
    kl_penalty,
    kl_penalty_reference,
    token_rewards,
    token_rewards_reference,
)
from rlhf_fast.ops.logprobs import (
    LogProbs,
    fused_linear_logprobs,
    fused_linear_logprobs_reference,
    logprobs_from_logits,
    logprobs_from_logits_reference,
)
from rlhf_fast.ops.masked_mean import masked_mean, masked_mean_reference
from rlhf_fast.ops.policy_losses import PolicyLossFamilyStats, policy_loss, policy_loss_reference
from rlhf_fast.ops.ppo_loss import (
    AGG_MODES,
    PolicyLossStats,
    aggregate_loss,
    ppo_policy_loss,
    ppo_policy_loss_reference,
    value_loss,
    value_loss_reference,
)
from rlhf_fast.ops.rms_norm import rms_norm, rms_norm_reference
from rlhf_fast.ops.rotary import rotary, rotary_reference
from rlhf_fast.ops.swiglu import swiglu, swiglu_recompute, swiglu_reference
from rlhf_fast.ops.whiten import masked_whiten, masked_whiten_reference

__all__ = ["masked_mean", "masked_mean_reference", "few_row_linear", "few_row_linear_reference"]
__all__ += [
    "LogProbs", "fused_linear_logprobs", "fused_linear_logprobs_reference",
    "logprobs_from_logits", "logprobs_from_logits_reference",
]
__all__ += [
    "AGG_MODES", "PolicyLossStats", "aggregate_loss", "ppo_policy_loss", "ppo_policy_loss_reference",
    "value_loss", "value_loss_reference",
    "PolicyLossFamilyStats", "policy_loss", "policy_loss_reference",
]
__all__ += [
    "KL_ESTIMATORS", "kl_penalty", "kl_penalty_reference", "token_rewards", "token_rewards_reference",
    "GAEOutput", "gae", "gae_reference", "masked_whiten", "masked_whiten_reference",
]
__all__ += [
    "rms_norm", "rms_norm_reference", "swiglu", "swiglu_recompute", "swiglu_reference", "rotary", "rotary_reference",
]
