"""Padding-free forwards equal padded ones: log-probs, entropies, values, reference log-probs, reward scores and
gradients, for Llama, Qwen2 and Mistral, with left-padded prompts and responses that stop mid-row; the
flash-attn path by its call contract (the kernel replaced by a recording stand-in)."""
from __future__ import annotations

import copy

import pytest
import torch
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    LlamaForSequenceClassification,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from rlhf_fast.models import PolicyValueModel, make_reward
from rlhf_fast.models.packing import PACKED_SDPA, enable_packing, pack_batch, packed_hidden

V = 48


def tiny(arch: str, seed: int = 0):
    torch.manual_seed(seed)
    kw = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
              vocab_size=V, max_position_embeddings=128)
    if arch == "llama":
        return LlamaForCausalLM(LlamaConfig(**kw))
    if arch == "qwen2":
        return Qwen2ForCausalLM(Qwen2Config(**kw, tie_word_embeddings=False))
    return MistralForCausalLM(MistralConfig(**kw, sliding_window=None))


def batch():
    """Left-padded prompts (P = 5) and responses that stop at different lengths (R = 6)."""
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(3, V, (4, 11), generator=g)
    prompt = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1], [0, 0, 0, 1, 1], [0, 1, 1, 1, 1]])
    response = torch.tensor([[1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 1], [1, 0, 0, 0, 0, 0], [1, 1, 1, 1, 0, 0]])
    return ids, torch.cat([prompt, response], 1)


def test_pack_batch_positions_restart_per_row():
    ids, mask = batch()
    p = pack_batch(ids, mask)
    assert p.cu_seqlens.tolist() == [0, 6, 17, 20, 28]
    assert p.position_ids[0, :6].tolist() == list(range(6)) and p.position_ids[0, 6:17].tolist() == list(range(11))
    assert torch.equal(p.input_ids[0], ids[mask.bool()])


@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral"])
@pytest.mark.parametrize("critic", ["shared", "separate"])
def test_packed_equals_padded(arch, critic):
    ids, mask = batch()
    outs, grads = [], []
    for padding_free in (False, True):
        pv = PolicyValueModel(tiny(arch), reference="frozen", critic=critic, reference_dtype=torch.float32,
                              vf_coef=1.0)
        if padding_free:
            assert pv.enable_padding_free() == []
            assert pv.backbone.config._attn_implementation == PACKED_SDPA
        out = pv(ids, mask, response_start=5, return_entropy=True)
        ref = pv.reference_logprobs(ids, mask, response_start=5)
        m = mask[:, 5:].bool()
        loss = (out.logprobs * m).sum() + (out.values * m).sum() + (out.entropy * m).sum()
        loss.backward()
        outs.append([t * m for t in (out.logprobs, out.entropy, out.values, ref)])
        grads.append(torch.cat([p.grad.flatten() for p in pv.parameters() if p.grad is not None]))
    for a, b in zip(*outs):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-4, atol=1e-5)


def test_reward_scores_packed_equal_padded():
    torch.manual_seed(1)
    cfg = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=V, num_labels=1, pad_token_id=0)
    clf = LlamaForSequenceClassification(cfg)
    ids, mask = batch()
    padded = make_reward(copy.deepcopy(clf)).score_ids(ids, mask)
    reward = make_reward(clf)
    assert reward.enable_padding_free() is None
    torch.testing.assert_close(reward.score_ids(ids, mask), padded, rtol=1e-5, atol=1e-5)


def test_flash_attention_gets_the_packed_sequence_boundaries(monkeypatch):
    """On CUDA with flash-attn, transformers' flash_attention_2 runs the packed row: it must receive the
    sequence boundaries. The kernel is replaced by a stand-in that records its arguments and attends per
    sequence, and the result must equal the padded forward."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    from rlhf_fast.models.loading import backbone_hidden, get_backbone
    from rlhf_fast.models.packing import packed_sdpa_attention

    seen = []

    def fake_flash(module, q, k, v, attention_mask, **kw):
        seen.append({key: kw.get(key) for key in ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k")})
        assert attention_mask is None
        return packed_sdpa_attention(module, q, k, v, None, **kw)

    monkeypatch.setitem(ALL_ATTENTION_FUNCTIONS._global_mapping, "flash_attention_2", fake_flash)
    model = tiny("qwen2")
    ids, mask = batch()
    padded = backbone_hidden(get_backbone(model), ids, mask)
    model.config._attn_implementation = "flash_attention_2"
    assert enable_packing(model) is None and model.config._attn_implementation == "flash_attention_2"
    packed = packed_hidden(get_backbone(model), ids, mask)
    assert len(seen) == 2  # one call per layer
    assert seen[0]["cu_seq_lens_q"].tolist() == [0, 6, 17, 20, 28] and seen[0]["max_length_q"] == 11
    m = mask.bool()[..., None]
    torch.testing.assert_close(packed * m, padded * m, rtol=1e-5, atol=1e-5)


def test_other_attention_implementations_stay_padded():
    model = tiny("llama")
    model.config._attn_implementation = "eager"
    pv = PolicyValueModel(model, reference="none", critic="shared")
    notes = pv.enable_padding_free()
    assert notes and "padded forwards" in notes[0] and "'eager'" in notes[0]
    ids, mask = batch()
    out = pv(ids, mask, response_start=5)
    assert out.logprobs.shape == (4, 6)
