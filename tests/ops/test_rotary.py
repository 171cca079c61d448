"""rotary through every backend: HF's apply_rotary_pos_emb in its own layouts (GQA, rope-scaling variants,
packed positions), dtype pairs, gradients, what autograd keeps, bad input."""
import pytest
import torch

from rlhf_fast import _backend
from rlhf_fast.memory.tracker import SavedTensorCounter
from rlhf_fast.ops import rotary, rotary_reference
from tests.utils import assert_matches_reference

needs_ext = pytest.mark.skipif(not _backend.HAS_EXT, reason="extension not built (RLHF_FAST_NO_EXT run)")

ROPE_VARIANTS = [
    {"rope_type": "default"},
    {"rope_type": "linear", "factor": 2.0},
    {"rope_type": "dynamic", "factor": 2.0},
    {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32},
    {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
     "original_max_position_embeddings": 32},
]


def _cos_sin(B, T, D, dtype=torch.float32, rope=None, positions=None, seed=0):
    """cos, sin [B, T, D] from HF's LlamaRotaryEmbedding (the model's own code path)."""
    import transformers as tf
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    cfg = tf.LlamaConfig(hidden_size=4 * D, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         rope_parameters={**(rope or {"rope_type": "default"}), "rope_theta": 10000.0})
    g = torch.Generator().manual_seed(seed)
    if positions is None:
        positions = torch.randint(0, 200, (B, T), generator=g)
    return LlamaRotaryEmbedding(cfg)(torch.ones(1, dtype=dtype), positions)


def _qk(B, T, Hq, Hk, D, dtype, seed=0):
    """q, k as HF's attention makes them: projections viewed [B, T, H, D], transposed to [B, H, T, D]."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, T, Hq * D, generator=g).to(dtype).view(B, T, Hq, D).transpose(1, 2)
    k = torch.randn(B, T, Hk * D, generator=g).to(dtype).view(B, T, Hk, D).transpose(1, 2)
    return q.detach().requires_grad_(), k.detach().requires_grad_()


def _run(q, k, cos, sin, backend, unsqueeze_dim=1, seed=1):
    fn = rotary_reference if backend == "reference" else lambda *a: rotary(*a, backend=backend)
    outs = fn(q, k, cos, sin, unsqueeze_dim)
    g = torch.Generator().manual_seed(seed)
    ups = [torch.randn(o.shape, generator=g).to(o.dtype).transpose(-1, -2).contiguous().transpose(-1, -2)
           for o in outs]  # upstream gradients with another layout (last dim strided)
    return (*outs, *torch.autograd.grad(outs, [q, k], ups))


@needs_ext
@pytest.mark.parametrize("rope", ROPE_VARIANTS, ids=lambda r: r["rope_type"])
def test_fp32_equals_hf_apply_rotary_pos_emb(rope):
    """GQA (8 query heads, 2 KV heads), positions restarting per packed sequence, every rope type."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    q, k = _qk(2, 9, 8, 2, 32, torch.float32)
    positions = torch.tensor([[0, 1, 2, 3, 0, 1, 2, 0, 1], [0, 1, 2, 3, 4, 5, 6, 7, 8]])
    cos, sin = _cos_sin(2, 9, 32, rope=rope, positions=positions)
    ours, hf = rotary(q, k, cos, sin, backend="cpp"), apply_rotary_pos_emb(q, k, cos, sin)
    for a, b in zip(ours, hf):
        assert torch.equal(a, b) and a.stride() == b.stride()
    ups = [torch.randn_like(t) for t in hf]
    for a, b in zip(torch.autograd.grad(ours, [q, k], ups), torch.autograd.grad(hf, [q, k], ups)):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


PAIRS = [  # (q/k dtype, cos/sin dtype)
    (torch.float32, torch.float32),
    (torch.bfloat16, torch.bfloat16),
    (torch.bfloat16, torch.float32),  # autocast: bf16 projections, fp32 cos/sin -> fp32 out
    (torch.float16, torch.float16),
]


def _check_backend(backend, qd, cd, B=2, T=5, Hq=6, Hk=2, D=16, unsqueeze_dim=1, cos_batch=None):
    q, k = _qk(B, T, Hq, Hk, D, qd)
    cos, sin = _cos_sin(cos_batch or B, T, D, cd)
    if unsqueeze_dim == 2:
        q, k = q.detach().transpose(1, 2).requires_grad_(), k.detach().transpose(1, 2).requires_grad_()
    got = _run(q, k, cos, sin, backend, unsqueeze_dim)
    low = _run(q, k, cos, sin, "reference", unsqueeze_dim)
    q32, k32 = q.detach().float().requires_grad_(), k.detach().float().requires_grad_()
    ref32 = _run(q32, k32, cos.float(), sin.float(), "reference", unsqueeze_dim)
    for a, b in zip(got[:2], low[:2]):  # q_embed, k_embed keep HF's layout (strides of size-1 dims are free)
        assert [s for s, n in zip(a.stride(), a.shape) if n > 1] == [s for s, n in zip(b.stride(), b.shape) if n > 1]
    for a, b, c in zip(got, low, ref32):
        assert_matches_reference(a, b, c, b.dtype if b.dtype != torch.float32 else qd, backend)


@needs_ext
@pytest.mark.parametrize("qd,cd", PAIRS)
def test_cpp_matches_reference(qd, cd):
    _check_backend("cpp", qd, cd)


@needs_ext
def test_layouts_cpp():
    _check_backend("cpp", torch.float32, torch.float32, unsqueeze_dim=2)  # q [B, T, H, D]
    _check_backend("cpp", torch.float32, torch.float32, cos_batch=1)  # cos [1, T, D] broadcast over the batch
    _check_backend("cpp", torch.bfloat16, torch.bfloat16, Hq=1, Hk=1, D=2)
    q, k = _qk(1, 4, 2, 1, 8, torch.float32)
    cos, sin = _cos_sin(1, 4, 8)
    for a, b in zip(rotary(q, k, cos[0], sin[0], backend="cpp"), rotary_reference(q, k, cos, sin)):  # [T, D]
        assert torch.equal(a, b)


@pytest.mark.interpret
@pytest.mark.parametrize("qd,cd", PAIRS)
def test_triton_interpreter_matches_reference(qd, cd):
    _check_backend("triton", qd, cd)


@pytest.mark.interpret
def test_layouts_triton_interpreter():
    _check_backend("triton", torch.float32, torch.float32, unsqueeze_dim=2)
    _check_backend("triton", torch.float32, torch.float32, cos_batch=1, Hq=3, Hk=1, D=12)


@needs_ext
def test_cos_requiring_grad_takes_the_reference_and_gets_its_gradient():
    q, k = _qk(1, 3, 2, 1, 8, torch.float32)
    cos, sin = (t.requires_grad_() for t in _cos_sin(1, 3, 8))
    a, b = rotary(q, k, cos, sin, backend="cpp")
    (a.sum() + b.sum()).backward()
    assert cos.grad is not None and sin.grad is not None


@needs_ext
def test_autograd_keeps_only_cos_and_sin():
    q, k = _qk(2, 64, 8, 2, 32, torch.float32)
    cos, sin = _cos_sin(2, 64, 32)
    with SavedTensorCounter() as ours:
        rotary(q, k, cos, sin, backend="cpp")
    with SavedTensorCounter() as hf:
        rotary_reference(q, k, cos, sin)
    assert ours.bytes == hf.bytes == 2 * cos.numel() * 4


def test_bad_input_names_the_argument():
    q, k = _qk(1, 4, 2, 1, 8, torch.float32)
    cos, sin = _cos_sin(1, 4, 8)
    with pytest.raises(ValueError, match="cos and sin must be"):
        rotary(q, k, cos[:, :3], sin[:, :3])
    with pytest.raises(ValueError, match="k must match q"):
        rotary(q, k[:, :, :3], cos, sin)
    with pytest.raises(ValueError, match="head_dim must be even"):
        rotary(q[..., :7], k[..., :7], cos[..., :7], sin[..., :7])
    with pytest.raises(ValueError, match="unsqueeze_dim must be"):
        rotary(q, k, cos, sin, unsqueeze_dim=3)
    with pytest.raises(ValueError, match="sin must have cos's shape"):
        rotary(q, k, cos, sin[0])
