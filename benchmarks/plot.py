"""Turn benchmarks/results/results.csv into one PNG per benchmark (latest run of each row).

    python -m benchmarks.plot [--csv FILE] [--out DIR]
Each PNG has two panels, time and memory, grouped by shape with one bar per provider.
"""
from __future__ import annotations

import argparse
import csv
from collections import OrderedDict
from pathlib import Path

from benchmarks.common import RESULTS_CSV, RESULTS_DIR


def latest_rows(path: Path) -> dict[str, list[dict]]:
    """{bench: rows}, keeping for each (op, shape, dtype, provider, device) only the newest row."""
    by_key: OrderedDict = OrderedDict()
    with path.open() as f:
        for row in csv.DictReader(f):
            key = (row["bench"], row["op"], row["shape"], row["dtype"], row["provider"], row["device"])
            by_key.pop(key, None)
            by_key[key] = row
    out: dict[str, list[dict]] = {}
    for (bench, *_), row in by_key.items():
        out.setdefault(bench, []).append(row)
    return out


def _num(s):
    try:
        return float(s)
    except (TypeError, ValueError):
        return None


def plot_bench(bench: str, rows: list[dict], out_dir: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = list(OrderedDict.fromkeys(f"{r['op']}\n{r['shape']} {r['dtype']}" for r in rows))
    providers = list(OrderedDict.fromkeys(r["provider"] for r in rows))
    fig, axes = plt.subplots(1, 2, figsize=(max(8, 2.2 * len(groups) + 4), 4.5))
    width = 0.8 / max(1, len(providers))
    for ax, field, label, scale in ((axes[0], "time_ms", "time (ms, median)", 1.0),
                                    (axes[1], "mem_bytes", "memory above baseline (MiB)", 2**20)):
        for i, p in enumerate(providers):
            vals = []
            for g in groups:
                r = next((r for r in rows if r["provider"] == p and f"{r['op']}\n{r['shape']} {r['dtype']}" == g), None)
                v = _num(r[field]) if r else None
                vals.append(v / scale if v is not None else 0.0)
            xs = [j + i * width for j in range(len(groups))]
            ax.bar(xs, vals, width=width, label=p)
        ax.set_xticks([j + width * (len(providers) - 1) / 2 for j in range(len(groups))])
        ax.set_xticklabels(groups, fontsize=7)
        ax.set_ylabel(label)
        ax.set_yscale("log")
        ax.grid(axis="y", alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"{bench} on {rows[-1]['device']}")
    fig.tight_layout()
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{bench}.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv=None) -> list[Path]:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--csv", type=Path, default=RESULTS_CSV)
    ap.add_argument("--out", type=Path, default=RESULTS_DIR)
    args = ap.parse_args(argv)
    if not args.csv.exists():
        raise SystemExit(f"no results file at {args.csv}: run a benchmark first (make bench)")
    paths = [plot_bench(b, rows, args.out) for b, rows in latest_rows(args.csv).items()]
    for p in paths:
        print(f"wrote {p}")
    return paths


if __name__ == "__main__":
    main()
