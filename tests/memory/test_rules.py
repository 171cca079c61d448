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
