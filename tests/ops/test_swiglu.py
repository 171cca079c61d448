"""swiglu through every backend: hand-worked values, reference agreement, gradients, the rebuilt product,
what autograd keeps, bad input."""
import pytest
import torch
import torch.nn.functional as F

from rlhf_fast import _backend
from rlhf_fast.memory.tracker import SavedTensorCounter
from rlhf_fast.ops import swiglu, swiglu_recompute, swiglu_reference
from tests.utils import ALL_DTYPES, assert_matches_reference

needs_ext = pytest.mark.skipif(not _backend.HAS_EXT, reason="extension not built (RLHF_FAST_NO_EXT run)")


def _run(gate, up, backend, seed=1):
    out = swiglu_reference(gate, up) if backend == "reference" else swiglu(gate, up, backend=backend)
    g = torch.Generator().manual_seed(seed)
    return (out, *torch.autograd.grad(out, [gate, up], torch.randn(out.shape, generator=g).to(out.dtype)))


def _check_backend(backend, shape, dtype):
    g = torch.Generator().manual_seed(0)
    gate = (torch.randn(shape, generator=g) * 4).to(dtype).requires_grad_()  # both sigmoid tails
    up = torch.randn(shape, generator=g).to(dtype).requires_grad_()
    got = _run(gate, up, backend)
    g32, u32 = gate.detach().float().requires_grad_(), up.detach().float().requires_grad_()
    for a, low, ref32 in zip(got, _run(gate, up, "reference"), _run(g32, u32, "reference")):
        assert_matches_reference(a, low, ref32, dtype, backend)
    assert torch.equal(swiglu_recompute(gate, up, backend=backend), got[0])  # bit-identical rebuild


def test_hand_worked():
    gate = torch.tensor([0.0, 1.0, -1.0, 30.0, -30.0])
    up = torch.tensor([5.0, 2.0, 2.0, 1.0, 1.0])
    expected = torch.tensor([0.0, 2 / (1 + torch.e ** -1), -2 / (1 + torch.e), 30.0, 0.0])
    for b in ("torch", *(["cpp"] if _backend.HAS_EXT else [])):
        torch.testing.assert_close(swiglu(gate, up, backend=b), expected, atol=1e-6, rtol=1e-6)


SHAPES = [(3, 37), (2, 5, 129), (0, 8), (1,)]


@needs_ext
@pytest.mark.parametrize("dtype", ALL_DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_cpp_matches_reference(shape, dtype):
    _check_backend("cpp", shape, dtype)


@pytest.mark.interpret
@pytest.mark.parametrize("dtype", ALL_DTYPES)
@pytest.mark.parametrize("shape", [(3, 37), (0, 8)])
def test_triton_interpreter_matches_reference(shape, dtype):
    _check_backend("triton", shape, dtype)


@needs_ext
def test_fp32_matches_hf_act_fn_times_up():
    from transformers.activations import ACT2FN

    gate, up = torch.randn(64, 4864) * 3, torch.randn(64, 4864)
    torch.testing.assert_close(swiglu(gate, up, backend="cpp"), ACT2FN["silu"](gate) * up, rtol=1e-6, atol=1e-6)
    assert torch.equal(swiglu_reference(gate, up), F.silu(gate) * up)


@needs_ext
def test_autograd_keeps_gate_and_up_only():
    """Issue 18 target: at most 0.7x the bytes HF's act_fn(gate) * up keeps (2 tensors of 3)."""
    gate = torch.randn(128, 512, requires_grad=True)
    up = torch.randn(128, 512, requires_grad=True)
    with SavedTensorCounter() as ours:
        swiglu(gate, up, backend="cpp")
    with SavedTensorCounter() as hf:
        swiglu_reference(gate, up)
    assert ours.bytes == 2 * 128 * 512 * 4
    assert ours.bytes <= 0.7 * hf.bytes


def test_bad_input_names_the_argument():
    with pytest.raises(ValueError, match="up must have gate's shape"):
        swiglu(torch.randn(2, 3), torch.randn(2, 4))
    with pytest.raises(ValueError, match="up must have gate's shape"):
        swiglu(torch.randn(2, 3), torch.randn(2, 3).bfloat16())
    with pytest.raises(TypeError, match="gate must be a torch.Tensor"):
        swiglu([1.0], torch.randn(1))
