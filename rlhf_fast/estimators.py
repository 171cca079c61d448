"""Critic-free advantage estimators (GRPO / Dr.GRPO, RLOO, REINFORCE++) as pure functions over tensors.

Sequence-level estimators take ``scores`` [B] (one scalar reward per sampled response) and
``num_generations`` n: rows of the same prompt are contiguous, so rows [g·n, (g+1)·n) form group g.
They return fp32 advantages [B], one per sequence; the trainer broadcasts them over the sequence's
response tokens.

    grpo          A_i = (s_i − mean_g) / (std_g + eps)     std_g unbiased (n − 1); eps = 1e-6
                  scale_by_std=False (Dr.GRPO): A_i = s_i − mean_g
                  n = 1 (a "group of one"): the group statistics are undefined, so they are replaced
                  by mean 0 and std 1 and A_i = s_i exactly (no eps in the denominator, both with
                  and without scale_by_std). This is the value the raw score would get from a
                  REINFORCE update with no baseline.
    rloo          A_i = n/(n − 1)·(s_i − mean_g) = s_i − mean of the other n − 1 scores of the group
                  (needs n >= 2: with one sample there is no "other" to serve as the baseline).

The token-level estimator takes per-token rewards (``rlhf_fast.ops.token_rewards``: −kl_coef·kl on
every valid response token plus the score on the last valid one):

    reinforce_pp  G_t = r_t + γ·G_next over the valid positions of each row, where "next" is the next
                  valid position of the same row (masked holes inside a response get G = 0 and pass
                  G_next through unchanged, as GAE does); after a row's last valid token G_next = 0,
                  so nothing flows back across the end of a response or out of padding. Advantages =
                  G whitened over the global batch (masked mean / Bessel variance, all ranks of
                  ``group``), 0 on padding.

G is computed by the GAE op with values 0 and λ = 1 (δ_t = r_t, A_t = r_t + γ·A_next): the same
fused kernels (C++ on CPU, Triton on CUDA) and the same hole semantics, no new kernel to verify.

All functions are device-agnostic, run no host sync on CUDA (value checks only on CPU or under
RLHF_FAST_DEBUG=1) and are registered in ``rlhf_fast.algos`` as "grpo", "rloo", "reinforce_pp".
"""
from __future__ import annotations

import torch

from rlhf_fast._backend import should_check_values
from rlhf_fast.ops import gae, masked_whiten
from rlhf_fast.ops._checks import check_finite, check_floating, check_mask, check_same_shape

__all__ = ["GRPO_EPS", "grpo_advantages", "rloo_advantages", "reinforce_pp_advantages"]

GRPO_EPS = 1e-6


def _grouped_scores(scores: torch.Tensor, num_generations: int, min_group: int, estimator: str) -> torch.Tensor:
    """Validate and reshape scores [B] into fp32 [B / n, n]."""
    if not isinstance(scores, torch.Tensor):
        raise TypeError(f"scores must be a torch.Tensor [B], got {type(scores).__name__}")
    check_floating("scores", scores)
    if scores.dim() != 1:
        raise ValueError(f"scores must be 1-D [B] (one reward per sampled response), got shape {tuple(scores.shape)}")
    if isinstance(num_generations, bool) or not isinstance(num_generations, int):
        raise TypeError(f"num_generations must be an int, got {type(num_generations).__name__}")
    if num_generations < min_group:
        fix = ("sample at least 2 responses per prompt (num_generations >= 2), or use 'grpo' whose group of "
               "one gives A = s") if min_group == 2 else "use num_generations >= 1"
        raise ValueError(f"{estimator} needs num_generations >= {min_group}, got {num_generations}: {fix}")
    B = scores.shape[0]
    if B % num_generations != 0:
        raise ValueError(
            f"{estimator}: the batch of {B} scores is not divisible by num_generations={num_generations}; "
            f"the batch must hold whole groups (rows [g*n, (g+1)*n) are the n samples of prompt g): make the "
            f"batch size a multiple of {num_generations} (e.g. {max(1, B // num_generations) * num_generations} "
            f"or {(B // num_generations + 1) * num_generations})"
        )
    if should_check_values(scores):
        check_finite("scores", scores)
    return scores.float().reshape(B // num_generations, num_generations)


def grpo_advantages(scores: torch.Tensor, num_generations: int, scale_by_std: bool = True,
                    eps: float = GRPO_EPS) -> torch.Tensor:
    """GRPO advantages (s − mean_g) / (std_g + eps), or Dr.GRPO's s − mean_g with ``scale_by_std=False``.

    scores: [B] float (B a multiple of num_generations, groups contiguous). std is unbiased (n − 1).
    num_generations = 1: mean 0 and std 1 replace the undefined statistics, so A = s exactly.
    Returns fp32 [B]. Differentiable in ``scores`` (not needed by the trainer; harmless).
    """
    grouped = _grouped_scores(scores, num_generations, 1, "grpo")
    if num_generations == 1:
        return grouped.reshape(-1).clone()
    centred = grouped - grouped.mean(dim=1, keepdim=True)
    if scale_by_std:
        centred = centred / (grouped.std(dim=1, unbiased=True, keepdim=True) + eps)
    return centred.reshape(-1)


def rloo_advantages(scores: torch.Tensor, num_generations: int) -> torch.Tensor:
    """RLOO advantages s_i − mean_{j≠i} s_j = n/(n − 1)·(s_i − mean_g); needs n >= 2. fp32 [B]."""
    grouped = _grouped_scores(scores, num_generations, 2, "rloo")
    n = num_generations
    leave_one_out_mean = (grouped.sum(dim=1, keepdim=True) - grouped) / (n - 1)
    return (grouped - leave_one_out_mean).reshape(-1)


def reinforce_pp_advantages(token_rewards: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0,
                            group=None, backend: str | None = None) -> torch.Tensor:
    """REINFORCE++ advantages: discounted returns over the valid tokens of each row, whitened globally.

    token_rewards: [B, T] float (e.g. ``rlhf_fast.ops.token_rewards(scores, kl, mask, kl_coef)``).
    mask: [B, T] bool or 0/1, the response tokens (holes allowed, any padding side). gamma in [0, 1].
    group: optional torch.distributed process group for the whitening statistics (every rank calls).
    Returns fp32 [B, T], 0 where mask is 0. backend: forwarded to the GAE and whitening ops.
    """
    if not isinstance(token_rewards, torch.Tensor):
        raise TypeError(f"token_rewards must be a torch.Tensor [B, T], got {type(token_rewards).__name__}")
    check_floating("token_rewards", token_rewards)
    if token_rewards.dim() != 2:
        raise ValueError(f"token_rewards must be [B, T], got shape {tuple(token_rewards.shape)}")
    check_same_shape("token_rewards", token_rewards, mask=mask)
    mask = check_mask("mask", mask)
    if isinstance(gamma, bool) or not isinstance(gamma, (int, float)) or not 0.0 <= gamma <= 1.0:
        raise ValueError(f"gamma must be a number in [0, 1], got {gamma!r}")
    rewards = token_rewards.detach()
    zeros = torch.zeros_like(rewards)
    returns = gae(rewards, zeros, mask, gamma=float(gamma), lam=1.0, backend=backend).advantages
    return masked_whiten(returns, mask, shift_mean=True, group=group, backend=backend)
