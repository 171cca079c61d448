"""Verification tools for tests and benchmarks: the ahead-of-time compile harness (``rlhf_fast.testing.aot``)
and, re-exported here, ``AllocationTracker`` (it lives in ``rlhf_fast.memory.tracker``, since the memory
measurement uses it too). Nothing in rlhf_fast's hot paths imports this package."""
from rlhf_fast.memory.tracker import AllocationTracker

__all__ = ["AllocationTracker"]
