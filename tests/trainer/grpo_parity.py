"""Run trl==1.16.0's own GRPOTrainer and loss code beside ours on identical inputs.

TRL 1.16 lives in its own cached environment (benchmarks/.venv-trl-current, built by
``benchmarks.bench_grpo.ensure_trl_venv``: trl==1.16.0 on top of this venv's CPU torch and transformers), so
its side runs in a subprocess (``tests/trainer/_trl_grpo_worker.py``) that writes what it computed to a file.
This module is imported on both sides: it holds the shared pieces (tiny models saved to a directory, the
datasets, the reward functions, the completion oracle, the cases) and imports rlhf_fast only in
``run_ours``.

- Loss parity: random log-probs, entropies, masks and advantages are saved; TRL's ``GRPOTrainer._compute_loss``
  runs on them with a stub ``self`` whose ``_get_per_token_logps_and_entropies`` returns those tensors (a leaf
  requiring grad), so the loss, its gradient and the metrics are TRL's own code; ours is
  ``rlhf_fast.trainer.grpo_step.grpo_loss`` on the same tensors.
- End to end: both trainers train the same tiny Llama from the same directory on the same data. Sampling
  differs between the engines (HF generate against our decoder), so both take their completions from one
  deterministic oracle (a hash of the prompt tokens, the row's place in its group and the generation round):
  TRL's ``_generate_single_turn`` and our ``ppo_step.generate_rollout`` are patched to return them. TRL's
  prompt batches and row shuffles are recorded and replayed to ours. Everything else is each engine's own code.
"""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from tests.trainer.tiny import EOS, make_tokenizer, tiny_classifier, tiny_policy
from tests.trainer.trl_parity import history_mismatches
from tests.trainer.trl_parity import state_gap as weight_gap  # noqa: F401 - the tests compare weights with it

V = 32
ROOT = Path(__file__).resolve().parents[2]
WORKER = Path(__file__).resolve().parent / "_trl_grpo_worker.py"
CHAT_TEMPLATE = ("{% for m in messages %}{% if m['role'] == 'user' %}t3 {% else %}t4 {% endif %}{{ m['content'] }} "
                 "{% endfor %}{% if add_generation_prompt %}t4{% endif %}")


# ----------------------------------------------------------------------------- the shared pieces
def build_models(directory: str) -> dict:
    """Save the tiny policy (with a chat template on its tokenizer) and a tiny reward model; return paths."""
    policy_dir, rm_dir = os.path.join(directory, "policy"), os.path.join(directory, "rm")
    if not os.path.isfile(os.path.join(rm_dir, "config.json")):
        tok = make_tokenizer(V)
        tok.chat_template = CHAT_TEMPLATE
        tiny_policy(V, seed=0).save_pretrained(policy_dir)
        tok.save_pretrained(policy_dir)
        tiny_classifier(V, seed=23).save_pretrained(rm_dir)
        tok.save_pretrained(rm_dir)
    return {"policy": policy_dir, "rm": rm_dir}


def dataset_rows(n: int, chat: bool) -> list[dict]:
    """Prompts of 2-5 words t3..t31 and a ``bonus`` column (negative: the callable reward returns None)."""
    g = torch.Generator().manual_seed(7)
    rows = []
    for i in range(n):
        words = " ".join(f"t{int(t)}" for t in torch.randint(3, V, (int(torch.randint(2, 6, (1,), generator=g)),),
                                                             generator=g))
        prompt = [{"role": "user", "content": words}] if chat else words
        rows.append({"prompt": prompt, "bonus": -1.0 if i % 5 == 3 else round(0.1 * (i % 4), 2)})
    return rows


def count_t5(prompts, completions, completion_ids, trainer_state, bonus, **kwargs):
    """Share of completion tokens equal to t5, plus the row's bonus column; None where bonus < 0."""
    assert trainer_state is not None and len(prompts) == len(completions) == len(completion_ids)
    out = []
    for c, ids, b in zip(completions, completion_ids, bonus):
        text = c if isinstance(c, str) else c[0]["content"]
        out.append(None if b < 0 else text.split().count("t5") / max(len(ids), 1) + b)
    return out


def prompt_key(prompt) -> str:
    return json.dumps(prompt, sort_keys=True)


def _digest(*parts) -> int:
    return int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:8], "little")


def oracle_completions(prompt_ids: list[list[int]], num_generations: int, round_index: int, max_len: int,
                       eos_share: float) -> list[list[int]]:
    """Completion token lists: tokens t3..t31 from a hash of (prompt, place in the group, round); about
    ``eos_share`` of them stop with EOS after 1..max_len-1 tokens, the rest run to max_len without EOS."""
    out = []
    for r, ids in enumerate(prompt_ids):
        key = (tuple(ids), r % num_generations, round_index)
        stops = _digest(key, "stop") % 1000 < eos_share * 1000
        length = 1 + _digest(key, "len") % (max_len - 1) if stops else max_len
        toks = [3 + _digest(key, i) % (V - 3) for i in range(length)]
        if stops:
            toks[-1] = EOS
        out.append(toks)
    return out


@dataclass(frozen=True)
class Case:
    """One end-to-end regime: the GRPOConfig fields both sides share, the data and the reward functions."""

    name: str
    config: dict = field(default_factory=dict, hash=False)
    chat: bool = False
    reward_model: bool = False
    eos_share: float = 0.6
    num_prompts: int = 16
    steps: int = 3


def config_fields(case: Case, out: str) -> dict:
    cfg = dict(output_dir=out, use_cpu=True, bf16=False, per_device_train_batch_size=8, num_generations=4,
               max_completion_length=6, learning_rate=3e-3, logging_steps=1, save_strategy="no", report_to="none",
               seed=3, disable_tqdm=True, max_steps=case.steps)
    cfg.update(case.config)
    return cfg


CASES = {
    # TRL's defaults (dapo, beta 0, group scaling, one generation per step) on text prompts
    "defaults": Case("defaults"),
    # chat prompts, a reward model beside the callable (weighted), grpo loss, KL with a reference, GSPO's
    # sequence-level ratio, clip-higher, batch scaling
    "chat-kl-gspo": Case("chat-kl-gspo", dict(loss_type="grpo", beta=0.1, importance_sampling_level="sequence",
                                              epsilon_high=0.28, scale_rewards="batch", reward_weights=[1.0, 0.5]),
                         chat=True, reward_model=True),
    # gradient accumulation 2, two micro-batches per generation, two passes: old log-probs, real clipping
    "multi-step": Case("multi-step", dict(per_device_train_batch_size=4, gradient_accumulation_steps=2,
                                          num_iterations=2, loss_type="dr_grpo", beta=0.05, delta=1.5,
                                          mask_truncated_completions=True, learning_rate=3e-2), steps=4),
    # a generation per micro-batch (steps_per_generation 1 < gradient_accumulation_steps 2): dapo's normaliser per
    # generation, two generations per optimizer step
    "generation-per-micro-batch": Case("generation-per-micro-batch", dict(
        per_device_train_batch_size=4, gradient_accumulation_steps=2, steps_per_generation=1, beta=0.02)),
}


# ----------------------------------------------------------------------------- loss-level cases
LOSS_CASES = {
    f"{t}-{level}": dict(loss_type=t, importance_sampling_level=level, beta=0.04, epsilon=0.2,
                         epsilon_high=5.0 if t == "cispo" else 0.28, delta=1.6 if t in ("grpo", "dapo") else None)
    for t in ("grpo", "dr_grpo", "bnpo", "dapo", "cispo", "sapo", "luspo") for level in ("token", "sequence")
}
LOSS_CASES["dapo-entropy"] = dict(loss_type="dapo", importance_sampling_level="token", beta=0.0, epsilon=0.2,
                                  epsilon_high=0.2, delta=None, top_entropy_quantile=0.4, entropy_coef=0.01)
LOSS_CASES["grpo-no-bias-kl"] = dict(loss_type="grpo", importance_sampling_level="token", beta=0.1, epsilon=0.2,
                                     epsilon_high=0.2, delta=None, use_bias_correction_kl=False)


def loss_tensors(seed: int = 0) -> dict:
    """B=6 completions of up to T=7 tokens (one empty), log-probs off the old ones by up to ~0.6 so every clip
    branch is taken, mixed-sign advantages (one 0)."""
    g = torch.Generator().manual_seed(seed)
    B, T = 6, 7
    lengths = torch.tensor([7, 5, 1, 0, 6, 3])
    mask = (torch.arange(T) < lengths.unsqueeze(1)).long()
    old = -torch.rand(B, T, generator=g) * 3 - 0.1
    return {"logps": old + (torch.rand(B, T, generator=g) - 0.5) * 1.2, "old": old,
            "ref": old + (torch.rand(B, T, generator=g) - 0.5) * 0.4, "entropy": torch.rand(B, T, generator=g) * 3,
            "mask": mask, "advantages": torch.tensor([1.2, -0.7, 0.4, 0.9, -1.5, 0.0])}


# ----------------------------------------------------------------------------- running TRL 1.16
def trl_python() -> str:
    """The TRL 1.16 interpreter (built on first use, ~20 s); a failure names the fix, never a silent skip."""
    from benchmarks.bench_grpo import TRL_CURRENT, TRL_VENV, ensure_trl_venv

    python = ensure_trl_venv()
    if python is None:
        raise AssertionError(f"the GRPO parity tests need trl=={TRL_CURRENT} in {TRL_VENV} and could not build it: "
                             "run `python -c 'from benchmarks.bench_grpo import ensure_trl_venv; ensure_trl_venv()'` "
                             "and read its error (it needs pip access to PyPI or a local index)")
    return python


def run_trl(work: str) -> dict:
    """Run the worker once under trl 1.16 (every loss case and every end-to-end case); return its results."""
    models = build_models(os.path.join(work, "models"))
    spec = {"work": work, "models": models, "loss_cases": LOSS_CASES,
            "cases": {k: asdict(c) for k, c in CASES.items()}}
    Path(work, "spec.json").write_text(json.dumps(spec))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "TRL_EXPERIMENTAL_SILENCE": "1",
           "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run([trl_python(), str(WORKER), os.path.join(work, "spec.json")], capture_output=True, text=True,
                          env=env, cwd=str(ROOT), timeout=900)
    if proc.returncode != 0:
        raise AssertionError(f"the trl 1.16 worker failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    return torch.load(os.path.join(work, "trl_results.pt"), weights_only=False)


def new_workdir() -> str:
    return tempfile.mkdtemp(prefix="grpo-parity-")


# ----------------------------------------------------------------------------- ours
def run_ours(case: Case, work: str, trl_record: dict, **ours) -> dict:
    """Our GRPOTrainer on the case, replaying TRL's prompt batches and row shuffles with the oracle's
    completions. Returns {"history", "weights"} like the worker's record."""
    from unittest import mock

    from datasets import Dataset

    from rlhf_fast import GRPOConfig, GRPOTrainer
    from rlhf_fast.trainer import ppo_step
    from rlhf_fast.trainer.rollout import Rollout

    models = build_models(os.path.join(work, "models"))
    rows = dataset_rows(case.num_prompts, case.chat)
    index = {prompt_key(r["prompt"]): i for i, r in enumerate(rows)}
    G = config_fields(case, "")["num_generations"]
    batches = [torch.tensor([index[prompt_key(p)] for p in prompts[::G]]) for prompts in trl_record["prompts"]]
    perms = list(trl_record["perms"])
    rounds = {"n": 0}

    def generate_rollout(model, prompt_ids, prompt_mask, *, response_length, pad_token_id, **_):
        lists = [ids[m.bool()].tolist() for ids, m in zip(prompt_ids, prompt_mask)]
        comps = oracle_completions(lists, G, rounds["n"], response_length, case.eos_share)
        rounds["n"] += 1
        R = max(len(c) for c in comps)
        resp = torch.full((len(comps), R), pad_token_id, dtype=torch.long)
        for i, c in enumerate(comps):
            resp[i, :len(c)] = torch.tensor(c)
        valid = torch.arange(R).unsqueeze(0) < torch.tensor([len(c) for c in comps]).unsqueeze(1)
        return Rollout(torch.cat([prompt_ids, resp], 1), resp, valid, (resp == EOS).any(1), prompt_ids.shape[1])

    args = GRPOConfig(**config_fields(case, os.path.join(work, f"ours-{case.name}")), **ours)
    funcs = [count_t5] + ([models["rm"]] if case.reward_model else [])
    record = {"weights": []}
    from transformers import TrainerCallback

    class Snapshot(TrainerCallback):
        def on_step_end(self, a, state, control, **kw):
            record["weights"].append({k: v.detach().clone() for k, v in trainer.model.policy.state_dict().items()})

    trainer = GRPOTrainer(models["policy"], funcs, args=args, train_dataset=Dataset.from_list(rows),
                          callbacks=[Snapshot()])
    feed = iter(batches)
    with mock.patch.object(ppo_step, "generate_rollout", generate_rollout), \
            mock.patch.object(trainer.sampler, "next_batch", lambda: (next(feed), 0)), \
            mock.patch.object(trainer, "_shuffle", lambda n: perms.pop(0)):
        trainer.train()
    record["history"] = [h for h in trainer.state.log_history if "train_runtime" not in h]
    record["trainer"] = trainer
    return record


# ----------------------------------------------------------------------------- comparisons
METRIC_RTOL, METRIC_ATOL = 1e-4, 1e-6
NOT_COMPARED = {"step_time"}  # a timing


def metric_mismatches(trl_history: list[dict], ours_history: list[dict]) -> list[str]:
    return history_mismatches(trl_history, ours_history, NOT_COMPARED, rtol=METRIC_RTOL, atol=METRIC_ATOL)


def run_ours_loss(name: str) -> dict:
    """Our grpo_loss on the saved tensors for a LOSS_CASES entry: loss, d loss / d logps and the metrics."""
    from types import SimpleNamespace

    from rlhf_fast.trainer.grpo_step import grpo_loss, loss_spec

    c = {"top_entropy_quantile": 1.0, "entropy_coef": 0.0, "use_bias_correction_kl": True, **LOSS_CASES[name]}
    t = loss_tensors()
    args = SimpleNamespace(max_completion_length=t["mask"].shape[1], sapo_temperature_pos=1.0,
                           sapo_temperature_neg=1.05, **{k: c[k] for k in ("loss_type", "epsilon", "epsilon_high",
                                                                           "delta", "importance_sampling_level")})
    spec = loss_spec(args)
    lp = t["logps"].clone().requires_grad_(True)
    m = t["mask"].bool()
    total, reported, stats = grpo_loss(
        lp, t["entropy"], m, t["advantages"], t["old"], t["ref"], spec=spec,
        num_tokens=m.sum().float().reshape(1), num_seqs=torch.tensor([float(m.shape[0])]), beta=c["beta"],
        bias_correction_kl=c["use_bias_correction_kl"], top_entropy_quantile=c["top_entropy_quantile"],
        entropy_coef=c["entropy_coef"])
    total.backward()
    return {"loss": float(reported), "grad": lp.grad.clone(), "metrics": {k: float(v) for k, v in stats.items()}}


if __name__ == "__main__":  # pragma: no cover - manual: print the TRL side's loss results
    print(run_trl(new_workdir())["losses"], file=sys.stderr)
