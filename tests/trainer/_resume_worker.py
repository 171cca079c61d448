"""Worker for the resume tests: one PPO run per process, weights and metrics written to disk.

    python -m tests.trainer._resume_worker OUT_DIR MODE [--stop-after N] [--strategy ddp|fsdp2] [--estimator grpo]
MODE: straight (train all steps) | first (stop after --stop-after steps, checkpoints every step) |
resume (train(resume_from_checkpoint=True)). Under torchrun the process group comes from the env.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch
from transformers import TrainerCallback

from rlhf_fast.trainer import PPOConfig, PPOTrainer
from rlhf_fast.trainer.distributed import init_from_env
from tests.trainer.tiny import count_token_reward, make_tokenizer, prompt_rows, tiny_classifier, tiny_policy

V = 32
VOLATILE = ("eps", "time/", "tokens_per_second")


class StopAfter(TrainerCallback):
    def __init__(self, n):
        self.n = n

    def on_step_end(self, args, state, control, **kw):
        if state.global_step >= self.n:
            control.should_training_stop = True
        return control


def build(out: Path, strategy: str = "ddp", world_size: int = 1, global_batch: int = 8, total_steps: int = 4,
          callbacks=None, num_mini_batches: int = 2, reward: str = "callable", estimator: str = "gae") -> PPOTrainer:
    # gae: adaptive KL and running reward normalisation carry state across a resume. grpo: the batch
    # counts completions (global_batch of them: global_batch / 4 prompts x 4 generations), fixed KL, raw scores.
    algo = dict(kl_controller="adaptive", reward_norm=True) if estimator == "gae" else \
        dict(advantage_estimator=estimator, num_generations=4)
    args = PPOConfig(
        output_dir=str(out), use_cpu=True, bf16=False, per_device_train_batch_size=global_batch // (2 * world_size),
        gradient_accumulation_steps=2, num_mini_batches=num_mini_batches, num_ppo_epochs=2, total_episodes=global_batch * total_steps,
        response_length=6, learning_rate=5e-3, logging_steps=1, save_strategy="steps", save_steps=1,
        report_to="none", num_sample_generations=0, kl_coef=0.05, temperature=1.0,
        disable_tqdm=True, gradient_checkpointing=False, seed=11, distributed_strategy=strategy, **algo,
    )
    reward_fn = count_token_reward("t5") if reward == "callable" else tiny_classifier(V, layers=2)
    return PPOTrainer(args, make_tokenizer(V), tiny_policy(V, layers=2), None, reward_fn,
                      prompt_rows(32, V), callbacks=callbacks)


def clean_history(history):
    return [{k: v for k, v in h.items() if not k.startswith(VOLATILE)} for h in history]


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("mode", choices=["straight", "first", "resume"])
    ap.add_argument("--stop-after", type=int, default=2)
    ap.add_argument("--strategy", default="ddp")
    ap.add_argument("--global-batch", type=int, default=8)
    ap.add_argument("--mini", type=int, default=2, help="num_mini_batches")
    ap.add_argument("--reward", choices=["callable", "model"], default="callable",
                    help="a Python callable or a sequence-classification reward model")
    ap.add_argument("--estimator", default="gae", help="advantage_estimator (grpo: 4 generations per prompt)")
    a = ap.parse_args(argv)
    init_from_env()
    world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
    out = Path(a.out)
    cbs = [StopAfter(a.stop_after)] if a.mode == "first" else None
    tr = build(out / "run", a.strategy, world, a.global_batch, callbacks=cbs, num_mini_batches=a.mini,
               reward=a.reward, estimator=a.estimator)
    tr.train(resume_from_checkpoint=True if a.mode == "resume" else None)
    from rlhf_fast.trainer.distributed import full_trainable_state

    weights = full_trainable_state(tr)
    if tr.is_main:
        torch.save(weights, out / f"weights_{a.mode}.pt")
        (out / f"history_{a.mode}.json").write_text(json.dumps(clean_history(tr.state.log_history)))
        frozen = {"reference": type(tr.model.reference).__name__, "reward": type(tr.reward).__name__}
        (out / f"frozen_{a.mode}.json").write_text(json.dumps(frozen))
    if torch.distributed.is_initialized():
        # Every rank reaches teardown together: a rank that destroys its group while the other is
        # still writing can leave the slower one blocked in gloo's shutdown.
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    return 0


if __name__ == "__main__":
    code = main()
    # Results are on disk; skip interpreter teardown, where a gloo thread was seen to block a rank
    # for minutes after its peer exited (native thread, no Python frame), stalling the test.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
