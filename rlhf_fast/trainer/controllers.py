"""Step-to-step controllers of the PPO loop: the KL coefficient and the running score moments.

Both are plain state machines with ``state_dict``/``load_state_dict`` so checkpoints resume them exactly.
"""
from __future__ import annotations

import math

import torch

from rlhf_fast.trainer.distributed import dist_ready

__all__ = ["KLController", "RunningMoments"]


class KLController:
    """Fixed or adaptive (Ziegler et al. 2019) KL coefficient; ``update`` takes the batch's mean summed KL."""

    def __init__(self, kind: str, init: float, target: float = 6.0, horizon: int = 10000):
        if kind not in ("fixed", "adaptive"):
            raise ValueError(f"kl_controller must be 'fixed' or 'adaptive', got {kind!r}")
        self.kind, self.value, self.target, self.horizon = kind, float(init), float(target), int(horizon)

    def update(self, current_kl: float, n_steps: int) -> None:
        if self.kind == "adaptive":
            error = min(max(current_kl / self.target - 1.0, -0.2), 0.2)
            self.value *= 1.0 + error * n_steps / self.horizon

    def state_dict(self) -> dict:
        return {"kind": self.kind, "value": self.value, "target": self.target, "horizon": self.horizon}

    def load_state_dict(self, state: dict) -> None:
        self.kind, self.value = state["kind"], float(state["value"])
        self.target, self.horizon = float(state["target"]), int(state["horizon"])


class RunningMoments:
    """Running mean/std of scores (parallel Welford over batches, global across ranks) for reward_norm."""

    def __init__(self):
        self.count, self.mean, self.m2 = 0.0, 0.0, 0.0

    def update(self, x: torch.Tensor, group=None) -> None:
        stats = torch.stack([x.numel() * torch.ones((), dtype=torch.float64), x.double().sum(), (x.double() ** 2).sum()])
        if dist_ready(group):
            torch.distributed.all_reduce(stats, group=group)
        n, s, ss = (float(v) for v in stats)
        if n == 0:
            return
        mean_b = s / n
        m2_b = ss - n * mean_b ** 2
        delta = mean_b - self.mean
        tot = self.count + n
        self.mean += delta * n / tot
        self.m2 += m2_b + delta ** 2 * self.count * n / tot
        self.count = tot

    @property
    def std(self) -> float:
        return math.sqrt(self.m2 / max(self.count - 1, 1)) if self.count > 1 else 1.0

    def state_dict(self) -> dict:
        return {"count": self.count, "mean": self.mean, "m2": self.m2}

    def load_state_dict(self, s: dict) -> None:
        self.count, self.mean, self.m2 = s["count"], s["mean"], s["m2"]

