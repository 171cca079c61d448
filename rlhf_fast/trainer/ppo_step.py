"""One PPO step as plain functions over tensors: rollout -> score -> rollout forward -> advantages -> update.

``PPOTrainer.step`` is these calls in order; a user writing their own loop can call them directly:

    rollout = generate_rollout(model, prompt_ids, prompt_mask, ...)      # lean KV-cache decode
    scores  = score_rollout(reward, tokenizer, rollout, prompt_mask)     # reward model / callable
    fwd     = rollout_forward(model, rollout, prompt_mask, ...)          # old log-probs, values, reference
    adv     = compute_advantages(fwd, scores, rollout.response_mask, ...) # KL-shaped rewards, estimator, whitening
    stats   = ppo_update(model, optimizer, rollout, prompt_mask, fwd, adv, args=...)  # epochs x minibatches x micro

Shapes: B rollout rows, P prompt columns (left-padded), R response columns (right-padded; valid
response tokens form a prefix of each row). Every per-token tensor is fp32 [B, R] and 0 where the
response mask is 0. Advantage estimators, policy losses and KL estimators are looked up by name in
``rlhf_fast.algos``; what an estimator needs (a critic, the KL in the reward or in the loss, token- or
sequence-level advantages) comes from its ``EstimatorSpec``, so no estimator name appears here.

Everything runs on torch.distributed when a process group exists (torchrun): whitening statistics and
token/sequence counts are global sums, so the update does not depend on how the batch is split.
"""
from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any, NamedTuple

import torch

from rlhf_fast.algos import get_advantage_estimator, get_estimator_spec, get_kl_estimator, get_policy_loss
from rlhf_fast.models import PolicyValueModel
from rlhf_fast.ops.kl import token_rewards
from rlhf_fast.ops.ppo_loss import aggregate_loss, value_loss
from rlhf_fast.ops.whiten import masked_whiten
from rlhf_fast.trainer.distributed import all_reduce_sum
from rlhf_fast.trainer.logging import StepStats
from rlhf_fast.trainer.rollout import Rollout, generate

__all__ = [
    "RolloutForward", "Advantages", "generate_rollout", "score_rollout", "scored_completions", "trim_batch",
    "pad_right",
    "rollout_forward", "rollout_forward_with_grad", "compute_advantages", "compute_group_advantages",
    "ppo_update", "micro_step", "clip_grad_norm",
]


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
    token, plus -kl_coef x kl when the estimator keeps the KL in the reward); kl is the per-token
    estimate of the old policy against the reference (the estimator's loss-term KL when the KL is
    not in the reward)."""

    rewards: torch.Tensor
    kl: torch.Tensor
    non_score_reward: torch.Tensor
    advantages: torch.Tensor
    returns: torch.Tensor | None


# =============================================================================== 1. rollout
def generate_rollout(model: PolicyValueModel, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, *,
                     response_length: int, temperature: float, pad_token_id: int, stop_token_ids=(),
                     seeds: torch.Tensor | None = None, chunk_size: int = 64, inference_mode: bool = True) -> Rollout:
    """Sample responses for left-padded prompts int64 [B, P] in chunks of ``chunk_size`` rows.

    Returns one Rollout: query_responses int64 [B, P + R], responses int64 [B, R], response_mask bool
    [B, R] (R = the longest valid response, at least 1), contains_stop bool [B], context_length P."""
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


# =============================================================================== 2. score
def score_rollout(reward, tokenizer, rollout: Rollout, prompt_mask: torch.Tensor) -> torch.Tensor:
    """Scores fp32 [B] of prompt + response (up to and including the stop token) from a reward adapter.

    Adapters with a tokenizer of their own, and callables, get the decoded ``prompts`` and ``completions``."""
    attn = torch.cat([prompt_mask.to(rollout.response_mask.dtype), rollout.response_mask], 1).long()
    kwargs: dict[str, Any] = {"input_ids": rollout.query_responses, "attention_mask": attn}
    if getattr(reward, "tokenizer", None) is not None or not hasattr(reward, "score_ids"):
        P = rollout.context_length
        kwargs["prompts"] = tokenizer.batch_decode(
            [r[m.bool()] for r, m in zip(rollout.query_responses[:, :P], prompt_mask)], skip_special_tokens=True)
        kwargs["completions"] = tokenizer.batch_decode(
            [r[m] for r, m in zip(rollout.responses, rollout.response_mask)], skip_special_tokens=True)
    return reward(**kwargs).float()


def scored_completions(reward, tokenizer, rollout: Rollout, prompt_mask: torch.Tensor) -> list[dict]:
    """One row per rollout row for people to read: {"query", "model response", "score"} (TRL's columns)."""
    scores = score_rollout(reward, tokenizer, rollout, prompt_mask)
    P = rollout.context_length
    queries = tokenizer.batch_decode([r[m.bool()] for r, m in zip(rollout.query_responses[:, :P], prompt_mask)],
                                     skip_special_tokens=True)
    responses = tokenizer.batch_decode([r[m] for r, m in zip(rollout.responses, rollout.response_mask)],
                                       skip_special_tokens=True)
    return [{"query": q, "model response": c, "score": float(sc)} for q, c, sc in zip(queries, responses, scores)]


# =============================================================================== 3. rollout forward
def trim_batch(query_responses, prompt_mask, response_mask):
    """Drop left-pad columns every row has and response columns no row uses (cheaper forwards).

    query_responses int64 [B, P + R], prompt_mask [B, P], response_mask [B, R]. Returns (ids, attention_mask,
    response_start, response_cols) where response_cols is the number of response columns kept (outputs
    must be right-padded back to the full R by the caller, see ``pad_right``)."""
    P = prompt_mask.shape[1]
    first_real = int((prompt_mask.long().cumsum(1) == 0).sum(1).min()) if prompt_mask.numel() else 0
    first_real = min(first_real, P - 1)
    resp_len = int(response_mask.long().sum(1).max()) if response_mask.numel() else 0
    # valid response tokens form a prefix of each row (tokens after the stop token are masked)
    resp_cols = max(resp_len, 1)
    ids = query_responses[:, first_real:P + resp_cols]
    attn = torch.cat([prompt_mask[:, first_real:].long(), response_mask[:, :resp_cols].long()], 1)
    return ids, attn, P - first_real, resp_cols


def pad_right(x: torch.Tensor, R: int) -> torch.Tensor:
    """[B, r] -> [B, R] with zeros on the right (r <= R)."""
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
            lps.append(pad_right(out.logprobs.float() * m, R))
        if with_values:
            vals.append(pad_right(out.values.float() * m, R))
        if ref is not None:
            refs.append(pad_right(ref.float() * m, R))
    return RolloutForward(torch.cat(lps) if need_policy else None, torch.cat(refs) if need_reference else None,
                          torch.cat(vals) if with_values else None)


def rollout_forward_with_grad(model, rollout: Rollout, prompt_mask: torch.Tensor, ref_logprobs: torch.Tensor | None, *,
                              temperature: float, autocast=contextlib.nullcontext):
    """The first update's forward over the whole batch (rows in order), with its graph kept, standing in
    for the rollout forward when the first update is one micro-batch of the whole batch on dropout-free
    weights (then both compute the same log-probs and values).

    Returns (RolloutForward of detached fp32 [B, R] outputs, (ModelOutput, cols)) for ``ppo_update``'s
    ``first_out``."""
    ids, attn, start, cols = trim_batch(rollout.query_responses, prompt_mask, rollout.response_mask)
    m = rollout.response_mask[:, :cols]
    R = rollout.responses.shape[1]
    with autocast():
        out = model(ids, attn, response_start=start, return_entropy=True, return_values=True,
                    temperature=temperature)
    fwd = RolloutForward(pad_right(out.logprobs.detach().float() * m, R), ref_logprobs,
                         pad_right(out.values.detach().float() * m, R))
    return fwd, (out, cols)


# =============================================================================== 4. advantages
def compute_advantages(fwd: RolloutForward, scores: torch.Tensor, response_mask: torch.Tensor, *, kl_coef: float,
                       kl_estimator: str = "k1", gamma: float = 1.0, lam: float = 0.95, whiten_rewards: bool = False,
                       whiten_advantages: bool = True, estimator: str = "gae", num_generations: int = 1,
                       estimator_kwargs: dict | None = None, group=None) -> Advantages:
    """Token rewards, advantages and returns, all fp32 [B, R], by the registered ``estimator``.

    scores fp32 [B]; response_mask [B, R]. With a critic (GAE): rewards = -kl_coef x kl (``kl_estimator``)
    on every valid token plus the score on the last valid one (docs/design.md), optionally whitened (mean
    kept), then the estimator on rewards and fwd.values, then advantages whitened over the global batch.
    Critic-free: see ``compute_group_advantages``."""
    spec = get_estimator_spec(estimator)
    if not spec.needs_critic:
        return compute_group_advantages(fwd, scores, response_mask, estimator=estimator,
                                        num_generations=num_generations, kl_coef=kl_coef, kl_estimator=kl_estimator,
                                        gamma=gamma, estimator_kwargs=estimator_kwargs, group=group)
    mask = response_mask.bool()
    if fwd.ref_logprobs is None:
        kl = torch.zeros_like(fwd.logprobs)
    else:
        kl = get_kl_estimator(kl_estimator)(fwd.logprobs, fwd.ref_logprobs) * mask
    rewards = token_rewards(scores, kl, mask, kl_coef)
    non_score = -kl_coef * kl
    if whiten_rewards:
        rewards = masked_whiten(rewards, mask, shift_mean=False, group=group)
    adv, returns = get_advantage_estimator(estimator)(rewards, fwd.values, mask, gamma, lam)
    if whiten_advantages:
        adv = masked_whiten(adv, mask, shift_mean=True, group=group)
    return Advantages(rewards, kl, non_score, adv, returns)


def compute_group_advantages(fwd: RolloutForward, scores: torch.Tensor, response_mask: torch.Tensor, *,
                             estimator: str, num_generations: int, kl_coef: float, kl_estimator: str = "k1",
                             gamma: float = 1.0, estimator_kwargs: dict | None = None, group=None) -> Advantages:
    """Critic-free advantages [B, R] fp32 from the ``rlhf_fast.algos`` registry.

    Sequence-level estimators (grpo, rloo): one advantage per sequence from ``scores`` [B] (groups of
    ``num_generations`` contiguous rows), broadcast over the row's valid response tokens; the KL is not in
    the reward (the update adds kl_coef x the spec's kl_loss_estimator to the loss), kl here is that
    estimate for the rollout policy, for the metrics. Token-level ones (reinforce_pp): token rewards =
    score on the last valid token - kl_coef x kl (``kl_estimator``) when the spec keeps the KL in the
    reward, then the estimator (``group`` for global whitening).
    fwd.logprobs may be None for an on-policy update: kl is then zeros here and the trainer reports the KL
    measured by the update's own forward."""
    spec = get_estimator_spec(estimator)
    mask = response_mask.bool()
    fn = get_advantage_estimator(estimator)
    if fwd.ref_logprobs is not None and fwd.logprobs is not None:
        kl_name = kl_estimator if spec.kl_in_reward else spec.kl_loss_estimator
        kl = get_kl_estimator(kl_name)(fwd.logprobs, fwd.ref_logprobs) * mask
    elif fwd.ref_logprobs is not None and spec.kl_in_reward:
        raise ValueError(f"{estimator} with a reference needs fwd.logprobs for its KL-shaped token rewards")
    else:
        kl = torch.zeros(mask.shape, dtype=torch.float32, device=mask.device)
    reward_kl_coef = kl_coef if spec.kl_in_reward else 0.0
    rewards = token_rewards(scores, kl if spec.kl_in_reward else torch.zeros_like(kl), mask, reward_kl_coef)
    if spec.level == "token":
        adv = fn(rewards, mask, gamma=gamma, group=group)
    else:
        per_seq = fn(scores, num_generations, **(estimator_kwargs or {}))
        adv = per_seq.unsqueeze(1) * mask
    return Advantages(rewards, kl, -kl_coef * kl, adv, None)


# =============================================================================== 5. update
def clip_grad_norm(model: torch.nn.Module, max_grad_norm: float | None) -> torch.Tensor:
    """Total gradient norm of the trainable parameters, clipped to ``max_grad_norm`` when it is > 0."""
    params = [p for p in model.parameters() if p.requires_grad and p.grad is not None]
    if not params:
        return torch.zeros(())
    max_norm = max_grad_norm if max_grad_norm and max_grad_norm > 0 else float("inf")
    return torch.nn.utils.clip_grad_norm_(params, max_norm)


def ppo_update(model: torch.nn.Module, optimizer: torch.optim.Optimizer, rollout: Rollout, prompt_mask: torch.Tensor,
               fwd: RolloutForward, adv: Advantages, *, args, kl_coef: float, step_seed: int, world_size: int = 1,
               autocast=contextlib.nullcontext, clip_grads: Callable[[], torch.Tensor] | None = None,
               on_nonfinite: Callable[[torch.Tensor], None] | None = None, first_out=None):
    """``args.num_ppo_epochs`` x minibatches x micro-batches of clipped updates on one rollout batch.

    model: the (possibly DDP/FSDP-wrapped) PolicyValueModel whose forward returns a ModelOutput;
    rollout [B rows], prompt_mask [B, P], fwd / adv fp32 [B, R]. ``args`` carries the PPOConfig fields
    read here: num_ppo_epochs, local_mini_batch_size, per_device_train_batch_size, cliprange(_high),
    dual_clip, loss_agg_mode, policy_loss, cliprange_value, vf_coef, entropy_coef, temperature,
    advantage_estimator. Minibatch rows are a permutation drawn from ``step_seed``; token and sequence
    counts are global sums over the minibatch (all ranks), so the micro-batch split never changes the
    update. ``clip_grads()`` returns the (clipped) gradient norm before each optimizer step; a non-finite
    one skips that step and calls ``on_nonfinite(norm)`` (which may raise). ``first_out`` = (ModelOutput,
    cols) of a forward already run with grad on all rows in order: the first micro-batch reuses it.

    Returns (StepStats, skipped optimizer steps, sums over the valid tokens of the first epoch's
    forwards: {"neg_logprob_sum": -logprob, "kl_sum": the loss-term KL (0 without one)})."""
    stats = StepStats.empty()
    mask = rollout.response_mask
    zero = torch.zeros((), device=mask.device)
    first_epoch = {"neg_logprob_sum": zero, "kl_sum": zero}
    B = mask.shape[0]
    g = torch.Generator().manual_seed(step_seed)
    skipped = 0
    for epoch in range(args.num_ppo_epochs):
        perm = torch.randperm(B, generator=g)
        if epoch == 0 and first_out is not None:
            perm = torch.arange(B)  # the kept forward holds the rows in order (one micro-batch: same loss)
        for mb_start in range(0, B, args.local_mini_batch_size):
            mb = perm[mb_start:mb_start + args.local_mini_batch_size]
            num_tokens = all_reduce_sum(mask[mb].sum().float().reshape(1))
            num_seqs = all_reduce_sum(torch.tensor([float(len(mb))], device=mask.device))
            micro = [mb[i:i + args.per_device_train_batch_size]
                     for i in range(0, len(mb), args.per_device_train_batch_size)]
            for k, idx in enumerate(micro):
                sync = k == len(micro) - 1
                ctx = model.no_sync() if (not sync and hasattr(model, "no_sync")) else contextlib.nullcontext()
                with ctx:
                    reuse = first_out if (epoch == 0 and mb_start == 0 and k == 0) else None
                    _, st = micro_step(rollout, prompt_mask, fwd, adv, idx, num_tokens, num_seqs, model=model,
                                       args=args, kl_coef=kl_coef, world_size=world_size, autocast=autocast,
                                       reuse=reuse)
                sums = {key: st.pop(key) for key in ("neg_logprob_sum", "kl_sum") if key in st}
                if epoch == 0:
                    for key, v in sums.items():
                        first_epoch[key] = first_epoch[key] + v
                stats.add(st)
            grad_norm = clip_grads() if clip_grads is not None else clip_grad_norm(model, None)
            if not bool(torch.isfinite(grad_norm)):
                skipped += 1
                optimizer.zero_grad(set_to_none=True)
                if on_nonfinite is not None:
                    on_nonfinite(grad_norm)
                continue
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    return stats, skipped, first_epoch


def micro_step(rollout: Rollout, prompt_mask: torch.Tensor, fwd: RolloutForward, adv: Advantages, idx: torch.Tensor,
               num_tokens: torch.Tensor, num_seqs: torch.Tensor, *, model, args, kl_coef: float, world_size: int = 1,
               autocast=contextlib.nullcontext, reuse=None):
    """Forward, loss and backward on the rows ``idx`` (int64 [b]) of the rollout; gradients accumulate.

    loss = policy loss (``args.policy_loss``) [+ vf_coef x value loss with a critic] [+ kl_coef x the
    spec's loss-term KL when the estimator keeps the KL out of the reward] [- entropy_coef x entropy],
    each aggregated by ``args.loss_agg_mode`` over the global counts num_tokens / num_seqs (fp32 [1]).
    reuse: (ModelOutput, cols) of a forward already run with grad on these rows.
    Returns (loss detached, per-micro-batch stats as 0-d tensors, no host sync)."""
    spec = get_estimator_spec(args.advantage_estimator)
    critic = spec.needs_critic
    temperature = max(args.temperature, 1e-7)
    if reuse is not None:
        out, cols = reuse
    else:
        ids, attn, start, cols = trim_batch(rollout.query_responses[idx], prompt_mask[idx], rollout.response_mask[idx])
        with autocast():
            out = model(ids, attn, response_start=start, return_entropy=True, return_values=critic,
                        temperature=temperature)
    m = rollout.response_mask[idx][:, :cols]
    R = rollout.responses.shape[1]
    new_lp = out.logprobs.float()
    # On-policy critic-free update (no rollout policy forward): old = new, detached (ratio 1, as TRL).
    old_lp = fwd.logprobs[idx][:, :cols] if fwd.logprobs is not None else new_lp.detach()
    clip_high = args.cliprange_high if args.cliprange_high is not None else args.cliprange
    pg_loss, pst = get_policy_loss(args.policy_loss)(
        new_lp, old_lp, adv.advantages[idx][:, :cols], m, clip_low=args.cliprange, clip_high=clip_high,
        dual_clip=args.dual_clip, agg=args.loss_agg_mode, num_tokens=num_tokens, num_seqs=num_seqs, norm_length=R)
    # DDP averages gradients over ranks; counts are global sums, so every term is scaled back up by world size.
    loss = pg_loss * world_size
    extra = {}
    if critic:
        vf_loss, vf_clipfrac = value_loss(out.values.float(), fwd.values[idx][:, :cols], adv.returns[idx][:, :cols], m,
                                          clip=args.cliprange_value, agg=args.loss_agg_mode, num_tokens=num_tokens,
                                          num_seqs=num_seqs)
        loss = (pg_loss + args.vf_coef * vf_loss) * world_size
    elif not spec.kl_in_reward and fwd.ref_logprobs is not None and kl_coef > 0:
        # GRPO's KL term: beta x k3(policy || reference) per token, aggregated like the policy loss.
        kl_tok = get_kl_estimator(spec.kl_loss_estimator)(new_lp, fwd.ref_logprobs[idx][:, :cols])
        kl_loss = aggregate_loss(kl_tok, m, args.loss_agg_mode, num_tokens=num_tokens, num_seqs=num_seqs,
                                 norm_length=R)
        loss = loss + kl_coef * kl_loss * world_size
        with torch.no_grad():
            extra["kl_sum"] = (kl_tok * m).sum()
            extra["kl"] = extra["kl_sum"] / m.sum().clamp_min(1)
    ent_mean = None
    if out.entropy is not None:
        ent_tok = out.entropy.float()
        ent_mean = (ent_tok * m).sum() / m.sum().clamp_min(1)
        if args.entropy_coef:
            loss = loss - args.entropy_coef * (ent_tok * m).sum() / num_tokens.clamp_min(1) * world_size
    loss.backward()
    with torch.no_grad():
        scale = num_tokens.clamp_min(1) / m.sum().clamp_min(1)  # report the micro-batch's own token mean
    st = {
        "approxkl": pst.approx_kl, "clipfrac": pst.clipfrac, "pg_loss": (pg_loss.detach() * scale).reshape(()),
        "entropy": ent_mean.detach() if ent_mean is not None else torch.zeros(()), "ratio": pst.ratio_mean,
        "neg_logprob_sum": (-new_lp.detach() * m).sum(), **extra,
    }
    if critic:
        st["vf_loss"] = (vf_loss.detach() * scale).reshape(())
        st["vf_clipfrac"] = vf_clipfrac.detach().reshape(())
    return loss.detach(), st
