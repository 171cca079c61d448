"""The byte-accounting rules: what each tensor a PPO step keeps costs, in bytes.

Two kinds of rule, one set of conventions:

**Of real (or meta-device) modules** (``param_bytes``, ``grad_bytes``, ``adamw_state_bytes``,
``component_bytes``, ``layout_bytes``): they read only ``numel`` and ``dtype`` of parameters, so they
work on modules built on the ``meta`` device (no storage), and tests check them against real
allocations. What torch actually allocates:
- a gradient has the dtype and numel of its parameter, and only trainable parameters get one;
- ``torch.optim.AdamW`` keeps ``exp_avg`` and ``exp_avg_sq`` in the parameter's dtype (``amsgrad``
  adds ``max_exp_avg_sq``) plus one fp32 ``step`` scalar per parameter tensor;
- tied parameters (same ``nn.Parameter`` reached twice, e.g. embeddings tied to the LM head) count once.

**Of an architecture and a run** (``ModelShape`` and ``Setup`` from ``rlhf_fast.memory.spec``), which the
predictor (``rlhf_fast.memory.predictor``) adds up per layout. Every size in bytes, per GPU;
``a`` = bytes of ``Setup.dtype``; tokens = B · (P + R).

Parameter storage and optimizer (``trainable_element_bytes``; ``Setup.precision``, per trainable
parameter; frozen ones take ``a``):
- ``mixed`` (default): parameters and gradients in ``dtype``; the optimizer keeps an fp32 master copy
  plus fp32 AdamW m and v (4 + 4 + 4 bytes; no master copy when ``dtype`` is fp32). This is the usual
  bf16 recipe of large-scale trainers (Megatron / DeepSpeed bf16 optimizer): 2 + 2 + 12 = 16 bytes.
- ``pure``: parameters, gradients and AdamW m, v all in ``dtype`` (what ``torch.optim.AdamW`` does on
  a model loaded in bf16, the convention above): 2 + 2 + 4 = 8 bytes. The measured micro-step
  (``rlhf_fast.memory.micro_step``) compares against this mode, since that is what a plain torch step
  allocates.
- ``amp``: fp32 parameters, gradients and m, v with bf16 autocast compute (TRL's ``bf16=True`` on an
  fp32-loaded model, and our trainer on an fp32 model): 4 + 4 + 8 = 16 bytes.
Trainable bytes are 16 per parameter under both ``mixed`` and ``amp``; they differ in where the bytes
sit and in the four-model layout's frozen copies (reference and reward take the policy's storage dtype:
fp32 under ``amp``). Note that ``PolicyValueModel`` keeps fp32 policy weights by default
(``dtype=torch.float32``) and our trainer autocasts, i.e. ``amp``; TRL 1.12 with ``bf16=True`` on an
fp32-loaded model is ``amp`` as well. ``optimizer="sgd"`` drops m and v (a master copy stays under
``mixed``). The 4-byte AdamW ``step`` per parameter tensor is ignored here (< 1 KiB).

Activations of one backbone (``activation_bytes``; saved for backward, flash/memory-efficient
attention: no T×T scores), per layer per token, with q = heads · head_dim, kv = kv_heads · head_dim,
I = intermediate:
    a · (2H + 3q + 3kv + 4I) + 2 · 4H
(the two RMSNorm outputs; q, k pre- and post-RoPE and v; the attention output; gate, up, act(gate) and
their product; plus the fp32 input copies the two RMSNorms keep). Without checkpointing: L layers of
that, plus the final norm (H · (4 + a)). With checkpointing: the layer inputs a · H per layer plus one
layer's full activations (recomputed in backward) plus the final norm.

With the fused backbone (``fused_backbone=True``, ``rlhf_fast.models.patch_backbone``), per layer per token
    a · (2H + 3q + 3kv + 2I)
and a · H for the final norm: each fused RMSNorm keeps its input in the input dtype and an fp32 scalar
per row, where HF's keeps an fp32 copy of the input and the normalised tensor (4H bytes less per norm,
whatever the dtype: fp32 x + fp32 normalised -> x, or fp32 copy + bf16 normalised -> bf16 x); SwiGLU
keeps gate and up but not act(gate), and the product ``down_proj`` would keep is rebuilt in backward
(2 · a · I less). The rotary embedding saves what HF's saves (cos and sin, shared by all layers). Under
checkpointing the recomputed layer keeps the product again (the rebuild steps aside beneath
checkpointing's own saved-tensor hooks): a · I more in that one layer.

Log-prob buffers. Naive (``naive_logprob_buffer_bytes``, TRL's path): the full fp32 logits [B·T, V]
plus the log-softmax copy, 2 · B·T·V · 4. Fused (``fused_logprob_buffer_bytes``,
``rlhf_fast.ops.fused_linear_logprobs``): one fp32 [chunk, V] buffer (``logprob_chunk_bytes``) with
chunk = ``default_chunk_size(B·R, V, device)`` (only response positions are scored), plus, when the LM
head is trainable and stored in bf16/fp16 (not under ``amp``), its fp32 weight-gradient accumulator
V·H·4 (and on CPU an fp32 copy of the weight, V·H·4). Tied embeddings with a trainable head
(``tied_head_grad_bytes``): + 2 · V·H gradient bytes (the head's and the embedding's gradient and their
sum coexist).

KV cache during generation (``kv_cache_bytes``): 2 · L · kv_heads · head_dim · (P + R) · B_gen · a
(policy only; B_gen = ``Setup.gen_batch``, default ``Setup.batch``).

torch is imported inside the functions that need it (``rlhf-fast --help`` stays fast).
"""
from __future__ import annotations

from collections.abc import Iterable
from typing import NamedTuple

from rlhf_fast.memory.spec import DTYPE_BYTES, ModelShape, Setup

ADAMW_MOMENTS = 2  # exp_avg and exp_avg_sq (amsgrad adds max_exp_avg_sq)


# --------------------------------------------------------------------------- element sizes
def dtype_bytes(dtype) -> int:
    """Bytes of one element of ``dtype``: a ``torch.dtype`` or a name of ``DTYPE_BYTES`` ("bf16", "fp16", "fp32")."""
    if isinstance(dtype, str):
        if dtype not in DTYPE_BYTES:
            raise ValueError(f"dtype must be a torch.dtype or one of {', '.join(DTYPE_BYTES)}, got {dtype!r}")
        return DTYPE_BYTES[dtype]
    return dtype.itemsize


def torch_dtype(name: str):
    """The ``torch.dtype`` of a ``DTYPE_BYTES`` name ("bf16", "fp16", "fp32")."""
    import torch

    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[name]


def tensor_bytes(numel: int, dtype) -> int:
    """Bytes of ``numel`` elements of ``dtype`` (a ``torch.dtype`` or a ``DTYPE_BYTES`` name)."""
    return int(numel) * dtype_bytes(dtype)


# --------------------------------------------------------------------------- real or meta modules
class ComponentBytes(NamedTuple):
    """Bytes one component holds. ``params = trainable_params + frozen_params``."""

    trainable_params: int
    frozen_params: int
    grads: int
    optimizer: int

    @property
    def params(self) -> int:
        return self.trainable_params + self.frozen_params

    @property
    def total(self) -> int:
        return self.params + self.grads + self.optimizer

    def __add__(self, other):  # component sums, not tuple concatenation
        return ComponentBytes(*(a + b for a, b in zip(self, other)))


ZERO = ComponentBytes(0, 0, 0, 0)


def _unique_params(params: Iterable) -> list:
    seen, out = set(), []
    for p in params:
        if id(p) not in seen:
            seen.add(id(p))
            out.append(p)
    return out


def _params_of(obj) -> list:
    from torch import nn

    if obj is None:
        return []
    if isinstance(obj, nn.Module):
        return _unique_params(obj.parameters())
    return _unique_params(obj)


def param_bytes(module_or_params, trainable: bool | None = None) -> int:
    """Parameter bytes; ``trainable=True/False`` restricts to parameters with/without requires_grad."""
    return sum(
        tensor_bytes(p.numel(), p.dtype)
        for p in _params_of(module_or_params)
        if trainable is None or p.requires_grad == trainable
    )


def grad_bytes(module_or_params) -> int:
    """Bytes of the gradients a backward pass allocates: one per trainable parameter, same dtype."""
    return param_bytes(module_or_params, trainable=True)


def adamw_state_bytes(module_or_params, amsgrad: bool = False, state_dtype=None) -> int:
    """Bytes of ``torch.optim.AdamW`` state over the trainable parameters after its first step.

    Two moments (three with ``amsgrad``) in the parameter dtype (or ``state_dtype`` for optimizers that
    keep fp32 moments of low-precision weights) plus a 4-byte fp32 ``step`` per parameter tensor.
    """
    moments = ADAMW_MOMENTS + (1 if amsgrad else 0)
    total = 0
    for p in _params_of(module_or_params):
        if p.requires_grad:
            total += moments * tensor_bytes(p.numel(), state_dtype or p.dtype) + 4
    return total


def component_bytes(module_or_params, optimizer: str | None = "adamw") -> ComponentBytes:
    """Account one component. ``optimizer``: "adamw" (state for trainable params) or None (no optimizer)."""
    if optimizer not in ("adamw", None):
        raise ValueError(f"optimizer must be 'adamw' or None, got {optimizer!r}")
    return ComponentBytes(
        trainable_params=param_bytes(module_or_params, trainable=True),
        frozen_params=param_bytes(module_or_params, trainable=False),
        grads=grad_bytes(module_or_params),
        optimizer=adamw_state_bytes(module_or_params) if optimizer == "adamw" else 0,
    )


def layout_bytes(components: dict[str, object], optimizer: str | None = "adamw") -> dict[str, ComponentBytes]:
    """Account several components, parameters shared between them counted once (first one wins).

    ``components``: name -> module or iterable of parameters. Returns name -> ComponentBytes plus a
    ``"total"`` entry. Use it on ``PolicyValueModel.components()``.
    """
    seen: set[int] = set()
    out: dict[str, ComponentBytes] = {}
    total = ZERO
    for name, obj in components.items():
        own = [p for p in _params_of(obj) if id(p) not in seen]
        seen.update(id(p) for p in own)
        out[name] = component_bytes(own, optimizer)
        total = total + out[name]
    out["total"] = total
    return out


def format_layout(table: dict[str, ComponentBytes]) -> str:
    """A fixed-width text table of ``layout_bytes`` output in MiB."""
    mib = 2.0 ** 20
    lines = [f"{'component':<12} {'trainable':>10} {'frozen':>10} {'grads':>10} {'adamw':>10} {'total':>10}  (MiB)"]
    for name, c in table.items():
        lines.append(
            f"{name:<12} {c.trainable_params / mib:>10.2f} {c.frozen_params / mib:>10.2f} "
            f"{c.grads / mib:>10.2f} {c.optimizer / mib:>10.2f} {c.total / mib:>10.2f}"
        )
    return "\n".join(lines)


# --------------------------------------------------------------------------- an architecture and a run
def trainable_element_bytes(dtype: str, precision: str, optimizer: str) -> tuple[int, int, int]:
    """(param, grad, optimizer) bytes per trainable element (module docstring: ``mixed`` / ``pure`` / ``amp``)."""
    a = dtype_bytes(dtype)
    moments = ADAMW_MOMENTS if optimizer == "adamw" else 0
    if precision == "amp" or dtype == "fp32":
        return 4, 4, 4 * moments
    if precision == "pure":
        return a, a, a * moments
    return a, a, 4 + 4 * moments  # mixed: fp32 master + fp32 moments


def activation_bytes(shape: ModelShape, tokens: int, act_bytes: int, checkpointing: bool,
                     forward_only: bool = False, fused_backbone: bool = False) -> int:
    """Saved activations of one backbone over ``tokens`` tokens (module docstring formulas).

    ``forward_only`` with checkpointing: what the forward pass itself keeps (layer inputs + final norm),
    without the one layer recomputed during backward. ``fused_backbone``: the backbone runs the fused
    RMSNorm / SwiGLU / rotary ops (``rlhf_fast.models.patch_backbone``)."""
    H, inter = shape.hidden, shape.intermediate
    q, kv = shape.heads * shape.head_dim, shape.kv_heads * shape.head_dim
    shared = act_bytes * (2 * H + 3 * q + 3 * kv + 2 * inter)  # what both variants keep
    if fused_backbone:
        per_layer, final_norm = shared, H * act_bytes
        recomputed_layer = per_layer + act_bytes * inter  # the product is kept under checkpointing
    else:
        per_layer, final_norm = shared + act_bytes * 2 * inter + 2 * 4 * H, H * (4 + act_bytes)
        recomputed_layer = per_layer
    if checkpointing:
        return tokens * (shape.layers * H * act_bytes + (0 if forward_only else recomputed_layer) + final_norm)
    return tokens * (shape.layers * per_layer + final_norm)


def logits_bytes(batch: int, seq: int, vocab: int, dtype="fp32") -> int:
    """Bytes of one full ``[batch, seq, vocab]`` logits tensor (what a non-fused log-prob path holds, often 2-3x)."""
    return tensor_bytes(batch * seq * vocab, dtype)


def naive_logprob_buffer_bytes(shape: ModelShape, setup: Setup) -> int:
    """Full fp32 logits [B·T, V] + the log-softmax copy (TRL's path)."""
    return 2 * logits_bytes(setup.batch, setup.seq_len, shape.vocab)


def logprob_chunk_bytes(rows: int, vocab: int, device: str) -> int:
    """The fp32 [chunk, V] buffer ``fused_linear_logprobs`` works in over ``rows`` scored positions on ``device``."""
    import torch

    from rlhf_fast.ops.logprobs import default_chunk_size

    return min(default_chunk_size(rows, vocab, torch.device(device)), rows) * vocab * 4


def fused_logprob_buffer_bytes(shape: ModelShape, setup: Setup, head_trainable: bool) -> int:
    """fp32 [chunk, V] buffer of fused_linear_logprobs (+ fp32 weight-grad accumulator / CPU weight copy)."""
    total = logprob_chunk_bytes(setup.batch * setup.response_len, shape.vocab, setup.device)
    param_b = trainable_element_bytes(setup.dtype, setup.precision, setup.optimizer)[0]
    if param_b != 4:  # head stored in bf16/fp16 (fp32 under amp: grad_w is the grad)
        if head_trainable:
            total += shape.lm_head_numel * 4
        if setup.device == "cpu":
            total += shape.lm_head_numel * 4
    return total


def tied_head_grad_bytes(shape: ModelShape, grad_bytes: int, head_trainable: bool) -> int:
    """Tied embeddings: the LM head's and the embedding's [V, H] gradients are separate tensors until
    autograd sums them (both contributions + the sum live at once): 2 extra V·H gradients."""
    return 2 * shape.lm_head_numel * grad_bytes if shape.tied and head_trainable else 0


def kv_cache_bytes(shape: ModelShape, setup: Setup) -> int:
    """2 · L · kv_heads · head_dim · (P + R) · B_gen · a."""
    B = setup.gen_batch or setup.batch
    return 2 * shape.layers * shape.kv_heads * shape.head_dim * setup.seq_len * B * dtype_bytes(setup.dtype)


__all__ = [
    "ADAMW_MOMENTS", "dtype_bytes", "torch_dtype", "tensor_bytes", "ComponentBytes", "param_bytes", "grad_bytes",
    "adamw_state_bytes", "component_bytes", "layout_bytes", "format_layout", "trainable_element_bytes",
    "activation_bytes", "logits_bytes", "naive_logprob_buffer_bytes", "logprob_chunk_bytes",
    "fused_logprob_buffer_bytes", "tied_head_grad_bytes", "kv_cache_bytes",
]
