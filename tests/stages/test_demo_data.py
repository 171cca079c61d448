"""The embedded demo's data side: the pinned gold judge (hand-worked values), corpus, pairs, tokenizer."""
from __future__ import annotations

import math
import random
import sys

import pytest

from rlhf_fast.stages import demo_data as dd

TARGET_ORDERED = sorted(dd.TARGET_WORDS)


def test_target_words_are_the_pinned_twenty():
    assert dd.TARGET_WORDS == set(
        "function object value return list string module class method argument default example type number "
        "error file name data code statement".split()
    )
    assert len(dd.TARGET_WORDS) == 20


def test_words_are_lowercase_letter_runs():
    assert dd.words("Don't STOP_now, 42 x2y") == ["don", "t", "stop", "now", "x", "y"]


def test_gold_reward_hand_worked_short_text():
    # words: the function returns a value -> n = 5; TARGET: function, value (returns is not) -> 2/5
    # bigrams all new -> 0; length penalty 0.5 * min(1, 25/30)
    expected = 2 * (2 / 5) - 0.0 - 0.5 * (25 / 30)
    assert dd.gold_reward("The function returns a value.") == pytest.approx(expected, abs=1e-12)


def test_gold_reward_repeated_bigrams_hand_worked():
    # a b a b a b: bigrams ab, ba, ab*, ba*, ab* -> 3 of 5 repeat; no target words; penalty 0.5 * 24/30
    assert dd.gold_reward("a b a b a b") == pytest.approx(0.0 - 3 / 5 - 0.5 * 24 / 30, abs=1e-12)
    # a repeated *word* with new bigrams does not count: x y x z -> xy, yx, xz all distinct
    assert dd.gold_reward("x y x z") == pytest.approx(-0.5 * 26 / 30, abs=1e-12)
    # n == 1: no bigrams, repeat share 0
    assert dd.gold_reward("code") == pytest.approx(2.0 - 0.5 * 29 / 30, abs=1e-12)


def test_gold_reward_ideal_length_and_cap():
    fillers = "alpha bravo charlie delta echo foxtrot golf hotel india juliet".split()
    text = " ".join(TARGET_ORDERED + fillers)  # 30 distinct words, 20 of them TARGET
    assert dd.gold_reward(text) == pytest.approx(2 * 20 / 30, abs=1e-12)
    long_text = " ".join("q" + chr(97 + i % 26) + chr(97 + i // 26) for i in range(90))
    assert len(set(dd.words(long_text))) == 90
    assert dd.gold_reward(long_text) == pytest.approx(-0.5, abs=1e-12)  # penalty capped at 0.5


def test_gold_reward_empty_is_minus_one():
    assert dd.gold_reward("") == -1.0
    assert dd.gold_reward("123 !!! ...") == -1.0


def test_preference_probability_and_labels():
    a, b = "function value code", "the the the"
    d = dd.gold_reward(a) - dd.gold_reward(b)
    assert dd.preference_probability(a, b) == pytest.approx(1 / (1 + math.exp(-5 * d)), abs=1e-12)
    assert dd.preference_probability(a, b) + dd.preference_probability(b, a) == pytest.approx(1.0, abs=1e-12)
    assert dd.gold_prefers(a, b) and not dd.gold_prefers(b, a)
    assert not dd.gold_prefers(a, a)
    # noisy labels follow the probability: two texts 0.1 apart in gold -> p = sigmoid(0.5)
    x = " ".join(["function"] + "k l m n o p q r s".split())  # 10 words, 1 target
    y = " ".join("j k l m n o p q r s".split())  # 10 words, 0 target
    p = dd.preference_probability(x, y)
    assert p == pytest.approx(1 / (1 + math.exp(-5 * 0.2)), abs=1e-12)
    rng = random.Random(0)
    freq = sum(dd.preference_label(x, y, rng) for _ in range(4000)) / 4000
    assert abs(freq - p) < 0.03


def test_distinct_n_hand_worked():
    assert dd.distinct_n(["a b c", "a b d"], n=2) == pytest.approx(3 / 4)
    assert dd.distinct_n(["a a a a"], n=1) == pytest.approx(1 / 4)
    assert dd.distinct_n([], n=2) == 0.0
    assert dd.distinct_n(["one"], n=2) == 0.0
    with pytest.raises(ValueError):
        dd.distinct_n(["a"], n=0)


def test_corpus_split_is_deterministic_and_disjoint():
    s1, s2 = dd.demo_corpus(), dd.demo_corpus()
    assert s1.train == s2.train and s1.heldout == s2.heldout
    assert len(s1.heldout) >= 20 and len(s1.train) >= 10 * len(s1.heldout) // 2
    assert not set(s1.train) & set(s1.heldout)
    assert all(len(p.split()) >= 24 for p in s1.train)


def test_fallback_corpus_when_pydoc_data_is_missing(monkeypatch):
    monkeypatch.setitem(sys.modules, "pydoc_data.topics", None)  # makes the import fail
    text, source = dd.load_corpus_text()
    assert source == "rlhf_fast/stages/demo_corpus.txt"
    assert "#" not in text.splitlines()[0][:1]
    paras = dd.corpus_paragraphs(text)
    assert len(paras) >= 100
    train, held = dd.split_paragraphs(paras)
    assert train and held


def test_sft_pairs_and_prompts():
    para = " ".join(f"w{i}" for i in range(100)).replace("w", "x")
    rows = dd.sft_pairs([para], prompt_words=8, response_words=30)
    words = para.split()
    # windows of 38 words: 0-37, 38-75, and the last 24 words (>= 8 + min_response_words=10) make a third
    assert len(rows) == 3
    assert len(dd.sft_pairs([para], prompt_words=8, response_words=30, min_response_words=17)) == 2
    assert rows[0]["prompt"] == " ".join(words[:8])
    assert rows[0]["response"] == " " + " ".join(words[8:38])
    assert rows[0]["prompt"] + rows[0]["response"] == " ".join(words[:38])
    assert rows[2]["prompt"] == " ".join(words[76:84]) and rows[2]["response"].split() == words[84:]
    assert len(dd.sft_pairs([para], windows_per_paragraph=1)) == 1
    assert dd.prompts_from_paragraphs([para, "too short"], prompt_words=8) == [" ".join(words[:8])]


def test_synthetic_preferences_follow_the_judge():
    split = dd.demo_corpus()
    rows = dd.synthetic_preference_rows(split.train, 200, seed=1, noisy=False)
    assert len(rows) == 200
    assert all(set(r) == {"prompt", "chosen", "rejected"} for r in rows)
    assert all(dd.gold_reward(r["chosen"]) > dd.gold_reward(r["rejected"]) or
               dd.gold_reward(r["chosen"]) == dd.gold_reward(r["rejected"]) for r in rows)
    noisy = dd.synthetic_preference_rows(split.train, 400, seed=1, noisy=True)
    agree = sum(dd.gold_reward(r["chosen"]) >= dd.gold_reward(r["rejected"]) for r in noisy) / len(noisy)
    assert 0.6 < agree < 1.0  # mostly the judge's order, with sampled noise


@pytest.fixture(scope="module")
def demo_tokenizer():
    return dd.build_demo_tokenizer(dd.demo_corpus().train[:150], vocab_size=400)


def test_demo_tokenizer_round_trip(demo_tokenizer, tmp_path):
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    tok = demo_tokenizer
    assert isinstance(tok, PreTrainedTokenizerFast)
    assert len(tok) == 400
    assert (tok.pad_token_id, tok.eos_token_id, tok.bos_token_id) == (0, 1, 2)
    text = "The function returns a value, ü and 🙂 too."
    ids = tok(text)["input_ids"]
    assert tok.decode(ids) == text  # byte level: anything round-trips, nothing added around it
    tok.save_pretrained(tmp_path)
    again = AutoTokenizer.from_pretrained(tmp_path)
    assert again(text)["input_ids"] == ids and again.pad_token == "<pad>" and again.eos_token == "<eos>"
    with pytest.raises(ValueError, match="vocab_size"):
        dd.build_demo_tokenizer(["abc"], vocab_size=100)


def test_demo_model_matches_tokenizer(demo_tokenizer):
    import torch

    model = dd.build_demo_model(demo_tokenizer, seed=3, hidden_size=32, intermediate_size=64)
    cfg = model.config
    assert cfg.model_type == "qwen2" and cfg.vocab_size == 400 and cfg.pad_token_id == 0 and cfg.eos_token_id == 1
    assert not cfg.tie_word_embeddings and cfg.num_hidden_layers == 2
    again = dd.build_demo_model(demo_tokenizer, seed=3, hidden_size=32, intermediate_size=64)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), again.parameters()))
    out = model(input_ids=torch.tensor([[5, 6, 7]])).logits
    assert out.shape == (1, 3, 400)
    full = dd.build_demo_model(demo_tokenizer)
    assert full.config.hidden_size == 128 and full.config.intermediate_size == 256
