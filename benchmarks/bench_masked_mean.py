"""masked_mean: our fused backend against the eager torch reference; time and memory per side.

    python -m benchmarks.bench_masked_mean [--full] [--device cuda]
"""
from __future__ import annotations

import argparse

from benchmarks.common import append_rows, make_row, print_table, ratio
from rlhf_fast.measure import mark_baseline, run_isolated, time_fn


def side(provider: str, B: int, T: int, device: str = "cpu", dtype: str = "float32") -> dict:
    import torch

    from rlhf_fast.ops import masked_mean, masked_mean_reference

    g = torch.Generator().manual_seed(0)
    x = torch.randn(B, T, generator=g).to(device=device, dtype=getattr(torch, dtype))
    m = (torch.rand(B, T, generator=g) < 0.7).to(device)
    mark_baseline(device)  # memory beyond the inputs
    fn = (lambda: masked_mean(x, m, dim=1)) if provider == "rlhf_fast" else (lambda: masked_mean_reference(x, m, 1))
    return time_fn(fn, warmup=3, repeats=20, device=device)


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--full", action="store_true", help="GPU-sized shapes")
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args(argv)
    shapes = [(512, 4096), (64, 65536)] if not args.full else [(4096, 8192), (512, 262144)]
    rows = []
    for B, T in shapes:
        res = {p: run_isolated("benchmarks.bench_masked_mean:side", provider=p, B=B, T=T, device=args.device)
               for p in ("torch", "rlhf_fast")}
        nbytes = B * T * 5  # fp32 x + bool mask, read once
        for p, r in res.items():
            gbs = nbytes / (r["time_ms"] * 1e-3) / 1e9 if "time_ms" in r else None
            rows.append(make_row("masked_mean", "masked_mean", f"{B}x{T}", "float32", p, r, args.device, gbs, "GB/s"))
        print(f"[{B}x{T}] time ours/torch = {ratio(res['rlhf_fast'].get('time_ms'), res['torch'].get('time_ms'))}, "
              f"memory ours/torch = {ratio(res['rlhf_fast'].get('mem_bytes'), res['torch'].get('mem_bytes'))}")
    print_table(rows)
    append_rows(rows)
    return rows


if __name__ == "__main__":
    main()
