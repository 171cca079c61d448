"""Rollout: sampler statistics, stop-token masking, early exit, left-padding and batch invariance."""

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from rlhf_fast.trainer.rollout import counter_uniform, generate, prompt_seeds, sample_from_logits


def _chi2_stat(counts: torch.Tensor, probs: torch.Tensor) -> float:
    n = counts.sum()
    expected = probs * n
    return float(((counts - expected) ** 2 / expected).sum())


def test_counter_uniform_is_uniform_and_deterministic():
    u = counter_uniform(torch.arange(200_000), step=3)
    assert 0.0 <= float(u.min()) and float(u.max()) < 1.0
    assert abs(float(u.mean()) - 0.5) < 0.005 and abs(float(u.var()) - 1 / 12) < 0.002
    # Deterministic per (seed, step), independent of the other rows.
    assert torch.equal(counter_uniform(torch.tensor([7, 11]), 5)[1:], counter_uniform(torch.tensor([11]), 5))
    assert not torch.equal(counter_uniform(torch.tensor([11]), 5), counter_uniform(torch.tensor([11]), 6))


def test_inverse_cdf_sampler_matches_multinomial_distribution():
    """Chi-square goodness of fit of both samplers against the softmax probabilities (K=6, 60k draws):
    the critical value at p=0.001 with 5 degrees of freedom is 20.5."""
    logits = torch.tensor([2.0, 0.5, -1.0, 0.0, 1.0, -3.0])
    temperature = 0.8
    probs = torch.softmax(logits / temperature, -1)
    n = 60_000
    ours = sample_from_logits(logits.expand(n, -1), temperature, counter_uniform(torch.arange(n), 0))
    torch.manual_seed(0)
    ref = torch.multinomial(probs, n, replacement=True)
    c_ours = torch.bincount(ours, minlength=6).double()
    c_ref = torch.bincount(ref, minlength=6).double()
    assert _chi2_stat(c_ours, probs.double()) < 20.5
    assert _chi2_stat(c_ref, probs.double()) < 20.5
    # Two-sample homogeneity between the samplers (same critical value).
    pooled = (c_ours + c_ref) / (2 * n)
    two_sample = _chi2_stat(c_ours, pooled) + _chi2_stat(c_ref, pooled)
    assert two_sample < 20.5


def test_temperature_zero_is_greedy():
    logits = torch.randn(5, 50)
    assert torch.equal(sample_from_logits(logits, 0.0, counter_uniform(torch.arange(5), 0)), logits.argmax(-1))


def test_sampler_never_returns_out_of_range_index():
    logits = torch.full((4, 10), -1e4)
    logits[:, -1] = 0  # all mass on the last token: u close to 1 must still land on it
    u = torch.tensor([0.0, 0.5, 0.999999, 1.0 - 2**-53], dtype=torch.float64)
    assert sample_from_logits(logits, 1.0, u).tolist() == [9, 9, 9, 9]


@pytest.fixture(scope="module")
def tiny_llama():
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=50, max_position_embeddings=128)
    return LlamaForCausalLM(cfg).eval()


def test_stop_token_masks_everything_after_it(tiny_llama):
    ids = torch.randint(3, 50, (6, 5))
    mask = torch.ones_like(ids)
    # Make token 7 very likely so rows stop at different places.
    with torch.no_grad():
        tiny_llama.lm_head.weight[7] += 0.6 * tiny_llama.lm_head.weight.abs().mean() * 20
    out = generate(tiny_llama, ids, mask, 12, pad_token_id=0, temperature=1.0, stop_token_ids=[7],
                   seeds=torch.arange(6))
    with torch.no_grad():
        tiny_llama.lm_head.weight[7] -= 0.6 * tiny_llama.lm_head.weight.abs().mean() * 20
    assert out.contains_stop.any() and not out.response_mask.all(), "the test needs rows that stop early"
    for b in range(6):
        row, m = out.responses[b], out.response_mask[b]
        if out.contains_stop[b]:
            k = int((row == 7).nonzero()[0])
            assert m[: k + 1].all() and not m[k + 1:].any(), "valid up to and including the stop token"
            assert (row[k + 1:] == 0).all(), "pad after the stop token"
        else:
            assert m.all() and out.responses.shape[1] == 12
    assert torch.equal(out.query_responses[:, 5:], out.responses)


def test_early_exit_when_every_row_stopped(tiny_llama):
    ids = torch.randint(3, 50, (3, 4))
    greedy = generate(tiny_llama, ids, torch.ones_like(ids), 10, pad_token_id=0, temperature=0.0)
    first = greedy.responses[:, 0].tolist()
    # Every greedy row's first token is a stop token -> one decode step only.
    out = generate(tiny_llama, ids, torch.ones_like(ids), 10, pad_token_id=0, temperature=0.0, stop_token_ids=first)
    assert out.responses.shape == (3, 1) and out.contains_stop.all()


def test_left_padding_and_batch_composition_do_not_change_samples(tiny_llama):
    """A prompt sampled alone (no padding) and inside a left-padded batch with other prompts gives the
    same response: positions are padding-aware and randomness is per prompt, not per batch."""
    long_p = torch.randint(3, 50, (1, 9))
    short_p = torch.randint(3, 50, (1, 4))
    seeds = prompt_seeds(42, torch.tensor([10, 11]))
    batch = torch.cat([long_p, torch.cat([torch.zeros(1, 5, dtype=torch.long), short_p], 1)])
    bmask = torch.ones_like(batch)
    bmask[1, :5] = 0
    both = generate(tiny_llama, batch, bmask, 8, pad_token_id=0, temperature=1.0, seeds=seeds, trim=False)
    alone = generate(tiny_llama, short_p, torch.ones_like(short_p), 8, pad_token_id=0, temperature=1.0,
                     seeds=seeds[1:], trim=False)
    assert torch.equal(both.responses[1], alone.responses[0])


def test_bad_arguments_name_the_problem(tiny_llama):
    ids = torch.randint(3, 50, (2, 4))
    with pytest.raises(ValueError, match="response_length"):
        generate(tiny_llama, ids, torch.ones_like(ids), 0, pad_token_id=0)
    with pytest.raises(ValueError, match=r"\[B, P\]"):
        generate(tiny_llama, ids, torch.ones(2, 5), 3, pad_token_id=0)




@pytest.mark.parametrize("top_k, top_p", [(3, 1.0), (0, 0.7), (5, 0.5), (1, 1.0), (0, 1e-9), (100, 1.0)])
def test_top_k_top_p_filter_as_hf_warpers(top_k, top_p):
    """The tokens left by filter_logits are those HF generate's TopK then TopP warpers leave (ties included)."""
    from transformers.generation.logits_process import TopKLogitsWarper, TopPLogitsWarper

    from rlhf_fast.trainer.rollout import filter_logits

    torch.manual_seed(0)
    logits = torch.randn(64, 40)
    logits[0, :4] = 2.0  # a tie at the k-th value
    ref = logits.clone()
    if top_k:
        ref = TopKLogitsWarper(top_k)(None, ref)
    if top_p < 1.0:
        ref = TopPLogitsWarper(top_p)(None, ref)
    ours = filter_logits(logits, top_k, top_p)
    assert torch.equal(torch.isinf(ours), torch.isinf(ref)) and torch.equal(ours[~torch.isinf(ours)], ref[~torch.isinf(ref)])


def test_top_k_top_p_sampling_distribution():
    """Chi-square of inverse-CDF samples after top_k=3 (then top_p=0.9) against the renormalised kept mass;
    filtered tokens never come out (critical values at p=0.001: 13.8 with 2 degrees of freedom, 16.3 with 3)."""
    logits = torch.tensor([2.0, 0.5, -1.0, 0.0, 1.0, -3.0])
    n = 60_000
    for top_k, top_p, kept in [(3, 1.0, [0, 4, 1]), (0, 0.9, [0, 4, 1, 3])]:
        out = sample_from_logits(logits.expand(n, -1), 1.0, counter_uniform(torch.arange(n), 0), top_k=top_k, top_p=top_p)
        counts = torch.bincount(out, minlength=6).double()
        assert set(torch.nonzero(counts).flatten().tolist()) == set(kept)
        probs = torch.softmax(logits[kept], -1).double()
        assert _chi2_stat(counts[kept], probs) < {2: 13.8, 3: 16.3}[len(kept) - 1]


def test_generate_passes_top_k(tiny_llama):
    """top_k=1 samples the argmax whatever the seed: greedy decoding's tokens."""
    ids = torch.tensor([[5, 6, 7], [8, 9, 10]])
    mask = torch.ones_like(ids)
    greedy = generate(tiny_llama, ids, mask, 5, pad_token_id=0, temperature=1.0, seeds=None)
    top1 = generate(tiny_llama, ids, mask, 5, pad_token_id=0, temperature=1.0, seeds=torch.tensor([1, 2]), top_k=1)
    assert torch.equal(greedy.responses, top1.responses)
