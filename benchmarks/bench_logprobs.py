"""Fused LM-head log-probs, forward + backward (and forward-only reference passes): naive log_softmax vs per-row logsumexp vs Liger
(GPU) vs ours; time, memory beyond inputs and weights, achieved GFLOP/s.

    python -m benchmarks.bench_logprobs [--full] [--big] [--device cuda]

Every side: hidden [N, H] and weight [V, H] require grad, labels random with 10% ignore_index,
upstream gradient random; one timed call = forward + backward. Memory is the peak RSS (CPU) or
max_memory_allocated (GPU) above the point where inputs and weights were built, in a process of
its own. Wall time is the headline; CPU time of the process (all threads) is shown too, since other
jobs sharing the cores inflate wall time. Flops count the matmuls a side actually runs: naive / logsumexp / Liger 3 x 2NHV
(logits, grad_hidden, grad_weight), ours 4 x 2NHV (backward recomputes the logits chunk by chunk).
The big case (N=16384, V=152064, H=512: ~10 TB-scale flops on CPU, minutes) runs with --big or
--full; the materialising sides refuse it up front when their [N, V] copies exceed MemAvailable.
"""
from __future__ import annotations

import argparse
import statistics
import time

from benchmarks.common import append_rows, make_row, print_table, ratio
from rlhf_fast.measure import available_bytes, mark_baseline, run_isolated, time_fn

PROVIDERS = ("naive", "logsumexp", "liger", "rlhf_fast")
# fp32 [N, V] copies alive at the peak of forward + backward for the materialising sides:
# logits, log_softmax (or logsumexp temporaries), and the grad_logits of the backward.
NV_COPIES = {"naive": 3, "logsumexp": 3, "liger": 0, "rlhf_fast": 0}


def side(provider: str, N: int, H: int, V: int, device: str = "cpu", dtype: str = "float32",
         warmup: int = 1, repeats: int = 3, mode: str = "fwd+bwd") -> dict:
    """One provider, one shape. mode: "fwd+bwd" (policy pass) or "fwd" (reference pass, no grad)."""
    import torch

    tdtype = getattr(torch, dtype)
    need = (NV_COPIES[provider] if mode == "fwd+bwd" else 2) * N * V * 4 * bool(NV_COPIES[provider])
    if device == "cpu" and need:
        avail = available_bytes("cpu") or 0
        if need > avail:
            return {"error": f"refused: would need {need / 1e9:.1f} GB ({need // (N * V * 4)} fp32 [N, V] copies) "
                             f"> available {avail / 1e9:.1f} GB"}
    fn_loss = _provider_fn(provider, device)
    if isinstance(fn_loss, str):
        return {"error": fn_loss}
    g = torch.Generator().manual_seed(0)
    train = mode == "fwd+bwd"
    h = torch.randn(N, H, generator=g).to(device=device, dtype=tdtype).requires_grad_(train)
    w = (torch.randn(V, H, generator=g) / H**0.5).to(device=device, dtype=tdtype).requires_grad_(train)
    y = torch.randint(0, V, (N,), generator=g)
    y[torch.rand(N, generator=g) < 0.1] = -100
    y = y.to(device)
    up = torch.randn(N, generator=g).to(device)

    cpu_times = []

    def step():
        h.grad = None
        w.grad = None
        t0 = time.process_time()
        if train:
            fn_loss(h, w, y, up).backward()
        else:
            with torch.no_grad():
                fn_loss(h, w, y, up)
        cpu_times.append((time.process_time() - t0) * 1e3)

    if warmup + repeats > 1:  # one call outside the baseline: lazy init (MKL, kernels) is not the op's memory
        step()  # (skipped for single-shot big cases, where it would double a minutes-long run)
        h.grad = None
        w.grad = None
        cpu_times.clear()
    mark_baseline(device)  # memory beyond inputs and weights
    out = time_fn(step, warmup=warmup, repeats=repeats, device=device)
    # CPU seconds of this process (all threads): robust to other jobs sharing the cores, unlike wall time
    out["cpu_ms"] = statistics.median(cpu_times[warmup:] or cpu_times)
    return out


def _provider_fn(provider: str, device: str):
    import torch

    def valid_gather(logsm_or_logits, y):
        safe = torch.where(y == -100, 0, y)
        return logsm_or_logits.gather(-1, safe[:, None]).squeeze(-1), y != -100

    if provider == "naive":
        def loss(h, w, y, up):
            logp, ok = valid_gather(torch.log_softmax((h @ w.t()).float(), dim=-1), y)
            return (torch.where(ok, logp, 0.0) * up).sum()
        return loss
    if provider == "logsumexp":  # TRL's selective_log_softmax for fp32: gather - logsumexp per row
        def loss(h, w, y, up):
            logits = (h @ w.t()).float()
            zy, ok = valid_gather(logits, y)
            return (torch.where(ok, zy - torch.logsumexp(logits, dim=-1), 0.0) * up).sum()
        return loss
    if provider == "liger":
        if not device.startswith("cuda"):
            return "skipped: Liger's fused linear cross entropy is GPU-only (Triton on CUDA)"
        try:
            from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy
        except ImportError:
            return "skipped: liger-kernel not installed"

        def loss(h, w, y, up):
            # Liger computes its gradient inside the forward for a scalar loss, so per-token upstream
            # gradients cannot be applied: this side runs the summed loss (same matmul work).
            return liger_fused_linear_cross_entropy(h, w, y, reduction="sum", ignore_index=-100)
        return loss
    if provider == "rlhf_fast":
        from rlhf_fast.ops import fused_linear_logprobs

        def loss(h, w, y, up):
            return (fused_linear_logprobs(h, w, y).logprobs * up).sum()
        return loss
    raise ValueError(provider)


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--full", action="store_true", help="GPU-sized shapes, and the big case")
    ap.add_argument("--big", action="store_true", help="also run N=16384, V=152064, H=512 (minutes on CPU)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32")
    args = ap.parse_args(argv)
    # N, H, V, warmup, repeats (side() already ran one untimed step), mode
    shapes = [(4096, 512, 32000, 0, 3, "fwd+bwd"), (4096, 512, 32000, 0, 3, "fwd")]
    if args.full:
        shapes = [(4096, 4096, 32000, 2, 10, "fwd+bwd"), (8192, 4096, 128256, 1, 5, "fwd+bwd"),
                  (4096, 4096, 152064, 1, 5, "fwd+bwd"), (8192, 4096, 152064, 1, 5, "fwd")]
    if args.big or args.full:
        shapes.append((16384, 512, 152064, 0, 1, "fwd+bwd"))
    rows = []
    for N, H, V, warmup, repeats, mode in shapes:
        res = {p: run_isolated("benchmarks.bench_logprobs:side", provider=p, N=N, H=H, V=V, device=args.device,
                               dtype=args.dtype, warmup=warmup, repeats=repeats, mode=mode) for p in PROVIDERS}
        for p, r in res.items():
            flops = ((4 if p == "rlhf_fast" else 3) if mode == "fwd+bwd" else 1) * 2 * N * H * V
            gflops = flops / (r["time_ms"] * 1e-3) / 1e9 if "time_ms" in r else None
            note = f"cpu {r['cpu_ms'] / 1e3:.2f} s" if "cpu_ms" in r else ""
            rows.append(make_row("logprobs", f"fused_linear_logprobs {mode}", f"N={N} H={H} V={V}", args.dtype, p, r,
                                 args.device, gflops, "GFLOP/s", note=note))
            print(f"[{mode} N={N} H={H} V={V}] {p}: {r}")
        ours, naive = res["rlhf_fast"], res["naive"]
        print(f"[{mode} N={N} H={H} V={V}] time ours/naive = {ratio(ours.get('time_ms'), naive.get('time_ms'))} "
              f"(target <= 1.15), memory ours/naive = {ratio(ours.get('mem_bytes'), naive.get('mem_bytes'))} "
              f"(target <= 0.125), cpu-time ours/naive = {ratio(ours.get('cpu_ms'), naive.get('cpu_ms'))}, "
              f"time ours/logsumexp = {ratio(ours.get('time_ms'), res['logsumexp'].get('time_ms'))}")
    print_table(rows)
    append_rows(rows)
    return rows


if __name__ == "__main__":
    main()
