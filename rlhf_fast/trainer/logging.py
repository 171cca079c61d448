"""Metrics for the trainers and stages: the one metrics writer (JSONL in output_dir, flushed every line
so a crashed run keeps its curve; stdout through tqdm so bars stay intact; TensorBoard and wandb when
installed and asked for) and the assembly of one PPO step's metrics under TRL's names and formulas
(``StepStats``, ``step_metrics``, ``group_reward_stats``)."""
from __future__ import annotations

import json
import math
import warnings
from pathlib import Path

import torch

from rlhf_fast.trainer.distributed import all_reduce_sum


def _reporters(report_to) -> set[str]:
    if report_to is None:
        return set()
    if isinstance(report_to, str):
        report_to = [report_to]
    names = {str(r).lower() for r in report_to}
    if "none" in names:
        return set()
    if "all" in names:
        return {"tensorboard", "wandb"}
    return names


class MetricsLogger:
    """Writes each metrics dict to every configured sink.

    output_dir/``jsonl_name`` (appended to) whenever ``output_dir`` is given (the trainers pass None
    off the main process): one JSON object per ``log`` call, ``{"step": step, **metrics}``; stdout
    when ``stdout``; TensorBoard (``report_to`` contains "tensorboard") when the package is installed,
    else a warning naming it; wandb likewise. Unknown reporters are warned about by name, never
    silently dropped. ``enabled=False`` makes every call a no-op. A context manager (closes on exit).

        with MetricsLogger(stage_dir, stdout=False) as metrics:   # the stages: metrics.jsonl only
            metrics.log({"loss": 0.5, "lr": 1e-5}, step=1)
    """

    def __init__(self, output_dir: str | Path | None, report_to=None, run_name: str | None = None,
                 stdout: bool = True, enabled: bool = True, jsonl_name: str = "metrics.jsonl", config: dict | None = None):
        self.enabled = enabled
        self.stdout = stdout and enabled
        self.jsonl = None
        self.tb = None
        self.wandb = None
        if not enabled:
            return
        if output_dir is not None:
            Path(output_dir).mkdir(parents=True, exist_ok=True)
            self.jsonl = open(Path(output_dir) / jsonl_name, "a", encoding="utf-8")  # noqa: SIM115
        names = _reporters(report_to)
        for name in sorted(names - {"tensorboard", "wandb", "jsonl"}):
            warnings.warn(f"report_to={name!r} is not supported by rlhf_fast (supported: tensorboard, wandb)",
                          stacklevel=2)
        if "tensorboard" in names:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(log_dir=str(Path(output_dir or ".") / "runs"))
            except Exception as exc:  # noqa: BLE001 - tensorboard missing or broken
                warnings.warn(f"report_to='tensorboard' but TensorBoard is unavailable ({exc}); "
                              "pip install 'rlhf_fast[tensorboard]'", stacklevel=2)
        if "wandb" in names:
            try:
                import wandb

                self.wandb = wandb.run or wandb.init(name=run_name, config=config or {})
            except Exception as exc:  # noqa: BLE001
                warnings.warn(f"report_to='wandb' but wandb could not start ({exc})", stacklevel=2)

    def log(self, metrics: dict, step: int) -> None:
        if not self.enabled:
            return
        clean = {k: (float(v) if hasattr(v, "__float__") and not isinstance(v, (int, str)) else v)
                 for k, v in metrics.items()}
        if self.jsonl is not None:
            self.jsonl.write(json.dumps({"step": step, **clean}, default=str) + "\n")
            self.jsonl.flush()
        if self.stdout:
            text = " ".join(f"{k}={_fmt(v)}" for k, v in clean.items())
            try:
                from tqdm import tqdm

                tqdm.write(f"[step {step}] {text}")
            except ImportError:
                print(f"[step {step}] {text}", flush=True)
        if self.tb is not None:
            for k, v in clean.items():
                if isinstance(v, (int, float)) and math.isfinite(v):
                    self.tb.add_scalar(k, v, step)
        if self.wandb is not None:
            self.wandb.log(clean, step=step)

    def __enter__(self) -> MetricsLogger:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        if self.jsonl is not None:
            self.jsonl.close()
            self.jsonl = None
        if self.tb is not None:
            self.tb.close()
            self.tb = None


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def should_log(args, state, epoch_per_step: float) -> bool:
    """Whether step ``state.global_step`` logs, by TrainingArguments' logging_strategy ("steps": every
    logging_steps, "epoch": when a pass over the prompts completes, each step covering ``epoch_per_step`` of
    one, "no"), logging_first_step, and always the last step. (TRL 1.12's PPO loop logs every step, whatever
    these say.)"""
    strategy = str(getattr(args.logging_strategy, "value", args.logging_strategy))
    step = state.global_step
    if strategy == "no":
        return False
    if step >= state.max_steps or (step == 1 and args.logging_first_step):
        return True
    if strategy == "epoch":
        return int(state.epoch) > int(state.epoch - epoch_per_step)
    return step % max(state.logging_steps, 1) == 0


# =============================================================================== PPO step metrics
class StepStats:
    """Per-micro-batch training statistics of one PPO step, kept on device (no host sync until logging)."""

    KEYS = ("approxkl", "clipfrac", "pg_loss", "vf_loss", "vf_clipfrac", "entropy", "ratio", "kl")

    def __init__(self):
        for key in self.KEYS:
            setattr(self, key, [])

    @classmethod
    def empty(cls) -> StepStats:
        return cls()

    def add(self, micro: dict) -> None:
        """Append one micro-batch's 0-d tensors (keys from KEYS)."""
        for key, value in micro.items():
            getattr(self, key).append(value)

    def means(self) -> dict[str, float]:
        """TRL's update metrics: the mean over micro-batches of each statistic."""
        def m(xs):
            return float(torch.stack(xs).mean()) if xs else float("nan")

        ratios = torch.stack(self.ratio) if self.ratio else torch.zeros(1)
        out = {
            "policy/approxkl_avg": m(self.approxkl), "policy/clipfrac_avg": m(self.clipfrac),
            "loss/policy_avg": m(self.pg_loss), "loss/value_avg": m(self.vf_loss),
            "val/clipfrac_avg": m(self.vf_clipfrac), "policy/entropy_avg": m(self.entropy),
            "val/ratio": m(self.ratio), "val/ratio_var": float(ratios.var()) if ratios.numel() > 1 else 0.0,
        }
        if self.pg_loss and not self.vf_loss:  # no critic: no value metrics rather than NaNs
            del out["loss/value_avg"], out["val/clipfrac_avg"]
        if self.kl:
            out["kl"] = m(self.kl)
        return out


def step_metrics(stats: StepStats, *, batch_size: int, kl_sum, neg_logprob_sum, kl_coef: float, raw_scores,
                 response_tokens, eos_token_id: int | None, group_scores=None, num_generations: int = 1,
                 group=None) -> dict:
    """One PPO step's metrics under TRL 1.12's names and formulas, summed over every rank.

    kl_sum / neg_logprob_sum: 0-d sums over this rank's valid response tokens of the per-token KL and of
    -log-prob of the sampling policy; raw_scores fp32 [B]; response_tokens int64 [B, R]. ``objective/*`` are means over the global batch of per-sequence sums
    (``objective/kl`` = mean summed KL). group_scores [B] (critic-free estimators) adds TRL GRPO's
    reward_std and frac_reward_zero_std."""
    kl_sum = kl_sum.float().reshape(())
    sums = all_reduce_sum(torch.stack([kl_sum, neg_logprob_sum.float().reshape(()), raw_scores.float().sum(),
                                       -kl_coef * kl_sum]), group)
    eos = all_reduce_sum((response_tokens == eos_token_id).sum().reshape(1), group)[0] \
        if eos_token_id is not None else 0
    mean_kl = float(sums[0]) / batch_size
    metrics = {
        "objective/kl": mean_kl,
        "objective/entropy": float(sums[1]) / batch_size,
        "objective/non_score_reward": float(sums[3]) / batch_size,
        "objective/scores": float(sums[2]) / batch_size,
    }
    metrics["objective/rlhf_reward"] = metrics["objective/non_score_reward"] + metrics["objective/scores"]
    if group_scores is not None:
        metrics.update(group_reward_stats(group_scores, num_generations, group))
    metrics.update(stats.means())
    metrics["val/num_eos_tokens"] = int(eos)
    return metrics


def group_reward_stats(scores: torch.Tensor, num_generations: int, group=None) -> dict[str, float]:
    """TRL GRPO's ``reward_std`` (mean over groups of the within-group std, unbiased) and
    ``frac_reward_zero_std`` (share of groups whose scores are all equal), over every rank. scores [B]."""
    grouped = scores.detach().float().reshape(-1, num_generations)
    std = grouped.std(dim=1, unbiased=True) if num_generations > 1 else torch.zeros(grouped.shape[0])
    zero = (grouped.max(dim=1).values - grouped.min(dim=1).values) == 0
    tot = all_reduce_sum(torch.stack([std.sum(), zero.float().sum(), torch.tensor(float(grouped.shape[0]))]))
    return {"reward_std": float(tot[0] / tot[2]), "frac_reward_zero_std": float(tot[1] / tot[2])}
