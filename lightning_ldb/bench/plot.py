"""The benchmark's figures, drawn with matplotlib's Agg canvas (no display, no global backend switch)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from statistics import median
from typing import Any, Union

from lightning_ldb.bench.report import BASELINE, RunResult, sweep_rows
from lightning_ldb.schedule import DROP

#: Colours per variant (matplotlib's default cycle), so a run keeps its colour across panels.
_COLOURS = (
    "#1f77b4",
    "#ff7f0e",
    "#2ca02c",
    "#d62728",
    "#9467bd",
    "#8c564b",
    "#e377c2",
    "#7f7f7f",
    "#bcbd22",
    "#17becf",
)


def _figure(width: float, height: float) -> Any:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(figure)
    return figure


def plot_paired(report: dict[str, Any], path: Union[str, Path]) -> Path:
    """Validation accuracy against training wall-clock, and epoch time by mode, for every variant.

    Args:
        report: A benchmark report (the JSON dict).
        path: Where to write the PNG.

    Returns:
        The path written.
    """
    runs = [RunResult.from_dict(r) for r in report["runs"]]
    variants = list(dict.fromkeys(run.variant for run in runs))
    colour = {v: _COLOURS[i % len(_COLOURS)] for i, v in enumerate(variants)}
    figure = _figure(10.0, 3.8)
    accuracy_axes, time_axes = figure.subplots(1, 2)

    for variant in variants:
        for index, run in enumerate(r for r in runs if r.variant == variant):
            points = [(t, acc) for t, acc in run.timeline() if acc is not None]
            if not points:
                continue
            accuracy_axes.plot(
                [t for t, _ in points],
                [acc * 100 for _, acc in points],
                marker="o",
                markersize=3,
                linewidth=1.2,
                color=colour[variant],
                alpha=1.0 if index == 0 else 0.35,
                label=variant if index == 0 else None,
            )
    accuracy_axes.set_xlabel("training wall-clock (s, validation excluded)")
    accuracy_axes.set_ylabel("validation accuracy (%)")
    accuracy_axes.set_title("Accuracy vs time")
    accuracy_axes.grid(alpha=0.3)
    accuracy_axes.legend(fontsize=8)

    _epoch_bars(time_axes, runs, variants, colour)
    figure.tight_layout()
    return _save(figure, path)


def _epoch_bars(axes: Any, runs: Sequence[RunResult], variants: Sequence[str], colour: dict[str, str]) -> None:
    epochs = sorted({e.epoch for r in runs for e in r.epochs})
    width = 0.8 / max(len(variants), 1)
    tallest = 0.0
    for slot, variant in enumerate(variants):
        ours = [r for r in runs if r.variant == variant]
        for epoch in epochs:
            records = [e for r in ours for e in r.epochs if e.epoch == epoch]
            if not records:
                continue
            times = [e.seconds for e in records]
            # The median: one run slowed down by a neighbour's job should not move the bar.
            middle = median(times)
            tallest = max(tallest, max(times))
            is_drop = records[0].mode == DROP
            x = epoch - 0.4 + width * (slot + 0.5)
            axes.bar(
                x,
                middle,
                width=width * 0.95,
                color=colour[variant],
                alpha=0.55 if is_drop else 0.9,
                hatch="//" if is_drop else None,
                edgecolor="black" if is_drop else colour[variant],
                linewidth=0.5,
                yerr=[[middle - min(times)], [max(times) - middle]] if len(times) > 1 else None,
                error_kw={"elinewidth": 0.8, "capsize": 2},
                label=variant if epoch == epochs[0] else None,
            )
    from matplotlib.patches import Patch

    handles, labels = axes.get_legend_handles_labels()
    handles.append(Patch(facecolor="white", hatch="//", edgecolor="black", label="DROP epoch"))
    axes.set_xticks(epochs)
    axes.set_xlabel("epoch")
    axes.set_ylabel("epoch time (s)")
    axes.set_title("Epoch time by mode (median, min–max)")
    axes.set_ylim(0, tallest * 1.3 if tallest > 0 else 1.0)  # headroom for the legend
    axes.grid(axis="y", alpha=0.3)
    axes.legend(handles=handles, fontsize=7, loc="upper center", ncol=len(handles), framealpha=0.9)


def plot_sweep(report: dict[str, Any], path: Union[str, Path]) -> Path:
    """Speed-up and validation accuracy against the swept value, the baseline's accuracy as a line.

    Args:
        report: A sweep report (the JSON dict).
        path: Where to write the PNG.

    Returns:
        The path written.
    """
    key = report["sweep"]["key"]
    rows = sweep_rows(report)
    values = [row["value"] for row in rows]
    figure = _figure(7.0, 4.4)
    speed_axes = figure.subplots()
    measured = [row["speedup"].mean * 100 if row["speedup"] else float("nan") for row in rows]
    predicted = [
        row["flop_predicted_speedup"] * 100 if row["flop_predicted_speedup"] is not None else float("nan")
        for row in rows
    ]
    speed_axes.plot(values, measured, marker="o", color=_COLOURS[0], label="measured speed-up (wall-clock)")
    implied = [row["implied_speedup"] * 100 if row["implied_speedup"] is not None else float("nan") for row in rows]
    speed_axes.plot(values, implied, marker="d", linestyle="-.", color=_COLOURS[4], label="implied by DROP/full epochs")
    if any(row["speedup_cpu"] for row in rows):
        cpu = [row["speedup_cpu"].mean * 100 if row["speedup_cpu"] else float("nan") for row in rows]
        speed_axes.plot(values, cpu, marker="^", color=_COLOURS[2], label="measured speed-up (CPU time)")
    speed_axes.plot(
        values, predicted, marker="x", linestyle="--", color=_COLOURS[0], alpha=0.6, label="FLOP-predicted speed-up"
    )
    speed_axes.set_xlabel(key)
    speed_axes.set_ylabel("speed-up 1 - T/T_baseline (%)", color=_COLOURS[0])
    speed_axes.grid(alpha=0.3)
    accuracy_axes = speed_axes.twinx()
    final = [row["final_val_acc"].mean * 100 if row["final_val_acc"] else float("nan") for row in rows]
    accuracy_axes.plot(values, final, marker="s", color=_COLOURS[1], label="final val acc (LDB)")
    baseline = next((r for r in report["summary"]["variants"].items() if r[0] == BASELINE), None)
    if baseline is not None and baseline[1].get("final_val_acc"):
        accuracy_axes.axhline(
            baseline[1]["final_val_acc"]["mean"] * 100,
            color=_COLOURS[1],
            linestyle=":",
            label="final val acc (baseline)",
        )
    accuracy_axes.set_ylabel("validation accuracy (%)", color=_COLOURS[1])
    handles = speed_axes.get_legend_handles_labels()
    more = accuracy_axes.get_legend_handles_labels()
    # Below the axes: inside, six entries hide the curves.
    speed_axes.legend(
        handles[0] + more[0], handles[1] + more[1], fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=3
    )
    speed_axes.set_title(f"LDB sweep over {key}")
    figure.subplots_adjust(left=0.1, right=0.88, top=0.92, bottom=0.27)
    return _save(figure, path)


def _save(figure: Any, path: Union[str, Path]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, format="png")
    return path
