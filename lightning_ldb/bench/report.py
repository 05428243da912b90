"""The benchmark's arithmetic and its Markdown: pure functions of recorded numbers, no torch, no clock.

Everything a report says is computed here from :class:`RunResult` records (which the runner fills in,
and which round-trip through the JSON output), so a report can be re-rendered, merged with the runs
of another invocation, and unit-tested with hand-computed numbers.

Vocabulary:

- *speed-up*: ``1 - T_ldb / T_baseline`` over total training time (validation excluded), the paper's
  measure: ``0.25`` means LDB trained in 25% less time.
- *warm-up epochs*: the first ``skip_epochs`` epochs of every run pay one-off costs (allocator,
  thread pools, caches). They count in total times, but not in the per-mode epoch statistics.
- *group*: the runs of one repetition inside one invocation. Runs are only ever compared with runs of
  the same group, which ran back to back on the same machine state.
- *clock*: ``"wall"`` (wall-clock seconds, what the issue and the paper measure) or ``"cpu"`` (the
  process's CPU seconds over the same span). On a machine shared with other jobs, CPU time is less
  disturbed by them than wall-clock time (with several threads it still counts time spent spinning);
  on a GPU it misses the device's work.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from statistics import mean, stdev
from typing import Any, Optional

from lightning_ldb.schedule import DROP, FULL

#: Identifies the JSON layout written by the benchmark.
SCHEMA = "lightning-ldb-bench/1"

#: Variant names the paired benchmark uses.
BASELINE = "baseline"
LDB = "ldb"
CALLBACK_ONLY = "callback-only"

#: The issue's targets: a DROP epoch at most this fraction of a full epoch's time, ...
TARGET_DROP_EPOCH_RATIO = 0.8
#: ... full epochs with the callback installed within this fraction of plain Lightning, ...
TARGET_OVERHEAD = 0.01
#: ... and the callback's own hooks under this many seconds per optimizer step.
TARGET_HOOK_SECONDS_PER_STEP = 1e-3


# ---------------------------------------------------------------------------------------------- numbers
def speedup(ldb_seconds: float, baseline_seconds: float) -> float:
    """The relative time saved by LDB: ``1 - ldb_seconds / baseline_seconds``.

    Args:
        ldb_seconds: Training time of the LDB run.
        baseline_seconds: Training time of the baseline run.

    Raises:
        ValueError: If ``baseline_seconds`` is not positive or ``ldb_seconds`` is negative.

    Example::

        >>> speedup(75.0, 100.0)
        0.25
        >>> speedup(110.0, 100.0)  # LDB slower: a negative speed-up
        -0.1
    """
    if not baseline_seconds > 0:
        raise ValueError(f"`baseline_seconds` must be > 0, got {baseline_seconds!r}.")
    if ldb_seconds < 0:
        raise ValueError(f"`ldb_seconds` must be >= 0, got {ldb_seconds!r}.")
    return round(1.0 - ldb_seconds / baseline_seconds, 12)


def throughput(samples: int, seconds: float) -> float:
    """Training samples per second.

    Raises:
        ValueError: If ``seconds`` is not positive or ``samples`` is negative.

    Example::

        >>> throughput(1024, 32.0)
        32.0
    """
    if not seconds > 0:
        raise ValueError(f"`seconds` must be > 0, got {seconds!r}.")
    if samples < 0:
        raise ValueError(f"`samples` must be >= 0, got {samples!r}.")
    return samples / seconds


@dataclass(frozen=True)
class Spread:
    """Summary of repeated measurements: count, mean, sample standard deviation, minimum and maximum.

    ``std`` is 0 for a single value.

    Example::

        >>> Spread.of([1.0, 2.0, 3.0])
        Spread(n=3, mean=2.0, std=1.0, min=1.0, max=3.0)
    """

    n: int
    mean: float
    std: float
    min: float
    max: float

    @classmethod
    def of(cls, values: Iterable[float]) -> Spread:
        """The spread of ``values``.

        Raises:
            ValueError: If ``values`` is empty.
        """
        values = [float(v) for v in values]
        if not values:
            raise ValueError("A spread needs at least one value.")
        return cls(len(values), mean(values), stdev(values) if len(values) > 1 else 0.0, min(values), max(values))

    def format(self, scale: float = 1.0, digits: int = 2, unit: str = "") -> str:
        """``mean ± std (min–max)``, each value times ``scale``; a single value prints alone.

        Example::

            >>> Spread.of([0.1, 0.3]).format(scale=100, digits=1, unit="%")
            '20.0 ± 14.1% (10.0–30.0%, n=2)'
        """

        def number(value: float) -> str:
            return f"{value * scale:.{digits}f}"

        if self.n == 1:
            return f"{number(self.mean)}{unit}"
        return (
            f"{number(self.mean)} ± {number(self.std)}{unit}"
            f" ({number(self.min)}–{number(self.max)}{unit}, n={self.n})"
        )


def optional_spread(values: Iterable[Optional[float]]) -> Optional[Spread]:
    """:meth:`Spread.of` the values that are not ``None``; ``None`` if there are none."""
    present = [v for v in values if v is not None]
    return Spread.of(present) if present else None


# ---------------------------------------------------------------------------------------------- records
#: The callback's hooks that run once per ``fit``: not part of the per-step cost.
ONCE_PER_FIT_HOOKS = frozenset({"setup", "on_fit_start", "on_train_start", "on_fit_end", "teardown"})
#: The callback's hooks that run once per epoch (or per validation run).
PER_EPOCH_HOOKS = frozenset({"on_train_epoch_start", "on_train_epoch_end", "on_validation_start", "on_validation_end"})


def hook_kind(hook: str) -> str:
    """``"fit"``, ``"epoch"`` or ``"step"``: how often a hook of the callback runs.

    Example::

        >>> [hook_kind(h) for h in ("setup", "on_train_epoch_end", "on_train_batch_start")]
        ['fit', 'epoch', 'step']
    """
    if hook in ONCE_PER_FIT_HOOKS:
        return "fit"
    if hook in PER_EPOCH_HOOKS:
        return "epoch"
    return "step"


@dataclass
class EpochResult:
    """One training epoch of one run."""

    epoch: int
    #: ``"full"`` or ``"drop"`` (:data:`~lightning_ldb.schedule.FULL`, :data:`~lightning_ldb.schedule.DROP`).
    mode: str
    #: Wall-clock seconds of the epoch's training, validation excluded.
    seconds: float
    #: Training samples seen.
    samples: int
    optimizer_steps: int
    #: Training batch size (``None`` if the loader had none).
    batch_size: Optional[int] = None
    #: Validation accuracy after the epoch (``None`` if validation did not run).
    val_acc: Optional[float] = None
    #: CPU seconds the process used over the same span (``None`` if not measured).
    cpu_seconds: Optional[float] = None

    def clock(self, clock: str) -> Optional[float]:
        """The epoch's time on ``clock`` (``"wall"`` or ``"cpu"``)."""
        return self.seconds if clock == "wall" else self.cpu_seconds


@dataclass
class RunResult:
    """One training run: a variant (baseline, LDB, ...) in one group (repetition)."""

    variant: str
    group: str
    epochs: list[EpochResult]
    #: The LDB callback's arguments (``None`` for the baseline).
    ldb: Optional[dict[str, Any]] = None
    #: Seconds spent in each of the LDB callback's hooks, and how often each ran (``None`` if not timed).
    hook_seconds: Optional[dict[str, float]] = None
    hook_calls: Optional[dict[str, int]] = None
    #: Position of the run within its group (runs of a group alternate their order between groups).
    order: int = 0
    #: 1-minute load average of the machine before and after the run (noise from other processes).
    load_before: Optional[float] = None
    load_after: Optional[float] = None

    @property
    def total_seconds(self) -> float:
        """Training time over all epochs, validation excluded."""
        return sum(e.seconds for e in self.epochs)

    @property
    def total_cpu_seconds(self) -> Optional[float]:
        """CPU time over all epochs, ``None`` unless every epoch has one."""
        if any(e.cpu_seconds is None for e in self.epochs):
            return None
        return sum(e.cpu_seconds for e in self.epochs)  # type: ignore[misc]

    def total(self, clock: str = "wall") -> Optional[float]:
        """:attr:`total_seconds` (``"wall"``) or :attr:`total_cpu_seconds` (``"cpu"``)."""
        return self.total_seconds if clock == "wall" else self.total_cpu_seconds

    @property
    def samples(self) -> int:
        return sum(e.samples for e in self.epochs)

    @property
    def optimizer_steps(self) -> int:
        return sum(e.optimizer_steps for e in self.epochs)

    @property
    def throughput(self) -> float:
        """Training samples per second over the whole run."""
        return throughput(self.samples, self.total_seconds)

    @property
    def final_val_acc(self) -> Optional[float]:
        scored = [e.val_acc for e in self.epochs if e.val_acc is not None]
        return scored[-1] if scored else None

    @property
    def best_val_acc(self) -> Optional[float]:
        scored = [e.val_acc for e in self.epochs if e.val_acc is not None]
        return max(scored) if scored else None

    def epoch_seconds(self, mode: str, skip_epochs: int = 0, clock: str = "wall") -> list[float]:
        """Times of this run's ``mode`` epochs on ``clock``, the first ``skip_epochs`` (warm-up) epochs left out."""
        times = [e.clock(clock) for e in self.epochs if e.mode == mode and e.epoch >= skip_epochs]
        return [t for t in times if t is not None]

    def timeline(self) -> list[tuple[float, Optional[float]]]:
        """``(training seconds so far, validation accuracy)`` at the end of each epoch.

        Example::

            >>> run = RunResult("x", "g", [EpochResult(0, "full", 2.0, 8, 1, val_acc=0.5),
            ...                            EpochResult(1, "drop", 1.0, 8, 1, val_acc=0.6)])
            >>> run.timeline()
            [(2.0, 0.5), (3.0, 0.6)]
        """
        points, elapsed = [], 0.0
        for e in self.epochs:
            elapsed += e.seconds
            points.append((elapsed, e.val_acc))
        return points

    def hook_seconds_per_step(self, kinds: Sequence[str] = ("step", "epoch")) -> Optional[float]:
        """The LDB callback's time in hooks of the given kinds (see :func:`hook_kind`), per optimizer step.

        The default, per-step hooks plus per-epoch hooks spread over the run's steps, is its recurring
        work per step; once-per-fit hooks (:data:`ONCE_PER_FIT_HOOKS`) are left out.
        """
        if self.hook_seconds is None or self.optimizer_steps == 0:
            return None
        return sum(s for hook, s in self.hook_seconds.items() if hook_kind(hook) in kinds) / self.optimizer_steps

    def hook_seconds_per_epoch(self) -> Optional[float]:
        """The LDB callback's per-epoch hook time (epoch start and end, validation start and end) per epoch."""
        if self.hook_seconds is None or not self.epochs:
            return None
        return sum(s for hook, s in self.hook_seconds.items() if hook_kind(hook) == "epoch") / len(self.epochs)

    def hook_time_share(self) -> Optional[float]:
        """The LDB callback's recurring hook time as a fraction of the run's training time.

        A noise-free estimate of the callback's overhead: the hooks are timed directly, so this does
        not depend on how busy the machine was between two runs.
        """
        if self.hook_seconds is None or self.total_seconds <= 0:
            return None
        return sum(s for hook, s in self.hook_seconds.items() if hook_kind(hook) != "fit") / self.total_seconds

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RunResult:
        """Rebuild a run from :meth:`to_dict`'s output (as read back from JSON).

        Raises:
            ValueError: If a field is missing.
        """
        try:
            epochs = [EpochResult(**e) for e in data["epochs"]]
            fields = {k: v for k, v in data.items() if k != "epochs"}
            return cls(epochs=epochs, **fields)
        except (KeyError, TypeError) as error:
            raise ValueError(f"Not a benchmark run record ({error}): {sorted(data)}") from error


# ---------------------------------------------------------------------------------------------- comparisons
def by_group(runs: Iterable[RunResult], variant: str) -> dict[str, RunResult]:
    """The runs of ``variant``, keyed by group (the last one wins if a group has two)."""
    return {run.group: run for run in runs if run.variant == variant}


def paired(runs: Sequence[RunResult], variant: str, reference: str) -> list[tuple[RunResult, RunResult]]:
    """``(run of variant, run of reference)`` for each group that has both, in group order."""
    ours, theirs = by_group(runs, variant), by_group(runs, reference)
    return [(ours[group], theirs[group]) for group in ours if group in theirs]


def drop_epoch_ratio(run: RunResult, skip_epochs: int = 0, clock: str = "wall") -> Optional[float]:
    """Mean DROP-epoch time over mean full-epoch time within one run (warm-up epochs left out).

    ``None`` if the run has no DROP epoch or no full epoch after the warm-up.

    Example::

        >>> run = RunResult("ldb", "g", [EpochResult(0, "full", 9.0, 8, 2), EpochResult(1, "full", 4.0, 8, 2),
        ...                              EpochResult(2, "drop", 3.0, 8, 1)])
        >>> drop_epoch_ratio(run, skip_epochs=1)
        0.75
    """
    drop, full = run.epoch_seconds(DROP, skip_epochs, clock), run.epoch_seconds(FULL, skip_epochs, clock)
    if not drop or not full:
        return None
    return mean(drop) / mean(full)


def _paired_mean_ratio(pairs: Sequence[tuple[Optional[float], Optional[float]]]) -> Optional[float]:
    complete = [(a, b) for a, b in pairs if a is not None and b is not None]
    if not complete:
        return None
    return mean(a for a, _ in complete) / mean(b for _, b in complete)


def drop_vs_reference_ratio(run: RunResult, reference: RunResult, clock: str = "wall") -> Optional[float]:
    """Mean time of ``run``'s DROP epochs over the mean time of the *same* epochs in ``reference``.

    The reference (the baseline) ran those epoch indices as full epochs, in the same group: this
    ratio needs no warm-up exclusion and is immune to slow drift between early and late epochs.
    """
    reference_epochs = {e.epoch: e for e in reference.epochs}
    return _paired_mean_ratio(
        [
            (e.clock(clock), reference_epochs[e.epoch].clock(clock))
            for e in run.epochs
            if e.mode == DROP and e.epoch in reference_epochs
        ]
    )


def full_epoch_overhead(
    run: RunResult, reference: RunResult, skip_epochs: int = 0, clock: str = "wall"
) -> Optional[float]:
    """Relative extra time of ``run``'s full epochs over the same epochs of ``reference``: ``T/T_ref - 1``.

    Only epochs that are full in both runs and not warm-up epochs count.

    Example::

        >>> a = RunResult("callback-only", "g", [EpochResult(0, "full", 9.0, 8, 2), EpochResult(1, "full", 10.1, 8, 2)])
        >>> b = RunResult("baseline", "g", [EpochResult(0, "full", 9.0, 8, 2), EpochResult(1, "full", 10.0, 8, 2)])
        >>> round(full_epoch_overhead(a, b, skip_epochs=1), 6)
        0.01
    """
    reference_full = {e.epoch: e for e in reference.epochs if e.mode == FULL and e.epoch >= skip_epochs}
    ratio = _paired_mean_ratio(
        [
            (e.clock(clock), reference_full[e.epoch].clock(clock))
            for e in run.epochs
            if e.mode == FULL and e.epoch in reference_full
        ]
    )
    return None if ratio is None else ratio - 1.0


def flop_accounting(full_step: float, full_batch: int, drop_step: float, drop_batch: int) -> dict[str, float]:
    """What the FLOP counts of a full and a DROP training step predict.

    Steps on DROP epochs use ``batch_scale`` times more samples, so steps are compared per sample.

    Args:
        full_step: FLOPs of one full training step (forward and backward) on ``full_batch`` samples.
        full_batch: Samples in a full step.
        drop_step: FLOPs of one DROP step on ``drop_batch`` samples.
        drop_batch: Samples in a DROP step.

    Returns:
        ``full_per_sample`` and ``drop_per_sample`` (FLOPs), ``per_sample_ratio`` (DROP over full: the
        DROP-epoch time ratio the FLOPs allow) and ``saving`` (``1 - per_sample_ratio``).

    Raises:
        ValueError: If a count is not positive.

    Example::

        >>> flop_accounting(full_step=300.0, full_batch=1, drop_step=480.0, drop_batch=2)
        {'full_per_sample': 300.0, 'drop_per_sample': 240.0, 'per_sample_ratio': 0.8, 'saving': 0.2}
    """
    for name, value in (
        ("full_step", full_step),
        ("full_batch", full_batch),
        ("drop_step", drop_step),
        ("drop_batch", drop_batch),
    ):
        if not value > 0:
            raise ValueError(f"`{name}` must be > 0, got {value!r}.")
    full_per_sample, drop_per_sample = full_step / full_batch, drop_step / drop_batch
    ratio = drop_per_sample / full_per_sample
    return {
        "full_per_sample": full_per_sample,
        "drop_per_sample": drop_per_sample,
        "per_sample_ratio": ratio,
        "saving": round(1.0 - ratio, 12),
    }


def flop_predicted_speedup(epoch_modes: Sequence[str], per_sample_ratio: float) -> float:
    """The speed-up the FLOPs allow over a schedule of equally long epochs.

    Example::

        >>> flop_predicted_speedup(["full", "full", "drop", "full", "drop"], per_sample_ratio=0.5)
        0.2
    """
    if not epoch_modes:
        raise ValueError("`epoch_modes` must not be empty.")
    drops = sum(1 for mode in epoch_modes if mode == DROP)
    return round(drops * (1.0 - per_sample_ratio) / len(epoch_modes), 12)


# ---------------------------------------------------------------------------------------------- summaries
def summarize_variant(runs: Sequence[RunResult], skip_epochs: int) -> dict[str, Any]:
    """Spreads over the repeated runs of one variant: total time, throughput, steps, epochs by mode, accuracy."""
    summary: dict[str, Any] = {
        "runs": len(runs),
        "total_seconds": Spread.of(r.total_seconds for r in runs),
        "throughput": Spread.of(r.throughput for r in runs),
        "optimizer_steps": Spread.of(r.optimizer_steps for r in runs),
        "samples": Spread.of(r.samples for r in runs),
        "final_val_acc": optional_spread(r.final_val_acc for r in runs),
        "best_val_acc": optional_spread(r.best_val_acc for r in runs),
        "hook_seconds_per_step": optional_spread(r.hook_seconds_per_step() for r in runs),
        "step_hook_seconds_per_step": optional_spread(r.hook_seconds_per_step(kinds=("step",)) for r in runs),
        "hook_seconds_per_epoch": optional_spread(r.hook_seconds_per_epoch() for r in runs),
        "hook_time_share": optional_spread(r.hook_time_share() for r in runs),
        "total_cpu_seconds": optional_spread(r.total_cpu_seconds for r in runs),
        "load": optional_spread(x for r in runs for x in (r.load_before, r.load_after)),
    }
    for clock, suffix in CLOCKS.items():
        for mode in (FULL, DROP):
            times = [t for r in runs for t in r.epoch_seconds(mode, skip_epochs, clock)]
            summary[f"{mode}_epoch{suffix}_seconds"] = Spread.of(times) if times else None
        summary[f"drop_epoch_ratio{suffix}"] = optional_spread(drop_epoch_ratio(r, skip_epochs, clock) for r in runs)
    return summary


#: Each clock and the suffix of its keys in a summary (``speedup``, ``speedup_cpu``, ...).
CLOCKS = {"wall": "", "cpu": "_cpu"}


def compare_to_baseline(runs: Sequence[RunResult], variant: str, skip_epochs: int) -> dict[str, Any]:
    """Paired comparison of ``variant`` with the baseline, group by group.

    Returns spreads (over groups) of the speed-up, of the DROP-epoch time over the same epochs of the
    baseline, of the full-epoch overhead, and of the accuracy differences (``None`` where undefined).
    """
    pairs = paired(runs, variant, BASELINE)
    if not pairs:
        return {"pairs": 0}

    def accuracy_gap(ours: Optional[float], theirs: Optional[float]) -> Optional[float]:
        return None if ours is None or theirs is None else ours - theirs

    def paired_speedup(ours: Optional[float], theirs: Optional[float]) -> Optional[float]:
        return None if ours is None or not theirs else speedup(ours, theirs)

    comparison: dict[str, Any] = {
        "pairs": len(pairs),
        "final_val_acc_gap": optional_spread(accuracy_gap(a.final_val_acc, b.final_val_acc) for a, b in pairs),
        "best_val_acc_gap": optional_spread(accuracy_gap(a.best_val_acc, b.best_val_acc) for a, b in pairs),
    }
    for clock, suffix in CLOCKS.items():
        comparison[f"speedup{suffix}"] = optional_spread(
            paired_speedup(a.total(clock), b.total(clock)) for a, b in pairs
        )
        comparison[f"drop_vs_baseline_ratio{suffix}"] = optional_spread(
            drop_vs_reference_ratio(a, b, clock) for a, b in pairs
        )
        comparison[f"full_epoch_overhead{suffix}"] = optional_spread(
            full_epoch_overhead(a, b, skip_epochs, clock) for a, b in pairs
        )
    return comparison


def check_targets(summary: dict[str, Any]) -> list[dict[str, Any]]:
    """The issue's three targets, each with the measured value, the limit and whether it is met.

    A target whose measurement is missing from ``summary`` (e.g. no ``callback-only`` run) is left out.
    """
    variants, comparisons = summary["variants"], summary["comparisons"]
    targets = []
    ldb = variants.get(LDB, {})
    for suffix, label in (("", "wall-clock"), ("_cpu", "CPU time")):
        if ldb.get(f"drop_epoch_ratio{suffix}") is not None:
            targets.append(
                _target(
                    f"DROP-epoch / full-epoch time, same LDB run ({label})",
                    ldb[f"drop_epoch_ratio{suffix}"],
                    TARGET_DROP_EPOCH_RATIO,
                    "x",
                )
            )
    for suffix, label in (("", "wall-clock"), ("_cpu", "CPU time")):
        overhead = comparisons.get(CALLBACK_ONLY, {}).get(f"full_epoch_overhead{suffix}")
        if overhead is not None:
            # "Within 1%": a large difference either way says the comparison could not show the overhead.
            targets.append(
                _target(
                    f"full epochs with the callback installed vs plain Lightning ({label})",
                    overhead,
                    TARGET_OVERHEAD,
                    "%",
                    two_sided=True,
                )
            )
    installed = variants.get(CALLBACK_ONLY) or variants.get(LDB)
    if installed is not None and installed["hook_time_share"] is not None:
        targets.append(
            _target(
                "the callback's hook time as a share of training time (hooks timed directly)",
                installed["hook_time_share"],
                TARGET_OVERHEAD,
                "%",
            )
        )
    for key, label in (
        ("step_hook_seconds_per_step", "the callback's per-step hooks, per optimizer step"),
        ("hook_seconds_per_step", "the same plus its per-epoch hooks spread over the run's steps"),
    ):
        hooks = [variants[v][key] for v in variants if variants[v].get(key) is not None]
        if hooks:
            targets.append(_target(label, max(hooks, key=lambda s: s.max), TARGET_HOOK_SECONDS_PER_STEP, "ms"))
    return targets


def _target(name: str, value: Spread, limit: float, unit: str, two_sided: bool = False) -> dict[str, Any]:
    # The mean decides; whether every repetition met it says how robust the verdict is.
    if two_sided:
        met, met_by_all = abs(value.mean) <= limit, max(abs(value.min), abs(value.max)) <= limit
    else:
        met, met_by_all = value.mean <= limit, value.max <= limit
    return {
        "target": name,
        "measured": value,
        "limit": limit,
        "unit": unit,
        "two_sided": two_sided,
        "met": met,
        "met_by_all": met_by_all,
    }


def summarize(runs: Sequence[RunResult], skip_epochs: int = 1) -> dict[str, Any]:
    """Everything the report prints about ``runs``: per-variant spreads, comparisons and target checks.

    Args:
        runs: All runs of one or more invocations (merged).
        skip_epochs: Warm-up epochs left out of the per-mode epoch statistics.

    Raises:
        ValueError: If ``runs`` is empty or ``skip_epochs`` is negative.
    """
    if not runs:
        raise ValueError("No runs to summarize.")
    if skip_epochs < 0:
        raise ValueError(f"`skip_epochs` must be >= 0, got {skip_epochs!r}.")
    variants = list(dict.fromkeys(run.variant for run in runs))
    summary: dict[str, Any] = {
        "skip_epochs": skip_epochs,
        "variants": {v: summarize_variant([r for r in runs if r.variant == v], skip_epochs) for v in variants},
        "comparisons": {v: compare_to_baseline(runs, v, skip_epochs) for v in variants if v != BASELINE},
    }
    summary["targets"] = check_targets(summary)
    return summary


def to_jsonable(value: Any) -> Any:
    """``value`` with every :class:`Spread` turned into a dict and every NaN/inf into ``None`` (strict JSON)."""
    if isinstance(value, Spread):
        return to_jsonable(asdict(value))
    if isinstance(value, dict):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_jsonable(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def spread_from_json(value: Optional[dict[str, Any]]) -> Optional[Spread]:
    """The inverse of :func:`to_jsonable` for one spread."""
    return None if value is None else Spread(**value)


# ---------------------------------------------------------------------------------------------- Markdown
@dataclass
class _Table:
    header: list[str]
    rows: list[list[str]] = field(default_factory=list)

    def render(self) -> str:
        lines = ["| " + " | ".join(self.header) + " |", "|" + "|".join(" --- " for _ in self.header) + "|"]
        lines += ["| " + " | ".join(row) + " |" for row in self.rows]
        return "\n".join(lines)


def _fmt(spread: Optional[Spread], scale: float = 1.0, digits: int = 2, unit: str = "") -> str:
    return "–" if spread is None else spread.format(scale=scale, digits=digits, unit=unit)


def _fmt_value(value: Optional[float], spec: str) -> str:
    return "–" if value is None else format(value, spec)


def _target_value(target: dict[str, Any]) -> tuple[str, str]:
    measured, limit, unit = target["measured"], target["limit"], target["unit"]
    if unit == "%":
        return _fmt(measured, 100, 2, "%"), f"{'within ±' if target.get('two_sided') else '<= '}{limit * 100:g}%"
    if unit == "ms":
        return _fmt(measured, 1e3, 3, " ms"), f"< {limit * 1e3:g} ms"
    return _fmt(measured, 1, 3, "x"), f"<= {limit:g}x"


def render_markdown(report: dict[str, Any]) -> str:
    """The Markdown report of a paired benchmark (``report["kind"] == "paired"``), from its JSON form.

    Args:
        report: The dict the benchmark writes as JSON (spreads as dicts or as :class:`Spread`).
    """
    summary = _spreads(report["summary"])
    config, environment, flops = report["config"], report.get("environment", {}), report.get("flops") or {}
    runs = [RunResult.from_dict(r) for r in report["runs"]]
    skip = summary["skip_epochs"]
    lines = ["# LayerDropBack benchmark", ""]
    lines += _setup_lines(config, environment)
    merged = report.get("merged_from")
    if merged:
        dates = ", ".join(str(m.get("date")) for m in merged if m.get("kind") != "profile")
        lines[-1:-1] = [
            f"- Runs pooled from {sum(1 for m in merged if m.get('kind') != 'profile')} invocations ({dates})."
        ]

    table = _Table(
        [
            "run",
            "runs",
            "train time (s)",
            "samples/s",
            "optimizer steps",
            "full epoch (s)",
            "DROP epoch (s)",
            "DROP / full",
            "final val acc",
            "best val acc",
        ]
    )
    for name, s in summary["variants"].items():
        table.rows.append(
            [
                name,
                str(s["runs"]),
                _fmt(s["total_seconds"], digits=1),
                _fmt(s["throughput"], digits=1),
                _fmt(s["optimizer_steps"], digits=0),
                _fmt(s["full_epoch_seconds"]),
                _fmt(s["drop_epoch_seconds"]),
                _fmt(s["drop_epoch_ratio"], digits=3),
                _fmt(s["final_val_acc"], 100, 1, "%"),
                _fmt(s["best_val_acc"], 100, 1, "%"),
            ]
        )
    lines += [
        "## Results (wall-clock)",
        "",
        f"Values are mean ± standard deviation (min–max, n) over repetitions; epoch statistics leave out the first"
        f" {skip} (warm-up) epoch(s) of each run. Training time excludes validation.",
        "",
        table.render(),
        "",
    ]
    if any(s["total_cpu_seconds"] is not None for s in summary["variants"].values()):
        cpu_table = _Table(
            [
                "run",
                "train CPU time (s)",
                "full epoch CPU (s)",
                "DROP epoch CPU (s)",
                "DROP / full (CPU)",
                "load average during runs",
            ]
        )
        for name, s in summary["variants"].items():
            cpu_table.rows.append(
                [
                    name,
                    _fmt(s["total_cpu_seconds"], digits=1),
                    _fmt(s["full_epoch_cpu_seconds"]),
                    _fmt(s["drop_epoch_cpu_seconds"]),
                    _fmt(s["drop_epoch_ratio_cpu"], digits=3),
                    _fmt(s["load"], digits=2),
                ]
            )
        lines += [
            "## Results (process CPU time)",
            "",
            "The process's CPU seconds over the same spans. Other jobs on a shared machine stretch wall-clock time"
            " but barely change the CPU time a computation needs (spinning thread pools excepted), so where the two"
            " disagree, CPU time is the steadier measure of the work saved. On a GPU it misses the device's work.",
            "",
            cpu_table.render(),
            "",
        ]

    comparison_table = _Table(
        [
            "run vs baseline",
            "pairs",
            "speed-up 1 - T/T_base",
            "speed-up (CPU time)",
            "DROP epochs vs same baseline epochs",
            "full-epoch overhead",
            "full-epoch overhead (CPU)",
            "final acc gap (points)",
        ]
    )
    for name, c in summary["comparisons"].items():
        if c["pairs"] == 0:
            continue
        comparison_table.rows.append(
            [
                name,
                str(c["pairs"]),
                _fmt(c["speedup"], 100, 1, "%"),
                _fmt(c["speedup_cpu"], 100, 1, "%"),
                _fmt(c["drop_vs_baseline_ratio"], digits=3),
                _fmt(c["full_epoch_overhead"], 100, 2, "%"),
                _fmt(c["full_epoch_overhead_cpu"], 100, 2, "%"),
                _fmt(c["final_val_acc_gap"], 100, 1),
            ]
        )
    if comparison_table.rows:
        lines += [
            "## Paired comparison",
            "",
            "Each run is compared with the baseline run of its own repetition.",
            "",
            comparison_table.render(),
            "",
        ]

    if flops:
        lines += _flop_lines(flops, summary)

    hook_lines = _hook_lines(runs)
    if hook_lines:
        lines += hook_lines

    if summary["targets"]:
        target_table = _Table(["target", "measured", "limit", "met (mean)", "met by every repetition"])
        for t in summary["targets"]:
            measured, limit = _target_value(t)
            target_table.rows.append(
                [t["target"], measured, limit, "yes" if t["met"] else "**no**", "yes" if t["met_by_all"] else "no"]
            )
        lines += ["## Targets", "", target_table.render(), ""]

    profile = report.get("profile")
    if profile:
        lines += render_profile_markdown(profile)

    lines += ["## Epochs", "", _epoch_table(runs).render(), ""]
    return "\n".join(lines).rstrip() + "\n"


def _setup_lines(config: dict[str, Any], environment: dict[str, Any]) -> list[str]:
    ldb = config.get("ldb", {})
    data = (
        f"synthetic {config.get('channels', 3)}x{config.get('image_size')}x{config.get('image_size')} images,"
        f" {config.get('num_classes')} classes, {config.get('train_samples')} training and"
        f" {config.get('val_samples')} validation samples"
    )
    lines = [
        f"- Model: `{config.get('model')}`; data: {data}.",
        f"- {config.get('epochs')} epochs, batch {config.get('batch_size')}, SGD lr {config.get('lr')} (momentum 0.9,"
        f" cosine annealing), seed {config.get('seed')}.",
        "- LDB: " + ", ".join(f"{k}={v}" for k, v in ldb.items()) + ".",
    ]
    if environment:
        lines.append(
            f"- Hardware: {environment.get('device')}; {environment.get('cpu')} ({environment.get('cpu_count')} cores,"
            f" {environment.get('torch_threads')} torch threads). torch {environment.get('torch')},"
            f" lightning {environment.get('lightning')}, Python {environment.get('python')}."
        )
        if environment.get("note"):
            lines.append(f"- {environment['note']}")
    return lines + [""]


def _flop_lines(flops: dict[str, Any], summary: dict[str, Any]) -> list[str]:
    table = _Table(
        [
            "run",
            "full step GFLOPs (batch)",
            "DROP step GFLOPs (batch)",
            "DROP / full per sample",
            "each DROP epoch's draw",
            "FLOP-predicted speed-up",
            "measured DROP / full time (wall, CPU)",
            "measured speed-up (wall, CPU)",
        ]
    )
    for name, f in flops.items():
        if f.get("drop_step") is None:
            continue
        variant, comparison = summary["variants"].get(name, {}), summary["comparisons"].get(name, {})
        full_per_sample = f["full_step"] / f["full_batch"]
        each = ", ".join(
            f"e{epoch}: {flops_each / f['drop_batch'] / full_per_sample:.3f}"
            for epoch, flops_each in zip(f.get("drop_epochs", []), f.get("drop_step_each", []))
        )
        table.rows.append(
            [
                name,
                f"{f['full_step'] / 1e9:.1f} ({f['full_batch']})",
                f"{f['drop_step'] / 1e9:.1f} ({f['drop_batch']})",
                f"{f['per_sample_ratio']:.3f}",
                each or "–",
                f"{f['predicted_speedup'] * 100:.1f}%",
                f"{_fmt(variant.get('drop_epoch_ratio'), digits=3)};"
                f" {_fmt(variant.get('drop_epoch_ratio_cpu'), digits=3)}",
                f"{_fmt(comparison.get('speedup'), 100, 1, '%')}; {_fmt(comparison.get('speedup_cpu'), 100, 1, '%')}",
            ]
        )
    if not table.rows:
        return []
    return [
        "## FLOPs",
        "",
        "Forward and backward FLOPs of one training step (`torch.utils.flop_counter`; the optimizer update is not"
        " counted), with the layers the callback drops on each DROP epoch of the run (mean over those epochs).",
        "",
        table.render(),
        "",
    ]


def _hook_lines(runs: Sequence[RunResult]) -> list[str]:
    timed = [r for r in runs if r.hook_seconds]
    if not timed:
        return []
    hooks = list(dict.fromkeys(h for r in timed for h in r.hook_seconds or {}))
    table = _Table(["hook", "runs once per", "calls per run", "µs per call", "µs per optimizer step"])
    for hook in hooks:
        calls = Spread.of((r.hook_calls or {}).get(hook, 0) for r in timed)
        per_call = optional_spread(
            (r.hook_seconds or {})[hook] / (r.hook_calls or {})[hook] for r in timed if (r.hook_calls or {}).get(hook)
        )
        kind = hook_kind(hook)
        per_step = Spread.of((r.hook_seconds or {}).get(hook, 0.0) / r.optimizer_steps for r in timed)
        table.rows.append(
            [
                f"`{hook}`",
                kind,
                _fmt(calls, digits=0),
                _fmt(per_call, 1e6, 1),
                "(not recurring)" if kind == "fit" else _fmt(per_step, 1e6, 1),
            ]
        )
    total = Spread.of(r.hook_seconds_per_step() or 0.0 for r in timed)
    table.rows.append(["**recurring work per step**", "step + epoch", "", "", f"**{_fmt(total, 1e6, 1)}**"])
    return [
        "## The callback's own work",
        "",
        "Time spent inside the LDB callback's hooks (its Lightning hooks, and the optimizer step pre/post hooks that"
        f" scale the learning rate), over the {len(timed)} run(s) that installed it. The recurring work per step"
        " adds the per-epoch hooks spread over the run's optimizer steps; once-per-fit hooks are listed but not"
        " counted in it.",
        "",
        table.render(),
        "",
    ]


def _epoch_table(runs: Sequence[RunResult]) -> _Table:
    epochs = sorted({e.epoch for r in runs for e in r.epochs})
    table = _Table(["epoch"] + [f"{r.variant} [{r.group}]" for r in runs])
    for epoch in epochs:
        row = [str(epoch)]
        for run in runs:
            record = next((e for e in run.epochs if e.epoch == epoch), None)
            if record is None:
                row.append("")
                continue
            mode = "DROP" if record.mode == DROP else "full"
            batch, accuracy = _fmt_value(record.batch_size, "d"), _fmt_value(record.val_acc, ".3f")
            row.append(f"{record.seconds:.2f} s {mode} b{batch} acc {accuracy}")
        table.rows.append(row)
    return table


def render_profile_markdown(profile: dict[str, Any]) -> list[str]:
    """Markdown lines for the per-phase step profile (see :mod:`lightning_ldb.bench.phases`)."""
    lines = ["## Step profile", ""]
    for key, label in (("cpu_seconds", "process CPU time"), ("seconds", "wall-clock")):
        if not all(key in row for row in profile["rows"]):
            continue
        table = _Table(
            [
                "step",
                "batch",
                "forward (ms)",
                "backward (ms)",
                "optimizer (ms)",
                "total (ms)",
                "ms per sample",
                "GFLOPs per sample",
            ]
        )
        for row in profile["rows"]:
            phases = {k: spread_from_json(v) if isinstance(v, dict) else v for k, v in row[key].items()}
            flops = row.get("flops_per_sample")
            table.rows.append(
                [
                    row["name"],
                    str(row["batch"]),
                    _fmt(phases["forward"], 1e3, 1),
                    _fmt(phases["backward"], 1e3, 1),
                    _fmt(phases["optimizer"], 1e3, 1),
                    _fmt(phases["total"], 1e3, 1),
                    f"{phases['total'].mean * 1e3 / row['batch']:.2f}",
                    "–" if flops is None else f"{flops / 1e9:.3f}",
                ]
            )
        lines += [
            f"Per-phase {label} of single training steps ({profile.get('steps')} timed steps per row, interleaved),"
            f" with the layers dropped on epoch {profile.get('drop_epoch')}:",
            "",
            table.render(),
            "",
        ]
    ops = profile.get("backward_ops")
    if ops:
        op_table = _Table(["backward op", "full (ms)", "DROP (ms)", "DROP / full"])
        for op in ops:
            ratio = op["drop"] / op["full"] if op["full"] else float("nan")
            op_table.rows.append(
                [f"`{op['name']}`", f"{op['full'] * 1e3:.1f}", f"{op['drop'] * 1e3:.1f}", f"{ratio:.2f}"]
            )
        lines += [
            "Self CPU time of the heaviest backward ops in one step (torch.profiler), at the DROP batch size:",
            "",
            op_table.render(),
            "",
        ]
    for note in profile.get("notes", []):
        lines.append(f"- {note}")
    return lines + ([""] if profile.get("notes") else [])


def render_profile_report(report: dict[str, Any]) -> str:
    """The Markdown of a profile-only result: setup, FLOPs and the step profile."""
    lines = ["# LayerDropBack step profile", ""] + _setup_lines(report["config"], report.get("environment", {}))
    lines += _flop_lines(report.get("flops") or {}, {"variants": {}, "comparisons": {}})
    lines += render_profile_markdown(report["profile"])
    return "\n".join(lines).rstrip() + "\n"


def _spreads(value: Any) -> Any:
    """Turn the dicts that :func:`to_jsonable` made of spreads back into :class:`Spread` objects."""
    if isinstance(value, dict):
        if set(value) == {"n", "mean", "std", "min", "max"}:
            return Spread(**value)
        return {k: _spreads(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_spreads(v) for v in value]
    return value


# ---------------------------------------------------------------------------------------------- sweeps
def sweep_rows(report: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per swept value: speed-up, DROP/full time, FLOP ratio and accuracy against the baseline.

    Args:
        report: A sweep report (``report["kind"] == "sweep"``) whose ``sweep`` entry maps each
            variant name to its swept value.
    """
    summary = _spreads(report["summary"])
    flops = report.get("flops") or {}
    runs = [RunResult.from_dict(r) for r in report["runs"]]
    rows = []
    for variant, value in report["sweep"]["variants"].items():
        stats, comparison = summary["variants"].get(variant), summary["comparisons"].get(variant, {})
        if stats is None:
            continue
        flop = flops.get(variant) or {}
        modes = next((run.epochs for run in runs if run.variant == variant), [])
        ratio = stats["drop_epoch_ratio"]
        rows.append(
            {
                "value": value,
                "variant": variant,
                "speedup": comparison.get("speedup"),
                "speedup_cpu": comparison.get("speedup_cpu"),
                "drop_epoch_ratio": stats["drop_epoch_ratio"],
                "drop_epoch_ratio_cpu": stats.get("drop_epoch_ratio_cpu"),
                # What the run's own DROP/full ratio implies over its schedule: immune to the drift
                # between the baseline run and this one, which a single baseline per sweep cannot average out.
                "implied_speedup": (
                    flop_predicted_speedup([e.mode for e in modes], ratio.mean) if ratio is not None and modes else None
                ),
                "flop_per_sample_ratio": flop.get("per_sample_ratio"),
                "flop_predicted_speedup": flop.get("predicted_speedup"),
                "final_val_acc": stats["final_val_acc"],
                "best_val_acc": stats["best_val_acc"],
                "final_val_acc_gap": comparison.get("final_val_acc_gap"),
            }
        )
    return rows


def render_sweep_markdown(report: dict[str, Any]) -> str:
    """The Markdown report of a sweep: the setup, one row per swept value, then the baseline."""
    key = report["sweep"]["key"]
    summary = _spreads(report["summary"])
    lines = [f"# LayerDropBack sweep over `{key}`", ""] + _setup_lines(report["config"], report.get("environment", {}))
    values = ", ".join(str(v) for v in report["sweep"]["variants"].values())
    lines[-1:-1] = [f"- Swept: `{key}` over {values}; the other LDB settings as above."]
    table = _Table(
        [
            key,
            "speed-up",
            "speed-up (CPU time)",
            "DROP / full epoch time",
            "DROP / full (CPU time)",
            "speed-up implied by DROP / full",
            "FLOPs DROP / full per sample",
            "FLOP-predicted speed-up",
            "final val acc",
            "best val acc",
            "final acc gap (points)",
        ]
    )
    for row in sweep_rows(report):
        table.rows.append(
            [
                str(row["value"]),
                _fmt(row["speedup"], 100, 1, "%"),
                _fmt(row["speedup_cpu"], 100, 1, "%"),
                _fmt(row["drop_epoch_ratio"], digits=3),
                _fmt(row["drop_epoch_ratio_cpu"], digits=3),
                "–" if row["implied_speedup"] is None else f"{row['implied_speedup'] * 100:.1f}%",
                _fmt_value(row["flop_per_sample_ratio"], ".3f"),
                "–" if row["flop_predicted_speedup"] is None else f"{row['flop_predicted_speedup'] * 100:.1f}%",
                _fmt(row["final_val_acc"], 100, 1, "%"),
                _fmt(row["best_val_acc"], 100, 1, "%"),
                _fmt(row["final_val_acc_gap"], 100, 1),
            ]
        )
    baseline = summary["variants"].get(BASELINE)
    lines += [
        "Speed-ups compare each LDB run with the sweep's single baseline run, so drift of the machine's speed"
        " between runs goes straight into them; the implied speed-up uses only the run's own DROP and full"
        " epochs (the warm-up epoch left out) and the schedule.",
        "",
        table.render(),
        "",
    ]
    if baseline is not None:
        lines += [
            f"Baseline: training time {_fmt(baseline['total_seconds'], digits=1)} s, final val acc"
            f" {_fmt(baseline['final_val_acc'], 100, 1, '%')}, best {_fmt(baseline['best_val_acc'], 100, 1, '%')}.",
            "",
        ]
    runs = [RunResult.from_dict(r) for r in report["runs"]]
    lines += ["## Epochs", "", _epoch_table(runs).render(), ""]
    return "\n".join(lines).rstrip() + "\n"
