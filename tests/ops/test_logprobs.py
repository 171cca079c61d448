"""Fused LM-head log-probs (+ entropy): hand-worked values, every backend against the torch reference
(values and gradients of hidden, weight and bias through both outputs), the low-precision rule,
memory bounds (allocation tracker), nothing saved on reference passes, NaN propagation, bad input.

Triton runs through the interpreter in the ``-m interpret`` pass (TRITON_INTERPRET=1) at small shapes.
"""
import math

import pytest
import torch

from rlhf_fast import _backend
from rlhf_fast.memory.tracker import AllocationTracker
from rlhf_fast.ops import (
    fused_linear_logprobs,
    fused_linear_logprobs_reference,
    logprobs_from_logits,
    logprobs_from_logits_reference,
)
from rlhf_fast.ops.logprobs import default_chunk_size
from tests.utils import assert_close, assert_low_precision_rule

CPU_BACKENDS = ["torch"] + (["cpp"] if _backend.HAS_EXT else [])


def _make(N, H, V, dtype, bias, ignore_index=-100, p_ignore=0.2, scale=1.0):
    h = torch.randn(N, H)
    w = torch.randn(V, H) * (scale / math.sqrt(H)) * 3
    b = torch.randn(V) if bias else None
    y = torch.randint(0, V, (N,))
    y[torch.rand(N) < p_ignore] = ignore_index
    cast = lambda t: None if t is None else t.to(dtype)  # noqa: E731
    return cast(h), cast(w), cast(b), y


def _run(fn, h, w, b, y, gl, ge, **kw):
    """Forward + backward with upstream grads gl (logp) and ge (entropy, or None). Returns values, grads."""
    leaves = [t.clone().requires_grad_(True) if t is not None else None for t in (h, w, b)]
    lp, ent = fn(leaves[0], leaves[1], y, bias=leaves[2], return_entropy=ge is not None, **kw)
    loss = (lp * gl).sum() + ((ent * ge).sum() if ge is not None else 0.0)
    loss.backward()
    return lp.detach(), (ent.detach() if ent is not None else None), [None if t is None else t.grad for t in leaves]


def check_against_reference(backend, N, H, V, dtype, T=1.0, bias=True, entropy=True, ignore_index=-100, chunk=None):
    h, w, b, y = _make(N, H, V, dtype, bias, ignore_index)
    gl = torch.randn(N)
    ge = torch.randn(N) if entropy else None
    kw = dict(temperature=T, ignore_index=ignore_index)
    got = _run(fused_linear_logprobs, h, w, b, y, gl, ge, chunk_size=chunk, backend=backend, **kw)
    # fp32 reference on the same (rounded) inputs: our kernels upcast, so they should agree closely
    f32 = lambda t: None if t is None else t.float()  # noqa: E731
    ref = _run(fused_linear_logprobs_reference, f32(h), f32(w), f32(b), y, gl, ge, **kw)
    assert got[0].dtype == torch.float32 and got[0].shape == (N,)
    assert_close(got[0], ref[0], dtype, msg=f"logprobs {backend}")
    if entropy:
        assert got[1].dtype == torch.float32
        assert_close(got[1], ref[1], dtype, msg=f"entropy {backend}")
    else:
        assert got[1] is None
    for name, g, r, src in zip(("hidden", "weight", "bias"), got[2], ref[2], (h, w, b)):
        if src is None:
            continue
        assert g.dtype == src.dtype, name
        # the reference's fp32 grads are rounded to the input dtype for comparison
        assert_close(g, r.to(src.dtype), dtype, msg=f"grad {name} {backend}")
    valid = y != ignore_index
    assert torch.equal(got[0][~valid], torch.zeros(int((~valid).sum())))
    assert torch.all(got[2][0][~valid] == 0), "ignored rows must get no gradient"
    if dtype != torch.float32:  # docs/design.md low-precision rule against the torch reference run in `dtype`
        low = _run(fused_linear_logprobs_reference, h, w, b, y, gl, ge, **kw)
        assert_low_precision_rule(got[0], ref[0], low[0])
        if entropy:
            assert_low_precision_rule(got[1], ref[1], low[1])
        assert_low_precision_rule(got[2][0], ref[2][0], low[2][0])
        assert_low_precision_rule(got[2][1], ref[2][1], low[2][1])
    return got


# --------------------------------------------------------------------------- hand-worked
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_hand_worked_values(backend):
    # W = identity, so logits = hidden = [0, ln 2, ln 3] -> p = [1, 2, 3] / 6
    h = torch.tensor([[0.0, math.log(2.0), math.log(3.0)]] * 3)
    w = torch.eye(3)
    y = torch.tensor([2, 0, -100])
    lp, ent = fused_linear_logprobs(h, w, y, return_entropy=True, backend=backend)
    p = [1 / 6, 2 / 6, 3 / 6]
    H = -sum(q * math.log(q) for q in p)
    torch.testing.assert_close(lp, torch.tensor([math.log(0.5), math.log(1 / 6), 0.0]), atol=1e-6, rtol=0)
    torch.testing.assert_close(ent, torch.tensor([H, H, 0.0]), atol=1e-6, rtol=0)
    # temperature 2: z = logits / 2 -> p proportional to [1, sqrt 2, sqrt 3]
    lp2, _ = fused_linear_logprobs(h, w, y, temperature=2.0, backend=backend)
    denom = 1 + math.sqrt(2) + math.sqrt(3)
    torch.testing.assert_close(lp2[:2], torch.tensor([math.log(math.sqrt(3) / denom), math.log(1 / denom)]),
                               atol=1e-6, rtol=0)
    # d logp_y / d logits = onehot - p  (W = I so grad_hidden is grad_logits)
    hg = h[:1].clone().requires_grad_(True)
    fused_linear_logprobs(hg, w, y[:1], backend=backend).logprobs.sum().backward()
    torch.testing.assert_close(hg.grad, torch.tensor([[-1 / 6, -2 / 6, 1 - 3 / 6]]), atol=1e-6, rtol=0)


# --------------------------------------------------------------------------- CPU backends vs reference
CASES = [
    # N, H, V, T, bias, entropy, ignore_index, chunk
    (1, 16, 1271, 1.0, False, True, -100, None),
    (37, 64, 1271, 0.7, True, True, -100, 8),
    (37, 32, 1271, 1.0, False, False, -100, None),
    (64, 48, 777, 1.3, True, True, 7, 16),
    (5, 16, 32000, 0.9, True, True, -100, 2),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("case", CASES, ids=lambda c: "N{}_H{}_V{}_T{}_b{}_e{}_ii{}_c{}".format(*c))
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_cpu_backends_match_reference(backend, case, dtype):
    N, H, V, T, bias, entropy, ii, chunk = case
    check_against_reference(backend, N, H, V, dtype, T, bias, entropy, ii, chunk)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_chunking_does_not_change_results(backend):
    h, w, b, y = _make(50, 32, 300, torch.float32, True)
    a = fused_linear_logprobs(h, w, y, bias=b, return_entropy=True, chunk_size=7, backend=backend)
    c = fused_linear_logprobs(h, w, y, bias=b, return_entropy=True, chunk_size=50, backend=backend)
    assert_close(a.logprobs, c.logprobs)
    assert_close(a.entropy, c.entropy)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_entropy_only_gradient_and_leading_dims(backend):
    h, w, b, y = _make(24, 16, 200, torch.float32, False)
    h3, y3 = h.reshape(2, 3, 4, 16), y.reshape(2, 3, 4)
    hg, hr = h3.clone().requires_grad_(True), h3.clone().requires_grad_(True)
    out = fused_linear_logprobs(hg, w, y3, return_entropy=True, backend=backend)
    assert out.logprobs.shape == (2, 3, 4) and out.entropy.shape == (2, 3, 4)
    out.entropy.sum().backward()  # logp unused: its upstream grad is None
    fused_linear_logprobs_reference(hr, w, y3, return_entropy=True).entropy.sum().backward()
    assert_close(hg.grad, hr.grad)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_empty_batch(backend):
    h = torch.randn(2, 0, 8, requires_grad=True)
    w = torch.randn(10, 8, requires_grad=True)
    lp, ent = fused_linear_logprobs(h, w, torch.zeros(2, 0, dtype=torch.long), return_entropy=True, backend=backend)
    assert lp.shape == (2, 0) and ent.shape == (2, 0)
    (lp.sum() + ent.sum()).backward()
    assert h.grad.shape == h.shape and torch.equal(w.grad, torch.zeros(10, 8))


def test_default_chunk_size():
    assert default_chunk_size(16384, 152064, torch.device("cpu")) * 152064 <= 1 << 24
    assert default_chunk_size(3, 32000, torch.device("cpu")) == 3
    assert default_chunk_size(10**6, 10**9, torch.device("cpu")) == 16


# --------------------------------------------------------------------------- memory and saved tensors
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_no_tensor_larger_than_chunk_times_vocab(backend, dtype):
    N, H, V, chunk = 256, 16, 1271, 32
    h, w, b, y = _make(N, H, V, dtype, True)
    leaves = [t.clone().requires_grad_(True) for t in (h, w, b)]
    with AllocationTracker() as t:
        lp, ent = fused_linear_logprobs(*leaves[:2], y, bias=leaves[2], return_entropy=True, chunk_size=chunk,
                                        backend=backend)
        (lp * torch.randn(N)).sum().add((ent * torch.randn(N)).sum()).backward()
    assert t.max_numel <= chunk * V, f"{backend}: largest tensors {t.largest(3)}"
    # the check can fail: the materialising reference creates [N, V]
    with AllocationTracker() as r:
        fused_linear_logprobs_reference(*leaves[:2], y, bias=leaves[2]).logprobs.sum().backward()
    assert r.max_numel >= N * V


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_reference_pass_saves_nothing_and_training_pass_saves_no_logits(backend):
    N, H, V = 64, 16, 500
    h, w, b, y = _make(N, H, V, torch.float32, True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda x: saved.append(x.shape) or x, lambda x: x):
        out = fused_linear_logprobs(h, w, y, bias=b, return_entropy=True, backend=backend)
        assert out.logprobs.grad_fn is None and saved == []
        hg = h.clone().requires_grad_(True)
        fused_linear_logprobs(hg, w, y, bias=b, return_entropy=True, chunk_size=16, backend=backend)
    assert saved and all(math.prod(s) < N * V for s in saved), saved


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_gradients_only_for_inputs_that_require_them(backend):
    h, w, b, y = _make(20, 16, 100, torch.float32, True)
    wg = w.clone().requires_grad_(True)
    fused_linear_logprobs(h, wg, y, bias=b, backend=backend).logprobs.sum().backward()
    wr = w.clone().requires_grad_(True)
    fused_linear_logprobs_reference(h, wr, y, bias=b).logprobs.sum().backward()
    assert_close(wg.grad, wr.grad)


# --------------------------------------------------------------------------- NaN
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_nan_in_hidden_gives_nan_not_zero(backend):
    h, w, b, y = _make(6, 16, 300, torch.float32, False, p_ignore=0.0)
    h[2, 3] = float("nan")
    hg = h.clone().requires_grad_(True)
    lp, ent = fused_linear_logprobs(hg, w, y, return_entropy=True, backend=backend)
    assert torch.isnan(lp[2]) and torch.isnan(ent[2])
    assert torch.isfinite(lp[[0, 1, 3, 4, 5]]).all() and torch.isfinite(ent[[0, 1, 3, 4, 5]]).all()
    lp.sum().backward()
    assert torch.isnan(hg.grad[2]).all()
    wn = w.clone()
    wn[17, 0] = float("nan")  # one vocab row: every token's normaliser sees it
    assert torch.isnan(fused_linear_logprobs(h, wn, y, backend=backend).logprobs).all()


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_logits_nan_propagates(backend):
    z = torch.randn(3, 50)
    z[1, 4] = float("nan")
    lp, ent = logprobs_from_logits(z, torch.tensor([0, 1, 2]), return_entropy=True, backend=backend)
    assert torch.isnan(lp[1]) and torch.isnan(ent[1]) and torch.isfinite(lp[[0, 2]]).all()


# --------------------------------------------------------------------------- logprobs_from_logits
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("T,entropy", [(1.0, True), (0.6, False)])
def test_logprobs_from_logits_matches_reference(backend, dtype, T, entropy):
    z = (torch.randn(3, 13, 1271) * 3).to(dtype)
    y = torch.randint(0, 1271, (3, 13))
    y[0, :4] = -100
    gl, ge = torch.randn(3, 13), torch.randn(3, 13)
    zg, zr = z.clone().requires_grad_(True), z.clone().requires_grad_(True)
    a = logprobs_from_logits(zg, y, temperature=T, return_entropy=entropy, chunk_size=5, backend=backend)
    r = logprobs_from_logits_reference(zr, y, temperature=T, return_entropy=entropy)
    assert a.logprobs.dtype == torch.float32
    assert_close(a.logprobs, r.logprobs, torch.float32)  # both upcast the same inputs
    loss_a = (a.logprobs * gl).sum() + ((a.entropy * ge).sum() if entropy else 0)
    loss_r = (r.logprobs * gl).sum() + ((r.entropy * ge).sum() if entropy else 0)
    if entropy:
        assert_close(a.entropy, r.entropy, torch.float32)
    else:
        assert a.entropy is None
    loss_a.backward()
    loss_r.backward()
    assert zg.grad.dtype == dtype
    assert_close(zg.grad, zr.grad, dtype)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_logprobs_from_logits_makes_no_log_softmax_copy(backend):
    N, V, chunk = 128, 2000, 16
    z = torch.randn(N, V)
    y = torch.randint(0, V, (N,))
    with AllocationTracker() as t:
        logprobs_from_logits(z, y, return_entropy=True, chunk_size=chunk, backend=backend)
    assert t.max_numel <= chunk * V, t.largest(3)


# --------------------------------------------------------------------------- bad input
def _ok():
    return torch.randn(4, 8), torch.randn(10, 8), torch.randint(0, 10, (4,))


@pytest.mark.parametrize(
    "mutate,match",
    [
        (lambda h, w, y: (h, w, y[:3]), "labels must have shape"),
        (lambda h, w, y: (h, torch.randn(10, 7), y), "weight must be"),
        (lambda h, w, y: (h, w, torch.tensor([0, 1, 10, 2])), r"labels must be in \[0, 10\)"),
        (lambda h, w, y: (h, w, torch.tensor([0, 1, -1, 2])), "found -1"),
        (lambda h, w, y: (h, w, y.float()), "labels must be an integer"),
        (lambda h, w, y: (h.long(), w, y), "hidden must be float32"),
        (lambda h, w, y: (h, w.double(), y), "weight must be float32"),
        (lambda h, w, y: (h, w.half(), y), "weight must have hidden's dtype"),
        (lambda h, w, y: (h, w.to("meta"), y), "weight must be on hidden's device"),
        (lambda h, w, y: (h, w, y.to("meta")), "labels must be on"),
    ],
)
def test_bad_input_fused(mutate, match):
    h, w, y = mutate(*_ok())
    with pytest.raises(ValueError, match=match):
        fused_linear_logprobs(h, w, y)


def test_bad_scalars_and_bias():
    h, w, y = _ok()
    for T in (0.0, -1.0):
        with pytest.raises(ValueError, match="temperature must be > 0"):
            fused_linear_logprobs(h, w, y, temperature=T)
    with pytest.raises(ValueError, match="chunk_size"):
        fused_linear_logprobs(h, w, y, chunk_size=0)
    with pytest.raises(ValueError, match=r"bias must be \[V=10\]"):
        fused_linear_logprobs(h, w, y, bias=torch.zeros(9))
    with pytest.raises(ValueError, match="backend must be one of"):
        fused_linear_logprobs(h, w, y, backend="cuda")
    with pytest.raises(ValueError, match="temperature must be > 0"):
        logprobs_from_logits(torch.randn(4, 10), y, temperature=0.0)
    with pytest.raises(ValueError, match=r"labels must be in \[0, 10\)"):
        logprobs_from_logits(torch.randn(4, 10), torch.tensor([0, 11, 1, 2]))
    with pytest.raises(ValueError, match="logits must be float32"):
        logprobs_from_logits(torch.randint(0, 3, (4, 10)), y)


# --------------------------------------------------------------------------- Triton (interpreter)
@pytest.mark.interpret
@pytest.mark.parametrize(
    "N,H,V,dtype,T,bias,entropy",
    [
        (37, 64, 1271, torch.float32, 0.7, True, True),
        (1, 16, 33, torch.float32, 1.0, False, True),
        (20, 32, 300, torch.bfloat16, 1.3, True, True),
        (19, 24, 500, torch.float16, 1.0, False, False),
    ],
)
def test_triton_interpreter_matches_reference(N, H, V, dtype, T, bias, entropy):
    check_against_reference("triton", N, H, V, dtype, T, bias, entropy, chunk=16)


@pytest.mark.interpret
def test_triton_interpreter_memory_and_nan():
    N, H, V, chunk = 64, 16, 300, 16
    h, w, b, y = _make(N, H, V, torch.float32, True)
    leaves = [t.clone().requires_grad_(True) for t in (h, w, b)]
    with AllocationTracker() as t:
        lp, ent = fused_linear_logprobs(*leaves[:2], y, bias=leaves[2], return_entropy=True, chunk_size=chunk,
                                        backend="triton")
        (lp.sum() + ent.sum()).backward()
    assert t.max_numel <= chunk * V, t.largest(3)
    h[3, 0] = float("nan")
    y[3] = 1
    lp, ent = fused_linear_logprobs(h, w, y, return_entropy=True, backend="triton")
    assert torch.isnan(lp[3]) and torch.isnan(ent[3]) and torch.isfinite(lp[:3]).all()
