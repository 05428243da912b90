"""Tables, verdict and plots drawn from the benchmark's JSON, by small pure functions.

The attribution table has one row per variant: whole-run time, DROP-epoch / full-epoch time (within
the run, warm-up epochs left out), optimizer steps, the final value of the monitored validation metric,
and the speed-up ``1 - T_variant / T_baseline`` against the baseline of the same repetition. Each cell is
the mean over repetitions with the range (min-max) beside it. The verdict calls a speed-up whose range
crosses zero "no measurable difference".
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Optional

#: The epoch modes recorded per epoch (the callback's ``mode``).
DROP, FULL = "drop", "full"


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


def monitored_metric(result: dict[str, Any]) -> Optional[str]:
    """The validation metric the report follows: the first logged one naming an accuracy, else a loss, else any.

    Example::

        >>> monitored_metric({"runs": [{"epochs": [{"epoch": 0, "val_loss": 1.0, "val_accuracy": 0.5}]}]})
        'val_accuracy'
    """
    names: dict[str, None] = {}
    for run in result["runs"]:
        for epoch in run["epochs"]:
            names.update((key, None) for key in epoch if key not in _EPOCH_FIELDS)
    for word in ("acc", "loss"):
        found = next((name for name in names if word in name.lower()), None)
        if found is not None:
            return found
    return next(iter(names), None)


#: The fields of an epoch record that are not metrics.
_EPOCH_FIELDS = ("epoch", "mode", "seconds", "steps", "batch_size")


def summarize(result: dict[str, Any]) -> list[dict[str, Any]]:
    """The attribution table's rows, from :func:`~lightning_ldb.bench.runner.run_benchmark`'s result.

    Each run is compared with the baseline of its own repetition; without a baseline, ``speedup`` is ``None``.
    ``final_metric`` is the last epoch's value of :func:`monitored_metric`.
    """
    skip = result["config"]["skip_epochs"]
    metric = monitored_metric(result)
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
                "final_metric": spread([run["epochs"][-1][metric] for run in runs if metric in run["epochs"][-1]]),
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


def markdown_table(rows: list[dict[str, Any]], metric: Optional[str] = "val_acc") -> str:
    """The attribution table as Markdown; ``metric`` names the final-metric column."""
    lines = [
        f"| variant | whole run (s) | DROP / full epoch | optimizer steps | final {metric or 'metric'} |"
        " speed-up vs baseline |",
        "|---|---|---|---|---|---|",
    ]
    for row in rows:
        cells = (
            _cell(row["seconds"], ".2f"),
            _cell(row["drop_to_full"], ".2f"),
            _cell(row["steps"], ".0f"),
            _cell(row["final_metric"], ".3f"),
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


def measurable(value: Optional[dict[str, float]]) -> bool:
    """Whether a speed-up's range over repetitions stays on one side of zero (more than one repetition)."""
    return value is not None and value["n"] > 1 and (value["min"] > 0 or value["max"] < 0)


def verdict_lines(rows: list[dict[str, Any]], epochs: int, repeats: int) -> list[str]:
    """The verdict on each variant's whole-run speed-up: measured, or "no measurable difference".

    A speed-up whose range over the repetitions crosses zero (or that has one repetition only) is no
    measurable difference; the verdict then says what would make the measurement readable.

    Example::

        >>> verdict_lines([{"variant": "ldb", "speedup": spread([-0.145, 0.109])}], epochs=4, repeats=2)[0]
        'Verdict: ldb: no measurable difference from the baseline (-1.8%, range -14.5% to +10.9% over 2 repetitions).'
    """
    measured, unclear = [], []
    for row in rows:
        value = row["speedup"]
        if row["variant"] == "baseline" or value is None:
            continue
        if measurable(value):
            word = "faster" if value["mean"] > 0 else "slower"
            measured.append(
                f"{row['variant']} {abs(value['mean']):.1%} {word} (range {value['min']:+.1%} to {value['max']:+.1%})"
            )
        elif value["n"] == 1:
            unclear.append(f"{row['variant']}: {value['mean']:+.1%} from one repetition, no range")
        else:
            unclear.append(
                f"{row['variant']}: no measurable difference from the baseline ({value['mean']:+.1%}, range"
                f" {value['min']:+.1%} to {value['max']:+.1%} over {value['n']} repetitions)"
            )
    lines = []
    if measured:
        lines.append("Verdict: " + "; ".join(measured) + " than the baseline, whole run, in every repetition.")
    if unclear:
        lines.append("Verdict: " + "; ".join(unclear) + ".")
        lines.append(
            f"To read a difference this small, run longer: more epochs (--epochs {max(2 * epochs, 6)}, so more DROP"
            f" epochs) and more repetitions (--repeats {max(repeats + 2, 3)}), on a machine with nothing else running;"
            " the DROP / full epoch column compares epochs of one run and is steadier."
        )
    return lines


def render_markdown(result: dict[str, Any]) -> str:
    """The whole report: setup, notes, attribution table, verdict and reading."""
    config, env = result["config"], result["environment"]
    rows = summarize(result)
    metric = monitored_metric(result)
    trained = config.get("model_class") or config["name"]
    data = f" on {config['data_class']}" if config.get("data_class") else ""
    limits = "".join(
        f", {key} {config[key]}" for key in ("limit_train_batches", "limit_val_batches") if config.get(key) is not None
    )
    ldb = config["ldb"]
    load = env.get("load_average_1min")
    world_size = max((run.get("world_size", 1) for run in result["runs"]), default=1)
    # Several processes: steps and batch sizes are per device, and the times are rank 0's.
    processes = (
        f" {world_size} processes (strategy {config.get('strategy', 'auto')}): rank 0's times, per-device batches."
        if world_size > 1
        else ""
    )
    setup = (
        f"{trained}{data}, {config['epochs']} epochs{limits}, {config['repeats']} repetition(s), seed {config['seed']};"
        f" LDB drop_rate {ldb['drop_rate']}, every {ldb['every']}, lr_scale {ldb['lr_scale']}, batch_scale"
        f" {ldb['batch_scale']}, keep_first {ldb['keep_first']}, keep_last {ldb['keep_last']}.{processes} {env['device']}"
        f" ({env['cpu']}, {env['cpu_count']} cores" + (f", load average {load}" if load is not None else "")
        + f"), torch {env['torch']}, lightning {env['lightning']}, {env['date']}."
    )
    skip = config["skip_epochs"]
    note = "Cells: mean (min to max over repetitions). DROP / full epoch: within each run"
    note += f", the first {skip} epoch(s) left out as warm-up." if skip else "."
    parts = [f"# ldb-bench: {config['name']}", setup, *(f"Note: {line}" for line in result.get("notes", []))]
    parts += [markdown_table(rows, metric), note, *verdict_lines(rows, config["epochs"], config["repeats"])]
    parts += attribution_lines(rows)
    return "\n\n".join(parts) + "\n"


def plot(result: dict[str, Any], path: Path) -> None:
    """Time to accuracy and each epoch's time, per variant, as a PNG.

    Left: the monitored validation metric against cumulative training time (validation excluded), one line
    per variant (the first repetition solid, later ones faint). Right: each epoch's training seconds per
    variant (mean over repetitions), DROP epochs marked with a filled triangle.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metric = monitored_metric(result)
    variants = list(dict.fromkeys(run["variant"] for run in result["runs"]))
    colors = {name: f"C{index}" for index, name in enumerate(variants)}
    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for run in result["runs"]:
        elapsed, values = 0.0, []
        for epoch in run["epochs"]:
            elapsed += epoch["seconds"]
            if metric in epoch:
                values.append((elapsed, epoch[metric]))
        if values:
            first = run["repeat"] == 0
            left.plot(*zip(*values), marker="o", color=colors[run["variant"]], alpha=1.0 if first else 0.35,
                      label=run["variant"] if first else None)  # fmt: skip
    left.set_xlabel("cumulative training time (s)")
    left.set_ylabel(metric or "metric")
    left.set_title("time to " + (metric or "metric"))
    left.legend(fontsize=8)
    width = 0.8 / max(len(variants), 1)
    for index, variant in enumerate(variants):
        runs = [run for run in result["runs"] if run["variant"] == variant]
        epochs = sorted({e["epoch"] for run in runs for e in run["epochs"]})
        for epoch in epochs:
            records = [e for run in runs for e in run["epochs"] if e["epoch"] == epoch]
            seconds = statistics.fmean(e["seconds"] for e in records)
            drop = any(e["mode"] == DROP for e in records)
            x = epoch + (index - (len(variants) - 1) / 2) * width
            right.bar(x, seconds, width, color=colors[variant], label=variant if epoch == epochs[0] else None,
                      hatch="//" if drop else None, edgecolor="black" if drop else colors[variant])  # fmt: skip
            if drop:
                right.plot(x, seconds, marker="v", color="black", markersize=5)
    right.set_xticks(sorted({e["epoch"] for run in result["runs"] for e in run["epochs"]}))
    right.set_xlabel("epoch (hatched, marked: DROP epoch)")
    right.set_ylabel("training seconds")
    right.set_title("each epoch's time")
    right.legend(fontsize=8)
    figure.suptitle(f"ldb-bench: {result['config']['name']}")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
