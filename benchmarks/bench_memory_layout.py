"""Memory of one PPO micro-step: TRL's four-network layout against our shared-weight layout.

    python -m benchmarks.bench_memory_layout [--full] [--device cuda]

One step = reference forward (no grad) + two policy/value forward-backward-AdamW micro-steps (the
second runs with the AdamW state already allocated, which is the steady state of a run). Memory is the
peak above the post-import baseline, so weights, gradients, optimizer state and activations all count;
each side runs in its own process (rlhf_fast.measure.run_isolated). torch, transformers and the Qwen2
modeling module are imported at module level (part of the baseline), and each side first runs its own
step once on a toy model (hidden 16, vocab 64) before re-marking the baseline, so per-process one-time
costs (code pages of the kernels it calls, ~8 MiB of file-backed RSS for a first Qwen2 forward; thread
pools; allocator caches) are charged to neither layout, as GPU memory counters would not see them.

- "trl" (TRL 1.12 PPOTrainer layout, re-implemented here so the bench needs no trl install): policy
  AutoModelForCausalLM (fp32), critic = a separate AutoModelForSequenceClassification whose backbone runs
  with its `score` head on every position, an fp32 reference copy; full [B, T, V] logits sliced to the
  response, divided by the temperature, per-token log-probs as gather - logsumexp (TRL's
  selective_log_softmax), entropy from softmax(logits) as TRL logs it.
- "rlhf_fast": PolicyValueModel(critic="shared", reference="frozen", reference_dtype=bf16): one backbone,
  fp32 value head, log-probs and entropy from fused_linear_logprobs on the hidden states. The 0.6x
  target is on this row.
- "rlhf_fast_lora" (V=32000 only, for information): the same with reference="lora" (peft defaults r=8,
  all linear layers but the LM head): AdamW state only for the adapters, no reference copy.

Beside the measured peak we print the static bytes rlhf_fast.memory predicts (parameters + gradients +
AdamW state); the difference is activations, logits and allocator overhead.
"""
from __future__ import annotations

import argparse

# Imported at module level so they are part of the post-import baseline run_isolated records: the
# bench measures the layout, not the size of torch / transformers / the Qwen2 modeling module.
import torch
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, Qwen2Config
from transformers.models.qwen2 import modeling_qwen2  # noqa: F401  (transformers imports it lazily)

from benchmarks.common import append_rows, make_row, print_table, ratio
from rlhf_fast import memory
from rlhf_fast.measure import mark_baseline, run_isolated, time_fn
from rlhf_fast.models import PolicyValueModel, patch_backbone, position_ids_from_mask

TEMPERATURE = 0.7
VF_COEF = 0.1


def _warm_runtime(device: str, build_step) -> None:
    """Run this side's own step once on a toy model (hidden 16, vocab 64), free it, then restart the
    memory measurement. The first call of each kernel maps its code pages (file-backed RSS, ~8 MiB for a
    Qwen2 forward on CPU) and initialises thread pools and allocator caches once per process; none of
    that depends on the layout or the model size, and on GPU max_memory_allocated would not see it
    either. Each side warms exactly the code paths it will use, so neither is charged for them."""
    import gc

    step = build_step(tiny_config(64, hidden=16, intermediate=32), 2, 4, device)[0]
    step()
    del step
    gc.collect()
    mark_baseline(device)


def tiny_config(vocab: int, hidden: int = 128, intermediate: int = 256):
    """docs/design.md's toy comparison model: Qwen2, hidden 128, intermediate 256, 2 layers, 4/2 heads, untied."""
    return Qwen2Config(
        hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=vocab, tie_word_embeddings=False, max_position_embeddings=256, pad_token_id=0,
    )


def make_batch(B: int, R: int, vocab: int, device: str):
    """Left-padded prompts of 4-12 tokens (width 12) + responses of R tokens."""
    g = torch.Generator().manual_seed(0)
    P = 12
    prompt_lens = torch.randint(4, P + 1, (B,), generator=g)
    ids = torch.randint(1, vocab, (B, P + R), generator=g)
    mask = torch.ones(B, P + R, dtype=torch.long)
    for b in range(B):
        mask[b, : P - prompt_lens[b]] = 0
    ids = ids * mask
    adv = torch.randn(B, R, generator=g)
    returns = torch.randn(B, R, generator=g)
    return ids.to(device), mask.to(device), P, adv.to(device), returns.to(device)


def _ppo_losses(logp, old_logp, values, adv, returns, valid):
    """Clipped policy loss + clipped value loss (the same arithmetic on both sides)."""
    n = valid.sum().clamp_min(1)
    ratio_ = torch.exp((logp - old_logp).clamp(-20, 20))
    pg = torch.maximum(-adv * ratio_, -adv * ratio_.clamp(0.8, 1.2))
    pg_loss = (pg * valid).sum() / n
    v_clipped = values.detach() + (values - values.detach()).clamp(-0.2, 0.2)
    vf = 0.5 * torch.maximum((values - returns) ** 2, (v_clipped - returns) ** 2)
    vf_loss = (vf * valid).sum() / n
    return pg_loss, vf_loss


def _trl_selective_logprobs(logits, labels):
    """TRL 1.12 selective_log_softmax (fp32 branch): gather minus a row-by-row logsumexp."""
    picked = logits.gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    lse = torch.stack([torch.logsumexp(row, dim=-1) for row in logits])
    return picked - lse


def _build_trl(cfg, B: int, R: int, device: str, steps: int = 2):
    """TRL's four-network layout for ``cfg``: returns (step, predicted static bytes)."""
    import copy

    torch.manual_seed(0)
    vocab = cfg.vocab_size
    policy = AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa").to(device)
    ref = copy.deepcopy(policy).eval()
    for p in ref.parameters():
        p.requires_grad_(False)
    vcfg = copy.deepcopy(cfg)
    vcfg.num_labels = 1
    value_model = AutoModelForSequenceClassification.from_config(vcfg, attn_implementation="sdpa").to(device)
    critic_backbone = value_model.base_model
    opt = torch.optim.AdamW(list(policy.parameters()) + list(value_model.parameters()), lr=1e-5)
    ids, mask, P, adv, returns = make_batch(B, R, vocab, device)
    pos = position_ids_from_mask(mask)
    valid = mask[:, P:].float()
    responses = ids[:, P:]
    predicted = memory.layout_bytes({"policy": policy, "critic": value_model, "reference": ref})["total"]

    def step():
        with torch.no_grad():  # rollout-time reference log-probs
            ref_logits = ref(input_ids=ids, attention_mask=mask, position_ids=pos).logits[:, P - 1 : -1]
            ref_logits /= TEMPERATURE + 1e-7
            ref_logp = _trl_selective_logprobs(ref_logits, responses)
            del ref_logits
        for _ in range(steps):
            out = policy(input_ids=ids, attention_mask=mask, position_ids=pos, output_hidden_states=True)
            hidden = critic_backbone(input_ids=ids, attention_mask=mask, position_ids=pos).last_hidden_state
            values = value_model.score(hidden)[:, P - 1 : -1].squeeze(-1)
            logits = out.logits[:, P - 1 : -1]
            logits /= TEMPERATURE + 1e-7
            logp = _trl_selective_logprobs(logits, responses)
            with torch.no_grad():  # TRL logs the entropy every micro-step
                prob = torch.softmax(logits, dim=-1)
                entropy = torch.logsumexp(logits, dim=-1) - (prob * logits).sum(-1)
                del prob
            pg_loss, vf_loss = _ppo_losses(logp, logp.detach(), values, adv, returns, valid)
            (pg_loss + VF_COEF * vf_loss).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            del out, logits, logp, values, hidden, entropy
        return ref_logp

    return step, predicted.total


def side_trl(vocab: int, B: int, R: int, device: str = "cpu", steps: int = 2) -> dict:
    _warm_runtime(device, _build_trl)
    step, predicted = _build_trl(tiny_config(vocab), B, R, device, steps)
    stats = time_fn(step, warmup=1, repeats=1, device=device)
    return {**stats, "predicted_static_bytes": predicted}


def _build_ours(cfg, B: int, R: int, device: str, steps: int = 2, reference: str = "frozen",
                fused_backbone: bool = False):
    """Our shared-backbone layout for ``cfg``: returns (step, predicted static bytes, the PolicyValueModel).
    ``fused_backbone``: the policy runs the fused RMSNorm / SwiGLU / rotary ops (patch_backbone)."""
    torch.manual_seed(0)
    vocab = cfg.vocab_size
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa").to(device)
    if fused_backbone:
        patch_backbone(model)
    ref_kwargs = {"reference_dtype": torch.bfloat16} if reference == "frozen" else {}
    pv = PolicyValueModel(model, reference=reference, critic="shared", vf_coef=VF_COEF, temperature=TEMPERATURE,
                          **ref_kwargs)
    opt = torch.optim.AdamW(pv.trainable_parameters(), lr=1e-5)
    ids, mask, P, adv, returns = make_batch(B, R, vocab, device)
    valid = mask[:, P:].float()
    predicted = memory.layout_bytes(pv.components())["total"]

    def step():
        ref_logp = pv.reference_logprobs(ids, mask, response_start=P)
        for _ in range(steps):
            out = pv(ids, mask, response_start=P, return_entropy=True)
            pg_loss, vf_loss = _ppo_losses(out.logprobs, out.logprobs.detach(), out.values, adv, returns, valid)
            (pg_loss + vf_loss).backward()  # shared critic: vf_coef is applied inside the model
            opt.step()
            opt.zero_grad(set_to_none=True)
            del out
        return ref_logp

    return step, predicted.total, pv


def side_ours(vocab: int, B: int, R: int, device: str = "cpu", steps: int = 2, reference: str = "frozen") -> dict:
    def build(cfg, B_, R_, device_, steps_=steps):
        return _build_ours(cfg, B_, R_, device_, steps_, reference)

    _warm_runtime(device, build)
    step, predicted, _ = build(tiny_config(vocab), B, R, device)
    stats = time_fn(step, warmup=1, repeats=1, device=device)
    return {**stats, "predicted_static_bytes": predicted}


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--full", action="store_true", help="also the larger batch (B=32)")
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args(argv)
    cases = [(32000, 8, 64), (1000, 8, 64)] + ([(32000, 32, 64)] if args.full else [])
    rows, summary = [], []
    for vocab, B, R in cases:
        res = {
            "trl": run_isolated("benchmarks.bench_memory_layout:side_trl", vocab=vocab, B=B, R=R, device=args.device),
            "rlhf_fast": run_isolated("benchmarks.bench_memory_layout:side_ours", vocab=vocab, B=B, R=R, device=args.device),
        }
        if vocab == 32000 and B == 8:
            res["rlhf_fast_lora"] = run_isolated("benchmarks.bench_memory_layout:side_ours", vocab=vocab, B=B, R=R,
                                                 device=args.device, reference="lora")
        shape = f"V={vocab} B={B} P=4-12 R={R}"
        for provider, r in res.items():
            pred = r.get("predicted_static_bytes")
            note = r.get("error") or f"predicted params+grads+AdamW {pred / 2**20:.1f} MiB" if pred else r.get("error", "")
            rows.append(make_row("memory_layout", "ppo_micro_step", shape, "float32", provider, r, args.device,
                                 note=note))
        mem_ratio = ratio(res["rlhf_fast"].get("mem_bytes"), res["trl"].get("mem_bytes"))
        time_ratio = ratio(res["rlhf_fast"].get("time_ms"), res["trl"].get("time_ms"))
        summary.append((shape, res, mem_ratio, time_ratio))
    print_table(rows)
    print()
    mib = 2.0 ** 20
    for shape, res, mem_ratio, time_ratio in summary:
        t, o = res["trl"], res["rlhf_fast"]
        if "error" in t or "error" in o:
            print(f"[{shape}] error: trl={t.get('error')} ours={o.get('error')}")
            continue
        print(f"[{shape}] measured peak: trl {t['mem_bytes'] / mib:.1f} MiB, ours {o['mem_bytes'] / mib:.1f} MiB "
              f"-> ours/trl = {mem_ratio} (target <= 0.6); predicted static: trl "
              f"{t['predicted_static_bytes'] / mib:.1f} MiB, ours {o['predicted_static_bytes'] / mib:.1f} MiB; "
              f"time ours/trl = {time_ratio}")
        lora = res.get("rlhf_fast_lora")
        if lora and "mem_bytes" in lora:
            print(f"    (info) reference='lora': {lora['mem_bytes'] / mib:.1f} MiB -> "
                  f"{ratio(lora['mem_bytes'], t['mem_bytes'])} of trl; predicted static "
                  f"{lora['predicted_static_bytes'] / mib:.1f} MiB")
    append_rows(rows)
    return rows


if __name__ == "__main__":
    main()
