"""FSDP2 shards the frozen reference and the reward model too (2 gloo ranks): same numbers, 1/2 the bytes."""
from __future__ import annotations

import pytest
import torch

from tests.utils import run_torchrun

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed unavailable")


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    return run_torchrun("tests.trainer._shard_frozen_worker", tmp_path_factory.mktemp("shard_frozen"))


def test_sharded_reference_gives_the_unsharded_logprobs(ranks):
    for r in ranks:
        torch.testing.assert_close(r["ref_after"], r["ref_before"], atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(r["ref_again"], r["ref_before"], atol=1e-6, rtol=1e-5)
    assert not torch.equal(ranks[0]["ref_before"], ranks[1]["ref_before"])  # the ranks scored different rows


def test_sharded_reward_gives_the_unsharded_scores(ranks):
    for r in ranks:
        torch.testing.assert_close(r["score_after"], r["score_unsharded_copy"], atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(r["score_ids"], r["score_before"], atol=1e-6, rtol=1e-5)


def test_each_rank_holds_half_of_the_frozen_weights(ranks):
    for r in ranks:
        assert r["ref_is_released"]  # the root group is released after each reference forward
        assert r["local_ref_bytes"] <= 0.55 * r["full_ref_bytes"]
        assert r["local_reward_bytes"] <= 0.55 * r["full_reward_bytes"]


def test_reference_fingerprint_is_taken_from_the_full_weights(ranks):
    assert all(r["fingerprint_equal"] for r in ranks)
