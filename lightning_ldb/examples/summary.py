"""``EpochSummary``: what LayerDropBack did, epoch by epoch, printed when ``fit`` ends."""

from __future__ import annotations

from dataclasses import dataclass
from statistics import mean
from typing import Any, Optional

from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import Callback

from lightning_ldb import LayerDropBackCallback
from lightning_ldb.callback import EpochTimer


@dataclass
class EpochRecord:
    """One training epoch as :class:`EpochSummary` saw it."""

    epoch: int
    #: ``"DROP"`` or ``"full"``.
    mode: str
    #: Images per training batch (``None`` if the loader has no fixed batch size).
    batch_size: Optional[int]
    #: Training batches run.
    steps: int
    #: Mean number of layers dropped per step; ``None`` without a ``LayerDropBackCallback``.
    dropped: Optional[float]
    #: Layers LDB may drop; ``None`` without a ``LayerDropBackCallback``.
    candidates: Optional[int]
    #: Wall-clock seconds of the epoch's training, validation excluded.
    seconds: float
    train_loss: Optional[float]
    #: The monitored metric after this epoch's validation; ``None`` if validation did not run.
    monitored: Optional[float]


class EpochSummary(Callback):
    """Record each training epoch (mode, batch size, dropped layers, time, accuracy) and print a table.

    Works with or without :class:`~lightning_ldb.LayerDropBackCallback`, so a baseline run prints
    the same table. Each epoch's training time (validation excluded, measured like LDB's
    ``ldb/epoch_time``) is logged as ``epoch_time``, so baseline and LDB runs can be compared from
    their logs. The records stay in :attr:`records`.

    Args:
        monitor: The validation metric shown in the table and summarised (best and last value).
        mode: ``"max"`` if a higher ``monitor`` is better (accuracy), ``"min"`` if lower (loss).
        live: Also print each epoch's row as soon as the epoch ends (best with
            ``enable_progress_bar: false``).

    Raises:
        ValueError: If ``mode`` is neither ``"max"`` nor ``"min"``.
    """

    def __init__(self, monitor: str = "val_acc", mode: str = "max", live: bool = False) -> None:
        super().__init__()
        if mode not in ("max", "min"):
            raise ValueError(f"`mode` must be 'max' or 'min', got {mode!r}.")
        self.monitor = monitor
        self.mode = mode
        self.live = live
        self.records: list[EpochRecord] = []
        # The timer behind LDB's `ldb/epoch_time`: a baseline run without LDB is timed alike.
        self._timer = EpochTimer()
        self._dropped_counts: list[int] = []
        self._steps = 0
        self._validated = False

    # ------------------------------------------------------------------ hooks
    def on_train_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._dropped_counts, self._steps, self._validated = [], 0, False
        self._timer.start()

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self._steps += 1
        ldb = _ldb_callback(trainer)
        if ldb is not None:
            self._dropped_counts.append(len(ldb.dropped_layers))

    def on_validation_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._timer.pause()

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._timer.resume()
        if not trainer.sanity_checking:
            self._validated = True

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        ldb = _ldb_callback(trainer)
        metrics = trainer.callback_metrics
        record = EpochRecord(
            epoch=trainer.current_epoch,
            mode="DROP" if ldb is not None and ldb.mode == "drop" else "full",
            batch_size=getattr(trainer.train_dataloader, "batch_size", None),
            steps=self._steps,
            dropped=mean(self._dropped_counts) if ldb is not None and self._dropped_counts else None,
            candidates=len(ldb.candidate_layers) if ldb is not None else None,
            seconds=self._timer.stop(),
            train_loss=_as_float(metrics.get("train_loss")),
            monitored=_as_float(metrics.get(self.monitor)) if self._validated else None,
        )
        self.records.append(record)
        pl_module.log("epoch_time", record.seconds, on_step=False, on_epoch=True, sync_dist=True)
        if self.live and trainer.is_global_zero:
            if len(self.records) == 1:
                print(self._header(), flush=True)
            print(self._row(record), flush=True)

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.is_global_zero and self.records:
            print(self.format_report(include_table=not self.live), flush=True)

    # ------------------------------------------------------------------ formatting
    def _header(self) -> str:
        return (
            f"{'epoch':>5}  {'mode':<4}  {'batch':>5}  {'steps':>5}  {'dropped':>9}  {'time (s)':>8}"
            f"  {'train_loss':>10}  {self.monitor:>10}"
        )

    def _row(self, record: EpochRecord) -> str:
        if record.dropped is None:
            dropped = "-"
        else:
            count = f"{record.dropped:.0f}" if record.dropped == int(record.dropped) else f"{record.dropped:.1f}"
            dropped = f"{count}/{record.candidates}"
        return (
            f"{record.epoch:>5}  {record.mode:<4}  {_fmt(record.batch_size, 'd'):>5}  {record.steps:>5}"
            f"  {dropped:>9}  {record.seconds:>8.2f}  {_fmt(record.train_loss, '.4f'):>10}"
            f"  {_fmt(record.monitored, '.4f'):>10}"
        )

    def format_report(self, include_table: bool = True) -> str:
        """The per-epoch table (if ``include_table``) followed by a few summary lines."""
        lines = [""]
        if include_table:
            lines += ["LayerDropBack epoch summary", self._header(), *map(self._row, self.records), ""]
        lines += self._summary_lines()
        return "\n".join(lines)

    def _summary_lines(self) -> list[str]:
        records = self.records
        drop = [r for r in records if r.mode == "DROP"]
        all_full = [r for r in records if r.mode == "full"]
        # The first epoch pays one-off costs (worker start-up, allocator warm-up): compare the others,
        # unless it is the only full epoch there is.
        later_full = [r for r in all_full if r.epoch != records[0].epoch]
        full = later_full or all_full
        first_excluded = bool(later_full) and len(later_full) < len(all_full)
        lines = [
            f"Training time: {sum(r.seconds for r in records):.1f} s over {len(records)} epoch(s)"
            " (validation excluded)."
        ]
        if drop:
            counts = [r.dropped for r in drop if r.dropped is not None]
            dropped = mean(counts) if counts else 0.0
            line = (
                f"DROP epochs: {', '.join(str(r.epoch) for r in drop)} ({len(drop)} of {len(records)}),"
                f" {dropped:.1f} of {drop[0].candidates} candidate layers dropped on average,"
                f" {_steps(drop)}"
            )
            lines.append(line + (f" (full epochs: {_steps(all_full)})." if all_full else "."))
            if full:
                full_time, drop_time = mean(r.seconds for r in full), mean(r.seconds for r in drop)
                which = _full_epochs_label(full, first_excluded)
                saving = 1 - drop_time / full_time
                change = f"{100 * saving:.0f}% less" if saving >= 0 else f"{-100 * saving:.0f}% more"
                lines.append(
                    f"Mean epoch time: DROP {drop_time:.2f} s, full {full_time:.2f} s ({which}):"
                    f" DROP epochs took {change} time."
                )
        elif records and records[0].dropped is None:
            lines.append("No LayerDropBackCallback: every epoch was a full epoch (baseline).")
        scored = [r for r in records if r.monitored is not None]
        if scored:
            pick = max if self.mode == "max" else min
            best = pick(scored, key=lambda r: r.monitored)
            lines.append(
                f"{self.monitor}: best {best.monitored:.4f} (epoch {best.epoch}), last {scored[-1].monitored:.4f}."
            )
        return lines


def _full_epochs_label(full: list[EpochRecord], first_excluded: bool) -> str:
    """Which full epochs the mean is over, e.g. ``"first epoch excluded"``."""
    if first_excluded:
        return "first epoch excluded"
    if len(full) == 1:
        return f"epoch {full[0].epoch} only, including its one-off start-up costs"
    return "all full epochs"


def _steps(records: list[EpochRecord]) -> str:
    """``"23 steps of batch 64"``: the first epoch of ``records``, for the summary lines."""
    first = records[0]
    return f"{first.steps} steps of batch {_fmt(first.batch_size, 'd')}"


def _as_float(value: Any) -> Optional[float]:
    return None if value is None else float(value)


def _fmt(value: Any, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _ldb_callback(trainer: Trainer) -> Optional[LayerDropBackCallback]:
    return next((cb for cb in trainer.callbacks if isinstance(cb, LayerDropBackCallback)), None)
