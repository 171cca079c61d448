"""The one metrics writer of the trainers and stages: JSONL in output_dir (flushed every line, so a
crashed run keeps its curve), stdout (through tqdm so bars stay intact), TensorBoard when installed and
asked for, wandb when asked for."""
from __future__ import annotations

import json
import math
import warnings
from pathlib import Path


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
