"""Registries by name: advantage estimators, policy losses, KL estimators.

The trainer looks algorithms up by the names in its config (``get_policy_loss("ppo")``), so a
new algorithm is one decorated function, with no edit to the trainer:

    @register_advantage_estimator("grpo")
    def grpo_advantages(scores, group_index, mask, ...): ...

Conventions per registry (what an entry must accept):
- advantage estimators: each is registered with an ``EstimatorSpec`` that declares what it needs, so
  the trainer never branches on an estimator's name. The spec fixes the call:
    needs_critic (GAE-like):       fn(rewards [B, T], values [B, T], mask [B, T], gamma, lam)
                                   -> (advantages [B, T], returns [B, T]); the trainer applies its
                                   whiten_rewards / whiten_advantages options around it;
    level="token", no critic:      fn(rewards [B, T], mask [B, T], gamma=, group=) -> advantages [B, T];
    level="sequence":              fn(scores [B], num_generations, **config kwargs) -> advantages [B],
                                   broadcast by the trainer over each row's valid response tokens.
  kl_in_reward=True puts -kl_coef x kl (the config's kl_estimator) into the token rewards;
  kl_in_reward=False keeps the rewards pure and adds kl_coef x ``kl_loss_estimator`` per token to the
  loss (TRL GRPO's beta term). Estimators without a critic sample ``num_generations`` responses per
  prompt (contiguous rows), at least ``min_generations``. ``config_kwargs`` maps keyword arguments of
  fn to PPOConfig fields (grpo: scale_by_std <- scale_rewards). All fp32.
- policy losses: the signature of rlhf_fast.ops.ppo_loss.ppo_policy_loss (logprobs, old_logprobs,
  advantages, mask, clip_low, clip_high, dual_clip, agg, num_tokens, num_seqs, norm_length,
  backend) -> (loss, stats), stats with approx_kl, clipfrac, ratio_mean. "ppo" is the vanilla clipped
  loss; its dual clip is the dual_clip argument. The trainer looks it up by PPOConfig.policy_loss.
  The family of rlhf_fast.ops.policy_losses takes the same arguments (all by keyword after the first
  four; mask may be None for packed inputs) plus keyword options (delta, sampling_logprobs, rollout_is,
  rollout_is_min, rollout_is_max, cu_seqlens, ratio_level, tau_pos, tau_neg) and returns
  PolicyLossFamilyStats, a superset of those stats: "clip" (asymmetric, dual and TRL's delta clip),
  "gspo" (TRL's sequence-level ratio), "gspo_token" (veRL's gspo), "cispo", "sapo".
- KL estimators: (logprobs, ref_logprobs, clamp=10.0, backend=None) -> per-token fp32 estimate;
  "k1", "k2", "k3", "abs" are rlhf_fast.ops.kl.kl_penalty with that estimator; "low_var_kl" is veRL's
  name for k3 (same clamps), and "k1+", "k3+", "abs+", "low_var_kl+" are veRL's straight-through
  estimators (that value, the gradient of k2). The trainer looks them up by PPOConfig.kl_estimator (and
  an estimator spec's kl_loss_estimator).

Built-in entries are registered as "module:attribute" paths and imported on first ``get_*``, so
importing this module never depends on the import order of the ops.
"""
from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import NamedTuple

__all__ = [
    "Registry", "EstimatorSpec", "get_estimator_spec",
    "get_advantage_estimator", "get_kl_estimator", "get_policy_loss",
    "list_advantage_estimators", "list_kl_estimators", "list_policy_losses",
    "register_advantage_estimator", "register_kl_estimator", "register_policy_loss",
]


class Registry:
    """Name -> callable, with lazily imported entries ("package.module:attribute")."""

    def __init__(self, kind: str):
        self.kind = kind
        self._entries: dict[str, Callable | str] = {}

    def register(self, name: str, fn: Callable | str | None = None, *, overwrite: bool = False):
        """Register ``fn`` (a callable or a "module:attribute" path) under ``name``; without ``fn``,
        return a decorator. A taken name raises ValueError unless ``overwrite=True``."""
        if not isinstance(name, str) or not name:
            raise ValueError(f"{self.kind} name must be a non-empty string, got {name!r}")

        def add(target):
            if not (callable(target) or (isinstance(target, str) and ":" in target)):
                raise TypeError(f"{self.kind} {name!r} must be a callable or a 'module:attribute' path, got {target!r}")
            if name in self._entries and not overwrite:
                raise ValueError(f"{self.kind} {name!r} is already registered (pass overwrite=True to replace it)")
            self._entries[name] = target
            return target

        return add if fn is None else add(fn)

    def get(self, name: str) -> Callable:
        """The callable registered as ``name``; ValueError listing the valid names otherwise."""
        if name not in self._entries:
            raise ValueError(f"unknown {self.kind} {name!r}; valid names: {', '.join(self.names())}")
        entry = self._entries[name]
        if isinstance(entry, str):
            module, attr = entry.split(":", 1)
            entry = getattr(importlib.import_module(module), attr)
            self._entries[name] = entry
        return entry

    def names(self, sort: bool = True) -> tuple[str, ...]:
        """The registered names, sorted (or in registration order: the built-ins first)."""
        return tuple(sorted(self._entries)) if sort else tuple(self._entries)

    def __contains__(self, name: str) -> bool:
        return name in self._entries


class EstimatorSpec(NamedTuple):
    """What an advantage estimator needs from the trainer (see the module docstring for the calls)."""

    needs_critic: bool = False
    level: str = "token"  # "token": advantages [B, T]; "sequence": one per sequence [B]
    kl_in_reward: bool = True
    kl_loss_estimator: str = "k3"  # used when kl_in_reward is False
    min_generations: int = 1
    config_kwargs: tuple[tuple[str, str], ...] = ()  # (keyword of fn, PPOConfig field)


ADVANTAGE_ESTIMATORS = Registry("advantage estimator")
ESTIMATOR_SPECS: dict[str, EstimatorSpec] = {}
POLICY_LOSSES = Registry("policy loss")
KL_ESTIMATORS = Registry("KL estimator")


def register_advantage_estimator(name: str, fn: Callable | str | None = None, *, overwrite: bool = False,
                                 spec: EstimatorSpec | None = None, **spec_fields):
    """Decorator: ``@register_advantage_estimator("grpo", level="sequence", kl_in_reward=False)``.

    ``spec`` (or its fields as keywords) declares what the estimator needs; the default is a token-level,
    critic-free estimator with the KL in the rewards. ``fn`` registers directly (a callable or a
    "module:attribute" path) instead of decorating."""
    if spec is not None and spec_fields:
        raise TypeError("pass either spec= or its fields as keywords, not both")
    spec = spec if spec is not None else EstimatorSpec(**spec_fields)
    if spec.level not in ("token", "sequence"):
        raise ValueError(f"estimator {name!r}: level must be 'token' or 'sequence', got {spec.level!r}")
    if spec.needs_critic and spec.level != "token":
        raise ValueError(f"estimator {name!r}: an estimator with a critic is token-level (values are per token)")

    def add(target):
        ADVANTAGE_ESTIMATORS.register(name, target, overwrite=overwrite)
        ESTIMATOR_SPECS[name] = spec
        return target

    return add if fn is None else add(fn)


def register_policy_loss(name: str, *, overwrite: bool = False):
    """Decorator: ``@register_policy_loss("gspo")``; the function takes ppo_policy_loss's arguments."""
    return POLICY_LOSSES.register(name, overwrite=overwrite)


def register_kl_estimator(name: str, *, overwrite: bool = False):
    """Decorator: ``@register_kl_estimator("k3+")``; (logprobs, ref_logprobs, clamp, backend) -> [B, T]."""
    return KL_ESTIMATORS.register(name, overwrite=overwrite)


def get_advantage_estimator(name: str) -> Callable:
    return ADVANTAGE_ESTIMATORS.get(name)


def get_estimator_spec(name: str) -> EstimatorSpec:
    """The EstimatorSpec of a registered advantage estimator; ValueError listing the valid names otherwise."""
    if name not in ADVANTAGE_ESTIMATORS:
        ADVANTAGE_ESTIMATORS.get(name)  # raises the error naming the valid estimators
    return ESTIMATOR_SPECS.get(name, EstimatorSpec())


def get_policy_loss(name: str) -> Callable:
    return POLICY_LOSSES.get(name)


def get_kl_estimator(name: str) -> Callable:
    return KL_ESTIMATORS.get(name)


def list_advantage_estimators() -> tuple[str, ...]:
    return ADVANTAGE_ESTIMATORS.names()


def list_policy_losses() -> tuple[str, ...]:
    return POLICY_LOSSES.names()


def list_kl_estimators() -> tuple[str, ...]:
    return KL_ESTIMATORS.names()


# --------------------------------------------------------------------------- built-in entries
register_advantage_estimator("gae", "rlhf_fast.ops.gae:gae", needs_critic=True)
# Critic-free: grpo/rloo give one advantage per sequence and keep the KL out of the rewards (a beta x k3
# loss term, as TRL's GRPO); reinforce_pp shapes token rewards with the KL and whitens the returns itself.
register_advantage_estimator("grpo", "rlhf_fast.estimators:grpo_advantages", level="sequence", kl_in_reward=False,
                             config_kwargs=(("scale_by_std", "scale_rewards"),))
register_advantage_estimator("rloo", "rlhf_fast.estimators:rloo_advantages", level="sequence", kl_in_reward=False,
                             min_generations=2)
register_advantage_estimator("reinforce_pp", "rlhf_fast.estimators:reinforce_pp_advantages")
POLICY_LOSSES.register("ppo", "rlhf_fast.ops.ppo_loss:ppo_policy_loss")
for _name in ("clip", "gspo", "gspo_token", "cispo", "sapo"):
    POLICY_LOSSES.register(_name, f"rlhf_fast.ops.policy_losses:{_name}_policy_loss")


def _kl_estimator(estimator: str) -> Callable:
    """kl_penalty with ``estimator`` fixed (kl.py is imported at the first call)."""

    def kl_estimate(logprobs, ref_logprobs, clamp: float = 10.0, backend: str | None = None):
        from rlhf_fast.ops.kl import kl_penalty

        return kl_penalty(logprobs, ref_logprobs, estimator=estimator, clamp=clamp, backend=backend)

    kl_estimate.__name__ = kl_estimate.__qualname__ = f"kl_{estimator}"
    kl_estimate.__doc__ = f"Per-token KL estimate {estimator!r}: rlhf_fast.ops.kl.kl_penalty(estimator={estimator!r})."
    return kl_estimate


for _name in ("k1", "k2", "k3", "abs", "low_var_kl", "k1+", "k3+", "abs+", "low_var_kl+"):
    KL_ESTIMATORS.register(_name, _kl_estimator(_name))
del _name
