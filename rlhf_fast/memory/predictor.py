"""The predictor: per-GPU bytes by component of one PPO setup, for TRL's four-model layout and ours.

``predict(shape, setup, layout)`` adds up the rules of ``rlhf_fast.memory.rules`` per layout;
``suggestions(shape, setup, gpu_mem)`` lists changes that make a setup fit, each re-evaluated.

Four-model layout (TRL 1.12 ``PPOTrainer``): policy (trainable causal LM) + value model (a second
full backbone + a [1, H] ``score`` head, trainable, ``AutoModelForSequenceClassification``) + reference
(frozen copy of the policy in the policy's storage dtype) + reward model (frozen backbone + score head,
same storage dtype). Log-prob buffers: naive, plus the tied-head gradients when embeddings are tied.
Activations: two backbones (policy and value model) run forward and backward together.

Ours (``shared``): one trainable backbone with its LM head + an fp32 value head [H + 1] (fp32 weights,
grads and AdamW: 16 bytes per element whatever the precision). Reference per ``Setup.reference``:
``frozen`` = a copy in ``dtype``; ``lora`` = the base weights frozen in the policy's storage dtype
(``dtype``, fp32 under ``amp``) and only the adapters trainable, r · (in + out) elements per adapted
linear (every ``nn.Linear`` of the backbone, not the LM head: peft's ``all-linear``), no extra reference
weights; ``none`` = nothing. Reward model frozen in ``dtype``. Log-prob buffers: fused (the LM head is
not trainable under ``lora``), plus the tied-head gradients.

The same precision mode is used for both layouts so the comparison isolates the layout. The KV cache is
the policy's, in both layouts.

FSDP (``Setup.fsdp``, ``gpus`` = N): parameters, gradients and optimizer states of the trainable models
are divided by N, and so are the frozen reference and reward model, in both layouts (TRL prepares them
with accelerate, which shards them; ``rlhf_fast.trainer.distributed.shard_frozen_models`` FSDP2-shards
ours layer by layer; ``shard_frozen=False`` keeps full frozen copies in ours). Activations, log-prob
buffers and KV cache are per GPU and are not divided. Without FSDP every GPU holds everything (DDP).

Peak per GPU = static (weights, grads, optimizer of all models) + max(training transients =
activations + log-prob buffers, generation transient = KV cache): the KV cache is freed before the
training micro-steps. The CUDA context (~0.5-1 GiB) and allocator fragmentation are not included.
"""
from __future__ import annotations

import dataclasses
import math
from typing import NamedTuple

from rlhf_fast.memory.rules import (
    activation_bytes,
    dtype_bytes,
    fused_logprob_buffer_bytes,
    kv_cache_bytes,
    naive_logprob_buffer_bytes,
    tied_head_grad_bytes,
    trainable_element_bytes,
)
from rlhf_fast.memory.spec import LAYOUTS, ModelShape, Setup

STATIC = ("policy params", "policy grads", "policy optimizer", "value params", "value grads", "value optimizer",
          "reference", "reward")
TRAIN = ("activations", "logprob buffers")
GENERATE = ("kv cache",)
COMPONENTS = STATIC + TRAIN + GENERATE


class Prediction(NamedTuple):
    """Per-GPU bytes by component (keys: COMPONENTS) and the peak (static + max(train, generate))."""

    layout: str
    components: dict
    static_bytes: int
    train_bytes: int
    generate_bytes: int

    @property
    def peak_bytes(self) -> int:
        return self.static_bytes + max(self.train_bytes, self.generate_bytes)


def _trained(c: dict, model: str, numel: int, per_element: tuple[int, int, int]) -> None:
    """Set ``model``'s params, grads and optimizer bytes for ``numel`` trainable elements."""
    for kind, nbytes in zip(("params", "grads", "optimizer"), per_element):
        c[f"{model} {kind}"] = numel * nbytes


def predict(shape: ModelShape, setup: Setup, layout: str | None = None) -> Prediction:
    """Per-GPU bytes of ``layout`` (default ``setup.layout``) for ``setup`` (layouts: module docstring; formulas: ``rules``)."""
    layout = layout or setup.layout
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {', '.join(LAYOUTS)}, got {layout!r}")
    a = dtype_bytes(setup.dtype)
    per_element = trainable_element_bytes(setup.dtype, setup.precision, setup.optimizer)
    p_b, g_b, _ = per_element
    shard = setup.gpus if setup.fsdp else 1
    tokens = setup.batch * setup.seq_len  # a padded micro-batch (TRL's layout always runs one)
    ours_tokens = min(setup.packed_tokens, tokens) if setup.packed_tokens else tokens  # packed: real tokens only
    backbone_act = activation_bytes(shape, tokens, a, setup.grad_checkpointing)  # HF's modules, as TRL runs them
    fused_act = activation_bytes(shape, ours_tokens, a, setup.grad_checkpointing, fused_backbone=setup.fused_backbone)
    c = dict.fromkeys(COMPONENTS, 0)
    score_head = shape.hidden  # [1, H], no bias
    if layout == "four-model":
        _trained(c, "policy", shape.total_numel, per_element)
        _trained(c, "value", shape.backbone_numel + score_head, per_element)
        c["reference"] = shape.total_numel * p_b  # same storage dtype as the policy
        c["reward"] = (shape.backbone_numel + score_head) * p_b
        c["activations"] = 2 * backbone_act
        c["logprob buffers"] = naive_logprob_buffer_bytes(shape, setup) + tied_head_grad_bytes(shape, g_b, True)
    else:
        # fp32 nn.Linear(H, 1): fp32 weights, grads and AdamW state whatever the precision
        _trained(c, "value", shape.hidden + 1, trainable_element_bytes("fp32", setup.precision, setup.optimizer))
        if setup.reference == "lora":
            _trained(c, "policy", setup.lora_r * shape.lora_numel_per_rank, per_element)
            c["policy params"] += shape.total_numel * p_b  # frozen base kept in the policy's storage dtype
        else:
            _trained(c, "policy", shape.total_numel, per_element)
        c["reference"] = shape.total_numel * a if setup.reference == "frozen" else 0
        c["reward"] = (shape.backbone_numel + score_head) * a
        c["activations"] = fused_act
        head_trainable = setup.reference != "lora"
        c["logprob buffers"] = (fused_logprob_buffer_bytes(shape, setup, head_trainable)
                                + tied_head_grad_bytes(shape, g_b, head_trainable))
    frozen = ("reference", "reward")
    for k in STATIC:
        if k not in frozen or layout == "four-model" or setup.shard_frozen:
            c[k] = math.ceil(c[k] / shard)
    c["kv cache"] = kv_cache_bytes(shape, setup)
    return Prediction(layout, c, sum(c[k] for k in STATIC), sum(c[k] for k in TRAIN),
                      sum(c[k] for k in GENERATE))


# --------------------------------------------------------------------------- verdict
class Suggestion(NamedTuple):
    text: str          # what to change, as flags
    changes: dict      # Setup fields to replace
    peak_bytes: int    # predicted peak after the change


def _fits(shape, setup, gpu_mem) -> tuple[bool, int]:
    peak = predict(shape, setup).peak_bytes
    return peak <= gpu_mem, peak


def _largest_fitting_batch(shape, setup, gpu_mem) -> int | None:
    lo, hi = 0, setup.batch - 1  # largest b in [1, batch-1] that fits, by bisection (peak grows with b)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if _fits(shape, dataclasses.replace(setup, batch=mid), gpu_mem)[0]:
            lo = mid
        else:
            hi = mid - 1
    return lo or None


def _fsdp_gpus(shape, setup, gpu_mem, max_gpus: int = 1024) -> int | None:
    n = max(2, setup.gpus if setup.fsdp else 2)
    while n <= max_gpus:
        if _fits(shape, dataclasses.replace(setup, gpus=n, fsdp=True), gpu_mem)[0]:
            return n
        n *= 2
    return None


def _single_changes(shape, setup, gpu_mem) -> list[tuple[str, dict]]:
    """Candidate changes, each computed against ``setup`` alone."""
    out = []
    if not setup.grad_checkpointing:
        out.append(("enable --grad-checkpointing", {"grad_checkpointing": True}))
    if setup.layout == "four-model":
        out.append(("use --layout shared", {"layout": "shared"}))
    if setup.layout == "shared" and setup.reference == "frozen":
        out.append(("use --reference lora", {"reference": "lora"}))
    n = _fsdp_gpus(shape, setup, gpu_mem)
    if n is not None and (n != setup.gpus or not setup.fsdp):
        out.append((f"--fsdp across {n} GPUs", {"gpus": n, "fsdp": True}))
    b = _largest_fitting_batch(shape, setup, gpu_mem)
    if b is not None:
        out.append((f"lower --batch to {b} (gradient accumulation keeps the effective batch)", {"batch": b}))
    return out


def suggestions(shape: ModelShape, setup: Setup, gpu_mem: int) -> list[Suggestion]:
    """Changes that make ``setup`` fit in ``gpu_mem`` bytes per GPU, each re-evaluated with ``predict``.

    Single changes first (checkpointing, shared layout, LoRA reference, the fewest FSDP GPUs, the
    largest batch); when none fits alone, the cheap ones are combined cumulatively (checkpointing,
    then shared layout, then LoRA reference) and FSDP / a lower batch computed on top of that.
    Returns [] when nothing up to 1024 GPUs or batch 1 fits.
    """
    found = []
    for text, changes in _single_changes(shape, setup, gpu_mem):
        ok, peak = _fits(shape, dataclasses.replace(setup, **changes), gpu_mem)
        if ok:
            found.append(Suggestion(text, changes, peak))
    if found:
        return found
    texts, changes = [], {}
    for text, ch in (("enable --grad-checkpointing", {"grad_checkpointing": True}),
                     ("use --layout shared", {"layout": "shared"}),
                     ("use --reference lora", {"reference": "lora"})):
        trial = dataclasses.replace(setup, **changes, **ch)
        if trial != dataclasses.replace(setup, **changes):
            texts.append(text)
            changes = {**changes, **ch}
            ok, peak = _fits(shape, trial, gpu_mem)
            if ok:
                return [Suggestion(" + ".join(texts), dict(changes), peak)]
    base = dataclasses.replace(setup, **changes)
    for text, ch in _single_changes(shape, base, gpu_mem):
        if "gpus" in ch or "batch" in ch:
            ok, peak = _fits(shape, dataclasses.replace(base, **ch), gpu_mem)
            if ok:
                found.append(Suggestion(" + ".join(texts + [text]), {**changes, **ch}, peak))
    return found


__all__ = ["STATIC", "TRAIN", "GENERATE", "COMPONENTS", "Prediction", "predict", "Suggestion", "suggestions"]
