"""Graceful stop on SIGTERM / SIGINT: finish the current step, save it, stop (a second SIGINT aborts).

Schedulers (SLURM, Kubernetes) send SIGTERM before killing a job; the trainer checks ``requested()``
between steps, and every rank stops at the same step because the flag is summed over ranks."""
from __future__ import annotations

import signal
import threading
from collections.abc import Callable

import torch

from rlhf_fast.trainer.distributed import all_reduce_sum

__all__ = ["StopSignal"]


class StopSignal:
    """Records the first SIGTERM / SIGINT while installed; ``name`` is its name ("SIGTERM") or None."""

    def __init__(self, announce: bool = True):
        self.announce = announce
        self.name: str | None = None

    def install(self) -> Callable[[], None]:
        """Install the handlers (main thread only); returns the function that restores the previous ones."""
        if threading.current_thread() is not threading.main_thread():
            return lambda: None
        previous = {sig: signal.signal(sig, self._handler) for sig in (signal.SIGTERM, signal.SIGINT)}

        def restore():
            for sig, h in previous.items():
                signal.signal(sig, h)

        return restore

    def _handler(self, signum, frame) -> None:
        if self.name is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.name = signal.Signals(signum).name
        if self.announce:
            print(f"[rlhf_fast] {self.name} received: finishing the current step, then saving and "
                  "stopping (Ctrl-C again to abort without saving)", flush=True)

    def requested(self) -> bool:
        """True on every rank once any rank received a signal."""
        return bool(all_reduce_sum(torch.tensor([1.0 if self.name else 0.0]))[0] > 0)
