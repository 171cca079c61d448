"""PPO for RLHF, top to bottom: rollout -> score -> advantages -> clipped updates.

``PPOTrainer`` is a drop-in for TRL 1.12's ``trl.experimental.ppo.PPOTrainer``: same constructor,
``train()``, ``save_model()``, ``generate_completions()``, ``state.log_history``, TrainerCallbacks and
metric names/formulas. Underneath, the step is a composition of plain functions that users writing
their own loop can call directly:

    rollout = generate_rollout(model, prompt_ids, prompt_mask, ...)            # lean KV-cache decode
    scores  = score_rollout(reward, tokenizer, rollout, ...)                   # reward model / callable
    fwd     = rollout_forward(model, rollout, ...)                             # old log-probs, values, ref
    adv     = compute_advantages(fwd, scores, kl_coef, ...)                    # KL-shaped rewards, GAE, whitening
    stats   = ppo_update(model, optimizer, batch, adv, ...)                    # epochs x minibatches x micro-batches

Critic-free estimators (``advantage_estimator`` = "grpo" | "rloo" | "reinforce_pp", TRL-GRPO style):
``num_generations`` responses per prompt, contiguous rows per group, no value model, advantages from
the ``rlhf_fast.algos`` registry (``compute_group_advantages``); for grpo/rloo the KL to the reference
is a loss term ``kl_coef`` x k3 per token, for reinforce_pp it stays in the token rewards.

Everything runs on torch.distributed when a process group is initialised (torchrun): prompts are
sharded by rank, whitening statistics and token counts are global, gradients are averaged by DDP.
"""
from __future__ import annotations

import contextlib
import math
import os
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from torch import nn

from rlhf_fast.algos import get_advantage_estimator
from rlhf_fast.models import PolicyValueModel, ensure_pad_token, make_reward
from rlhf_fast.ops.gae import gae
from rlhf_fast.ops.kl import kl_penalty, token_rewards
from rlhf_fast.ops.ppo_loss import aggregate_loss, ppo_policy_loss, value_loss
from rlhf_fast.ops.whiten import masked_whiten
from rlhf_fast.trainer.logging import MetricsLogger
from rlhf_fast.trainer.ppo_config import PPOConfig
from rlhf_fast.trainer.rollout import Rollout, generate, prompt_seeds

INVALID = -100


# =============================================================================== data
def left_pad(sequences: list[list[int]], pad_token_id: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad token id lists. Returns (input_ids int64 [B, P], attention_mask int64 [B, P])."""
    P = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), P), pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), P), dtype=torch.long)
    for i, s in enumerate(sequences):
        if len(s):
            ids[i, P - len(s):] = torch.as_tensor(s, dtype=torch.long)
            mask[i, P - len(s):] = 1
    return ids.to(device), mask.to(device)


def prompt_token_lists(dataset, tokenizer) -> list[list[int]]:
    """Token ids of every prompt: rows with ``input_ids`` (TRL's format) or a ``prompt`` string column."""
    if dataset is None:
        raise ValueError("train_dataset is required")
    n = len(dataset)
    if n == 0:
        raise ValueError("train_dataset is empty: it needs at least one prompt")
    columns = set(getattr(dataset, "column_names", None) or (dataset[0].keys() if isinstance(dataset[0], dict) else []))
    if "input_ids" in columns:
        out = [list(map(int, dataset[i]["input_ids"])) for i in range(n)]
    elif "prompt" in columns:
        texts = [dataset[i]["prompt"] for i in range(n)]
        out = tokenizer(texts)["input_ids"]  # as TRL's scripts tokenize prompts (special tokens included)
    else:
        raise ValueError(
            f"train_dataset rows need an 'input_ids' column (tokenized prompts, as TRL expects) or a 'prompt' "
            f"text column; found columns {sorted(columns)}"
        )
    for i, ids in enumerate(out):
        if len(ids) == 0:
            raise ValueError(f"train_dataset row {i} has an empty prompt")
    return out


class PromptSampler:
    """Deterministic shuffled batches of prompt indices, sharded by rank, resumable.

    Epoch e uses the permutation of a generator seeded with (seed, e); the global batch of
    ``batch_size`` indices is split into world_size contiguous shards. state_dict() = (epoch, position).
    """

    def __init__(self, num_prompts: int, batch_size: int, seed: int, rank: int = 0, world_size: int = 1):
        if batch_size > num_prompts:
            raise ValueError(
                f"the global batch ({batch_size} prompts = per_device_train_batch_size x gradient_accumulation_steps "
                f"x world size) is larger than train_dataset ({num_prompts} prompts)"
            )
        self.n, self.batch_size, self.seed = num_prompts, batch_size, seed
        self.rank, self.world_size = rank, world_size
        self.epoch, self.position = 0, 0
        self._perm = self._permutation(0)

    def _permutation(self, epoch: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(self.n, generator=g)

    def next_batch(self) -> tuple[torch.Tensor, int]:
        """(this rank's prompt indices int64 [batch_size // world_size], epoch). Drops ragged tails."""
        if self.position + self.batch_size > self.n:
            self.epoch += 1
            self.position = 0
            self._perm = self._permutation(self.epoch)
        glob = self._perm[self.position:self.position + self.batch_size]
        self.position += self.batch_size
        local = self.batch_size // self.world_size
        return glob[self.rank * local:(self.rank + 1) * local], self.epoch

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed, "n": self.n,
                "batch_size": self.batch_size}

    def load_state_dict(self, state: dict) -> None:
        for key in ("seed", "n", "batch_size"):
            if state[key] != getattr(self, key):
                raise ValueError(f"checkpoint data position was saved with {key}={state[key]}, this run has "
                                 f"{key}={getattr(self, key)}")
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
        self._perm = self._permutation(self.epoch)


# =============================================================================== KL control
class KLController:
    """Fixed or adaptive (Ziegler et al. 2019) KL coefficient; ``update`` takes the batch's mean summed KL."""

    def __init__(self, kind: str, init: float, target: float = 6.0, horizon: int = 10000):
        if kind not in ("fixed", "adaptive"):
            raise ValueError(f"kl_controller must be 'fixed' or 'adaptive', got {kind!r}")
        self.kind, self.value, self.target, self.horizon = kind, float(init), float(target), int(horizon)

    def update(self, current_kl: float, n_steps: int) -> None:
        if self.kind == "adaptive":
            error = min(max(current_kl / self.target - 1.0, -0.2), 0.2)
            self.value *= 1.0 + error * n_steps / self.horizon

    def state_dict(self) -> dict:
        return {"kind": self.kind, "value": self.value, "target": self.target, "horizon": self.horizon}

    def load_state_dict(self, state: dict) -> None:
        self.kind, self.value = state["kind"], float(state["value"])
        self.target, self.horizon = float(state["target"]), int(state["horizon"])


class RunningMoments:
    """Running mean/std of scores (parallel Welford over batches, global across ranks) for reward_norm."""

    def __init__(self):
        self.count, self.mean, self.m2 = 0.0, 0.0, 0.0

    def update(self, x: torch.Tensor, group=None) -> None:
        stats = torch.stack([x.numel() * torch.ones((), dtype=torch.float64), x.double().sum(), (x.double() ** 2).sum()])
        if _dist_ready(group):
            torch.distributed.all_reduce(stats, group=group)
        n, s, ss = (float(v) for v in stats)
        if n == 0:
            return
        mean_b = s / n
        m2_b = ss - n * mean_b ** 2
        delta = mean_b - self.mean
        tot = self.count + n
        self.mean += delta * n / tot
        self.m2 += m2_b + delta ** 2 * self.count * n / tot
        self.count = tot

    @property
    def std(self) -> float:
        return math.sqrt(self.m2 / max(self.count - 1, 1)) if self.count > 1 else 1.0

    def state_dict(self) -> dict:
        return {"count": self.count, "mean": self.mean, "m2": self.m2}

    def load_state_dict(self, s: dict) -> None:
        self.count, self.mean, self.m2 = s["count"], s["mean"], s["m2"]


# =============================================================================== distributed helpers
def _dist_ready(group=None) -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def all_reduce_sum(t: torch.Tensor, group=None) -> torch.Tensor:
    """Sum over ranks (a no-op without a process group). Returns a new tensor."""
    t = t.clone()
    if _dist_ready(group):
        torch.distributed.all_reduce(t, group=group)
    return t


# =============================================================================== the step, as functions
class RolloutForward(NamedTuple):
    """No-grad forward results on a rollout. All fp32 [B, R] (0 where the response mask is 0).

    logprobs is None when the update recomputes them on-policy (critic-free, one epoch, one minibatch);
    values is None without a critic; ref_logprobs is None without a reference."""

    logprobs: torch.Tensor | None
    ref_logprobs: torch.Tensor | None
    values: torch.Tensor | None


class Advantages(NamedTuple):
    """rewards, kl, advantages, returns: fp32 [B, R]; non_score_reward: -kl_coef * kl (masked).

    Critic-free estimators: returns is None; rewards are the token rewards (score on the last valid
    token, plus -kl_coef x kl for reinforce_pp); kl is the per-token estimate of the old policy
    against the reference (k3 for grpo/rloo, the one their loss term uses)."""

    rewards: torch.Tensor
    kl: torch.Tensor
    non_score_reward: torch.Tensor
    advantages: torch.Tensor
    returns: torch.Tensor | None


def autocast_ctx(device: torch.device, bf16: bool, fp16: bool = False):
    if bf16:
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    if fp16:
        return torch.autocast(device_type=device.type, dtype=torch.float16)
    return contextlib.nullcontext()


def generate_rollout(model: PolicyValueModel, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, *,
                     response_length: int, temperature: float, pad_token_id: int, stop_token_ids=(),
                     seeds: torch.Tensor | None = None, chunk_size: int = 64, inference_mode: bool = True) -> Rollout:
    """Sample responses for left-padded prompts [B, P] in chunks of ``chunk_size`` rows; one Rollout for all."""
    parts = []
    for s in range(0, prompt_ids.shape[0], chunk_size):
        sl = slice(s, s + chunk_size)
        parts.append(generate(model.policy, prompt_ids[sl], prompt_mask[sl], response_length,
                              pad_token_id=pad_token_id, temperature=temperature, stop_token_ids=stop_token_ids,
                              seeds=None if seeds is None else seeds[sl], trim=False, inference_mode=inference_mode))
    R = max(int(p.response_mask.sum(1).max()) if p.response_mask.numel() else 0 for p in parts)
    R = max(R, 1)
    responses = torch.cat([p.responses[:, :R] for p in parts])
    mask = torch.cat([p.response_mask[:, :R] for p in parts])
    return Rollout(torch.cat([prompt_ids, responses], 1), responses, mask,
                   torch.cat([p.contains_stop for p in parts]), prompt_ids.shape[1])


def score_rollout(reward, tokenizer, rollout: Rollout, prompt_mask: torch.Tensor) -> torch.Tensor:
    """Scores fp32 [B] of prompt + response (up to and including the stop token) from a reward adapter."""
    attn = torch.cat([prompt_mask.to(rollout.response_mask.dtype), rollout.response_mask], 1).long()
    kwargs: dict[str, Any] = {"input_ids": rollout.query_responses, "attention_mask": attn}
    if getattr(reward, "tokenizer", None) is not None or not hasattr(reward, "score_ids"):
        P = rollout.context_length
        kwargs["prompts"] = tokenizer.batch_decode(
            [r[m.bool()] for r, m in zip(rollout.query_responses[:, :P], prompt_mask)], skip_special_tokens=True)
        kwargs["completions"] = tokenizer.batch_decode(
            [r[m] for r, m in zip(rollout.responses, rollout.response_mask)], skip_special_tokens=True)
    return reward(**kwargs).float()


def full_attention_mask(prompt_mask: torch.Tensor, response_mask: torch.Tensor) -> torch.Tensor:
    return torch.cat([prompt_mask.long(), response_mask.long()], 1)


def trim_batch(query_responses, prompt_mask, response_mask):
    """Drop left-pad columns every row has and response columns no row uses (cheaper forwards).

    Returns (ids, attention_mask, response_start, response_cols) where response_cols is the number of
    response columns kept (outputs must be right-padded back to the full R by the caller)."""
    P = prompt_mask.shape[1]
    first_real = int((prompt_mask.long().cumsum(1) == 0).sum(1).min()) if prompt_mask.numel() else 0
    first_real = min(first_real, P - 1)
    resp_len = int(response_mask.long().sum(1).max()) if response_mask.numel() else 0
    # valid response tokens form a prefix of each row (tokens after the stop token are masked)
    resp_cols = max(resp_len, 1)
    ids = query_responses[:, first_real:P + resp_cols]
    attn = full_attention_mask(prompt_mask[:, first_real:], response_mask[:, :resp_cols])
    return ids, attn, P - first_real, resp_cols


def _pad_right(x: torch.Tensor, R: int) -> torch.Tensor:
    return x if x.shape[1] == R else torch.nn.functional.pad(x, (0, R - x.shape[1]))


@torch.no_grad()
def rollout_forward(model: PolicyValueModel, rollout: Rollout, prompt_mask: torch.Tensor, *, temperature: float,
                    need_reference: bool, chunk_size: int = 64, autocast=contextlib.nullcontext,
                    need_policy: bool = True) -> RolloutForward:
    """Old log-probs and values (one policy-value forward) and reference log-probs, in row chunks.

    need_policy=False skips the policy forward (logprobs and values None): the on-policy critic-free
    update takes its old log-probs from its own forward. Values are None when the model has no critic."""
    R = rollout.responses.shape[1]
    with_values = need_policy and getattr(model, "value_head", None) is not None
    lps, refs, vals = [], [], []
    for s in range(0, rollout.responses.shape[0], chunk_size):
        sl = slice(s, s + chunk_size)
        ids, attn, start, cols = trim_batch(rollout.query_responses[sl], prompt_mask[sl], rollout.response_mask[sl])
        m = rollout.response_mask[sl][:, :cols]
        with autocast():
            out = model(ids, attn, response_start=start, return_entropy=False, return_values=with_values,
                        temperature=temperature) if need_policy else None
            ref = model.reference_logprobs(ids, attn, response_start=start, temperature=temperature) \
                if need_reference else None
        if out is not None:
            lps.append(_pad_right(out.logprobs.float() * m, R))
        if with_values:
            vals.append(_pad_right(out.values.float() * m, R))
        if ref is not None:
            refs.append(_pad_right(ref.float() * m, R))
    return RolloutForward(torch.cat(lps) if need_policy else None, torch.cat(refs) if need_reference else None,
                          torch.cat(vals) if with_values else None)


def compute_advantages(fwd: RolloutForward, scores: torch.Tensor, response_mask: torch.Tensor, *, kl_coef: float,
                       kl_estimator: str = "k1", gamma: float = 1.0, lam: float = 0.95, whiten_rewards: bool = False,
                       whiten_advantages: bool = True, group=None) -> Advantages:
    """KL-shaped token rewards, GAE, whitening (DESIGN.md semantics). All [B, R] fp32."""
    mask = response_mask.bool()
    if fwd.ref_logprobs is None:
        kl = torch.zeros_like(fwd.logprobs)
    else:
        kl = kl_penalty(fwd.logprobs, fwd.ref_logprobs, estimator=kl_estimator) * mask
    rewards = token_rewards(scores, kl, mask, kl_coef)
    non_score = -kl_coef * kl
    if whiten_rewards:
        rewards = masked_whiten(rewards, mask, shift_mean=False, group=group)
    adv, returns = gae(rewards, fwd.values, mask, gamma, lam)
    if whiten_advantages:
        adv = masked_whiten(adv, mask, shift_mean=True, group=group)
    return Advantages(rewards, kl, non_score, adv, returns)


def group_indices(prompt_indices: torch.Tensor, num_generations: int, run_seed: int, round_index: int):
    """Rows of a grouped rollout: each prompt repeated ``num_generations`` times contiguously.

    Returns (row prompt indices int64 [G * n], row seeds int64 [G * n]). Row g*n + j samples generation j
    of prompt g with the seed of the virtual global index (prompt index x n + j), so the samples of one
    group differ, and a (prompt, generation, round) gets the same sample whatever the rank count."""
    n = int(num_generations)
    rows = prompt_indices.to(torch.int64).repeat_interleave(n)
    gen = torch.arange(n, dtype=torch.int64).repeat(prompt_indices.numel())
    return rows, prompt_seeds(run_seed, rows * n + gen, round_index)


def group_reward_stats(scores: torch.Tensor, num_generations: int, group=None) -> dict[str, float]:
    """TRL GRPO's ``reward_std`` (mean over groups of the within-group std, unbiased) and
    ``frac_reward_zero_std`` (share of groups whose scores are all equal), over every rank."""
    grouped = scores.detach().float().reshape(-1, num_generations)
    std = grouped.std(dim=1, unbiased=True) if num_generations > 1 else torch.zeros(grouped.shape[0])
    zero = (grouped.max(dim=1).values - grouped.min(dim=1).values) == 0
    tot = all_reduce_sum(torch.stack([std.sum(), zero.float().sum(), torch.tensor(float(grouped.shape[0]))]))
    return {"reward_std": float(tot[0] / tot[2]), "frac_reward_zero_std": float(tot[1] / tot[2])}


def compute_group_advantages(fwd: RolloutForward, scores: torch.Tensor, response_mask: torch.Tensor, *,
                             estimator: str, num_generations: int, kl_coef: float, kl_estimator: str = "k1",
                             gamma: float = 1.0, scale_rewards: bool = True, group=None) -> Advantages:
    """Critic-free advantages [B, R] fp32 from the ``rlhf_fast.algos`` registry.

    grpo / rloo: one advantage per sequence from ``scores`` [B] (groups of ``num_generations``
    contiguous rows), broadcast over the row's valid response tokens; the KL is not in the reward
    (the trainer adds kl_coef x k3 to the loss), kl here is k3 of the rollout policy for the metrics.
    reinforce_pp: token rewards = score on the last valid token - kl_coef x kl (``kl_estimator``),
    discounted returns whitened over the global batch (``group``).
    fwd.logprobs may be None for grpo/rloo (on-policy update): kl is then zeros here and the trainer
    reports the KL measured by the update's own forward."""
    mask = response_mask.bool()
    fn = get_advantage_estimator(estimator)
    token_level = estimator == "reinforce_pp"
    if fwd.ref_logprobs is not None and fwd.logprobs is not None:
        kl = kl_penalty(fwd.logprobs, fwd.ref_logprobs, estimator=kl_estimator if token_level else "k3") * mask
    elif fwd.ref_logprobs is not None and token_level:
        raise ValueError("reinforce_pp with a reference needs fwd.logprobs for its KL-shaped token rewards")
    else:
        kl = torch.zeros(mask.shape, dtype=torch.float32, device=mask.device)
    if token_level:
        rewards = token_rewards(scores, kl, mask, kl_coef)
        adv = fn(rewards, mask, gamma=gamma, group=group)
    else:
        rewards = token_rewards(scores, torch.zeros_like(kl), mask, 0.0)
        kwargs = {"scale_by_std": bool(scale_rewards)} if estimator == "grpo" else {}
        per_seq = fn(scores, num_generations, **kwargs)
        adv = per_seq.unsqueeze(1) * mask
    return Advantages(rewards, kl, -kl_coef * kl, adv, None)


# =============================================================================== trainer state
@dataclass
class StepStats:
    """Per-micro-batch training statistics collected on device (no host sync until logging)."""

    approxkl: list
    clipfrac: list
    pg_loss: list
    vf_loss: list
    vf_clipfrac: list
    entropy: list
    ratio: list
    kl: list = None  # critic-free with a KL loss term: mean per-token k3 of the policy vs the reference

    @classmethod
    def empty(cls):
        return cls([], [], [], [], [], [], [], [])

    def means(self) -> dict[str, float]:
        def m(xs):
            return float(torch.stack(xs).mean()) if xs else float("nan")

        ratios = torch.stack(self.ratio) if self.ratio else torch.zeros(1)
        out = {
            "policy/approxkl_avg": m(self.approxkl), "policy/clipfrac_avg": m(self.clipfrac),
            "loss/policy_avg": m(self.pg_loss), "loss/value_avg": m(self.vf_loss),
            "val/clipfrac_avg": m(self.vf_clipfrac), "policy/entropy_avg": m(self.entropy),
            "val/ratio": m(self.ratio), "val/ratio_var": float(ratios.var()) if ratios.numel() > 1 else 0.0,
        }
        if self.pg_loss and not self.vf_loss:  # no critic: no value metrics rather than NaNs
            del out["loss/value_avg"], out["val/clipfrac_avg"]
        if self.kl:
            out["kl"] = m(self.kl)
        return out


class NonFiniteError(RuntimeError):
    """Raised when more than ``max_nonfinite_steps`` updates were skipped for non-finite values."""


# =============================================================================== the trainer
class PPOTrainer:
    """Drop-in for TRL 1.12's PPOTrainer on rlhf_fast's fused kernels and shared-weight layout.

    Args (TRL's, same order): args (PPOConfig), processing_class (tokenizer), model (causal LM or
    path; None -> args.sft_model_path), ref_model (frozen reference; None -> a copy, LoRA-disabled
    weights with peft_config, or none when kl_coef == 0), reward_model (sequence-classification
    model, path, or callable ``(prompts, completions) -> list[float]``; None -> args.reward_model_path),
    train_dataset (rows with ``input_ids`` or ``prompt``), value_model (becomes the separate critic,
    unless args.critic == "shared"), data_collator (used to collate prompt rows when given),
    eval_dataset (for generate_completions), optimizers ((optimizer, scheduler) or (None, None)),
    callbacks (transformers TrainerCallbacks), peft_config (LoRA; the reference is then the
    adapter-disabled policy).
    """

    def __init__(self, args: PPOConfig, processing_class, model=None, ref_model=None, reward_model=None,
                 train_dataset=None, value_model=None, data_collator=None, eval_dataset=None,
                 optimizers=(None, None), callbacks=None, peft_config=None):
        from transformers import set_seed

        if not isinstance(args, PPOConfig):
            raise TypeError(f"args must be a rlhf_fast PPOConfig, got {type(args).__name__}")
        if ref_model is not None and ref_model is model:
            raise ValueError("model and ref_model cannot be the same object: pass a copy, or None")
        self.args = args
        set_seed(args.seed)
        self.rank, self.world_size = self._dist_info()
        self.is_main = self.rank == 0
        # Whitening statistics and token counts are global: reduce over every rank.
        self.group = torch.distributed.group.WORLD if self.world_size > 1 else None
        self.device = torch.device("cpu") if args.use_cpu or not torch.cuda.is_available() else args.device
        if self.world_size > 1:
            self._limit_threads()

        if processing_class is None:
            raise ValueError("processing_class (the tokenizer) is required")
        self.tokenizer = ensure_pad_token(processing_class)
        self.pad_token_id = self.tokenizer.pad_token_id
        self.stop_token_id = self._resolve_stop_token()
        self.data_collator = data_collator
        self.train_dataset, self.eval_dataset = train_dataset, eval_dataset
        self.prompts = prompt_token_lists(train_dataset, self.tokenizer)

        # ---- models: policy-value layout
        model = args.sft_model_path if model is None else model
        reward_model = args.reward_model_path if reward_model is None else reward_model
        critic = args.critic
        self.log_messages: list[str] = []
        if not args.uses_critic:
            if value_model is not None:
                raise ValueError(
                    f"value_model given with advantage_estimator={args.advantage_estimator!r}: the critic-free "
                    "estimators build no value model; pass value_model=None (or use advantage_estimator='gae')")
            critic = "none"
            self._note(f"advantage_estimator={args.advantage_estimator!r}: no critic is built (critic='none'), "
                       f"{args.num_generations} responses per prompt")
        elif critic == "auto":
            critic = "separate" if value_model is not None else "shared"
        if critic == "shared" and value_model is not None:
            self._note("critic='shared': the value head sits on the policy backbone; the value_model passed "
                       "to PPOTrainer is not trained (set critic='separate' to train it as the critic)")
        elif critic == "shared":
            self._note("critic='shared': one backbone for policy and value (value head on the policy)")
        reference = args.reference
        if reference == "auto":
            reference = "lora" if peft_config is not None else ("none" if args.kl_coef == 0 and ref_model is None
                                                                   else "frozen")
        if peft_config is not None and reference != "lora":
            raise ValueError(f"peft_config given with reference={reference!r}: LoRA training uses reference='lora'")
        ref_dtype = self._reference_dtype(ref_model if ref_model is not None else model)
        self.model = PolicyValueModel(
            model, reference=reference, critic=critic,
            critic_model=self._load_classifier(value_model) if critic == "separate" else None,
            vf_coef=1.0,  # the trainer weights the value loss itself: loss = pg + vf_coef * vf (TRL)
            lora_config=peft_config, reference_dtype=ref_dtype, reference_offload=args.reference_offload,
            gradient_checkpointing=args.gradient_checkpointing, tokenizer=self.tokenizer,
            temperature=max(args.temperature, 1e-7),
        )
        if ref_model is not None and reference == "frozen":
            from rlhf_fast.models import FrozenReference, load_causal_lm

            self.model.reference = FrozenReference(load_causal_lm(ref_model), ref_dtype, args.reference_offload)
        self.model.to(self.device)
        self.reference_mode = reference
        self.critic_mode = critic
        if callable(reward_model) and not isinstance(reward_model, nn.Module):
            from rlhf_fast.models.reward import CallableReward

            self.reward = reward_model if isinstance(reward_model, CallableReward) \
                else CallableReward(reward_model, allow_nonfinite=True)
        else:
            self.reward = make_reward(self._load_classifier(reward_model))
        if isinstance(getattr(self.reward, "model", None), nn.Module):
            self.reward.model.to(self.device)
        if reference == "none" and args.kl_coef != 0:
            raise ValueError(f"reference='none' but kl_coef={args.kl_coef}: set kl_coef=0 or use a reference")

        # ---- batch sizes (TRL's definitions)
        self._compute_batch_sizes()
        self.sampler = PromptSampler(len(self.prompts), self.prompts_per_step, args.seed, self.rank, self.world_size)

        # ---- distributed wrapping (FSDP2 replaces parameters: before the optimizer sees them)
        self.optimizer, self.lr_scheduler = optimizers
        if self.optimizer is not None and self.world_size > 1 and args.distributed_strategy == "fsdp2":
            raise ValueError("with distributed_strategy='fsdp2' the optimizer must be built after sharding: "
                             "pass optimizers=(None, None) or (None, scheduler_factory)")
        self.ddp_model = self._wrap_distributed()

        # ---- optimizer, scheduler, KL control
        if self.optimizer is None:
            self.optimizer = self._create_optimizer()
        if self.lr_scheduler is None:
            self.lr_scheduler = self._create_scheduler()
        self.kl_ctl = KLController(args.kl_controller, args.kl_coef, args.kl_target, args.kl_horizon)
        self.score_moments = RunningMoments()

        # ---- callbacks, state, logging
        from transformers import TrainerControl
        from transformers.trainer_callback import CallbackHandler, DefaultFlowCallback

        self.state = self._new_state()
        self.control = TrainerControl()
        self.callback_handler = CallbackHandler([DefaultFlowCallback] + list(callbacks or []), self.model,
                                                self.tokenizer, self.optimizer, self.lr_scheduler)
        self.logger: MetricsLogger | None = None
        self.nonfinite_steps = 0
        # When the first update is one micro-batch of the whole batch, its forward doubles as the rollout
        # forward (see _first_update_reuses_rollout_forward); False always runs the separate no-grad pass.
        self.reuse_rollout_forward = True
        self._dropout_free = not any((isinstance(m, nn.Dropout) and m.p > 0)
                                     or float(getattr(m, "attention_dropout", 0.0) or 0.0) > 0
                                     for m in self.model.modules())
        self._completions_rows: list[dict] = []

    # ------------------------------------------------------------------ setup helpers
    @staticmethod
    def _dist_info() -> tuple[int, int]:
        if _dist_ready():
            return torch.distributed.get_rank(), torch.distributed.get_world_size()
        return 0, 1

    def _limit_threads(self) -> None:
        # One thread per rank when cores are few: oversubscription makes steps 10-20x slower.
        local = int(os.environ.get("LOCAL_WORLD_SIZE", self.world_size))
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // max(local, 1)))

    def _note(self, msg: str) -> None:
        self.log_messages.append(msg)
        if self.is_main:
            print(f"[rlhf_fast] {msg}", flush=True)

    def _resolve_stop_token(self) -> int | None:
        a = self.args
        if a.stop_token == "eos":
            if self.tokenizer.eos_token_id is None:
                raise ValueError("stop_token='eos' but the tokenizer has no eos_token_id")
            return int(self.tokenizer.eos_token_id)
        return a.stop_token_id

    def _reference_dtype(self, source) -> torch.dtype:
        choice = self.args.reference_dtype
        if choice == "auto":
            dt = getattr(source, "dtype", None)
            return dt if isinstance(dt, torch.dtype) and dt in (torch.float32, torch.bfloat16, torch.float16) \
                else torch.float32
        return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[choice]

    def _load_classifier(self, model_or_path):
        if model_or_path is None or isinstance(model_or_path, nn.Module):
            return model_or_path
        if isinstance(model_or_path, (str, os.PathLike)):
            from transformers import AutoModelForSequenceClassification

            if not os.path.isdir(model_or_path):
                raise FileNotFoundError(
                    f"reward/value model path {os.fspath(model_or_path)!r} is not a local directory (rlhf_fast "
                    "loads models from local directories or in-memory objects)")
            return AutoModelForSequenceClassification.from_pretrained(model_or_path, num_labels=1)
        return model_or_path

    def _compute_batch_sizes(self) -> None:
        a = self.args
        a.world_size = self.world_size
        a.local_batch_size = a.per_device_train_batch_size * a.gradient_accumulation_steps
        a.micro_batch_size = a.per_device_train_batch_size * a.world_size
        a.batch_size = a.local_batch_size * a.world_size
        if a.local_batch_size % a.num_mini_batches:
            raise ValueError(f"local batch size ({a.local_batch_size} = per_device_train_batch_size x "
                             f"gradient_accumulation_steps) must be a multiple of num_mini_batches ({a.num_mini_batches})")
        a.mini_batch_size = a.batch_size // a.num_mini_batches
        a.local_mini_batch_size = a.local_batch_size // a.num_mini_batches
        # Group estimators: batches count completions (TRL GRPO), so one epoch over the prompts is
        # len(prompts) x num_generations episodes. num_generations is 1 for GAE.
        if a.local_batch_size % a.num_generations:
            raise ValueError(f"local batch size ({a.local_batch_size} completions) must be a multiple of "
                             f"num_generations ({a.num_generations})")
        self.prompts_per_step = a.batch_size // a.num_generations
        if a.total_episodes is None:
            a.total_episodes = int(a.num_train_epochs * len(self.prompts) * a.num_generations)
        a.num_total_batches = math.ceil(a.total_episodes / a.batch_size)
        if a.max_steps and a.max_steps > 0:
            a.num_total_batches = min(a.num_total_batches, a.max_steps)
        self.sample_generations_freq = max(1, a.num_total_batches // a.num_sample_generations) \
            if a.num_sample_generations > 0 else 0

    def _create_optimizer(self) -> torch.optim.Optimizer:
        a = self.args
        params = [p for p in self.model.parameters() if p.requires_grad]
        decay = [p for p in params if p.dim() >= 2]
        no_decay = [p for p in params if p.dim() < 2]
        groups = [{"params": decay, "weight_decay": a.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
        # fused=True: one kernel for every tensor (CPU and CUDA) instead of a Python loop over parameters.
        fused = all(p.device.type in ("cpu", "cuda") and p.dtype in (torch.float32, torch.bfloat16, torch.float16)
                    for p in params) and not (self.world_size > 1 and a.distributed_strategy == "fsdp2")
        return torch.optim.AdamW(groups, lr=a.learning_rate, betas=(a.adam_beta1, a.adam_beta2), eps=a.adam_epsilon,
                                 fused=fused or None, foreach=None if fused else True)

    def _create_scheduler(self):
        from transformers import get_scheduler

        a = self.args
        steps = a.num_total_batches
        warmup = a.warmup_steps if a.warmup_steps >= 1 or a.warmup_steps == 0 else math.ceil(a.warmup_steps * steps)
        if not warmup and getattr(a, "warmup_ratio", None):
            warmup = math.ceil(a.warmup_ratio * steps)
        return get_scheduler(a.lr_scheduler_type, self.optimizer, num_warmup_steps=int(warmup),
                             num_training_steps=steps, scheduler_specific_kwargs=a.lr_scheduler_kwargs or {})

    def _wrap_distributed(self):
        """DDP or FSDP2 over the trainable model when a process group exists; under FSDP2 the frozen
        reference and reward model are sharded too (see rlhf_fast.trainer.distributed)."""
        if self.world_size == 1:
            return self.model
        from rlhf_fast.trainer.distributed import shard_frozen_models, wrap_model

        wrapped = wrap_model(self.model, self.args, self.device)
        if self.args.distributed_strategy == "fsdp2":
            shard_frozen_models(self)
        return wrapped

    def _new_state(self):
        from transformers import TrainerState

        state = TrainerState()
        state.episode = 0  # TRL's OnlineTrainerState field
        state.is_local_process_zero = self.is_main
        state.is_world_process_zero = self.is_main
        a = self.args
        state.max_steps = a.num_total_batches
        state.num_train_epochs = a.total_episodes / (len(self.prompts) * a.num_generations)
        state.logging_steps = math.ceil(a.logging_steps * state.max_steps) if a.logging_steps < 1 else int(a.logging_steps)
        state.save_steps = math.ceil(a.save_steps * state.max_steps) if a.save_steps < 1 else int(a.save_steps)
        state.eval_steps = state.logging_steps
        return state

    # ------------------------------------------------------------------ public API
    def get_train_dataloader(self):
        return self.sampler

    def train(self, resume_from_checkpoint: bool | str | None = None) -> None:
        """Run ``args.num_total_batches`` PPO steps (resuming from a checkpoint when asked)."""
        from tqdm.auto import tqdm

        a = self.args
        if resume_from_checkpoint:
            from rlhf_fast.trainer.checkpoint import resume_trainer

            resume_trainer(self, resume_from_checkpoint)
        self.logger = MetricsLogger(a.output_dir if self.is_main else None, a.report_to, a.run_name,
                                    enabled=self.is_main, config=a.to_dict() if hasattr(a, "to_dict") else None)
        self.control = self.callback_handler.on_train_begin(a, self.state, self.control)
        self._start_time = time.time()
        self._episodes_at_start = self.state.episode
        bar = tqdm(total=a.num_total_batches, initial=self.state.global_step, desc="PPO",
                   disable=a.disable_tqdm or not self.is_main, dynamic_ncols=True)
        self._stop_signal = None
        restore = self._install_signal_handlers()
        try:
            while self.state.global_step < a.num_total_batches:
                if self._stop_requested():
                    self._stop_gracefully()
                    break
                self.control = self.callback_handler.on_step_begin(a, self.state, self.control)
                metrics = self.step()
                bar.update(1)
                if metrics is not None:
                    bar.set_postfix(score=f"{metrics['objective/scores']:.3f}", kl=f"{metrics['objective/kl']:.3f}")
                self.control = self.callback_handler.on_step_end(a, self.state, self.control)
                if self.control.should_save:
                    self._save_checkpoint()
                if (self.sample_generations_freq and self.eval_dataset is not None
                        and (self.state.global_step - 1) % self.sample_generations_freq == 0):
                    self.generate_completions(sampling=True)
                if self.control.should_training_stop:
                    break
            else:
                if self._stop_requested():
                    self._stop_gracefully()
        finally:
            restore()
            bar.close()
        self.control = self.callback_handler.on_train_end(a, self.state, self.control)
        if self.control.should_save:
            self._save_checkpoint()
        self.logger.close()

    # ------------------------------------------------------------------ SIGTERM / Ctrl-C
    def _install_signal_handlers(self):
        """SIGTERM / SIGINT during a step: finish the step, save it, stop. A second SIGINT interrupts."""
        import signal
        import threading

        if threading.current_thread() is not threading.main_thread():
            return lambda: None
        previous = {}

        def handler(signum, frame):
            if self._stop_signal is not None and signum == signal.SIGINT:
                raise KeyboardInterrupt
            self._stop_signal = signal.Signals(signum).name
            if self.is_main:
                print(f"[rlhf_fast] {self._stop_signal} received: finishing the current step, then saving and "
                      "stopping (Ctrl-C again to abort without saving)", flush=True)

        for sig in (signal.SIGTERM, signal.SIGINT):
            previous[sig] = signal.signal(sig, handler)

        def restore():
            for sig, h in previous.items():
                signal.signal(sig, h)

        return restore

    def _stop_requested(self) -> bool:
        flag = torch.tensor([1.0 if self._stop_signal else 0.0])
        return bool(all_reduce_sum(flag)[0] > 0)  # every rank stops at the same step

    def _stop_gracefully(self) -> None:
        """Save the last completed step (unless saving is off or nothing was completed) and end training."""
        done = self.state.global_step
        saved = False
        if done > 0 and str(self.args.save_strategy) not in ("no", "SaveStrategy.NO"):
            from rlhf_fast.trainer.checkpoint import list_checkpoints

            existing = [p.name for p in list_checkpoints(self.args.output_dir)]
            if f"checkpoint-{done}" not in existing:
                self._save_checkpoint()
            saved = True
        self.control.should_training_stop = True
        self.control.should_save = False
        if self.is_main:
            what = f"checkpoint-{done} saved" if saved else "nothing saved"
            print(f"[rlhf_fast] stopped after step {done} ({self._stop_signal or 'signal'}): {what}", flush=True)

    def _save_checkpoint(self) -> None:
        from rlhf_fast.trainer.checkpoint import save_checkpoint

        save_checkpoint(self)
        self.control = self.callback_handler.on_save(self.args, self.state, self.control)

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """Write the policy (HF format, safetensors) + value head + tokenizer to ``output_dir``."""
        out = output_dir or self.args.output_dir
        if self.is_main:
            self.model.save_pretrained(out)

    def log(self, metrics: dict) -> None:
        """Append to ``state.log_history`` (TRL's Trainer.log), fire ``on_log`` and write to the sinks."""
        entry = {**metrics, "step": self.state.global_step}
        self.state.log_history.append(entry)
        self.control = self.callback_handler.on_log(self.args, self.state, self.control, logs=metrics)
        if self.logger is not None:
            self.logger.log(metrics, self.state.global_step)

    # ------------------------------------------------------------------ one PPO step
    def _prompt_batch(self, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.data_collator is not None and self.train_dataset is not None:
            rows = [self.train_dataset[int(i)] for i in indices]
            batch = self.data_collator([{"input_ids": r["input_ids"]} if "input_ids" in r else r for r in rows])
            seqs = [ids[m.bool()].tolist() for ids, m in zip(batch["input_ids"], batch["attention_mask"])]
        else:
            seqs = [self.prompts[int(i)] for i in indices]
        max_ctx = getattr(self.model.policy.config, "max_position_embeddings", None)
        longest = max(len(s) for s in seqs)
        if max_ctx is not None and longest + self.args.response_length > max_ctx:
            raise ValueError(f"a prompt of {longest} tokens + response_length {self.args.response_length} exceeds "
                             f"the model's context of {max_ctx} tokens: truncate prompts or lower response_length")
        return left_pad(seqs, self.pad_token_id, self.device)

    def _full_params(self):
        """Generation calls the HF model directly (not the wrapped forward): under FSDP2 gather the
        root's sharded parameters for it; the decoder layers gather their own in their hooks."""
        from rlhf_fast.trainer.distributed import unsharded

        return unsharded(self.model) if self.world_size > 1 else contextlib.nullcontext()

    def _autocast(self):
        return autocast_ctx(self.device, bool(self.args.bf16), bool(self.args.fp16))

    def step(self) -> dict | None:
        """One PPO step: rollout, score, advantages, updates. Returns the metrics (None if skipped)."""
        a = self.args
        t0 = time.perf_counter()
        indices, epoch = self.sampler.next_batch()
        grouped = not a.uses_critic
        if grouped:  # rows [g*n, (g+1)*n) = n samples of prompt g, each with its own seed
            indices, seeds = group_indices(indices, a.num_generations, a.seed, epoch)
        else:
            seeds = prompt_seeds(a.seed, indices, epoch)
        prompt_ids, prompt_mask = self._prompt_batch(indices)
        self.state.episode += a.batch_size
        self.model.eval()
        stop_ids = [self.stop_token_id] if self.stop_token_id is not None else []
        fsdp = self.world_size > 1 and a.distributed_strategy == "fsdp2"
        with self._full_params(), self._autocast():
            rollout = generate_rollout(self.model, prompt_ids, prompt_mask, response_length=a.response_length,
                                       temperature=a.temperature, pad_token_id=self.pad_token_id,
                                       stop_token_ids=stop_ids, seeds=seeds,
                                       chunk_size=a.local_rollout_forward_batch_size, inference_mode=not fsdp)
        t_gen = time.perf_counter()
        with torch.no_grad():
            scores = score_rollout(self.reward, self.tokenizer, rollout, prompt_mask).to(self.device)
            contains_eos = (rollout.responses == self.tokenizer.eos_token_id).any(1) \
                if self.tokenizer.eos_token_id is not None else torch.zeros_like(scores, dtype=torch.bool)
            if a.missing_eos_penalty is not None:
                scores = scores - a.missing_eos_penalty * (~contains_eos).float()
            raw_scores = scores
            if a.reward_norm:
                self.score_moments.update(scores, self.group)
                scores = (scores - self.score_moments.mean) / (self.score_moments.std + 1e-8)
            if a.reward_clip is not None:
                scores = scores.clamp(-a.reward_clip, a.reward_clip)
        t_score = time.perf_counter()
        finite = bool(all_reduce_sum(torch.isfinite(scores).all().float().reshape(1) - 1.0)[0] == 0)
        if not finite:
            return self._skip_step("non-finite reward", t0)

        need_reference = self.reference_mode != "none"
        first_out = None
        if self._first_update_reuses_rollout_forward(rollout):
            # One forward serves twice: its detached outputs are the old log-probs and values, and its graph
            # is the first update's forward (same weights, no dropout, one micro-batch = the whole batch).
            # The reference runs first, so its transient buffers never overlap the policy's graph.
            ref_fwd = rollout_forward(self.model, rollout, prompt_mask, temperature=max(a.temperature, 1e-7),
                                      need_reference=need_reference, chunk_size=a.local_rollout_forward_batch_size,
                                      autocast=self._autocast, need_policy=False)
            fwd, first_out = self._forward_with_grad(rollout, prompt_mask, ref_fwd.ref_logprobs)
        else:
            fwd = rollout_forward(self.model, rollout, prompt_mask, temperature=max(a.temperature, 1e-7),
                                  need_reference=need_reference, chunk_size=a.local_rollout_forward_batch_size,
                                  autocast=self._autocast, need_policy=not self._on_policy_update())
        if grouped:
            adv = compute_group_advantages(fwd, scores, rollout.response_mask, estimator=a.advantage_estimator,
                                           num_generations=a.num_generations, kl_coef=self.kl_ctl.value,
                                           kl_estimator=a.kl_estimator, gamma=a.gamma,
                                           scale_rewards=a.scale_rewards, group=self.group)
        else:
            adv = compute_advantages(fwd, scores, rollout.response_mask, kl_coef=self.kl_ctl.value,
                                     kl_estimator=a.kl_estimator, gamma=a.gamma, lam=a.lam,
                                     whiten_rewards=a.whiten_rewards, whiten_advantages=a.whiten_advantages,
                                     group=self.group)
        t_fwd = time.perf_counter()
        stats, skipped, first_epoch = self._update(rollout, prompt_mask, fwd, adv, first_out)
        t_upd = time.perf_counter()

        mask = rollout.response_mask
        # Entropy and KL of the sampling policy: from the rollout forward, or (on-policy critic-free
        # update, no rollout forward) from the first epoch's forwards, which ran on the same weights.
        neg_logprob_sum = (-fwd.logprobs * mask).sum() if fwd.logprobs is not None else first_epoch["neg_logprob_sum"]
        kl_sum = adv.kl.sum() if fwd.logprobs is not None else first_epoch["kl_sum"]
        mean_kl = float(all_reduce_sum(kl_sum.reshape(1))[0]) / a.batch_size
        non_score_sum = -self.kl_ctl.value * kl_sum
        self.kl_ctl.update(mean_kl, a.batch_size)
        self.state.global_step += 1
        self.state.epoch = self.state.episode / (len(self.prompts) * a.num_generations)
        n_tokens = float(all_reduce_sum(mask.sum().float().reshape(1))[0])
        elapsed = time.time() - self._start_time
        metrics = {
            "eps": int((self.state.episode - self._episodes_at_start) / max(elapsed, 1e-9)),
            "objective/kl": mean_kl,
            "objective/entropy": float(all_reduce_sum(neg_logprob_sum.reshape(1))[0]) / a.batch_size,
            "objective/non_score_reward": float(all_reduce_sum(non_score_sum.reshape(1))[0]) / a.batch_size,
            "objective/scores": float(all_reduce_sum(raw_scores.sum().reshape(1))[0]) / a.batch_size,
        }
        metrics["objective/rlhf_reward"] = metrics["objective/non_score_reward"] + metrics["objective/scores"]
        if grouped:
            metrics.update(group_reward_stats(scores, a.num_generations, self.group))
        metrics.update(stats.means())
        metrics["val/num_eos_tokens"] = int(all_reduce_sum(
            (rollout.responses == self.tokenizer.eos_token_id).sum().reshape(1))[0]) \
            if self.tokenizer.eos_token_id is not None else 0
        metrics["lr"] = self.lr_scheduler.get_last_lr()[0]
        metrics["episode"] = self.state.episode
        metrics["objective/kl_coef"] = self.kl_ctl.value
        metrics["time/generate"] = t_gen - t0
        metrics["time/score"] = t_score - t_gen
        metrics["time/forward"] = t_fwd - t_score
        metrics["time/update"] = t_upd - t_fwd
        metrics["time/step"] = t_upd - t0
        metrics["tokens_per_second"] = n_tokens / max(t_upd - t0, 1e-9)
        metrics["skipped_updates"] = skipped
        self.lr_scheduler.step()
        if self._should_log():
            self.log(metrics)
        self._last_rollout = rollout
        return metrics

    def _should_log(self) -> bool:
        s = self.state
        return (s.global_step % max(s.logging_steps, 1) == 0 or s.global_step == 1 or s.global_step >= s.max_steps)

    def _skip_step(self, reason: str, t0: float) -> None:
        self.nonfinite_steps += 1
        self.state.global_step += 1
        self.lr_scheduler.step()
        msg = (f"step {self.state.global_step}: {reason}; update skipped "
               f"({self.nonfinite_steps}/{self.args.max_nonfinite_steps} allowed)")
        warnings.warn(msg, stacklevel=2)
        self.log({"nonfinite/skipped_steps": self.nonfinite_steps, "nonfinite/reason": reason,
                  "time/step": time.perf_counter() - t0})
        if self.nonfinite_steps >= self.args.max_nonfinite_steps:
            raise NonFiniteError(f"stopping: {self.nonfinite_steps} steps had non-finite values (last: {reason}); "
                                 "no checkpoint is written from them")
        return None

    def _on_policy_update(self) -> bool:
        """Critic-free, one epoch and one minibatch (TRL GRPO's default): the only update sees the weights
        that sampled, so the old log-probs equal its own (detached) ones and the rollout's policy forward
        is skipped, as TRL does. reinforce_pp with a KL penalty still needs them before the update."""
        a = self.args
        if a.uses_critic or a.num_ppo_epochs != 1 or a.num_mini_batches != 1:
            return False
        return not (a.advantage_estimator == "reinforce_pp" and self.reference_mode != "none")

    def _first_update_reuses_rollout_forward(self, rollout: Rollout) -> bool:
        """PPO with a critic whose first update is one micro-batch holding the whole rollout batch
        (num_mini_batches = 1, no gradient accumulation, nothing chunked) on weights without dropout:
        that update's forward computes exactly the rollout forward's log-probs and values."""
        a = self.args
        if not self.reuse_rollout_forward or not a.uses_critic or a.num_mini_batches != 1:
            return False
        B = rollout.responses.shape[0]
        if a.per_device_train_batch_size < B or a.local_rollout_forward_batch_size < B:
            return False
        return self._dropout_free  # the model's dropout is fixed at construction: checked once there

    def _forward_with_grad(self, rollout: Rollout, prompt_mask: torch.Tensor, ref_logprobs):
        """The first update's forward over the whole batch (rows in order), with its graph kept.
        Returns (RolloutForward of detached outputs padded to R, (ModelOutput, cols))."""
        a = self.args
        self.model.train()
        ids, attn, start, cols = trim_batch(rollout.query_responses, prompt_mask, rollout.response_mask)
        m = rollout.response_mask[:, :cols]
        R = rollout.responses.shape[1]
        with self._autocast():
            out = self.ddp_model(ids, attn, response_start=start, return_entropy=True, return_values=True,
                                 temperature=max(a.temperature, 1e-7))
        fwd = RolloutForward(_pad_right(out.logprobs.detach().float() * m, R), ref_logprobs,
                             _pad_right(out.values.detach().float() * m, R))
        return fwd, (out, cols)

    def _update(self, rollout: Rollout, prompt_mask: torch.Tensor, fwd: RolloutForward, adv: Advantages,
                first_out=None):
        """num_ppo_epochs x minibatches x micro-batches of clipped updates.

        Returns (StepStats, skipped, sums over the valid tokens of the first epoch's forwards:
        {"neg_logprob_sum": -logprob, "kl_sum": k3 to the reference (0 without a KL loss term)})."""
        a = self.args
        self.model.train()
        stats = StepStats.empty()
        zero = torch.zeros((), device=rollout.response_mask.device)
        first_epoch = {"neg_logprob_sum": zero, "kl_sum": zero}
        mask = rollout.response_mask
        B = mask.shape[0]
        g = torch.Generator().manual_seed(a.seed * 7919 + self.state.global_step)
        clip_high = a.cliprange_high if a.cliprange_high is not None else a.cliprange
        need_entropy = True
        skipped = 0
        for _epoch in range(a.num_ppo_epochs):
            perm = torch.randperm(B, generator=g)
            if _epoch == 0 and first_out is not None:
                perm = torch.arange(B)  # the kept forward holds the rows in order (one micro-batch: same loss)
            for mb_start in range(0, B, a.local_mini_batch_size):
                mb = perm[mb_start:mb_start + a.local_mini_batch_size]
                num_tokens = all_reduce_sum(mask[mb].sum().float().reshape(1))
                num_seqs = all_reduce_sum(torch.tensor([float(len(mb))], device=mask.device))
                micro = [mb[i:i + a.per_device_train_batch_size] for i in range(0, len(mb), a.per_device_train_batch_size)]
                for k, idx in enumerate(micro):
                    sync = k == len(micro) - 1
                    ctx = self.ddp_model.no_sync() if (not sync and hasattr(self.ddp_model, "no_sync")) \
                        else contextlib.nullcontext()
                    with ctx:
                        reuse = first_out if (_epoch == 0 and mb_start == 0 and k == 0) else None
                        loss, st = self._micro_step(rollout, prompt_mask, fwd, adv, idx, num_tokens, num_seqs,
                                                    clip_high, need_entropy, reuse)
                    sums = {k: st.pop(k) for k in ("neg_logprob_sum", "kl_sum") if k in st}
                    if _epoch == 0:
                        for k, v in sums.items():
                            first_epoch[k] = first_epoch[k] + v
                    for key, v in st.items():
                        getattr(stats, key).append(v)
                grad_norm = self._clip_grads()
                if not bool(torch.isfinite(grad_norm)):
                    skipped += 1
                    self.optimizer.zero_grad(set_to_none=True)
                    self.nonfinite_steps += 1
                    warnings.warn(f"non-finite loss or gradient norm ({float(grad_norm)}): optimizer step skipped",
                                  stacklevel=2)
                    if self.nonfinite_steps >= a.max_nonfinite_steps:
                        raise NonFiniteError(f"stopping: {self.nonfinite_steps} updates had non-finite gradients")
                    continue
                self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
        return stats, skipped, first_epoch

    def _clip_grads(self) -> torch.Tensor:
        params = [p for p in self.model.parameters() if p.requires_grad and p.grad is not None]
        if not params:
            return torch.zeros(())
        max_norm = self.args.max_grad_norm if self.args.max_grad_norm and self.args.max_grad_norm > 0 else float("inf")
        return torch.nn.utils.clip_grad_norm_(params, max_norm)

    def _micro_step(self, rollout, prompt_mask, fwd, adv, idx, num_tokens, num_seqs, clip_high, need_entropy,
                    reuse=None):
        """reuse: (ModelOutput, cols) of a forward already run with grad on these rows (see step())."""
        a = self.args
        critic = a.uses_critic
        if reuse is not None:
            out, cols = reuse
        else:
            ids, attn, start, cols = trim_batch(rollout.query_responses[idx], prompt_mask[idx],
                                                rollout.response_mask[idx])
            with self._autocast():
                out = self.ddp_model(ids, attn, response_start=start, return_entropy=need_entropy,
                                     return_values=critic, temperature=max(a.temperature, 1e-7))
        m = rollout.response_mask[idx][:, :cols]
        new_lp = out.logprobs.float()
        # On-policy critic-free update (no rollout policy forward): old = new, detached (ratio 1, as TRL).
        old_lp = fwd.logprobs[idx][:, :cols] if fwd.logprobs is not None else new_lp.detach()
        pg_loss, pst = ppo_policy_loss(new_lp, old_lp, adv.advantages[idx][:, :cols], m,
                                       clip_low=a.cliprange, clip_high=clip_high, dual_clip=a.dual_clip,
                                       agg=a.loss_agg_mode, num_tokens=num_tokens, num_seqs=num_seqs,
                                       norm_length=rollout.responses.shape[1])
        extra = {}
        if critic:
            values = out.values.float()
            vf_loss, vf_clipfrac = value_loss(values, fwd.values[idx][:, :cols], adv.returns[idx][:, :cols], m,
                                              clip=a.cliprange_value, agg=a.loss_agg_mode, num_tokens=num_tokens,
                                              num_seqs=num_seqs)
            # DDP averages gradients over ranks; counts are global sums, so scale by world size back up.
            loss = (pg_loss + a.vf_coef * vf_loss) * self.world_size
        else:
            loss = pg_loss * self.world_size
            if a.advantage_estimator != "reinforce_pp" and fwd.ref_logprobs is not None and self.kl_ctl.value > 0:
                # GRPO's KL term: beta x k3(policy || reference) per token, aggregated like the policy loss.
                kl_tok = kl_penalty(new_lp, fwd.ref_logprobs[idx][:, :cols], estimator="k3")
                kl_loss = aggregate_loss(kl_tok, m, a.loss_agg_mode, num_tokens=num_tokens, num_seqs=num_seqs,
                                         norm_length=rollout.responses.shape[1])
                loss = loss + self.kl_ctl.value * kl_loss * self.world_size
                with torch.no_grad():
                    extra["kl_sum"] = (kl_tok * m).sum()
                    extra["kl"] = extra["kl_sum"] / m.sum().clamp_min(1)
        ent_mean = None
        if out.entropy is not None:
            ent_tok = out.entropy.float()
            ent_mean = (ent_tok * m).sum() / m.sum().clamp_min(1)
            if a.entropy_coef:
                loss = loss - a.entropy_coef * (ent_tok * m).sum() / num_tokens.clamp_min(1) * self.world_size
        loss.backward()
        with torch.no_grad():
            n_local = m.sum().clamp_min(1)
            scale = num_tokens.clamp_min(1) / n_local  # report the micro-batch's own token mean
        st = {
            "approxkl": pst.approx_kl, "clipfrac": pst.clipfrac, "pg_loss": (pg_loss.detach() * scale).reshape(()),
            "entropy": ent_mean.detach() if ent_mean is not None else torch.zeros(()), "ratio": pst.ratio_mean,
            "neg_logprob_sum": (-new_lp.detach() * m).sum(), **extra,
        }
        if critic:
            st["vf_loss"] = (vf_loss.detach() * scale).reshape(())
            st["vf_clipfrac"] = vf_clipfrac.detach().reshape(())
        return loss.detach(), st

    # ------------------------------------------------------------------ sampling for humans
    @torch.no_grad()
    def generate_completions(self, sampling: bool = False) -> list[dict]:
        """Greedy completions for eval_dataset prompts with their scores; prints a table, appends to
        output_dir/completions.jsonl. ``sampling=True`` does only the first batch (TRL's meaning)."""
        import json

        if self.eval_dataset is None:
            return []
        a = self.args
        prompts = prompt_token_lists(self.eval_dataset, self.tokenizer)
        bs = a.per_device_eval_batch_size
        rows = []
        self.model.eval()
        stop_ids = [self.stop_token_id] if self.stop_token_id is not None else []
        for s in range(0, len(prompts), bs):
            ids, pmask = left_pad(prompts[s:s + bs], self.pad_token_id, self.device)
            with self._autocast():
                ro = generate_rollout(self.model, ids, pmask, response_length=a.response_length, temperature=0.0,
                                      pad_token_id=self.pad_token_id, stop_token_ids=stop_ids, chunk_size=bs)
            scores = score_rollout(self.reward, self.tokenizer, ro, pmask)
            q = self.tokenizer.batch_decode([r[m.bool()] for r, m in zip(ids, pmask)], skip_special_tokens=True)
            c = self.tokenizer.batch_decode([r[m] for r, m in zip(ro.responses, ro.response_mask)],
                                            skip_special_tokens=True)
            rows += [{"step": self.state.global_step, "query": qq, "model response": cc, "score": float(sc)}
                     for qq, cc, sc in zip(q, c, scores)]
            if sampling:
                break
        if self.is_main:
            for r in rows[:5]:
                print(f"[completion] {r['query']!r} -> {r['model response']!r} (score {r['score']:.3f})")
            os.makedirs(a.output_dir, exist_ok=True)
            with open(os.path.join(a.output_dir, "completions.jsonl"), "a", encoding="utf-8") as f:
                for r in rows:
                    f.write(json.dumps(r) + "\n")
        self._completions_rows += rows
        return rows


def train_ppo(args: PPOConfig, **kwargs: Callable) -> PPOTrainer:
    """Build a PPOTrainer from keyword arguments, train it and save the final model to output_dir."""
    trainer = PPOTrainer(args, **kwargs)
    trainer.train()
    trainer.save_model(args.output_dir)
    return trainer
