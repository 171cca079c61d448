"""Shared tiny pieces for the stage tests: a small BPE tokenizer and a tiny Qwen2 (hidden 64)."""
from __future__ import annotations

import pytest

from rlhf_fast.stages import demo_data


@pytest.fixture(scope="session")
def corpus():
    return demo_data.demo_corpus()


@pytest.fixture(scope="session")
def tiny_tokenizer(corpus):
    return demo_data.build_demo_tokenizer(corpus.train[:200], vocab_size=384)


@pytest.fixture
def make_tiny_lm(tiny_tokenizer):
    def make(seed=0, hidden_size=64, num_layers=2):
        return demo_data.build_demo_model(
            tiny_tokenizer, seed=seed, hidden_size=hidden_size, intermediate_size=2 * hidden_size,
            num_layers=num_layers, num_heads=4, num_kv_heads=2,
        )

    return make
