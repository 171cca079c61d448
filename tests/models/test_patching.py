"""patch_backbone: a patched Llama / Qwen2 / Mistral equals its unpatched copy (outputs and gradients, fp32
and bf16 autocast, packed positions, LoRA, checkpointing, generation), per instance, idempotent; other
architectures untouched; the lean decoder keeps its fast path."""
from __future__ import annotations

import copy

import pytest
import torch

from rlhf_fast.memory.tracker import SavedTensorCounter
from rlhf_fast.models import (
    fast_decode_unsupported_reason,
    is_patched,
    patch_backbone,
    supports_fast_decode,
    unpatch_backbone,
)
from tests.models.conftest import VOCAB, tiny_causal_lm

FAMILIES = ("llama", "qwen2", "mistral")
# Packed: three sequences in row 0 (positions restart), one in row 1.
PACKED_POSITIONS = torch.tensor([[0, 1, 2, 3, 0, 1, 2, 0, 1, 2, 3], [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10]])


def _pair(arch, **kw):
    model = tiny_causal_lm(arch, **kw).train()
    return model, copy.deepcopy(model)


def _loss_and_grads(model, ids, **kwargs):
    model.zero_grad(set_to_none=True)
    logits = model(input_ids=ids, **kwargs).logits
    g = torch.Generator().manual_seed(0)
    (logits.float() * torch.randn(logits.shape, generator=g)).sum().backward()
    return logits, {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


def _assert_same(a, b, atol=2e-5, rtol=1e-5, scaled=None):
    """Logits and every gradient close; ``scaled``: instead within that fraction of each tensor's largest
    entry (bf16 runs: two bf16 computations of one gradient differ by a few bf16 steps of its scale)."""
    (la, ga), (lb, gb) = a, b
    assert ga.keys() == gb.keys() and ga
    for n, x, y in [("logits", la, lb), *((n, ga[n], gb[n]) for n in ga)]:
        x, y = x.float(), y.float()
        if scaled:
            atol, rtol = scaled * y.abs().max().item(), 0.0
        torch.testing.assert_close(x, y, atol=atol, rtol=rtol, msg=n)


@pytest.mark.parametrize("arch", FAMILIES)
def test_fp32_outputs_and_gradients_equal_the_unpatched_model(arch, batch):
    model, ref = _pair(arch)
    report = patch_backbone(model)
    assert (report.rms_norms, report.fused_residuals, report.mlps, report.attentions) == (5, 2, 2, 2), str(report)
    kw = dict(attention_mask=batch.attention_mask)
    _assert_same(_loss_and_grads(model, batch.input_ids, **kw), _loss_and_grads(ref, batch.input_ids, **kw))
    packed = torch.randint(3, VOCAB, PACKED_POSITIONS.shape)
    _assert_same(_loss_and_grads(model, packed, position_ids=PACKED_POSITIONS),
                 _loss_and_grads(ref, packed, position_ids=PACKED_POSITIONS))


@pytest.mark.parametrize("arch,pure", [("llama", False), ("qwen2", False), ("qwen2", True)])
def test_bf16_equals_the_unpatched_model_to_bf16_tolerance(arch, pure, batch):
    """Under a bf16 autocast (fp32 weights) and for a model stored in bf16."""
    model, ref = _pair(arch)
    if pure:
        model, ref = model.bfloat16(), ref.bfloat16()
    patch_backbone(model)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=not pure):
        ours = _loss_and_grads(model, batch.input_ids, attention_mask=batch.attention_mask)
        theirs = _loss_and_grads(ref, batch.input_ids, attention_mask=batch.attention_mask)
    assert ours[0].dtype == theirs[0].dtype
    _assert_same(ours, theirs, scaled=2 ** -6)


def test_lora_adapters_get_the_unpatched_gradients(batch):
    from peft import LoraConfig, get_peft_model

    cfg = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules="all-linear", init_lora_weights=False)
    base, ref_base = _pair("qwen2")
    patch_backbone(base)  # before peft wraps the linears: the patched MLP calls whatever its children are
    model, ref = get_peft_model(base, cfg), get_peft_model(ref_base, copy.deepcopy(cfg))
    ref.load_state_dict(model.state_dict())
    kw = dict(attention_mask=batch.attention_mask)
    ours, theirs = _loss_and_grads(model, batch.input_ids, **kw), _loss_and_grads(ref, batch.input_ids, **kw)
    assert all("lora_" in n for n in ours[1])
    _assert_same(ours, theirs)
    # patching the peft model itself finds the same modules, already patched
    assert patch_backbone(model).already_patched == 11


@pytest.mark.parametrize("reentrant", [False, True])
def test_gradient_checkpointing_recomputes_the_patched_layers(batch, reentrant):
    model, ref = _pair("llama")
    patch_backbone(model)
    for m in (model, ref):
        m.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    kw = dict(attention_mask=batch.attention_mask)
    _assert_same(_loss_and_grads(model, batch.input_ids, **kw), _loss_and_grads(ref, batch.input_ids, **kw))
    with SavedTensorCounter(exclude=model.parameters()) as ckpt:
        model(input_ids=batch.input_ids, **kw)
    model.gradient_checkpointing_disable()
    with SavedTensorCounter(exclude=model.parameters()) as full:
        model(input_ids=batch.input_ids, **kw)
    assert ckpt.bytes < 0.5 * full.bytes  # the layers' activations were not kept: checkpointing is on


def test_per_instance_idempotent_and_undone():
    model, other = _pair("llama")
    first = patch_backbone(model)
    again = patch_backbone(model)
    assert (again.rms_norms, again.mlps, again.attentions) == (first.rms_norms, first.mlps, first.attentions)
    assert again.already_patched == 11 and first.already_patched == 0
    assert not any("forward" in m.__dict__ for m in other.modules())  # the same class, untouched
    layer = model.model.layers[0]
    assert is_patched(layer) and is_patched(layer.mlp) and not is_patched(other.model.layers[0])
    twin = copy.deepcopy(model)  # a copy (a frozen reference) runs its own patched modules
    assert twin.model.layers[0].mlp.forward.__self__ is twin.model.layers[0].mlp
    assert unpatch_backbone(model) == 11
    assert not any("forward" in m.__dict__ for m in model.modules())


def test_other_architectures_are_left_alone_with_a_note():
    model = tiny_causal_lm("gpt2")
    report = patch_backbone(model)
    assert not report.patched and "not a Llama/Qwen2/Mistral" in str(report)
    assert not any("forward" in m.__dict__ for m in model.modules())


def test_lean_decoder_keeps_its_fast_path_and_generation_matches(batch):
    model, ref = _pair("qwen2")
    model.eval(), ref.eval()
    patch_backbone(model)
    assert supports_fast_decode(model, 32), fast_decode_unsupported_reason(model, 32)
    out = model.generate(input_ids=batch.input_ids[:, :batch.P], attention_mask=batch.attention_mask[:, :batch.P],
                         max_new_tokens=4, do_sample=False, pad_token_id=0)
    expected = ref.generate(input_ids=batch.input_ids[:, :batch.P], attention_mask=batch.attention_mask[:, :batch.P],
                            max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert torch.equal(out, expected)  # the HF path with a KV cache through the patched attention
    foreign = copy.deepcopy(ref)
    foreign.model.norm.forward = lambda x: x  # someone else's instance patch: the decoder must not bypass it
    assert not supports_fast_decode(foreign, 32)


def test_the_swiglu_product_is_freed_after_forward_and_gate_up_during_backward(monkeypatch):
    """down_proj's saved input is rebuilt in backward, so the product itself must die with the forward;
    and nothing (the saved-tensor hooks autograd keeps until the graph is freed) may hold gate and up
    past the MLP's own backward."""
    import gc
    import weakref

    from rlhf_fast.models import patching

    model = tiny_causal_lm("llama").train()
    patch_backbone(model)
    mlp = model.model.layers[0].mlp
    refs = {}
    real_swiglu, real_gate = patching.swiglu, mlp.gate_proj.forward

    def swiglu(gate, up):
        out = real_swiglu(gate, up)
        refs.update(product=weakref.ref(out), gate=weakref.ref(gate), up=weakref.ref(up))
        return out

    monkeypatch.setattr(patching, "swiglu", swiglu)
    x = torch.randn(2, 6, 32, requires_grad=True)
    y = mlp(x)
    gc.collect()
    assert refs["product"]() is None and refs["gate"]() is not None
    alive_in_backward = []

    def on_grad(g):  # runs once the MLP's backward is done, while the rest of the graph still exists
        gc.collect()
        alive_in_backward.append((refs["gate"]() is not None, refs["up"]() is not None))

    x.register_hook(on_grad)
    (y * y).sum().backward()
    assert alive_in_backward == [(False, False)]
    assert real_gate is not None and x.grad is not None
