"""``rlhf-fast memory``: will PPO on this model fit on my node, and with which layout?

Builds the model on the ``meta`` device (no weights: 8B and 70B configs work on a laptop), reads its
architecture, and predicts per-GPU bytes by component for TRL's four-model layout and for ours
(``shared``). ``--measure`` runs one real PPO micro-step of our layout and prints measured bytes
beside the prediction.

Formulas (every size in bytes, per GPU; ``a`` = bytes of ``--dtype``; tokens = B · (P + R)):

Parameter storage and optimizer (``--precision``, per trainable parameter; frozen ones take ``a``):
- ``mixed`` (default): parameters and gradients in ``--dtype``; the optimizer keeps an fp32 master copy
  plus fp32 AdamW m and v (4 + 4 + 4 bytes; no master copy when ``--dtype fp32``). This is the usual
  bf16 recipe of large-scale trainers (Megatron / DeepSpeed bf16 optimizer): 2 + 2 + 12 = 16 bytes.
- ``pure``: parameters, gradients and AdamW m, v all in ``--dtype`` (what ``torch.optim.AdamW`` does on
  a model loaded in bf16): 2 + 2 + 4 = 8 bytes. ``--measure`` compares against this mode, since that is
  what a plain torch step allocates.
- ``amp``: fp32 parameters, gradients and m, v with bf16 autocast compute (TRL's ``bf16=True`` on an
  fp32-loaded model, and our trainer on an fp32 model): 4 + 4 + 8 = 16 bytes.
The same mode is used for both layouts so the comparison isolates the layout. Trainable bytes are 16 per
parameter under both ``mixed`` and ``amp``; they differ in where the bytes sit and in the four-model
layout's frozen copies (reference and reward take the policy's storage dtype: fp32 under ``amp``). Note
that ``PolicyValueModel`` keeps fp32 policy weights by default (``dtype=torch.float32``) and our trainer
autocasts, i.e. ``amp``; TRL 1.12 with ``bf16=True`` on an fp32-loaded model is ``amp`` as well. ``--optimizer sgd`` drops
m and v (a master copy stays under ``mixed``). Each AdamW parameter tensor also has a 4-byte ``step``
(ignored here: < 1 KiB).

Four-model layout (TRL 1.12 ``PPOTrainer``): policy (trainable causal LM) + value model (a second
full backbone + a [1, H] ``score`` head, trainable, ``AutoModelForSequenceClassification``) + reference
(frozen copy of the policy in the policy's storage dtype) + reward model (frozen backbone + score head,
same storage dtype). Log-prob buffers (naive): the full fp32 logits [B·T, V] plus the log-softmax copy,
2 · B·T·V · 4. Activations: two backbones (policy and value model) run forward and backward together.

Ours (``shared``): one trainable backbone with its LM head + an fp32 value head [H + 1] (fp32 weights,
grads and AdamW: 16 bytes per element whatever ``--precision``). Reference per ``--reference``:
``frozen`` = a copy in ``--dtype``; ``lora`` = the base weights frozen in the policy's storage dtype
(``--dtype``, fp32 under ``amp``) and only the adapters trainable, r · (in + out) elements per adapted linear (every ``nn.Linear`` of the backbone,
not the LM head: peft's ``all-linear``), no extra reference weights; ``none`` = nothing. Reward model
frozen in ``--dtype``. Log-prob buffers (fused, ``rlhf_fast.ops.fused_linear_logprobs``): one fp32
[chunk, V] buffer with chunk = ``default_chunk_size(B·R, V, device)`` (only response positions are
scored), plus, when the LM head is trainable and stored in bf16/fp16 (not under ``amp``), its fp32
weight-gradient accumulator V·H·4 (and on CPU an fp32 copy of the weight, V·H·4). Both layouts, tied embeddings with a
trainable head: + 2 · V·H gradient bytes (the head's and the embedding's gradient and their sum coexist).

Activations of one backbone (saved for backward, flash/memory-efficient attention: no T×T scores),
per layer per token, with q = heads · head_dim, kv = kv_heads · head_dim, I = intermediate:
    a · (2H + 3q + 3kv + 4I) + 2 · 4H
(the two RMSNorm outputs; q, k pre- and post-RoPE and v; the attention output; gate, up, act(gate) and
their product; plus the fp32 input copies the two RMSNorms keep). Without checkpointing: L layers of
that, plus the final norm (H · (4 + a)). With ``--grad-checkpointing``: the layer inputs a · H per layer
plus one layer's full activations (recomputed in backward) plus the final norm.

KV cache during generation: 2 · L · kv_heads · head_dim · (P + R) · B_gen · a (policy only, both layouts;
B_gen = ``--gen-batch``, default ``--batch``).

FSDP (``--fsdp --gpus N``): parameters, gradients and optimizer states of the trainable models are
divided by N, and so are the frozen reference and reward model, in both layouts (TRL prepares them with
accelerate, which shards them; ``rlhf_fast.trainer.distributed.shard_frozen_models`` FSDP2-shards ours
layer by layer). Activations, log-prob buffers and KV cache are per GPU and are not divided.
Without ``--fsdp`` every GPU holds everything (DDP).

Peak per GPU = static (weights, grads, optimizer of all models) + max(training transients =
activations + log-prob buffers, generation transient = KV cache): the KV cache is freed before the
training micro-steps. The CUDA context (~0.5-1 GiB) and allocator fragmentation are not included.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import re
import sys
from pathlib import Path
from typing import NamedTuple

LAYOUTS = ("four-model", "shared")
REFERENCE_MODES = ("frozen", "lora", "none")
PRECISIONS = ("mixed", "pure", "amp")
OPTIMIZERS = ("adamw", "sgd")
DTYPE_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4}  # torch is imported lazily: `rlhf-fast --help` stays fast
MEMORY_FORMS = "a number with a unit: 80GB, 80G, 80GiB, 81920MiB, 512MB, 1.5TiB (GB/MB = powers of 10; G, GiB, MiB = powers of 2)"

_UNITS = {
    "": 1, "b": 1,
    "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
    "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40,
    "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
}


def parse_memory(text: str) -> int:
    """``"80GB"`` -> 80e9 bytes, ``"80G"``/``"80GiB"`` -> 80 · 2^30, ``"81920MiB"`` -> 80 · 2^30.

    SI units (kB, MB, GB, TB) are powers of 10; bare letters and IEC units (K, M, G, T, KiB, ..., TiB)
    are powers of 2. A bare number is bytes. Raises ValueError listing the accepted forms.
    """
    m = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]*)?)\s*([a-zA-Z]*)\s*", str(text))
    unit = m.group(2).lower() if m else None
    if m is None or unit not in _UNITS:
        raise ValueError(f"cannot parse memory size {text!r}: expected {MEMORY_FORMS}")
    value = float(m.group(1)) * _UNITS[unit]
    if value <= 0:
        raise ValueError(f"memory size must be > 0, got {text!r}: expected {MEMORY_FORMS}")
    return int(value)


# --------------------------------------------------------------------------- model description
def load_model_config(spec: str):
    """A transformers config from a preset name, a local Hugging Face directory, or a config.json file."""
    from transformers import AutoConfig

    from rlhf_fast.presets import available_presets, find_preset

    accepted = (f"a preset name ({', '.join(available_presets())}; case-insensitive), a local Hugging Face "
                "model directory containing config.json, or a path to a config.json file")
    path = Path(os.path.expanduser(str(spec)))
    preset = find_preset(str(spec))
    if preset is not None and not path.exists():
        path = preset
    if path.is_dir():
        path = path / "config.json"
        if not path.is_file():
            raise ValueError(f"--model {spec!r}: directory has no config.json; expected {accepted}")
    if not path.is_file():
        raise ValueError(f"--model {spec!r} is not a known preset or an existing path; expected {accepted}")
    try:
        data = json.loads(path.read_text())
        if not isinstance(data, dict) or "model_type" not in data:
            raise ValueError("no 'model_type' key")
        return AutoConfig.for_model(**data)
    except Exception as e:  # noqa: BLE001 - any unreadable config is a user error with the same advice
        raise ValueError(f"--model {spec!r}: cannot read {path} as a Hugging Face config ({e}); expected {accepted}") from e


def build_meta_model(config):
    """The causal LM of ``config`` on the meta device: shapes and dtypes only, no storage."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


class ModelShape(NamedTuple):
    """Architecture numbers the predictor needs, read from a (meta) causal LM."""

    model_type: str
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied: bool
    total_numel: int      # unique parameters of the causal LM (tied embeddings counted once)
    lm_head_numel: int    # LM-head parameters (weight + bias), whether tied or not
    backbone_numel: int   # parameters without an untied LM head (what a score-head model keeps)
    lora_numel_per_rank: int  # sum of (in + out) over the backbone's nn.Linear layers (LoRA numel = r * this)


def model_shape(model) -> ModelShape:
    """Read a ModelShape from a causal LM (meta or real)."""
    from torch import nn

    from rlhf_fast.models.loading import get_backbone, get_lm_head

    cfg = model.config
    backbone, head = get_backbone(model), get_lm_head(model)
    unique = {id(p): p for p in model.parameters()}
    backbone_ids = {id(p) for p in backbone.parameters()}
    head_params = list(head.parameters())
    tied = all(id(p) in backbone_ids for p in head_params)
    total = sum(p.numel() for p in unique.values())
    head_numel = sum(p.numel() for p in head_params)
    lora = sum(m.in_features + m.out_features for m in backbone.modules() if isinstance(m, nn.Linear))
    heads = cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    return ModelShape(
        model_type=cfg.model_type, hidden=cfg.hidden_size, intermediate=cfg.intermediate_size,
        layers=cfg.num_hidden_layers, heads=heads, kv_heads=getattr(cfg, "num_key_value_heads", None) or heads,
        head_dim=head_dim, vocab=cfg.vocab_size, tied=tied, total_numel=total, lm_head_numel=head_numel,
        backbone_numel=total - (0 if tied else head_numel), lora_numel_per_rank=lora,
    )


# --------------------------------------------------------------------------- setup
@dataclasses.dataclass(frozen=True)
class Setup:
    """One question: this batch, these lengths, this layout on these GPUs."""

    batch: int
    prompt_len: int
    response_len: int
    layout: str = "shared"
    reference: str = "frozen"
    dtype: str = "bf16"
    precision: str = "mixed"
    optimizer: str = "adamw"
    grad_checkpointing: bool = False
    gpus: int = 1
    fsdp: bool = False
    lora_r: int = 8
    shard_frozen: bool = True  # under FSDP the frozen reference and reward are sharded too (as the trainer does)
    gen_batch: int | None = None  # sequences per generation batch (KV cache); None = batch
    device: str = "cuda"  # whose log-prob chunk budget applies

    def __post_init__(self):
        for name in ("batch", "prompt_len", "response_len", "gpus", "lora_r", "gen_batch"):
            v = getattr(self, name)
            if name == "gen_batch" and v is None:
                continue
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be a positive integer, got {v!r}")
        for name, allowed in (("layout", LAYOUTS), ("reference", REFERENCE_MODES), ("dtype", tuple(DTYPE_BYTES)),
                              ("precision", PRECISIONS), ("optimizer", OPTIMIZERS), ("device", ("cuda", "cpu"))):
            if getattr(self, name) not in allowed:
                raise ValueError(f"--{name} must be one of {', '.join(allowed)}, got {getattr(self, name)!r}")

    @property
    def seq_len(self) -> int:
        return self.prompt_len + self.response_len

    def flags(self) -> str:
        """The command-line flags that describe this setup (for suggestions)."""
        out = [f"--batch {self.batch}", f"--layout {self.layout}", f"--reference {self.reference}"]
        if self.grad_checkpointing:
            out.append("--grad-checkpointing")
        if self.gpus > 1:
            out.append(f"--gpus {self.gpus}" + (" --fsdp" if self.fsdp else ""))
        return " ".join(out)


def _bytes_of(dtype_name: str) -> int:
    return DTYPE_BYTES[dtype_name]


def _torch_dtype(dtype_name: str):
    import torch

    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[dtype_name]


def _trainable_bytes(setup: Setup) -> tuple[int, int, int]:
    """(param, grad, optimizer) bytes per trainable element under ``setup.precision``/``optimizer``."""
    a = _bytes_of(setup.dtype)
    moments = 2 if setup.optimizer == "adamw" else 0
    if setup.precision == "amp" or setup.dtype == "fp32":
        return 4, 4, 4 * moments
    if setup.precision == "pure":
        return a, a, a * moments
    return a, a, 4 + 4 * moments  # mixed: fp32 master + fp32 moments


def activation_bytes(shape: ModelShape, tokens: int, act_bytes: int, checkpointing: bool,
                     forward_only: bool = False) -> int:
    """Saved activations of one backbone over ``tokens`` tokens (module docstring formula).

    ``forward_only`` with checkpointing: what the forward pass itself keeps (layer inputs + final norm),
    without the one layer recomputed during backward."""
    H, inter = shape.hidden, shape.intermediate
    q, kv = shape.heads * shape.head_dim, shape.kv_heads * shape.head_dim
    per_layer = act_bytes * (2 * H + 3 * q + 3 * kv + 4 * inter) + 2 * 4 * H
    final_norm = H * (4 + act_bytes)
    if checkpointing:
        return tokens * (shape.layers * H * act_bytes + (0 if forward_only else per_layer) + final_norm)
    return tokens * (shape.layers * per_layer + final_norm)


def fused_logprob_buffer_bytes(shape: ModelShape, setup: Setup, head_trainable: bool) -> int:
    """fp32 [chunk, V] buffer of fused_linear_logprobs (+ fp32 weight-grad accumulator / CPU weight copy)."""
    import torch

    from rlhf_fast.ops.logprobs import default_chunk_size

    N = setup.batch * setup.response_len
    chunk = default_chunk_size(N, shape.vocab, torch.device(setup.device))
    total = min(chunk, N) * shape.vocab * 4
    if _trainable_bytes(setup)[0] != 4:  # head stored in bf16/fp16 (fp32 under amp: grad_w is the grad)
        if head_trainable:
            total += shape.lm_head_numel * 4
        if setup.device == "cpu":
            total += shape.lm_head_numel * 4
    return total


def naive_logprob_buffer_bytes(shape: ModelShape, setup: Setup) -> int:
    """Full fp32 logits [B·T, V] + the log-softmax copy (TRL's path)."""
    return 2 * setup.batch * setup.seq_len * shape.vocab * 4


def _tied_head_grad_bytes(shape: ModelShape, grad_bytes: int, head_trainable: bool) -> int:
    """Tied embeddings: the LM head's and the embedding's [V, H] gradients are separate tensors until
    autograd sums them (both contributions + the sum live at once): 2 extra V·H gradients."""
    return 2 * shape.lm_head_numel * grad_bytes if shape.tied and head_trainable else 0


def kv_cache_bytes(shape: ModelShape, setup: Setup) -> int:
    """2 · L · kv_heads · head_dim · (P + R) · B_gen · a."""
    B = setup.gen_batch or setup.batch
    return 2 * shape.layers * shape.kv_heads * shape.head_dim * setup.seq_len * B * _bytes_of(setup.dtype)


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


def predict(shape: ModelShape, setup: Setup, layout: str | None = None) -> Prediction:
    """Per-GPU bytes of ``layout`` (default ``setup.layout``) for ``setup`` (formulas: module docstring)."""
    layout = layout or setup.layout
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {', '.join(LAYOUTS)}, got {layout!r}")
    a = _bytes_of(setup.dtype)
    p_b, g_b, o_b = _trainable_bytes(setup)
    shard = setup.gpus if setup.fsdp else 1
    tokens = setup.batch * setup.seq_len
    backbone_act = activation_bytes(shape, tokens, a, setup.grad_checkpointing)
    c = dict.fromkeys(COMPONENTS, 0)
    score_head = shape.hidden  # [1, H], no bias
    if layout == "four-model":
        c["policy params"] = shape.total_numel * p_b
        c["policy grads"] = shape.total_numel * g_b
        c["policy optimizer"] = shape.total_numel * o_b
        value_numel = shape.backbone_numel + score_head
        c["value params"], c["value grads"], c["value optimizer"] = (value_numel * p_b, value_numel * g_b,
                                                                     value_numel * o_b)
        c["reference"] = shape.total_numel * p_b  # same storage dtype as the policy
        c["reward"] = (shape.backbone_numel + score_head) * p_b
        c["activations"] = 2 * backbone_act
        c["logprob buffers"] = naive_logprob_buffer_bytes(shape, setup) + _tied_head_grad_bytes(shape, g_b, True)
    else:
        value_head = shape.hidden + 1  # fp32 nn.Linear(H, 1): fp32 weights, grads and AdamW state
        vh_opt = value_head * (8 if setup.optimizer == "adamw" else 0)
        c["value params"], c["value grads"], c["value optimizer"] = value_head * 4, value_head * 4, vh_opt
        if setup.reference == "lora":
            adapters = setup.lora_r * shape.lora_numel_per_rank
            c["policy params"] = (shape.total_numel + adapters) * p_b  # frozen base kept in the policy's storage dtype
            c["policy grads"] = adapters * g_b
            c["policy optimizer"] = adapters * o_b
        else:
            c["policy params"] = shape.total_numel * p_b
            c["policy grads"] = shape.total_numel * g_b
            c["policy optimizer"] = shape.total_numel * o_b
        c["reference"] = shape.total_numel * a if setup.reference == "frozen" else 0
        c["reward"] = (shape.backbone_numel + score_head) * a
        c["activations"] = backbone_act
        head_trainable = setup.reference != "lora"
        c["logprob buffers"] = (fused_logprob_buffer_bytes(shape, setup, head_trainable)
                                + _tied_head_grad_bytes(shape, g_b, head_trainable))
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


# --------------------------------------------------------------------------- PPO config files
def setup_from_ppo_config(cfg, memory_section: dict) -> tuple[str, Setup, int]:
    """(model spec, Setup, GPU bytes) for a ``PPOConfig`` plus a YAML ``memory:`` section.

    ``memory:`` holds what PPOConfig does not: ``model`` (preset / dir / config.json of the policy's
    architecture), ``prompt_len``, ``gpus`` and ``gpu_mem``. From the PPOConfig, as our trainer runs it:
    micro-batch = ``per_device_train_batch_size``, generation batch = ``local_rollout_forward_batch_size``,
    R = ``response_length``, ``gradient_checkpointing``, reference mode (``auto``: ``none`` when
    kl_coef == 0, else ``frozen``; ``lora`` uses the trainer's default r=8 adapters), FSDP when
    ``distributed_strategy == "fsdp2"``. Precision: the trainer keeps fp32 policy weights and autocasts
    when ``bf16``/``fp16`` is set, i.e. ``precision="amp"``; a frozen reference must be stored in that
    autocast dtype (``reference_dtype: bf16``), which is what the predictor assumes.
    """
    missing = [k for k in ("model", "prompt_len", "gpus", "gpu_mem") if k not in (memory_section or {})]
    if missing:
        raise ValueError(f"memory: section needs {', '.join(missing)} (model, prompt_len, gpus, gpu_mem)")
    dtype = "bf16" if cfg.bf16 else "fp16" if cfg.fp16 else "fp32"
    reference = cfg.reference
    if reference == "auto":
        reference = "none" if cfg.kl_coef == 0 else "frozen"
    if reference == "frozen" and dtype != "fp32" and cfg.reference_dtype != dtype:
        raise ValueError(f"reference_dtype must be {dtype!r} (the autocast dtype) for this prediction, "
                         f"got {cfg.reference_dtype!r}")
    if cfg.critic == "separate":
        raise ValueError("critic='separate' is not modelled by the shared-layout prediction; use critic: shared")
    gpus = int(memory_section["gpus"])
    setup = Setup(
        batch=cfg.per_device_train_batch_size, prompt_len=int(memory_section["prompt_len"]),
        response_len=cfg.response_length, layout="shared", reference=reference, dtype=dtype,
        precision="amp" if dtype != "fp32" else "pure", grad_checkpointing=bool(cfg.gradient_checkpointing),
        gpus=gpus, fsdp=cfg.distributed_strategy == "fsdp2" and gpus > 1,
        gen_batch=cfg.local_rollout_forward_batch_size,
    )
    return str(memory_section["model"]), setup, parse_memory(str(memory_section["gpu_mem"]))


# --------------------------------------------------------------------------- report
def _gib(n: int | float | None) -> str:
    return "-" if n is None else f"{n / 2**30:.2f}"


def report_dict(spec: str, shape: ModelShape, setup: Setup, gpu_mem: int) -> dict:
    """Everything ``--json`` prints: model, setup, both layouts' components, verdict for ``setup.layout``."""
    layouts = {}
    for layout in LAYOUTS:
        p = predict(shape, setup, layout)
        layouts[layout] = {"components": dict(p.components), "static_bytes": p.static_bytes,
                           "train_bytes": p.train_bytes, "generate_bytes": p.generate_bytes,
                           "peak_bytes": p.peak_bytes, "fits": p.peak_bytes <= gpu_mem,
                           # the same layout with checkpointing toggled, for the table's "other" row
                           "activations_other_checkpointing": predict(
                               shape, dataclasses.replace(setup, grad_checkpointing=not setup.grad_checkpointing),
                               layout).components["activations"]}
    chosen = layouts[setup.layout]
    sugg = [] if chosen["fits"] else suggestions(shape, setup, gpu_mem)
    return {
        "model": {"spec": spec, **shape._asdict()},
        "setup": dataclasses.asdict(setup),
        "gpu_mem_bytes": gpu_mem,
        "layouts": layouts,
        "verdict": {"layout": setup.layout, "fits": chosen["fits"], "peak_bytes": chosen["peak_bytes"],
                    "suggestions": [{"text": s.text, "changes": s.changes, "peak_bytes": s.peak_bytes}
                                    for s in sugg]},
    }


def format_report(rep: dict) -> str:
    s, m = rep["setup"], rep["model"]
    lines = [
        f"model {m['spec']} ({m['model_type']}): {m['total_numel'] / 1e9:.3f} B parameters, hidden {m['hidden']}, "
        f"{m['layers']} layers, vocab {m['vocab']}{', tied embeddings' if m['tied'] else ''}",
        f"batch {s['batch']} x (prompt {s['prompt_len']} + response {s['response_len']}), {s['dtype']} "
        f"({s['precision']} precision, {s['optimizer']}), grad checkpointing {'on' if s['grad_checkpointing'] else 'off'}, "
        f"reference (shared layout) {s['reference']}, {s['gpus']} GPU(s){' FSDP' if s['fsdp'] else ''}",
        "",
        f"{'per GPU, GiB':<20}" + "".join(f"{name:>14}" for name in LAYOUTS),
    ]
    for comp in COMPONENTS:
        lines.append(f"{comp:<20}" + "".join(f"{_gib(rep['layouts'][k]['components'][comp]):>14}" for k in LAYOUTS))
    other = "(act. ckpt " + ("off)" if s["grad_checkpointing"] else "on)")
    lines.append(f"{other:<20}" + "".join(f"{_gib(rep['layouts'][k]['activations_other_checkpointing']):>14}"
                                          for k in LAYOUTS))
    lines.append("-" * (20 + 14 * len(LAYOUTS)))
    lines.append(f"{'peak':<20}" + "".join(f"{_gib(rep['layouts'][k]['peak_bytes']):>14}" for k in LAYOUTS))
    lines.append(f"{'fits ' + _gib(rep['gpu_mem_bytes']) + ' GiB?':<20}"
                 + "".join(f"{'yes' if rep['layouts'][k]['fits'] else 'NO':>14}" for k in LAYOUTS))
    four, ours = rep["layouts"]["four-model"]["peak_bytes"], rep["layouts"]["shared"]["peak_bytes"]
    lines.append(f"shared / four-model peak = {ours / four:.2f}")
    lines.append("(peak = weights + grads + optimizer + max(activations + logprob buffers, kv cache); "
                 "CUDA context not included)")
    v = rep["verdict"]
    lines.append("")
    if v["fits"]:
        lines.append(f"verdict: {v['layout']} FITS: {_gib(v['peak_bytes'])} of {_gib(rep['gpu_mem_bytes'])} GiB per GPU")
    else:
        lines.append(f"verdict: {v['layout']} does NOT fit: {_gib(v['peak_bytes'])} GiB > "
                     f"{_gib(rep['gpu_mem_bytes'])} GiB per GPU")
        if v["suggestions"]:
            lines.append("what would make it fit (each re-evaluated):")
            for sg in v["suggestions"]:
                lines.append(f"  - {sg['text']}: peak {_gib(sg['peak_bytes'])} GiB")
        else:
            lines.append("nothing tried fits (checkpointing, shared layout, LoRA reference, FSDP up to 1024 GPUs, batch 1)")
    return "\n".join(lines)


def save_png(rep: dict, path: str) -> None:
    """Stacked bars, one per layout: static components + the larger transient phase; the GPU memory as a line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 5))
    colours = plt.get_cmap("tab20").colors
    for i, layout in enumerate(LAYOUTS):
        L = rep["layouts"][layout]
        shown = STATIC + (TRAIN if L["train_bytes"] >= L["generate_bytes"] else GENERATE)
        bottom = 0.0
        for j, comp in enumerate(COMPONENTS):
            if comp not in shown:
                continue
            h = L["components"][comp] / 2**30
            ax.bar(i, h, bottom=bottom, color=colours[j % len(colours)], label=comp if i == 0 else None,
                   edgecolor="white", linewidth=0.5)
            bottom += h
    ax.axhline(rep["gpu_mem_bytes"] / 2**30, color="red", linestyle="--", label="GPU memory")
    ax.set_xticks(range(len(LAYOUTS)), LAYOUTS)
    ax.set_ylabel("GiB per GPU")
    s = rep["setup"]
    ax.set_title(f"{rep['model']['spec']}: B={s['batch']} P={s['prompt_len']} R={s['response_len']} {s['dtype']}")
    handles, labels = ax.get_legend_handles_labels()
    ax.legend(handles, labels, fontsize=7, loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# --------------------------------------------------------------------------- measurement
def _tracker_cls():
    from rlhf_fast.testing import AllocationTracker

    class _StorageTracker(AllocationTracker):
        """AllocationTracker that also remembers which storage (data pointer) each recorded allocation made,
        so the bytes of tensors still held at the end (parameters, gradients, optimizer state) can be
        summed from the tracker's own records: autograd-created gradients have no long-lived Python
        object, so the base class's live counter does not see them."""

        def __init__(self):
            super().__init__()
            self.created: dict[int, int] = {}  # data_ptr -> nbytes of the newest allocation there

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            n = len(self.allocations)
            out = super().__torch_dispatch__(func, types, args, kwargs)
            if len(self.allocations) > n:
                from torch.utils._pytree import tree_flatten

                for t in tree_flatten(out)[0]:
                    if hasattr(t, "untyped_storage"):
                        st = t.untyped_storage()
                        if st.data_ptr() != 0:
                            self.created[st.data_ptr()] = st.nbytes()
            return out

        def bytes_of(self, tensors) -> int:
            """Recorded bytes of the distinct storages behind ``tensors`` (ones it did not see count 0)."""
            ptrs = {t.untyped_storage().data_ptr() for t in tensors if t is not None}
            return sum(self.created.get(p, 0) for p in ptrs)

    return _StorageTracker


def measure_micro_step(config, setup: Setup, device: str = "cpu", trace: str | None = None, seed: int = 0) -> dict:
    """One real PPO micro-step of the shared layout on ``device``, tensor bytes counted by AllocationTracker.

    The micro-step of ``benchmarks/bench_memory_layout.py`` (``side_ours``): random-init weights in
    ``setup.dtype``, PolicyValueModel(critic="shared", reference=setup.reference), reference log-probs
    (no grad), forward with entropy, clipped PPO + value loss, backward, AdamW step. No reward model.
    Returns bytes, each the tracker's record of the allocations behind the tensors named:
    ``params`` (every parameter of the policy, value head and reference, as created while building),
    ``grads`` (the ``.grad`` of the trainable parameters, created in backward), ``optimizer`` (the
    optimizer's state tensors, created in ``opt.step()``), ``activations`` (distinct non-parameter
    storages autograd saved for backward in the policy forward, via ``saved_tensors_hooks``; with
    checkpointing, only the layer inputs, since recomputation happens in backward), ``logprob_buffer`` (largest fp32 [rows, V]
    tensor created in the step) and, for information, ``step_peak`` (peak of tracked live bytes during
    the step above its start; the tracker under-counts tensors without a long-lived Python object) and
    on CUDA ``cuda_peak_allocated``.
    """
    import gc

    import torch
    from transformers import AutoModelForCausalLM

    from rlhf_fast.models import PolicyValueModel

    Tracker = _tracker_cls()
    dev = torch.device(device)
    dtype = _torch_dtype(setup.dtype)
    torch.manual_seed(seed)
    if trace:
        if dev.type != "cuda":
            raise ValueError("--trace needs CUDA (torch.cuda.memory snapshots); this run is on "
                             f"{dev.type}. Drop --trace or run with --device cuda on a GPU machine.")
        torch.cuda.memory._record_memory_history(max_entries=200_000)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    with Tracker() as build:
        model = AutoModelForCausalLM.from_config(config).to(device=dev, dtype=dtype)
        pv = PolicyValueModel(model, reference=setup.reference, critic="shared", dtype=dtype,
                              **({"reference_dtype": dtype} if setup.reference == "frozen" else {}))
    if setup.grad_checkpointing:
        model.gradient_checkpointing_enable()
    all_params = [p for comp in pv.components().values() for p in comp.parameters()]
    params = build.bytes_of(all_params)
    opt_params = pv.trainable_parameters()
    opt = (torch.optim.AdamW(opt_params, lr=1e-5) if setup.optimizer == "adamw"
           else torch.optim.SGD(opt_params, lr=1e-5))
    V = model.config.vocab_size
    B, P, R = setup.batch, setup.prompt_len, setup.response_len
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, V, (B, P + R), generator=g).to(dev)
    mask = torch.ones(B, P + R, dtype=torch.long, device=dev)
    adv = torch.randn(B, R, generator=g).to(dev)
    returns = torch.randn(B, R, generator=g).to(dev)
    pv.train()
    gc.collect()
    with Tracker() as step:
        ref_logp = pv.reference_logprobs(ids, mask, response_start=P) if setup.reference != "none" else None
        param_ptrs = {q.untyped_storage().data_ptr() for q in pv.parameters()}
        saved: dict[int, int] = {}

        def pack(t):  # every tensor autograd keeps for backward: the activations, counted once per storage
            st = t.untyped_storage()
            if st.data_ptr() not in param_ptrs and st.data_ptr() != 0:
                saved[st.data_ptr()] = st.nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = pv(ids, mask, response_start=P, return_entropy=True)
        ratio = torch.exp((out.logprobs - out.logprobs.detach()).clamp(-20, 20))
        pg = torch.maximum(-adv * ratio, -adv * ratio.clamp(0.8, 1.2)).mean()
        vf = 0.5 * ((out.values - returns) ** 2).mean()
        (pg + vf).backward()
        del out, ratio, pg, vf
        gc.collect()
        opt.step()
        del ref_logp
    grads = step.bytes_of([p.grad for p in opt_params])
    state = [t for st in opt.state.values() for t in st.values() if torch.is_tensor(t)]
    buffers = [a.nbytes for a in step.allocations
               if len(a.shape) == 2 and a.shape[1] == V and a.dtype == torch.float32]
    result = {"params": params, "grads": grads, "optimizer": step.bytes_of(state), "activations": sum(saved.values()),
              "logprob_buffer": max(buffers, default=0), "step_peak": step.peak_live_bytes, "device": dev.type}
    if dev.type == "cuda":
        result["cuda_peak_allocated"] = torch.cuda.max_memory_allocated(dev)
        if trace:
            torch.cuda.memory._dump_snapshot(trace)
            torch.cuda.memory._record_memory_history(enabled=None)
            result["trace"] = trace
    return result


def compare_measured(shape: ModelShape, setup: Setup, measured: dict) -> dict:
    """Predicted counterparts of ``measure_micro_step``'s numbers (same tensors, no reward model, no FSDP).

    The real step stores parameters and AdamW state in ``setup.dtype`` (``precision="pure"``) and its
    log-prob chunk follows the measuring device.
    """
    import torch

    like = dataclasses.replace(setup, precision="pure", gpus=1, fsdp=False, device=measured["device"])
    c = predict(shape, like, "shared").components
    from rlhf_fast.ops.logprobs import default_chunk_size

    N = like.batch * like.response_len
    buffer = min(default_chunk_size(N, shape.vocab, torch.device(like.device)), N) * shape.vocab * 4
    return {
        "params": c["policy params"] + c["value params"] + c["reference"],
        "grads": c["policy grads"] + c["value grads"],
        "optimizer": c["policy optimizer"] + c["value optimizer"],
        "logprob_buffer": buffer,
        # saved by the forward pass (with checkpointing the recomputed layer lives only inside backward)
        "activations": activation_bytes(shape, like.batch * like.seq_len, _bytes_of(like.dtype),
                                        like.grad_checkpointing, forward_only=True),
        "step_peak": c["policy grads"] + c["value grads"] + max(c["activations"] + c["logprob buffers"],
                                                                c["policy optimizer"] + c["value optimizer"]),
    }


def _available_bytes(device: str) -> int | None:
    """Free bytes on ``device``: CUDA free memory, or MemAvailable from /proc/meminfo on CPU (None if unknown)."""
    import torch

    if device.startswith("cuda"):
        return torch.cuda.mem_get_info(torch.device(device))[0]
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


# --------------------------------------------------------------------------- CLI
def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True,
                        help="preset name (qwen2.5-0.5b, qwen2.5-7b, llama-3-8b, llama-3-70b), a local HF directory "
                             "or a config.json path; built on the meta device, no weights")
    parser.add_argument("--batch", type=int, required=True, help="sequences per micro-batch per GPU")
    parser.add_argument("--prompt-len", type=int, required=True, help="prompt tokens (P)")
    parser.add_argument("--response-len", type=int, required=True, help="response tokens (R)")
    parser.add_argument("--layout", default="shared", choices=LAYOUTS,
                        help="layout the verdict is about (the table shows both)")
    parser.add_argument("--reference", default="frozen", choices=REFERENCE_MODES, help="reference mode (shared layout)")
    parser.add_argument("--dtype", default="bf16", choices=tuple(DTYPE_BYTES))
    parser.add_argument("--precision", default="mixed", choices=PRECISIONS,
                        help="mixed: dtype params+grads, fp32 master+AdamW; pure: everything in dtype; "
                             "amp: fp32 params/grads/AdamW, dtype autocast")
    parser.add_argument("--optimizer", default="adamw", choices=OPTIMIZERS)
    parser.add_argument("--grad-checkpointing", action="store_true")
    parser.add_argument("--gpus", type=int, default=1)
    parser.add_argument("--fsdp", action="store_true", help="shard parameters, grads and optimizer over --gpus")
    parser.add_argument("--lora-r", type=int, default=8, help="LoRA rank for --reference lora")
    parser.add_argument("--replicate-frozen", action="store_true",
                        help="under --fsdp, keep a full copy of the frozen reference and reward on every GPU "
                             "(a loop that shards only the trainable model; rlhf_fast's trainer shards them)")
    parser.add_argument("--gen-batch", type=int, default=None, help="sequences per generation batch (KV cache); default --batch")
    parser.add_argument("--gpu-mem", default="80GB", help=f"memory per GPU: {MEMORY_FORMS}")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.add_argument("--png", metavar="FILE", help="write a stacked bar chart, one bar per layout")
    parser.add_argument("--measure", action="store_true",
                        help="also run one real PPO micro-step (shared layout, random weights) and print measured bytes")
    parser.add_argument("--device", default=None, help="device for --measure (default: cuda if available, else cpu)")
    parser.add_argument("--trace", metavar="FILE",
                        help="with --measure on CUDA: save a torch.cuda.memory snapshot (open in pytorch.org/memory_viz)")


def run(args: argparse.Namespace) -> int:
    import torch

    prog = "rlhf-fast memory"
    try:
        gpu_mem = parse_memory(args.gpu_mem)
        setup = Setup(batch=args.batch, prompt_len=args.prompt_len, response_len=args.response_len,
                      layout=args.layout, reference=args.reference, dtype=args.dtype, precision=args.precision,
                      optimizer=args.optimizer, grad_checkpointing=args.grad_checkpointing, gpus=args.gpus,
                      fsdp=args.fsdp, lora_r=args.lora_r, shard_frozen=not args.replicate_frozen, gen_batch=args.gen_batch)
        if args.fsdp and args.gpus < 2:
            raise ValueError(f"--fsdp needs --gpus >= 2, got --gpus {args.gpus}")
        device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
        if args.trace and not args.measure:
            raise ValueError("--trace records the --measure micro-step: add --measure")
        if args.trace and not device.startswith("cuda"):
            raise ValueError(f"--trace needs CUDA (a torch.cuda.memory snapshot); the device here is {device}")
        config = load_model_config(args.model)
    except ValueError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
    shape = model_shape(build_meta_model(config))
    rep = report_dict(args.model, shape, setup, gpu_mem)
    if args.measure:
        need = compare_measured(shape, setup, {"device": device.split(":")[0]})
        need_bytes = need["params"] + need["grads"] + need["optimizer"] + need["activations"]
        avail = _available_bytes(device)
        if avail is not None and need_bytes > 0.8 * avail:
            print(f"{prog}: error: --measure builds real weights: about {need_bytes / 2**30:.1f} GiB needed, "
                  f"{avail / 2**30:.1f} GiB available on {device}; measure a smaller model or batch", file=sys.stderr)
            return 2
        measured = measure_micro_step(config, setup, device=device, trace=args.trace)
        rep["measured"] = {"measured": measured, "predicted": compare_measured(shape, setup, measured)}
    if args.png:
        save_png(rep, args.png)
        rep["png"] = args.png
    if args.json:
        print(json.dumps(rep, indent=2, default=str))
        return 0
    print(format_report(rep))
    if args.measure:
        meas, pred = rep["measured"]["measured"], rep["measured"]["predicted"]
        print(f"\nmeasured on {meas['device']} (one micro-step of the shared layout, {setup.dtype} weights and "
              "AdamW state, no reward model), MiB:")
        print(f"{'':<16}{'predicted':>12}{'measured':>12}{'ratio':>8}")
        for k in ("params", "grads", "optimizer", "activations", "logprob_buffer", "step_peak"):
            r = meas[k] / pred[k] if pred[k] else float("nan")
            print(f"{k:<16}{pred[k] / 2**20:>12.2f}{meas[k] / 2**20:>12.2f}{r:>8.2f}")
        if "cuda_peak_allocated" in meas:
            print(f"torch.cuda.max_memory_allocated: {meas['cuda_peak_allocated'] / 2**20:.1f} MiB")
        if "trace" in meas:
            print(f"memory snapshot written to {meas['trace']} (open it at https://pytorch.org/memory_viz)")
    if args.png:
        print(f"chart written to {args.png}")
    return 0


__all__ = [
    "LAYOUTS", "PRECISIONS", "REFERENCE_MODES", "ModelShape", "Setup", "Prediction", "Suggestion", "parse_memory",
    "load_model_config", "build_meta_model", "model_shape", "predict", "suggestions", "report_dict",
    "format_report", "save_png", "measure_micro_step", "compare_measured", "activation_bytes",
    "fused_logprob_buffer_bytes", "setup_from_ppo_config", "naive_logprob_buffer_bytes", "kv_cache_bytes", "configure", "run",
]
