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
from rlhf_fast.trainer.distributed import all_reduce_max, all_reduce_sum
from rlhf_fast.trainer.logging import StepStats
from rlhf_fast.trainer.rollout import Rollout, generate

__all__ = [
    "RolloutForward", "Advantages", "ResponseMasks", "POSITION_RULES", "response_masks", "generate_rollout",
    "score_rollout", "scored_completions", "trim_batch", "pad_right",
    "rollout_forward", "rollout_forward_with_grad", "compute_advantages", "compute_group_advantages",
    "ppo_update", "micro_step", "token_budget_micro_batches", "clip_grad_norm",
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
                     seeds: torch.Tensor | None = None, chunk_size: int = 64, inference_mode: bool = True,
                     top_k: int = 0, top_p: float = 1.0, decode_compile: str | None = None) -> Rollout:
    """Sample responses for left-padded prompts int64 [B, P] in chunks of ``chunk_size`` rows (top_k / top_p:
    HF's warpers, off at 0 / 1.0; decode_compile: see ``rollout.generate``).

    Returns one Rollout: query_responses int64 [B, P + R], responses int64 [B, R], response_mask bool
    [B, R] (R = the longest valid response, at least 1), contains_stop bool [B], context_length P."""
    parts = []
    for s in range(0, prompt_ids.shape[0], chunk_size):
        sl = slice(s, s + chunk_size)
        parts.append(generate(model.policy, prompt_ids[sl], prompt_mask[sl], response_length,
                              pad_token_id=pad_token_id, temperature=temperature, stop_token_ids=stop_token_ids,
                              seeds=None if seeds is None else seeds[sl], trim=False, inference_mode=inference_mode,
                              top_k=top_k, top_p=top_p, decode_compile=decode_compile))
    R = max(int(p.response_mask.sum(1).max()) if p.response_mask.numel() else 0 for p in parts)
    R = max(R, 1)
    responses = torch.cat([p.responses[:, :R] for p in parts])
    mask = torch.cat([p.response_mask[:, :R] for p in parts])
    return Rollout(torch.cat([prompt_ids, responses], 1), responses, mask,
                   torch.cat([p.contains_stop for p in parts]), prompt_ids.shape[1])


class ResponseMasks(NamedTuple):
    """Which positions of a rollout count for what (all bool).

    attention [B, P + R]: what the forwards attend; policy [B, R]: the tokens of the policy loss, the KL and
    the entropy; value [B, R]: the tokens of the value loss and GAE, the score sitting on the last one."""

    attention: torch.Tensor
    policy: torch.Tensor
    value: torch.Tensor


POSITION_RULES = ("eos", "trl")


def response_masks(rollout: Rollout, prompt_mask: torch.Tensor, *, rules: str = "eos",
                   pad_token_id: int | None = None) -> ResponseMasks:
    """The masks of a rollout under the position ``rules``.

    "eos" (docs/design.md): every sampled token up to and including the stop token counts for the policy
    and the value; the score sits on the last one (the stop token itself); attention = prompt mask + them.
    "trl" (TRL 1.12's PPOTrainer, to the token): a row ends before its first pad token (L = that index - 1,
    so with pad == eos the EOS token itself is excluded); policy tokens are 0..L, value tokens 0..L+1
    (one past the end, where the score then sits, or L when L + 1 is past the last column); the forwards
    attend every token that is not the pad token."""
    if rules == "eos":
        m = rollout.response_mask.bool()
        return ResponseMasks(torch.cat([prompt_mask.bool(), m], 1), m, m)
    if rules != "trl":
        raise ValueError(f"position rules must be one of {POSITION_RULES}, got {rules!r}")
    if pad_token_id is None:
        raise ValueError("position rules 'trl' need pad_token_id (rows end before their first pad token)")
    responses = rollout.responses
    R = responses.shape[1]
    is_pad = responses == pad_token_id
    idx = torch.arange(R, device=responses.device)
    first_pad = torch.where(is_pad, idx, torch.full_like(idx, R)).amin(dim=1) if R else torch.zeros(
        responses.shape[0], dtype=torch.long, device=responses.device)
    last = (first_pad - 1).unsqueeze(1)
    return ResponseMasks(rollout.query_responses != pad_token_id, idx <= last, idx <= last + 1)


def as_masks(rollout: Rollout, masks) -> ResponseMasks:
    """``masks`` as ResponseMasks: a prompt mask [B, P] alone means the "eos" rules."""
    return masks if isinstance(masks, ResponseMasks) else response_masks(rollout, masks)


# =============================================================================== 2. score
def score_rollout(reward, tokenizer, rollout: Rollout, prompt_mask: torch.Tensor,
                  masks: ResponseMasks | None = None) -> torch.Tensor:
    """Scores fp32 [B] of each prompt + response from a reward adapter, read at the last attended token.

    masks (default: the "eos" rules) say which response tokens the reward model sees: with "eos" up to and
    including the stop token; with "trl" the policy tokens (TRL scores the last token before the first pad).
    Adapters with a tokenizer of their own, and callables, get the decoded ``prompts`` and ``completions``."""
    masks = as_masks(rollout, prompt_mask) if masks is None else masks
    P = rollout.context_length
    attn = torch.cat([masks.attention[:, :P], masks.policy], 1).long()
    kwargs: dict[str, Any] = {"input_ids": rollout.query_responses, "attention_mask": attn}
    if getattr(reward, "tokenizer", None) is not None or not hasattr(reward, "score_ids"):
        kwargs["prompts"] = tokenizer.batch_decode(
            [r[m.bool()] for r, m in zip(rollout.query_responses[:, :P], prompt_mask)], skip_special_tokens=True)
        kwargs["completions"] = tokenizer.batch_decode(
            [r[m] for r, m in zip(rollout.responses, masks.policy)], skip_special_tokens=True)
    return reward(**kwargs).float()


def scored_completions(reward, tokenizer, rollout: Rollout, prompt_mask: torch.Tensor,
                       masks: ResponseMasks | None = None) -> list[dict]:
    """One row per rollout row for people to read: {"query", "model response", "score"} (TRL's columns)."""
    scores = score_rollout(reward, tokenizer, rollout, prompt_mask, masks)
    P = rollout.context_length
    queries = tokenizer.batch_decode([r[m.bool()] for r, m in zip(rollout.query_responses[:, :P], prompt_mask)],
                                     skip_special_tokens=True)
    responses = tokenizer.batch_decode([r[m] for r, m in zip(rollout.responses, rollout.response_mask)],
                                       skip_special_tokens=True)
    return [{"query": q, "model response": c, "score": float(sc)} for q, c, sc in zip(queries, responses, scores)]


# =============================================================================== 3. rollout forward
def trim_batch(query_responses: torch.Tensor, masks: ResponseMasks):
    """Drop left-pad columns every row has and response columns no row needs (cheaper forwards).

    query_responses int64 [B, P + R] and the rows' masks. Returns (ids, attention_mask int64, response_start,
    response_cols): response_cols is the number of response columns kept, up to the last policy or value
    token of any row (outputs must be right-padded back to the full R by the caller, see ``pad_right``)."""
    R = masks.policy.shape[1]
    P = masks.attention.shape[1] - R
    prompt = masks.attention[:, :P]
    first_real = int((prompt.long().cumsum(1) == 0).sum(1).min()) if prompt.numel() else 0
    first_real = min(first_real, P - 1)
    needed = (masks.policy | masks.value).any(0)
    cols = int(torch.nonzero(needed).max()) + 1 if bool(needed.any()) else 1
    return query_responses[:, first_real:P + cols], masks.attention[:, first_real:P + cols].long(), P - first_real, cols


def pad_right(x: torch.Tensor, R: int) -> torch.Tensor:
    """[B, r] -> [B, R] with zeros on the right (r <= R)."""
    return x if x.shape[1] == R else torch.nn.functional.pad(x, (0, R - x.shape[1]))


def _rows(masks: ResponseMasks, rows) -> ResponseMasks:
    return ResponseMasks(masks.attention[rows], masks.policy[rows], masks.value[rows])


@torch.no_grad()
def rollout_forward(model: PolicyValueModel, rollout: Rollout, masks, *, temperature: float,
                    need_reference: bool, chunk_size: int = 64, autocast=contextlib.nullcontext,
                    need_policy: bool = True) -> RolloutForward:
    """Old log-probs and values (one policy-value forward) and reference log-probs, in row chunks.

    masks: ResponseMasks (or the prompt mask [B, P] for the "eos" rules). Log-probs are kept on the policy
    tokens, values on the value tokens. need_policy=False skips the policy forward (logprobs and values
    None): the on-policy critic-free update takes its old log-probs from its own forward. Values are None
    when the model has no critic."""
    masks = as_masks(rollout, masks)
    R = rollout.responses.shape[1]
    with_values = need_policy and getattr(model, "value_head", None) is not None
    lps, refs, vals = [], [], []
    for s in range(0, rollout.responses.shape[0], chunk_size):
        sl = slice(s, s + chunk_size)
        mk = _rows(masks, sl)
        ids, attn, start, cols = trim_batch(rollout.query_responses[sl], mk)
        m, mv = mk.policy[:, :cols], mk.value[:, :cols]
        with autocast():
            out = model(ids, attn, response_start=start, return_entropy=False, return_values=with_values,
                        temperature=temperature) if need_policy else None
            ref = model.reference_logprobs(ids, attn, response_start=start, temperature=temperature) \
                if need_reference else None
        if out is not None:
            lps.append(pad_right(out.logprobs.float() * m, R))
        if with_values:
            vals.append(pad_right(out.values.float() * mv, R))
        if ref is not None:
            refs.append(pad_right(ref.float() * m, R))
    return RolloutForward(torch.cat(lps) if need_policy else None, torch.cat(refs) if need_reference else None,
                          torch.cat(vals) if with_values else None)


def rollout_forward_with_grad(model, rollout: Rollout, masks, ref_logprobs: torch.Tensor | None, *,
                              temperature: float, autocast=contextlib.nullcontext):
    """The first update's forward over the whole batch (rows in order), with its graph kept, standing in
    for the rollout forward when the first update is one micro-batch of the whole batch on dropout-free
    weights (then both compute the same log-probs and values).

    Returns (RolloutForward of detached fp32 [B, R] outputs, (ModelOutput, cols)) for ``ppo_update``'s
    ``first_out``."""
    masks = as_masks(rollout, masks)
    ids, attn, start, cols = trim_batch(rollout.query_responses, masks)
    R = rollout.responses.shape[1]
    with autocast():
        out = model(ids, attn, response_start=start, return_entropy=True, return_values=True,
                    temperature=temperature)
    fwd = RolloutForward(pad_right(out.logprobs.detach().float() * masks.policy[:, :cols], R), ref_logprobs,
                         pad_right(out.values.detach().float() * masks.value[:, :cols], R))
    return fwd, (out, cols)


# =============================================================================== 4. advantages
def _policy_value(masks) -> tuple[torch.Tensor, torch.Tensor]:
    """(policy, value) bool [B, R] from ResponseMasks or one response mask (then both)."""
    if isinstance(masks, ResponseMasks):
        return masks.policy.bool(), masks.value.bool()
    return masks.bool(), masks.bool()


def _kl_clamp(kl_clamp: float | None) -> float:
    return float("inf") if kl_clamp is None else kl_clamp


def compute_advantages(fwd: RolloutForward, scores: torch.Tensor, masks, *, kl_coef: float,
                       kl_estimator: str = "k1", gamma: float = 1.0, lam: float = 0.95, whiten_rewards: bool = False,
                       whiten_advantages: bool = True, estimator: str = "gae", num_generations: int = 1,
                       estimator_kwargs: dict | None = None, kl_clamp: float | None = 10.0, group=None) -> Advantages:
    """Token rewards, advantages and returns, all fp32 [B, R], by the registered ``estimator``.

    scores fp32 [B]; masks: ResponseMasks, or one response mask [B, R] serving as both policy and value
    mask. With a critic (GAE): kl = the ``kl_estimator`` on the policy tokens (|kl| <= kl_clamp; None: no
    clamp, as TRL); rewards = -kl_coef x kl plus the score on the last value token, optionally whitened over
    the value tokens (mean kept); the estimator on rewards and fwd.values over the value tokens; advantages
    whitened over the policy tokens of the global batch. Critic-free: see ``compute_group_advantages``."""
    spec = get_estimator_spec(estimator)
    if not spec.needs_critic:
        return compute_group_advantages(fwd, scores, masks, estimator=estimator, num_generations=num_generations,
                                        kl_coef=kl_coef, kl_estimator=kl_estimator, gamma=gamma,
                                        estimator_kwargs=estimator_kwargs, kl_clamp=kl_clamp, group=group)
    policy, value = _policy_value(masks)
    if fwd.ref_logprobs is None:
        kl = torch.zeros_like(fwd.logprobs)
    else:
        kl = get_kl_estimator(kl_estimator)(fwd.logprobs, fwd.ref_logprobs, clamp=_kl_clamp(kl_clamp)) * policy
    rewards = token_rewards(scores, kl, value, kl_coef)
    non_score = -kl_coef * kl
    if whiten_rewards:
        rewards = masked_whiten(rewards, value, shift_mean=False, group=group)
    adv, returns = get_advantage_estimator(estimator)(rewards, fwd.values, value, gamma, lam)
    if whiten_advantages:
        adv = masked_whiten(adv, policy, shift_mean=True, group=group)
    elif not torch.equal(policy, value):
        adv = adv * policy
    return Advantages(rewards, kl, non_score, adv, returns)


def compute_group_advantages(fwd: RolloutForward, scores: torch.Tensor, masks, *,
                             estimator: str, num_generations: int, kl_coef: float, kl_estimator: str = "k1",
                             gamma: float = 1.0, estimator_kwargs: dict | None = None, kl_clamp: float | None = 10.0,
                             group=None) -> Advantages:
    """Critic-free advantages [B, R] fp32 from the ``rlhf_fast.algos`` registry, on the policy tokens.

    Sequence-level estimators (grpo, rloo): one advantage per sequence from ``scores`` [B] (groups of
    ``num_generations`` contiguous rows), broadcast over the row's valid response tokens; the KL is not in
    the reward (the update adds kl_coef x the spec's kl_loss_estimator to the loss), kl here is that
    estimate for the rollout policy, for the metrics. Token-level ones (reinforce_pp): token rewards =
    score on the last valid token - kl_coef x kl (``kl_estimator``) when the spec keeps the KL in the
    reward, then the estimator (``group`` for global whitening).
    fwd.logprobs may be None for an on-policy update: kl is then zeros here and the trainer reports the KL
    measured by the update's own forward."""
    spec = get_estimator_spec(estimator)
    mask, _ = _policy_value(masks)
    fn = get_advantage_estimator(estimator)
    if fwd.ref_logprobs is not None and fwd.logprobs is not None:
        kl_name = kl_estimator if spec.kl_in_reward else spec.kl_loss_estimator
        kl = get_kl_estimator(kl_name)(fwd.logprobs, fwd.ref_logprobs, clamp=_kl_clamp(kl_clamp)) * mask
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


def ppo_update(model: torch.nn.Module, optimizer: torch.optim.Optimizer, rollout: Rollout, masks,
               fwd: RolloutForward, adv: Advantages, *, args, kl_coef: float, step_seed: int, world_size: int = 1,
               autocast=contextlib.nullcontext, clip_grads: Callable[[], torch.Tensor] | None = None,
               on_nonfinite: Callable[[torch.Tensor], None] | None = None, first_out=None):
    """``args.num_ppo_epochs`` x minibatches x micro-batches of clipped updates on one rollout batch.

    model: the (possibly DDP/FSDP-wrapped) PolicyValueModel whose forward returns a ModelOutput;
    rollout [B rows]; masks: ResponseMasks (or the prompt mask [B, P] for the "eos" rules); fwd / adv fp32
    [B, R]. ``args`` carries the PPOConfig fields read here: num_ppo_epochs, local_mini_batch_size,
    per_device_train_batch_size, cliprange(_high), dual_clip, loss_agg_mode, policy_loss, cliprange_value,
    vf_coef, entropy_coef, temperature, advantage_estimator, response_length, kl_clamp,
    padding_aware_metrics. Minibatch rows are a permutation drawn from ``step_seed``; token and sequence
    counts are global sums over the minibatch (all ranks), so the micro-batch split never changes the
    update; one optimizer step per minibatch. ``clip_grads()`` returns the (clipped) gradient norm before
    each optimizer step; a non-finite one skips that step and calls ``on_nonfinite(norm)`` (which may
    raise). ``first_out`` = (ModelOutput, cols) of a forward already run with grad on all rows in order:
    the first micro-batch reuses it.

    Returns (StepStats, skipped optimizer steps, sums over the policy tokens of the first epoch's
    forwards: {"neg_logprob_sum": -logprob, "kl_sum": the loss-term KL (0 without one)})."""
    masks = as_masks(rollout, masks)
    stats = StepStats.empty()
    policy, value = masks.policy, masks.value
    zero = torch.zeros((), device=policy.device)
    first_epoch = {"neg_logprob_sum": zero, "kl_sum": zero}
    B = policy.shape[0]
    g = torch.Generator().manual_seed(step_seed)
    skipped = 0
    for epoch in range(args.num_ppo_epochs):
        perm = torch.randperm(B, generator=g)
        if epoch == 0 and first_out is not None:
            perm = torch.arange(B)  # the kept forward holds the rows in order (one micro-batch: same loss)
        for mb_start in range(0, B, args.local_mini_batch_size):
            mb = perm[mb_start:mb_start + args.local_mini_batch_size]
            counts = all_reduce_sum(torch.stack([policy[mb].sum().float(), value[mb].sum().float(),
                                                 torch.tensor(float(len(mb)), device=policy.device)]))
            budget = getattr(args, "micro_batch_token_budget", None)
            if budget:
                micro = token_budget_micro_batches(mb, masks.attention[mb].sum(1), budget)
            else:
                micro = [mb[i:i + args.per_device_train_batch_size]
                         for i in range(0, len(mb), args.per_device_train_batch_size)]
            for k, idx in enumerate(micro):
                sync = k == len(micro) - 1
                ctx = model.no_sync() if (not sync and hasattr(model, "no_sync")) else contextlib.nullcontext()
                with ctx:
                    reuse = first_out if (epoch == 0 and mb_start == 0 and k == 0) else None
                    _, st = micro_step(rollout, masks, fwd, adv, idx, counts[0:1], counts[2:3], model=model,
                                       args=args, kl_coef=kl_coef, world_size=world_size, autocast=autocast,
                                       reuse=reuse, num_value_tokens=counts[1:2])
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


def token_budget_micro_batches(rows: torch.Tensor, tokens: torch.Tensor, budget: int, group=None) -> list[torch.Tensor]:
    """Split ``rows`` (int64 [b]) into micro-batches of about ``budget`` tokens each (``tokens`` [b]: the
    tokens each row's forward runs on), balanced by length: the fewest micro-batches that could hold the
    tokens (every rank takes the largest count over ranks, so DDP and FSDP2 run the same number of
    forwards; capped at the rows of the smallest rank), rows assigned longest first to the lightest one.
    A row longer than the budget gets a micro-batch of its own budget's worth. Loss normalisation is global,
    so the split changes memory and time, never the update."""
    t = tokens.long().tolist()
    need = max(-(-sum(t) // budget), sum(1 for x in t if x > budget), 1)
    k = all_reduce_max(torch.tensor([need, -len(t)]), group)
    count = max(1, min(int(k[0]), -int(k[1])))
    bins: list[list[int]] = [[] for _ in range(count)]
    load = [0] * count
    for i in sorted(range(len(t)), key=lambda i: -t[i]):
        j = min(range(count), key=lambda j: load[j])
        bins[j].append(i)
        load[j] += t[i]
    return [rows[sorted(b)] for b in bins if b]


def micro_step(rollout: Rollout, masks, fwd: RolloutForward, adv: Advantages, idx: torch.Tensor,
               num_tokens: torch.Tensor, num_seqs: torch.Tensor, *, model, args, kl_coef: float, world_size: int = 1,
               autocast=contextlib.nullcontext, reuse=None, num_value_tokens: torch.Tensor | None = None):
    """Forward, loss and backward on the rows ``idx`` (int64 [b]) of the rollout; gradients accumulate.

    loss = policy loss (``args.policy_loss``) on the policy tokens [+ vf_coef x value loss on the value
    tokens, with a critic] [+ kl_coef x the spec's loss-term KL when the estimator keeps the KL out of the
    reward] [- entropy_coef x entropy], each aggregated by ``args.loss_agg_mode`` over the global counts
    num_tokens (policy tokens) / num_value_tokens / num_seqs (fp32 [1]); seq-mean-token-sum-norm divides by
    ``args.response_length`` (Dr.GRPO's constant). reuse: (ModelOutput, cols) of a forward already run with
    grad on these rows. Returns (loss detached, per-micro-batch stats as 0-d tensors, no host sync)."""
    masks = as_masks(rollout, masks)
    spec = get_estimator_spec(args.advantage_estimator)
    critic = spec.needs_critic
    temperature = max(args.temperature, 1e-7)
    rows = _rows(masks, idx)
    if reuse is not None:
        out, cols = reuse
    else:
        ids, attn, start, cols = trim_batch(rollout.query_responses[idx], rows)
        with autocast():
            out = model(ids, attn, response_start=start, return_entropy=True, return_values=critic,
                        temperature=temperature)
    m, mv = rows.policy[:, :cols], rows.value[:, :cols]
    R = rollout.responses.shape[1]
    norm_length = getattr(args, "response_length", R)
    new_lp = out.logprobs.float()
    # On-policy critic-free update (no rollout policy forward): old = new, detached (ratio 1, as TRL).
    old_lp = fwd.logprobs[idx][:, :cols] if fwd.logprobs is not None else new_lp.detach()
    clip_high = args.cliprange_high if args.cliprange_high is not None else args.cliprange
    pg_loss, pst = get_policy_loss(args.policy_loss)(
        new_lp, old_lp, adv.advantages[idx][:, :cols], m, clip_low=args.cliprange, clip_high=clip_high,
        dual_clip=args.dual_clip, agg=args.loss_agg_mode, num_tokens=num_tokens, num_seqs=num_seqs,
        norm_length=norm_length)
    # DDP averages gradients over ranks; counts are global sums, so every term is scaled back up by world size.
    loss = pg_loss * world_size
    extra = {}
    if critic:
        nv = num_value_tokens if num_value_tokens is not None else num_tokens
        vf_loss, vf_clipfrac = value_loss(out.values.float(), fwd.values[idx][:, :cols], adv.returns[idx][:, :cols],
                                          mv, clip=args.cliprange_value, agg=args.loss_agg_mode, num_tokens=nv,
                                          num_seqs=num_seqs)
        loss = (pg_loss + args.vf_coef * vf_loss) * world_size
    elif not spec.kl_in_reward and fwd.ref_logprobs is not None and kl_coef > 0:
        # GRPO's KL term: beta x k3(policy || reference) per token, aggregated like the policy loss.
        kl_tok = get_kl_estimator(spec.kl_loss_estimator)(new_lp, fwd.ref_logprobs[idx][:, :cols],
                                                          clamp=_kl_clamp(getattr(args, "kl_clamp", 10.0)))
        kl_loss = aggregate_loss(kl_tok, m, args.loss_agg_mode, num_tokens=num_tokens, num_seqs=num_seqs,
                                 norm_length=norm_length)
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
        n_policy = m.sum().clamp_min(1)
        scale = num_tokens.clamp_min(1) / n_policy  # report the micro-batch's own token mean
        approx_kl, ratio_mean = pst.approx_kl, pst.ratio_mean
        if not getattr(args, "padding_aware_metrics", True):
            # TRL 1.12 averages these over every response column of the micro-batch: padding counts as a
            # log-ratio of 0 (ratio 1).
            share = m.sum() / float(len(idx) * R)
            approx_kl = approx_kl * share
            ratio_mean = ratio_mean * share + (1.0 - share)
    st = {
        "approxkl": approx_kl, "clipfrac": pst.clipfrac, "pg_loss": (pg_loss.detach() * scale).reshape(()),
        "entropy": ent_mean.detach() if ent_mean is not None else torch.zeros(()), "ratio": ratio_mean,
        "neg_logprob_sum": (-new_lp.detach() * m).sum(), **extra,
    }
    if critic:
        st["vf_loss"] = (vf_loss.detach() * nv.clamp_min(1) / mv.sum().clamp_min(1)).reshape(())
        st["vf_clipfrac"] = vf_clipfrac.detach().reshape(())
    return loss.detach(), st
