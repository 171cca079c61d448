"""Tiny random-init models and a word-level tokenizer for trainer tests (no downloads)."""
from __future__ import annotations

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    LlamaForSequenceClassification,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
)

PAD, UNK, EOS = 0, 1, 2


def make_tokenizer(vocab_size: int = 64, pad: bool = True) -> PreTrainedTokenizerFast:
    """Word-level tokenizer over tokens "t0".."t{V-1}"; t0 = pad, t1 = unk, t2 = eos."""
    vocab = {f"t{i}": i for i in range(vocab_size)}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="t1"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    kwargs = {"pad_token": "t0"} if pad else {}
    return PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="t2", unk_token="t1", **kwargs)


def llama_config(vocab_size=64, hidden=16, layers=1):
    return LlamaConfig(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                       num_attention_heads=2, num_key_value_heads=1, vocab_size=vocab_size,
                       max_position_embeddings=128, pad_token_id=PAD, eos_token_id=EOS, bos_token_id=None)


def tiny_policy(vocab_size=64, hidden=16, layers=1, seed=0, arch="llama"):
    torch.manual_seed(seed)
    if arch == "qwen2":
        cfg = Qwen2Config(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                          num_attention_heads=2, num_key_value_heads=1, vocab_size=vocab_size,
                          max_position_embeddings=128, tie_word_embeddings=False)
        return Qwen2ForCausalLM(cfg)
    if arch == "gpt2":
        return GPT2LMHeadModel(GPT2Config(n_embd=hidden, n_layer=layers, n_head=2, vocab_size=vocab_size,
                                          n_positions=128, bos_token_id=EOS, eos_token_id=EOS))
    return LlamaForCausalLM(llama_config(vocab_size, hidden, layers))


def tiny_classifier(vocab_size=64, hidden=16, layers=1, seed=1):
    torch.manual_seed(seed)
    cfg = llama_config(vocab_size, hidden, layers)
    cfg.num_labels = 1
    return LlamaForSequenceClassification(cfg)


def prompt_rows(n=32, vocab_size=64, min_len=2, max_len=6, seed=0) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(n):
        L = int(torch.randint(min_len, max_len + 1, (1,), generator=g))
        rows.append({"input_ids": torch.randint(3, vocab_size, (L,), generator=g).tolist()})
    return rows


def count_token_reward(token: str = "t5", scale: float = 1.0):
    """Share of response words equal to ``token`` (a dense, learnable reward)."""

    def reward(prompts, completions):
        out = []
        for c in completions:
            words = c.split()
            out.append(scale * (sum(w == token for w in words) / max(len(words), 1)))
        return out

    return reward
