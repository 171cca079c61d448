"""``few_row_linear``: ``x @ weight.T + bias`` for the few rows of a decode step (B <= 8), on CPU.

    y [B, N] = x [B, K] @ weight [N, K]^T (+ bias [N])                 (fp32)

A decode step multiplies B <= 8 activation rows by every weight matrix, so it should take the time of
reading the weights once. On CPU, MKL's sgemm reaches about a third of the copy bandwidth at these shapes
(the 0.5B-width model's [8, 896] x [4864, 896]^T: 1.5-1.9 ms against a 0.54 ms floor) and the decode step
ran at 5x its floor. The C++ kernel (csrc/few_rows.cpp) streams each weight row once against all B
activation rows held in cache: 1.5-3x faster than ``F.linear`` there (``benchmarks/bench_decode.py``).

Only an inference op: no autograd (the dispatcher sends anything that needs a gradient, any dtype but
fp32, autocast, more than ``FEW_ROWS_MAX`` rows or a non-CPU tensor to the reference). No Triton kernel:
on a GPU, cuBLAS's small-batch GEMM already runs near the memory bandwidth. The C++ call is registered as
the torch custom op ``rlhf_fast::few_row_linear``, so ``torch.compile(fullgraph=True)`` traces through it.
Its sums run in a different order than MKL's: results equal ``F.linear`` to fp32 round-off.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from rlhf_fast._backend import dispatch, ext
from rlhf_fast.ops._cpu import ptr

FEW_ROWS_MAX = 8


# --------------------------------------------------------------------------- torch reference
def few_row_linear_reference(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    return F.linear(x, weight, bias)


# --------------------------------------------------------------------------- C++ (as a torch custom op)
@torch.library.custom_op("rlhf_fast::few_row_linear", mutates_args=())
def _few_row_linear_cpp(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                        portable: bool) -> torch.Tensor:
    B, K = x.shape
    N = weight.shape[0]
    y = torch.empty(B, N, dtype=torch.float32)
    ext().few_rows_linear_f32(ptr(x), ptr(weight), ptr(bias), ptr(y), B, N, K, portable)
    return y


@_few_row_linear_cpp.register_fake
def _(x, weight, bias, portable):
    return x.new_empty(x.shape[0], weight.shape[0])


def takes_cpp(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> bool:
    """Whether the C++ kernel computes this call: fp32 CPU tensors, 2-D x of 1..8 rows, contiguous weight (and
    bias), matching K, nothing that needs a gradient, no CPU autocast (which would run F.linear in bf16)."""
    tensors = (x, weight) if bias is None else (x, weight, bias)
    return (x.dim() == 2 and weight.dim() == 2 and 0 < x.shape[0] <= FEW_ROWS_MAX and x.shape[1] == weight.shape[1]
            and all(t.device.type == "cpu" and t.dtype == torch.float32 for t in tensors)
            and weight.is_contiguous() and (bias is None or (bias.dim() == 1 and bias.is_contiguous()
                                                             and bias.shape[0] == weight.shape[0]))
            and not (torch.is_grad_enabled() and any(t.requires_grad for t in tensors))
            and not torch.is_autocast_enabled("cpu"))


# --------------------------------------------------------------------------- dispatcher
def few_row_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, *,
                   backend: str | None = None, portable: bool = False) -> torch.Tensor:
    """``F.linear(x, weight, bias)``; the C++ kernel when the dispatcher picks "cpp" and ``takes_cpp`` holds.

    x: [B, K]; weight: [N, K]; bias: [N] or None -> [B, N]. backend: None (automatic), "cpp" or "torch"
    ("triton" computes with the reference: there is no Triton kernel). portable: the C++ scalar loop
    instead of AVX2 (tests)."""
    chosen = dispatch(x, backend)
    if chosen == "cpp" and takes_cpp(x, weight, bias):
        return _few_row_linear_cpp(x.contiguous(), weight, bias, portable)
    return few_row_linear_reference(x, weight, bias)
