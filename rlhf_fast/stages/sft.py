"""Supervised fine-tuning: next-token loss on response tokens only, through the fused log-prob op.

The causal LM's own ``forward`` is never called (it would build [tokens, vocab] logits): the
backbone gives hidden states [B, T, H], the positions that predict a response token are gathered
([N, H], prompt and padding positions never reach the LM head) and ``fused_linear_logprobs`` turns
them into log-probs with the LM head weight, chunk by chunk (``rlhf_fast.stages.base.response_logprobs``).

Loss of an optimizer step = −Σ log p(response tokens) / (number of response tokens in the whole
accumulated batch), so gradient accumulation gives the same update as one big batch.

Training is the stages' loop (``rlhf_fast.stages.base``: AdamW, warmup + decay, clipping,
accumulation, length-grouped batches, tqdm, ``metrics.jsonl`` with loss, lr, grad_norm, tokens_per_s and
``eval_loss`` lines, non-finite step skipping), with the held-out loss before and after training (and
every ``eval_steps``). The output is a finished stage directory (see ``rlhf_fast.stages.io``).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from rlhf_fast.models.loading import get_backbone, get_lm_head
from rlhf_fast.stages.base import (
    DEMO,
    StageResult,
    StageTrainingArgs,
    check_training_fields,
    load_stage_policy,
    print_stage_summary,
    resolve_device,
    response_logprobs,
    stage_rows,
    train_and_finish,
)
from rlhf_fast.stages.data import (
    Rows,
    SFTExample,
    collate_sft,
    length_grouped_batches,
    load_sft_rows,
    tokenize_sft_rows,
)
from rlhf_fast.stages.io import StageDirectory
from rlhf_fast.trainer.optim import autocast_ctx

__all__ = ["SFTConfig", "SFTResult", "train_sft", "run_sft_stage", "evaluate_sft_loss"]

SFTResult = StageResult


@dataclass
class SFTConfig(StageTrainingArgs):
    """Settings of ``rlhf-fast sft`` (YAML section ``sft:``). Names follow TRL / transformers where they exist."""

    model_name_or_path: str = field(default=DEMO, metadata={"help": "HF model dir or hub name; 'demo' builds the tiny random Qwen2 + BPE tokenizer."})
    tokenizer_name_or_path: str | None = field(default=None, metadata={"help": "Defaults to model_name_or_path."})
    dataset: str = field(default=DEMO, metadata={"help": ".jsonl/.json/.parquet file or save_to_disk dir; 'demo' = pydoc corpus pairs."})
    eval_dataset: str | None = field(default=None, metadata={"help": "Held-out file; None: split eval_fraction off the train set."})
    eval_fraction: float = field(default=0.05, metadata={"help": "Held-out share when eval_dataset is None (not for 'demo')."})
    output_dir: str = field(default="runs/sft", metadata={"help": "Finished stage directory to write."})
    max_length: int = field(default=256, metadata={"help": "Max prompt+response tokens."})
    max_prompt_length: int | None = field(default=None, metadata={"help": "Prompt tokens kept when truncating (default max_length//2)."})
    use_chat_template: bool = field(default=True, metadata={"help": "Format string prompts with the tokenizer's chat template when it has one."})
    per_device_train_batch_size: int = field(default=8, metadata={"help": "Sequences per micro-batch."})
    per_device_eval_batch_size: int = field(default=16, metadata={"help": "Sequences per eval batch."})
    demo_vocab_size: int = field(default=1024, metadata={"help": "'demo' model: BPE vocabulary size."})
    demo_prompt_words: int = field(default=8, metadata={"help": "'demo' dataset: prompt length in words."})
    demo_response_words: int = field(default=30, metadata={"help": "'demo' dataset: response length in words."})

    def __post_init__(self):
        check_training_fields(self)


@torch.no_grad()
def evaluate_sft_loss(model: nn.Module, examples: list[SFTExample], pad_id: int, batch_size: int = 16,
                      chunk_size: int | None = None, bf16: bool = False) -> dict:
    """Mean negative log-likelihood per response token over ``examples`` ({"loss", "tokens"})."""
    if not examples:
        return {"loss": None, "tokens": 0}
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    backbone, head = get_backbone(model), get_lm_head(model)
    total = torch.zeros((), dtype=torch.float64, device=device)
    tokens = 0
    lengths = [len(e.prompt_ids) + len(e.response_ids) for e in examples]
    for indices in length_grouped_batches(lengths, batch_size, shuffle=False):
        batch = {k: v.to(device) for k, v in collate_sft([examples[i] for i in indices], pad_id).items()}
        with autocast_ctx(device, bf16):
            logp = response_logprobs(backbone, head, batch, chunk_size)
        total -= logp.double().sum()
        tokens += logp.numel()
    model.train(was_training)
    return {"loss": (total / max(tokens, 1)).item(), "tokens": tokens}


def _sft_rows(cfg: SFTConfig, train_dataset, eval_dataset, demo_split) -> tuple[Rows, Rows]:
    def demo():
        from rlhf_fast.stages.demo_data import sft_pairs

        kw = dict(prompt_words=cfg.demo_prompt_words, response_words=cfg.demo_response_words)
        train = load_sft_rows(sft_pairs(demo_split.train, **kw), name="demo train pairs")
        ev = load_sft_rows(sft_pairs(demo_split.heldout, **kw), name="demo held-out pairs")
        return train, ev

    return stage_rows(cfg, train_dataset, eval_dataset, load_sft_rows, demo)


def train_sft(cfg: SFTConfig, model: nn.Module | None = None, tokenizer=None, train_dataset=None,
              eval_dataset=None) -> SFTResult:
    """Run the SFT stage and write ``cfg.output_dir`` as a finished stage directory.

    model / tokenizer: in-memory objects instead of ``cfg.model_name_or_path``. train_dataset /
    eval_dataset: rows (list of dicts, ``datasets.Dataset`` or a path) instead of ``cfg.dataset``.
    Returns the trained model, its tokenizer, the output directory and the summary metrics
    (``initial_eval_loss``, ``final_eval_loss``, ``train_loss``, ``steps``, ``tokens_per_s`` ...).
    """
    if not isinstance(cfg, SFTConfig):
        raise TypeError(f"cfg must be an SFTConfig, got {type(cfg).__name__}")
    device = resolve_device(cfg.device)
    stage_dir = StageDirectory(cfg.output_dir, stage="sft")  # fails now, not after training, on a bad output_dir
    torch.manual_seed(cfg.seed)
    demo_split = None
    if cfg.dataset == DEMO or cfg.model_name_or_path == DEMO:
        from rlhf_fast.stages.demo_data import demo_corpus

        demo_split = demo_corpus()

    def load():
        from rlhf_fast.models.loading import load_causal_lm

        return load_causal_lm(cfg.model_name_or_path, dtype=torch.float32, attn_implementation=cfg.attn_implementation)

    model, tokenizer = load_stage_policy(cfg, model, tokenizer, load, corpus=demo_split)
    train_rows, eval_rows = _sft_rows(cfg, train_dataset, eval_dataset, demo_split)
    tok_kw = dict(max_length=cfg.max_length, max_prompt_length=cfg.max_prompt_length,
                  use_chat_template=cfg.use_chat_template)
    train_ex = tokenize_sft_rows(train_rows, tokenizer, **tok_kw)
    eval_ex = tokenize_sft_rows(eval_rows, tokenizer, **tok_kw) if eval_rows.rows else []
    model.to(device)
    backbone, head = get_backbone(model), get_lm_head(model)
    pad_id = tokenizer.pad_token_id
    lengths = [len(e.prompt_ids) + len(e.response_ids) for e in train_ex]

    def micro_loss(indices):
        batch = {k: v.to(device, non_blocking=True) for k, v in collate_sft([train_ex[i] for i in indices], pad_id).items()}
        logp = response_logprobs(backbone, head, batch, cfg.logprob_chunk_size)
        tokens = sum(len(train_ex[i].prompt_ids) + len(train_ex[i].response_ids) for i in indices)  # host-side count
        return -logp.sum(), tokens, logp.numel()

    def count_units(indices):
        return sum(len(train_ex[i].response_ids) for i in indices)

    def evaluate():
        return evaluate_sft_loss(model, eval_ex, pad_id, cfg.per_device_eval_batch_size, cfg.logprob_chunk_size, cfg.bf16)

    def summarize(hist):
        return {
            "train_examples": len(train_ex), "eval_examples": len(eval_ex), "steps": hist["steps"],
            "train_loss": hist["train_loss"], "initial_eval_loss": hist["initial_eval"]["loss"],
            "final_eval_loss": hist["final_eval"]["loss"], "tokens": hist["tokens"],
            "tokens_per_s": hist["tokens_per_s"], "runtime_s": hist["runtime_s"],
            "skipped_nonfinite_steps": hist["skipped_nonfinite_steps"], "dataset": train_rows.source,
        }

    return train_and_finish(stage_dir, model=model, tokenizer=tokenizer, cfg=cfg, summarize=summarize,
                            num_examples=len(train_ex), lengths=lengths, micro_loss=micro_loss,
                            count_units=count_units, evaluate=evaluate)


def run_sft_stage(cfg: SFTConfig) -> int:
    """The ``rlhf-fast sft`` command body: train, then print the output directory and the summary."""
    result = train_sft(cfg)
    return print_stage_summary("sft", result.output_dir, result.metrics)
