"""The measured micro-step (rlhf_fast.memory.micro_step): prediction against real allocations
(StorageTracker, an AllocationTracker)."""
from __future__ import annotations

import dataclasses
import json

import pytest

from rlhf_fast import memory

# Tiny architectures: one untied, one tied with a single KV head.
TINY = {
    "qwen2-untied": dict(model_type="qwen2", hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, vocab_size=1000, tie_word_embeddings=False,
                         max_position_embeddings=256),
    "llama-tied": dict(model_type="llama", hidden_size=64, intermediate_size=160, num_hidden_layers=3,
                       num_attention_heads=4, num_key_value_heads=1, vocab_size=512, tie_word_embeddings=True,
                       max_position_embeddings=256),
}


@pytest.mark.parametrize("name,reference,dtype,ckpt", [
    ("qwen2-untied", "frozen", "fp32", False),
    ("llama-tied", "lora", "fp32", False),
    ("qwen2-untied", "none", "bf16", False),
    ("llama-tied", "frozen", "bf16", True),
])
def test_prediction_matches_allocation_tracker_on_a_real_micro_step(tmp_path, name, reference, dtype, ckpt):
    """params = policy + value head + reference weights as allocated; grads = the .grad tensors backward
    allocated; optimizer = AdamW state allocated by step(); logprob_buffer = the largest fp32 [rows, V]
    tensor of the step (the fused op's chunk buffer); activations (no checkpointing) = the distinct
    storages autograd saved in the policy forward. Same tensors on both sides, within 15%."""
    (tmp_path / "config.json").write_text(json.dumps(TINY[name]))
    config = memory.load_model_config(str(tmp_path / "config.json"))
    shape = memory.model_shape(memory.build_meta_model(config))
    setup = memory.Setup(batch=3, prompt_len=8, response_len=16, reference=reference, dtype=dtype,
                           grad_checkpointing=ckpt)
    measured = memory.measure_micro_step(config, setup, device="cpu")
    predicted = memory.compare_measured(shape, setup, measured)
    if ckpt:  # forward keeps layer inputs only: far below the full activations (looser: small extras count)
        full = memory.compare_measured(shape, dataclasses.replace(setup, grad_checkpointing=False), measured)
        assert measured["activations"] < 0.5 * full["activations"]
        assert abs(measured["activations"] - predicted["activations"]) <= 0.5 * predicted["activations"]
    keys = ("params", "grads", "optimizer", "logprob_buffer") + (() if ckpt else ("activations",))
    for key in keys:
        assert measured[key] > 0, key
        assert abs(measured[key] - predicted[key]) <= 0.15 * predicted[key], (key, measured[key], predicted[key])
    if reference == "lora":
        assert predicted["grads"] < predicted["params"] / 4  # only adapters + value head train


def test_trace_needs_cuda():
    setup = memory.Setup(batch=1, prompt_len=4, response_len=4, dtype="fp32")
    with pytest.raises(ValueError, match="needs CUDA"):
        memory.measure_micro_step(memory.load_model_config("qwen2.5-0.5b"), setup, device="cpu",
                                    trace="x.pickle")


def test_fused_backbone_micro_step_matches_its_prediction_and_saves_activations(tmp_path):
    """--fused-backbone: the measured micro-step patches the policy (rlhf_fast.models.patch_backbone); its
    saved activations stay within 15% of the fused prediction and below the unpatched measurement."""
    (tmp_path / "config.json").write_text(json.dumps(TINY["qwen2-untied"]))
    config = memory.load_model_config(str(tmp_path / "config.json"))
    shape = memory.model_shape(memory.build_meta_model(config))
    plain = memory.Setup(batch=3, prompt_len=8, response_len=16, reference="none", dtype="fp32")
    fused = dataclasses.replace(plain, fused_backbone=True)
    measured = {s.fused_backbone: memory.measure_micro_step(config, s, device="cpu") for s in (plain, fused)}
    predicted = memory.compare_measured(shape, fused, measured[True])["activations"]
    assert abs(measured[True]["activations"] - predicted) <= 0.15 * predicted
    assert measured[True]["activations"] < 0.8 * measured[False]["activations"]
