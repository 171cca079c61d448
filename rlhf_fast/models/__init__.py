"""Shared-weight RLHF layout on any Hugging Face causal LM: one trainable backbone with LM head and value
head, reference modes (LoRA-disabled / frozen low-precision copy / none) and reward adapters."""
from rlhf_fast.models.decode import LeanDecoder, fast_decode_unsupported_reason, supports_fast_decode
from rlhf_fast.models.loading import (
    TESTED_MODEL_TYPES,
    check_causal_lm,
    ensure_pad_token,
    get_backbone,
    get_lm_head,
    load_causal_lm,
    position_ids_from_mask,
    resolve_attn_implementation,
)
from rlhf_fast.models.patching import PatchReport, is_patched, patch_backbone, unpatch_backbone
from rlhf_fast.models.policy_value import ModelOutput, PolicyValueModel
from rlhf_fast.models.reference import FrozenReference
from rlhf_fast.models.reward import CallableReward, ModelReward, last_token_index, make_reward

__all__ = [
    "TESTED_MODEL_TYPES", "check_causal_lm", "ensure_pad_token", "get_backbone", "get_lm_head", "load_causal_lm",
    "position_ids_from_mask", "resolve_attn_implementation", "ModelOutput", "PolicyValueModel",
    "FrozenReference", "CallableReward", "ModelReward", "last_token_index",
    "make_reward", "LeanDecoder", "fast_decode_unsupported_reason", "supports_fast_decode",
    "PatchReport", "patch_backbone", "unpatch_backbone", "is_patched",
]
