"""A PPO script written for TRL 1.12 (trl.experimental.ppo), in the shape of TRL's own
examples/scripts/ppo/ppo.py: policy, reference, value and reward models, a tokenized dataset with an
`input_ids` column, PPOConfig from the command line, train / save_model / generate_completions.

Migration to rlhf_fast changes one line, the import (see docs/migrating_from_trl.md):
    from trl.experimental.ppo import PPOConfig, PPOTrainer   ->   from rlhf_fast import PPOConfig, PPOTrainer

To stay runnable with no download, the models are built from tiny configs when --model_dir is not
a directory holding `sft/` and `rm/` subdirectories (the benchmark writes those).
"""
import argparse
import os
import sys

import torch
from datasets import Dataset
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    HfArgumentParser,
)
from trl.experimental.ppo import PPOConfig, PPOTrainer  # the one line a migration changes


def build_tiny(model_dir: str, vocab_size: int = 1000) -> None:
    """Tiny Qwen2 policy + reward model + word-level tokenizer saved under model_dir/{sft,rm}."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import (
        PreTrainedTokenizerFast,
        Qwen2Config,
        Qwen2ForCausalLM,
        Qwen2ForSequenceClassification,
    )

    vocab = {f"t{i}": i for i in range(vocab_size)}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="t1"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="t0", unk_token="t1", eos_token="t2")
    cfg = Qwen2Config(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=vocab_size, tie_word_embeddings=False,
                      max_position_embeddings=512, pad_token_id=0, eos_token_id=2, bos_token_id=None)
    torch.manual_seed(0)
    Qwen2ForCausalLM(cfg).save_pretrained(os.path.join(model_dir, "sft"))
    tok.save_pretrained(os.path.join(model_dir, "sft"))
    cfg.num_labels = 1
    Qwen2ForSequenceClassification(cfg).save_pretrained(os.path.join(model_dir, "rm"))
    tok.save_pretrained(os.path.join(model_dir, "rm"))


def main(argv=None):
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--model_dir", default="runs/trl_script_models")
    pre.add_argument("--vocab_size", type=int, default=1000)
    pre.add_argument("--num_prompts", type=int, default=64)
    known, rest = pre.parse_known_args(argv)
    if not os.path.isdir(os.path.join(known.model_dir, "sft")):
        build_tiny(known.model_dir, known.vocab_size)

    parser = HfArgumentParser(PPOConfig)
    (training_args,) = parser.parse_args_into_dataclasses(args=rest)
    sft = os.path.join(known.model_dir, "sft")
    rm = os.path.join(known.model_dir, "rm")

    tokenizer = AutoTokenizer.from_pretrained(sft, padding_side="left")
    value_model = AutoModelForSequenceClassification.from_pretrained(rm, num_labels=1)
    reward_model = AutoModelForSequenceClassification.from_pretrained(rm, num_labels=1)
    policy = AutoModelForCausalLM.from_pretrained(sft)
    ref_policy = AutoModelForCausalLM.from_pretrained(sft)

    g = torch.Generator().manual_seed(1234)
    V = policy.config.vocab_size
    rows = [{"input_ids": torch.randint(3, V, (int(torch.randint(4, 13, (1,), generator=g)),), generator=g).tolist()}
            for _ in range(known.num_prompts)]
    train_dataset = Dataset.from_list(rows[: known.num_prompts - 8])
    eval_dataset = Dataset.from_list(rows[known.num_prompts - 8:])

    trainer = PPOTrainer(
        args=training_args,
        processing_class=tokenizer,
        model=policy,
        ref_model=ref_policy,
        reward_model=reward_model,
        value_model=value_model,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
    )
    trainer.train()

    # Save and push to hub (TRL's example does exactly this)
    trainer.save_model(training_args.output_dir)
    if training_args.push_to_hub:
        trainer.push_to_hub(dataset_name="tiny-random-prompts")

    trainer.generate_completions()
    return trainer


if __name__ == "__main__":
    main(sys.argv[1:])
