"""The callback's ``ldb/epoch_time``: cheap wall-clock seconds of a training epoch.

Two clock reads per epoch and two per validation run, nothing per step and no device
synchronisation, so it costs the training loop nothing. On a GPU it is therefore approximate (queued
kernels may be billed to the next epoch); ``ldb-bench`` measures with synchronised clocks.
"""

from __future__ import annotations

import time
from typing import Optional


class EpochTimer:
    """Seconds of a training epoch, validation inside the epoch excluded.

    Example::

        >>> timer = EpochTimer()
        >>> timer.start(); timer.pause(); timer.resume(); timer.stop() >= 0.0
        True
    """

    def __init__(self) -> None:
        self.elapsed = 0.0
        self._start: Optional[float] = None
        self._paused_at: Optional[float] = None
        self._paused = 0.0

    def start(self) -> None:
        self.elapsed, self._paused, self._paused_at = 0.0, 0.0, None
        self._start = time.perf_counter()

    def pause(self) -> None:
        if self._start is not None:
            self._paused_at = time.perf_counter()

    def resume(self) -> None:
        if self._paused_at is not None:
            self._paused += time.perf_counter() - self._paused_at
            self._paused_at = None

    def stop(self) -> float:
        """The epoch's seconds so far, validation excluded (``0.0`` if it never started)."""
        if self._start is not None:
            self.resume()
            self.elapsed = time.perf_counter() - self._start - self._paused
        return self.elapsed
