"""Tiny random-init causal LMs (built from configs, no downloads) and a left-padded prompt+response batch."""
from __future__ import annotations

import pytest
import torch

VOCAB = 128
HIDDEN = 32
ARCHS = ("llama", "qwen2", "gpt2", "mistral")


def tiny_config(arch: str, tie: bool = False):
    import transformers as tf

    common = dict(vocab_size=VOCAB, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    if arch == "gpt2":
        return tf.GPT2Config(n_embd=HIDDEN, n_layer=2, n_head=4, n_positions=64, tie_word_embeddings=tie, **common)
    cls = {"llama": tf.LlamaConfig, "qwen2": tf.Qwen2Config, "mistral": tf.MistralConfig}[arch]
    return cls(hidden_size=HIDDEN, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=tie, **common)


def tiny_causal_lm(arch: str, tie: bool = False, seed: int = 0):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(arch, tie), attn_implementation="sdpa")
    return model.eval()


def tiny_seq_cls(arch: str = "qwen2", seed: int = 1):
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(seed)
    cfg = tiny_config(arch)
    cfg.num_labels = 1
    return AutoModelForSequenceClassification.from_config(cfg, attn_implementation="sdpa").eval()


class Batch:
    """Left-padded prompts [B, P] + right-padded responses [B, R], as a rollout produces them."""

    def __init__(self, B=3, P=5, R=6, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.P, self.R = P, R
        prompt_lens = torch.tensor([P, P - 2, 1][:B])
        resp_lens = torch.tensor([R, R - 3, 1][:B])
        ids = torch.randint(3, VOCAB, (B, P + R), generator=g)
        mask = torch.zeros(B, P + R, dtype=torch.long)
        for b in range(B):
            mask[b, P - prompt_lens[b] : P + resp_lens[b]] = 1
        self.input_ids = torch.where(mask.bool(), ids, torch.zeros_like(ids))  # pad id 0
        self.attention_mask = mask
        self.response_mask = torch.zeros_like(mask, dtype=torch.bool)
        self.response_mask[:, P:] = mask[:, P:].bool()


@pytest.fixture
def batch():
    return Batch()


WORDS = "the cat sat on a mat good bad yes no".split()


def word_tokenizer(with_pad: bool = False):
    """A whitespace word-level fast tokenizer built in memory (no download); ids < VOCAB."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3, **{w: 4 + i for i, w in enumerate(WORDS)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    extra = {"pad_token": "<pad>"} if with_pad else {}
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>", unk_token="<unk>", **extra)
