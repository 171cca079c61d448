"""Worker for test_grpo_distributed: two GRPO steps on a global generation batch of 16 completions, split over
however many ranks torchrun starts; rank 0 writes the weights and the logged metrics.

    python -m tests.trainer._grpo_dist_worker OUT_DIR
"""
from __future__ import annotations

import faulthandler
import json
import os
import sys
from pathlib import Path

import torch

from rlhf_fast import GRPOConfig, GRPOTrainer
from rlhf_fast.trainer.distributed import init_from_env, rank_and_world_size
from tests.trainer.test_grpo_trainer import V, rows
from tests.trainer.tiny import make_tokenizer, tiny_policy


def varied(prompts, completions, completion_ids, **kw):
    return [float(sum(ids) % 7) / 7 for ids in completion_ids]


def main(out: str) -> None:
    if "RANK" in os.environ:  # a hung collective dumps every thread's stack and exits instead of waiting forever
        faulthandler.dump_traceback_later(180, exit=True)
    init_from_env()
    rank, world = rank_and_world_size()
    args = GRPOConfig(output_dir=str(Path(out) / "run"), use_cpu=True, bf16=False, per_device_train_batch_size=16 // world,
                      num_generations=4, max_completion_length=6, learning_rate=1e-2, logging_steps=1, report_to="none",
                      save_strategy="no", max_steps=2, disable_tqdm=True, seed=0, beta=0.1)
    tr = GRPOTrainer(tiny_policy(V), varied, args=args, train_dataset=rows(16), processing_class=make_tokenizer(V))
    tr.train()
    if rank == 0:
        torch.save({k: v.detach().clone() for k, v in tr.policy_model.state_dict().items()}, Path(out) / "weights.pt")
        (Path(out) / "history.json").write_text(json.dumps([h for h in tr.state.log_history if "loss" in h]))
    if world > 1:  # teardown together: a rank destroying its group while another still works can hang (gloo)
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
