"""An LDB run against its baseline, from their ``metrics.csv``: the paper's speed-up and accuracy columns.

Both runs must have been logged with Lightning's ``CSVLogger`` and
:class:`~lightning_ldb.examples.EpochSummary` (the ``configs/base/*.yaml`` files set up both), which
logs each epoch's training time (validation excluded) as ``epoch_time``, timed the same way with and
without LDB.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path
from typing import Union


def speedup(ldb_seconds: float, baseline_seconds: float) -> float:
    """The relative time saved against the baseline: ``1 - ldb_seconds / baseline_seconds`` (as ``ldb-bench`` reports it).

    Args:
        ldb_seconds: Training time of the measured run.
        baseline_seconds: Training time of the baseline run.

    Raises:
        ValueError: If ``baseline_seconds`` is not positive or ``ldb_seconds`` is negative.

    Example::

        >>> speedup(75.0, 100.0)
        0.25
        >>> speedup(110.0, 100.0)  # slower than the baseline: a negative speed-up
        -0.1
    """
    if not baseline_seconds > 0:
        raise ValueError(f"`baseline_seconds` must be > 0, got {baseline_seconds!r}.")
    if ldb_seconds < 0:
        raise ValueError(f"`ldb_seconds` must be >= 0, got {ldb_seconds!r}.")
    return round(1.0 - ldb_seconds / baseline_seconds, 12)


@dataclass(frozen=True)
class RunMetrics:
    """Per-epoch numbers of one run, read from its ``metrics.csv``."""

    path: str
    #: Training seconds of each epoch, in epoch order.
    epoch_seconds: tuple[float, ...]
    #: The monitored validation metric after each validated epoch, in epoch order.
    monitored: tuple[float, ...]
    #: The epoch-level training loss, in epoch order (empty if not logged).
    train_loss: tuple[float, ...]

    @property
    def seconds(self) -> float:
        """Total training time of the run."""
        return sum(self.epoch_seconds)


def read_run(metrics_csv: Union[str, Path], monitor: str = "val_acc") -> RunMetrics:
    """Read the per-epoch ``epoch_time``, ``monitor`` and ``train_loss`` of a ``CSVLogger`` ``metrics.csv``.

    Args:
        metrics_csv: Path to the run's ``metrics.csv``.
        monitor: The validation metric to read.

    Raises:
        FileNotFoundError: If the file does not exist.
        ValueError: If the file has no ``epoch_time`` or no ``monitor`` column, or no values in them.
    """
    path = Path(metrics_csv)
    with path.open(newline="") as file:
        rows = list(csv.DictReader(file))
    columns = set(rows[0]) if rows else set()
    for column, fix in (
        ("epoch_time", "log the run with lightning_ldb.examples.EpochSummary among trainer.callbacks"),
        (monitor, f"pass the name of a logged validation metric ({sorted(columns)})"),
    ):
        if column not in columns:
            raise ValueError(f"{path} has no `{column}` column: {fix}.")

    def per_epoch(column: str) -> tuple[float, ...]:
        # CSVLogger writes validation and training epoch-end metrics on separate rows: one value per epoch.
        values = {int(row["epoch"]): float(row[column]) for row in rows if row.get(column)}
        return tuple(values[epoch] for epoch in sorted(values))

    epoch_seconds, monitored = per_epoch("epoch_time"), per_epoch(monitor)
    if not epoch_seconds or not monitored:
        raise ValueError(f"{path} holds no completed epoch with both `epoch_time` and `{monitor}`.")
    train_loss = per_epoch("train_loss") if "train_loss" in columns else ()
    return RunMetrics(str(path), epoch_seconds, monitored, train_loss)


@dataclass(frozen=True)
class Comparison:
    """An LDB run against its baseline, as the paper's tables report them."""

    baseline: RunMetrics
    ldb: RunMetrics
    monitor: str

    @property
    def speedup(self) -> float:
        """``1 - T_ldb / T_baseline`` over total training time: the paper's "Speedup" column."""
        return speedup(self.ldb.seconds, self.baseline.seconds)

    @property
    def difference(self) -> float:
        """Final ``monitor`` of LDB minus the baseline's: the paper's "Accuracy Difference" column."""
        return self.ldb.monitored[-1] - self.baseline.monitored[-1]

    def format(self) -> str:
        """A short report, in percent for accuracies."""
        rows = [("baseline", self.baseline), ("LDB", self.ldb)]
        lines = [f"{'method':<9} {'epochs':>6} {'time (s)':>10} {'final ' + self.monitor:>16} {'best':>8}"]
        for name, run in rows:
            lines.append(
                f"{name:<9} {len(run.epoch_seconds):>6} {run.seconds:>10.1f} {100 * run.monitored[-1]:>15.2f}%"
                f" {100 * max(run.monitored):>7.2f}%"
            )
        lines.append(f"Speed-up: {100 * self.speedup:.1f}%   {self.monitor} difference: {100 * self.difference:+.2f} points")
        return "\n".join(lines)


def compare_runs(baseline_csv: Union[str, Path], ldb_csv: Union[str, Path], monitor: str = "val_acc") -> Comparison:
    """Compare an LDB run with its baseline from their ``metrics.csv`` files.

    Args:
        baseline_csv: ``metrics.csv`` of the baseline run.
        ldb_csv: ``metrics.csv`` of the LDB run.
        monitor: The validation metric compared (an accuracy in ``[0, 1]``).

    Raises:
        ValueError: If a file lacks a needed column, or the runs trained for different numbers of epochs.

    Example::

        >>> import tempfile, os
        >>> folder = tempfile.mkdtemp()
        >>> for name, times in (("base", (10, 10)), ("ldb", (10, 6))):
        ...     with open(os.path.join(folder, name + ".csv"), "w") as f:
        ...         _ = f.write("epoch,epoch_time,val_acc\\n0,,0.5\\n0,%d,\\n1,,0.9\\n1,%d,\\n" % times)
        >>> comparison = compare_runs(os.path.join(folder, "base.csv"), os.path.join(folder, "ldb.csv"))
        >>> round(comparison.speedup, 3), comparison.difference
        (0.2, 0.0)
    """
    baseline, ldb = read_run(baseline_csv, monitor), read_run(ldb_csv, monitor)
    if len(baseline.epoch_seconds) != len(ldb.epoch_seconds):
        raise ValueError(
            f"The runs trained for different numbers of epochs ({len(baseline.epoch_seconds)} in {baseline.path},"
            f" {len(ldb.epoch_seconds)} in {ldb.path}): compare runs of the same length."
        )
    return Comparison(baseline, ldb, monitor)
