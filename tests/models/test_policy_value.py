"""PolicyValueModel against the plain HF forward: log-probs, entropy, values, padding, critic gradients."""
from __future__ import annotations

import pytest
import torch

from rlhf_fast.models import ModelOutput, PolicyValueModel, position_ids_from_mask
from rlhf_fast.models.policy_value import is_checkpointing
from tests.models.conftest import ARCHS, Batch, tiny_causal_lm, tiny_seq_cls

ATOL = dict(atol=2e-5, rtol=2e-5)


def hf_response_logprobs(model, batch: Batch, temperature=1.0):
    """The textbook path: full logits, log_softmax, gather; zero on padding. Also returns last hidden states."""
    out = model(
        input_ids=batch.input_ids, attention_mask=batch.attention_mask,
        position_ids=position_ids_from_mask(batch.attention_mask), output_hidden_states=True, use_cache=False,
    )
    P = batch.P
    logits = out.logits[:, P - 1 : -1].float() / temperature
    logp_all = torch.log_softmax(logits, -1)
    tokens = batch.input_ids[:, P:]
    logp = logp_all.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    entropy = -(logp_all.exp() * logp_all).sum(-1)
    valid = batch.attention_mask[:, P:].bool()
    return logp * valid, entropy * valid, out.hidden_states[-1]


@pytest.mark.parametrize("arch", ARCHS)
def test_logprobs_entropy_values_match_hf_forward(arch, batch):
    model = tiny_causal_lm(arch)
    pv = PolicyValueModel(model, reference="none")
    out = pv(batch.input_ids, batch.attention_mask, response_start=batch.P, return_entropy=True)
    assert isinstance(out, ModelOutput)
    assert out.logprobs.shape == out.entropy.shape == out.values.shape == (3, batch.R)
    assert out.logprobs.dtype == out.values.dtype == torch.float32
    ref_lp, ref_ent, hidden = hf_response_logprobs(model, batch)
    torch.testing.assert_close(out.logprobs, ref_lp, **ATOL)
    torch.testing.assert_close(out.entropy, ref_ent, **ATOL)
    # TRL convention: the value for response token j comes from the hidden state at P + j - 1.
    ref_values = pv.value_head(hidden[:, batch.P - 1 : -1].float()).squeeze(-1)
    torch.testing.assert_close(out.values, ref_values, **ATOL)
    assert (out.logprobs[~batch.attention_mask[:, batch.P:].bool()] == 0).all()


def test_temperature_divides_logits(batch):
    model = tiny_causal_lm("qwen2")
    pv = PolicyValueModel(model, reference="none", temperature=0.7)
    out = pv(batch.input_ids, batch.attention_mask, response_start=batch.P, return_values=False)
    ref_lp, _, _ = hf_response_logprobs(model, batch, temperature=0.7)
    torch.testing.assert_close(out.logprobs, ref_lp, **ATOL)
    assert out.values is None


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_left_padded_rows_equal_unpadded_rows(arch, batch):
    """position_ids from the mask: each padded row computes what it computes alone without padding."""
    pv = PolicyValueModel(tiny_causal_lm(arch), reference="none")
    out = pv(batch.input_ids, batch.attention_mask, response_start=batch.P)
    for b in range(3):
        keep = batch.attention_mask[b].bool()
        ids = batch.input_ids[b, keep][None]
        n_prompt = int(batch.attention_mask[b, : batch.P].sum())
        n_resp = int(batch.attention_mask[b, batch.P :].sum())
        alone = pv(ids, torch.ones_like(ids), response_start=n_prompt)
        torch.testing.assert_close(out.logprobs[b, :n_resp], alone.logprobs[0], **ATOL)
        torch.testing.assert_close(out.values[b, :n_resp], alone.values[0], **ATOL)


def test_response_mask_form_matches_response_start_form(batch):
    pv = PolicyValueModel(tiny_causal_lm("qwen2"), reference="none")
    a = pv(batch.input_ids, batch.attention_mask, response_start=batch.P, return_entropy=True)
    b = pv(batch.input_ids, batch.attention_mask, response_mask=batch.response_mask, return_entropy=True)
    assert b.logprobs.shape == batch.input_ids.shape
    torch.testing.assert_close(b.logprobs[:, batch.P :], a.logprobs, **ATOL)
    torch.testing.assert_close(b.entropy[:, batch.P :], a.entropy, **ATOL)
    torch.testing.assert_close(b.values[:, batch.P :], a.values, **ATOL)
    assert (b.logprobs[:, : batch.P] == 0).all()
    with pytest.raises(ValueError, match=r"response_mask\[:, 0\]"):
        bad = batch.response_mask.clone()
        bad[:, 0] = True
        pv(batch.input_ids, batch.attention_mask, response_mask=bad)


def _backbone_grads(module):
    return [p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in module.parameters()]


def test_shared_critic_value_gradient_reaches_backbone_scaled_by_vf_coef(batch):
    vf_coef = 0.25
    model = tiny_causal_lm("qwen2")
    pv = PolicyValueModel(model, reference="none", critic="shared", vf_coef=vf_coef)
    valid = batch.attention_mask[:, batch.P :].float()
    out = pv(batch.input_ids, batch.attention_mask, response_start=batch.P)
    value_loss = ((out.values - 1.0) ** 2 * valid).sum()
    value_loss.backward()
    got_backbone = _backbone_grads(pv.backbone)
    got_head = pv.value_head.weight.grad.clone()

    # The same loss through an unscaled manual path: backbone grads must be exactly vf_coef times these.
    pv.zero_grad(set_to_none=True)
    hidden = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                   position_ids=position_ids_from_mask(batch.attention_mask), output_hidden_states=True).hidden_states[-1]
    values = pv.value_head(hidden[:, batch.P - 1 : -1].float()).squeeze(-1)
    ((values - 1.0) ** 2 * valid).sum().backward()
    want_backbone = _backbone_grads(pv.backbone)
    assert sum(g.abs().sum() for g in want_backbone) > 0
    for g, w in zip(got_backbone, want_backbone):
        torch.testing.assert_close(g, vf_coef * w, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(got_head, pv.value_head.weight.grad, atol=1e-6, rtol=1e-5)  # head: unscaled
    assert pv.lm_head.weight.grad is None or pv.lm_head.weight.grad.abs().sum() == 0


def test_separate_critic_keeps_value_gradient_out_of_policy(batch):
    critic_src = tiny_seq_cls("qwen2")
    pv = PolicyValueModel(tiny_causal_lm("qwen2"), reference="none", critic="separate", critic_model=critic_src)
    # Value head initialised from the critic model's score head.
    torch.testing.assert_close(pv.value_head.weight, critic_src.score.weight.float())
    out = pv(batch.input_ids, batch.attention_mask, response_start=batch.P)
    # Values are the sequence-classification model's per-position scores at positions P-1 .. T-2.
    hf = critic_src(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                    position_ids=position_ids_from_mask(batch.attention_mask), output_hidden_states=True)
    want = critic_src.score(hf.hidden_states[-1][:, batch.P - 1 : -1]).squeeze(-1)
    torch.testing.assert_close(out.values, want, **ATOL)
    out.values.sum().backward()
    assert all(p.grad is None for p in pv.backbone.parameters())
    assert sum(p.grad.abs().sum() for p in pv.critic_backbone.parameters() if p.grad is not None) > 0
    # The policy log-prob gradient does not reach the critic.
    pv.zero_grad(set_to_none=True)
    pv(batch.input_ids, batch.attention_mask, response_start=batch.P).logprobs.sum().backward()
    assert all(p.grad is None for p in pv.critic_backbone.parameters())


def test_separate_critic_without_model_copies_policy_backbone(batch):
    pv = PolicyValueModel(tiny_causal_lm("llama"), reference="none", critic="separate")
    assert pv.critic_backbone is not pv.backbone
    for a, b in zip(pv.critic_backbone.parameters(), pv.backbone.parameters()):
        assert a.data_ptr() != b.data_ptr() and torch.equal(a, b)


def test_gradient_checkpointing_gives_same_outputs_and_grads(batch):
    outs, grads, heads = [], [], []
    for ckpt in (False, True):
        pv = PolicyValueModel(tiny_causal_lm("llama"), reference="none", gradient_checkpointing=ckpt).train()
        heads.append(pv.value_head.weight.detach().clone())  # same seed -> same value head both times
        o = pv(batch.input_ids, batch.attention_mask, response_start=batch.P)
        (o.logprobs.sum() + o.values.sum()).backward()
        outs.append(o.logprobs.detach())
        grads.append(_backbone_grads(pv.backbone))
    assert is_checkpointing(pv.backbone) and not is_checkpointing(PolicyValueModel(tiny_causal_lm('llama')).backbone)
    torch.testing.assert_close(heads[0], heads[1])
    torch.testing.assert_close(outs[0], outs[1])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def test_bad_batch_arguments(batch):
    pv = PolicyValueModel(tiny_causal_lm("qwen2"), reference="none")
    with pytest.raises(ValueError, match="exactly one of"):
        pv(batch.input_ids, batch.attention_mask)
    with pytest.raises(ValueError, match="response_start must be in"):
        pv(batch.input_ids, batch.attention_mask, response_start=batch.input_ids.shape[1])
    with pytest.raises(ValueError, match="attention_mask must have the shape"):
        pv(batch.input_ids, batch.attention_mask[:, 1:], response_start=2)
    with pytest.raises(TypeError, match="integer"):
        pv(batch.input_ids.float(), batch.attention_mask, response_start=2)
    right_padded_prompts = batch.attention_mask.clone()
    right_padded_prompts[2, batch.P - 1] = 0
    with pytest.raises(ValueError, match=r"rows \[2\] have padding"):
        pv(batch.input_ids, right_padded_prompts, response_start=batch.P)
    with pytest.raises(ValueError, match="reference='none'"):
        pv.reference_logprobs(batch.input_ids, batch.attention_mask, response_start=batch.P)
