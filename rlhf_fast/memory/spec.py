"""What the memory predictor is asked about: the model's architecture and the run.

- ``load_model_config(spec)``: a transformers config from a preset (``rlhf_fast.presets``), a local
  Hugging Face directory or a config.json; ``build_meta_model(config)`` builds it on the ``meta``
  device (no weights: 8B and 70B configs work on a laptop); ``model_shape(model)`` reads the
  ``ModelShape`` the formulas need.
- ``Setup``: batch, lengths, layout, reference mode, dtype / precision / optimizer, checkpointing, GPUs;
  ``setup_from_ppo_config(cfg, memory_section)`` derives one from a ``PPOConfig`` as our trainer runs it.
- ``parse_memory("80GB")``: a GPU memory size in bytes.

torch and transformers are imported inside the functions that need them, so ``rlhf-fast --help``
(which builds the ``memory`` command's parser from these constants) stays fast.
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
from pathlib import Path
from typing import NamedTuple

LAYOUTS = ("four-model", "shared")
REFERENCE_MODES = ("frozen", "lora", "none")
PRECISIONS = ("mixed", "pure", "amp")
OPTIMIZERS = ("adamw", "sgd")
DTYPE_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4}
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
    fused_backbone: bool = False  # shared layout: the policy runs rlhf_fast's fused RMSNorm/SwiGLU/rotary ops
    # shared layout: tokens one micro-batch's forward runs on once padding is dropped (padding_free: the real
    # tokens, at most micro_batch_token_budget); None = batch x (prompt + response), a padded batch
    packed_tokens: int | None = None

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


# --------------------------------------------------------------------------- PPO config files
def setup_from_ppo_config(cfg, memory_section: dict) -> tuple[str, Setup, int]:
    """(model spec, Setup, GPU bytes) for a ``PPOConfig`` plus a YAML ``memory:`` section.

    ``memory:`` holds what PPOConfig does not: ``model`` (preset / dir / config.json of the policy's
    architecture), ``prompt_len``, ``gpus`` and ``gpu_mem``. From the PPOConfig, as our trainer runs it:
    micro-batch = ``per_device_train_batch_size``, generation batch = ``local_rollout_forward_batch_size``,
    R = ``response_length``, ``gradient_checkpointing`` (None, "decide", counts as off), reference mode
    (``auto``: ``none`` for a critic-free estimator at kl_coef == 0, else ``frozen``; ``lora`` uses the
    trainer's default r=8 adapters), FSDP when ``distributed_strategy == "fsdp2"``, the fused backbone when
    ``fused_backbone`` is set. Precision: the trainer keeps fp32 policy weights and autocasts
    when ``bf16``/``fp16`` is set, i.e. ``precision="amp"``; a frozen reference must be stored in that
    autocast dtype (``reference_dtype: bf16``), which is what the predictor assumes.
    """
    missing = [k for k in ("model", "prompt_len", "gpus", "gpu_mem") if k not in (memory_section or {})]
    if missing:
        raise ValueError(f"memory: section needs {', '.join(missing)} (model, prompt_len, gpus, gpu_mem)")
    dtype = "bf16" if cfg.bf16 else "fp16" if cfg.fp16 else "fp32"
    reference = cfg.reference
    if reference == "auto":  # as the trainer decides: no reference only for a critic-free estimator at kl_coef 0
        reference = "none" if cfg.kl_coef == 0 and not cfg.uses_critic else "frozen"
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
        fused_backbone=bool(getattr(cfg, "fused_backbone", False)),
        packed_tokens=getattr(cfg, "micro_batch_token_budget", None) if getattr(cfg, "padding_free", False) else None,
    )
    return str(memory_section["model"]), setup, parse_memory(str(memory_section["gpu_mem"]))


__all__ = [
    "LAYOUTS", "REFERENCE_MODES", "PRECISIONS", "OPTIMIZERS", "DTYPE_BYTES", "MEMORY_FORMS", "parse_memory",
    "load_model_config", "build_meta_model", "ModelShape", "model_shape", "Setup", "setup_from_ppo_config",
]
