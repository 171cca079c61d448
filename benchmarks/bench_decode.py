"""Decode time per token at the 0.5B width against its floor (issue 16, part 5: generation near its limit).

    python -m benchmarks.bench_decode [--full | --smoke] [--batch 1 8] [--tokens N] [--device cpu]

Model: docs/design.md's 0.5B-width Qwen2 (hidden 896, intermediate 4864, 12 layers, 14 heads, 2 KV heads,
vocab 32000, untied embeddings), random init, fp32; left-padded prompts of 12 tokens, sampling at
temperature 0.7 with no stop token, so every row decodes N tokens.

Floor: a decode step reads every weight once, except the input embedding (B rows of it), plus the KV
cache so far: floor = (parameter bytes - embedding bytes + KV-cache bytes at the mean context) / the
machine's copy bandwidth, measured by a large torch ``copy_`` (512 MiB fp32 into another buffer; bandwidth =
bytes read + bytes written per second, STREAM's convention).
Sides, each in its own process:
  copy          the bandwidth measurement
  rlhf_fast     rlhf_fast.trainer.rollout.generate (what our PPOTrainer samples with; the lean decoder)
  hf_generate   transformers' generate (what TRL 1.12's PPOTrainer samples with), do_sample, top_k 0
Per token = (time of an N-token generate - median time of a 1-token generate) / (N - 1): one decode step
for the whole batch (prefill excluded); median and 20/80 percentiles over the repeats. Reported: per-token
time, floor, their ratio (1.0 = at the copy-bandwidth limit) and the effective weight-read bandwidth.
Quick: batches 1 and 8, 32 tokens, 3 repeats (about 2 minutes on an idle 2-core CPU, estimated); --full: 64
tokens, 7 repeats (about 5 minutes); --smoke: a tiny model (nothing appended to the CSV).
"""
from __future__ import annotations

import argparse
import statistics
import time

from benchmarks.common import SHAPE_LABELS, append_rows, make_row, print_table, qwen2_config
from rlhf_fast.measure import mark_baseline, run_isolated, time_fn

try:  # imported before the memory baseline, so every side carries the same libraries
    import torch
    import transformers  # noqa: F401

    import rlhf_fast.trainer.rollout  # noqa: F401
except ImportError:  # pragma: no cover
    pass

PROMPT, TEMPERATURE, VOCAB = 12, 0.7, 32000
PROVIDERS = ("rlhf_fast", "hf_generate")


def copy_side(mib: int = 512, repeats: int = 10, device: str = "cpu") -> dict:
    """Copy bandwidth of this machine: bytes read + written per second by ``dst.copy_(src)``."""
    n = mib * 2**20 // 4
    src, dst = torch.ones(n, device=device), torch.zeros(n, device=device)
    r = time_fn(lambda: dst.copy_(src), warmup=2, repeats=repeats, device=device)
    return {**r, "bandwidth": 2 * src.numel() * src.element_size() / (r["time_ms"] * 1e-3)}


def floor_bytes(model, batch: int, context: float) -> int:
    """Bytes one decode step must read: every parameter except the input embedding, and the KV cache."""
    cfg = model.config
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    weights -= model.get_input_embeddings().weight.numel() * model.get_input_embeddings().weight.element_size()
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    kv = cfg.num_hidden_layers * 2 * batch * cfg.num_key_value_heads * head_dim * context * 4
    return int(weights + kv)


def side(provider: str, shape: str, batch: int, tokens: int, repeats: int, device: str = "cpu") -> dict:
    """Per-token decode time of one provider (see the module docstring)."""
    from transformers import Qwen2ForCausalLM

    from rlhf_fast.trainer.rollout import generate

    torch.manual_seed(0)
    model = Qwen2ForCausalLM(qwen2_config(shape, VOCAB if shape != "smoke" else 512)).to(device).eval()
    ids = torch.randint(3, model.config.vocab_size, (batch, PROMPT), device=device)
    mask = torch.ones_like(ids)
    mask[1::2, : PROMPT // 3] = 0  # every other row left-padded, as a PPO batch is
    ids = ids.masked_fill(mask == 0, 0)
    mark_baseline(device)

    def run(n: int):
        if provider == "rlhf_fast":
            return generate(model, ids, mask, n, pad_token_id=0, temperature=TEMPERATURE,
                            seeds=torch.arange(batch, device=device))
        if provider == "hf_generate":
            with torch.no_grad():
                return model.generate(input_ids=ids, attention_mask=mask, do_sample=True, temperature=TEMPERATURE,
                                      top_k=0, top_p=1.0, max_new_tokens=n, min_new_tokens=n, pad_token_id=0)
        raise ValueError(f"unknown provider {provider!r}")

    one = time_fn(lambda: run(1), warmup=1, repeats=repeats, device=device)["time_ms"]
    run(tokens)  # warm-up
    per_token = []
    for _ in range(repeats):
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        run(tokens)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        per_token.append(((time.perf_counter() - t0) * 1e3 - one) / (tokens - 1))
    q = statistics.quantiles(per_token, n=5) if len(per_token) >= 5 else [min(per_token), 0, 0, max(per_token)]
    return {"time_ms": statistics.median(per_token), "time_p20_ms": q[0], "time_p80_ms": q[3], "prefill_ms": one,
            "floor_bytes": floor_bytes(model, batch, PROMPT + tokens / 2)}


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = ap.add_mutually_exclusive_group()
    mode.add_argument("--full", action="store_true", help="64 tokens, 7 repeats")
    mode.add_argument("--smoke", action="store_true", help="tiny model: check that every side runs")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--batch", type=int, nargs="*", default=[1, 8])
    ap.add_argument("--tokens", type=int, default=None, help="tokens per generate (default 32, --full 64)")
    ap.add_argument("--providers", nargs="*", default=list(PROVIDERS))
    args = ap.parse_args(argv)
    shape = "smoke" if args.smoke else "0.5b"
    tokens = args.tokens or (8 if args.smoke else 64 if args.full else 32)
    repeats = 7 if args.full else 3
    bw = run_isolated("benchmarks.bench_decode:copy_side", mib=16 if args.smoke else 512, device=args.device)
    rows, summary = [], []
    if "error" in bw:
        raise SystemExit(f"bench_decode: the copy-bandwidth side failed: {bw['error']}")
    bandwidth = bw["bandwidth"]
    summary.append(f"copy bandwidth: {bandwidth / 1e9:.1f} GB/s (read + write)")
    for b in args.batch:
        label = f"{SHAPE_LABELS[shape]} B{b} P{PROMPT} N{tokens}"
        res = {p: run_isolated("benchmarks.bench_decode:side", provider=p, shape=shape, batch=b, tokens=tokens,
                               repeats=repeats, device=args.device, timeout=3600) for p in args.providers}
        floor_b = next((r["floor_bytes"] for r in res.values() if "floor_bytes" in r), None)
        floor_ms = floor_b / bandwidth * 1e3 if floor_b else None
        if floor_ms:
            rows.append(make_row("decode", "decode_step", label, "float32", "floor", {"time_ms": floor_ms}, args.device,
                                 bandwidth / 1e9, "GB/s", f"{floor_b / 2**20:.0f} MiB per step / copy bandwidth"))
        for p, r in res.items():
            x = r["time_ms"] / floor_ms if floor_ms and "time_ms" in r else None
            gbs = floor_b / (r["time_ms"] * 1e-3) / 1e9 if floor_b and "time_ms" in r else None
            note = f"{x:.2f}x the floor; prefill+1 token {r['prefill_ms']:.0f} ms" if x else ""
            rows.append(make_row("decode", "decode_step", label, "float32", p, r, args.device, gbs, "GB/s", note))
            if x:
                summary.append(f"[B={b}] {p}: {r['time_ms']:.1f} ms per token step "
                               f"[{r['time_p20_ms']:.1f}, {r['time_p80_ms']:.1f}], floor {floor_ms:.1f} ms: {x:.2f}x")
    print_table(rows, cols=("shape", "provider", "time_ms", "time_p20_ms", "time_p80_ms", "achieved", "note"))
    for line in summary:
        print(line)
    if not args.smoke:
        append_rows(rows)
    return rows


if __name__ == "__main__":
    main()
