"""Worker: a patched model under DDP and under FSDP2 (2 gloo ranks) computes the logits and gradients its
unpatched copy computes under the same wrapper. Writes OUT/rank{r}.pt.

    torchrun --nproc_per_node=2 -m tests.models._patch_dist_worker OUT
"""
from __future__ import annotations

import copy
from pathlib import Path

import torch

from rlhf_fast.models import is_patched, patch_backbone
from rlhf_fast.trainer.distributed import init_from_env
from tests.models.conftest import VOCAB, Batch, tiny_causal_lm
from tests.utils import finish_rank, worker_entry


def _wrap(model, mode):
    if mode == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP

        return DDP(model)
    from torch.distributed.fsdp import fully_shard

    for layer in model.model.layers:
        fully_shard(layer)
    return fully_shard(model)


def _full(t):
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def _step(model, ids, mask):
    logits = model(input_ids=ids, attention_mask=mask).logits
    g = torch.Generator().manual_seed(1)
    (logits * torch.randn(logits.shape, generator=g)).sum().backward()
    return {"logits": logits.detach(), **{n: _full(p.grad).clone() for n, p in model.named_parameters()}}


def main(out: Path) -> None:
    init_from_env()
    rank = torch.distributed.get_rank()
    base = tiny_causal_lm("qwen2", seed=0).train()
    unpatched = copy.deepcopy(base)
    report = patch_backbone(base)
    batch = Batch(seed=rank)  # each rank its own rows
    batch.input_ids = batch.input_ids.clamp(max=VOCAB - 1)
    result = {"report": str(report)}
    for mode in ("ddp", "fsdp2"):
        patched, plain = _wrap(copy.deepcopy(base), mode), _wrap(copy.deepcopy(unpatched), mode)
        if mode == "fsdp2":  # too late once fully_shard has swapped the classes: the report says so
            result["late"] = str(patch_backbone(_wrap(copy.deepcopy(unpatched), mode)))
        inner = patched.module if mode == "ddp" else patched
        layer = inner.model.layers[0]
        result[mode] = {"patched": _step(patched, batch.input_ids, batch.attention_mask),
                        "plain": _step(plain, batch.input_ids, batch.attention_mask),
                        "layer": (type(layer).__name__, is_patched(layer) and is_patched(layer.mlp))}
    finish_rank(result, out)


if __name__ == "__main__":
    worker_entry(main)
