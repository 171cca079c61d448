"""PPO policy loss + value loss, forward + backward: our fused op against the eager torch reference;
and the GRPO family's GSPO and CISPO losses (ops/policy_losses.py) against their eager torch formulas.

    python -m benchmarks.bench_ppo_loss [--full] [--device cuda] [--family-only] [--small]

Per side: time of one training step's worth of both losses (forward + backward, token-mean;
timed in this process, see ``timings``), peak RSS above the inputs in its own process
(``run_isolated``; max_memory_allocated on GPU), and the allocation tracker's ``peak_live_bytes`` /
``total_bytes`` (tensors created beyond the inputs, allocator-independent). Minimum traffic per token: the policy loss reads 3 floats + 1 mask byte
forward and again backward, writing 1 float of gradient; the value loss the same: 2·(13 + 17) B.
Family rows (policy loss only, forward + backward, timed here, memory from the allocation tracker):
GSPO reads logp, old and the mask once more for its per-sequence mean (9 + 13 + 17 B per token),
CISPO does not (13 + 17 B).
"""
from __future__ import annotations

import argparse

from benchmarks.common import append_rows, make_row, print_table, ratio
from rlhf_fast.measure import mark_baseline, run_isolated, time_fn

BYTES_PER_TOKEN = 2 * (13 + 17)
# name -> (policy_loss options, minimum bytes per token forward + backward)
FAMILY = {
    "gspo": (dict(loss="clip", ratio_level="sequence", agg="seq-mean-token-mean"), 9 + 13 + 17),
    "cispo": (dict(loss="cispo", clip_low=1.0, clip_high=4.0, agg="token-mean"), 13 + 17),
}


def make_inputs(B: int, T: int, device: str = "cpu", seed: int = 0) -> dict:
    """Realistic rollout data: ragged right-padded responses, small policy drift, whitened advantages."""
    import torch

    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(T // 4, T + 1, (B,), generator=g)
    mask = torch.arange(T)[None, :] < lengths[:, None]
    old = -torch.rand(B, T, generator=g).pow(2) * 4  # log-probs of sampled tokens, mostly near 0
    lp = old + torch.randn(B, T, generator=g) * 0.1  # a few PPO epochs of drift: some tokens clip
    adv = torch.randn(B, T, generator=g)
    v_old = torch.randn(B, T, generator=g)
    v = v_old + torch.randn(B, T, generator=g) * 0.2
    ret = v_old + torch.randn(B, T, generator=g)
    out = dict(logprobs=lp, old_logprobs=old, advantages=adv, values=v, old_values=v_old, returns=ret, mask=mask)
    return {k: t.to(device) for k, t in out.items()}


def step_fn(provider: str, inp: dict):
    """A closure running both losses forward + backward once (grads reset, as an optimizer would)."""
    import torch

    from rlhf_fast.ops import ppo_policy_loss, ppo_policy_loss_reference, value_loss, value_loss_reference

    policy, value = (ppo_policy_loss, value_loss) if provider == "rlhf_fast" else (
        ppo_policy_loss_reference, value_loss_reference)
    lp = inp["logprobs"].clone().requires_grad_(True)
    v = inp["values"].clone().requires_grad_(True)

    def step():
        lp.grad = v.grad = None
        pl, _ = policy(lp, inp["old_logprobs"], inp["advantages"], inp["mask"], clip_low=0.2, clip_high=0.28)
        vl, _ = value(v, inp["old_values"], inp["returns"], inp["mask"], clip=0.2)
        (pl + 0.5 * vl).backward()
        return torch.stack([pl.detach(), vl.detach()])

    return step, (lp, v)


def memory_side(provider: str, B: int, T: int, device: str = "cpu") -> dict:
    """Run in its own process by ``run_isolated``: peak memory of a few steps beyond the inputs.

    One warm-up step runs before the baseline so one-time initialisation shared by both sides
    (OpenMP / autograd thread pools, lazy library loads) is not charged to either."""
    inp = make_inputs(B, T, device)
    step, leaves = step_fn(provider, inp)
    step()
    for t in leaves:
        t.grad = None
    mark_baseline(device)  # memory beyond the inputs (and the two leaves the loss differentiates)
    for _ in range(3):
        step()
    return {}


def tracked_memory(provider: str, B: int, T: int, device: str = "cpu") -> dict:
    """Allocation tracker over one step: tensors created beyond the inputs (allocator-independent)."""
    from rlhf_fast.memory.tracker import AllocationTracker

    inp = make_inputs(B, T, device)
    step, _ = step_fn(provider, inp)
    step()
    with AllocationTracker() as tracker:
        step()
    return {"tracked_peak_live_bytes": tracker.peak_live_bytes, "tracked_total_bytes": tracker.total_bytes}


def timings(B: int, T: int, device: str = "cpu", rounds: int = 3) -> dict:
    """Median step time per provider, in this process (not under run_isolated's
    MALLOC_MMAP_THRESHOLD_=65536, which turns every [B, T] temporary into an mmap + page faults and
    would time the kernel's page faults rather than the op). Providers alternate over ``rounds``
    and the best median is kept, so load from other processes hits both sides alike."""
    inp = make_inputs(B, T, device)
    return best_of_rounds({p: step_fn(p, inp)[0] for p in ("torch", "rlhf_fast")}, device, rounds, repeats=30)


def best_of_rounds(steps: dict, device: str, rounds: int, repeats: int) -> dict:
    """{provider: time_fn result}: providers alternate over ``rounds``, the best median is kept."""
    best: dict = {}
    for _ in range(rounds):
        for p, step in steps.items():
            r = time_fn(step, warmup=3, repeats=repeats, device=device)
            if p not in best or r["time_ms"] < best[p]["time_ms"]:
                best[p] = r
    return best


def family_step_fn(provider: str, name: str, inp: dict):
    """One forward + backward of a family loss: our fused op or the eager torch formula (its reference)."""
    from rlhf_fast.ops.policy_losses import policy_loss, policy_loss_reference

    fn = policy_loss if provider == "rlhf_fast" else policy_loss_reference
    options = FAMILY[name][0]
    lp = inp["logprobs"].clone().requires_grad_(True)

    def step():
        lp.grad = None
        loss, _ = fn(lp, inp["old_logprobs"], inp["advantages"], inp["mask"], **options)
        loss.backward()
        return loss.detach()

    return step


def family_rows(B: int, T: int, device: str = "cpu", rounds: int = 3) -> tuple[list[dict], list[tuple]]:
    """GSPO and CISPO rows: best-of-rounds median time (providers alternating) and tracked memory."""
    from rlhf_fast.memory.tracker import AllocationTracker

    inp = make_inputs(B, T, device)
    rows, summary = [], []
    for name, (_, bytes_per_token) in FAMILY.items():
        steps = {p: family_step_fn(p, name, inp) for p in ("torch", "rlhf_fast")}
        res = best_of_rounds(steps, device, rounds, repeats=20)
        for p, step in steps.items():
            with AllocationTracker() as tracker:
                step()
            res[p]["tracked_peak_live_bytes"] = tracker.peak_live_bytes
            gbs = B * T * bytes_per_token / (res[p]["time_ms"] * 1e-3) / 1e9
            note = f"tracked peak {tracker.peak_live_bytes / 2**20:.1f} MiB, total {tracker.total_bytes / 2**20:.1f} MiB"
            rows.append(make_row("ppo_loss", f"{name} policy loss fwd+bwd", f"{B}x{T}", "float32", p, res[p],
                                 device, gbs, "GB/s", note))
        summary.append((f"{name} {B}x{T}", ratio(res["rlhf_fast"]["time_ms"], res["torch"]["time_ms"]),
                        ratio(res["rlhf_fast"]["tracked_peak_live_bytes"], res["torch"]["tracked_peak_live_bytes"])))
    return rows, summary


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--full", action="store_true", help="GPU-sized shapes")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--family-only", action="store_true", help="only the GSPO / CISPO rows")
    ap.add_argument("--small", action="store_true", help="one small shape (a smoke run)")
    args = ap.parse_args(argv)
    shapes = [(64, 1024), (16, 8192)] if not args.full else [(64, 1024), (512, 4096), (256, 8192)]
    if args.small:
        shapes = [(8, 256)]
    rows, summary = [], []
    family, family_summary = [], []
    for B, T in shapes:
        r, s = family_rows(B, T, args.device)
        family += r
        family_summary += s
    for B, T in [] if args.family_only else shapes:
        times = timings(B, T, args.device)
        res = {}
        for p in ("torch", "rlhf_fast"):
            mem = run_isolated("benchmarks.bench_ppo_loss:memory_side", provider=p, B=B, T=T, device=args.device)
            res[p] = {**times[p], **mem, **tracked_memory(p, B, T, args.device)}
        for p, r in res.items():
            gbs = B * T * BYTES_PER_TOKEN / (r["time_ms"] * 1e-3) / 1e9 if "time_ms" in r else None
            note = (f"tracked peak {r.get('tracked_peak_live_bytes', 0) / 2**20:.1f} MiB, "
                    f"total {r.get('tracked_total_bytes', 0) / 2**20:.1f} MiB") if "error" not in r else ""
            rows.append(make_row("ppo_loss", "ppo_policy+value_loss fwd+bwd", f"{B}x{T}", "float32", p, r,
                                 args.device, gbs, "GB/s", note))
        ours, base = res["rlhf_fast"], res["torch"]
        summary.append((f"{B}x{T}", ratio(ours.get("time_ms"), base.get("time_ms")),
                        ratio(ours.get("mem_bytes"), base.get("mem_bytes")),
                        ratio(ours.get("tracked_peak_live_bytes"), base.get("tracked_peak_live_bytes")),
                        ratio(ours.get("tracked_total_bytes"), base.get("tracked_total_bytes"))))
    rows += family
    print_table(rows)
    if summary:
        print("\nours / eager torch (time target <= 1, memory targets <= 0.5):")
        print("shape | time | RSS beyond inputs | tracked peak live | tracked total")
        for s in summary:
            print(" | ".join(s))
    print("\nfamily losses, ours / eager torch formula:")
    print("loss shape | time | tracked peak live")
    for s in family_summary:
        print(" | ".join(s))
    append_rows(rows)
    return rows


if __name__ == "__main__":
    main()
