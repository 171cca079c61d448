"""torchrun with 2 CPU ranks under gloo: DDP equals one process, FSDP2 equals DDP, checkpoints cross over."""
from __future__ import annotations

import pytest
import torch

from tests.trainer.test_checkpoint import load, run_worker

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed unavailable")
# One minibatch per rollout (the same rows meet in one update however they are sharded) and a reward
# model, so FSDP2 runs shard the frozen reference and the reward model as well as the policy.
GLOBAL = ["--mini", "1", "--reward", "model"]
STEP_METRICS = ("objective/scores", "objective/kl", "objective/non_score_reward", "objective/rlhf_reward",
                "objective/entropy", "val/num_eos_tokens", "episode", "lr")


def assert_weights_close(a, b, atol=2e-5):
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=atol, rtol=1e-4, msg=k)


def assert_global_metrics_close(ha, hb):
    assert [h["step"] for h in ha] == [h["step"] for h in hb]
    for x, y in zip(ha, hb):
        for k in STEP_METRICS:
            assert x[k] == pytest.approx(y[k], rel=1e-4, abs=1e-5), k


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("dist")
    run_worker(root / "single", "straight", *GLOBAL)
    run_worker(root / "ddp", "straight", *GLOBAL, nproc=2)
    run_worker(root / "fsdp", "straight", *GLOBAL, "--strategy", "fsdp2", nproc=2)
    return root


def test_ddp_matches_one_process_with_the_same_global_batch(runs):
    w1, h1 = load(runs / "single", "straight")
    w2, h2 = load(runs / "ddp", "straight")
    assert_weights_close(w1, w2)
    assert_global_metrics_close(h1, h2)


def test_fsdp2_matches_ddp(runs):
    wd, hd = load(runs / "ddp", "straight")
    wf, hf = load(runs / "fsdp", "straight")
    assert_weights_close(wd, wf)
    assert_global_metrics_close(hd, hf)


def test_fsdp2_shards_the_frozen_reference_and_reward_model(runs):
    import json

    assert json.loads((runs / "fsdp" / "frozen_straight.json").read_text()) == {
        "reference": "ShardedReference", "reward": "ShardedReward"}
    assert json.loads((runs / "ddp" / "frozen_straight.json").read_text()) == {
        "reference": "FrozenReference", "reward": "ModelReward"}


@pytest.mark.parametrize("first, then", [("fsdp2", "ddp"), ("ddp", "fsdp2")])
def test_checkpoint_saved_under_one_strategy_resumes_under_the_other(runs, tmp_path, first, then):
    run_worker(tmp_path, "first", *GLOBAL, "--stop-after", "2", "--strategy", first, nproc=2)
    run_worker(tmp_path, "resume", *GLOBAL, "--strategy", then, nproc=2)
    w_ref, h_ref = load(runs / "ddp", "straight")
    w, h = load(tmp_path, "resume")
    assert_weights_close(w_ref, w)
    assert_global_metrics_close(h_ref, h)
