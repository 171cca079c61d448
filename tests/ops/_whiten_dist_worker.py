"""One rank of the two-process gloo test of masked_whiten (tests/ops/test_whiten.py).

    python -m tests.ops._whiten_dist_worker RANK WORLD PORT OUT_FILE

Builds the same global batch on every rank (fixed seed), keeps its own uneven slice of rows,
whitens it with group=WORLD on every CPU backend and saves {case: output} to OUT_FILE.
"""
from __future__ import annotations

import sys

import torch
import torch.distributed as dist

from rlhf_fast import _backend
from rlhf_fast.ops.whiten import masked_whiten

# rank 0 holds rows [0, 2), rank 1 rows [2, 7): uneven shards on purpose.
SPLIT = 2


def global_cases() -> dict:
    g = torch.Generator().manual_seed(7)
    x = torch.randn(7, 11, generator=g) * 3 + 1
    holes = torch.rand(7, 11, generator=g) < 0.6
    rank1_empty = holes.clone()
    rank1_empty[SPLIT:] = False  # every valid entry on rank 0
    one_valid = torch.zeros(7, 11, dtype=torch.bool)
    one_valid[4, 3] = True  # global n = 1: shift only / zeros
    return {"holes": (x, holes), "rank1_empty": (x, rank1_empty), "one_valid": (x, one_valid)}


def main(rank: int, world: int, port: int, out_file: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    rows = slice(0, SPLIT) if rank == 0 else slice(SPLIT, None)
    results = {}
    backends = ["torch"] + (["cpp"] if _backend.HAS_EXT else [])
    for name, (x, mask) in global_cases().items():
        for backend in backends:
            for shift_mean in (True, False):
                key = f"{name}/{backend}/{shift_mean}"
                results[key] = masked_whiten(x[rows], mask[rows], shift_mean, group=dist.group.WORLD, backend=backend)
    dist.barrier()
    dist.destroy_process_group()
    torch.save(results, out_file)


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4])
