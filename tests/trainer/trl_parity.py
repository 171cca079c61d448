"""Run trl==1.12.0's PPOTrainer and ours on the same tiny models, data and config, with identical rollouts.

Sampling differs between the two engines (HF ``generate`` against our lean decoder), so both sides get
their responses from one deterministic *oracle*: a hash of the prompt tokens and the step picks each
response token and (in the EOS regimes) where the response stops. TRL's ``batch_generation`` is patched
to return the oracle's sequences with the policy's own logits (what ``generate`` returns, for the valid
positions); ours is patched at ``ppo_step.generate_rollout``. TRL's shuffled prompt batches are recorded
and replayed to ours, and both sides draw their minibatch permutations from one shared list. Everything
else is each engine's own code.
"""
from __future__ import annotations

import copy
import hashlib
import io
import os
from contextlib import ExitStack, contextmanager, redirect_stdout
from dataclasses import dataclass, field
from unittest import mock

import numpy as np
import torch

from tests.trainer.tiny import EOS, PAD, make_tokenizer, prompt_rows, tiny_classifier, tiny_policy

V = 32
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")


def require_trl():
    """trl 1.12.0 (the `dev` extra), or a failure that names the fix; never a silent skip."""
    try:
        import trl
    except ImportError as e:  # pragma: no cover - make test installs it
        raise AssertionError("the TRL parity harness needs trl==1.12.0: run `make install` (the [dev] extra "
                             "pins it) or `.venv/bin/pip install torch==2.13.0 trl==1.12.0`") from e
    if trl.__version__ != "1.12.0":  # pragma: no cover
        raise AssertionError(f"the TRL parity harness compares against trl==1.12.0, found {trl.__version__}: "
                             "`.venv/bin/pip install torch==2.13.0 trl==1.12.0`")


@dataclass(frozen=True)
class Case:
    """One regime: the shared config fields, the data and how responses stop."""

    name: str
    config: dict = field(default_factory=dict, hash=False)
    eos: bool = False  # responses stop at EOS at varied lengths (else full length, no EOS)
    num_prompts: int = 32
    steps: int = 3
    ours: dict = field(default_factory=dict, hash=False)  # extra fields for our side only


def common_config(out: str, **kw) -> dict:
    cfg = dict(output_dir=out, use_cpu=True, bf16=False, per_device_train_batch_size=8, gradient_accumulation_steps=1,
               num_mini_batches=1, num_ppo_epochs=2, response_length=6, learning_rate=3e-3, kl_coef=0.05,
               temperature=1.0, logging_steps=1, save_strategy="no", report_to="none", num_sample_generations=0,
               seed=3, disable_tqdm=True, stop_token="eos")
    cfg.update(kw)
    return cfg


# ----------------------------------------------------------------------------- the oracle
def _digest(*parts) -> int:
    return int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:8], "little")


def oracle_responses(queries: torch.Tensor, step: int, response_length: int, eos: bool) -> torch.Tensor:
    """int64 [b, R]: response tokens from a hash of each prompt's tokens and the step (never pad / eos
    before the end); with ``eos`` each row stops with EOS after 1..response_length-1 tokens (pad after it)."""
    rows = []
    for q in queries.tolist():
        key = tuple(t for t in q if t != PAD)
        length = response_length
        if eos:
            length = 1 + _digest(key, step, "len") % (response_length - 1)
        toks = [3 + _digest(key, step, i) % (V - 3) for i in range(length)]
        if eos:
            toks[-1] = EOS
        rows.append(toks + [PAD] * (response_length - length))
    out = torch.tensor(rows, dtype=torch.long)
    width = int((out != PAD).sum(1).max())  # as generate stops once every row has finished
    return out[:, :max(width, 1)]


def permutations(seed: int, count: int, n: int) -> list[np.ndarray]:
    g = np.random.default_rng(seed)
    return [g.permutation(n) for _ in range(count)]


class PermutationFeed:
    """Hands out the shared minibatch permutations in order, to TRL (numpy) and to us (torch)."""

    def __init__(self, perms):
        self.perms, self.i = perms, 0

    def next(self, n: int) -> np.ndarray:
        p = self.perms[self.i]
        self.i += 1
        assert len(p) == n, f"permutation of {len(p)} rows asked for {n}"
        return p


# ----------------------------------------------------------------------------- models and data
def models(seed: int = 0):
    """policy, reference copy, value model, reward model (tiny Llama; value and reward differ)."""
    policy = tiny_policy(V, seed=seed)
    ref = copy.deepcopy(policy)
    value = tiny_classifier(V, seed=seed + 11)
    reward = tiny_classifier(V, seed=seed + 23)
    return policy, ref, value, reward


def dataset(n: int):
    from datasets import Dataset

    return Dataset.from_list(prompt_rows(n, V, min_len=2, max_len=6, seed=7))


@dataclass
class Result:
    history: list[dict]
    weights: list[dict]  # after each PPO step: policy.* and value.* (value backbone + score head, TRL's names)
    optimizer_steps: list[int] = field(default_factory=list)  # optimizer steps taken in each PPO step
    queries: list[torch.Tensor] = field(default_factory=list)


def snapshot(policy: torch.nn.Module, value_backbone: torch.nn.Module, value_head: torch.nn.Module) -> dict:
    out = {f"policy.{k}": v.detach().clone() for k, v in policy.state_dict().items()}
    out.update({f"value.backbone.{k}": v.detach().clone() for k, v in value_backbone.state_dict().items()})
    out["value.score.weight"] = value_head.weight.detach().clone()
    return out


# ----------------------------------------------------------------------------- TRL
@contextmanager
def trl_injected(eos: bool, perms, record: Result):
    """Patch trl 1.12's PPOTrainer (class-wide, so a trainer a script builds is covered): oracle rollouts,
    the shared permutations, and per-step optimizer-step counts, weights and queries into ``record``."""
    require_trl()
    from transformers import TrainerCallback
    from trl.experimental.ppo import ppo_trainer as trl_ppo

    feed = PermutationFeed(perms)

    def batch_generation(model, q, local_bs, pad_token_id, generation_config):
        step = len(record.queries)
        record.queries.append(q.clone())
        resp = oracle_responses(q, step, generation_config.max_new_tokens, eos)
        qr = torch.cat([q, resp], 1)
        with torch.no_grad():
            logits = trl_ppo.forward(model, qr, pad_token_id).logits[:, q.shape[1] - 1:-1]
        return qr, logits / generation_config.temperature  # generate's scores: the temperature warper applied

    orig_train = trl_ppo.PPOTrainer.train

    def train(self, *a, **k):
        record.optimizer_steps.append(0)  # TRL fires on_step_end after each PPO step
        inner = self.optimizer.optimizer
        orig_step = inner.step

        def counted_step(*sa, **sk):
            record.optimizer_steps[-1] += 1
            return orig_step(*sa, **sk)

        class Record(TrainerCallback):
            def on_step_end(cb, *ca, **ck):
                record.optimizer_steps.append(0)
                record.weights.append(snapshot(self.model.policy, self.value_model.model, self.value_model.score))

        self.add_callback(Record())
        with mock.patch.object(inner, "step", counted_step), \
                mock.patch.object(trl_ppo.np.random, "permutation", feed.next):
            out = orig_train(self, *a, **k)
        record.optimizer_steps.pop()
        record.history[:] = list(self.state.log_history)
        return out

    with ExitStack() as stack:
        stack.enter_context(mock.patch.object(trl_ppo, "batch_generation", batch_generation))
        stack.enter_context(mock.patch.object(trl_ppo.PPOTrainer, "train", train))
        stack.enter_context(redirect_stdout(io.StringIO()))
        yield record


def run_trl(case: Case, out: str, perms) -> Result:
    from trl.experimental.ppo import PPOConfig, PPOTrainer

    tok = make_tokenizer(V)
    tok.padding_side = "left"
    policy, ref, value, reward = models()
    args = PPOConfig(**common_config(out, **case.config), gradient_checkpointing=False)
    args.total_episodes = case.steps * args.per_device_train_batch_size * args.gradient_accumulation_steps
    with trl_injected(case.eos, perms, Result([], [])) as record:
        PPOTrainer(args=args, processing_class=tok, model=policy, ref_model=ref, reward_model=reward,
                   value_model=value, train_dataset=dataset(case.num_prompts), eval_dataset=dataset(8)).train()
    return record


# ----------------------------------------------------------------------------- ours
@contextmanager
def ours_injected(eos: bool, perms, queries: list[torch.Tensor], record: Result):
    """Patch rlhf_fast's PPOTrainer the same way: TRL's recorded prompt batches, oracle rollouts, the shared
    permutations, and per-step optimizer-step counts and weights into ``record``."""
    from rlhf_fast.trainer import PPOTrainer, ppo_step
    from rlhf_fast.trainer.rollout import Rollout

    feed = PermutationFeed(perms)
    calls = {"step": 0}

    def next_prompts(self):
        q = queries[calls["step"]]
        return q, (q != PAD).long(), torch.zeros(q.shape[0], dtype=torch.long)

    def generate_rollout(model, prompt_ids, prompt_mask, *, response_length, **_):
        resp = oracle_responses(prompt_ids, calls["step"], response_length, eos)
        calls["step"] += 1
        valid = torch.ones_like(resp, dtype=torch.bool)
        if eos:  # our rollout's mask: a prefix up to and including the stop token
            stop = (resp == EOS).long()
            valid = (stop.cumsum(1) - stop) == 0
        return Rollout(torch.cat([prompt_ids, resp], 1), resp, valid, (resp == EOS).any(1), prompt_ids.shape[1])

    def randperm(n, generator=None, **_):
        return torch.as_tensor(feed.next(n))

    orig_step_fn = PPOTrainer.step

    def step(self):
        record.optimizer_steps.append(0)
        inner = self.optimizer.step

        def counted_step(*a, **k):
            record.optimizer_steps[-1] += 1
            return inner(*a, **k)

        with mock.patch.object(self.optimizer, "step", counted_step), \
                mock.patch.object(ppo_step.torch, "randperm", randperm):
            out = orig_step_fn(self)
        record.weights.append(snapshot(self.model.policy, self.model.critic_backbone, self.model.value_head))
        record.history[:] = list(self.state.log_history)
        return out

    with ExitStack() as stack:
        stack.enter_context(mock.patch.object(PPOTrainer, "_next_prompts", next_prompts))
        stack.enter_context(mock.patch.object(PPOTrainer, "step", step))
        stack.enter_context(mock.patch.object(ppo_step, "generate_rollout", generate_rollout))
        stack.enter_context(redirect_stdout(io.StringIO()))
        yield record


def run_ours(case: Case, out: str, perms, queries: list[torch.Tensor]) -> Result:
    from rlhf_fast.trainer import PPOConfig, PPOTrainer

    tok = make_tokenizer(V)
    policy, ref, value, reward = models()
    args = PPOConfig(**{**common_config(out, **case.config), **case.ours})
    args.total_episodes = case.steps * args.per_device_train_batch_size * args.gradient_accumulation_steps
    with ours_injected(case.eos, perms, queries, Result([], [])) as record:
        PPOTrainer(args, tok, policy, ref, reward, dataset(case.num_prompts), value_model=value,
                   eval_dataset=dataset(8)).train()
    return record


# ----------------------------------------------------------------------------- comparisons
METRIC_RTOL, METRIC_ATOL = 1e-4, 1e-8  # atol: metrics that are exactly 0 (KL at step 1) or variances near 0
# Sums of signed per-token k1 terms (ours and TRL's add the same terms in a different order) can cancel to a
# small total whose relative error is large: these get an absolute floor of 1e-6 on top.
SIGNED_SUMS = {"objective/kl", "objective/non_score_reward", "objective/rlhf_reward"}
WEIGHT_RTOL = 1e-5
NOT_COMPARED = {"eps"}  # episodes per second: a timing


def metric_mismatches(trl: Result, ours: Result, steps: int, scale: dict | None = None) -> list[str]:
    """Every metric TRL logged in the first ``steps`` steps that ours does not reproduce (ours x scale[key])."""
    return history_mismatches(trl.history[:steps], ours.history[:steps], NOT_COMPARED, scale)


def history_mismatches(trl_history: list[dict], ours_history: list[dict], skip=(), scale: dict | None = None,
                       rtol: float = METRIC_RTOL, atol: float = METRIC_ATOL) -> list[str]:
    """Every value TRL logged (keys not in ``skip``) that ours does not reproduce, step by step (None: both)."""
    bad = []
    for i, (t, o) in enumerate(zip(trl_history, ours_history)):
        for key, want in t.items():
            if key in skip:
                continue
            if key not in o:
                bad.append(f"step {i + 1}: {key} missing")
                continue
            if want is None or o[key] is None:
                if want is not o[key]:
                    bad.append(f"step {i + 1}: {key} TRL {want} ours {o[key]}")
                continue
            got = float(o[key]) * (scale or {}).get(key, 1.0)
            atol_k = atol + (1e-6 if key in SIGNED_SUMS else 0.0)
            if abs(got - float(want)) > atol_k + rtol * abs(float(want)):
                bad.append(f"step {i + 1}: {key} TRL {float(want):.8g} ours {got:.8g}")
    return bad


# An attention key bias adds q . b_k to every logit of a softmax row, which the softmax ignores: its gradient is
# exactly 0 in exact arithmetic, so what each engine computes is rounding noise, and Adam turns noise into
# steps of +-lr. Those tensors (Qwen2 has them, zero-initialised) are compared to lr-scale noise, not to 1e-5.
NOISE_ONLY = ("k_proj.bias",)


def weight_gap(trl: Result, ours: Result, step: int) -> float:
    """Largest relative difference (max |a - b| / max |a| per tensor) after PPO step ``step`` (1-based), over
    every tensor but the gradient-free attention key biases (see NOISE_ONLY).

    A tensor that started at zero (Qwen2's q/v biases) holds nothing but Adam's normalised steps of about +-lr,
    so "relative to its size" would measure rounding noise against lr: the size of every tensor is floored
    at 100 x lr (a gap of 1e-5 is then 1e-3 of one Adam step for such a tensor)."""
    a, b = trl.weights[step - 1], ours.weights[step - 1]
    assert a.keys() == b.keys()
    lr = max(float(h["lr"]) for h in trl.history[:step]) if trl.history else 0.0
    gaps = []
    for k in a:
        if k.endswith(NOISE_ONLY):
            continue
        gaps.append(float((a[k] - b[k]).abs().max()) / max(float(a[k].abs().max()), 100 * lr, 1e-12))
    return max(gaps)


def state_gap(a: dict, b: dict) -> float:
    """Largest relative difference between two state dicts: max over tensors of max |a - b| / max |a|."""
    assert a.keys() == b.keys(), set(a) ^ set(b)
    return max(float((a[k] - b[k]).abs().max() / a[k].abs().max().clamp_min(1e-12)) for k in a)
