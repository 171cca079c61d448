"""Worker: the frozen reference and a reward model, FSDP2-sharded over the ranks, give the numbers the
unsharded copies give; each rank holds only its shards. Writes OUT/rank{r}.pt.

    torchrun --nproc_per_node=2 -m tests.trainer._shard_frozen_worker OUT
"""
from __future__ import annotations

import copy
from pathlib import Path

import torch

from rlhf_fast.models import ModelReward, PolicyValueModel
from rlhf_fast.trainer.distributed import ShardedReference, ShardedReward, init_from_env
from tests.trainer.tiny import tiny_classifier, tiny_policy
from tests.utils import finish_rank, worker_entry

V = 48


def main(out: Path) -> None:
    init_from_env()
    rank = torch.distributed.get_rank()
    torch.manual_seed(0)
    pv = PolicyValueModel(tiny_policy(V, hidden=32, layers=2), reference="frozen", critic="shared",
                          reference_dtype=torch.float32)
    g = torch.Generator().manual_seed(rank)  # each rank scores its own rows, as in training
    ids = torch.randint(3, V, (3, 10), generator=g)
    mask = torch.ones_like(ids)
    mask[0, :3] = 0  # left padding
    ids = ids * mask
    reward = ModelReward(tiny_classifier(V, hidden=32, layers=2))
    reward_copy = ModelReward(copy.deepcopy(reward.model))

    ref_before = pv.reference_logprobs(ids, mask, response_start=4)
    score_before = reward(input_ids=ids, attention_mask=mask)
    full_ref_bytes = pv.reference.resident_bytes()
    full_reward_bytes = sum(p.numel() * p.element_size() for p in reward.model.parameters())

    pv.reference = ShardedReference(pv.reference)
    sharded_reward = ShardedReward(reward)
    ref_after = pv.reference_logprobs(ids, mask, response_start=4)
    ref_again = pv.reference_logprobs(ids, mask, response_start=4)  # the root group was released and regathered
    score_after = sharded_reward(input_ids=ids, attention_mask=mask)
    score_ids = sharded_reward.score_ids(ids, mask)
    local_reward_bytes = sum(p.to_local().numel() * p.element_size() for p in reward.model.parameters())
    finish_rank({
        "ref_before": ref_before, "ref_after": ref_after, "ref_again": ref_again,
        "score_before": score_before, "score_after": score_after, "score_ids": score_ids,
        "score_unsharded_copy": reward_copy(input_ids=ids, attention_mask=mask),
        "full_ref_bytes": full_ref_bytes, "local_ref_bytes": pv.reference.resident_bytes(),
        "full_reward_bytes": full_reward_bytes, "local_reward_bytes": local_reward_bytes,
        "ref_is_released": pv.reference.is_offloaded,
        # the reference was copied from the (never trained here) policy: its first tensors, in full
        "fingerprint_equal": all(torch.equal(a, b.detach()) for a, (_, b) in zip(
            pv.reference.fingerprint_params(), list(pv.policy.named_parameters())[:4])),
    }, out)


if __name__ == "__main__":
    worker_entry(main)
