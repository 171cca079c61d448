"""masked_mean through every backend: hand-worked values, reference agreement, gradients, bad input."""
import pytest
import torch

from rlhf_fast import _backend
from rlhf_fast.memory.tracker import AllocationTracker
from rlhf_fast.ops import masked_mean, masked_mean_reference
from tests.utils import ALL_DTYPES, CPU_BACKENDS, assert_close

SHAPES = [(1,), (7,), (1, 1), (3, 37), (5, 1), (4, 3, 2100), (2, 0)]


def _inputs(shape, dtype, p=0.6):
    x = torch.randn(shape).to(dtype)
    mask = torch.rand(shape) < p
    return x, mask


def test_hand_worked():
    x = torch.tensor([[1.0, 2.0, 3.0, 4.0], [10.0, 20.0, 30.0, 40.0]])
    m = torch.tensor([[1, 0, 1, 0], [0, 0, 0, 0]])
    for b in ("torch", *(["cpp"] if _backend.HAS_EXT else [])):
        assert masked_mean(x, m, dim=1, backend=b).tolist() == [2.0, 0.0]
        assert masked_mean(x, m, backend=b).item() == 2.0
        assert masked_mean(x, m, dim=0, backend=b).tolist() == [1.0, 0.0, 3.0, 0.0]


def _check_backend(backend, shape, dtype, dim):
    x, m = _inputs(shape, dtype)
    if dim is not None and dim >= len(shape):
        return
    got = masked_mean(x, m, dim=dim, backend=backend)
    ref = masked_mean_reference(x, m, dim=dim)
    assert got.dtype == torch.float32
    assert_close(got, ref, torch.float32)  # both accumulate the same rounded inputs in fp32

    xg = x.clone().requires_grad_(True)
    xr = x.clone().requires_grad_(True)
    up = torch.randn(ref.shape)
    (masked_mean(xg, m, dim=dim, backend=backend) * up).sum().backward()
    (masked_mean_reference(xr, m, dim=dim) * up).sum().backward()
    assert xg.grad.dtype == dtype
    assert_close(xg.grad, xr.grad, dtype)


@pytest.mark.skipif(not _backend.HAS_EXT, reason="extension not built (RLHF_FAST_NO_EXT run)")
@pytest.mark.parametrize("dtype", ALL_DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dim", [None, 0, -1, 1])
def test_cpp_matches_reference(shape, dtype, dim):
    _check_backend("cpp", shape, dtype, dim)


@pytest.mark.interpret
@pytest.mark.parametrize("dtype", ALL_DTYPES)
@pytest.mark.parametrize("shape", [(1,), (3, 37), (4, 3, 300), (2, 0)])
@pytest.mark.parametrize("dim", [None, -1, 0])
def test_triton_interpreter_matches_reference(shape, dtype, dim):
    _check_backend("triton", shape, dtype, dim)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_all_masked_gives_zero_and_zero_grad(backend):
    if backend == "cpp" and not _backend.HAS_EXT:
        pytest.skip("extension not built")
    x = torch.randn(3, 5, requires_grad=True)
    out = masked_mean(x, torch.zeros(3, 5, dtype=torch.bool), backend=backend)
    out.backward()
    assert out.item() == 0.0 and torch.equal(x.grad, torch.zeros(3, 5))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_nan_in_valid_entry_propagates_but_masked_nan_does_not(backend):
    if backend == "cpp" and not _backend.HAS_EXT:
        pytest.skip("extension not built")
    x = torch.tensor([[1.0, float("nan"), 3.0]])
    assert masked_mean(x, torch.tensor([[1, 0, 1]]), backend=backend).item() == 2.0
    assert torch.isnan(masked_mean(x, torch.tensor([[1, 1, 1]]), backend=backend))


def test_bad_input_names_the_argument():
    x = torch.randn(2, 3)
    with pytest.raises(ValueError, match="mask must have the shape of x"):
        masked_mean(x, torch.ones(2, 4))
    with pytest.raises(ValueError, match="mask must hold only 0 and 1"):
        masked_mean(x, torch.full((2, 3), 2.0))
    with pytest.raises(ValueError, match="x must be float32, bfloat16 or float16"):
        masked_mean(torch.ones(2, 3, dtype=torch.long), torch.ones(2, 3))
    with pytest.raises(ValueError, match="dim must be in"):
        masked_mean(x, torch.ones(2, 3), dim=2)


@pytest.mark.skipif(not _backend.HAS_EXT, reason="extension not built")
def test_cpp_forward_allocates_only_outputs():
    """The fused path allocates only per-row results, never an x-sized temporary (fp32 input)."""
    x = torch.randn(64, 4096)
    m = torch.rand(64, 4096) < 0.5
    with AllocationTracker() as t:
        masked_mean(x, m, dim=1, backend="cpp")
    assert t.max_numel <= 64, t.largest()
    with AllocationTracker() as t_ref:
        masked_mean_reference(x, m, dim=1)
    assert t_ref.max_numel >= 64 * 4096  # the tracker sees the reference's full-size temporary
