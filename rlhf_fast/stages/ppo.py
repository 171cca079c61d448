"""The PPO stage: ``rlhf-fast ppo --config FILE`` runs ``run_ppo_stage`` (``train_ppo`` in Python).

The policy comes from a finished SFT directory (``sft_model_path``), the reward model from a finished RM
directory (``reward_model_path``), prompts from ``dataset`` (a .jsonl/.json/.parquet file with a
``prompt`` column, or "demo": opening words of the demo corpus' paragraphs). PPO itself is
``rlhf_fast.trainer.PPOTrainer``; it writes its checkpoints and metrics under ``output_dir``, and the
final policy becomes a finished stage directory ``output_dir/model``.
"""
from __future__ import annotations

from pathlib import Path

import torch

from rlhf_fast.stages.base import DEMO, print_stage_summary
from rlhf_fast.stages.data import load_rows
from rlhf_fast.stages.io import StageDirectory, load_reward_model, require_finished_stage

__all__ = ["ppo_prompt_rows", "train_ppo", "run_ppo_stage"]


def ppo_prompt_rows(source, tokenizer, split: str = "train") -> list[dict]:
    """Prompt rows ``{"prompt": str, "input_ids": [...]}`` from a file / rows / "demo" (opening words of
    train or held-out paragraphs). Errors name the file and line (rlhf_fast.stages.data)."""
    if isinstance(source, str) and source == DEMO:
        from rlhf_fast.stages.demo_data import demo_corpus, prompts_from_paragraphs

        corpus = demo_corpus()
        texts = prompts_from_paragraphs(corpus.train if split == "train" else corpus.heldout)
    else:
        rows = load_rows(source, name="ppo dataset")
        texts = []
        for row, where in zip(rows.rows, rows.locations):
            if "prompt" not in row or not isinstance(row["prompt"], str) or not row["prompt"].strip():
                raise ValueError(f"{where}: a PPO prompt row needs a non-empty 'prompt' string, got keys {sorted(row)}")
            texts.append(row["prompt"])
    if not texts:
        raise ValueError(f"no prompts found in {source!r}")
    ids = tokenizer(texts)["input_ids"]
    return [{"prompt": t, "input_ids": i} for t, i in zip(texts, ids)]


def train_ppo(cfg, callbacks=None, train_rows=None, eval_rows=None, on_trainer=None):
    """Train PPO (``cfg``: a ``PPOConfig``) from finished SFT and RM stage directories; returns (trainer,
    final stage dir). callbacks: transformers ``TrainerCallback``s; train_rows / eval_rows: prompt rows
    (``ppo_prompt_rows``) instead of ``cfg.dataset`` / ``cfg.eval_dataset``; on_trainer: optional function
    called with the PPOTrainer before training (e.g. to watch rollouts)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rlhf_fast.models import ensure_pad_token
    from rlhf_fast.trainer import PPOTrainer

    require_finished_stage(cfg.sft_model_path, what="ppo sft_model_path")
    final_dir = Path(cfg.output_dir) / "model"
    stage = StageDirectory(final_dir, stage="ppo")  # refuse a bad output dir before training
    tokenizer = ensure_pad_token(AutoTokenizer.from_pretrained(cfg.sft_model_path))
    policy = AutoModelForCausalLM.from_pretrained(cfg.sft_model_path, dtype=torch.float32)
    reward, _ = load_reward_model(cfg.reward_model_path, tokenizer=tokenizer)
    train_rows = train_rows if train_rows is not None else ppo_prompt_rows(cfg.dataset, tokenizer, "train")
    if eval_rows is None and cfg.eval_dataset:
        eval_rows = ppo_prompt_rows(cfg.eval_dataset, tokenizer, "heldout")
    trainer = PPOTrainer(cfg, tokenizer, policy, None, reward, train_rows, eval_dataset=eval_rows,
                         callbacks=callbacks)
    if on_trainer is not None:
        on_trainer(trainer)
    trainer.train()
    last = trainer.state.log_history[-1] if trainer.state.log_history else {}
    summary = {k: last[k] for k in ("objective/scores", "objective/kl", "objective/rlhf_reward") if k in last}
    summary.update(steps=trainer.state.global_step, episodes=trainer.state.episode)
    with stage as d:
        d.finish(trainer.model.policy, tokenizer, summary)
    return trainer, final_dir


def run_ppo_stage(cfg) -> int:
    """The ``rlhf-fast ppo`` command body: train, then print the output directory and the last metrics line."""
    trainer, final_dir = train_ppo(cfg)
    return print_stage_summary("ppo", final_dir, trainer.state.log_history[-1] if trainer.state.log_history else {})
