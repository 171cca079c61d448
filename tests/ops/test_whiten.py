"""masked_whiten: hand-worked values, fewer than 2 valid entries, every backend against the reference,
a two-process gloo run equal to whitening the concatenated batch, bad input."""
import math
import os
import socket
import subprocess
import sys

import pytest
import torch

from rlhf_fast import _backend
from rlhf_fast.ops.whiten import masked_whiten, masked_whiten_reference
from tests.utils import REPO, assert_close

needs_ext = pytest.mark.skipif(not _backend.HAS_EXT, reason="extension not built (RLHF_FAST_NO_EXT run)")
CPU_BACKENDS = ("torch", *(["cpp"] if _backend.HAS_EXT else []))


# --------------------------------------------------------------------------- hand-worked values
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_hand_worked(backend):
    # valid x = [1, 2, 3, 4] (the 100 is padding): μ = 2.5; Σ(x-μ)² = 2.25 + 0.25 + 0.25 + 2.25 = 5;
    # Bessel var = 5/3; s = rsqrt(5/3 + 1e-8) = 0.7745967. y = (x - μ)·s = [-1.161895, -0.387298, ...]
    x = torch.tensor([[1.0, 2.0, 3.0], [4.0, 100.0, 0.0]])
    m = torch.tensor([[1, 1, 1], [1, 0, 0]])
    s = 1 / math.sqrt(5 / 3 + 1e-8)
    expect = torch.tensor([[-1.5 * s, -0.5 * s, 0.5 * s], [1.5 * s, 0.0, 0.0]])
    torch.testing.assert_close(masked_whiten(x, m, backend=backend), expect)
    # shift_mean=False keeps the mean (TRL / veRL): (x - μ)·s + μ on valid entries, 0 on padding.
    keep = torch.where(m.bool(), expect + 2.5, torch.zeros(()))
    torch.testing.assert_close(masked_whiten(x, m, shift_mean=False, backend=backend), keep)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_fewer_than_two_valid_entries_never_nan(backend):
    x = torch.tensor([[5.0, 7.0, -3.0]])
    one = torch.tensor([[0, 1, 0]])
    none = torch.zeros(1, 3)
    # n = 1: the variance is undefined; shift only -> x - μ = 0 on the valid entry; no shift -> zeros.
    assert torch.equal(masked_whiten(x, one, backend=backend), torch.zeros(1, 3))
    assert torch.equal(masked_whiten(x, one, shift_mean=False, backend=backend), torch.zeros(1, 3))
    assert torch.equal(masked_whiten(x, none, backend=backend), torch.zeros(1, 3))
    assert torch.equal(masked_whiten(x, none, shift_mean=False, backend=backend), torch.zeros(1, 3))
    # n = 2 is enough: [5, 7] -> μ = 6, var = 2, y = ±1/sqrt(2)
    two = torch.tensor([[1, 1, 0]])
    torch.testing.assert_close(masked_whiten(x, two, backend=backend), torch.tensor([[-0.5**0.5, 0.5**0.5, 0.0]]))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_masked_garbage_never_leaks(backend):
    x = torch.randn(3, 8)
    m = torch.rand(3, 8) < 0.5
    clean = masked_whiten(x, m, backend=backend)
    x[~m] = float("nan")
    assert torch.equal(masked_whiten(x, m, backend=backend), clean)


# --------------------------------------------------------------------------- backends against the reference
def _check(backend, shape, dtype, shift_mean, p=0.6):
    g = torch.Generator().manual_seed(5)
    x = (torch.randn(shape, generator=g) * 4 + 3).to(dtype)
    m = torch.rand(shape, generator=g) < p
    got = masked_whiten(x, m, shift_mean, backend=backend)
    ref = masked_whiten_reference(x, m, shift_mean)
    assert got.dtype == torch.float32 and got.shape == x.shape
    assert_close(got, ref, torch.float32)
    assert (got[~m] == 0).all()


@needs_ext
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shift_mean", [True, False])
@pytest.mark.parametrize("shape", [(1,), (1, 1), (5, 37), (4, 3, 50), (1040, 1024), (0, 4), (2, 0)])
@pytest.mark.parametrize("p", [0.6, 0.0, 1.0])
def test_cpp_matches_reference(shape, dtype, shift_mean, p):
    _check("cpp", shape, dtype, shift_mean, p)


@pytest.mark.interpret
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shift_mean", [True, False])
def test_triton_matches_reference(dtype, shift_mean):
    for shape in [(1,), (5, 37), (4, 3, 50), (2, 3000)]:
        for p in (0.6, 0.0, 1.0):
            _check("triton", shape, dtype, shift_mean, p)
    x = torch.tensor([[5.0, 7.0, -3.0]])
    assert torch.equal(masked_whiten(x, torch.tensor([[0, 1, 0]]), shift_mean, backend="triton"), torch.zeros(1, 3))


def test_differentiable_call_uses_the_reference_and_has_gradients():
    x = torch.randn(4, 6, requires_grad=True)
    m = torch.rand(4, 6) < 0.7
    masked_whiten(x, m).pow(2).sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and (x.grad[~m] == 0).all()


# --------------------------------------------------------------------------- two processes, gloo
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_group_whitening_equals_whitening_the_concatenated_batch(tmp_path):
    from tests.ops._whiten_dist_worker import SPLIT, global_cases

    port = _free_port()
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("TRITON_INTERPRET", None)
    outs = [tmp_path / f"rank{r}.pt" for r in range(2)]
    procs = [
        subprocess.Popen([sys.executable, "-m", "tests.ops._whiten_dist_worker", str(r), "2", str(port), str(outs[r])],
                         cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for r in range(2)
    ]
    for p in procs:
        _, err = p.communicate(timeout=120)
        assert p.returncode == 0, err[-2000:]
    r0, r1 = torch.load(outs[0]), torch.load(outs[1])
    assert r0.keys() == r1.keys() and len(r0) >= 6
    for key in r0:
        name, _backend_name, shift = key.split("/")
        x, mask = global_cases()[name]
        expect = masked_whiten_reference(x, mask, shift_mean=shift == "True")
        got = torch.cat([r0[key], r1[key]])
        assert got.shape == x.shape
        torch.testing.assert_close(got, expect, atol=1e-5, rtol=1e-5, msg=key)
        # the local-only answer differs: the group really changed the statistics
        if name == "holes":
            local = masked_whiten_reference(x[:SPLIT], mask[:SPLIT], shift_mean=shift == "True")
            assert not torch.allclose(local, r0[key], atol=1e-3)


# --------------------------------------------------------------------------- bad input
def test_bad_input_names_the_argument():
    x = torch.randn(2, 3)
    with pytest.raises(ValueError, match=r"mask must have the shape of x \(2, 3\), got \(2, 4\)"):
        masked_whiten(x, torch.ones(2, 4))
    with pytest.raises(ValueError, match="mask must hold only 0 and 1"):
        masked_whiten(x, torch.full((2, 3), 3.0))
    with pytest.raises(ValueError, match="x must be float32, bfloat16 or float16"):
        masked_whiten(torch.ones(2, 3, dtype=torch.int32), torch.ones(2, 3))
    for backend in CPU_BACKENDS:
        bad = x.clone()
        bad[0, 0] = float("inf")
        with pytest.raises(ValueError, match="NaN or inf"):
            masked_whiten(bad, torch.ones(2, 3), backend=backend)
