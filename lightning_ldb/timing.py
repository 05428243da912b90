"""Wall-clock timing of training epochs, shared by the callback's ``ldb/epoch_time`` and the benchmark."""

from __future__ import annotations

import time
from typing import Callable, Optional

import torch
from lightning.pytorch import LightningModule


class EpochTimer:
    """Seconds of a training epoch, validation inside the epoch excluded.

    Args:
        clock: The time source: ``None`` for ``time.perf_counter`` (wall-clock, looked up at each call) or e.g. ``time.process_time``.
    """

    def __init__(self, clock: Optional[Callable[[], float]] = None) -> None:
        self._clock = clock
        self.elapsed = 0.0
        self._start: Optional[float] = None
        self._paused_at: Optional[float] = None
        self._paused = 0.0

    def _now(self) -> float:
        return self._clock() if self._clock is not None else time.perf_counter()

    def start(self, pl_module: LightningModule) -> None:
        synchronize(pl_module)
        self.elapsed, self._paused, self._paused_at = 0.0, 0.0, None
        self._start = self._now()

    def lap(self, pl_module: LightningModule, last: bool) -> None:
        if self._start is None:
            return
        if last:
            synchronize(pl_module)
        self.elapsed = self._now() - self._start - self._paused

    def pause(self) -> None:
        if self._start is not None:
            self._paused_at = self._now()

    def resume(self) -> None:
        if self._paused_at is not None:
            self._paused += self._now() - self._paused_at
            self._paused_at = None


def synchronize(pl_module: LightningModule) -> None:
    """Wait for queued CUDA work of ``pl_module``'s device, if it is on a GPU."""
    # Asynchronous CUDA kernels would otherwise be billed to whichever epoch waits for them.
    if pl_module.device.type == "cuda":
        torch.cuda.synchronize(pl_module.device)
