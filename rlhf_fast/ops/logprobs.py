"""Fused log-prob gathering: LM head -> per-token log-probs (+ entropy) without holding [tokens, vocab].

Given hidden states h [N, H], an LM head W [V, H] (optional bias b [V]) and labels y [N]:
    z = (h @ W.T + b) / temperature                      (fp32 accumulation)
    logp[i] = z[i, y_i] - logsumexp_j z[i, j]
    entropy[i] = logsumexp_j z[i, j] - sum_j p_ij z_ij   (p = softmax(z))
Rows whose label equals ``ignore_index`` give logp = 0 and entropy = 0, and no gradient.
Outputs are fp32 whatever the input dtype.

Memory: no backend creates a tensor larger than ``chunk_size x V`` elements besides weight-sized
ones (the weight gradient, and for bf16/fp16 on CPU an fp32 copy of the weight). Forward keeps
only [N] results (logp, entropy, lse); backward recomputes each chunk of logits.
Backends: Triton (CUDA) fuses matmul + online log-sum-exp + gather + entropy over vocab tiles in
forward and recomputes logits tiles into a [chunk, V] grad_logits buffer in backward (then two
matmuls per chunk); C++ (CPU) runs torch.mm (MKL) into one reused [chunk, V] fp32 buffer and an
OpenMP row pass; "torch" is the same chunking with the row pass in torch ops.

Work and traffic (what benchmarks compare against): forward 2NHV flops, backward 6NHV (logits
recomputed, then grad_hidden and grad_weight), i.e. one matmul more than a materialising
implementation's 3 x 2NHV. HBM bytes, Triton forward: h once plus W once per 64-row block
(ceil(N/64) * V * H elements; L2 serves most re-reads), outputs 12N. No [N, V] traffic anywhere.
"""
from __future__ import annotations

from typing import NamedTuple

import torch

from rlhf_fast._backend import TRITON_INTERPRET, dispatch, ext, should_check_values
from rlhf_fast.ops._checks import check_floating, check_positive
from rlhf_fast.ops._triton import KernelSpec, tl, triton


class LogProbs(NamedTuple):
    """logprobs: fp32 [...]; entropy: fp32 [...] or None when not requested."""

    logprobs: torch.Tensor
    entropy: torch.Tensor | None


# --------------------------------------------------------------------------- torch reference
def logprobs_from_logits_reference(
    logits: torch.Tensor,
    labels: torch.Tensor,
    temperature: float = 1.0,
    ignore_index: int = -100,
    return_entropy: bool = False,
) -> LogProbs:
    """Pure-torch reference over full logits [..., V] (materialises a log-softmax copy). fp32 out."""
    z = logits.float() / temperature
    valid = labels != ignore_index
    safe = torch.where(valid, labels, torch.zeros_like(labels)).long()
    logsm = torch.log_softmax(z, dim=-1)
    zero = torch.zeros((), dtype=torch.float32, device=logits.device)
    logp = torch.where(valid, logsm.gather(-1, safe.unsqueeze(-1)).squeeze(-1), zero)
    ent = None
    if return_entropy:
        ent = torch.where(valid, -(logsm.exp() * logsm).sum(-1), zero)
    return LogProbs(logp, ent)


def fused_linear_logprobs_reference(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    bias: torch.Tensor | None = None,
    temperature: float = 1.0,
    ignore_index: int = -100,
    return_entropy: bool = False,
) -> LogProbs:
    """Pure-torch reference: materialises logits [..., V] in the input dtype (as a plain torch
    LM head does), then log-softmax in fp32. Pass fp32 inputs for the fp32 reference."""
    logits = hidden @ weight.t()
    if bias is not None:
        logits = logits + bias
    return logprobs_from_logits_reference(logits, labels, temperature, ignore_index, return_entropy)


# --------------------------------------------------------------------------- validation
def _check_labels(labels: torch.Tensor, shape: torch.Size, device: torch.device, V: int, ignore_index: int) -> None:
    if not isinstance(labels, torch.Tensor):
        raise TypeError(f"labels must be a torch.Tensor, got {type(labels).__name__}")
    if labels.dtype.is_floating_point or labels.dtype == torch.bool or labels.is_complex():
        raise ValueError(f"labels must be an integer tensor, got {labels.dtype}")
    if labels.shape != shape:
        raise ValueError(f"labels must have shape {tuple(shape)} (hidden without its last dim), got {tuple(labels.shape)}")
    if labels.device != device:
        raise ValueError(f"labels must be on {device}, got {labels.device}")
    if should_check_values(labels) and labels.numel() > 0:
        bad = (labels != ignore_index) & ((labels < 0) | (labels >= V))
        if bool(bad.any()):
            raise ValueError(
                f"labels must be in [0, {V}) or equal ignore_index={ignore_index}, found {labels[bad].flatten()[0].item()}"
            )


def _check_temperature(temperature: float) -> None:
    if isinstance(temperature, torch.Tensor) or not isinstance(temperature, (int, float)):
        raise TypeError(f"temperature must be a Python float, got {type(temperature).__name__}")
    check_positive("temperature", temperature)


# --------------------------------------------------------------------------- chunking
_CPU_CHUNK_ELEMS = 1 << 24  # one fp32 [chunk, V] buffer of <= 64 MiB: stays cheap, MKL stays efficient
_CUDA_CHUNK_ELEMS = 1 << 26  # <= 256 MiB of grad_logits per chunk on GPU


def default_chunk_size(N: int, V: int, device: torch.device) -> int:
    """Rows per chunk: the largest multiple of 16 with chunk x V under the device's budget (>= 16)."""
    budget = _CUDA_CHUNK_ELEMS if device.type == "cuda" else _CPU_CHUNK_ELEMS
    chunk = max(16, (budget // max(V, 1)) // 16 * 16)
    return max(1, min(N, chunk))


def _chunks(N: int, chunk: int):
    for r0 in range(0, N, chunk):
        yield r0, min(N, r0 + chunk)


# --------------------------------------------------------------------------- Triton
@triton.jit
def _lp_fwd_kernel(
    h_ptr, w_ptr, b_ptr, y_ptr, logp_ptr, ent_ptr, lse_ptr,
    N, V, H, stride_h, stride_w, inv_t, ignore_index,
    HAS_BIAS: tl.constexpr, WITH_ENTROPY: tl.constexpr, DOT_FP32: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr,
):
    """BLOCK_N rows per program: online log-sum-exp, label gather and entropy over vocab tiles of
    z = (h @ W.T + b) * inv_t. Writes logp, lse (and entropy) [N] fp32; never holds a row of logits."""
    pid = tl.program_id(0)
    rows = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    y = tl.load(y_ptr + rows, mask=row_ok, other=ignore_index)
    m = tl.full((BLOCK_N,), -1e30, dtype=tl.float32)  # running max of z (finite start: no 0 * inf below)
    s = tl.zeros((BLOCK_N,), dtype=tl.float32)  # sum exp(z - m)
    a = tl.zeros((BLOCK_N,), dtype=tl.float32)  # sum exp(z - m) * (z - m)
    zy = tl.zeros((BLOCK_N,), dtype=tl.float32)
    h_rows = h_ptr + rows.to(tl.int64)[:, None] * stride_h
    for v0 in range(0, V, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        col_ok = cols < V
        acc = tl.zeros((BLOCK_N, BLOCK_V), dtype=tl.float32)  # logits tile h @ W.T (+ b), over H tiles
        w_cols = w_ptr + cols.to(tl.int64)[None, :] * stride_w
        for k0 in range(0, H, BLOCK_H):
            ks = k0 + tl.arange(0, BLOCK_H)
            k_ok = ks < H
            hb = tl.load(h_rows + ks[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
            wb = tl.load(w_cols + ks[:, None], mask=k_ok[:, None] & col_ok[None, :], other=0.0)  # [BLOCK_H, BLOCK_V]
            if DOT_FP32:
                acc = tl.dot(hb.to(tl.float32), wb.to(tl.float32), acc, input_precision="ieee")  # not tf32
            else:
                acc = tl.dot(hb, wb, acc)
        if HAS_BIAS:
            acc += tl.load(b_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
        z = tl.where(col_ok[None, :], acc * inv_t, float("-inf"))
        m_new = tl.maximum(m, tl.max(z, axis=1))
        alpha = tl.exp(m - m_new)
        d = z - m_new[:, None]
        e = tl.exp(d)
        if WITH_ENTROPY:
            # re-centre the old sum on m_new: sum e'(z - m_new) = alpha * (a + s * (m - m_new))
            a = alpha * (a + tl.where(s > 0, s * (m - m_new), 0.0)) + tl.sum(tl.where(e == 0, 0.0, e * d), axis=1)
        s = s * alpha + tl.sum(e, axis=1)
        zy += tl.sum(tl.where(cols[None, :] == y[:, None], z, 0.0), axis=1)
        m = m_new
    log_s = tl.log(s)
    lse = m + log_s
    valid = y != ignore_index
    tl.store(lse_ptr + rows, lse, mask=row_ok)
    tl.store(logp_ptr + rows, tl.where(valid, zy - lse, 0.0), mask=row_ok)
    if WITH_ENTROPY:
        tl.store(ent_ptr + rows, tl.where(valid, log_s - a / s, 0.0), mask=row_ok)


@triton.jit
def _lp_bwd_kernel(
    h_ptr, w_ptr, b_ptr, y_ptr, lse_ptr, ent_ptr, gl_ptr, ge_ptr, g_ptr,
    n, V, H, stride_h, stride_w, stride_g, inv_t, ignore_index,
    HAS_BIAS: tl.constexpr, WITH_ENTROPY: tl.constexpr, DOT_FP32: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr,
):
    """One [BLOCK_N, BLOCK_V] tile of grad_logits for a chunk of n rows: recompute the logits tile,
    then g = inv_t * (gl * (1[j=y] - p) - ge * p * (log p + H)); ignored rows give 0. fp32 out."""
    pid_n = tl.program_id(0)
    pid_v = tl.program_id(1)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
    row_ok = rows < n
    col_ok = cols < V
    h_rows = h_ptr + rows.to(tl.int64)[:, None] * stride_h
    acc = tl.zeros((BLOCK_N, BLOCK_V), dtype=tl.float32)  # logits tile h @ W.T (+ b), over H tiles
    w_cols = w_ptr + cols.to(tl.int64)[None, :] * stride_w
    for k0 in range(0, H, BLOCK_H):
        ks = k0 + tl.arange(0, BLOCK_H)
        k_ok = ks < H
        hb = tl.load(h_rows + ks[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        wb = tl.load(w_cols + ks[:, None], mask=k_ok[:, None] & col_ok[None, :], other=0.0)  # [BLOCK_H, BLOCK_V]
        if DOT_FP32:
            acc = tl.dot(hb.to(tl.float32), wb.to(tl.float32), acc, input_precision="ieee")  # not tf32
        else:
            acc = tl.dot(hb, wb, acc)
    if HAS_BIAS:
        acc += tl.load(b_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    z = acc * inv_t
    y = tl.load(y_ptr + rows, mask=row_ok, other=ignore_index)
    lse = tl.load(lse_ptr + rows, mask=row_ok, other=0.0)
    gl = tl.load(gl_ptr + rows, mask=row_ok, other=0.0)
    d = z - lse[:, None]  # log p
    p = tl.exp(d)
    g = -p * gl[:, None]
    if WITH_ENTROPY:  # z - sum p z = log p + H
        ge = tl.load(ge_ptr + rows, mask=row_ok, other=0.0)
        ent = tl.load(ent_ptr + rows, mask=row_ok, other=0.0)
        g -= tl.where(p == 0, 0.0, p * ge[:, None] * (d + ent[:, None]))
    g += tl.where(cols[None, :] == y[:, None], gl[:, None], 0.0)
    g = tl.where((y != ignore_index)[:, None], g * inv_t, 0.0)
    out = g_ptr + rows.to(tl.int64)[:, None] * stride_g + cols[None, :]
    tl.store(out, g, mask=row_ok[:, None] & col_ok[None, :])


def _dot_in_fp32(dtype: torch.dtype) -> bool:
    """fp32 inputs dot in fp32 (ieee). bf16/fp16 use tensor cores on GPU, except bf16 under the
    interpreter: triton 3.9's interpreter computes bf16 tl.dot wrongly (numpy has no bf16; a
    16x16 bf16 dot comes out ~1e10 off), so there the tiles are upcast first."""
    return dtype == torch.float32 or (dtype == torch.bfloat16 and TRITON_INTERPRET)


def _tile_config(N: int, V: int, H: int, is_fp32: bool) -> dict:
    """Tiles for both kernels: [64, 128] logits tiles over H tiles of 16 (fp32) / 32 (bf16, fp16),
    8 warps; smaller for tiny problems (tl.dot needs >= 16 on every side). Chosen from the AOT
    resource table: H tiles of 32 (fp32) / 64 (bf16) hit 255 registers, and fp32 spilled."""
    block_n = min(64, max(16, triton.next_power_of_2(max(N, 1))))
    block_v = min(128, max(16, triton.next_power_of_2(max(V, 1))))
    block_h = min(16 if is_fp32 else 32, max(16, triton.next_power_of_2(max(H, 1))))
    num_warps = 8 if block_n * block_v >= 8192 else 4
    return {"BLOCK_N": block_n, "BLOCK_V": block_v, "BLOCK_H": block_h, "num_warps": num_warps, "num_stages": 3}


def _fwd_triton(h2, w, bias, y, logp, ent, lse, inv_t, ignore_index):
    N, H = h2.shape
    V = w.shape[0]
    cfg = _tile_config(N, V, H, h2.dtype == torch.float32)
    grid = (triton.cdiv(N, cfg["BLOCK_N"]),)
    _lp_fwd_kernel[grid](
        h2, w, bias if bias is not None else w, y, logp, ent if ent is not None else lse, lse,
        N, V, H, h2.stride(0), w.stride(0), inv_t, ignore_index,
        HAS_BIAS=bias is not None, WITH_ENTROPY=ent is not None, DOT_FP32=_dot_in_fp32(h2.dtype),
        BLOCK_N=cfg["BLOCK_N"], BLOCK_V=cfg["BLOCK_V"], BLOCK_H=cfg["BLOCK_H"],
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )


def _grad_logits_triton(G, hc, w, bias, yc, lsec, entc, glc, gec, inv_t, ignore_index):
    n, H = hc.shape
    V = w.shape[0]
    cfg = _tile_config(n, V, H, hc.dtype == torch.float32)
    grid = (triton.cdiv(n, cfg["BLOCK_N"]), triton.cdiv(V, cfg["BLOCK_V"]))
    with_ent = gec is not None
    _lp_bwd_kernel[grid](
        hc, w, bias if bias is not None else w, yc, lsec, entc if with_ent else lsec, glc,
        gec if with_ent else glc, G,
        n, V, H, hc.stride(0), w.stride(0), G.stride(0), inv_t, ignore_index,
        HAS_BIAS=bias is not None, WITH_ENTROPY=with_ent, DOT_FP32=_dot_in_fp32(hc.dtype),
        BLOCK_N=cfg["BLOCK_N"], BLOCK_V=cfg["BLOCK_V"], BLOCK_H=cfg["BLOCK_H"],
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )


def aot_specs() -> list[KernelSpec]:
    """Both kernels at H = 4096, V in {32k, 128k, 152k, 256k}, 8k tokens (chunk rows for backward),
    fp32 and bf16, with entropy and bias on (the larger variant), at _tile_config's choice."""
    specs = []
    H, N = 4096, 8192
    for dtype in ("fp32", "bf16"):
        for V in (32000, 128256, 152064, 256000):
            cfg = _tile_config(N, V, H, dtype == "fp32")
            const = {"HAS_BIAS": True, "WITH_ENTROPY": True, "DOT_FP32": dtype == "fp32",
                     "BLOCK_N": cfg["BLOCK_N"], "BLOCK_V": cfg["BLOCK_V"], "BLOCK_H": cfg["BLOCK_H"]}
            ints = {"stride_h": "i32", "stride_w": "i32", "inv_t": "fp32", "ignore_index": "i32"}
            flags = {k: "constexpr" for k in const}
            specs.append(KernelSpec(
                _lp_fwd_kernel,
                signature={"h_ptr": f"*{dtype}", "w_ptr": f"*{dtype}", "b_ptr": f"*{dtype}", "y_ptr": "*i64",
                           "logp_ptr": "*fp32", "ent_ptr": "*fp32", "lse_ptr": "*fp32",
                           "N": "i32", "V": "i32", "H": "i32", **ints, **flags},
                constexprs=const, num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
                label=f"{dtype} N={N} H={H} V={V}",
            ))
            chunk = default_chunk_size(N, V, torch.device("cuda"))
            cfg = _tile_config(chunk, V, H, dtype == "fp32")
            const = {**const, "BLOCK_N": cfg["BLOCK_N"], "BLOCK_V": cfg["BLOCK_V"], "BLOCK_H": cfg["BLOCK_H"]}
            specs.append(KernelSpec(
                _lp_bwd_kernel,
                signature={"h_ptr": f"*{dtype}", "w_ptr": f"*{dtype}", "b_ptr": f"*{dtype}", "y_ptr": "*i64",
                           "lse_ptr": "*fp32", "ent_ptr": "*fp32", "gl_ptr": "*fp32", "ge_ptr": "*fp32",
                           "g_ptr": "*fp32", "n": "i32", "V": "i32", "H": "i32", "stride_h": "i32",
                           "stride_w": "i32", "stride_g": "i32", "inv_t": "fp32", "ignore_index": "i32", **flags},
                constexprs=const, num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
                label=f"{dtype} chunk={chunk} H={H} V={V}",
            ))
    return specs


# --------------------------------------------------------------------------- CPU row passes
def _rows_fwd_cpp(z, yc, logp, ent, lse, inv_t, ignore_index):
    """z: fp32 [n, V] raw logits (row stride z.stride(0)); writes logp/ent/lse [n]."""
    ext().logprob_rows_fwd_f32(
        z.data_ptr(), yc.data_ptr(), logp.data_ptr(), ent.data_ptr() if ent is not None else 0, lse.data_ptr(),
        z.shape[0], z.shape[1], z.stride(0), inv_t, ignore_index,
    )


def _rows_fwd_torch(z, yc, logp, ent, lse, inv_t, ignore_index):
    zs = z.float() * inv_t
    row_lse = torch.logsumexp(zs, dim=1)
    valid = yc != ignore_index
    safe = torch.where(valid, yc, torch.zeros_like(yc))
    lse.copy_(row_lse)
    logp.copy_(torch.where(valid, zs.gather(1, safe[:, None]).squeeze(1) - row_lse, 0.0))
    if ent is not None:
        d = zs - row_lse[:, None]  # log p: centred, so H = -sum p log p has no large cancellation
        p = torch.exp(d)
        ent.copy_(torch.where(valid, -torch.where(p == 0, 0.0, p * d).sum(1), 0.0))  # -inf logit: 0, not 0*inf; NaN stays


def _rows_bwd_cpp(z, yc, lse, ent, gl, ge, inv_t, ignore_index):
    """In place: z (fp32 [n, V] raw logits, contiguous rows) becomes grad_logits."""
    ext().logprob_rows_bwd_f32(
        z.data_ptr(), yc.data_ptr(), lse.data_ptr(), ent.data_ptr() if ent is not None else 0,
        gl.data_ptr() if gl is not None else 0, ge.data_ptr() if ge is not None else 0,
        z.shape[0], z.shape[1], z.stride(0), inv_t, ignore_index,
    )


def _rows_bwd_torch(z, yc, lse, ent, gl, ge, inv_t, ignore_index):
    d = z * inv_t - lse[:, None]  # log p
    p = torch.exp(d)
    g = -p * (gl[:, None] if gl is not None else 0.0)
    if ge is not None:  # z - sum p z = log p + H
        g -= torch.where(p == 0, 0.0, p * ge[:, None] * (d + ent[:, None]))
    if gl is not None:
        g.scatter_add_(1, torch.where(yc != ignore_index, yc, 0)[:, None], gl[:, None])
    g = torch.where((yc != ignore_index)[:, None], g * inv_t, 0.0)
    z.copy_(g)


_ROWS_FWD = {"cpp": _rows_fwd_cpp, "torch": _rows_fwd_torch}
_ROWS_BWD = {"cpp": _rows_bwd_cpp, "torch": _rows_bwd_torch}


def _as_f32(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.float().contiguous()


# --------------------------------------------------------------------------- autograd
class FusedLinearLogprobsFunction(torch.autograd.Function):
    """h2 [N, H], weight [V, H], bias [V] | None, labels [N] int64 -> (logp [N], entropy [N] or [0]) fp32.

    Saves (h2, weight, bias, labels, lse, entropy) only when one of h2/weight/bias requires grad.
    """

    @staticmethod
    def forward(ctx, h2, weight, bias, labels, temperature, ignore_index, return_entropy, chunk, backend):
        N, H = h2.shape
        V = weight.shape[0]
        inv_t = 1.0 / temperature
        dev = h2.device
        logp = torch.empty(N, dtype=torch.float32, device=dev)
        lse = torch.empty(N, dtype=torch.float32, device=dev)
        ent = torch.empty(N if return_entropy else 0, dtype=torch.float32, device=dev)
        ent_arg = ent if return_entropy else None
        if N > 0:
            if backend == "triton":
                _fwd_triton(h2, weight, bias, labels, logp, ent_arg, lse, inv_t, ignore_index)
            else:
                # one fp32 [chunk, V] buffer, reused; bf16/fp16 matmuls run in fp32 on CPU
                w32, b32 = _as_f32(weight), _as_f32(bias)
                buf = torch.empty(min(chunk, N), V, dtype=torch.float32, device=dev)
                rows = _ROWS_FWD[backend]
                for r0, r1 in _chunks(N, chunk):
                    z = buf[: r1 - r0]
                    hc = h2[r0:r1].float()
                    if b32 is not None:
                        torch.addmm(b32, hc, w32.t(), out=z)
                    else:
                        torch.mm(hc, w32.t(), out=z)
                    rows(z, labels[r0:r1], logp[r0:r1], None if ent_arg is None else ent[r0:r1], lse[r0:r1],
                         inv_t, ignore_index)
                del buf
        if not return_entropy:
            ctx.mark_non_differentiable(ent)
        ctx.cfg = (inv_t, ignore_index, return_entropy, chunk, backend)
        if any(ctx.needs_input_grad[:3]):
            ctx.save_for_backward(h2, weight, bias, labels, lse, ent_arg)
        ctx.set_materialize_grads(False)
        return logp, ent

    @staticmethod
    def backward(ctx, grad_logp, grad_ent):
        h2, weight, bias, labels, lse, ent = ctx.saved_tensors
        inv_t, ignore_index, return_entropy, chunk, backend = ctx.cfg
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        N, H = h2.shape
        V = weight.shape[0]
        dev, dtype = h2.device, h2.dtype
        gl = _as_f32(grad_logp)
        ge = _as_f32(grad_ent) if return_entropy else None
        grad_h = torch.zeros_like(h2) if need_h else None
        grad_w = torch.zeros(V, H, dtype=torch.float32, device=dev) if need_w else None
        grad_b = torch.zeros(V, dtype=torch.float32, device=dev) if need_b else None
        if N == 0 or (gl is None and ge is None):
            return _finish_grads(grad_h, grad_w, grad_b, dtype)
        if gl is None:
            gl = torch.zeros(N, dtype=torch.float32, device=dev)
        on_gpu_path = backend == "triton"
        w32 = None if on_gpu_path else _as_f32(weight)
        b32 = None if on_gpu_path else _as_f32(bias)
        buf = torch.empty(min(chunk, N), V, dtype=torch.float32, device=dev)
        for r0, r1 in _chunks(N, chunk):
            G = buf[: r1 - r0]
            hc = h2[r0:r1]
            sl = slice(r0, r1)
            gec = ge[sl] if ge is not None else None
            if on_gpu_path:
                _grad_logits_triton(G, hc, weight, bias, labels[sl], lse[sl], ent[sl] if gec is not None else None,
                                    gl[sl], gec, inv_t, ignore_index)
            else:
                hc32 = hc.float()
                if b32 is not None:
                    torch.addmm(b32, hc32, w32.t(), out=G)
                else:
                    torch.mm(hc32, w32.t(), out=G)
                _ROWS_BWD[backend](G, labels[sl], lse[sl], ent[sl] if gec is not None else None, gl[sl], gec,
                                   inv_t, ignore_index)
            if need_h:
                if dtype == torch.float32:
                    torch.mm(G, weight, out=grad_h[sl])
                elif on_gpu_path:  # tensor-core matmul in the input dtype, fp32 accumulation inside
                    grad_h[sl] = G.to(dtype) @ weight
                else:
                    grad_h[sl] = G @ w32
            if need_w:
                grad_w.addmm_(G.t(), hc.float())
            if need_b:
                grad_b += G.sum(0)
        return _finish_grads(grad_h, grad_w, grad_b, dtype)


def _finish_grads(grad_h, grad_w, grad_b, dtype):
    grad_w = grad_w if grad_w is None or dtype == torch.float32 else grad_w.to(dtype)
    grad_b = grad_b if grad_b is None or dtype == torch.float32 else grad_b.to(dtype)
    return grad_h, grad_w, grad_b, None, None, None, None, None, None


class LogprobsFromLogitsFunction(torch.autograd.Function):
    """logits [N, V] (row stride arbitrary, unit column stride), labels [N] int64 -> (logp, entropy or [0])."""

    @staticmethod
    def forward(ctx, z2, labels, temperature, ignore_index, return_entropy, chunk, backend):
        N, V = z2.shape
        inv_t = 1.0 / temperature
        dev = z2.device
        logp = torch.empty(N, dtype=torch.float32, device=dev)
        lse = torch.empty(N, dtype=torch.float32, device=dev)
        ent = torch.empty(N if return_entropy else 0, dtype=torch.float32, device=dev)
        ent_arg = ent if return_entropy else None
        rows = _rows_fwd_cpp if backend == "cpp" else _rows_fwd_torch
        for r0, r1 in _chunks(N, chunk):
            zc = z2[r0:r1]
            if backend == "cpp" and zc.dtype != torch.float32:
                zc = zc.float()  # [chunk, V] upcast; fp32 logits are read in place
            rows(zc, labels[r0:r1], logp[r0:r1], None if ent_arg is None else ent[r0:r1], lse[r0:r1],
                 inv_t, ignore_index)
        if not return_entropy:
            ctx.mark_non_differentiable(ent)
        ctx.cfg = (inv_t, ignore_index, return_entropy, chunk, backend)
        if ctx.needs_input_grad[0]:
            ctx.save_for_backward(z2, labels, lse, ent_arg)
        ctx.set_materialize_grads(False)
        return logp, ent

    @staticmethod
    def backward(ctx, grad_logp, grad_ent):
        z2, labels, lse, ent = ctx.saved_tensors
        inv_t, ignore_index, return_entropy, chunk, backend = ctx.cfg
        N, V = z2.shape
        gl = _as_f32(grad_logp)
        ge = _as_f32(grad_ent) if return_entropy else None
        grad = torch.zeros(N, V, dtype=z2.dtype, device=z2.device)
        if N == 0 or (gl is None and ge is None):
            return grad, None, None, None, None, None, None
        if gl is None:
            gl = torch.zeros(N, dtype=torch.float32, device=z2.device)
        rows = _rows_bwd_cpp if backend == "cpp" else _rows_bwd_torch
        for r0, r1 in _chunks(N, chunk):
            sl = slice(r0, r1)
            # fp32: the gradient rows themselves are the work buffer; else one fp32 chunk copy
            G = grad[sl] if z2.dtype == torch.float32 else torch.empty(r1 - r0, V, dtype=torch.float32, device=z2.device)
            G.copy_(z2[sl])
            rows(G, labels[sl], lse[sl], ent[sl] if ge is not None else None, gl[sl],
                 ge[sl] if ge is not None else None, inv_t, ignore_index)
            if G.data_ptr() != grad[sl].data_ptr():
                grad[sl] = G
        return grad, None, None, None, None, None, None


# --------------------------------------------------------------------------- public API
def logprobs_from_logits(
    logits: torch.Tensor,
    labels: torch.Tensor,
    temperature: float = 1.0,
    ignore_index: int = -100,
    return_entropy: bool = False,
    chunk_size: int | None = None,
    backend: str | None = None,
) -> LogProbs:
    """Log-probs of ``labels`` under ``logits / temperature`` for callers that already hold logits.

    logits: [..., V] fp32/bf16/fp16. labels: [...] integer, in [0, V) or ignore_index.
    Returns LogProbs(logprobs fp32 [...], entropy fp32 [...] or None). Differentiable in logits.
    One pass over each row chunk, no log-softmax copy: besides the [N] results and the gradient
    itself (logits-shaped, in logits' dtype) nothing larger than chunk_size x V is created.
    backend: "cpp" reads fp32 logits in place; "torch"/"triton" use torch ops per chunk.
    """
    check_floating("logits", logits)
    if logits.dim() < 1 or logits.shape[-1] < 1:
        raise ValueError(f"logits must be [..., V] with V >= 1, got shape {tuple(logits.shape)}")
    _check_temperature(temperature)
    _check_labels(labels, logits.shape[:-1], logits.device, logits.shape[-1], ignore_index)
    if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")
    chosen = dispatch(logits, backend)
    V = logits.shape[-1]
    z2 = logits.reshape(-1, V)
    if z2.stride(-1) != 1:
        z2 = z2.contiguous()
    y = labels.reshape(-1).to(torch.int64).contiguous()
    chunk = chunk_size if chunk_size is not None else default_chunk_size(z2.shape[0], V, logits.device)
    logp, ent = LogprobsFromLogitsFunction.apply(
        z2, y, float(temperature), int(ignore_index), bool(return_entropy), chunk, chosen
    )
    out_shape = logits.shape[:-1]
    return LogProbs(logp.reshape(out_shape), ent.reshape(out_shape) if return_entropy else None)


def fused_linear_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    bias: torch.Tensor | None = None,
    temperature: float = 1.0,
    ignore_index: int = -100,
    return_entropy: bool = False,
    chunk_size: int | None = None,
    backend: str | None = None,
) -> LogProbs:
    """Per-token log-probs (and entropy) of ``labels`` under the LM head, never holding [N, V].

    hidden: [..., H] fp32/bf16/fp16. weight: [V, H], same dtype and device. labels: [...] integer
    in [0, V) or ``ignore_index``. bias: optional [V]. Logits are divided by ``temperature`` (> 0).
    chunk_size: rows per chunk (None picks one). backend: None | "triton" | "cpp" | "torch".
    Returns LogProbs(logprobs fp32 [...], entropy fp32 [...] or None); ignore_index rows give 0
    in both and no gradient. Differentiable in hidden, weight and bias through both outputs.
    """
    check_floating("hidden", hidden)
    check_floating("weight", weight)
    if hidden.dim() < 1:
        raise ValueError("hidden must be [..., H], got a 0-d tensor")
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[-1]:
        raise ValueError(f"weight must be [V, H={hidden.shape[-1]}], got {tuple(weight.shape)}")
    if weight.shape[0] < 1:
        raise ValueError(f"weight must have V >= 1 rows, got {tuple(weight.shape)}")
    if weight.dtype != hidden.dtype:
        raise ValueError(f"weight must have hidden's dtype {hidden.dtype}, got {weight.dtype}")
    if weight.device != hidden.device:
        raise ValueError(f"weight must be on hidden's device {hidden.device}, got {weight.device}")
    V = weight.shape[0]
    if bias is not None:
        check_floating("bias", bias)
        if bias.shape != (V,):
            raise ValueError(f"bias must be [V={V}], got {tuple(bias.shape)}")
        if bias.dtype != hidden.dtype or bias.device != hidden.device:
            raise ValueError(f"bias must be {hidden.dtype} on {hidden.device}, got {bias.dtype} on {bias.device}")
    _check_temperature(temperature)
    if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")
    _check_labels(labels, hidden.shape[:-1], hidden.device, V, ignore_index)
    chosen = dispatch(hidden, backend)
    H = hidden.shape[-1]
    h2 = hidden.reshape(-1, H)
    if h2.stride(-1) != 1 or h2.stride(0) != H:
        h2 = h2.contiguous()
    w = weight if weight.stride(-1) == 1 else weight.contiguous()
    y = labels.reshape(-1).to(torch.int64).contiguous()
    chunk = chunk_size if chunk_size is not None else default_chunk_size(h2.shape[0], V, hidden.device)
    logp, ent = FusedLinearLogprobsFunction.apply(
        h2, w, bias, y, float(temperature), int(ignore_index), bool(return_entropy), chunk, chosen
    )
    out_shape = hidden.shape[:-1]
    return LogProbs(logp.reshape(out_shape), ent.reshape(out_shape) if return_entropy else None)
