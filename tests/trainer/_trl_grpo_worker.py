"""The TRL side of tests/trainer/grpo_parity.py, run by trl==1.16.0's interpreter: ``python worker.py spec.json``.

Writes <work>/trl_results.pt: {"losses": {case: {"loss", "grad", "metrics"}}, "runs": {case: {"history",
"weights", "prompts", "perms"}}}. Imports no rlhf_fast.
"""
from __future__ import annotations

import io
import json
import os
import sys
from contextlib import redirect_stdout
from types import SimpleNamespace
from unittest import mock

import torch

from tests.trainer.grpo_parity import (
    LOSS_CASES,
    Case,
    config_fields,
    count_t5,
    dataset_rows,
    loss_tensors,
    oracle_completions,
)


def trl_loss(name: str) -> dict:
    """TRL's GRPOTrainer._compute_loss on the saved tensors, with a stub self (one process, no accumulation)."""
    from trl.trainer.grpo_trainer import GRPOTrainer

    c = {"top_entropy_quantile": 1.0, "entropy_coef": 0.0, "use_bias_correction_kl": True, **LOSS_CASES[name]}
    t = loss_tensors()
    logps = t["logps"].clone().requires_grad_(True)
    B, T = logps.shape
    acc = SimpleNamespace(num_processes=1, sync_gradients=True, reduce=lambda x, reduction="sum": x,
                          gather=lambda x: x, pad_across_processes=lambda x, dim=0, pad_index=0: x,
                          gather_for_metrics=lambda x: x)
    stub = SimpleNamespace(
        _get_per_token_logps_and_entropies=lambda *a, **k: (logps, t["entropy"], None),
        top_entropy_quantile=c["top_entropy_quantile"], off_policy_mask_threshold=None,
        importance_sampling_level=c["importance_sampling_level"], beta=c["beta"], loss_type=c["loss_type"],
        epsilon_low=c["epsilon"], epsilon_high=c["epsilon_high"], use_vllm=False,
        vllm_importance_sampling_correction=False, model=SimpleNamespace(training=True),
        current_gradient_accumulation_steps=1, max_completion_length=T, accelerator=acc,
        _entropy_bonus_enabled=c["entropy_coef"] != 0.0, entropy_coef=c["entropy_coef"], use_adaptive_entropy=False,
        aux_loss_enabled=False, _metrics={"train": __import__("collections").defaultdict(list)},
        args=SimpleNamespace(use_bias_correction_kl=c["use_bias_correction_kl"], delta=c["delta"],
                             sapo_temperature_pos=1.0, sapo_temperature_neg=1.05, steps_per_generation=1))
    stub.get_high_entropy_mask = GRPOTrainer.get_high_entropy_mask.__get__(stub)
    inputs = {"prompt_ids": torch.zeros(B, 1, dtype=torch.long), "prompt_mask": torch.ones(B, 1, dtype=torch.long),
              "completion_ids": torch.zeros(B, T, dtype=torch.long), "completion_mask": t["mask"],
              "advantages": t["advantages"], "old_per_token_logps": t["old"], "ref_per_token_logps": t["ref"],
              "num_items_in_batch": t["mask"].sum()}
    loss = GRPOTrainer._compute_loss(stub, None, inputs)
    loss.backward()
    metrics = {k: v[-1] for k, v in stub._metrics["train"].items()}
    return {"loss": float(loss), "grad": logps.grad.clone(), "metrics": metrics}


def trl_run(case: Case, models: dict, work: str) -> dict:
    """TRL's GRPOTrainer on the case with the oracle's completions; records history, weights after every
    optimizer step, the prompts of every generation batch and every row shuffle."""
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer
    from trl.trainer import grpo_trainer

    rec = {"weights": [], "prompts": [], "perms": []}
    G = config_fields(case, "")["num_generations"]

    def generate_single_turn(self, prompt_ids, images, multimodal_fields, num_generations, has_tool_images=False):
        return oracle_completions([list(p) for p in prompt_ids], G, len(rec["prompts"]) - 1,
                                  self.max_completion_length, case.eos_share), None

    orig_score = GRPOTrainer._generate_and_score_completions

    def generate_and_score(self, inputs):
        rec["prompts"].append([x["prompt"] for x in inputs])
        return orig_score(self, inputs)

    orig_shuffle = grpo_trainer.shuffle_sequence_dict

    def shuffle(seq_dict):
        n = len(next(v for v in seq_dict.values() if v is not None))
        perm = torch.randperm(n)
        rec["perms"].append(perm.clone())
        with mock.patch.object(grpo_trainer.torch, "randperm", lambda *_a, **_k: perm):
            return orig_shuffle(seq_dict)

    class Snapshot(TrainerCallback):
        def on_step_end(self, args, state, control, model=None, **kw):
            rec["weights"].append({k: v.detach().clone() for k, v in model.state_dict().items()})

    args = GRPOConfig(**config_fields(case, os.path.join(work, f"trl-{case.name}")))
    funcs = [count_t5] + ([models["rm"]] if case.reward_model else [])
    with mock.patch.object(GRPOTrainer, "_generate_single_turn", generate_single_turn), \
            mock.patch.object(GRPOTrainer, "_generate_and_score_completions", generate_and_score), \
            mock.patch.object(grpo_trainer, "shuffle_sequence_dict", shuffle), redirect_stdout(io.StringIO()):
        trainer = GRPOTrainer(models["policy"], funcs, args=args,
                              train_dataset=Dataset.from_list(dataset_rows(case.num_prompts, case.chat)),
                              callbacks=[Snapshot()])
        trainer.train()
    rec["history"] = [h for h in trainer.state.log_history if "train_runtime" not in h]
    return rec


def main(spec_path: str) -> None:
    import trl

    assert trl.__version__ == "1.16.0", trl.__version__
    spec = json.loads(open(spec_path).read())
    torch.set_num_threads(1)
    out = {"losses": {name: trl_loss(name) for name in spec["loss_cases"]},
           "runs": {name: trl_run(Case(**c), spec["models"], spec["work"]) for name, c in spec["cases"].items()}}
    torch.save(out, os.path.join(spec["work"], "trl_results.pt"))


if __name__ == "__main__":
    main(sys.argv[1])
