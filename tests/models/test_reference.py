"""Reference modes: LoRA-disabled weights, frozen low-precision copy, host offload round trip."""
from __future__ import annotations

import copy
import sys

import pytest
import torch

from rlhf_fast.models import FrozenReference, PolicyValueModel
from tests.models.conftest import tiny_causal_lm
from tests.models.test_policy_value import ATOL, hf_response_logprobs


def _ppo_like_step(pv, batch, lr=5e-2):
    """One AdamW step on a loss that moves the policy's log-probs (so reference checks can fail)."""
    opt = torch.optim.AdamW(pv.trainable_parameters(), lr=lr)
    out = pv(batch.input_ids, batch.attention_mask, response_start=batch.P)
    (-(out.logprobs.sum()) + out.values.pow(2).sum()).backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


@pytest.mark.parametrize("arch", ["qwen2", "gpt2"])
def test_lora_reference_equals_base_model_after_a_step(arch, batch):
    model = tiny_causal_lm(arch)
    base_copy = copy.deepcopy(model)
    pv = PolicyValueModel(model, reference="lora", lora_config={"r": 4, "lora_alpha": 8, "target_modules": "all-linear"})
    trainable = {n for n, p in pv.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n or n.startswith("value_head") for n in trainable)
    before = pv(batch.input_ids, batch.attention_mask, response_start=batch.P).logprobs.detach()
    _ppo_like_step(pv, batch)
    after = pv(batch.input_ids, batch.attention_mask, response_start=batch.P).logprobs.detach()
    assert (after - before).abs().max() > 1e-3, "the step must move the adapted policy, or the check below is vacuous"
    ref = pv.reference_logprobs(batch.input_ids, batch.attention_mask, response_start=batch.P)
    want, _, _ = hf_response_logprobs(base_copy, batch)
    torch.testing.assert_close(ref, want, **ATOL)
    assert not ref.requires_grad
    # adapters are back on after the reference pass
    again = pv(batch.input_ids, batch.attention_mask, response_start=batch.P).logprobs.detach()
    torch.testing.assert_close(again, after)


def test_lora_without_peft_names_the_fix(monkeypatch):
    monkeypatch.setitem(sys.modules, "peft", None)  # import peft -> ImportError
    with pytest.raises(ImportError, match="pip install peft"):
        PolicyValueModel(tiny_causal_lm("qwen2"), reference="lora")


def test_lora_config_with_frozen_reference_is_rejected():
    with pytest.raises(ValueError, match="reference='lora'"):
        PolicyValueModel(tiny_causal_lm("qwen2"), reference="frozen", lora_config={"r": 4})


def test_frozen_fp32_reference_equals_policy_at_step0_and_stays_put(batch):
    pv = PolicyValueModel(tiny_causal_lm("llama"), reference="frozen", reference_dtype=torch.float32)
    step0 = pv(batch.input_ids, batch.attention_mask, response_start=batch.P).logprobs.detach()
    ref0 = pv.reference_logprobs(batch.input_ids, batch.attention_mask, response_start=batch.P)
    torch.testing.assert_close(ref0, step0, **ATOL)
    assert not any(p.requires_grad for p in pv.reference.model.parameters())
    assert all(id(p) not in {id(q) for q in pv.parameters()} for p in pv.reference.model.parameters())
    _ppo_like_step(pv, batch)
    moved = pv(batch.input_ids, batch.attention_mask, response_start=batch.P).logprobs.detach()
    assert (moved - step0).abs().max() > 1e-3
    ref1 = pv.reference_logprobs(batch.input_ids, batch.attention_mask, response_start=batch.P)
    torch.testing.assert_close(ref1, ref0, atol=0, rtol=0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_frozen_low_precision_reference_is_close_to_policy(dtype, batch):
    pv = PolicyValueModel(tiny_causal_lm("qwen2"), reference="frozen", reference_dtype=dtype)
    assert all(p.dtype == dtype for p in pv.reference.model.parameters())
    step0 = pv(batch.input_ids, batch.attention_mask, response_start=batch.P).logprobs.detach()
    ref = pv.reference_logprobs(batch.input_ids, batch.attention_mask, response_start=batch.P)
    assert ref.dtype == torch.float32
    torch.testing.assert_close(ref, step0, atol=0.05, rtol=0.02)


def test_offload_round_trip_keeps_values(batch):
    plain = PolicyValueModel(tiny_causal_lm("qwen2"), reference="frozen")
    off = PolicyValueModel(tiny_causal_lm("qwen2"), reference="frozen", reference_offload=True)
    assert off.reference.is_offloaded and off.reference.resident_bytes() == 0
    assert plain.reference.resident_bytes() > 0
    want = plain.reference_logprobs(batch.input_ids, batch.attention_mask, response_start=batch.P)
    got = off.reference_logprobs(batch.input_ids, batch.attention_mask, response_start=batch.P)
    torch.testing.assert_close(got, want, atol=0, rtol=0)
    assert off.reference.is_offloaded, "the reference goes back to host memory after use"
    again = off.reference_logprobs(batch.input_ids, batch.attention_mask, response_start=batch.P)
    torch.testing.assert_close(again, want, atol=0, rtol=0)  # second cycle reuses the host copy
    # explicit round trip: parameters come back bit-identical
    ref = FrozenReference(tiny_causal_lm("gpt2", tie=True), dtype=torch.bfloat16)
    before = {n: p.detach().clone() for n, p in ref.model.named_parameters()}
    ref.offload()
    assert all(p.numel() == 0 for p in ref.model.parameters())
    ref.onload("cpu")
    ref.offload()
    ref.onload()
    after = dict(ref.model.named_parameters())
    assert before.keys() == after.keys()
    for n, t in before.items():
        assert torch.equal(after[n], t), n
    assert ref.model.get_output_embeddings().weight is ref.model.get_input_embeddings().weight  # still tied


def test_reference_is_not_part_of_policy_module_tree():
    pv = PolicyValueModel(tiny_causal_lm("qwen2"), reference="frozen")
    assert not any(k.startswith("reference") for k in pv.state_dict())
    pv.train()
    assert not pv.reference.model.training
