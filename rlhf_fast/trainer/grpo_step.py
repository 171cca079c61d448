"""The GRPO step's pieces as plain functions, with TRL 1.16 GRPOTrainer's semantics (GRPOTrainer calls them).

- prompts: ``prompt_token_ids`` (plain text or chat messages through the tokenizer's chat template,
  optionally left-truncated), ``decode_completions`` (strings, or one assistant message for chat prompts);
- rewards: ``call_reward_funcs`` (callables get prompts, completions, completion_ids, every dataset column,
  trainer_state, log_extra, log_metric; sequence-classification models score prompt + completion text; a
  None score becomes NaN), ``overlong_penalty`` (DAPO), ``group_advantages`` (TRL's formula: weighted nansum,
  group / batch / no scaling with std + 1e-4, unscorable rows 0), ``varying_groups`` (DAPO dynamic sampling);
- metrics: ``reward_metrics``, ``completion_metrics`` under TRL's names and formulas;
- the loss: ``LossSpec`` maps TRL's loss_type onto ``rlhf_fast.ops.policy_losses.policy_loss`` (which family
  loss, which aggregation, which global count) and ``micro_loss`` runs one micro-batch: forward (fused log-probs
  and entropies), the family loss, TRL's KL term beta x k3 (x the importance ratio, use_bias_correction_kl),
  the entropy mask and bonus, and TRL's per-micro-batch statistics.

Shapes as ``ppo_step``: b rows of a micro-batch, per-token tensors fp32 [b, cols] over the response columns.
"""
from __future__ import annotations

import asyncio
import contextlib
import inspect
import math
from typing import Any, NamedTuple

import torch

from rlhf_fast.algos import get_kl_estimator
from rlhf_fast.ops.policy_losses import policy_loss
from rlhf_fast.ops.ppo_loss import aggregate_loss
from rlhf_fast.trainer.distributed import all_reduce_sum, dist_ready
from rlhf_fast.trainer.ppo_step import trim_batch

__all__ = ["is_conversational", "prompt_token_ids", "decode_completions", "reward_func_name", "call_reward_funcs",
           "overlong_penalty", "nanstd", "group_advantages", "varying_groups", "reward_metrics",
           "completion_metrics", "LossSpec", "loss_spec", "micro_loss", "grpo_loss"]


# =============================================================================== prompts and completions
def is_conversational(prompt) -> bool:
    """A prompt in chat format: a list of {"role", "content"} messages (TRL's is_conversational)."""
    return isinstance(prompt, list) and len(prompt) > 0 and isinstance(prompt[0], dict) and "role" in prompt[0]


def prompt_token_ids(prompts: list, tokenizer, chat_template_kwargs: dict | None = None,
                     max_prompt_length: int | None = None) -> list[list[int]]:
    """Token ids of each prompt as TRL 1.16 builds them: chat prompts through ``apply_chat_template`` with
    the generation prompt added, text prompts through the tokenizer (its special tokens included).
    ``max_prompt_length`` keeps the last N tokens (TRL < 1.0's left truncation)."""
    if is_conversational(prompts[0]):
        out = tokenizer.apply_chat_template(conversation=prompts, add_generation_prompt=True, tokenize=True,
                                            return_dict=True, **(chat_template_kwargs or {}))["input_ids"]
    else:
        out = tokenizer(text=list(prompts))["input_ids"]
    out = [list(map(int, ids)) for ids in out]
    if max_prompt_length is not None:
        out = [ids[-max_prompt_length:] for ids in out]
    for i, ids in enumerate(out):
        if not ids:
            raise ValueError(f"prompt {i} tokenizes to no tokens: {prompts[i]!r}")
    return out


def decode_completions(tokenizer, completion_ids: list[list[int]], conversational: bool) -> list:
    """Completion text (special tokens skipped), one assistant message per completion for chat prompts."""
    texts = tokenizer.batch_decode(completion_ids, skip_special_tokens=True)
    return [[{"role": "assistant", "content": t}] for t in texts] if conversational else texts


# =============================================================================== rewards
def reward_func_name(func) -> str:
    """TRL's name for a reward: the model's name_or_path tail, the function's __name__, else its class name."""
    if isinstance(func, torch.nn.Module):
        return str(getattr(func.config, "_name_or_path", "") or type(func).__name__).split("/")[-1]
    import functools

    while isinstance(func, functools.partial):
        func = func.func
    return getattr(func, "__name__", type(func).__name__)


def _is_async(func) -> bool:
    import functools

    while isinstance(func, functools.partial):
        func = func.func
    return inspect.iscoroutinefunction(func) or inspect.iscoroutinefunction(type(func).__call__)


def _model_scores(model, processing_class, prompts, completions, chat_template_kwargs) -> torch.Tensor:
    """A sequence-classification reward model's logits[:, 0] on prompt + completion (TRL: the chat template
    applied to the whole conversation, right padding, no added special tokens)."""
    if is_conversational(prompts[0]):
        texts = [processing_class.apply_chat_template(p + c, tokenize=False, **(chat_template_kwargs or {}))
                 for p, c in zip(prompts, completions)]
    else:
        texts = [p + c for p, c in zip(prompts, completions)]
    inputs = processing_class(text=texts, return_tensors="pt", padding=True, padding_side="right",
                              add_special_tokens=False)
    device = next(model.parameters()).device
    with torch.inference_mode():
        return model(**{k: v.to(device) for k, v in inputs.items()}).logits[:, 0].float().cpu()


def _as_scores(out, name: str, n: int) -> torch.Tensor:
    out = out.detach().cpu().flatten().tolist() if isinstance(out, torch.Tensor) else list(out)
    if len(out) != n:
        raise ValueError(f"The reward function '{name}' returned {len(out)} rewards, but {n} were expected (one per "
                         "prompt-completion pair). Make sure the reward function returns exactly one reward per "
                         "completion.")
    return torch.tensor([math.nan if r is None else float(r) for r in out], dtype=torch.float32)


def call_reward_funcs(reward_funcs: list, processing_classes: list, prompts: list, completions: list,
                      completion_ids: list[list[int]], rows: list[dict], *, trainer_state=None, log_extra=None,
                      log_metric=None, chat_template_kwargs: dict | None = None) -> torch.Tensor:
    """fp32 [B, F] rewards of this rank's completions, one column per reward function, NaN where a function
    returned None. ``rows``: the dataset row of each completion; its columns other than prompt / completion /
    completion_ids reach the callables as keyword arguments (as lists), with trainer_state, log_extra and
    log_metric. Async callables run concurrently."""
    keys = [k for k in (rows[0] if rows else {}) if k not in ("prompt", "completion", "completion_ids")]
    kwargs: dict[str, Any] = {k: [r[k] for r in rows] for k in keys}
    kwargs.update(trainer_state=trainer_state, log_extra=log_extra, log_metric=log_metric)
    out = torch.zeros(len(prompts), len(reward_funcs), dtype=torch.float32)
    pending = []
    for i, (func, proc) in enumerate(zip(reward_funcs, processing_classes)):
        if isinstance(func, torch.nn.Module):
            out[:, i] = _model_scores(func, proc, prompts, completions, chat_template_kwargs)
        elif _is_async(func):
            pending.append((i, func))
        else:
            res = func(prompts=prompts, completions=completions, completion_ids=completion_ids, **kwargs)
            out[:, i] = _as_scores(res, reward_func_name(func), len(prompts))
    if pending:
        async def run_all():
            return await asyncio.gather(*[f(prompts=prompts, completions=completions, completion_ids=completion_ids,
                                            **kwargs) for _, f in pending])

        for (i, func), res in zip(pending, asyncio.run(run_all())):
            out[:, i] = _as_scores(res, reward_func_name(func), len(prompts))
    return out


def overlong_penalty(lengths: torch.Tensor, max_length: int, buffer_length: int, factor: float = 1.0) -> torch.Tensor:
    """DAPO's soft overlong punishment, fp32 [B]: 0 up to max_length - buffer_length tokens, then falling
    linearly to -factor at max_length (and -factor beyond). lengths: completion tokens [B]."""
    expected = max_length - buffer_length
    over = (lengths.float() - expected).clamp_min(0.0)
    return -factor * (over / buffer_length).clamp_max(1.0)


def nanstd(x: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Bessel-corrected std ignoring NaNs (TRL's nanstd); NaN with fewer than 2 values."""
    mean = torch.nanmean(x, dim=dim, keepdim=True)
    var = torch.nanmean((x - mean) ** 2, dim=dim, keepdim=True)
    count = (~torch.isnan(x)).sum(dim=dim, keepdim=True)
    var = var * torch.where(count > 1, count / (count - 1), torch.full_like(var, math.nan))
    std = var.sqrt()
    return std.squeeze() if dim is None else std.squeeze(dim)


def group_advantages(rewards_per_func: torch.Tensor, weights: torch.Tensor, num_generations: int,
                     scale_rewards: str = "group", aggregation: str = "sum_then_normalize"):
    """TRL 1.16's advantages on the global batch. rewards_per_func fp32 [B, F] (NaN = not applicable),
    weights [F]; rows of a prompt contiguous. Returns (advantages [B], rewards [B] = weighted nansum, NaN
    for rows every function skipped, is_std_zero bool [B]). sum_then_normalize: (r - mean_g) / (std + 1e-4),
    std over the group ("group"), the whole batch ("batch") or not divided ("none"); normalize_then_sum
    normalises each function per group first, then the weighted sum over the batch. NaN advantages -> 0."""
    unscorable = torch.isnan(rewards_per_func).all(dim=1)
    w = weights.to(rewards_per_func.device).unsqueeze(0)
    G = num_generations
    if aggregation == "sum_then_normalize":
        rewards = (rewards_per_func * w).nansum(dim=1)
        rewards[unscorable] = math.nan
        mean = torch.nanmean(rewards.view(-1, G), dim=1).repeat_interleave(G)
        if scale_rewards == "batch":
            std = nanstd(rewards).expand_as(rewards) if rewards.numel() > 1 else torch.zeros_like(rewards)
        else:
            std = nanstd(rewards.view(-1, G), dim=1).repeat_interleave(G)
        adv = rewards - mean
        if scale_rewards != "none":
            adv = adv / (std + 1e-4)
    elif aggregation == "normalize_then_sum":
        grouped = rewards_per_func.view(-1, G, rewards_per_func.shape[1])
        mean_k = torch.nanmean(grouped, dim=1, keepdim=True)
        std_k = nanstd(grouped, dim=1).unsqueeze(1)
        rewards = (((grouped - mean_k) / (std_k + 1e-4)).view(-1, rewards_per_func.shape[1]) * w).nansum(dim=1)
        rewards[unscorable] = math.nan
        std = nanstd(rewards).expand_as(rewards) if rewards.numel() > 1 else torch.zeros_like(rewards)
        adv = (rewards - torch.nanmean(rewards)) / (std + 1e-4)
    else:
        raise ValueError(f"multi_objective_aggregation must be 'sum_then_normalize' or 'normalize_then_sum', "
                         f"got {aggregation!r}")
    is_std_zero = torch.isclose(std, torch.zeros_like(std))
    logged = (rewards_per_func * w).nansum(dim=1)
    logged[unscorable] = math.nan
    return torch.nan_to_num(adv, nan=0.0), logged, is_std_zero


def varying_groups(rewards: torch.Tensor, num_generations: int) -> torch.Tensor:
    """DAPO dynamic sampling's filter: bool [B / G], True for groups whose (finite) rewards are not all equal."""
    g = rewards.view(-1, num_generations)
    lo = torch.where(torch.isnan(g), torch.full_like(g, math.inf), g).amin(dim=1)
    hi = torch.where(torch.isnan(g), torch.full_like(g, -math.inf), g).amax(dim=1)
    return hi > lo


def reward_metrics(rewards_per_func: torch.Tensor, rewards: torch.Tensor, is_std_zero: torch.Tensor,
                   names: list[str]) -> dict[str, float]:
    """TRL's reward metrics on the global batch: rewards/<name>/mean and /std (non-NaN values), reward,
    reward_std (nanstd over the batch) and frac_reward_zero_std (rows in groups without variance)."""
    out = {}
    for i, name in enumerate(names):
        out[f"rewards/{name}/mean"] = float(torch.nanmean(rewards_per_func[:, i]))
        out[f"rewards/{name}/std"] = float(nanstd(rewards_per_func[:, i]))
    out["reward"] = float(torch.nanmean(rewards))
    out["reward_std"] = float(nanstd(rewards))
    out["frac_reward_zero_std"] = float(is_std_zero.float().mean())
    return out


def completion_metrics(completion_lengths: torch.Tensor, is_truncated: torch.Tensor) -> dict[str, float]:
    """TRL's completions/* metrics on the global batch: lengths include the EOS token; a completion is
    truncated when its last token is not EOS (or pad); the terminated ones' lengths (0 when none)."""
    lengths = completion_lengths.float()
    term = lengths[~is_truncated]
    term = term if term.numel() else torch.zeros(1)
    return {"completions/mean_length": float(lengths.mean()), "completions/min_length": float(lengths.min()),
            "completions/max_length": float(lengths.max()),
            "completions/clipped_ratio": float(is_truncated.float().mean()),
            "completions/mean_terminated_length": float(term.mean()),
            "completions/min_terminated_length": float(term.min()),
            "completions/max_terminated_length": float(term.max())}


# =============================================================================== the loss
class LossSpec(NamedTuple):
    """How one TRL loss_type runs on ``policy_loss``: the family loss and its options, the aggregation, and
    the global count it divides by ("seqs": sequences of the optimizer step; "step_tokens": valid tokens
    of the optimizer step; "generation_tokens": TRL dapo's num_items_in_batch x GA / steps_per_generation)."""

    loss_type: str
    loss: str
    ratio_level: str
    clip_low: float
    clip_high: float
    delta: float | None
    tau_pos: float
    tau_neg: float
    agg: str
    count: str
    norm_length: float | None


def loss_spec(args) -> LossSpec:
    """The LossSpec of a GRPOConfig (``rlhf_fast.ops.policy_losses``'s docstring gives the mapping)."""
    t = args.loss_type
    eps_low = args.epsilon
    eps_high = args.epsilon_high if args.epsilon_high is not None else args.epsilon
    level = "sequence" if args.importance_sampling_level == "sequence" else "token"
    agg, count = {"grpo": ("seq-mean-token-mean", "seqs"), "sapo": ("seq-mean-token-mean", "seqs"),
                  "luspo": ("seq-mean-token-sum", "seqs"), "dr_grpo": ("seq-mean-token-sum-norm", "seqs"),
                  "bnpo": ("token-mean", "step_tokens"), "dapo": ("token-mean", "generation_tokens"),
                  "cispo": ("token-mean", "generation_tokens")}[t]
    if t == "cispo":  # TRL: clamp(ratio, max=epsilon_high), i.e. bounds [0, eps_high]
        return LossSpec(t, "cispo", level, 1.0, eps_high - 1.0, None, 1.0, 1.05, agg, count, None)
    family = "sapo" if t == "sapo" else "clip"
    return LossSpec(t, family, level, eps_low, eps_high, args.delta if family == "clip" else None,
                    args.sapo_temperature_pos, args.sapo_temperature_neg, agg, count,
                    float(args.max_completion_length) if t == "dr_grpo" else None)


def _gather_1d(x: torch.Tensor) -> torch.Tensor:
    """Concatenate a 1-D tensor of any length from every rank."""
    if not dist_ready():
        return x
    parts = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(parts, x.detach().cpu())
    return torch.cat(parts).to(x.device)


def high_entropy_mask(entropy: torch.Tensor, mask: torch.Tensor, quantile: float) -> torch.Tensor:
    """TRL's top-entropy token mask: valid tokens whose entropy is at least the ``1 - quantile`` quantile of
    the valid entropies of this micro-batch on every rank. bool [b, T]."""
    gathered = _gather_1d(entropy.detach()[mask].float())
    if gathered.numel() == 0:
        return torch.zeros_like(mask)
    threshold = torch.quantile(gathered, 1.0 - quantile)
    return ((entropy.detach() * mask) >= threshold) & mask


def _global_mean(values: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """TRL's global_masked_mean: sum over valid entries / their count, over every rank (0-d)."""
    s, n = ((values * mask).sum(), mask.sum().float()) if mask is not None else (values.sum(), float(values.numel()))
    tot = all_reduce_sum(torch.stack([s.float(), torch.as_tensor(n, dtype=torch.float32, device=values.device)]))
    return tot[0] / tot[1].clamp_min(1.0)


def _extreme(per_seq: torch.Tensor, largest: bool) -> torch.Tensor:
    """nanmin / nanmax over every rank's per-sequence values (NaN when all are NaN)."""
    v = _gather_1d(per_seq)
    v = v[~torch.isnan(v)]
    if v.numel() == 0:
        return torch.tensor(math.nan)
    return v.max() if largest else v.min()


def micro_loss(model, query_responses: torch.Tensor, masks, advantages: torch.Tensor, old_logprobs, ref_logprobs,
               *, spec: LossSpec, num_tokens: torch.Tensor, num_seqs: torch.Tensor, beta: float,
               bias_correction_kl: bool, temperature: float, top_entropy_quantile: float = 1.0,
               entropy_coef: float = 0.0, grad_accum: int = 1, world_size: int = 1,
               autocast=contextlib.nullcontext):
    """Forward and backward of one GRPO micro-batch (gradients accumulate in the model): the fused log-probs
    and entropies of the response tokens, then ``grpo_loss``.

    query_responses int64 [b, P + R]; masks: ResponseMasks of these rows (policy = TRL's completion mask);
    advantages fp32 [b]; old_logprobs / ref_logprobs fp32 [b, R] or None (None old: on-policy, the forward's
    own detached log-probs). Returns ``grpo_loss``'s (reported loss, statistics)."""
    ids, attn, start, cols = trim_batch(query_responses, masks)
    with autocast():
        out = model(ids, attn, response_start=start, return_entropy=True, return_values=False,
                    temperature=temperature)
    total, reported, stats = grpo_loss(
        out.logprobs.float(), out.entropy.float(), masks.policy[:, :cols], advantages,
        None if old_logprobs is None else old_logprobs[:, :cols], None if ref_logprobs is None else ref_logprobs[:, :cols],
        spec=spec, num_tokens=num_tokens, num_seqs=num_seqs, beta=beta, bias_correction_kl=bias_correction_kl,
        top_entropy_quantile=top_entropy_quantile, entropy_coef=entropy_coef, grad_accum=grad_accum,
        world_size=world_size)
    total.backward()
    return reported, stats


def grpo_loss(logprobs: torch.Tensor, entropy: torch.Tensor, mask: torch.Tensor, advantages: torch.Tensor,
              old_logprobs, ref_logprobs, *, spec: LossSpec, num_tokens: torch.Tensor, num_seqs: torch.Tensor,
              beta: float, bias_correction_kl: bool = True, top_entropy_quantile: float = 1.0,
              entropy_coef: float = 0.0, grad_accum: int = 1, world_size: int = 1):
    """TRL 1.16's GRPO loss of one micro-batch on the fused policy-loss family.

    logprobs (differentiable) / entropy fp32 [b, T], mask bool [b, T], advantages [b], old / ref fp32 [b, T] or
    None. loss = policy_loss(spec) [on the tokens of the top ``top_entropy_quantile`` entropies] + beta x
    aggregate(k3 [x the importance ratio, TRL's use_bias_correction_kl]), both divided by the global counts
    num_tokens / num_seqs (fp32 [1]), - entropy_coef x the micro-batch's mean entropy / grad_accum.
    Returns (the loss to backward, scaled by world_size since DDP averages; the loss as TRL's Trainer reports
    it, detached 0-d; {metric: 0-d tensor} of TRL's per-micro-batch statistics)."""
    m, lp, ent = mask.bool(), logprobs, entropy
    old = old_logprobs if old_logprobs is not None else lp.detach()
    adv = advantages.float().unsqueeze(1).expand_as(lp)
    emask = high_entropy_mask(ent, m, top_entropy_quantile) if top_entropy_quantile < 1.0 else None
    # A zero advantage zeroes a token's loss and gradient for every family loss (TRL multiplies the per-token
    # loss by the mask), while the counts and the GSPO sequence ratio keep every valid token.
    pg, _ = policy_loss(lp, old, adv * emask if emask is not None else adv.contiguous(), m, loss=spec.loss,
                        ratio_level=spec.ratio_level, clip_low=spec.clip_low, clip_high=spec.clip_high,
                        delta=spec.delta, tau_pos=spec.tau_pos, tau_neg=spec.tau_neg, agg=spec.agg,
                        num_tokens=num_tokens, num_seqs=num_seqs, norm_length=spec.norm_length)
    log_ratio = (lp - old) * m
    if spec.ratio_level == "sequence":
        log_ratio = (log_ratio.sum(-1) / m.sum(-1).clamp_min(1)).unsqueeze(1)
    ratio = torch.exp(log_ratio)  # TRL's coef_1, with its gradient (the KL's bias correction uses it)
    loss = pg
    stats: dict[str, torch.Tensor] = {}
    if beta != 0.0 and ref_logprobs is not None:
        kl = get_kl_estimator("k3")(lp, ref_logprobs, clamp=math.inf)
        if bias_correction_kl:
            kl = kl * ratio
        loss = loss + beta * aggregate_loss(kl, m, spec.agg, num_tokens=num_tokens, num_seqs=num_seqs,
                                            norm_length=spec.norm_length)
        stats["kl"] = _global_mean(kl.detach(), m)
    # TRL's per-rank loss is its rank's sum over its own share of the count: ours (a global count) x world size.
    total = loss * world_size
    reported = loss.detach() * world_size
    if entropy_coef:
        eff = m if emask is None else m & emask
        bonus = (ent * eff).sum() / eff.sum().clamp_min(1) / grad_accum
        total = total - entropy_coef * bonus
        stats["policy_loss"] = _global_mean(reported, None)
        reported = reported - entropy_coef * bonus.detach()
        stats["entropy_coef"] = torch.tensor(float(entropy_coef))
    with torch.no_grad():
        stats["entropy"] = _global_mean(ent, m)
        r = ratio.detach()
        seq_level = r.shape[1] == 1  # TRL then counts sequences, not tokens
        a1 = adv[:, :1] if seq_level else adv
        mm = None if seq_level else m
        if spec.loss_type == "cispo":
            stats["cispo_clip_ratio"] = _global_mean(((r > 1 + spec.clip_high) & (a1 > 0)).float(), mm)
        elif spec.loss == "clip":
            if spec.delta is not None:  # TRL counts clipping on the delta-capped ratio
                r = r.clamp(max=spec.delta)
            low = ((r < 1 - spec.clip_low) & (a1 < 0)).float()
            high = ((r > 1 + spec.clip_high) & (a1 > 0)).float()
            stats["clip_ratio/low_mean"] = _global_mean(low, mm)
            stats["clip_ratio/high_mean"] = _global_mean(high, mm)
            stats["clip_ratio/region_mean"] = _global_mean(torch.maximum(low, high), mm)
            per_seq = low.squeeze(1) if seq_level else (low * m).sum(-1) / m.sum(-1)
            stats["clip_ratio/low_min"] = _extreme(per_seq, largest=False)
            per_seq = high.squeeze(1) if seq_level else (high * m).sum(-1) / m.sum(-1)
            stats["clip_ratio/high_max"] = _extreme(per_seq, largest=True)
    return total, reported, stats

