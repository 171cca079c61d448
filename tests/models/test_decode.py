"""Lean decoder: logits equal the HF forward at every step (left padding, GQA, biases, rope scaling),
generate() gives the same tokens through both paths, and anything unusual falls back to HF."""
from __future__ import annotations

import pytest
import torch
import transformers as tf

from rlhf_fast.models.decode import LeanDecoder, fast_decode_unsupported_reason, supports_fast_decode
from rlhf_fast.models.loading import position_ids_from_mask
from rlhf_fast.trainer import rollout
from rlhf_fast.trainer.rollout import generate
from tests.utils import assert_close

VOCAB = 96
P, R = 7, 9  # prompt columns, new tokens


def _config(arch: str, **overrides):
    common = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                  bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=False)
    common.update(overrides)
    cls = {"llama": tf.LlamaConfig, "qwen2": tf.Qwen2Config, "mistral": tf.MistralConfig}[arch]
    return cls(**common)


def _model(arch: str, seed: int = 0, **overrides):
    """Random-init model with every parameter (biases, norm weights included) drawn away from its
    init, so biases and norm scales actually matter and the logits are far from uniform."""
    torch.manual_seed(seed)
    model = tf.AutoModelForCausalLM.from_config(_config(arch, **overrides), attn_implementation="sdpa").eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
            else:
                p.normal_(0.0, 0.3 if "embed" in name or "lm_head" in name else 0.15)
    return model


def _batch(seed: int = 0, B: int = 4):
    """Left-padded prompts of lengths P, P-2, 3, 1 followed by R continuation tokens: [B, P + R]."""
    g = torch.Generator().manual_seed(seed)
    lens = torch.tensor([P, P - 2, 3, 1])[:B]
    ids = torch.randint(3, VOCAB, (B, P + R), generator=g)
    mask = torch.ones(B, P + R, dtype=torch.long)
    for b in range(B):
        mask[b, : P - lens[b]] = 0
    return ids * mask, mask


def _lean_logits(model, ids, mask):
    """Prefill on the first P columns, then one step per continuation token: [B, R, V]."""
    dec = LeanDecoder(model, R)
    out = [dec.prefill(ids[:, :P], mask[:, :P])]
    for t in range(R - 1):
        out.append(dec.step(ids[:, P + t]))
    return torch.stack(out, 1)


def _hf_full_logits(model, ids, mask):
    """Logits predicting columns P..P+R-1 from one full-sequence HF forward: [B, R, V]."""
    logits = model(input_ids=ids, attention_mask=mask, position_ids=position_ids_from_mask(mask)).logits
    return logits[:, P - 1 : P + R - 1]


def _hf_cached_logits(model, ids, mask):
    """The HF path of rollout (DynamicCache, one token per call): [B, R, V]."""
    out = model(input_ids=ids[:, :P], attention_mask=mask[:, :P], position_ids=position_ids_from_mask(mask[:, :P]),
                use_cache=True)
    logits, past = [out.logits[:, -1]], out.past_key_values
    for t in range(R - 1):
        m = mask[:, : P + t + 1]
        out = model(input_ids=ids[:, P + t : P + t + 1], attention_mask=m,
                    position_ids=position_ids_from_mask(m)[:, -1:], past_key_values=past, use_cache=True)
        logits.append(out.logits[:, -1])
        past = out.past_key_values
    return torch.stack(logits, 1)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral"])
def test_logits_match_hf_at_every_step(arch):
    model = _model(arch)
    assert supports_fast_decode(model, P + R), fast_decode_unsupported_reason(model, P + R)
    if arch == "qwen2":
        assert model.model.layers[0].self_attn.q_proj.bias.abs().sum() > 0, "the test must exercise the biases"
    ids, mask = _batch()
    with torch.inference_mode():
        ours, ref = _lean_logits(model, ids, mask), _hf_full_logits(model, ids, mask)
    assert ours.shape == (4, R, VOCAB) and ours.dtype == torch.float32
    assert ref.std() > 1.0, "logits should be far from uniform"
    assert_close(ours, ref, torch.float32)


@pytest.mark.parametrize("overrides", [
    dict(attention_bias=True, mlp_bias=True, num_key_value_heads=4),  # biases everywhere, no GQA
    dict(tie_word_embeddings=True, num_key_value_heads=1, head_dim=16),  # tied head, MQA, head_dim != H / heads
    dict(rope_scaling={"rope_type": "llama3", "factor": 4.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                       "original_max_position_embeddings": 8}),
    dict(rope_scaling={"rope_type": "linear", "factor": 2.0}),
])
def test_llama_variants_match_hf(overrides):
    model = _model("llama", seed=1, **overrides)
    assert supports_fast_decode(model, P + R), fast_decode_unsupported_reason(model, P + R)
    if overrides.get("tie_word_embeddings"):
        assert model.lm_head.weight is model.model.embed_tokens.weight
    ids, mask = _batch(seed=1)
    with torch.inference_mode():
        assert_close(_lean_logits(model, ids, mask), _hf_full_logits(model, ids, mask), torch.float32)


def test_position_dependent_rope_matches_hf_cached_decoding():
    """Dynamic NTK rope recomputes its frequencies from the positions seen: the decoder calls
    rotary_emb per step with the actual positions, like the HF cached forward (max_position 8 < P + R,
    so the frequencies do grow during the rollout)."""
    model = _model("llama", seed=2, max_position_embeddings=8,
                   rope_parameters={"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0})
    ids, mask = _batch(seed=2)
    with torch.inference_mode():
        ref = _hf_cached_logits(model, ids, mask)
        ours = _lean_logits(model, ids, mask)
    assert_close(ours, ref, torch.float32)


def test_decoder_reads_the_live_weights():
    """No stale copy: a weight updated in place between rollouts changes the next rollout's logits."""
    model = _model("qwen2", seed=3)
    ids, mask = _batch(seed=3)
    with torch.inference_mode():
        before = _lean_logits(model, ids, mask)
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight.mul_(-1.5)
        model.model.layers[0].self_attn.k_proj.bias.add_(0.5)
    with torch.inference_mode():
        after, ref = _lean_logits(model, ids, mask), _hf_full_logits(model, ids, mask)
    assert (after - before).abs().max() > 0.1
    assert_close(after, ref, torch.float32)


def _forbid_hf_forward(monkeypatch, model):
    def boom(*a, **k):
        raise AssertionError("the HF forward ran although the lean decoder should have been used")
    monkeypatch.setattr(model, "forward", boom)


def _count_lean_decoders(monkeypatch):
    built = []

    class Spy(LeanDecoder):
        def __init__(self, *a, **k):
            built.append(self)
            self.steps = 0
            super().__init__(*a, **k)

        def step(self, tokens):
            self.steps += 1
            return super().step(tokens)

    monkeypatch.setattr(rollout, "LeanDecoder", Spy)
    return built


@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral"])
@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_generate_fast_equals_hf_path_token_for_token(arch, temperature, monkeypatch):
    model = _model(arch, seed=4)
    ids, mask = _batch(seed=4)
    prompt, pmask = ids[:, :P], mask[:, :P]
    seeds = rollout.prompt_seeds(7, torch.arange(4))
    kw = dict(pad_token_id=0, temperature=temperature, seeds=seeds)
    hf = generate(model, prompt, pmask, R, fast_decode=False, **kw)
    built = _count_lean_decoders(monkeypatch)
    with monkeypatch.context() as m:
        _forbid_hf_forward(m, model)
        fast = generate(model, prompt, pmask, R, fast_decode=True, **kw)
        auto = generate(model, prompt, pmask, R, **kw)
    assert len(built) == 2 and all(d.steps == R - 1 for d in built)
    for out in (fast, auto):
        assert torch.equal(out.responses, hf.responses)
        assert torch.equal(out.query_responses, hf.query_responses)
        assert torch.equal(out.response_mask, hf.response_mask)
    if temperature > 0:  # sampling really depends on the seeds, so equality above is not trivial
        other = generate(model, prompt, pmask, R, **dict(kw, seeds=seeds + 1))
        assert not torch.equal(other.responses, hf.responses)


def test_stop_tokens_and_early_exit_on_the_fast_path(monkeypatch):
    model = _model("qwen2", seed=5)
    ids, mask = _batch(seed=5)
    prompt, pmask = ids[:, :P], mask[:, :P]
    greedy = generate(model, prompt, pmask, R, pad_token_id=0, temperature=0.0, fast_decode=False)
    # Rows stop at different steps: row 0 at its 3rd token, the others on the token they emit at step 5
    # (or never, when that token is row 0's).
    stops = [int(greedy.responses[0, 2]), int(greedy.responses[1, 5])]
    kw = dict(pad_token_id=0, temperature=0.0, stop_token_ids=stops)
    hf = generate(model, prompt, pmask, R, fast_decode=False, **kw)
    built = _count_lean_decoders(monkeypatch)
    fast = generate(model, prompt, pmask, R, fast_decode=True, **kw)
    for a, b in zip(fast, hf):
        assert torch.equal(a, b) if isinstance(a, torch.Tensor) else a == b
    assert fast.contains_stop[:2].all() and not fast.response_mask.all()
    # Early exit: every row stops on its first token -> no decode step at all after the prefill.
    first = greedy.responses[:, 0].tolist()
    out = generate(model, prompt, pmask, R, pad_token_id=0, temperature=0.0, stop_token_ids=first, fast_decode=True)
    assert out.responses.shape == (4, 1) and out.contains_stop.all()
    assert built[-1].steps == 0


def test_bf16_autocast_runs_and_stays_close():
    model = _model("qwen2", seed=6)
    ids, mask = _batch(seed=6)
    with torch.inference_mode():
        fp32 = _hf_full_logits(model, ids, mask)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            ours, ref = _lean_logits(model, ids, mask), _hf_cached_logits(model, ids, mask)
    assert ours.dtype == ref.dtype == torch.bfloat16
    # Same ops in the same dtypes as the HF forward under autocast: as close as two bf16 runs get.
    assert_close(ours, ref, torch.bfloat16)
    # And within bf16 rounding of the fp32 logits (relative to their scale).
    assert ((ours.float() - fp32).abs().max() / fp32.abs().max()) < 0.05
    prompt, pmask = ids[:, :P], mask[:, :P]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fast = generate(model, prompt, pmask, R, pad_token_id=0, temperature=0.0, fast_decode=True)
        hf = generate(model, prompt, pmask, R, pad_token_id=0, temperature=0.0, fast_decode=False)
    agree = (fast.responses == hf.responses).float().mean()
    assert agree > 0.8, f"bf16 greedy tokens agree on only {agree:.0%} of positions"


def _assert_falls_back(model, monkeypatch, reason_part: str):
    assert not supports_fast_decode(model, P + R)
    assert reason_part in fast_decode_unsupported_reason(model, P + R)
    ids, mask = _batch(seed=7)
    prompt, pmask = ids[:, :P], mask[:, :P]
    kw = dict(pad_token_id=0, temperature=0.9, seeds=torch.arange(4))
    hf = generate(model, prompt, pmask, R, fast_decode=False, **kw)
    built = _count_lean_decoders(monkeypatch)
    auto = generate(model, prompt, pmask, R, **kw)
    assert built == [], "the lean decoder must not be used"
    assert torch.equal(auto.responses, hf.responses)
    with pytest.raises(ValueError, match="fast_decode=True"):
        generate(model, prompt, pmask, R, fast_decode=True, **kw)


def test_gpt2_falls_back(monkeypatch):
    torch.manual_seed(0)
    model = tf.GPT2LMHeadModel(tf.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64)).eval()
    _assert_falls_back(model, monkeypatch, "not a Llama/Qwen2/Mistral")


def test_peft_model_falls_back(monkeypatch):
    peft = pytest.importorskip("peft")
    model = _model("llama", seed=8)
    lora = peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                      init_lora_weights=False)).eval()
    _assert_falls_back(lora, monkeypatch, "PeftModel")
    # The injected base model alone is no plain Llama either: its q/v projections are LoRA layers.
    assert "non-plain linear" in fast_decode_unsupported_reason(lora.base_model.model, P + R)


def test_active_sliding_window_falls_back(monkeypatch):
    model = _model("mistral", seed=9, sliding_window=4)
    _assert_falls_back(model, monkeypatch, "sliding window")
    # A window longer than the whole rollout is never active.
    assert supports_fast_decode(_model("mistral", seed=9, sliding_window=P + R + 1), P + R)


def test_checkpointing_hook_keeps_the_fast_path():
    """Gradient/activation checkpointing installs transformers' enable_input_require_grads hook on the
    embeddings (it only sets requires_grad): PPOConfig enables checkpointing by default, so this must
    not force the slow path."""
    model = _model("qwen2", seed=12)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    assert model.model.embed_tokens._forward_hooks, "the test needs the hook installed"
    model.train()
    assert supports_fast_decode(model, P + R), fast_decode_unsupported_reason(model, P + R)
    ids, mask = _batch(seed=12)
    with torch.inference_mode():
        assert_close(_lean_logits(model, ids, mask), _hf_full_logits(model.eval(), ids, mask), torch.float32)


def test_hooks_and_other_structures_fall_back(monkeypatch):
    model = _model("llama", seed=10)
    handle = model.model.layers[1].mlp.register_forward_hook(lambda mod, inp, out: out * 2)
    _assert_falls_back(model, monkeypatch, "hooks")
    handle.remove()
    assert supports_fast_decode(model, P + R)
    model.model.layers[0].mlp.act_fn = torch.nn.GELU()
    assert "activation" in fast_decode_unsupported_reason(model, P + R)
    qwen3 = tf.Qwen3ForCausalLM(tf.Qwen3Config(vocab_size=VOCAB, hidden_size=32, intermediate_size=48,
                                               num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2))
    assert not supports_fast_decode(qwen3, P + R)  # q/k norms


def test_decoder_rejects_bad_use():
    model = _model("llama", seed=11)
    ids, mask = _batch(seed=11)
    with torch.inference_mode():
        dec = LeanDecoder(model, 2)
        dec.prefill(ids[:, :P], mask[:, :P])
        dec.step(ids[:, P])
        dec.step(ids[:, P + 1])
        with pytest.raises(ValueError, match="cache is full"):
            dec.step(ids[:, P + 2])
        with pytest.raises(ValueError, match=r"\[B, P\]"):
            LeanDecoder(model, 2).prefill(ids[:, :P], mask[:, : P - 1])
        with pytest.raises(ValueError, match="max_new_tokens"):
            LeanDecoder(model, 0)
        gpt2 = tf.GPT2LMHeadModel(tf.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=1, n_head=4, n_positions=64))
        with pytest.raises(ValueError, match="cannot run this model"):
            LeanDecoder(gpt2, 2).prefill(ids[:, :P], mask[:, :P])


def test_uniform_grid_is_bitwise_the_per_step_counter():
    """rollout precomputes every step's uniforms at once; they must be the per-step counter's bits."""
    seeds = torch.tensor([0, 1, 7, 123_456_789, -5, 2**62])
    grid = rollout.counter_uniforms(seeds, 70)
    assert grid.shape == (6, 70) and grid.dtype == torch.float64
    for t in (0, 1, 33, 69):
        assert torch.equal(grid[:, t], rollout.counter_uniform(seeds, t))


def test_large_head_with_few_rows_takes_the_transposed_product_and_matches_hf():
    """B <= 8 rows against an fp32 head of >= 8 MiB: logits come from W @ x^T (see decode._logits)."""
    from rlhf_fast.models.decode import _head_as_weight_times_x

    model = _model("qwen2", seed=2, vocab_size=65536)  # head [65536, 32] fp32 = 8 MiB
    x = torch.zeros(4, 32)
    assert _head_as_weight_times_x(x, model.lm_head.weight)
    assert not _head_as_weight_times_x(torch.zeros(16, 32), model.lm_head.weight)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not _head_as_weight_times_x(x, model.lm_head.weight)
    ids, mask = _batch(seed=2)
    with torch.inference_mode():
        assert_close(_lean_logits(model, ids, mask), _hf_full_logits(model, ids, mask), torch.float32)


@pytest.mark.parametrize("backend", ["aot_eager"])  # inductor passes too (~45 s here): kept out of make test
def test_static_step_compiles_fullgraph_and_equals_eager_token_by_token(backend):
    """step_static: one graph (fullgraph=True), the same logits as the eager step at every token."""
    model = _model("qwen2")
    ids, mask = _batch()
    steps = 5
    eager, static = LeanDecoder(model, steps), LeanDecoder(model, steps, static_cache=True)
    torch._dynamo.reset()
    compiled = torch.compile(static.step_static, fullgraph=True, backend=backend, dynamic=False)
    with torch.no_grad():
        assert_close(eager.prefill(ids, mask), static.prefill(ids, mask), torch.float32)
        t = torch.tensor(static.length)
        g = torch.Generator().manual_seed(3)
        for _ in range(steps):
            tokens = torch.randint(0, model.config.vocab_size, (ids.shape[0],), generator=g)
            a, b = eager.step(tokens), compiled(tokens, t)
            t += 1
            torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)
