"""A GRPO script written for TRL 1.16, in the shape of TRL's own GRPOTrainer quickstart (docs: "GRPO Trainer"):
a prompt dataset, a length reward and a format reward, GRPOConfig from the command line, train / save_model.

Migration to rlhf_fast changes one line, the import (see docs/migrating_from_trl.md):
    from trl import GRPOConfig, GRPOTrainer   ->   from rlhf_fast import GRPOConfig, GRPOTrainer

To stay runnable with no download, the model (a tiny Qwen2) and its word-level tokenizer are built in
--model_dir when it holds none, and the prompts are generated here instead of load_dataset("trl-lib/tldr").
"""
import argparse
import os
import re
import sys

import torch
from datasets import Dataset
from transformers import HfArgumentParser, PreTrainedTokenizerFast
from trl import GRPOConfig, GRPOTrainer  # the one line a migration changes


def build_tiny(model_dir: str, vocab_size: int = 1000) -> None:
    """Tiny Qwen2 policy + word-level tokenizer (one word = one token) saved under model_dir."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

    vocab = {f"t{i}": i for i in range(vocab_size)}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="t1"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="t0", unk_token="t1", eos_token="t2")
    cfg = Qwen2Config(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=vocab_size, tie_word_embeddings=False,
                      max_position_embeddings=512, pad_token_id=0, eos_token_id=2, bos_token_id=None)
    torch.manual_seed(0)
    Qwen2ForCausalLM(cfg).save_pretrained(model_dir)
    tok.save_pretrained(model_dir)


# Reward the completions whose length is close to 20 characters (TRL's quickstart reward)
def reward_len(completions, **kwargs):
    return [-abs(20 - len(completion)) for completion in completions]


# Reward completions that start with the word the prompt's `target` column names (a format-style reward
# reading a dataset column, which TRL passes as a keyword argument)
def reward_format(completions, target, **kwargs):
    return [1.0 if re.match(rf"^{t}\b", c) else 0.0 for c, t in zip(completions, target)]


def main(argv=None):
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--model_dir", default="runs/trl_grpo_script_model")
    pre.add_argument("--vocab_size", type=int, default=1000)
    pre.add_argument("--num_prompts", type=int, default=64)
    known, rest = pre.parse_known_args(argv)
    if not os.path.isfile(os.path.join(known.model_dir, "config.json")):
        build_tiny(known.model_dir, known.vocab_size)

    parser = HfArgumentParser(GRPOConfig)
    (training_args,) = parser.parse_args_into_dataclasses(args=rest)

    g = torch.Generator().manual_seed(1234)
    rows = []
    for _ in range(known.num_prompts):
        words = torch.randint(3, known.vocab_size, (int(torch.randint(4, 13, (1,), generator=g)),), generator=g)
        rows.append({"prompt": " ".join(f"t{int(w)}" for w in words), "target": f"t{int(words[0])}"})
    dataset = Dataset.from_list(rows)

    # The word-level tokenizer is loaded as saved (AutoTokenizer would map the Qwen2 config to Qwen2's BPE class)
    tokenizer = PreTrainedTokenizerFast.from_pretrained(known.model_dir, padding_side="left")
    trainer = GRPOTrainer(
        model=known.model_dir,
        reward_funcs=[reward_len, reward_format],
        args=training_args,
        train_dataset=dataset,
        processing_class=tokenizer,
    )
    trainer.train()
    trainer.save_model(training_args.output_dir)
    return trainer


if __name__ == "__main__":
    main(sys.argv[1:])
