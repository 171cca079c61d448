"""The allocation tracker (rlhf_fast.memory.tracker): records created tensors, not views; sees backward."""
import torch

from rlhf_fast.memory.tracker import AllocationTracker


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
