"""Reward adapters: sequence-classification score at the last attended token; callable rewards checked."""
from __future__ import annotations

import math

import pytest
import torch

from rlhf_fast.models import (
    CallableReward,
    ModelReward,
    last_token_index,
    make_reward,
    position_ids_from_mask,
)
from tests.models.conftest import tiny_seq_cls, word_tokenizer


def test_last_token_index_left_and_right_padding():
    m = torch.tensor([[0, 0, 1, 1, 1, 0], [1, 1, 1, 1, 1, 1], [0, 1, 0, 0, 0, 0]])
    assert last_token_index(m).tolist() == [4, 5, 1]


@pytest.mark.parametrize("arch", ["qwen2", "gpt2"])
def test_model_reward_scores_last_non_pad_token(arch, batch):
    rm = tiny_seq_cls(arch)
    scores = ModelReward(rm)(input_ids=batch.input_ids, attention_mask=batch.attention_mask)
    assert scores.shape == (3,) and scores.dtype == torch.float32
    # manual: the score head on the final hidden state at the last attended token
    hidden = rm(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                position_ids=position_ids_from_mask(batch.attention_mask), output_hidden_states=True).hidden_states[-1]
    for b in range(3):
        last = int(batch.attention_mask[b].nonzero().max())
        torch.testing.assert_close(scores[b], rm.score(hidden[b, last]).squeeze(), atol=1e-5, rtol=1e-5)
    # independent: each row alone, unpadded, through HF's own pooling (no padding -> last token)
    for b in range(3):
        keep = batch.attention_mask[b].bool()
        alone = rm(input_ids=batch.input_ids[b, keep][None]).logits[0, 0]
        torch.testing.assert_close(scores[b], alone, atol=1e-5, rtol=1e-5)


def test_model_reward_counts_a_final_eos_equal_to_pad():
    """pad == eos: HF pooling by pad id would skip the final EOS; the attention mask does not."""
    rm = tiny_seq_cls("qwen2")
    ids = torch.tensor([[0, 0, 5, 6, 7, 0], [5, 6, 7, 8, 9, 0]])  # 0 = pad = "eos"
    mask = torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 0]])  # row 0 ends with a real EOS (id 0)
    got = ModelReward(rm)(input_ids=ids, attention_mask=mask)
    row = torch.tensor([[5, 6, 7, 0]])
    out = rm(input_ids=row, output_hidden_states=True)
    at_eos = rm.score(out.hidden_states[-1][0, -1]).squeeze()
    torch.testing.assert_close(got[0], at_eos, atol=1e-5, rtol=1e-5)
    assert (out.logits[0, 0] - at_eos).abs() > 1e-4  # HF's pad-id pooling lands on the token before the EOS


def test_model_reward_with_own_tokenizer_retokenizes_texts():
    rm = tiny_seq_cls("qwen2")
    tok = word_tokenizer(with_pad=True)
    tok.padding_side = "left"
    reward = ModelReward(rm, tokenizer=tok)
    prompts, completions = ["the cat", "a"], [" sat on a mat", " good mat"]
    got = reward(prompts=prompts, completions=completions)
    for i, (p, c) in enumerate(zip(prompts, completions)):
        ids = torch.tensor([tok(p + c)["input_ids"]])
        torch.testing.assert_close(got[i], rm(input_ids=ids).logits[0, 0], atol=1e-5, rtol=1e-5)


def test_model_reward_rejects_multi_label_head():
    rm = tiny_seq_cls("qwen2")
    rm.score = torch.nn.Linear(rm.score.in_features, 2, bias=False)
    with pytest.raises(ValueError, match="num_labels=1"):
        ModelReward(rm)


def test_callable_reward_returns_its_scores():
    def length_reward(prompts, completions):
        return [float(len(c)) for c in completions]

    r = make_reward(length_reward)
    assert isinstance(r, CallableReward)
    out = r(prompts=["a", "b"], completions=["xyz", ""])
    assert out.dtype == torch.float32 and out.tolist() == [3.0, 0.0]
    assert isinstance(make_reward(tiny_seq_cls("qwen2")), ModelReward)


@pytest.mark.parametrize(
    "fn, err, match",
    [
        (lambda p, c: [1.0], ValueError, "returned 1 scores for 2 completions"),
        (lambda p, c: [1.0, math.nan], ValueError, "non-finite score nan at index 1"),
        (lambda p, c: [1.0, math.inf], ValueError, "non-finite"),
        (lambda p, c: [1.0, "high"], TypeError, "non-number at index 1"),
        (lambda p, c: None, TypeError, "must return a list of floats"),
    ],
)
def test_callable_reward_bad_outputs_are_named(fn, err, match):
    with pytest.raises(err, match=match):
        CallableReward(fn)(prompts=["a", "b"], completions=["x", "y"])


def test_callable_reward_can_pass_nonfinite_to_a_caller_that_handles_it():
    r = CallableReward(lambda p, c: [1.0, math.nan], allow_nonfinite=True)
    out = r(prompts=["a", "b"], completions=["x", "y"])
    assert out[0] == 1.0 and math.isnan(out[1])
    with pytest.raises(ValueError, match="returned 1 scores"):  # the count is still checked
        CallableReward(lambda p, c: [1.0], allow_nonfinite=True)(prompts=["a", "b"], completions=["x", "y"])


def test_make_reward_rejects_non_callable():
    with pytest.raises(TypeError, match="AutoModelForSequenceClassification or a callable"):
        make_reward(3.0)
