"""The GPU-node presets in configs/: every ppo: key is a PPOConfig field with a valid value, and the memory
accounting (rlhf_fast.memory, as our trainer runs the config) says each fits on its stated node."""
from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from rlhf_fast import memory
from rlhf_fast.stages.config import load_stage_config
from rlhf_fast.trainer.ppo_config import PPOConfig

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
PRESETS = {
    # file: (architecture preset, GPUs, reference mode, FSDP)
    "qwen2.5-0.5b-1gpu.yaml": ("qwen2.5-0.5b", 1, "frozen", False),
    "llama3-8b-8gpu-fsdp2.yaml": ("llama-3-8b", 8, "frozen", True),
    "llama3-8b-lora-1gpu.yaml": ("llama-3-8b", 1, "lora", False),
}


def _load(name: str):
    path = CONFIGS / name
    # PPOConfig refuses bf16 without a GPU; use_cpu=true lets it construct here and changes nothing else.
    cfg = load_stage_config(PPOConfig, path, "ppo", ["use_cpu=true"])
    return cfg, yaml.safe_load(path.read_text())["memory"]


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_preset_parses_and_says_what_its_name_says(name):
    cfg, mem = _load(name)
    arch, gpus, reference, fsdp = PRESETS[name]
    assert cfg.bf16 is True and cfg.gradient_checkpointing is True
    assert cfg.reference == reference
    assert (cfg.distributed_strategy == "fsdp2") == fsdp
    assert mem["model"] == arch and mem["gpus"] == gpus
    assert cfg.response_length > 0 and cfg.per_device_train_batch_size > 0


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_preset_fits_on_its_node(name):
    cfg, mem = _load(name)
    spec, setup, gpu_mem = memory.setup_from_ppo_config(cfg, mem)
    assert setup.fsdp == PRESETS[name][3] and setup.gpus == PRESETS[name][1]
    shape = memory.model_shape(memory.build_meta_model(memory.load_model_config(spec)))
    pred = memory.predict(shape, setup)
    assert pred.peak_bytes <= 0.9 * gpu_mem, (  # 10% left for the CUDA context and fragmentation
        f"{name}: predicted {pred.peak_bytes / 2**30:.1f} GiB per GPU of {gpu_mem / 2**30:.1f} GiB")


def test_the_lora_preset_would_not_fit_as_a_full_finetune():
    cfg, mem = _load("llama3-8b-lora-1gpu.yaml")
    spec, setup, gpu_mem = memory.setup_from_ppo_config(cfg, mem)
    shape = memory.model_shape(memory.build_meta_model(memory.load_model_config(spec)))
    import dataclasses

    full = dataclasses.replace(setup, reference="frozen")
    assert memory.predict(shape, full).peak_bytes > gpu_mem  # the preset's LoRA choice is what makes it fit


def test_memory_section_is_required_and_reference_dtype_checked():
    cfg, mem = _load("qwen2.5-0.5b-1gpu.yaml")
    with pytest.raises(ValueError, match="memory: section needs gpu_mem"):
        memory.setup_from_ppo_config(cfg, {k: v for k, v in mem.items() if k != "gpu_mem"})
    cfg32 = load_stage_config(PPOConfig, CONFIGS / "qwen2.5-0.5b-1gpu.yaml", "ppo",
                              ["use_cpu=true", "reference_dtype=fp32"])
    with pytest.raises(ValueError, match="reference_dtype must be 'bf16'"):
        memory.setup_from_ppo_config(cfg32, mem)
