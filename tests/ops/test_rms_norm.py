"""rms_norm (+ residual add) through every backend: HF's LlamaRMSNorm, hand-worked values, gradients,
dtypes, what autograd keeps, bad input."""
import pytest
import torch

from rlhf_fast import _backend
from rlhf_fast.memory.tracker import SavedTensorCounter
from rlhf_fast.ops import rms_norm, rms_norm_reference
from tests.utils import assert_close, assert_matches_reference

needs_ext = pytest.mark.skipif(not _backend.HAS_EXT, reason="extension not built (RLHF_FAST_NO_EXT run)")
EPS = 1e-6


def _inputs(shape, dtype, w_dtype, residual, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(shape, generator=g) * 2).to(dtype).requires_grad_()
    w = (1 + 0.3 * torch.randn(shape[-1], generator=g)).to(w_dtype).requires_grad_()
    r = torch.randn(shape, generator=g).to(dtype).requires_grad_() if residual else None
    return x, w, r


def _run(x, w, r, backend, seed=1):
    """Outputs and the gradients of x, w (and r) for random upstream gradients on every output."""
    fn = rms_norm_reference if backend == "reference" else lambda *a: rms_norm(*a, backend=backend)
    outs = fn(x, w, EPS, r)
    outs = (outs,) if r is None else outs
    g = torch.Generator().manual_seed(seed)
    ups = [torch.randn(o.shape, generator=g).to(o.dtype) for o in outs]
    grads = torch.autograd.grad(outs, [t for t in (x, w, r) if t is not None], ups)
    return outs, grads


def test_hand_worked():
    x = torch.tensor([[3.0, 4.0], [0.0, 0.0]])
    w = torch.tensor([1.0, 2.0])
    rms = (12.5) ** 0.5
    for b in ("torch", *(["cpp"] if _backend.HAS_EXT else [])):
        out = rms_norm(x, w, 0.0 + 1e-12, backend=b)
        torch.testing.assert_close(out[0], torch.tensor([3 / rms, 8 / rms]))
        assert out[1].tolist() == [0.0, 0.0]
        out, h = rms_norm(x, w, 1e-12, residual=torch.ones(2, 2), backend=b)
        assert h.tolist() == [[4.0, 5.0], [1.0, 1.0]]
        torch.testing.assert_close(out[1], torch.tensor([1.0, 2.0]))


@needs_ext
def test_fp32_matches_hf_llama_rms_norm_and_residual_add():
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    hf = LlamaRMSNorm(896, eps=EPS)
    with torch.no_grad():
        hf.weight.mul_(torch.linspace(0.5, 1.5, 896))
    x = torch.randn(3, 37, 896) * 3
    res = torch.randn(3, 37, 896)
    assert torch.equal(rms_norm_reference(x, hf.weight, EPS), hf(x))  # the reference is HF, line for line
    out = rms_norm(x, hf.weight, EPS, backend="cpp")
    torch.testing.assert_close(out, hf(x), rtol=1e-6, atol=1e-6)
    out, h = rms_norm(x, hf.weight, EPS, residual=res, backend="cpp")
    assert torch.equal(h, res + x)
    torch.testing.assert_close(out, hf(res + x), rtol=1e-6, atol=1e-6)


def _check_backend(backend, shape, dtype, w_dtype, residual):
    x, w, r = _inputs(shape, dtype, w_dtype, residual)
    outs, grads = _run(x, w, r, backend)
    ref_outs, ref_grads = _run(x, w, r, "reference")
    fp32 = [t.detach().float().requires_grad_() if t is not None else None for t in (x, w, r)]
    fp32_outs, fp32_grads = _run(*fp32, "reference")
    for got, low, ref32 in zip((*outs, *grads), (*ref_outs, *ref_grads), (*fp32_outs, *fp32_grads)):
        assert_matches_reference(got, low, ref32, dtype, backend)


CASES = [  # (shape, dtype, weight dtype)
    ((7, 96), torch.float32, torch.float32),
    ((2, 5, 130), torch.float32, torch.float32),
    ((4, 64), torch.bfloat16, torch.bfloat16),
    ((3, 2, 96), torch.bfloat16, torch.float32),  # fp32 norm weights on a bf16 stream: fp32 output
    ((3, 40), torch.float16, torch.float16),  # fp16 on CPU: the torch reference serves
    ((0, 32), torch.float32, torch.float32),
]


@needs_ext
@pytest.mark.parametrize("shape,dtype,w_dtype", CASES)
@pytest.mark.parametrize("residual", [False, True])
def test_cpp_matches_reference(shape, dtype, w_dtype, residual):
    _check_backend("cpp", shape, dtype, w_dtype, residual)


@pytest.mark.interpret
@pytest.mark.parametrize("shape,dtype,w_dtype", [c for c in CASES if c[0] != (2, 5, 130)]
                         + [((3, 33), torch.float16, torch.float16)])
@pytest.mark.parametrize("residual", [False, True])
def test_triton_interpreter_matches_reference(shape, dtype, w_dtype, residual):
    _check_backend("triton", shape, dtype, w_dtype, residual)


@needs_ext
def test_mixed_residual_dtype_promotes_like_the_add():
    """Under a bf16 autocast the residual stream is fp32 and the attention output bf16."""
    x = torch.randn(4, 64).bfloat16()
    res = torch.randn(4, 64)
    w = torch.ones(64)
    out, h = rms_norm(x, w, EPS, residual=res, backend="cpp")
    ref_out, ref_h = rms_norm_reference(x, w, EPS, res)
    assert h.dtype == out.dtype == torch.float32
    assert torch.equal(h, ref_h)
    assert_close(out, ref_out)


@needs_ext
def test_only_the_needed_gradients():
    x, w, r = _inputs((5, 32), torch.float32, torch.float32, True)
    w.requires_grad_(False)  # a frozen norm (LoRA base, reference model)
    out, h = rms_norm(x, w, EPS, residual=r, backend="cpp")
    (out.sum() + h.sum()).backward()
    assert w.grad is None and x.grad is not None and torch.equal(x.grad, r.grad)


@needs_ext
def test_autograd_keeps_half_of_what_hf_keeps():
    """Issue 18 target: with the residual add, at most 0.6x the bytes HF's module (plus the add) keeps."""
    x, w, r = _inputs((256, 512), torch.float32, torch.float32, True)
    with SavedTensorCounter() as ours:
        rms_norm(x, w, EPS, residual=r, backend="cpp")
    with SavedTensorCounter() as hf:
        rms_norm_reference(x, w, EPS, r)
    assert ours.bytes == 256 * 512 * 4 + 256 * 4 + 512 * 4  # h, rstd, weight
    assert ours.bytes <= 0.6 * hf.bytes


def test_bad_input_names_the_argument():
    x = torch.randn(2, 8)
    with pytest.raises(ValueError, match="weight must be \\[H\\]"):
        rms_norm(x, torch.ones(7))
    with pytest.raises(ValueError, match="residual must have x's shape"):
        rms_norm(x, torch.ones(8), residual=torch.randn(2, 7))
    with pytest.raises(ValueError, match="x must be float32"):
        rms_norm(x.long(), torch.ones(8))
    with pytest.raises(ValueError, match="eps must be >= 0"):
        rms_norm(x, torch.ones(8), eps=-1.0)
