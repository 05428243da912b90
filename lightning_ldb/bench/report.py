"""Tables, verdicts and plots drawn from the benchmark's JSON, by small pure functions.

The attribution table has one row per variant: whole-run time (on the verdict's clock, and the wall clock
beside it on a CPU), DROP-epoch / full-epoch time (within the run, warm-up epochs left out), optimizer
steps, the final value of the monitored validation metric, and the speed-up against the baseline: the
median of the paired ratios (each repetition's run against the baseline of the same repetition) with an
order-statistic interval. Cells other than the speed-up are the mean over repetitions with the range
(min-max) beside it. The verdicts (:func:`verdicts`, :mod:`~lightning_ldb.bench.stats`) are faster /
slower / no measurable difference / too noisy to tell, and a speed-up beyond what the profile's floor
allows is too noisy to tell.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from lightning_ldb.bench import stats
from lightning_ldb.examples import speedup

#: The epoch modes recorded per epoch (the callback's ``mode``).
DROP, FULL = "drop", "full"

#: Each clock's field in an epoch record: ``wall`` (``time.perf_counter``, CUDA-synchronised on a GPU) and
#: ``cpu`` (``time.process_time``: this process's CPU time, every thread of it, no other process's).
CLOCK_FIELDS = {"wall": "seconds", "cpu": "cpu_seconds"}

#: How each clock is named in the report.
CLOCK_NAMES = {"wall": "wall-clock time", "cpu": "this process's CPU time"}

#: The variants whose DROP epochs the profile's floor bounds, and the floor each is held to: ``ldb`` and
#: ``ldb-block`` their own mode's floor; the others, which take only part of LDB, the looser of the weights
#: floor and the dropping alone at the base batch (``1 - ceiling``).
BOUNDED = {"ldb": "weights", "ldb-block": "block", "batch-only": "part", "drop-only": "part", "ldb-accumulate": "part"}


def spread(values: Sequence[float]) -> dict[str, float] | None:
    """``{"mean", "min", "max", "n"}`` of ``values``; ``None`` if there are none.

    Example::

        >>> spread([1.0, 3.0])
        {'mean': 2.0, 'min': 1.0, 'max': 3.0, 'n': 2}
    """
    if not values:
        return None
    return {"mean": statistics.fmean(values), "min": min(values), "max": max(values), "n": len(values)}


def drop_to_full_ratio(epochs: Sequence[dict[str, Any]], skip_epochs: int, clock: str = "wall") -> float | None:
    """Mean DROP-epoch seconds over mean full-epoch seconds of one run, the first ``skip_epochs`` left out.

    Example::

        >>> drop_to_full_ratio([{"epoch": 0, "mode": "full", "seconds": 9.0}, {"epoch": 1, "mode": "full",
        ...     "seconds": 4.0}, {"epoch": 2, "mode": "drop", "seconds": 3.0}], skip_epochs=1)
        0.75
    """
    timed = [e for e in epochs if e["epoch"] >= skip_epochs]
    field = CLOCK_FIELDS[clock]
    drop = [e[field] for e in timed if e["mode"] == DROP]
    full = [e[field] for e in timed if e["mode"] == FULL]
    return statistics.fmean(drop) / statistics.fmean(full) if drop and full else None


def monitored_metric(result: dict[str, Any]) -> str | None:
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
_EPOCH_FIELDS = (
    "epoch", "mode", "seconds", "cpu_seconds", "steps", "batch_size", "threads", "loader_workers", "device"
)  # fmt: skip


def verdict_clock(result: dict[str, Any]) -> str:
    """The clock the verdicts use: ``"cpu"`` or ``"wall"`` (``result["clock"]["verdict"]``; ``"wall"`` if absent)."""
    return str(result.get("clock", {}).get("verdict", "wall"))


def run_seconds(run: dict[str, Any], clock: str = "wall") -> float:
    """Training seconds of a whole run (validation excluded) on ``clock`` (``"wall"`` or ``"cpu"``)."""
    field = CLOCK_FIELDS[clock]
    return sum(epoch[field] for epoch in run["epochs"])


def profile_floor(profile: dict[str, Any] | None) -> dict[str, Any] | None:
    """The DROP-epoch floors a profile gives: its ``plausibility_floor`` if it has one, else its
    ``drop_epoch_ratio_floor``; with the weights-mode ceiling, for the variants that take part of LDB.

    Returns ``{"weights", "block", "source", "ceiling"}`` (``None`` where the profile has no floor).

    Example::

        >>> profile_floor({"drop_epoch_ratio_floor": {"weights": 0.8, "block": None}})["source"]
        'drop_epoch_ratio_floor'
    """
    if not profile:
        return None
    chosen = profile.get("plausibility_floor") or profile.get("drop_epoch_ratio_floor")
    if not chosen or chosen.get("weights") is None:
        return None
    name = "plausibility_floor" if profile.get("plausibility_floor") else "drop_epoch_ratio_floor"
    source = f"{name} ({chosen['source']})" if chosen.get("source") else name
    ceiling = (profile.get("drop_step_ceiling") or {}).get("weights")
    return {"weights": chosen["weights"], "block": chosen.get("block"), "source": source, "ceiling": ceiling}


def variant_bound(result: dict[str, Any], variant: str) -> dict[str, Any] | None:
    """The largest whole-run speed-up ``variant`` can show by the profile (``result["profile"]``), or ``None``.

    The bound is :func:`~lightning_ldb.bench.stats.max_speedup` of the run's DROP epochs at the variant's floor
    (see :data:`BOUNDED`) with :data:`~lightning_ldb.bench.stats.PLAUSIBILITY_MARGIN`.
    """
    floors = profile_floor(result.get("profile"))
    kind = BOUNDED.get(variant)
    if floors is None or kind is None:
        return None
    if kind == "part":
        floor = min(floors["weights"], 1.0 - floors["ceiling"]) if floors["ceiling"] is not None else floors["weights"]
    else:
        floor = floors[kind]
    runs = [run for run in result["runs"] if run["variant"] == variant]
    if floor is None or not runs:
        return None
    epochs = len(runs[0]["epochs"])
    drops = sum(1 for e in runs[0]["epochs"] if e["mode"] == DROP)
    return {
        "max_speedup": stats.max_speedup(drops, epochs, floor),
        "floor": floor,
        "mode": "weights" if kind == "part" else kind,
        "source": floors["source"],
        "margin": stats.PLAUSIBILITY_MARGIN,
        "drop_epochs": drops,
        "epochs": epochs,
    }


def _times(result: dict[str, Any], variant: str, clock: str) -> dict[int, float]:
    return {run["repeat"]: run_seconds(run, clock) for run in result["runs"] if run["variant"] == variant}


def verdicts(result: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Each variant's verdict against the baseline, as ``report.json`` carries it (no baseline: ``{}``).

    Per variant: :func:`~lightning_ldb.bench.stats.judge` of its paired ratios on the verdict's clock, and
    ``clock``, ``ratios``, ``spread`` (each variant's own relative range over repetitions, this one's and
    the baseline's), ``bound`` (:func:`variant_bound`) and, when the verdict uses the CPU clock, ``wall``:
    the same judgement on the wall clock, for reference.
    """
    clock = verdict_clock(result)
    names = list(dict.fromkeys(run["variant"] for run in result["runs"]))
    if "baseline" not in names:
        return {}
    baseline = _times(result, "baseline", clock)
    found = {}
    for variant in names:
        if variant == "baseline":
            continue
        times = _times(result, variant, clock)
        ratios = stats.paired_ratios(times, baseline)
        if not ratios:
            continue
        bound = variant_bound(result, variant)
        judged = stats.judge(ratios, bound["max_speedup"] if bound else None)
        judged.update(
            clock=clock,
            ratios=ratios,
            spread={variant: stats.relative_range(list(times.values())),
                    "baseline": stats.relative_range(list(baseline.values()))},
            bound=bound,
        )
        if clock == "cpu":
            wall = stats.judge(stats.paired_ratios(_times(result, variant, "wall"), _times(result, "baseline", "wall")))
            judged["wall"] = {k: wall[k] for k in ("verdict", "speedup", "interval", "confidence")}
        found[variant] = judged
    return found


def summarize(result: dict[str, Any]) -> list[dict[str, Any]]:
    """The attribution table's rows, from :func:`~lightning_ldb.bench.runner.run_benchmark`'s result.

    Each run is compared with the baseline of its own repetition (``speedup``: their spread; ``verdict``: the
    judgement of :func:`verdicts`, ``None`` for the baseline or without one). Times are on the verdict's clock
    (``wall_seconds``: the wall clock). ``final_metric`` is the last epoch's value of :func:`monitored_metric`.
    """
    skip = result["config"]["skip_epochs"]
    clock = verdict_clock(result)
    metric = monitored_metric(result)
    judged = verdicts(result)
    baseline = _times(result, "baseline", clock)
    rows = []
    for variant in dict.fromkeys(run["variant"] for run in result["runs"]):
        runs = [run for run in result["runs"] if run["variant"] == variant]
        ratios = [r for r in (drop_to_full_ratio(run["epochs"], skip, clock) for run in runs) if r is not None]
        speedups = [
            speedup(run_seconds(run, clock), baseline[run["repeat"]]) for run in runs if run["repeat"] in baseline
        ]
        rows.append(
            {
                "variant": variant,
                "seconds": spread([run_seconds(run, clock) for run in runs]),
                "wall_seconds": spread([run_seconds(run) for run in runs]),
                "drop_to_full": spread(ratios),
                "steps": spread([float(sum(e["steps"] for e in run["epochs"])) for run in runs]),
                "final_metric": spread([run["epochs"][-1][metric] for run in runs if metric in run["epochs"][-1]]),
                "speedup": spread(speedups),
                "verdict": judged.get(variant),
            }
        )
    return rows


def _cell(value: dict[str, float] | None, spec: str, percent: bool = False) -> str:
    if value is None:
        return "–"
    scale, unit = (100.0, "%") if percent else (1.0, "")
    mean, low, high = (value[k] * scale for k in ("mean", "min", "max"))
    if value["n"] == 1 or low == high:
        return f"{mean:{spec}}{unit}"
    return f"{mean:{spec}}{unit} ({low:{spec}} to {high:{spec}})"


def _speedup_cell(judged: dict[str, Any] | None) -> str:
    if judged is None:
        return "–"
    low, high = judged["interval"]
    if judged["repetitions"] == 1:
        return f"{judged['speedup']:+.1%}"
    return f"{judged['speedup']:+.1%} ({low * 100:+.1f} to {high * 100:+.1f})"


def markdown_table(rows: list[dict[str, Any]], metric: str | None = "val_acc", clock: str = "wall") -> str:
    """The attribution table as Markdown; ``metric`` names the final-metric column, ``clock`` the time column's."""
    two = clock != "wall"
    time_head = "whole run, CPU (s) | wall (s)" if two else "whole run (s)"
    lines = [
        (f"| variant | {time_head} | DROP / full epoch | optimizer steps | final {metric or 'metric'} |"
         " speed-up vs baseline (median, interval) | verdict |"),
        "|---|---|---|---|---|---|---|" + ("---|" if two else ""),
    ]
    for row in rows:
        cells = (
            _cell(row["seconds"], ".2f"),
            *((_cell(row["wall_seconds"], ".2f"),) if two else ()),
            _cell(row["drop_to_full"], ".2f"),
            _cell(row["steps"], ".0f"),
            _cell(row["final_metric"], ".3f"),
            _speedup_cell(row["verdict"]) if row["variant"] != "baseline" else "–",
            row["verdict"]["verdict"] if row["verdict"] else "–",
        )
        lines.append(f"| {row['variant']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _apart(a: dict[str, float] | None, b: dict[str, float] | None) -> int:
    """-1 if every value of ``a`` is below every one of ``b``, 1 if above, 0 if their ranges overlap."""
    if a is None or b is None:
        return 0
    return -1 if a["max"] < b["min"] else 1 if a["min"] > b["max"] else 0


def attribution_lines(rows: list[dict[str, Any]], result: dict[str, Any] | None = None) -> list[str]:
    """Plain-words reading of the table: what the dropping adds to LDB's schedule (``ldb`` against ``batch-only``).

    Each sentence says which way the gap went, or that it is within the noise (the ranges over the
    repetitions overlap; for the whole run, the paired ratios of ldb over batch-only are judged as a verdict).
    """
    rows_by_name = {row["variant"]: row for row in rows}
    if "ldb" not in rows_by_name or "batch-only" not in rows_by_name:
        return []
    ldb, schedule = rows_by_name["ldb"], rows_by_name["batch-only"]
    lines = []
    if ldb["drop_to_full"] and schedule["drop_to_full"]:
        a, b = ldb["drop_to_full"]["mean"], schedule["drop_to_full"]["mean"]
        way = _apart(ldb["drop_to_full"], schedule["drop_to_full"])
        how = {
            -1: f"dropping saved {b - a:.2f} of a full epoch on top of the schedule, in every repetition",
            1: f"dropping cost {a - b:.2f} of a full epoch more than the schedule alone, in every repetition",
            0: "the gap is within the noise (the ranges over the repetitions overlap), so this run does not show"
            " what dropping saves",
        }[way]
        lines.append(
            f"A DROP epoch took {a:.2f}x a full epoch of the same run with ldb and {b:.2f}x with batch-only (the same"
            f" schedule, nothing dropped): {how}."
        )
    if result is not None:
        clock = verdict_clock(result)
        ratios = stats.paired_ratios(_times(result, "ldb", clock), _times(result, "batch-only", clock))
        if ratios:
            # Dropping alone saves at most the weights-mode ceiling (and the margin) of each DROP epoch.
            ceiling = ((result.get("profile") or {}).get("drop_step_ceiling") or {}).get("weights")
            epochs = next(run["epochs"] for run in result["runs"] if run["variant"] == "ldb")
            drops = sum(1 for e in epochs if e["mode"] == DROP)
            bound = stats.max_speedup(drops, len(epochs), 1.0 - ceiling) if ceiling is not None else None
            judged = stats.judge(ratios, bound)
            gain = judged["speedup"]
            word = {
                stats.FASTER: f"the dropping made the whole run {gain:.1%} faster than the schedule alone",
                stats.SLOWER: f"the dropping made the whole run {-gain:.1%} slower than the schedule alone",
                stats.SAME: "the dropping made no measurable difference to the whole run",
                stats.NOISY: f"whether the dropping changed the whole run is within the noise ({gain:+.1%},"
                f" {judged['reason']})",
            }[judged["verdict"]]
            lines.append(f"Whole run, ldb against batch-only in the same repetitions: {word}.")
    return lines


def _advice(result: dict[str, Any], judged: dict[str, Any]) -> str:
    config = result["config"]
    epochs, repeats = config["epochs"], config["repeats"]
    load = result.get("environment", {}).get("load_average_1min")
    quiet = f"a quieter machine (the load average was {load})" if load is not None else "a quieter machine"
    if judged["repetitions"] == 1:
        return f"a single repetition measures no noise, whatever its size: run --repeats {max(repeats + 2, 3)} or more"
    return (f"more repetitions (--repeats {max(repeats + 2, 5)}), more epochs (--epochs {max(2 * epochs, 6)}, so more"
            f" DROP epochs) or {quiet}")  # fmt: skip


def verdict_sentence(variant: str, judged: dict[str, Any]) -> str:
    """One variant's verdict in words, with the estimate, the interval, its confidence and the repetitions."""
    n, gain = judged["repetitions"], judged["speedup"]
    low, high = judged["interval"]
    of = f"median of {n} paired repetitions; {judged['confidence']:.0%} interval {low:+.1%} to {high:+.1%}"
    if n == 1:
        of = "one repetition, no interval"
    if judged["verdict"] in (stats.FASTER, stats.SLOWER):
        return f"{variant} {abs(gain):.1%} {judged['verdict']} than the baseline ({of})"
    if judged["verdict"] == stats.SAME:
        band = f"none beyond {stats.RESOLUTION:.0%} either way"
        return f"{variant}: no measurable difference from the baseline, {band} ({gain:+.1%}, {of})"
    return f"{variant}: too noisy to tell ({gain:+.1%}, {of}): {judged['reason']}"


def verdict_lines(result: dict[str, Any], judged: dict[str, dict[str, Any]] | None = None) -> list[str]:
    """The verdicts in words: one line per variant, the advice for those too noisy to tell, and the clock."""
    judged = verdicts(result) if judged is None else judged
    if not judged:
        return []
    clock = next(iter(judged.values()))["clock"]
    lines = []
    for variant, one in judged.items():
        line = f"Verdict: {verdict_sentence(variant, one)}."
        if one["verdict"] == stats.NOISY:
            line += f" What would make it readable: {_advice(result, one)}."
        lines.append(line)
        moved = {
            name: value for name, value in one["spread"].items() if value is not None and value > abs(one["speedup"])
        }
        if moved and one["verdict"] != stats.NOISY:
            named = " and ".join(f"{name}'s by {value:.0%}" for name, value in moved.items())
            lines.append(
                f"Note: {variant}'s difference is smaller than how far the repetitions of one variant moved ({named},"
                f" fastest to slowest run): the machine's speed changed between repetitions; paired within each"
                f" repetition, {variant}'s ratios to the baseline agree within {one['noise']:.1%}."
            )
    threads = result.get("clock", {}).get("threads")
    text = f"Clock: {CLOCK_NAMES[clock]}"
    if clock == "cpu":
        text += (f" (torch threads fixed at {threads}); the wall-clock time is beside it. Other processes on a shared"
                 " CPU stretch wall-clock time, not the CPU time this run used.")  # fmt: skip
        if threads != 1:
            text += (" With several threads the CPU time counts each thread's, their waits for one another included,"
                     " which a busy CPU stretches too: one thread (lightning_ldb.examples.TorchThreads, or"
                     " OMP_NUM_THREADS=1) gives the steadiest clock.")  # fmt: skip
        walls = "; ".join(f"{v} {one['wall']['speedup']:+.1%} ({one['wall']['verdict']})" for v, one in judged.items())
        text += f" On the wall clock: {walls}."
    else:
        text = f"Clock: {result.get('clock', {}).get('reason', CLOCK_NAMES[clock])}."
    lines.append(text)
    bounds = [(v, one["bound"]) for v, one in judged.items() if one["bound"]]
    if bounds:
        b = bounds[0][1]
        lines.append(
            f"Bound: the profile's DROP-epoch floor ({b['source']}) with a margin of {b['margin']:.2f}: with"
            f" {b['drop_epochs']} DROP epoch(s) in {b['epochs']}, " + ", ".join(
                f"{name} can gain at most {one['max_speedup']:.1%} (floor {one['floor']:.2f}x)" for name, one in bounds)
            + "; a larger measured gain is reported as noise."
        )  # fmt: skip
    return lines


def render_markdown(result: dict[str, Any]) -> str:
    """The whole report: setup, notes, attribution table, verdicts and reading."""
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
    loads = result.get("load_averages") or ([load] if load is not None else [])
    load_text = f", load average {min(loads)} to {max(loads)}" if len(set(loads)) > 1 else (
        f", load average {loads[0]}" if loads else "")  # fmt: skip
    setup = (
        f"{trained}{data}, {config['epochs']} epochs{limits}, {config['repeats']} repetition(s), the run order"
        f" rotated each repetition, seed {config['seed']}; LDB drop_rate {ldb['drop_rate']}, every {ldb['every']},"
        f" lr_scale {ldb['lr_scale']}, batch_scale {ldb['batch_scale']}, keep_first {ldb['keep_first']}, keep_last"
        f" {ldb['keep_last']}.{processes} {env['device']} ({env['cpu']}, {env['cpu_count']} cores{load_text}), torch"
        f" {env['torch']}, lightning {env['lightning']}, {env['date']}."
    )
    skip = config["skip_epochs"]
    clock = verdict_clock(result)
    note = (f"Cells: mean (min to max over repetitions), times on {CLOCK_NAMES[clock]}"
            + (" and the wall clock" if clock != "wall" else "") + "; speed-up: median of the paired ratios (each"
            " run against the baseline of its repetition) with its interval. DROP / full epoch: within each"
            " run")  # fmt: skip
    note += f", the first {skip} epoch(s) left out as warm-up." if skip else "."
    parts = [f"# ldb-bench: {config['name']}", setup, *(f"Note: {line}" for line in result.get("notes", []))]
    parts += [markdown_table(rows, metric, clock), note, *verdict_lines(result)]
    parts += attribution_lines(rows, result)
    return "\n\n".join(parts) + "\n"


def title(result: dict[str, Any]) -> str:
    """The figure's title: each variant's verdict and the clock, in a line or two."""
    judged = verdicts(result)
    if not judged:
        return f"ldb-bench: {result['config']['name']}"
    parts = []
    for variant, one in judged.items():
        low, high = one["interval"]
        spread = f", {low:+.1%} to {high:+.1%}" if one["repetitions"] > 1 else ", 1 repetition"
        shown = f"{one['speedup']:+.1%}{spread}"
        if one["verdict"] in (stats.FASTER, stats.SLOWER):
            parts.append(f"{variant} {abs(one['speedup']):.1%} {one['verdict']} ({low:+.1%} to {high:+.1%})")
        else:
            parts.append(f"{variant}: {one['verdict']} ({shown})")
    clock = CLOCK_NAMES[next(iter(judged.values()))["clock"]]
    return f"ldb-bench {result['config']['name']} vs baseline, {clock}: " + "; ".join(parts)


def plot(result: dict[str, Any], path: Path) -> None:
    """Time to accuracy and each epoch's time, every repetition a point, as a PNG; the verdicts as its title.

    Left: the monitored validation metric against cumulative training time on the verdict's clock (validation
    excluded), one line per run (the first repetition solid, later ones faint). Right: each epoch's training
    seconds, one point per repetition and variant (a triangle on DROP epochs, which are shaded), so the spread
    is visible. The legend sits below the axes, off the data.
    """
    import textwrap

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    clock = verdict_clock(result)
    field = CLOCK_FIELDS[clock]
    metric = monitored_metric(result)
    variants = list(dict.fromkeys(run["variant"] for run in result["runs"]))
    colors = {name: f"C{index}" for index, name in enumerate(variants)}
    figure, (left, right) = plt.subplots(1, 2, figsize=(12, 5.2))
    for run in result["runs"]:
        elapsed, values = 0.0, []
        for epoch in run["epochs"]:
            elapsed += epoch[field]
            if metric in epoch:
                values.append((elapsed, epoch[metric]))
        if values:
            first = run["repeat"] == 0
            left.plot(*zip(*values), marker="o", color=colors[run["variant"]], alpha=1.0 if first else 0.35)
    left.set_xlabel(f"cumulative training time, {CLOCK_NAMES[clock]} (s)")
    left.set_ylabel(metric or "metric")
    left.set_title("time to " + (metric or "metric") + " (each repetition a line)", fontsize=10)
    width = 0.8 / max(len(variants), 1)
    drop_epochs = sorted({e["epoch"] for run in result["runs"] for e in run["epochs"] if e["mode"] == DROP})
    for epoch in drop_epochs:
        right.axvspan(epoch - 0.45, epoch + 0.45, color="0.9", zorder=0)
    for index, variant in enumerate(variants):
        runs = [run for run in result["runs"] if run["variant"] == variant]
        for run in runs:
            for e in run["epochs"]:
                x = e["epoch"] + (index - (len(variants) - 1) / 2) * width
                drop = e["mode"] == DROP
                right.scatter(x, e[field], color=colors[variant], marker="v" if drop else "o", s=36 if drop else 22,
                              edgecolors="black" if drop else "none", linewidths=0.6, zorder=2)  # fmt: skip
    right.set_xticks(sorted({e["epoch"] for run in result["runs"] for e in run["epochs"]}))
    right.set_xlabel("epoch (shaded, triangles: DROP epochs)")
    right.set_ylabel(f"training seconds, {CLOCK_NAMES[clock]}")
    right.set_title("each epoch's time, every repetition a point", fontsize=10)
    right.set_ylim(bottom=0)
    handles = [plt.Line2D([], [], color=colors[v], marker="o", linestyle="-", label=v) for v in variants]
    drop_marker = plt.Line2D([], [], color="black", marker="v", linestyle="", markerfacecolor="white",
                             label="DROP epoch")  # fmt: skip
    handles.append(drop_marker)
    figure.legend(handles=handles, loc="lower center", ncol=len(handles), fontsize=9, frameon=False)
    figure.suptitle("\n".join(textwrap.wrap(title(result), 110, break_on_hyphens=False)), fontsize=11)
    figure.tight_layout(rect=(0, 0.07, 1, 1))
    figure.savefig(path, dpi=120)
    plt.close(figure)
