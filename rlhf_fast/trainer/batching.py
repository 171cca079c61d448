"""Prompts into batches: tokenized prompt lists, left padding, the resumable prompt sampler, group rows.

Pure data plumbing for the PPO step (no model): ``prompt_token_lists`` reads a dataset, ``PromptSampler``
yields each step's prompt indices (sharded by rank, resumable), ``group_indices`` repeats them for the
group estimators, ``left_pad`` builds the int64 [B, P] prompt batch the decoder takes.
"""
from __future__ import annotations

import torch

from rlhf_fast.trainer.rollout import prompt_seeds

__all__ = ["left_pad", "prompt_token_lists", "collate_prompts", "check_context", "PromptSampler", "group_indices"]


def left_pad(sequences: list[list[int]], pad_token_id: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad token id lists. Returns (input_ids int64 [B, P], attention_mask int64 [B, P])."""
    P = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), P), pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), P), dtype=torch.long)
    for i, s in enumerate(sequences):
        if len(s):
            ids[i, P - len(s):] = torch.as_tensor(s, dtype=torch.long)
            mask[i, P - len(s):] = 1
    return ids.to(device), mask.to(device)


def prompt_token_lists(dataset, tokenizer) -> list[list[int]]:
    """Token ids of every prompt: rows with ``input_ids`` (TRL's format) or a ``prompt`` string column."""
    if dataset is None:
        raise ValueError("train_dataset is required")
    n = len(dataset)
    if n == 0:
        raise ValueError("train_dataset is empty: it needs at least one prompt")
    columns = set(getattr(dataset, "column_names", None) or (dataset[0].keys() if isinstance(dataset[0], dict) else []))
    if "input_ids" in columns:
        out = [list(map(int, dataset[i]["input_ids"])) for i in range(n)]
    elif "prompt" in columns:
        texts = [dataset[i]["prompt"] for i in range(n)]
        out = tokenizer(texts)["input_ids"]  # as TRL's scripts tokenize prompts (special tokens included)
    else:
        raise ValueError(
            f"train_dataset rows need an 'input_ids' column (tokenized prompts, as TRL expects) or a 'prompt' "
            f"text column; found columns {sorted(columns)}"
        )
    for i, ids in enumerate(out):
        if len(ids) == 0:
            raise ValueError(f"train_dataset row {i} has an empty prompt")
    return out


def collate_prompts(indices: torch.Tensor, prompts: list[list[int]], dataset=None, data_collator=None) -> list[list[int]]:
    """Token id lists of the prompts at ``indices`` (int64 [B]): through ``data_collator`` when one is given
    (its attention mask picks the tokens), else from the pre-tokenized ``prompts``."""
    if data_collator is not None and dataset is not None:
        rows = [dataset[int(i)] for i in indices]
        batch = data_collator([{"input_ids": r["input_ids"]} if "input_ids" in r else r for r in rows])
        return [ids[m.bool()].tolist() for ids, m in zip(batch["input_ids"], batch["attention_mask"])]
    return [prompts[int(i)] for i in indices]


def check_context(seqs: list[list[int]], response_length: int, model_config) -> None:
    """ValueError when the longest prompt plus the response would exceed the model's context."""
    max_ctx = getattr(model_config, "max_position_embeddings", None)
    longest = max(len(s) for s in seqs)
    if max_ctx is not None and longest + response_length > max_ctx:
        raise ValueError(f"a prompt of {longest} tokens + response_length {response_length} exceeds "
                         f"the model's context of {max_ctx} tokens: truncate prompts or lower response_length")


class PromptSampler:
    """Deterministic shuffled batches of prompt indices, sharded by rank, resumable.

    Epoch e uses the permutation of a generator seeded with (seed, e) (the dataset order with
    ``shuffle=False``); the global batch of ``batch_size`` indices is split into world_size contiguous shards.
    state_dict() = (epoch, position).
    """

    def __init__(self, num_prompts: int, batch_size: int, seed: int, rank: int = 0, world_size: int = 1,
                 shuffle: bool = True):
        if batch_size > num_prompts:
            raise ValueError(
                f"the global batch ({batch_size} prompts = per_device_train_batch_size x gradient_accumulation_steps "
                f"x world size) is larger than train_dataset ({num_prompts} prompts)"
            )
        self.n, self.batch_size, self.seed = num_prompts, batch_size, seed
        self.rank, self.world_size = rank, world_size
        self.shuffle = shuffle
        self.epoch, self.position = 0, 0
        self._perm = self._permutation(0)

    def _permutation(self, epoch: int) -> torch.Tensor:
        if not self.shuffle:
            return torch.arange(self.n)
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(self.n, generator=g)

    def next_batch(self) -> tuple[torch.Tensor, int]:
        """(this rank's prompt indices int64 [batch_size // world_size], epoch). Drops ragged tails."""
        if self.position + self.batch_size > self.n:
            self.epoch += 1
            self.position = 0
            self._perm = self._permutation(self.epoch)
        glob = self._perm[self.position:self.position + self.batch_size]
        self.position += self.batch_size
        local = self.batch_size // self.world_size
        return glob[self.rank * local:(self.rank + 1) * local], self.epoch

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed, "n": self.n,
                "batch_size": self.batch_size}

    def load_state_dict(self, state: dict) -> None:
        for key in ("seed", "n", "batch_size"):
            if state[key] != getattr(self, key):
                raise ValueError(f"checkpoint data position was saved with {key}={state[key]}, this run has "
                                 f"{key}={getattr(self, key)}")
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
        self._perm = self._permutation(self.epoch)


def group_indices(prompt_indices: torch.Tensor, num_generations: int, run_seed: int, round_index: int):
    """Rows of a grouped rollout: each prompt repeated ``num_generations`` times contiguously.

    Returns (row prompt indices int64 [G * n], row seeds int64 [G * n]). Row g*n + j samples generation j
    of prompt g with the seed of the virtual global index (prompt index x n + j), so the samples of one
    group differ, and a (prompt, generation, round) gets the same sample whatever the rank count."""
    n = int(num_generations)
    rows = prompt_indices.to(torch.int64).repeat_interleave(n)
    gen = torch.arange(n, dtype=torch.int64).repeat(prompt_indices.numel())
    return rows, prompt_seeds(run_seed, rows * n + gen, round_index)

