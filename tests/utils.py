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


# Triton 3.9's interpreter truncates fp32 -> bf16 conversions (GPUs round to nearest even; its fp16
# conversions round correctly), so bf16 results a Triton kernel stores are checked under the
# interpreter within a few bf16 steps of the fp32 reference; fp16 runs of the same kernels check the
# rounding logic under the low-precision rule.
INTERPRETER_BF16_TOL = {"atol": 4e-2, "rtol": 4e-2}


def assert_matches_reference(actual, ref_low, ref_fp32, dtype, backend):
    """For ops whose outputs keep the input dtype: fp32 within fp32 tolerance of the reference; bf16 / fp16
    under the low-precision rule against the fp32 reference (``ref_low``: the torch reference run in the
    low dtype), except bf16 from the Triton interpreter (INTERPRETER_BF16_TOL)."""
    assert actual.dtype == ref_low.dtype and actual.shape == ref_low.shape
    if dtype == torch.float32:
        assert_close(actual, ref_low)
    elif backend == "triton" and dtype == torch.bfloat16 and actual.device.type == "cpu":
        torch.testing.assert_close(actual.float(), ref_fp32.float(), **INTERPRETER_BF16_TOL)
    elif actual.numel():
        assert_low_precision_rule(actual, ref_fp32, ref_low, slack=1e-5)


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


def run_torchrun(module: str, out: Path, nproc: int = 2, timeout: float = 600) -> list:
    """``torchrun --standalone --nproc_per_node=nproc -m module OUT`` (gloo on CPU, one thread per rank, no
    interpreter) from the repository root; returns each rank's ``torch.load(OUT / f"rank{r}.pt")``."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("TRITON_INTERPRET", None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", module, str(out)]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return [torch.load(Path(out) / f"rank{r}.pt") for r in range(nproc)]


def finish_rank(result, out: Path) -> None:
    """Worker side of ``run_torchrun``: save this rank's result as OUT/rank{r}.pt, leave the process group."""
    torch.save(result, Path(out) / f"rank{torch.distributed.get_rank()}.pt")
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


def worker_entry(main) -> None:
    """``main(Path(sys.argv[1]))``, then exit at once (skipping interpreter teardown under torchrun)."""
    main(Path(sys.argv[1]))
    sys.stdout.flush()
    os._exit(0)
