"""Swap the fused backbone ops into one Llama / Qwen2 / Mistral model instance: ``patch_backbone``.

Per instance, never per class: only the modules under the given root get new ``forward`` attributes
(bound methods in the instance ``__dict__``), so other models of the same classes in the process (TRL's
in the parity tests, a reward model) keep HF's code, and no new model class appears. What changes:

- every family RMSNorm (both per-layer norms, the final norm): ``rlhf_fast.ops.rms_norm``;
- every decoder layer: the residual add before ``post_attention_layernorm`` is fused into that norm
  (``rms_norm(attn_out, w, eps, residual=h)`` returns the normalised output and the new residual), and
  the layer checkpoints itself when gradient checkpointing is on, as HF's layer does;
- every MLP with a SiLU activation: ``rlhf_fast.ops.swiglu``; the product ``silu(gate) * up`` that
  ``down_proj`` would save for its weight gradient is not kept but rebuilt from gate and up in backward
  (``_RecomputeProduct``; done only where no other saved-tensor hooks are active, e.g. not inside
  non-reentrant checkpointing or CPU offloading, which manage that memory themselves);
- every attention: HF's own ``forward`` code, run with ``rlhf_fast.ops.rotary`` in place of the
  ``apply_rotary_pos_emb`` it calls (a copy of the function with that one global replaced; nothing else
  of the attention changes: cache, masks, sliding windows and the attention kernel are HF's).

Numbers: fp32 outputs and gradients equal the unpatched model's to fp32 rounding (the rotary embedding
and RMSNorm's output rounding are bit-identical; sums of squares and of the weight gradient run in
another order), and to bf16 rounding under a bf16 autocast. Memory per layer and token: HF keeps
2H + 2I more bytes-per-element than the patched layer (the two fp32 normalised tensors, silu(gate) and
the product; rlhf_fast.memory.rules.activation_bytes, ``fused_backbone=True``).

Call it on the plain HF model (or a peft model around one) before DDP / FSDP2 wrapping: FSDP2 replaces
the decoder layers' classes, and ``patch_backbone`` recognises the families' own classes only. It is
idempotent; ``unpatch_backbone`` restores HF's forwards. The lean decoder (``supports_fast_decode``)
accepts a patched model: it reads the same weights and computes the same functions itself.
Other architectures (GPT-2, ...) are left alone, with a note in the report.
"""
from __future__ import annotations

import functools
import inspect
import types
import weakref
from dataclasses import dataclass, field

import torch

from rlhf_fast.models.decode import FUSED_FORWARD_ATTR, _families, _same_forward
from rlhf_fast.ops import rms_norm, rotary, swiglu, swiglu_recompute

_ROTARY_GLOBAL = "apply_rotary_pos_emb"
_ROTARY_PARAMS = ("q", "k", "cos", "sin", "unsqueeze_dim")
# HF's decoder layer forward (transformers 5.x) for Llama / Qwen2 / Mistral: what the fused layer accepts.
_LAYER_PARAMS = ("self", "hidden_states", "attention_mask", "position_ids", "cache", "use_cache",
                 "position_embeddings", "kwargs")
_SILU = ("SiLUActivation", "SiLU")


@dataclass
class PatchReport:
    """What ``patch_backbone`` did to one model. Counts are of modules running a fused forward after
    the call (including ones an earlier call patched); ``notes`` say what was left alone and why."""

    model: str
    rms_norms: int = 0
    fused_residuals: int = 0
    mlps: int = 0
    attentions: int = 0
    already_patched: int = 0
    notes: list[str] = field(default_factory=list)

    @property
    def patched(self) -> bool:
        return bool(self.rms_norms or self.mlps or self.attentions)

    def __str__(self) -> str:
        if not self.patched:
            return f"{self.model}: not patched ({'; '.join(self.notes) or 'no Llama/Qwen2/Mistral modules'})"
        text = (f"{self.model}: fused {self.rms_norms} RMSNorm ({self.fused_residuals} with the residual add), "
                f"{self.mlps} SwiGLU MLP, {self.attentions} rotary attention")
        return text + (f"; {'; '.join(self.notes)}" if self.notes else "")


def _mark(fn):
    setattr(fn, FUSED_FORWARD_ATTR, True)
    return fn


def is_patched(module: torch.nn.Module) -> bool:
    """True when ``module`` runs a forward installed by ``patch_backbone``."""
    return getattr(module.__dict__.get("forward"), FUSED_FORWARD_ATTR, False)


# --------------------------------------------------------------------------- RMSNorm
@_mark
def _rms_norm_forward(self, hidden_states, residual=None):
    """HF RMSNorm forward; with ``residual``: (norm(residual + hidden_states), residual + hidden_states)."""
    return rms_norm(hidden_states, self.weight, self.variance_epsilon, residual=residual)


# --------------------------------------------------------------------------- MLP
class _Recipe:
    """Stands in for the saved SwiGLU product: rebuilt from gate and up, viewed as the saved tensor was."""

    __slots__ = ("gate", "up", "size", "stride", "offset")

    def __init__(self, gate, up, t, base_offset):
        self.gate, self.up = gate, up
        self.size, self.stride, self.offset = t.size(), t.stride(), t.storage_offset() - base_offset

    def rebuild(self):
        return swiglu_recompute(self.gate, self.up).as_strided(self.size, self.stride, self.offset)


class _Outer:
    """A tensor packed by the enclosing (tensor-keeping) hooks: unpacked by them too."""

    __slots__ = ("packed", "unpack")

    def __init__(self, packed, unpack):
        self.packed, self.unpack = packed, unpack


class _RecomputeProduct:
    """Saved-tensor hooks around ``down_proj(product)``: every tensor saved there that is the product (a
    view of its storage) is replaced by a ``_Recipe`` holding gate and up, which SwiGLU's own node keeps
    anyway. Active only when grad is on and no other saved-tensor hooks are, except hooks that keep every
    tensor as it is (``keeps_tensors``, e.g. ``rlhf_fast.memory.SavedTensorCounter``), which it chains to.
    Beneath any other hook (checkpointing, offloading) it does nothing: holding gate and up there
    would defeat what that hook saves.

    Autograd keeps the pack hook of every tensor saved under it until the graph is freed, so the hook
    holds no tensor: the product by its storage address only, gate and up by weak reference (the
    recipes hold them strongly, and go with down_proj's saved tensors after its backward)."""

    def __init__(self, product, gate, up):
        self.hooks = None
        if not (torch.is_grad_enabled() and product.requires_grad):
            return
        outer = torch._C._autograd._top_saved_tensors_default_hooks(False)
        if outer is not None and not getattr(outer[0], "keeps_tensors", False):
            return
        self.outer = outer
        self.inputs = (weakref.ref(gate), weakref.ref(up))
        self.key = (product.untyped_storage().data_ptr(), product.dtype, product.device)
        self.offset = product.storage_offset()
        self.hooks = torch.autograd.graph.saved_tensors_hooks(self.pack, self.unpack)

    def pack(self, t):
        if (t.untyped_storage().data_ptr(), t.dtype, t.device) == self.key:
            return _Recipe(self.inputs[0](), self.inputs[1](), t, self.offset)
        if self.outer is None:
            return t
        return _Outer(self.outer[0](t), self.outer[1])

    @staticmethod
    def unpack(obj):
        if isinstance(obj, _Recipe):
            return obj.rebuild()
        if isinstance(obj, _Outer):
            return obj.unpack(obj.packed)
        return obj

    def __enter__(self):
        if self.hooks is not None:
            self.hooks.__enter__()
        return self

    def __exit__(self, *exc):
        if self.hooks is not None:
            self.hooks.__exit__(*exc)
        return False


@_mark
def _mlp_forward(self, x):
    """HF MLP forward with act_fn = silu: down_proj(swiglu(gate_proj(x), up_proj(x)))."""
    gate, up = self.gate_proj(x), self.up_proj(x)
    product = swiglu(gate, up)
    with _RecomputeProduct(product, gate, up):
        return self.down_proj(product)


# --------------------------------------------------------------------------- attention
def _hf_rotary(q, k, cos, sin, unsqueeze_dim=1):
    return rotary(q, k, cos, sin, unsqueeze_dim)


def _with_globals(fn, replace: dict):
    """A copy of ``fn`` whose globals have ``replace`` applied; decorator wrappers (``__wrapped__`` with
    the wrapped function in their closure) are copied around the copy."""
    inner = getattr(fn, "__wrapped__", None)
    if inner is None:
        new = types.FunctionType(fn.__code__, {**fn.__globals__, **replace}, fn.__name__, fn.__defaults__,
                                 fn.__closure__)
    else:
        cells = fn.__closure__ or ()
        if not any(c.cell_contents is inner for c in cells):
            raise TypeError(f"{fn.__qualname__} wraps {inner.__qualname__} without holding it in its closure")
        new_inner = _with_globals(inner, replace)
        closure = tuple(types.CellType(new_inner) if c.cell_contents is inner else c for c in cells)
        new = types.FunctionType(fn.__code__, fn.__globals__, fn.__name__, fn.__defaults__, closure)
        new.__wrapped__ = new_inner
    new.__kwdefaults__ = fn.__kwdefaults__
    new.__qualname__, new.__doc__, new.__module__ = fn.__qualname__, fn.__doc__, fn.__module__
    return new


@functools.cache
def _fused_attention_forward(cls):
    """``cls.forward`` calling the fused rotary, or a reason string when its code does not match."""
    raw = inspect.unwrap(cls.forward)
    hf_rope = raw.__globals__.get(_ROTARY_GLOBAL)
    if _ROTARY_GLOBAL not in raw.__code__.co_names or hf_rope is None:
        return f"{cls.__name__}.forward does not call {_ROTARY_GLOBAL}"
    if tuple(inspect.signature(hf_rope).parameters) != _ROTARY_PARAMS:
        return f"{_ROTARY_GLOBAL} of {cls.__module__} has parameters {tuple(inspect.signature(hf_rope).parameters)}"
    try:
        return _mark(_with_globals(cls.forward, {_ROTARY_GLOBAL: _hf_rotary}))
    except TypeError as exc:
        return str(exc)


# --------------------------------------------------------------------------- decoder layer
def _layer_body(self, hidden_states, attention_mask=None, position_ids=None, cache=None, use_cache=False,
                position_embeddings=None, **kwargs):
    """HF's decoder layer with ``residual + attn_out`` fused into post_attention_layernorm."""
    residual = hidden_states
    hidden_states = self.input_layernorm(hidden_states)
    hidden_states, _ = self.self_attn(
        hidden_states=hidden_states, attention_mask=attention_mask, position_ids=position_ids, cache=cache,
        use_cache=use_cache, position_embeddings=position_embeddings, **kwargs,
    )
    hidden_states, residual = self.post_attention_layernorm(hidden_states, residual=residual)
    return residual + self.mlp(hidden_states)


@_mark
def _layer_forward(self, hidden_states, **kwargs):
    """Gradient checkpointing as HF's GradientCheckpointingLayer does it (caching off while it is on),
    around ``_layer_body``. Here, not in the class wrapper: an instance forward bypasses that."""
    if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
        if kwargs.get("use_cache"):
            kwargs["use_cache"] = False
        if not self._can_checkpoint_with_cache and kwargs.get("cache") is not None:
            kwargs["cache"] = None
        return self._gradient_checkpointing_func(functools.partial(_layer_body, self, **kwargs), hidden_states)
    return _layer_body(self, hidden_states, **kwargs)


# --------------------------------------------------------------------------- patch / unpatch
def _kind(module) -> tuple[str, type] | None:
    """("RMSNorm" | "MLP" | "Attention" | "DecoderLayer", the family class) for a family module."""
    for family in _families():
        for kind in ("RMSNorm", "MLP", "Attention", "DecoderLayer"):
            if _same_forward(module, family[kind]):
                return kind, family[kind]
    return None


def _install(module, fn) -> None:
    module.forward = types.MethodType(fn, module)


def patch_backbone(model: torch.nn.Module) -> PatchReport:
    """Swap the fused ops into every Llama / Qwen2 / Mistral RMSNorm, MLP, attention and decoder layer
    under ``model`` (a causal LM, a backbone, a sequence classifier or a peft model around one); module
    docstring. Idempotent. Returns a ``PatchReport``; other architectures are left alone with a note."""
    report = PatchReport(type(model).__name__)
    layers = []
    for name, module in model.named_modules():
        own = module.__dict__.get("forward")
        if own is not None:
            if getattr(own, FUSED_FORWARD_ATTR, False):
                report.already_patched += 1
                kind = _kind(module)
                if kind is not None:
                    _count(report, kind[0], module)
            else:
                report.notes.append(f"{name or 'model'} has its own forward; left alone")
            continue
        kind = _kind(module)
        if kind is None:
            continue
        kind, cls = kind
        if kind == "RMSNorm":
            _install(module, _rms_norm_forward)
        elif kind == "MLP":
            act = type(getattr(module, "act_fn", None)).__name__
            if act not in _SILU:
                report.notes.append(f"{name}: activation {act} is not SiLU; MLP left as is")
                continue
            _install(module, _mlp_forward)
        elif kind == "Attention":
            fused = _fused_attention_forward(cls)
            if isinstance(fused, str):
                report.notes.append(f"{name}: {fused}; rotary left as is")
                continue
            module.forward = types.MethodType(fused, module)
        else:
            layers.append((name, module, cls))
            continue
        _count(report, kind, module)
    for name, layer, cls in layers:  # after their norms: the fused layer needs a fused post-attention norm
        params = tuple(inspect.signature(inspect.unwrap(cls.forward)).parameters)
        if params != _LAYER_PARAMS or not is_patched(getattr(layer, "post_attention_layernorm", layer)):
            report.notes.append(f"{name}: decoder layer forward {params} not the expected one; residual add "
                                "left unfused")
            continue
        _install(layer, _layer_forward)
        _count(report, "DecoderLayer", layer)
    layer_classes = tuple(f["DecoderLayer"] for f in _families())
    wrapped = sum(isinstance(m, layer_classes) and _kind(m) is None for m in model.modules())
    if wrapped:  # e.g. FSDP2's subclasses: their forward is not the family's, the layer is not rebuilt
        report.notes.append(f"{wrapped} decoder layers already wrapped ({type(model).__name__}): residual add "
                            "left unfused; call patch_backbone before fully_shard")
    if not report.patched and not report.notes:
        report.notes.append(f"{type(model).__name__} is not a Llama/Qwen2/Mistral model; left alone")
    return report


def _count(report: PatchReport, kind: str, module) -> None:
    if kind == "RMSNorm":
        report.rms_norms += 1
    elif kind == "MLP":
        report.mlps += 1
    elif kind == "Attention":
        report.attentions += 1
    else:
        report.fused_residuals += 1


def unpatch_backbone(model: torch.nn.Module) -> int:
    """Restore HF's forwards on every module ``patch_backbone`` changed under ``model``; returns how many."""
    n = 0
    for module in model.modules():
        if is_patched(module):
            del module.forward
            n += 1
    return n


__all__ = ["PatchReport", "patch_backbone", "unpatch_backbone", "is_patched"]
