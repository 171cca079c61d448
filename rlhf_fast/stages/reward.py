"""Reward-model training: Bradley–Terry loss on (prompt, chosen, rejected) pairs.

loss = mean over pairs of −log σ(r_chosen − r_rejected − margin)   (margin = 0 unless the row has one)
[+ center_rewards_coefficient · mean((r_chosen + r_rejected)²), optional, as in TRL]

The reward model is a ``transformers`` ``AutoModelForSequenceClassification`` with ``num_labels=1``,
usually initialised from the SFT stage's directory (backbone weights carried over, a new ``score``
head). A sequence's score is read at its **last attended token** (from the attention mask, so left
and right padding give the same score, and a final EOS equal to the pad token still counts), or with
``pooling: mean`` from the mean hidden state over its attended tokens. The choice is saved in the
model's config.json (``rlhf_fast_reward_pooling``) and ``rlhf_fast.models.reward.pool_hidden`` is the
one function training, evaluation and PPO's ``ModelReward`` pool with, so a model scores the same in
all three. ``config.pad_token_id`` is set, so the model's own ``forward`` pools correctly too when
pad != eos — for "last" pooling only: Hugging Face's ``forward`` knows no mean pooling.

Training is the stages' loop (``rlhf_fast.stages.base``: AdamW, warmup + decay, clipping, accumulation,
length-grouped batches, tqdm, metrics.jsonl); chosen and rejected of a micro-batch run in one forward. Held-out
accuracy = share of pairs with r_chosen > r_rejected (ties count as wrong).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from rlhf_fast.models import patch_backbone
from rlhf_fast.models.loading import backbone_hidden, position_ids_from_mask
from rlhf_fast.models.reward import (
    POOLING_CONFIG_KEY,
    REWARD_POOLINGS,
    check_pooling,
    classifier_backbone,
    pool_hidden,
    reward_pooling,
    score_head,
)
from rlhf_fast.stages.base import (
    DEMO,
    StageResult,
    StageTrainingArgs,
    check_training_fields,
    preference_rows,
    print_stage_summary,
    resolve_device,
    train_and_finish,
    with_stage_tokenizer,
)
from rlhf_fast.stages.data import (
    PreferenceExample,
    length_grouped_batches,
    pad_sequences,
    tokenize_preference_rows,
)
from rlhf_fast.stages.io import StageDirectory, load_reward_model
from rlhf_fast.trainer.optim import autocast_ctx

__all__ = [
    "RewardConfig", "RewardResult", "bradley_terry_loss", "sequence_scores", "evaluate_reward_model",
    "load_reward_model", "train_reward_model", "run_rm_stage",
]

RewardResult = StageResult


@dataclass
class RewardConfig(StageTrainingArgs):
    """Settings of ``rlhf-fast rm`` (YAML section ``rm:``)."""

    model_name_or_path: str = field(default="runs/sft", metadata={"help": "Finished SFT stage directory (or a hub name)."})
    allow_unmarked_model_dir: bool = field(default=False, metadata={"help": "Accept a local HF model dir without the COMPLETE marker."})
    tokenizer_name_or_path: str | None = field(default=None, metadata={"help": "Defaults to model_name_or_path."})
    dataset: str = field(default=DEMO, metadata={"help": "Preference file (.jsonl/.json/.parquet) or 'demo' (corpus pairs judged by the gold judge)."})
    eval_dataset: str | None = field(default=None, metadata={"help": "Held-out file; None: split eval_fraction off."})
    eval_fraction: float = field(default=0.1, metadata={"help": "Held-out share when eval_dataset is None."})
    output_dir: str = field(default="runs/rm", metadata={"help": "Finished stage directory to write."})
    max_length: int = field(default=256, metadata={"help": "Max prompt+response tokens per side."})
    max_prompt_length: int | None = field(default=None, metadata={"help": "Prompt tokens kept when truncating."})
    use_chat_template: bool = field(default=True, metadata={"help": "Format string prompts with the chat template when there is one."})
    pooling: Literal["last", "mean"] = field(default="last", metadata={"help": "Score at the last attended token (HF convention) or from the mean hidden state over attended tokens; saved in config.json."})
    use_margin: bool = field(default=True, metadata={"help": "Subtract the row's 'margin' column inside the sigmoid."})
    center_rewards_coefficient: float | None = field(default=None, metadata={"help": "Weight of mean((r_c + r_r)^2) (TRL); None: off."})
    per_device_train_batch_size: int = field(default=16, metadata={"help": "Pairs per micro-batch."})
    per_device_eval_batch_size: int = field(default=32, metadata={"help": "Pairs per eval batch."})
    learning_rate: float = field(default=5e-5, metadata={"help": "Peak learning rate."})
    demo_num_pairs: int = field(default=2000, metadata={"help": "'demo' dataset: pairs to build from the corpus."})
    demo_noisy_labels: bool = field(default=True, metadata={"help": "'demo' dataset: sample labels from the gold judge's sigmoid."})

    def __post_init__(self):
        check_training_fields(self)
        if self.pooling not in REWARD_POOLINGS:
            raise ValueError(f"pooling must be one of {REWARD_POOLINGS}, got {self.pooling!r}")
        if self.demo_num_pairs < 2:
            raise ValueError(f"demo_num_pairs must be >= 2, got {self.demo_num_pairs}")


# --------------------------------------------------------------------------- math
def bradley_terry_loss(chosen: torch.Tensor, rejected: torch.Tensor, margin: torch.Tensor | None = None,
                       reduction: Literal["mean", "sum", "none"] = "mean") -> torch.Tensor:
    """−log σ(chosen − rejected − margin), per pair [P] reduced by ``reduction``; fp32.

    chosen, rejected: [P] scores; margin: [P] or None (0). Computed with logsigmoid (stable for large gaps).
    """
    if chosen.shape != rejected.shape:
        raise ValueError(f"chosen and rejected must have the same shape, got {tuple(chosen.shape)} and {tuple(rejected.shape)}")
    diff = chosen.float() - rejected.float()
    if margin is not None:
        if margin.shape != chosen.shape:
            raise ValueError(f"margin must have the shape of chosen {tuple(chosen.shape)}, got {tuple(margin.shape)}")
        diff = diff - margin.float()
    loss = -F.logsigmoid(diff)
    if reduction == "mean":
        return loss.mean()
    if reduction == "sum":
        return loss.sum()
    if reduction == "none":
        return loss
    raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")


def sequence_scores(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                    pooling: str | None = None) -> torch.Tensor:
    """Differentiable fp32 scores [B] of a sequence-classification model, pooled as ``pooling`` says
    (None: the model's own, ``reward_pooling(model)``: "last" attended token or "mean" over attended tokens).

    input_ids, attention_mask: [B, T], left or right padded (positions count attended tokens only).
    """
    pooling = reward_pooling(model) if pooling is None else check_pooling(pooling)
    backbone, head = classifier_backbone(model), score_head(model)
    hidden = backbone_hidden(backbone, input_ids, attention_mask, position_ids_from_mask(attention_mask))
    pooled = pool_hidden(hidden, attention_mask, pooling)
    return head(pooled.to(head.weight.dtype)).squeeze(-1).float()


def _pair_batch(examples: list[PreferenceExample], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """[chosen..., rejected...] right-padded to one length: ids, mask [2P, T] and margins [P]."""
    seqs = [e.chosen_ids for e in examples] + [e.rejected_ids for e in examples]
    ids, mask = pad_sequences(seqs, pad_id, "right")
    margins = torch.tensor([e.margin for e in examples], dtype=torch.float32)
    return ids.to(device, non_blocking=True), mask.to(device, non_blocking=True), margins.to(device)


@torch.no_grad()
def evaluate_reward_model(model: nn.Module, examples: list[PreferenceExample], pad_id: int, batch_size: int = 32,
                          use_margin: bool = True, bf16: bool = False) -> dict:
    """Held-out {"accuracy", "loss", "margin_mean" (mean r_c − r_r), "pairs"} over ``examples``."""
    if not examples:
        return {"accuracy": None, "loss": None, "margin_mean": None, "pairs": 0}
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    lengths = [max(len(e.chosen_ids), len(e.rejected_ids)) for e in examples]
    correct = torch.zeros((), device=device)
    loss_sum = torch.zeros((), device=device)
    gap_sum = torch.zeros((), device=device)
    for indices in length_grouped_batches(lengths, batch_size, shuffle=False):
        ids, mask, margins = _pair_batch([examples[i] for i in indices], pad_id, device)
        with autocast_ctx(device, bf16):
            scores = sequence_scores(model, ids, mask)
        rc, rr = scores[: len(indices)], scores[len(indices):]
        correct += (rc > rr).sum()
        loss_sum += bradley_terry_loss(rc, rr, margins if use_margin else None, reduction="sum")
        gap_sum += (rc - rr).sum()
    model.train(was_training)
    n = len(examples)
    return {"accuracy": correct.item() / n, "loss": loss_sum.item() / n, "margin_mean": gap_sum.item() / n, "pairs": n}


# --------------------------------------------------------------------------- model + data
def train_reward_model(cfg: RewardConfig, model: nn.Module | None = None, tokenizer=None, train_dataset=None,
                       eval_dataset=None) -> RewardResult:
    """Run the reward-model stage and write ``cfg.output_dir`` as a finished stage directory.

    model / tokenizer: an in-memory sequence-classification model (num_labels=1) and tokenizer
    instead of ``cfg.model_name_or_path``. train_dataset / eval_dataset: in-memory rows
    ``[{"prompt", "chosen", "rejected"[, "margin"]}]``, a ``datasets.Dataset`` or a path, instead of
    ``cfg.dataset``. Returns the model, tokenizer, output directory and summary metrics
    (``initial_eval_accuracy``, ``final_eval_accuracy``, ``final_eval_loss``, ...).
    """
    if not isinstance(cfg, RewardConfig):
        raise TypeError(f"cfg must be a RewardConfig, got {type(cfg).__name__}")
    device = resolve_device(cfg.device)
    stage_dir = StageDirectory(cfg.output_dir, stage="rm")
    torch.manual_seed(cfg.seed)
    if model is None:
        model, tokenizer = load_reward_model(
            cfg.model_name_or_path, tokenizer, cfg.allow_unmarked_model_dir, cfg.attn_implementation,
            cfg.tokenizer_name_or_path,
        )
    else:
        head = score_head(model)
        if head.out_features != 1:
            raise ValueError(f"reward model must have num_labels=1, got {head.out_features}")
        if tokenizer is None:
            raise ValueError("an in-memory reward model needs tokenizer=")
        model, tokenizer = with_stage_tokenizer(cfg, model, tokenizer)
    if cfg.fused_backbone:
        patch_backbone(model)
    # The stage's pooling is part of the model: written into config.json, read back by ModelReward.
    setattr(model.config, POOLING_CONFIG_KEY, cfg.pooling)
    train_rows, eval_rows = preference_rows(cfg, train_dataset, eval_dataset)
    tok_kw = dict(max_length=cfg.max_length, max_prompt_length=cfg.max_prompt_length,
                  use_chat_template=cfg.use_chat_template)
    train_ex = tokenize_preference_rows(train_rows, tokenizer, **tok_kw)
    eval_ex = tokenize_preference_rows(eval_rows, tokenizer, **tok_kw) if eval_rows.rows else []
    model.to(device)
    pad_id = tokenizer.pad_token_id
    lengths = [max(len(e.chosen_ids), len(e.rejected_ids)) for e in train_ex]

    def micro_loss(indices):
        ids, mask, margins = _pair_batch([train_ex[i] for i in indices], pad_id, device)
        scores = sequence_scores(model, ids, mask)
        rc, rr = scores[: len(indices)], scores[len(indices):]
        loss = bradley_terry_loss(rc, rr, margins if cfg.use_margin else None, reduction="sum")
        if cfg.center_rewards_coefficient:
            loss = loss + cfg.center_rewards_coefficient * ((rc + rr) ** 2).sum()
        tokens = sum(len(train_ex[i].chosen_ids) + len(train_ex[i].rejected_ids) for i in indices)  # host-side count
        return loss, tokens, len(indices)

    def evaluate():
        return evaluate_reward_model(model, eval_ex, pad_id, cfg.per_device_eval_batch_size, cfg.use_margin, cfg.bf16)

    def summarize(hist):
        return {
            "train_pairs": len(train_ex), "eval_pairs": len(eval_ex), "steps": hist["steps"],
            "train_loss": hist["train_loss"],
            "initial_eval_accuracy": hist["initial_eval"]["accuracy"], "initial_eval_loss": hist["initial_eval"]["loss"],
            "final_eval_accuracy": hist["final_eval"]["accuracy"], "final_eval_loss": hist["final_eval"]["loss"],
            "final_eval_margin_mean": hist["final_eval"]["margin_mean"], "tokens": hist["tokens"],
            "tokens_per_s": hist["tokens_per_s"], "runtime_s": hist["runtime_s"],
            "skipped_nonfinite_steps": hist["skipped_nonfinite_steps"], "dataset": train_rows.source,
            "pooling": cfg.pooling,
        }

    return train_and_finish(stage_dir, model=model, tokenizer=tokenizer, cfg=cfg, summarize=summarize,
                            num_examples=len(train_ex), lengths=lengths, micro_loss=micro_loss, count_units=len,
                            evaluate=evaluate)


def run_rm_stage(cfg: RewardConfig) -> int:
    """The ``rlhf-fast rm`` command body: train, then print the output directory and the summary."""
    result = train_reward_model(cfg)
    return print_stage_summary("rm", result.output_dir, result.metrics)
