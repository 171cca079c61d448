"""The other test utilities: allocation tracker and the interpreter subprocess runner."""
import torch

from rlhf_fast.testing import AllocationTracker
from tests.utils import run_in_interpreter


def test_tracker_records_created_tensors_not_views():
    x = torch.randn(10, 20)
    with AllocationTracker() as t:
        y = x.view(200)  # no new bytes
        z = x * 2  # 200 floats
        x.add_(1)  # in place: no new bytes
    assert t.max_numel == 200 and t.total_bytes == 800
    assert y.numel() == z.numel()


def test_tracker_sees_backward_and_peak_live():
    w = torch.randn(64, 64, requires_grad=True)
    with AllocationTracker() as t:
        for _ in range(4):
            (w @ w).sum().backward()
    assert t.max_numel == 64 * 64
    # Each iteration's matmul output dies before the next: peak is far below the total.
    assert t.peak_live_bytes < t.total_bytes / 2


def test_interpreter_runner_runs_interpret_tests_in_their_own_process():
    node = "tests/ops/test_masked_mean.py::test_triton_interpreter_matches_reference"
    proc = run_in_interpreter(node, "-k", "shape1 and dtype0")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert " passed" in proc.stdout and "failed" not in proc.stdout
