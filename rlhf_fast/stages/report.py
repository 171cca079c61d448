"""The demo pipeline's report: ``report.md`` and its plots (PPO's proxy and gold reward and KL per step,
the reward model's held-out agreement with the gold judge)."""
from __future__ import annotations

import json
import math
from pathlib import Path

from rlhf_fast.stages.demo_data import gold_reward

__all__ = ["make_plots", "write_report"]


def make_plots(out: Path, gold_rows: list[dict], rm_dir) -> list[str]:
    """ppo_curves.png (proxy reward, gold reward, KL per PPO step) and rm_accuracy.png."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    if gold_rows:
        steps = [r["step"] for r in gold_rows]
        fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
        for ax, key, label in zip(axes, ("proxy_reward", "gold_reward", "kl"),
                                  ("proxy reward (learned RM)", "gold reward (judge, unseen by PPO)", "KL to reference")):
            ax.plot(steps, [r[key] if r[key] is not None else math.nan for r in gold_rows], marker=".")
            ax.set_title(label)
            ax.set_xlabel("PPO step")
            ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(out / "ppo_curves.png", dpi=100)
        plt.close(fig)
        paths.append("ppo_curves.png")
    rm_metrics = Path(rm_dir) / "metrics.jsonl"
    if rm_metrics.is_file():
        pts = [json.loads(x) for x in rm_metrics.read_text().splitlines() if x.strip()]
        pts = [(p["step"], p["eval_accuracy"]) for p in pts if "eval_accuracy" in p]
        if pts:
            fig, ax = plt.subplots(figsize=(5, 3.6))
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o")
            ax.axhline(0.75, color="gray", ls="--", lw=1, label="target 0.75")
            ax.set_title("RM held-out agreement with the gold judge")
            ax.set_xlabel("RM step")
            ax.set_ylim(0, 1)
            ax.legend()
            ax.grid(alpha=0.3)
            fig.tight_layout()
            fig.savefig(out / "rm_accuracy.png", dpi=100)
            plt.close(fig)
            paths.append("rm_accuracy.png")
    return paths


def write_report(out: Path, summary: dict, plots: list[str], prompts, sft_samples, ppo_samples, g_sft, g_ppo) -> None:
    lines = [
        "# rlhf_fast demo: SFT -> reward model -> PPO on a 2-core CPU",
        "",
        "A tiny Qwen2 (hidden 128, 2 layers) with a byte-level BPE tokenizer trained on Python's own",
        "documentation text (`pydoc_data.topics`). Preference pairs are the SFT model's own samples,",
        "labelled by a pinned *gold judge* with noise; the reward model learns from those labels; PPO",
        "optimises the learned reward with a KL penalty and never sees the gold judge.",
        "",
        "Gold judge (`rlhf_fast.stages.demo_data.gold_reward`): words = lowercase `[a-z]+` runs, n = len(words)",
        "(n = 0 gives -1); gold = 2 x share of words in TARGET - share of repeated word bigrams",
        "- 0.5 x min(1, |n - 30| / 30); labels: P(a preferred) = sigmoid(5 x (gold(a) - gold(b))).",
        "TARGET = {function object value return list string module class method argument default example",
        "type number error file name data code statement}.",
        "",
        "## Results",
        "",
        "| metric | value |",
        "|---|---|",
    ]
    for k in ("gold_reward_sft", "gold_reward_ppo", "gold_reward_sft_std", "rm_heldout_accuracy", "final_kl",
              "distinct2_sft", "distinct2_ppo", "ppo_steps", "wall_seconds"):
        v = summary[k]
        lines.append(f"| {k} | {v:.4g} |" if isinstance(v, float) else f"| {k} | {v} |")
    lines += ["", "| target | met |", "|---|---|"]
    lines += [f"| {k} | {'yes' if v else 'NO'} |" for k, v in summary["targets"].items()]
    lines.append("")
    for p in plots:
        lines += [f"![{p}]({p})", ""]
    lines += ["## Samples on held-out prompts (same sampling seed before and after PPO)", ""]
    order = sorted(range(len(prompts)), key=lambda i: g_sft[i] - g_ppo[i])[:3] + list(range(3))
    seen = set()
    for i in order:
        if i in seen:
            continue
        seen.add(i)
        lines += [f"**Prompt:** {prompts[i]}", "",
                  f"- SFT (gold {gold_reward(sft_samples[i]):+.2f}): {sft_samples[i].strip()}",
                  f"- PPO (gold {gold_reward(ppo_samples[i]):+.2f}): {ppo_samples[i].strip()}", ""]
    (out / "report.md").write_text("\n".join(lines))
