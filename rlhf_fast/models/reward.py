"""Reward adapters: a transformers sequence-classification model or any Python callable, one interface.

Every adapter is called as ``reward(input_ids=..., attention_mask=..., prompts=..., completions=...)``
and returns fp32 scores [B] on ``input_ids``' device (CPU when no ids are given):
- ``ModelReward`` scores token ids with an ``AutoModelForSequenceClassification`` (num_labels=1) at the
  **last attended token** of each row (the EOS token when the response has one), found from the
  attention mask, not from ``pad_token_id`` (HF's own pooling mistakes a final EOS for padding when
  pad == eos). A reward model trained with ``pooling="mean"`` (``config.rlhf_fast_reward_pooling``,
  saved in its config.json) is scored on the mean of its hidden states over all attended tokens
  instead: ``pool_hidden`` is the one function the RM stage, its evaluation and PPO all pool with.
  With ``tokenizer=`` it re-tokenizes the prompt + completion texts instead (a reward model with its
  own vocabulary).
- ``CallableReward`` wraps ``fn(prompts: list[str], completions: list[str]) -> list[float]`` and checks
  the count and that every score is a finite number.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import nn

from rlhf_fast.models.loading import backbone_hidden, get_backbone, position_ids_from_mask


def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """Index of the last attended position of each row: [B, T] 0/1 -> int64 [B] (0 for an empty row)."""
    T = attention_mask.shape[-1]
    pos = torch.arange(T, device=attention_mask.device).expand_as(attention_mask)
    return torch.where(attention_mask.bool(), pos, torch.zeros_like(pos)).amax(-1)


# How a reward model turns its hidden states [B, T, H] into the one vector [B, H] its linear head scores.
# "last": the last attended token (the Hugging Face convention). "mean": the mean over attended tokens,
# which lets a tiny backbone score properties of the whole text (shares of words) without first
# having to gather them into one position.
REWARD_POOLINGS = ("last", "mean")
POOLING_CONFIG_KEY = "rlhf_fast_reward_pooling"  # attribute of model.config; absent means "last"


def check_pooling(pooling) -> str:
    if pooling not in REWARD_POOLINGS:
        raise ValueError(f"reward pooling must be one of {REWARD_POOLINGS}, got {pooling!r}")
    return pooling


def reward_pooling(model: nn.Module) -> str:
    """The pooling a sequence-classification model was trained with: ``config.rlhf_fast_reward_pooling``,
    "last" when the config does not name one (any Hugging Face reward model)."""
    config = getattr(model, "config", None)
    pooling = getattr(config, POOLING_CONFIG_KEY, None)
    if pooling is None:
        return "last"
    if pooling not in REWARD_POOLINGS:
        raise ValueError(
            f"{type(model).__name__}.config.{POOLING_CONFIG_KEY} = {pooling!r} is not a known reward pooling; "
            f"expected one of {REWARD_POOLINGS} (was the model saved by a newer rlhf_fast?)"
        )
    return pooling


def pool_hidden(hidden: torch.Tensor, attention_mask: torch.Tensor, pooling: str = "last") -> torch.Tensor:
    """hidden [B, T, H], attention_mask [B, T] 0/1 (left or right padded) -> pooled [B, H] in hidden's dtype.

    "last": hidden at the last attended position; "mean": the mean over attended positions (fp32
    accumulation; an all-zero mask row gives zeros). Padding never contributes to either.
    """
    check_pooling(pooling)
    if hidden.dim() != 3 or attention_mask.shape != hidden.shape[:2]:
        raise ValueError(f"hidden must be [B, T, H] and attention_mask [B, T], got {tuple(hidden.shape)} and "
                         f"{tuple(attention_mask.shape)}")
    if pooling == "last":
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), last_token_index(attention_mask)]
    weights = attention_mask.to(torch.float32).unsqueeze(-1)
    total = (hidden.float() * weights).sum(1)
    return (total / weights.sum(1).clamp_min(1.0)).to(hidden.dtype)


def score_head(model: nn.Module) -> nn.Module:
    """The classification head of a sequence-classification model (``score``, else ``classifier``)."""
    for attr in ("score", "classifier"):
        head = getattr(model, attr, None)
        if isinstance(head, nn.Linear):
            return head
    raise ValueError(
        f"{type(model).__name__} has no linear `score` head: pass an AutoModelForSequenceClassification "
        f"with num_labels=1 as the reward / value model"
    )


def classifier_backbone(model: nn.Module) -> nn.Module:
    """The decoder stack under a sequence-classification head (``model.base_model``)."""
    base = getattr(model, "base_model", None)
    if isinstance(base, nn.Module) and base is not model:
        return base
    return get_backbone(model)


class ModelReward:
    """Score = ``model.score(pool_hidden(last_hidden_state, mask, reward_pooling(model)))`` of a
    sequence-classification model: the last attended token's hidden state, or the mean over attended
    tokens for a model trained with ``pooling="mean"``.

    The model is put in eval mode and frozen (requires_grad off) in place.
    """

    def __init__(self, model: nn.Module, tokenizer=None, max_length: int | None = None):
        head = score_head(model)
        if head.out_features != 1:
            raise ValueError(
                f"reward model must output one score per sequence (num_labels=1), got num_labels={head.out_features}"
            )
        self.model = model.eval()
        self.backbone = classifier_backbone(model)
        self.head = head
        self.pooling = reward_pooling(model)
        self.tokenizer = tokenizer
        self.max_length = max_length
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.padding_free = False

    def enable_padding_free(self) -> str | None:
        """Score on packed rows of the valid tokens (``rlhf_fast.models.packing``); None, or why it stays padded."""
        from rlhf_fast.models.packing import enable_packing

        reason = enable_packing(self.backbone)
        self.padding_free = reason is None
        return reason

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @torch.no_grad()
    def score_ids(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """input_ids, attention_mask: [B, T] (left/right padding both fine). Returns fp32 [B]."""
        if input_ids.dim() != 2 or attention_mask.shape != input_ids.shape:
            raise ValueError(
                f"input_ids and attention_mask must both be [B, T], got {tuple(input_ids.shape)} and "
                f"{tuple(attention_mask.shape)}"
            )
        dev = self.device
        ids, mask = input_ids.to(dev), attention_mask.to(dev)
        if self.padding_free:
            from rlhf_fast.models.packing import packed_hidden

            hidden = packed_hidden(self.backbone, ids, mask)
        else:
            hidden = backbone_hidden(self.backbone, ids, mask, position_ids_from_mask(mask))
        pooled = pool_hidden(hidden, mask, self.pooling)
        return self.head(pooled.to(self.head.weight.dtype)).squeeze(-1).float().to(input_ids.device)

    def __call__(self, *, input_ids=None, attention_mask=None, prompts=None, completions=None) -> torch.Tensor:
        if self.tokenizer is not None:
            if prompts is None or completions is None:
                raise ValueError("a ModelReward with its own tokenizer needs prompts= and completions= texts")
            texts = [p + c for p, c in zip(prompts, completions)]
            enc = self.tokenizer(
                texts, return_tensors="pt", padding=True, truncation=self.max_length is not None,
                max_length=self.max_length,
            )
            out_dev = input_ids.device if isinstance(input_ids, torch.Tensor) else torch.device("cpu")
            return self.score_ids(enc["input_ids"], enc["attention_mask"]).to(out_dev)
        if input_ids is None or attention_mask is None:
            raise ValueError("ModelReward needs input_ids= and attention_mask= (or construct it with tokenizer=)")
        return self.score_ids(input_ids, attention_mask)


class CallableReward:
    """Wraps ``fn(prompts, completions) -> list[float]``; checks count, type and finiteness."""

    def __init__(self, fn: Callable[[Sequence[str], Sequence[str]], Sequence[float]], allow_nonfinite: bool = False):
        if not callable(fn):
            raise TypeError(f"reward must be callable, got {type(fn).__name__}")
        self.fn = fn
        # Trainers pass allow_nonfinite=True: they skip the update and count it instead of failing.
        self.allow_nonfinite = allow_nonfinite

    def __call__(self, *, input_ids=None, attention_mask=None, prompts=None, completions=None) -> torch.Tensor:
        if prompts is None or completions is None:
            raise ValueError("a callable reward needs prompts= and completions= (lists of strings)")
        if len(prompts) != len(completions):
            raise ValueError(f"prompts and completions must have the same length, got {len(prompts)} and {len(completions)}")
        name = getattr(self.fn, "__name__", type(self.fn).__name__)
        scores = self.fn(list(prompts), list(completions))
        if isinstance(scores, torch.Tensor):
            scores = scores.detach().cpu().flatten().tolist()
        try:
            scores = list(scores)
        except TypeError:
            raise TypeError(
                f"reward function {name} must return a list of floats, got {type(scores).__name__}"
            ) from None
        if len(scores) != len(completions):
            raise ValueError(
                f"reward function {name} returned {len(scores)} scores for {len(completions)} completions; "
                f"it must return one float per completion"
            )
        values = []
        for i, s in enumerate(scores):
            try:
                v = float(s)
            except (TypeError, ValueError):
                raise TypeError(f"reward function {name} returned a non-number at index {i}: {s!r}") from None
            if not math.isfinite(v) and not self.allow_nonfinite:
                raise ValueError(
                    f"reward function {name} returned a non-finite score {v} at index {i}; "
                    f"return finite floats (clip or replace NaN/inf in the function)"
                )
            values.append(v)
        device = input_ids.device if isinstance(input_ids, torch.Tensor) else torch.device("cpu")
        return torch.tensor(values, dtype=torch.float32, device=device)


def make_reward(reward, tokenizer=None):
    """A ``ModelReward`` for an ``nn.Module``, a ``CallableReward`` for any other callable, adapters as is."""
    if isinstance(reward, (ModelReward, CallableReward)):
        return reward
    if isinstance(reward, nn.Module):
        return ModelReward(reward, tokenizer=tokenizer)
    if callable(reward):
        return CallableReward(reward)
    raise TypeError(
        f"reward must be an AutoModelForSequenceClassification or a callable (prompts, completions) -> list[float], "
        f"got {type(reward).__name__}"
    )
