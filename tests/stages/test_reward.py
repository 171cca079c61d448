"""Reward-model stage: Bradley-Terry loss by hand, pooling with left/right padding, init from SFT, training."""
from __future__ import annotations

import json
import math
import random

import pytest
import torch

from rlhf_fast.stages.data import pad_sequences
from rlhf_fast.stages.io import StageNotFinishedError, require_finished_stage, save_stage
from rlhf_fast.stages.reward import (
    RewardConfig,
    bradley_terry_loss,
    load_reward_model,
    sequence_scores,
    train_reward_model,
)


def test_bradley_terry_loss_hand_worked():
    chosen = torch.tensor([2.0, 0.0, -1.0], requires_grad=True)
    rejected = torch.tensor([0.0, 0.0, 1.0])
    per_pair = bradley_terry_loss(chosen, rejected, reduction="none")
    expected = [math.log(1 + math.exp(-2.0)), math.log(2.0), math.log(1 + math.exp(2.0))]
    torch.testing.assert_close(per_pair, torch.tensor(expected))
    loss = bradley_terry_loss(chosen, rejected)
    assert loss.item() == pytest.approx(sum(expected) / 3, rel=1e-6)
    loss.backward()
    # d/d chosen_i of mean(-log sigmoid(d_i)) = -(1 - sigmoid(d_i)) / 3
    d = torch.tensor([2.0, 0.0, -2.0])
    torch.testing.assert_close(chosen.grad, -(1 - torch.sigmoid(d)) / 3)
    # margin is subtracted inside the sigmoid: -log sigmoid(r_c - r_r - m)
    margin = torch.tensor([1.0, -1.0, 0.0])
    with_margin = bradley_terry_loss(chosen.detach(), rejected, margin, reduction="none")
    torch.testing.assert_close(with_margin, torch.tensor([math.log(1 + math.exp(-1.0)), math.log(1 + math.exp(-1.0)),
                                                          math.log(1 + math.exp(2.0))]))
    assert bradley_terry_loss(chosen.detach(), rejected, reduction="sum").item() == pytest.approx(sum(expected), rel=1e-6)
    # stable for large gaps
    big = bradley_terry_loss(torch.tensor([-200.0, 200.0]), torch.tensor([0.0, 0.0]), reduction="none")
    assert big[0].item() == pytest.approx(200.0) and big[1].item() == pytest.approx(0.0, abs=1e-30)
    with pytest.raises(ValueError, match="same shape"):
        bradley_terry_loss(torch.zeros(2), torch.zeros(3))


@pytest.fixture
def sft_dir(tmp_path, make_tiny_lm, tiny_tokenizer):
    lm = make_tiny_lm(seed=3)
    out = tmp_path / "sft"
    save_stage(lm, tiny_tokenizer, out, {"final_eval_loss": 0.0}, stage="sft")
    return out, lm


def test_reward_model_from_sft_directory(sft_dir, tiny_tokenizer):
    out, lm = sft_dir
    rm, tok = load_reward_model(str(out))
    assert type(rm).__name__ == "Qwen2ForSequenceClassification" and rm.score.out_features == 1
    assert rm.config.pad_token_id == tok.pad_token_id == 0
    lm_state = lm.model.state_dict()
    for name, tensor in rm.model.state_dict().items():  # backbone carried over exactly
        torch.testing.assert_close(tensor, lm_state[name], rtol=0, atol=0, msg=name)


def test_unfinished_sft_directory_is_refused(tmp_path, make_tiny_lm, tiny_tokenizer):
    half = tmp_path / "half"
    make_tiny_lm().save_pretrained(half)
    tiny_tokenizer.save_pretrained(half)
    with pytest.raises(StageNotFinishedError) as e:
        train_reward_model(RewardConfig(model_name_or_path=str(half), output_dir=str(tmp_path / "rm"), device="cpu"))
    assert str(half) in str(e.value) and "COMPLETE" in str(e.value)
    with pytest.raises(StageNotFinishedError, match="does not exist"):
        load_reward_model(str(tmp_path / "missing"))
    rm, _ = load_reward_model(str(half), allow_unmarked_model_dir=True)  # explicit opt-in for plain HF dirs
    assert rm.score.out_features == 1


def test_score_at_last_token_left_and_right_padding(sft_dir, tiny_tokenizer):
    rm, tok = load_reward_model(str(sft_dir[0]))
    rm.eval()
    seqs = [[5, 6, 7, 8, 9, 1], [10, 11, 1], [12, 1]]
    right_ids, right_mask = pad_sequences(seqs, tok.pad_token_id, "right")
    left_ids, left_mask = pad_sequences(seqs, tok.pad_token_id, "left")
    with torch.no_grad():
        right = sequence_scores(rm, right_ids, right_mask)
        left = sequence_scores(rm, left_ids, left_mask)
        alone = torch.cat([sequence_scores(rm, torch.tensor([s]), torch.ones(1, len(s), dtype=torch.long)) for s in seqs])
        # the model's own forward (pad_token_id set) pools the same token on right-padded input
        hf = rm(input_ids=right_ids, attention_mask=right_mask).logits.squeeze(-1)
    torch.testing.assert_close(right, alone, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(left, alone, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(hf, alone, atol=1e-5, rtol=1e-5)


def feature_pairs(n, seed):
    """Chosen ends with a TARGET-ish word 'function', rejected with 'banana'; the rest is shared noise."""
    rng = random.Random(seed)
    vocab = "the a of to is in and be that for it as with on are this by".split()
    rows = []
    for _ in range(n):
        prompt = " ".join(rng.choice(vocab) for _ in range(rng.randint(3, 8)))
        body = " " + " ".join(rng.choice(vocab) for _ in range(rng.randint(2, 10)))
        rows.append({"prompt": prompt, "chosen": body + " function", "rejected": body + " banana"})
    return rows


def test_rm_learns_a_simple_feature_from_in_memory_rows(tmp_path, sft_dir):
    cfg = RewardConfig(model_name_or_path=str(sft_dir[0]), output_dir=str(tmp_path / "rm"), device="cpu",
                       disable_tqdm=True, max_steps=20, learning_rate=3e-3, warmup_steps=2,
                       per_device_train_batch_size=8, logging_steps=10, seed=0)
    result = train_reward_model(cfg, train_dataset=feature_pairs(160, 0), eval_dataset=feature_pairs(64, 1))
    m = result.metrics
    assert m["final_eval_accuracy"] >= 0.95, m
    assert m["final_eval_loss"] < m["initial_eval_loss"] - 0.3, m
    summary = require_finished_stage(result.output_dir, stage="rm")
    assert summary["final_eval_accuracy"] == m["final_eval_accuracy"] and summary["train_pairs"] == 160
    lines = [json.loads(x) for x in (result.output_dir / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines if "loss" in x] == [10, 20]
    assert lines[0]["step"] == 0 and "eval_accuracy" in lines[0]
    # the finished directory loads back as the same reward model
    again, _ = load_reward_model(str(result.output_dir))
    ids, mask = pad_sequences([[5, 6, 7, 1], [8, 1]], 0, "right")
    with torch.no_grad():
        torch.testing.assert_close(sequence_scores(again, ids, mask), sequence_scores(result.model, ids, mask))


def test_margin_column_changes_the_loss(tmp_path, sft_dir):
    rows = feature_pairs(8, 0)
    base = dict(model_name_or_path=str(sft_dir[0]), device="cpu", disable_tqdm=True, max_steps=1,
                per_device_train_batch_size=8, eval_fraction=0.0, seed=0)
    plain = train_reward_model(RewardConfig(output_dir=str(tmp_path / "a"), **base), train_dataset=rows)
    margin_rows = [dict(r, margin=2.0) for r in rows]
    shifted = train_reward_model(RewardConfig(output_dir=str(tmp_path / "b"), **base), train_dataset=margin_rows)
    ignored = train_reward_model(RewardConfig(output_dir=str(tmp_path / "c"), use_margin=False, **base),
                                 train_dataset=margin_rows)
    assert shifted.metrics["train_loss"] > plain.metrics["train_loss"] + 1.0  # -log sigmoid(d - 2) vs -log sigmoid(d)
    assert ignored.metrics["train_loss"] == pytest.approx(plain.metrics["train_loss"], rel=1e-6)


# --------------------------------------------------------------------------- mean pooling
def test_pool_hidden_hand_worked_left_and_right_padding():
    from rlhf_fast.models.reward import pool_hidden

    # one row of 3 attended tokens (values 1, 2, 6 / 10, 20, 60), one of 1; padding holds junk (99)
    right = torch.tensor([[[1.0, 10.0], [2.0, 20.0], [6.0, 60.0]],
                          [[4.0, 40.0], [99.0, 99.0], [99.0, 99.0]]])
    right_mask = torch.tensor([[1, 1, 1], [1, 0, 0]])
    left = torch.stack([right[0], right[1].flip(0)])
    left_mask = torch.tensor([[1, 1, 1], [0, 0, 1]])
    for hidden, mask in ((right, right_mask), (left, left_mask)):
        torch.testing.assert_close(pool_hidden(hidden, mask, "mean"), torch.tensor([[3.0, 30.0], [4.0, 40.0]]))
        torch.testing.assert_close(pool_hidden(hidden, mask, "last"), torch.tensor([[6.0, 60.0], [4.0, 40.0]]))
    assert pool_hidden(right, torch.zeros(2, 3, dtype=torch.long), "mean").abs().sum() == 0  # empty row: zeros
    assert pool_hidden(right.bfloat16(), right_mask, "mean").dtype == torch.bfloat16
    with pytest.raises(ValueError, match="pooling must be one of"):
        pool_hidden(right, right_mask, "max")
    with pytest.raises(ValueError, match=r"\[B, T, H\]"):
        pool_hidden(right, right_mask[:, :2], "mean")
    with pytest.raises(ValueError, match="pooling must be one of"):
        RewardConfig(pooling="max")


def test_mean_pooled_rm_scores_the_same_in_training_evaluation_and_ppo(tmp_path, sft_dir):
    """A pooling="mean" RM saves its pooling in config.json; reloaded (as the RM stage and PPO load it)
    it scores exactly what the training-time model scored, with left or right padding, and the score
    is the head applied to the mean hidden state (not the last token's)."""
    from transformers import AutoModelForSequenceClassification

    from rlhf_fast.models import make_reward
    from rlhf_fast.models.loading import backbone_hidden, position_ids_from_mask
    from rlhf_fast.models.reward import POOLING_CONFIG_KEY, reward_pooling

    cfg = RewardConfig(model_name_or_path=str(sft_dir[0]), output_dir=str(tmp_path / "rm"), device="cpu",
                       disable_tqdm=True, max_steps=20, learning_rate=3e-3, warmup_steps=2, pooling="mean",
                       per_device_train_batch_size=8, logging_steps=10, seed=0)
    result = train_reward_model(cfg, train_dataset=feature_pairs(160, 0), eval_dataset=feature_pairs(64, 1))
    assert result.metrics["final_eval_accuracy"] >= 0.9, result.metrics
    assert result.metrics["pooling"] == "mean"
    saved = json.loads((result.output_dir / "config.json").read_text())
    assert saved[POOLING_CONFIG_KEY] == "mean"

    seqs = [[5, 6, 7, 8, 9, 1], [10, 11, 1], [12, 1]]
    right_ids, right_mask = pad_sequences(seqs, 0, "right")
    left_ids, left_mask = pad_sequences(seqs, 0, "left")
    trained = result.model.eval()
    with torch.no_grad():
        expected = sequence_scores(trained, right_ids, right_mask)
        hidden = backbone_hidden(trained.model, right_ids, right_mask, position_ids_from_mask(right_mask))
        m = right_mask.unsqueeze(-1).float()
        by_hand = trained.score((hidden * m).sum(1) / m.sum(1)).squeeze(-1)
        last_token = sequence_scores(trained, right_ids, right_mask, pooling="last")
    torch.testing.assert_close(expected, by_hand, atol=1e-5, rtol=1e-5)
    assert (expected - last_token).abs().max() > 1e-3  # the pooling mode really changes the score

    rm_stage, _ = load_reward_model(str(result.output_dir))  # what run_ppo_stage loads
    ppo_path = AutoModelForSequenceClassification.from_pretrained(str(result.output_dir), num_labels=1)  # PPO from a path
    for model in (rm_stage, ppo_path):
        assert reward_pooling(model) == "mean"
        adapter = make_reward(model)
        assert adapter.pooling == "mean"
        torch.testing.assert_close(adapter(input_ids=right_ids, attention_mask=right_mask), expected,
                                   atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(adapter(input_ids=left_ids, attention_mask=left_mask), expected,
                                   atol=1e-5, rtol=1e-5)
        with torch.no_grad():
            torch.testing.assert_close(sequence_scores(model, left_ids, left_mask), expected, atol=1e-5, rtol=1e-5)


def test_reward_pooling_defaults_to_last_and_refuses_unknown(sft_dir):
    from rlhf_fast.models import make_reward
    from rlhf_fast.models.reward import POOLING_CONFIG_KEY, reward_pooling

    rm, _ = load_reward_model(str(sft_dir[0]))
    assert reward_pooling(rm) == "last" and make_reward(rm).pooling == "last"  # any HF model: last token
    setattr(rm.config, POOLING_CONFIG_KEY, "attention")
    with pytest.raises(ValueError, match="not a known reward pooling"):
        make_reward(rm)
