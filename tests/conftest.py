"""Seeding, the interpreter/AOT process split, and the no-silent-skip rule for our own machines."""
from __future__ import annotations

import os
import random

import numpy as np
import pytest
import torch

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def pytest_sessionstart(session):
    # `make test` must fail when the C++ extension or triton is missing, unless told otherwise:
    # a silent torch fallback would make the backend tests meaningless.
    if os.environ.get("RLHF_FAST_NO_EXT", "0") not in ("", "0"):
        return
    from rlhf_fast import _backend

    missing = []
    if not _backend.HAS_EXT:
        missing.append(f"C++ extension rlhf_fast._C ({_backend.EXT_IMPORT_ERROR}; run `make ext`)")
    if not _backend.HAS_TRITON:
        missing.append(f"triton ({_backend.TRITON_IMPORT_ERROR})")
    if missing:
        raise pytest.UsageError(
            "missing backends: " + "; ".join(missing) + ". Set RLHF_FAST_NO_EXT=1 to test the torch fallback only."
        )


def pytest_collection_modifyitems(config, items):
    """Interpreter tests run only in a TRITON_INTERPRET=1 process; everything else only without it."""
    if INTERPRET:
        keep = [it for it in items if it.get_closest_marker("interpret")]
        dropped = [it for it in items if not it.get_closest_marker("interpret")]
        if dropped:
            config.hook.pytest_deselected(items=dropped)
        items[:] = keep
    else:
        skip = pytest.mark.skip(reason="Triton interpreter test: runs in the TRITON_INTERPRET=1 pass of `make test`")
        for it in items:
            if it.get_closest_marker("interpret"):
                it.add_marker(skip)


@pytest.fixture(autouse=True)
def seed():
    """Every test starts from the same seeds."""
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    yield 0
