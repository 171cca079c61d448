"""Run every benchmark (quick mode for a small CPU; --full for the real numbers), then plot and summarise.

    python -m benchmarks.run_all [--full] [--device cuda] [--only NAME ...]

The realistic workloads come first (HEADLINE: PPO end to end at the 0.5B width and the variable-length
workload, then the toy PPO rows; DPO at the 0.5B width, then toy; decode against its floor), then the
op-level benchmarks. Quick mode runs fewer steps, not smaller models: about 22 minutes on an idle 2-core
CPU (estimated, README "Benchmarks"); with --full the realistic workloads alone take about 50 minutes there.
"""
from __future__ import annotations

import argparse
import importlib
import pkgutil
from pathlib import Path

import benchmarks
from benchmarks import plot, summary

# Too slow for the quick suite on a 2-core CPU (> 90 s): run with --full or --only.
FULL_ONLY = {"bench_grpo"}
HEADLINE = ["bench_ppo_e2e", "bench_dpo", "bench_decode"]  # the realistic workloads, run first


def bench_modules() -> list[str]:
    names = sorted(i.name for i in pkgutil.iter_modules([str(Path(benchmarks.__file__).parent)])
                   if i.name.startswith("bench_"))
    return [n for n in HEADLINE if n in names] + [n for n in names if n not in HEADLINE]


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--full", action="store_true")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--only", nargs="*", default=None, help=f"subset of {bench_modules()}")
    args = ap.parse_args(argv)
    for name in bench_modules():
        if args.only and name not in args.only:
            continue
        if name in FULL_ONLY and not args.full and not args.only:
            print(f"\n=== {name}: --full only (minutes in quick mode) ===")
            continue
        print(f"\n=== {name} ===")
        sub = ["--device", args.device] + (["--full"] if args.full else [])
        try:
            importlib.import_module(f"benchmarks.{name}").main(sub)
        except SystemExit as exc:  # a benchmark that cannot run here says why; the others still run
            print(f"{name}: {exc}")
    plot.main([])
    summary.main([])


if __name__ == "__main__":
    main()
