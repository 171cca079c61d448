"""rlhf_fast.memory.rules predicts exactly the bytes torch allocates for parameters, gradients and AdamW state."""
from __future__ import annotations

import pytest
import torch

from rlhf_fast import memory
from rlhf_fast.models import PolicyValueModel
from tests.models.conftest import tiny_causal_lm, tiny_config


def _real_grad_bytes(module):
    seen, total = set(), 0
    for p in module.parameters():
        if p.grad is not None and id(p) not in seen:
            seen.add(id(p))
            total += p.grad.numel() * p.grad.element_size()
    return total


def _real_adamw_bytes(opt):
    return sum(t.numel() * t.element_size() for st in opt.state.values() for t in st.values() if torch.is_tensor(t))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("amsgrad", [False, True])
def test_predicted_grads_and_adamw_state_equal_real_allocations(dtype, amsgrad):
    model = tiny_causal_lm("qwen2").to(dtype)
    model.model.embed_tokens.weight.requires_grad_(False)  # a frozen part: no grad, no state
    ids = torch.randint(0, 128, (2, 8))
    model(input_ids=ids).logits.float().sum().backward()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3, amsgrad=amsgrad)
    opt.step()
    c = memory.component_bytes(model)
    assert c.grads == _real_grad_bytes(model)
    assert memory.adamw_state_bytes(model, amsgrad=amsgrad) == _real_adamw_bytes(opt)
    assert c.frozen_params == model.model.embed_tokens.weight.numel() * model.dtype.itemsize
    assert c.params == sum(p.numel() * p.element_size() for p in model.parameters())
    assert c.total == c.params + c.grads + c.optimizer


def test_tied_weights_count_once():
    tied = tiny_causal_lm("gpt2", tie=True)
    untied = tiny_causal_lm("gpt2", tie=False)
    V, H = 128, 32
    assert memory.param_bytes(untied) - memory.param_bytes(tied) == V * H * 4


def test_meta_device_model_accounts_like_a_real_one():
    from transformers import AutoModelForCausalLM

    real = memory.component_bytes(tiny_causal_lm("llama"))
    with torch.device("meta"):
        meta_model = AutoModelForCausalLM.from_config(tiny_config("llama"))
    assert next(meta_model.parameters()).is_meta
    assert memory.component_bytes(meta_model) == real


def test_layout_of_policy_value_model():
    pv = PolicyValueModel(tiny_causal_lm("qwen2"), reference="frozen", reference_dtype=torch.bfloat16)
    table = memory.layout_bytes(pv.components())
    assert set(table) == {"policy", "value_head", "reference", "total"}
    assert table["reference"].frozen_params * 2 == table["policy"].params  # bf16 copy: half the bytes
    assert table["reference"].grads == table["reference"].optimizer == 0
    assert table["value_head"].params == (32 + 1) * 4
    assert table["total"].params == sum(table[k].params for k in ("policy", "value_head", "reference"))
    lora = PolicyValueModel(tiny_causal_lm("qwen2"), reference="lora")
    lt = memory.layout_bytes(lora.components())
    assert 0 < lt["policy"].trainable_params < lt["policy"].frozen_params
    assert lt["policy"].grads == lt["policy"].trainable_params
    assert "reference" not in lt  # the LoRA reference costs no extra weights
    assert "trainable" in memory.format_layout(lt)


def test_shared_parameters_across_components_count_once():
    m = tiny_causal_lm("qwen2")
    table = memory.layout_bytes({"a": m, "b": m.model})
    assert table["b"].params == 0 and table["total"] == table["a"]


def test_bad_optimizer_name():
    with pytest.raises(ValueError, match="optimizer must be"):
        memory.component_bytes(torch.nn.Linear(2, 2), optimizer="sgd")


@pytest.mark.parametrize("dtype,autocast", [(torch.float32, False), (torch.bfloat16, False), (torch.float32, True)],
                         ids=["fp32", "bf16", "fp32-autocast-bf16"])
def test_activation_bytes_of_the_fused_backbone_against_saved_tensor_hooks(dtype, autocast):
    """What autograd saves in a tiny Qwen2 backbone's forward (SavedTensorCounter), unpatched and patched:
    the formulas' difference is exact (2 x 4H + 2aI per layer, 4H for the final norm); each formula is
    within 10% of its measurement in fp32 and pure bf16 (attention internals are approximated)."""
    import transformers as tf

    from rlhf_fast.memory.tracker import SavedTensorCounter
    from rlhf_fast.models import patch_backbone

    cfg = tf.Qwen2Config(hidden_size=64, intermediate_size=192, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=100)
    shape = memory.model_shape(memory.build_meta_model(cfg))
    model = tf.AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa").to(dtype).train()
    ids = torch.randint(0, 100, (2, 16))
    a = 2 if dtype == torch.bfloat16 or autocast else 4
    measured, predicted = {}, {}
    for fused in (False, True):
        if fused:
            assert patch_backbone(model).patched
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            with SavedTensorCounter(exclude=model.parameters()) as saved:
                model.model(input_ids=ids)
        measured[fused] = saved.bytes
        predicted[fused] = memory.activation_bytes(shape, ids.numel(), a, False, fused_backbone=fused)
    assert measured[False] - measured[True] == predicted[False] - predicted[True] > 0
    if not autocast:
        for fused in (False, True):
            assert abs(measured[fused] - predicted[fused]) <= 0.1 * predicted[fused], (fused, measured, predicted)


def test_fused_backbone_prediction_under_checkpointing_keeps_the_product_in_the_recomputed_layer():
    shape = memory.model_shape(memory.build_meta_model(memory.load_model_config("qwen2.5-0.5b")))
    plain, fused = (memory.activation_bytes(shape, 100, 2, True, fused_backbone=f) for f in (False, True))
    assert plain - fused == 100 * (2 * 4 * shape.hidden + 2 * shape.intermediate + 4 * shape.hidden)
    setup = memory.Setup(batch=4, prompt_len=64, response_len=64, fused_backbone=True)
    assert memory.predict(shape, setup).components["activations"] < memory.predict(
        shape, memory.Setup(batch=4, prompt_len=64, response_len=64)).components["activations"]
