"""The whole RLHF pipeline (SFT -> reward model -> PPO) on one config file, with the demo's gold judge.

``rlhf-fast pipeline --config configs/demo.yaml`` (= ``make demo``) runs the embedded default with no
network: SFT on pydoc text -> pairs sampled from the SFT model and labelled by the pinned gold judge
(rlhf_fast.stages.demo_data) -> reward model on those noisy labels -> PPO against the learned reward with a
KL penalty -> samples on held-out prompts before and after PPO, judged by the gold judge that PPO never
saw. Everything lands in ``runs/demo/`` (``summary.json``, ``report.md``, plots, samples, metrics).
This module orchestrates the stages (``sft``, ``reward``, ``ppo``); it is the one that calls them.
"""
from __future__ import annotations

import json
import math
import random
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from rlhf_fast.stages.demo_data import (
    demo_corpus,
    distinct_n,
    gold_prefers,
    gold_reward,
    preference_label,
    prompts_from_paragraphs,
)

__all__ = [
    "PipelineConfig", "GoldTracker", "run_pipeline", "split_overrides", "sample_texts", "preference_pairs",
    "pair_prompt_count",
]


# ============================================================================ sampling for evaluation
@torch.no_grad()
def sample_texts(model, tokenizer, prompts: list[str], *, max_new_tokens: int, temperature: float, seed: int,
                 batch_size: int = 64) -> list[str]:
    """One sampled completion per prompt (counter-based seeds per prompt index: reproducible)."""
    from rlhf_fast.trainer import left_pad
    from rlhf_fast.trainer.rollout import generate, prompt_seeds

    model.eval()
    ids = tokenizer(prompts)["input_ids"]
    out = []
    stop = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    for s in range(0, len(ids), batch_size):
        chunk = ids[s:s + batch_size]
        p, m = left_pad(chunk, tokenizer.pad_token_id)
        seeds = prompt_seeds(seed, torch.arange(s, s + len(chunk)))
        ro = generate(model, p, m, max_new_tokens, pad_token_id=tokenizer.pad_token_id, temperature=temperature,
                      stop_token_ids=stop, seeds=seeds)
        out += tokenizer.batch_decode([r[mk] for r, mk in zip(ro.responses, ro.response_mask)],
                                      skip_special_tokens=True)
    return out


def preference_pairs(model, tokenizer, prompts: list[str], *, max_new_tokens: int, temperature: float, seed: int,
                     noisy: bool, samples_per_prompt: int = 2) -> list[dict]:
    """Preference rows from ``samples_per_prompt`` (k >= 2) samples per prompt of ``model``: every one of
    the k·(k−1)/2 pairs of a prompt's samples, ordered by the gold judge (noisy: labels drawn with
    P = sigmoid(5·Δgold), one independent draw per pair; else the noiseless preference, ties dropped).
    Identical or empty pairs are dropped.

    Each pair is two independent samples for the same prompt whatever k is, so k only changes how many
    labelled pairs one batch of samples yields, not the distribution of a pair.
    """
    if samples_per_prompt < 2:
        raise ValueError(f"samples_per_prompt must be >= 2 (a pair needs two samples), got {samples_per_prompt}")
    # sample j of every prompt uses its own seed stream; j = 0, 1 are the streams of the two-sample version
    samples = [sample_texts(model, tokenizer, prompts, max_new_tokens=max_new_tokens, temperature=temperature,
                            seed=seed + 7919 * j) for j in range(samples_per_prompt)]
    rng = random.Random(seed)
    rows = []
    for i, p in enumerate(prompts):
        for j in range(samples_per_prompt):
            for k in range(j + 1, samples_per_prompt):
                x, y = samples[j][i], samples[k][i]
                if x == y or not x.strip() or not y.strip():  # identical or empty (immediate EOS): no preference
                    continue
                if not noisy and gold_reward(x) == gold_reward(y):  # a tie has no noiseless preference to agree with
                    continue
                first = preference_label(x, y, rng) if noisy else gold_prefers(x, y)
                rows.append({"prompt": p, "chosen": x if first else y, "rejected": y if first else x})
    return rows


def pair_prompt_count(num_pairs: int, samples_per_prompt: int) -> int:
    """Prompts to sample so that k samples each give at least ``num_pairs`` pairs (before dropped ones)."""
    per_prompt = samples_per_prompt * (samples_per_prompt - 1) // 2
    return math.ceil(num_pairs / per_prompt)


# ============================================================================ the pipeline
@dataclass
class PipelineConfig:
    """Settings of ``rlhf-fast pipeline`` (YAML section ``pipeline:``)."""

    output_dir: str = field(default="runs/demo", metadata={"help": "Where every stage and the report go."})
    num_train_pairs: int = field(default=4000, metadata={"help": "RM training pairs (noisy labels), before identical or empty ones are dropped."})
    num_heldout_pairs: int = field(default=200, metadata={"help": "Held-out pairs for RM accuracy (noiseless labels)."})
    pair_samples_per_prompt: int = field(default=2, metadata={"help": "k SFT samples per pair prompt; all k(k-1)/2 pairs of a prompt are labelled (train and held-out alike)."})
    pair_max_new_tokens: int = field(default=48, metadata={"help": "Tokens per sampled response."})
    pair_temperature: float = field(default=1.0, metadata={"help": "Sampling temperature for pairs and evaluation."})
    num_eval_prompts: int = field(default=200, metadata={"help": "Held-out prompts sampled before and after PPO."})
    seed: int = 0
    reuse_finished_stages: bool = field(default=False, metadata={"help": "Skip a stage whose directory is finished."})

    def __post_init__(self):
        if self.pair_samples_per_prompt < 2:
            raise ValueError(f"pair_samples_per_prompt must be >= 2 (a pair needs two samples), "
                             f"got {self.pair_samples_per_prompt}")


class GoldTracker:
    """TrainerCallback factory: gold reward of each PPO step's own samples (never fed to PPO)."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.trainer = None
        self.rows: list[dict] = []

    def callback(self):
        from transformers import TrainerCallback

        tracker = self

        class _Gold(TrainerCallback):
            def on_step_end(self, args, state, control, **kw):
                tr = tracker.trainer
                ro = getattr(tr, "_last_rollout", None) if tr is not None else None
                if ro is None:
                    return control
                texts = tracker.tokenizer.batch_decode([r[m] for r, m in zip(ro.responses, ro.response_mask)],
                                                       skip_special_tokens=True)
                last = state.log_history[-1] if state.log_history and state.log_history[-1].get("step") == \
                    state.global_step else {}
                tracker.rows.append({"step": state.global_step, "gold_reward": statistics.fmean(map(gold_reward, texts)),
                                     "proxy_reward": last.get("objective/scores"), "kl": last.get("objective/kl")})
                return control

        return _Gold()


def _stage_configs(config_path, overrides: dict[str, list[str]]):
    from rlhf_fast.stages.config import load_stage_config
    from rlhf_fast.stages.reward import RewardConfig
    from rlhf_fast.stages.sft import SFTConfig
    from rlhf_fast.trainer import PPOConfig

    with_pipe = config_path is not None and _has_section(config_path, "pipeline")
    pipe = load_stage_config(PipelineConfig, config_path if with_pipe else None, "pipeline" if with_pipe else None,
                             overrides.get("pipeline", []))
    out = Path(pipe.output_dir)
    # The stages live under the pipeline's output_dir and feed each other: these paths override the
    # stage sections of the YAML (which name them for standalone use); a user override still wins.
    sft = load_stage_config(SFTConfig, config_path, "sft", [f"output_dir={out / 'sft'}", *overrides.get("sft", [])])
    rm = load_stage_config(RewardConfig, config_path, "rm", [f"output_dir={out / 'rm'}", f"model_name_or_path={out / 'sft'}",
                                                            *overrides.get("rm", [])])
    ppo = load_stage_config(PPOConfig, config_path, "ppo", [f"output_dir={out / 'ppo'}", f"sft_model_path={out / 'sft'}",
                                                           f"reward_model_path={out / 'rm'}", *overrides.get("ppo", [])])
    return pipe, sft, rm, ppo


def _has_section(path, section) -> bool:
    import yaml

    with open(path, encoding="utf-8") as f:
        data = yaml.safe_load(f) or {}
    return isinstance(data, dict) and section in data


def split_overrides(items: list[str]) -> dict[str, list[str]]:
    """``sft.learning_rate=1e-3 ppo.kl_coef=0.1`` -> {"sft": [...], "ppo": [...]}; a key must name its stage."""
    out: dict[str, list[str]] = {}
    for item in items:
        key = item.split("=", 1)[0]
        if "." not in key or "=" not in item:
            raise ValueError(f"pipeline override {item!r} must look like stage.key=value with stage in "
                             "pipeline, sft, rm, ppo (e.g. ppo.kl_coef=0.1)")
        stage, rest = item.split(".", 1)
        if stage not in ("pipeline", "sft", "rm", "ppo"):
            raise ValueError(f"pipeline override {item!r}: unknown stage {stage!r}; use pipeline, sft, rm or ppo")
        out.setdefault(stage, []).append(rest)
    return out


def run_pipeline(config_path=None, overrides: list[str] | None = None) -> dict:
    """SFT -> RM (on SFT samples labelled by the gold judge) -> PPO -> report. Returns summary.json's dict."""
    from rlhf_fast.stages.io import is_finished_stage
    from rlhf_fast.stages.ppo import train_ppo
    from rlhf_fast.stages.report import make_plots, write_report
    from rlhf_fast.stages.reward import train_reward_model
    from rlhf_fast.stages.sft import train_sft

    t0 = time.time()
    pipe, sft_cfg, rm_cfg, ppo_cfg = _stage_configs(config_path, split_overrides(overrides or []))
    out = Path(pipe.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    corpus = demo_corpus()
    rng = random.Random(pipe.seed)
    train_prompts = prompts_from_paragraphs(corpus.train)
    heldout_prompts = prompts_from_paragraphs(corpus.heldout)
    timings = {}

    # ---- 1. SFT
    t = time.time()
    print("[pipeline] 1/4 SFT", flush=True)
    if not (pipe.reuse_finished_stages and is_finished_stage(sft_cfg.output_dir)):
        train_sft(sft_cfg)
    timings["sft_seconds"] = time.time() - t
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(sft_cfg.output_dir)
    sft_model = AutoModelForCausalLM.from_pretrained(sft_cfg.output_dir, dtype=torch.float32)

    # ---- 2. preference pairs sampled from the SFT model, judged by the gold judge
    t = time.time()
    print("[pipeline] 2/4 sampling preference pairs from the SFT model", flush=True)
    k = pipe.pair_samples_per_prompt
    pair_prompts = [rng.choice(train_prompts) for _ in range(pair_prompt_count(pipe.num_train_pairs, k))]
    train_pairs = preference_pairs(sft_model, tokenizer, pair_prompts, max_new_tokens=pipe.pair_max_new_tokens,
                                   temperature=pipe.pair_temperature, seed=pipe.seed + 1, noisy=True,
                                   samples_per_prompt=k)
    # held-out pairs are sampled exactly as the training pairs (k per prompt), from held-out paragraphs
    held_prompts = [heldout_prompts[i % len(heldout_prompts)]
                    for i in range(pair_prompt_count(pipe.num_heldout_pairs, k))]
    heldout_pairs = preference_pairs(sft_model, tokenizer, held_prompts, max_new_tokens=pipe.pair_max_new_tokens,
                                     temperature=pipe.pair_temperature, seed=pipe.seed + 2, noisy=False,
                                     samples_per_prompt=k)
    _write_jsonl(out / "preference_pairs_train.jsonl", train_pairs)
    _write_jsonl(out / "preference_pairs_heldout.jsonl", heldout_pairs)
    timings["pairs_seconds"] = time.time() - t

    # ---- 3. reward model
    t = time.time()
    print(f"[pipeline] 3/4 reward model on {len(train_pairs)} noisy pairs", flush=True)
    if not (pipe.reuse_finished_stages and is_finished_stage(rm_cfg.output_dir)):
        rm_result = train_reward_model(rm_cfg, train_dataset=train_pairs, eval_dataset=heldout_pairs)
        rm_metrics = rm_result.metrics
    else:
        rm_metrics = json.loads((Path(rm_cfg.output_dir) / "COMPLETE").read_text())
    rm_acc = float(rm_metrics.get("final_eval_accuracy", float("nan")))
    timings["rm_seconds"] = time.time() - t
    # the RM stage's held-out accuracy is on heldout_pairs, whose labels are the noiseless gold preference

    # ---- 4. PPO against the learned reward model
    t = time.time()
    print("[pipeline] 4/4 PPO against the learned reward model", flush=True)
    tracker = GoldTracker(tokenizer)
    train_rows = [{"prompt": p, "input_ids": i} for p, i in zip(train_prompts, tokenizer(train_prompts)["input_ids"])]
    trainer, ppo_dir = train_ppo(ppo_cfg, callbacks=[tracker.callback()], train_rows=train_rows,
                                     on_trainer=lambda tr: setattr(tracker, "trainer", tr))
    timings["ppo_seconds"] = time.time() - t

    # ---- evaluation on held-out prompts, same seeds before and after
    eval_prompts = [heldout_prompts[i % len(heldout_prompts)] for i in range(pipe.num_eval_prompts)]
    kw = dict(max_new_tokens=pipe.pair_max_new_tokens, temperature=pipe.pair_temperature, seed=pipe.seed + 3)
    sft_samples = sample_texts(sft_model, tokenizer, eval_prompts, **kw)
    ppo_samples = sample_texts(trainer.model.policy, tokenizer, eval_prompts, **kw)
    _write_jsonl(out / "samples_sft.jsonl", [{"prompt": p, "response": r} for p, r in zip(eval_prompts, sft_samples)])
    _write_jsonl(out / "samples_ppo.jsonl", [{"prompt": p, "response": r} for p, r in zip(eval_prompts, ppo_samples)])
    g_sft = [gold_reward(x) for x in sft_samples]
    g_ppo = [gold_reward(x) for x in ppo_samples]
    history = trainer.state.log_history
    summary = {
        "gold_reward_sft": statistics.fmean(g_sft),
        "gold_reward_ppo": statistics.fmean(g_ppo),
        "gold_reward_sft_std": statistics.stdev(g_sft) if len(g_sft) > 1 else 0.0,
        "gold_reward_ppo_std": statistics.stdev(g_ppo) if len(g_ppo) > 1 else 0.0,
        "rm_heldout_accuracy": rm_acc,
        "rm_train_pairs": len(train_pairs),
        "rm_heldout_pairs": len(heldout_pairs),
        "final_kl": history[-1]["objective/kl"] if history else float("nan"),
        "final_proxy_reward": history[-1]["objective/scores"] if history else float("nan"),
        "distinct2_sft": distinct_n(sft_samples, 2),
        "distinct2_ppo": distinct_n(ppo_samples, 2),
        "ppo_steps": trainer.state.global_step,
        **{k: round(v, 2) for k, v in timings.items()},
        "wall_seconds": time.time() - t0,
    }
    summary["targets"] = {
        "wall_seconds <= 600": summary["wall_seconds"] <= 600,
        "rm_heldout_accuracy >= 0.75": rm_acc >= 0.75,
        "gold gain >= 0.5 * sft std": summary["gold_reward_ppo"] - summary["gold_reward_sft"]
        >= 0.5 * summary["gold_reward_sft_std"],
        "distinct2_ppo >= 0.8 * distinct2_sft": summary["distinct2_ppo"] >= 0.8 * summary["distinct2_sft"],
    }
    _write_jsonl(out / "ppo_gold.jsonl", tracker.rows)
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    plots = make_plots(out, tracker.rows, rm_cfg.output_dir)
    write_report(out, summary, plots, eval_prompts, sft_samples, ppo_samples, g_sft, g_ppo)
    print(json.dumps(summary, indent=2))
    return summary


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
