"""Shared test helpers: per-dtype tolerances, the low-precision rule, interpreter subprocess runner."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent

# (atol, rtol) for comparing a backend's output with the torch reference computed from the same
# inputs. fp32 kernels accumulate in another order; bf16/fp16 inputs are upcast to fp32 inside
# every kernel, so their outputs are fp32 and only the inputs are rounded.
TOLERANCES = {
    torch.float32: (1e-5, 1e-5),
    torch.bfloat16: (1e-2, 1.6e-2),
    torch.float16: (1e-3, 1e-3),
}

ALL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
CPU_BACKENDS = ("cpp", "torch")


def tol(dtype: torch.dtype) -> dict:
    atol, rtol = TOLERANCES[dtype]
    return {"atol": atol, "rtol": rtol}


def assert_close(actual, expected, dtype=torch.float32, msg=""):
    torch.testing.assert_close(actual.float(), expected.float(), **tol(dtype), msg=msg or None)


def assert_low_precision_rule(kernel_out, ref_fp32, ref_low, slack=1e-6):
    """docs/design.md rule: a kernel's error against an fp32 reference is at most 2x the error of the
    torch reference run in the same low dtype (plus a tiny absolute slack for exact ties)."""
    k_err = (kernel_out.float() - ref_fp32.float()).abs().max().item()
    r_err = (ref_low.float() - ref_fp32.float()).abs().max().item()
    assert k_err <= 2 * r_err + slack, f"kernel error {k_err:.3g} > 2x torch low-precision error {r_err:.3g}"


def run_in_interpreter(*pytest_args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    """Run pytest on the given node ids in a fresh process with TRITON_INTERPRET=1.

    TRITON_INTERPRET changes every @triton.jit of the process it is set in, so interpreter
    tests never share a process with AOT compile tests. Returns the completed process.
    """
    env = dict(os.environ, TRITON_INTERPRET="1")
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *pytest_args],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout,
    )
