"""Tables and plots drawn from the benchmark's JSON, by small pure functions.

The attribution table has one row per variant: whole-run time, DROP-epoch / full-epoch time (within
the run, warm-up epochs left out), optimizer steps, final accuracy, and the speed-up
``1 - T_variant / T_baseline`` against the baseline of the same repetition. Each cell is the mean
over repetitions with the range (min-max) beside it.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Optional

from lightning_ldb.schedule import DROP, FULL


def speedup(ldb_seconds: float, baseline_seconds: float) -> float:
    """The relative time saved against the baseline: ``1 - ldb_seconds / baseline_seconds``.

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


def spread(values: Sequence[float]) -> Optional[dict[str, float]]:
    """``{"mean", "min", "max", "n"}`` of ``values``; ``None`` if there are none.

    Example::

        >>> spread([1.0, 3.0])
        {'mean': 2.0, 'min': 1.0, 'max': 3.0, 'n': 2}
    """
    if not values:
        return None
    return {"mean": statistics.fmean(values), "min": min(values), "max": max(values), "n": len(values)}


def drop_to_full_ratio(epochs: Sequence[dict[str, Any]], skip_epochs: int) -> Optional[float]:
    """Mean DROP-epoch seconds over mean full-epoch seconds of one run, the first ``skip_epochs`` left out.

    Example::

        >>> drop_to_full_ratio([{"epoch": 0, "mode": "full", "seconds": 9.0}, {"epoch": 1, "mode": "full",
        ...     "seconds": 4.0}, {"epoch": 2, "mode": "drop", "seconds": 3.0}], skip_epochs=1)
        0.75
    """
    timed = [e for e in epochs if e["epoch"] >= skip_epochs]
    drop = [e["seconds"] for e in timed if e["mode"] == DROP]
    full = [e["seconds"] for e in timed if e["mode"] == FULL]
    return statistics.fmean(drop) / statistics.fmean(full) if drop and full else None


def summarize(result: dict[str, Any]) -> list[dict[str, Any]]:
    """The attribution table's rows, from :func:`~lightning_ldb.bench.runner.run_benchmark`'s result.

    Each run is compared with the baseline of its own repetition; without a baseline, ``speedup`` is ``None``.
    """
    skip = result["config"]["skip_epochs"]
    baseline = {run["repeat"]: run_seconds(run) for run in result["runs"] if run["variant"] == "baseline"}
    rows = []
    for variant in dict.fromkeys(run["variant"] for run in result["runs"]):
        runs = [run for run in result["runs"] if run["variant"] == variant]
        ratios = [r for r in (drop_to_full_ratio(run["epochs"], skip) for run in runs) if r is not None]
        speedups = [speedup(run_seconds(run), baseline[run["repeat"]]) for run in runs if run["repeat"] in baseline]
        rows.append(
            {
                "variant": variant,
                "seconds": spread([run_seconds(run) for run in runs]),
                "drop_to_full": spread(ratios),
                "steps": spread([float(sum(e["steps"] for e in run["epochs"])) for run in runs]),
                "final_acc": spread([run["epochs"][-1]["val_acc"] for run in runs if "val_acc" in run["epochs"][-1]]),
                "speedup": spread(speedups),
            }
        )
    return rows


def run_seconds(run: dict[str, Any]) -> float:
    """Training seconds of a whole run (validation excluded)."""
    return sum(epoch["seconds"] for epoch in run["epochs"])


def _cell(value: Optional[dict[str, float]], spec: str, percent: bool = False) -> str:
    if value is None:
        return "–"
    scale, unit = (100.0, "%") if percent else (1.0, "")
    mean, low, high = (value[k] * scale for k in ("mean", "min", "max"))
    if value["n"] == 1 or low == high:
        return f"{mean:{spec}}{unit}"
    return f"{mean:{spec}}{unit} ({low:{spec}} to {high:{spec}})"


def markdown_table(rows: list[dict[str, Any]]) -> str:
    """The attribution table as Markdown."""
    lines = [
        "| variant | whole run (s) | DROP / full epoch | optimizer steps | final val acc | speed-up vs baseline |",
        "|---|---|---|---|---|---|",
    ]
    for row in rows:
        cells = (
            _cell(row["seconds"], ".2f"),
            _cell(row["drop_to_full"], ".2f"),
            _cell(row["steps"], ".0f"),
            _cell(row["final_acc"], ".3f"),
            _cell(row["speedup"], "+.1f", percent=True),
        )
        lines.append(f"| {row['variant']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def attribution_lines(rows: list[dict[str, Any]]) -> list[str]:
    """Plain-words reading of the table: how much of LDB's gain the schedule alone (``batch-only``) gives."""
    rows_by_name = {row["variant"]: row for row in rows}
    if "ldb" not in rows_by_name or "batch-only" not in rows_by_name:
        return []
    ldb, schedule = rows_by_name["ldb"], rows_by_name["batch-only"]
    lines = []
    if ldb["drop_to_full"] and schedule["drop_to_full"]:
        lines.append(
            f"A DROP epoch took {ldb['drop_to_full']['mean']:.2f}x a full epoch of the same run with ldb and"
            f" {schedule['drop_to_full']['mean']:.2f}x with batch-only (the same schedule, nothing dropped): the"
            " gap is what dropping saves; the rest is the doubled batch and halved step count."
        )
    if ldb["speedup"] and schedule["speedup"]:
        ldb_gain, schedule_gain = ldb["speedup"]["mean"], schedule["speedup"]["mean"]
        lines.append(
            f"Whole run: ldb {ldb_gain:+.1%}, batch-only {schedule_gain:+.1%} against the baseline; the dropping"
            f" itself adds {ldb_gain - schedule_gain:+.1%} (means over repetitions; see the ranges)."
        )
    return lines


def render_markdown(result: dict[str, Any]) -> str:
    """The whole report: setup, attribution table, reading."""
    config, env = result["config"], result["environment"]
    rows = summarize(result)
    setup = (
        f"{config['model']}, {config['epochs']} epochs of {config['train_samples']} samples, base batch"
        f" {config['batch_size']}, lr {config['lr']}, {config['repeats']} repetition(s), threads"
        f" {config['threads']}; {env['device']} ({env['cpu']}, {env['cpu_count']} cores), torch {env['torch']},"
        f" lightning {env['lightning']}, {env['date']}."
    )
    skip = config["skip_epochs"]
    note = "Cells: mean (min to max over repetitions). DROP / full epoch: within each run"
    note += f", the first {skip} epoch(s) left out as warm-up." if skip else "."
    parts = [f"# ldb-bench: {config['model']}", setup, markdown_table(rows), note, *attribution_lines(rows)]
    return "\n\n".join(parts) + "\n"

def plot(result: dict[str, Any], path: Path) -> None:
    """Whole-run time and final accuracy per variant (bars: mean; whiskers: range), as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = summarize(result)
    names = [row["variant"] for row in rows]
    figure, axes = plt.subplots(1, 2, figsize=(10, 3.5))
    for ax, key, label in ((axes[0], "seconds", "whole run (s)"), (axes[1], "final_acc", "final val acc")):
        cells = [row[key] or {"mean": 0.0, "min": 0.0, "max": 0.0} for row in rows]
        means = [c["mean"] for c in cells]
        errors = [[c["mean"] - c["min"] for c in cells], [c["max"] - c["mean"] for c in cells]]
        ax.bar(names, means, yerr=errors, capsize=4, color="tab:blue")
        ax.set_ylabel(label)
        ax.tick_params(axis="x", rotation=30)
    figure.suptitle(f"ldb-bench: {result['config']['model']}")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
