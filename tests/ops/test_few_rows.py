"""few_row_linear: the C++ few-row kernel (AVX2 and portable loop) against F.linear, and when it is used."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from rlhf_fast import _backend
from rlhf_fast.ops.few_rows import FEW_ROWS_MAX, few_row_linear, takes_cpp

needs_ext = pytest.mark.skipif(not _backend.HAS_EXT, reason="extension not built (RLHF_FAST_NO_EXT run)")


@needs_ext
@pytest.mark.parametrize("portable", [False, True])
@pytest.mark.parametrize("B", [1, 2, 3, 4, 5, 7, 8])
@pytest.mark.parametrize("N,K", [(1, 1), (3, 7), (129, 13), (128, 896), (37, 4864)])
@pytest.mark.parametrize("with_bias", [False, True])
def test_equals_f_linear(B, N, K, with_bias, portable):
    g = torch.Generator().manual_seed(B * 1000 + N + K)
    x, w = torch.randn(B, K, generator=g), torch.randn(N, K, generator=g)
    bias = torch.randn(N, generator=g) if with_bias else None
    assert takes_cpp(x, w, bias)
    out = few_row_linear(x, w, bias, portable=portable)
    torch.testing.assert_close(out, F.linear(x, w, bias), rtol=1e-5, atol=1e-5 * K ** 0.5)


@needs_ext
def test_strided_rows_and_the_torch_backend():
    x = torch.randn(4, 64)[:, ::2]  # non-contiguous rows: copied to a contiguous block first
    w = torch.randn(33, 32)
    torch.testing.assert_close(few_row_linear(x, w), F.linear(x, w), rtol=1e-5, atol=1e-5)
    assert torch.equal(few_row_linear(x, w, backend="torch"), F.linear(x, w))


def test_calls_the_kernel_cannot_take_go_to_f_linear():
    x, w = torch.randn(4, 16), torch.randn(8, 16)
    assert not takes_cpp(torch.randn(FEW_ROWS_MAX + 1, 16), w, None)
    assert not takes_cpp(x.bfloat16(), w.bfloat16(), None)
    assert not takes_cpp(x, w.t().contiguous().t(), None)  # a transposed view of a weight
    assert not takes_cpp(x, torch.randn(8, 15), None)
    wg = w.clone().requires_grad_()
    assert not takes_cpp(x, wg, None)  # needs a gradient: the kernel has no backward
    with torch.no_grad():
        assert takes_cpp(x, wg, None)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not takes_cpp(x, w, None)  # F.linear would run in bf16 there
    out = few_row_linear(x, wg)
    out.sum().backward()  # went to F.linear, so gradients flow
    torch.testing.assert_close(wg.grad, x.sum(0).expand(8, 16))


@needs_ext
def test_custom_op_traces_in_a_full_graph():
    x, w, b = torch.randn(3, 24), torch.randn(10, 24), torch.randn(10)
    torch.library.opcheck(torch.ops.rlhf_fast.few_row_linear.default, (x, w, b, False),
                          test_utils=("test_schema", "test_faketensor"))
    torch._dynamo.reset()
    compiled = torch.compile(lambda x: few_row_linear(x, w, b) * 2, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(x), F.linear(x, w, b) * 2, rtol=1e-5, atol=1e-5)


@needs_ext
def test_the_lean_decoder_steps_through_the_kernel(monkeypatch):
    """Every matmul of a decode step (projections, MLP, LM head) goes through few_row_linear's kernel, and the
    logits still equal HF's forward."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    import rlhf_fast.models.decode as decode
    import rlhf_fast.ops.few_rows as few_rows

    torch.manual_seed(0)
    model = Qwen2ForCausalLM(Qwen2Config(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, vocab_size=101,
                                         tie_word_embeddings=False)).eval()
    calls = []
    real = few_rows._few_row_linear_cpp
    monkeypatch.setattr(few_rows, "_few_row_linear_cpp", lambda *a: calls.append(a[1].shape) or real(*a))
    ids = torch.randint(1, 101, (3, 6))
    with torch.inference_mode():
        dec = decode.LeanDecoder(model, 2)
        dec.prefill(ids[:, :5], torch.ones(3, 5, dtype=torch.long))
        assert len(calls) == 1  # the prefill's LM head on the last position
        logits = dec.step(ids[:, 5])
        full = model(ids).logits[:, -1]
    assert len(calls) == 1 + 2 * 7 + 1  # per layer q, k, v, o, gate, up, down; then the head
    torch.testing.assert_close(logits, full, rtol=1e-5, atol=1e-5)
