"""Rollout: a lean decode loop with the model's KV cache, and a counter-based sampler.

Why not ``model.generate``: its per-token machinery (logits processors, stopping criteria,
cache bookkeeping, full-vocab multinomial) costs more than the tiny models' forward on a CPU.
For Llama / Qwen2 / Mistral models (``rlhf_fast.models.decode.supports_fast_decode``) the forward
passes go through ``LeanDecoder`` (static KV cache, no per-step mask building or cache bookkeeping);
any other model is called directly with ``logits_to_keep=1``. Either way the LM head runs on the
last position only, also during prefill. The loop samples by inverse CDF with one uniform per row, stops
early once every row has emitted a stop token, and runs under ``torch.inference_mode``.

Randomness is counter-based: row b at decode step t draws ``uniform(seed_b, t)`` from a
splitmix64 hash, where seed_b comes from the *global* prompt index. A prompt therefore gets the
same sample whatever the batch it sits in, the number of ranks, or the other rows.
"""
from __future__ import annotations

from typing import NamedTuple

import torch

from rlhf_fast.models.decode import LeanDecoder, compiled_decode_step, fast_decode_unsupported_reason
from rlhf_fast.models.loading import position_ids_from_mask

_MASK64 = (1 << 64) - 1


def _to_signed64(x: int) -> int:
    x &= _MASK64
    return x - (1 << 64) if x >= (1 << 63) else x


# splitmix64 constants as signed int64 (torch has no uint64 arithmetic).
_GOLDEN = _to_signed64(0x9E3779B97F4A7C15)
_MIX1 = _to_signed64(0xBF58476D1CE4E5B9)
_MIX2 = _to_signed64(0x94D049BB133111EB)


def _lshr(x: torch.Tensor, n: int) -> torch.Tensor:
    """Logical right shift of int64 (torch's >> is arithmetic)."""
    return (x >> n) & ((1 << (64 - n)) - 1)


def _splitmix_uniform(seeds: torch.Tensor, step_t: torch.Tensor) -> torch.Tensor:
    """uniform(seed, step) for int64 seeds and step + 1 values that broadcast together."""
    z = seeds.to(torch.int64) * _GOLDEN + step_t * _MIX2  # int64 tensors wrap like uint64
    z = z + _GOLDEN
    z = (z ^ _lshr(z, 30)) * _MIX1
    z = (z ^ _lshr(z, 27)) * _MIX2
    z = z ^ _lshr(z, 31)
    return _lshr(z, 11).to(torch.float64) * (1.0 / (1 << 53))


def counter_uniform(seeds: torch.Tensor, step: int) -> torch.Tensor:
    """One uniform in [0, 1) per row from (seed, step): splitmix64, top 53 bits. seeds: int64 [B] -> float64 [B]."""
    return _splitmix_uniform(seeds, torch.full_like(seeds, step + 1, dtype=torch.int64))


def counter_uniforms(seeds: torch.Tensor, n_steps: int) -> torch.Tensor:
    """``counter_uniform(seeds, t)`` for t = 0 .. n_steps - 1 as the columns of one float64 [B, n_steps]
    (the same bits: one hash over the grid instead of a dozen small ops per decode step)."""
    steps = torch.arange(1, n_steps + 1, dtype=torch.int64, device=seeds.device)
    return _splitmix_uniform(seeds.unsqueeze(1), steps.unsqueeze(0))


def filter_logits(logits: torch.Tensor, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """HF's TopK then TopP logits warpers (transformers' order and tie rules): top_k > 0 keeps the k largest
    logits of each row (ties with the k-th kept), top_p < 1 keeps the smallest set of most probable tokens whose
    probability reaches top_p (at least one); the rest become -inf. logits [B, V] float; returned unchanged
    when both are off (top_k 0 or >= V, top_p 1)."""
    V = logits.shape[-1]
    if top_k and 0 < top_k < V:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=False)
        cum = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        remove = cum <= 1 - top_p
        remove[..., -1:] = False  # keep at least the most probable token
        logits = logits.masked_fill(remove.scatter(-1, order, remove), float("-inf"))
    return logits


def sample_from_logits(logits: torch.Tensor, temperature: float, uniforms: torch.Tensor | None,
                       top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """Sample one token per row by inverse CDF. logits: [B, V] (any float dtype); uniforms: [B] in [0, 1).

    temperature == 0 (or uniforms None) is greedy argmax. top_k / top_p filter the temperature-scaled logits
    first (``filter_logits``: HF generate's warpers, in its order). Costs one softmax, one cumsum and one
    binary search per row: no [B, V] random tensor (torch.multinomial's cost on CPU); a filtered-out token
    has probability 0, so its CDF step is empty and the search never lands on it.
    Returns int64 [B].
    """
    if temperature == 0 or uniforms is None:
        return logits.argmax(-1)
    scaled = logits.float() / temperature
    if top_k or top_p < 1.0:
        scaled = filter_logits(scaled, top_k, top_p)
    probs = torch.softmax(scaled, dim=-1)
    cdf = probs.cumsum_(-1)
    # Scale by the row total so rounding in the cumsum can never push u past the end.
    target = (uniforms.to(cdf.device, torch.float64) * cdf[:, -1].double()).float().unsqueeze(-1)
    idx = torch.searchsorted(cdf, target, right=True).squeeze(-1)
    return idx.clamp_(max=logits.shape[-1] - 1)


class Rollout(NamedTuple):
    """Result of ``generate``.

    query_responses: int64 [B, P + R] prompt (left-padded) followed by the response.
    responses: int64 [B, R] sampled tokens, ``pad_token_id`` after the first stop token.
    response_mask: bool [B, R] valid response tokens (up to and including the stop token).
    contains_stop: bool [B] whether the row emitted a stop token.
    context_length: P.
    """

    query_responses: torch.Tensor
    responses: torch.Tensor
    response_mask: torch.Tensor
    contains_stop: torch.Tensor
    context_length: int


def _forward_last(model, input_ids, attention_mask, position_ids, past):
    try:
        out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                    past_key_values=past, use_cache=True, logits_to_keep=1)
    except TypeError:  # older or custom models without logits_to_keep
        out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                    past_key_values=past, use_cache=True)
    return out.logits[:, -1, :], out.past_key_values


def generate(
    model,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    max_new_tokens: int,
    *,
    pad_token_id: int,
    temperature: float = 1.0,
    stop_token_ids: list[int] | tuple[int, ...] = (),
    seeds: torch.Tensor | None = None,
    trim: bool = True,
    inference_mode: bool = True,
    fast_decode: bool | None = None,
    decode_compile: str | None = None,
    top_k: int = 0,
    top_p: float = 1.0,
) -> Rollout:
    """Sample responses for left-padded prompts with the model's KV cache.

    model: a transformers causal LM (or PeftModel). input_ids, attention_mask: [B, P], left-padded.
    seeds: int64 [B], one per prompt (use the global prompt index mixed with the run seed);
    None samples greedily. stop_token_ids: a row stops after emitting any of them; later tokens
    become ``pad_token_id`` and are masked. trim: drop trailing columns no row needs (the loop
    exits early once every row has stopped, so R may be < max_new_tokens). inference_mode: run under
    ``torch.inference_mode`` (False: ``torch.no_grad``, needed when FSDP2 gathers parameters during
    the decode, since inference tensors cannot be updated later). fast_decode: None uses the lean
    decoder when ``supports_fast_decode(model, P + max_new_tokens)``, else the model's own forward;
    False forces the model's forward; True requires the lean decoder (ValueError naming the reason
    when the model is not supported). Both paths consume the same uniforms, so they sample the same
    tokens wherever their logits agree. top_k / top_p: HF's warpers (``filter_logits``); 0 / 1.0 are off.
    decode_compile: None steps the lean decoder eagerly; a ``compiled_decode_step`` mode ("reduce-overhead":
    CUDA graphs) runs its per-token step compiled over a static cache (the same logits up to float rounding;
    models the lean decoder cannot run, or whose rope frequencies depend on the position, step eagerly).
    """
    with torch.inference_mode() if inference_mode else torch.no_grad():
        return _generate(model, input_ids, attention_mask, max_new_tokens, pad_token_id, temperature,
                         stop_token_ids, seeds, trim, fast_decode, top_k, top_p, decode_compile)


def _use_fast_decode(model, fast_decode: bool | None, total_length: int) -> bool:
    if fast_decode is False:
        return False
    reason = fast_decode_unsupported_reason(model, total_length)
    if fast_decode and reason is not None:
        raise ValueError(f"fast_decode=True but the lean decoder cannot run this model: {reason}")
    return reason is None


def _generate(model, input_ids, attention_mask, max_new_tokens, pad_token_id, temperature, stop_token_ids,
              seeds, trim, fast_decode=None, top_k=0, top_p=1.0, decode_compile=None) -> Rollout:
    if max_new_tokens <= 0:
        raise ValueError(f"max_new_tokens (response_length) must be > 0, got {max_new_tokens}")
    if input_ids.shape != attention_mask.shape or input_ids.dim() != 2:
        raise ValueError(
            f"input_ids and attention_mask must both be [B, P], got {tuple(input_ids.shape)} and "
            f"{tuple(attention_mask.shape)}"
        )
    device = input_ids.device
    B, P = input_ids.shape
    stop = torch.tensor(sorted(set(int(s) for s in stop_token_ids)), dtype=torch.long, device=device)
    attention_mask = attention_mask.to(torch.long)
    positions = position_ids_from_mask(attention_mask)
    # Pad positions may hold any id; give them a valid one so embeddings never index out of range.
    ids = torch.where(attention_mask.bool(), input_ids, torch.zeros_like(input_ids))
    responses = torch.full((B, max_new_tokens), pad_token_id, dtype=torch.long, device=device)
    done = torch.zeros(B, dtype=torch.bool, device=device)
    stopped_at = torch.full((B,), max_new_tokens, dtype=torch.long, device=device)

    decoder = static_step = None
    if decode_compile is not None:
        static_step = compiled_decode_step(decode_compile)  # refuses an unknown mode before any work
    if _use_fast_decode(model, fast_decode, P + max_new_tokens):
        decoder = LeanDecoder(model, max_new_tokens, validate=False, static_cache=static_step is not None)
        logits = decoder.prefill(ids, attention_mask)
        if decoder.rope_table is None:
            static_step = None  # position-dependent rope frequencies: no static table to index
        column = torch.tensor(P, device=device)  # the cache column step_static writes next
    else:
        logits, past = _forward_last(model, ids, attention_mask, positions, None)
    next_pos = positions[:, -1:] + 1
    uniforms = counter_uniforms(seeds, max_new_tokens) if seeds is not None and temperature != 0 else None
    steps = 0
    for t in range(max_new_tokens):
        u = uniforms[:, t] if uniforms is not None else None
        tok = sample_from_logits(logits, temperature, u, top_k, top_p)
        tok = torch.where(done, torch.full_like(tok, pad_token_id), tok)
        responses[:, t] = tok
        steps = t + 1
        if stop.numel():
            hit = torch.isin(tok, stop) & ~done
            stopped_at = torch.where(hit, torch.full_like(stopped_at, t), stopped_at)
            done |= hit
            if bool(done.all()):
                break
        if t + 1 == max_new_tokens:
            break
        if static_step is not None:
            if decode_compile == "reduce-overhead":
                torch.compiler.cudagraph_mark_step_begin()  # the previous step's logits are consumed
            logits = static_step(decoder, tok, column)
            column += 1
            continue
        if decoder is not None:
            logits = decoder.step(tok)
            continue
        attention_mask = torch.cat([attention_mask, torch.ones(B, 1, dtype=torch.long, device=device)], dim=1)
        logits, past = _forward_last(model, tok.unsqueeze(1), attention_mask, next_pos, past)
        next_pos = next_pos + 1

    if trim:
        responses = responses[:, :steps]
    R = responses.shape[1]
    idx = torch.arange(R, device=device).unsqueeze(0)
    response_mask = idx <= stopped_at.unsqueeze(1)  # includes the stop token itself
    responses = responses.masked_fill(~response_mask, pad_token_id)
    query_responses = torch.cat([input_ids, responses], dim=1)
    return Rollout(query_responses, responses, response_mask, done, P)


def prompt_seeds(run_seed: int, global_indices: torch.Tensor, round_index: int = 0) -> torch.Tensor:
    """Per-prompt sampling seeds from the run seed, the prompt's global index in the dataset and
    the round (epoch/step) it is sampled in, so no two rounds reuse randomness. int64 [B]."""
    g = global_indices.to(torch.int64)
    return g * 1_000_003 + int(round_index) * 7_919 + int(run_seed) * 104_729
