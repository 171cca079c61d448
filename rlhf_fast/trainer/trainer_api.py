"""The transformers.Trainer / TRL surface a migrated script may touch, for PPOTrainer.

TRL 1.12's PPOTrainer is a transformers Trainer built on accelerate. Scripts read ``trainer.processing_class``,
``trainer.policy_model`` and ``trainer.accelerator``, add callbacks after construction and call
``trainer.push_to_hub()``; these work here too. ``accelerator`` is a small stand-in over torch.distributed
(rlhf_fast runs on torchrun, not accelerate) with the attributes and methods scripts use.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch

from rlhf_fast.trainer.distributed import dist_ready, rank_and_world_size

__all__ = ["AcceleratorStandIn", "TrainerAPI"]


class AcceleratorStandIn:
    """What scripts use of ``accelerate.Accelerator``, over torch.distributed (a single process without it)."""

    def __init__(self, device: torch.device):
        self.device = torch.device(device)
        self.process_index, self.num_processes = rank_and_world_size()
        self.local_process_index = int(os.environ.get("LOCAL_RANK", self.process_index))

    @property
    def is_main_process(self) -> bool:
        return self.process_index == 0

    @property
    def is_local_main_process(self) -> bool:
        return self.local_process_index == 0

    def print(self, *args, **kwargs) -> None:
        if self.is_local_main_process:
            print(*args, **kwargs)

    def wait_for_everyone(self) -> None:
        if dist_ready():
            torch.distributed.barrier()

    def unwrap_model(self, model, keep_fp32_wrapper: bool = True):
        """The module under a DDP wrapper (FSDP2 modules are their own)."""
        return getattr(model, "module", model)

    def gather(self, tensor: torch.Tensor) -> torch.Tensor:
        """Concatenate ``tensor`` from every rank along dim 0 (0-d tensors become [world])."""
        t = tensor.reshape(1) if tensor.dim() == 0 else tensor
        if not dist_ready():
            return t
        parts = [torch.empty_like(t) for _ in range(self.num_processes)]
        torch.distributed.all_gather(parts, t.contiguous())
        return torch.cat(parts)

    gather_for_metrics = gather

    def reduce(self, tensor: torch.Tensor, reduction: str = "sum") -> torch.Tensor:
        out = tensor.clone()
        if dist_ready():
            torch.distributed.all_reduce(out)
        return out / self.num_processes if reduction == "mean" else out


class TrainerAPI:
    """Mixin for PPOTrainer: the attributes and methods of transformers' Trainer that TRL scripts use.

    Expects ``self.args``, ``self.tokenizer``, ``self.model`` (PolicyValueModel), ``self.device``,
    ``self.callback_handler``, ``self.is_main`` and ``save_model``."""

    _card_method = "PPO (rlhf_fast's drop-in PPOTrainer for TRL 1.12)"

    @property
    def processing_class(self):
        return self.tokenizer

    @property
    def policy_model(self):
        """The trained causal LM (TRL's ``trainer.policy_model``; a peft model with LoRA)."""
        return self.model.policy

    @property
    def accelerator(self) -> AcceleratorStandIn:
        if getattr(self, "_accelerator", None) is None:
            self._accelerator = AcceleratorStandIn(self.device)
        return self._accelerator

    def is_world_process_zero(self) -> bool:
        return self.is_main

    def is_local_process_zero(self) -> bool:
        return self.accelerator.is_local_main_process

    # ---- callbacks (transformers.Trainer's names)
    def add_callback(self, callback) -> None:
        self.callback_handler.add_callback(callback)

    def pop_callback(self, callback):
        return self.callback_handler.pop_callback(callback)

    def remove_callback(self, callback) -> None:
        self.callback_handler.remove_callback(callback)

    # ---- hub
    def push_to_hub(self, commit_message: str = "End of training", blocking: bool = True, token: str | None = None,
                    revision: str | None = None, **model_card_kwargs):
        """Save the policy to ``output_dir`` and upload that folder to ``hub_model_id`` (default: the output
        directory's name) with huggingface_hub, creating the repo (private per ``hub_private_repo``) if needed.

        ``model_card_kwargs`` (TRL passes ``dataset_name``) go into the README.md model card. Only the main
        process uploads; returns huggingface_hub's CommitInfo there, None elsewhere."""
        from huggingface_hub import HfApi

        a = self.args
        out = a.output_dir
        self.save_model(out, _internal_call=True)
        if not self.is_main:
            return None
        repo_id = a.hub_model_id or Path(out).resolve().name
        token = token if token is not None else getattr(a, "hub_token", None)
        self._write_model_card(out, repo_id, **model_card_kwargs)
        api = HfApi(token=token)
        repo = api.create_repo(repo_id, private=getattr(a, "hub_private_repo", None), exist_ok=True)
        repo_id = getattr(repo, "repo_id", repo_id)
        return api.upload_folder(repo_id=repo_id, folder_path=out, commit_message=commit_message,
                                 revision=revision if revision is not None else getattr(a, "hub_revision", None),
                                 run_as_future=not blocking)

    def _write_model_card(self, out: str, repo_id: str, **kwargs) -> None:
        lines = [f"# {repo_id.split('/')[-1]}", "", f"Trained with {self._card_method}.", ""]
        lines += [f"- {k}: {v}" for k, v in sorted(kwargs.items()) if v is not None]
        lines += [f"- steps: {self.state.global_step}", f"- episodes: {getattr(self.state, 'episode', 0)}"]
        Path(out).mkdir(parents=True, exist_ok=True)
        (Path(out) / "README.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
