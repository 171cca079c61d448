"""Verification tools shared by tests and benchmarks: allocation tracker, AOT compile harness,
interpreter subprocess runner. Nothing in rlhf_fast's hot paths imports this package."""
from rlhf_fast.testing.alloc import AllocationTracker

__all__ = ["AllocationTracker"]
