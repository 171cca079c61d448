"""RL element-wise ops and scans (issue 4A): GAE, whitening, KL penalty, token rewards.

    python -m benchmarks.bench_rl_ops [--full] [--device cuda]

- GAE, ours (one fused reverse scan: C++ on CPU, Triton on CUDA) against the Python loop over T
  that TRL / OpenRLHF / veRL write (our gae_reference), at B in {64, 256, 512}, T in {256, 1024,
  4096}, fp32. Target on CPU: >= 50x faster at B=256, T=1024.
- GAE achieved bandwidth against a preallocated ``copy_`` moving the same bytes, at B=512, T=4096:
  the scan reads rewards, values (fp32) and the mask (1 B) and writes advantages and returns
  (fp32): 17 B per token. The copy reads and writes 8.5 B per token. Target: >= 25% of the copy,
  measured like for like with ``gae(..., out=preallocated)``; the row with fresh outputs is shown
  too (on CPU their first-touch page faults cost more than the scan).
- masked_whiten, kl_penalty (k3, forward and forward+backward) and token_rewards against the same
  formulas in eager torch (the references).
Each side runs in its own process (time + peak memory above its inputs); table, CSV rows. The GAE
bandwidth pair is the exception: the scan and the copy_ are timed in one process, alternating in
rounds, so a noisy neighbour slows both alike; the ratio is the median over rounds (spread shown).

Threads: both sides get the same OpenMP / torch thread count, all cores by default (``--threads N``
to pin). On a shared, oversubscribed machine a 2-thread OpenMP region waits a whole scheduler
quantum (~4 ms) whenever one of its threads is descheduled, which swamps sub-millisecond kernels:
compare with ``--threads 1`` there. ``--gae-only`` skips whitening / KL / token rewards.
"""
from __future__ import annotations

import argparse

from benchmarks.common import append_rows, make_row, print_table, ratio
from rlhf_fast.measure import mark_baseline, run_isolated, time_fn

GAE_BYTES_PER_TOKEN = 4 + 4 + 1 + 4 + 4  # rewards, values, mask in; advantages, returns out
GAE_TARGET_SPEEDUP = 50.0
GAE_TARGET_COPY_FRACTION = 0.25


def _inputs(B: int, T: int, device: str, dtype: str, seed: int = 0):
    import torch

    g = torch.Generator().manual_seed(seed)
    dt = getattr(torch, dtype)
    x = torch.randn(B, T, generator=g).to(device=device, dtype=dt)
    y = torch.randn(B, T, generator=g).to(device=device, dtype=dt)
    # right-padded responses of random length, with a few holes (multi-turn tool output)
    lengths = torch.randint(T // 2, T + 1, (B,), generator=g)
    mask = torch.arange(T)[None, :] < lengths[:, None]
    mask &= torch.rand(B, T, generator=g) < 0.95
    return x, y, mask.to(device)


def side(op: str, provider: str, B: int, T: int, device: str = "cpu", dtype: str = "float32") -> dict:
    """One timed side: op in {gae, whiten, kl_fwd, kl_fwd_bwd, token_rewards}; provider
    'rlhf_fast' (public op, automatic backend) or 'torch' (eager reference)."""
    import torch

    from rlhf_fast.ops import (
        gae,
        gae_reference,
        kl_penalty,
        kl_penalty_reference,
        masked_whiten,
        masked_whiten_reference,
        token_rewards,
        token_rewards_reference,
    )

    x, y, mask = _inputs(B, T, device, dtype)
    repeats, warmup = 10, 2
    if op == "gae":
        fn = (lambda: gae(x, y, mask, 0.99, 0.95)) if provider == "rlhf_fast" else (
            lambda: gae_reference(x, y, mask, 0.99, 0.95))
        if provider == "torch":  # the Python loop is slow at long T: fewer repeats there
            repeats, warmup = (3, 1) if T >= 4096 else (5, 1)
    elif op == "whiten":
        fn = (lambda: masked_whiten(x, mask)) if provider == "rlhf_fast" else (lambda: masked_whiten_reference(x, mask))
    elif op == "kl_fwd":
        fn = (lambda: kl_penalty(x, y, "k3")) if provider == "rlhf_fast" else (lambda: kl_penalty_reference(x, y, "k3"))
    elif op == "kl_fwd_bwd":
        xg = x.clone().requires_grad_(True)
        up = torch.ones(B, T, device=device)
        impl = kl_penalty if provider == "rlhf_fast" else kl_penalty_reference

        def fn():
            xg.grad = None
            impl(xg, y, "k3").backward(up)
    elif op == "token_rewards":
        scores = torch.randn(B, device=device)
        fn = (lambda: token_rewards(scores, x, mask, 0.05)) if provider == "rlhf_fast" else (
            lambda: token_rewards_reference(scores, x, mask, 0.05))
    else:
        raise ValueError(f"unknown op {op!r}")
    mark_baseline(device)  # memory beyond the inputs
    return time_fn(fn, warmup=warmup, repeats=repeats, device=device)


def side_gae_vs_copy(B: int, T: int, device: str = "cpu", rounds: int = 7, repeats: int = 10,
                     stream_min_bytes: int | None = None) -> dict:
    """GAE with preallocated outputs and a preallocated ``copy_`` of the same bytes, timed in the same
    process in alternating rounds. Returns per-round medians (ms) and copy/gae fractions, plus
    ``time_ms`` / ``copy_time_ms``: the medians over rounds. stream_min_bytes: sets
    RLHF_FAST_GAE_STREAM_MIN_BYTES (the C++ scan's streaming-store threshold) for this process."""
    import os
    import statistics

    if stream_min_bytes is not None:  # read by the C++ scan on its first call
        os.environ["RLHF_FAST_GAE_STREAM_MIN_BYTES"] = str(stream_min_bytes)

    import torch

    from rlhf_fast.ops import gae

    x, y, mask = _inputs(B, T, device, "float32")
    # zeros, not empty: touched now, so no first-touch page faults inside the timed calls
    bufs = (torch.zeros(B, T, device=device), torch.zeros(B, T, device=device))
    # Same bytes moved as the GAE scan: read and write GAE_BYTES_PER_TOKEN / 2 per token.
    nbytes = B * T * GAE_BYTES_PER_TOKEN // 2
    src = torch.randint(0, 255, (nbytes,), dtype=torch.uint8, device=device)
    dst = torch.zeros_like(src)
    run_gae = lambda: gae(x, y, mask, 0.99, 0.95, out=bufs)  # noqa: E731
    run_copy = lambda: dst.copy_(src)  # noqa: E731
    gae_ms, copy_ms = [], []
    for _ in range(rounds):
        copy_ms.append(time_fn(run_copy, warmup=2, repeats=repeats, device=device)["time_ms"])
        gae_ms.append(time_fn(run_gae, warmup=2, repeats=repeats, device=device)["time_ms"])
    fractions = [c / g for c, g in zip(copy_ms, gae_ms)]
    return {"time_ms": statistics.median(gae_ms), "copy_time_ms": statistics.median(copy_ms),
            "gae_round_ms": gae_ms, "copy_round_ms": copy_ms, "fractions": fractions,
            "fraction": statistics.median(fractions)}


def _gbs(nbytes: float, res: dict):
    return nbytes / (res["time_ms"] * 1e-3) / 1e9 if "time_ms" in res else None


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--full", action="store_true", help="GPU-sized shapes (B up to 1024, T up to 8192)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=0, help="CPU threads per side (0: all cores)")
    ap.add_argument("--gae-only", action="store_true", help="only the GAE rows and the bandwidth target")
    args = ap.parse_args(argv)
    dev = args.device
    threads = args.threads or None

    def run(mmap_threshold=True, **kw):
        return run_isolated("benchmarks.bench_rl_ops:side", threads=threads, device=dev,
                            mmap_threshold=mmap_threshold, **kw)
    rows, summary = [], []

    # ---- GAE: fused scan vs the Python loop over T
    Bs, Ts = ((64, 256, 512), (256, 1024, 4096)) if not args.full else ((256, 512, 1024), (1024, 4096, 8192))
    gae_res = {}
    for B in Bs:
        for T in Ts:
            res = {}
            for p in ("torch", "rlhf_fast"):
                # time with the default allocator (as users run it), memory with the mmap threshold
                timed = run(op="gae", provider=p, B=B, T=T, mmap_threshold=False)
                res[p] = {**timed, "mem_bytes": run(op="gae", provider=p, B=B, T=T).get("mem_bytes")}
            gae_res[(B, T)] = res
            for p, r in res.items():
                rows.append(make_row("rl_ops", "gae", f"{B}x{T}", "float32", p, r, dev,
                                     _gbs(B * T * GAE_BYTES_PER_TOKEN, r), "GB/s",
                                     note=("Python loop over T" if p == "torch" else "fused scan")
                                     + f", threads={args.threads}"))
            speedup = ratio(res["torch"].get("time_ms"), res["rlhf_fast"].get("time_ms"))
            summary.append(f"gae {B}x{T}: ours {res['rlhf_fast'].get('time_ms', float('nan')):.3f} ms, "
                           f"Python loop {res['torch'].get('time_ms', float('nan')):.1f} ms -> {speedup}x faster")

    # ---- GAE bandwidth against a copy_ of the same bytes
    bw_B, bw_T = (512, 4096) if not args.full else (1024, 8192)
    pair = run_isolated("benchmarks.bench_rl_ops:side_gae_vs_copy", threads=threads, mmap_threshold=False,
                        device=dev, B=bw_B, T=bw_T)
    ours = {k: pair[k] for k in ("time_ms", "error") if k in pair}
    copy = {"time_ms": pair["copy_time_ms"]} if "copy_time_ms" in pair else {"error": pair.get("error", "?")}
    fresh = gae_res.get((bw_B, bw_T), {}).get("rlhf_fast") or run(op="gae", provider="rlhf_fast", B=bw_B, T=bw_T)
    nbytes = bw_B * bw_T * GAE_BYTES_PER_TOKEN
    rows.append(make_row("rl_ops", "gae_out_preallocated", f"{bw_B}x{bw_T}", "float32", "rlhf_fast", ours, dev,
                         _gbs(nbytes, ours), "GB/s",
                         note=f"fused scan, out=, same process as copy_, threads={args.threads}"))
    rows.append(make_row("rl_ops", "copy_same_bytes_as_gae", f"{bw_B}x{bw_T}", "uint8", "torch", copy, dev,
                         _gbs(nbytes, copy), "GB/s", note=f"{nbytes / 2**20:.1f} MiB read+write"))
    copy_fraction = float(pair.get("fraction", float("nan")))
    fractions = pair.get("fractions", [])
    fresh_fraction = float(ratio(copy.get("time_ms"), fresh.get("time_ms")))
    # The C++ scan switches to streaming stores when the working set exceeds the last-level cache;
    # the same pair with plain stores shows what that choice is worth on this machine.
    plain = run_isolated("benchmarks.bench_rl_ops:side_gae_vs_copy", threads=threads, mmap_threshold=False,
                         device=dev, B=bw_B, T=bw_T, stream_min_bytes=2**62) if dev == "cpu" else {}

    # ---- whitening, KL, token rewards vs eager torch
    ew_shapes = [] if args.gae_only else [(512, 4096)] if not args.full else [(1024, 8192), (256, 1024)]
    ew_res = {}
    for op in ("whiten", "kl_fwd", "kl_fwd_bwd", "token_rewards"):
        for B, T in ew_shapes:
            res = {p: run(op=op, provider=p, B=B, T=T) for p in ("torch", "rlhf_fast")}
            ew_res[(op, B, T)] = res
            for p, r in res.items():
                rows.append(make_row("rl_ops", op, f"{B}x{T}", "float32", p, r, dev, note=f"threads={args.threads}"))
            summary.append(f"{op} {B}x{T}: time torch/ours = "
                           f"{ratio(res['torch'].get('time_ms'), res['rlhf_fast'].get('time_ms'))}x, "
                           f"memory ours/torch = {ratio(res['rlhf_fast'].get('mem_bytes'), res['torch'].get('mem_bytes'))}")

    print_table(rows)
    print()
    for line in summary:
        print(line)
    key = (256, 1024)
    if key in gae_res and "time_ms" in gae_res[key]["rlhf_fast"] and "time_ms" in gae_res[key]["torch"]:
        s = gae_res[key]["torch"]["time_ms"] / gae_res[key]["rlhf_fast"]["time_ms"]
        print(f"TARGET gae 256x1024 >= {GAE_TARGET_SPEEDUP:.0f}x the Python loop: {s:.1f}x -> "
              f"{'met' if s >= GAE_TARGET_SPEEDUP else 'NOT met'}")
    print(f"TARGET gae {bw_B}x{bw_T} bandwidth >= {GAE_TARGET_COPY_FRACTION:.0%} of copy_ of the same bytes: "
          f"{copy_fraction:.0%} with out= (gae {_gbs(nbytes, ours) or float('nan'):.2f} GB/s, copy_ "
          f"{_gbs(nbytes, copy) or float('nan'):.2f} GB/s) -> "
          f"{'met' if copy_fraction >= GAE_TARGET_COPY_FRACTION else 'NOT met'}; "
          f"per round {min(fractions, default=float('nan')):.0%}..{max(fractions, default=float('nan')):.0%}; "
          f"with fresh outputs {fresh_fraction:.0%} ({_gbs(nbytes, fresh) or float('nan'):.2f} GB/s)")
    if "fraction" in plain:
        print(f"  (info) same pair with the scan's streaming stores off: {plain['fraction']:.0%} "
              f"(per round {min(plain['fractions']):.0%}..{max(plain['fractions']):.0%})")
    append_rows(rows)
    return rows


if __name__ == "__main__":
    main()
