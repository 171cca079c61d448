"""GRPOTrainer under torchrun with 2 CPU ranks (gloo) equals one process with the same global generation batch:
rewards are gathered before the group advantages, token counts and metrics are global, DDP averages gradients."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from tests.utils import REPO

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed unavailable")]
COMPARED = ("loss", "grad_norm", "num_tokens", "reward", "reward_std", "frac_reward_zero_std", "rewards/varied/mean",
            "completions/mean_length", "completions/clipped_ratio", "kl", "entropy", "clip_ratio/region_mean")


def run(out, nproc):
    if nproc == 1:  # in this process (no torchrun environment: no process group)
        from tests.trainer._grpo_dist_worker import main

        main(str(out))
    else:
        env = dict(os.environ, OMP_NUM_THREADS="1")
        env.pop("TRITON_INTERPRET", None)
        proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
                               "-m", "tests.trainer._grpo_dist_worker", str(out)], cwd=REPO, env=env,
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return torch.load(out / "weights.pt"), json.loads((out / "history.json").read_text())


def test_two_ranks_match_one_process(tmp_path):
    (tmp_path / "one").mkdir()
    (tmp_path / "two").mkdir()
    w1, h1 = run(tmp_path / "one", 1)
    w2, h2 = run(tmp_path / "two", 2)
    for k in w1:
        torch.testing.assert_close(w1[k], w2[k], atol=2e-5, rtol=1e-4, msg=k)
    assert len(h1) == len(h2) == 2
    for a, b in zip(h1, h2):
        for key in COMPARED:
            assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-6), key
