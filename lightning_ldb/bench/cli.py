"""``ldb-bench`` (``python -m lightning_ldb.bench``): LDB's speed-up and accuracy measured side by side.

Examples::

    # the issue's measurement: ResNet-18, CIFAR-shaped data, the paper's LDB settings, with the overhead run
    python -m lightning_ldb.bench --variants baseline,ldb,callback-only --repeats 2 --profile --out outputs/bench

    # the paper's ablations (Figure 3, Table 4)
    python -m lightning_ldb.bench --sweep drop_rate=0.1,0.2,0.3,0.4,0.5,0.6,0.7,0.8
    python -m lightning_ldb.bench --sweep every=1,2,3,4,5,6,7,8 --epochs 9

    # pool the runs of several invocations (e.g. made in turns on a busy machine) into one report
    python -m lightning_ldb.bench --merge outputs/a/report.json outputs/b/report.json --out outputs/all
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Callable, Optional

from lightning_ldb.bench import report as report_lib
from lightning_ldb.bench.phases import profile_steps
from lightning_ldb.bench.plot import plot_paired, plot_sweep
from lightning_ldb.bench.runner import (
    PAPER_LDB,
    SWEEPABLE,
    BenchConfig,
    config_to_dict,
    count_flops,
    environment,
    make_module,
    merge_reports,
    plan_variants,
    run_benchmark,
    torch_threads,
    uses_cuda,
)
from lightning_ldb.callback import LayerDropBackCallback
from lightning_ldb.examples import MODEL_NAMES

VARIANT_NAMES = (report_lib.BASELINE, report_lib.LDB, report_lib.CALLBACK_ONLY)


def _int_at_least(minimum: int) -> Callable[[str], int]:
    """An argparse ``type`` accepting integers ``>= minimum``."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer >= {minimum}, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"expected an integer >= {minimum}, got {value}")
        return value

    return parse


_positive_int = _int_at_least(1)
_non_negative_int = _int_at_least(0)


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number > 0, got {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a number > 0, got {value}")
    return value


def _drop_rate(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1), got {text!r}") from None
    if not 0.0 <= value < 1.0:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1), got {value}")
    return value


def _variants(text: str) -> tuple[str, ...]:
    names = tuple(name.strip() for name in text.split(",") if name.strip())
    unknown = [name for name in names if name not in VARIANT_NAMES]
    if not names or unknown:
        raise argparse.ArgumentTypeError(f"expected a comma-separated list of {', '.join(VARIANT_NAMES)}, got {text!r}")
    if len(set(names)) != len(names):
        raise argparse.ArgumentTypeError(f"a variant is listed twice in {text!r}")
    return names


#: How each sweepable value is parsed and checked.
_SWEEP_PARSERS = {
    "drop_rate": _drop_rate,
    "every": _positive_int,
    "lr_scale": _positive_float,
    "batch_scale": _positive_int,
}


def parse_sweep(text: str) -> tuple[str, tuple[Any, ...]]:
    """``"drop_rate=0.1,0.2"`` -> ``("drop_rate", (0.1, 0.2))``.

    Raises:
        argparse.ArgumentTypeError: If the key is not sweepable or a value is invalid for it.

    Example::

        >>> parse_sweep("every=1,2,4")
        ('every', (1, 2, 4))
    """
    key, separator, values = text.partition("=")
    key = key.strip()
    if not separator or key not in SWEEPABLE:
        raise argparse.ArgumentTypeError(f"expected KEY=V1,V2,... with KEY one of {', '.join(SWEEPABLE)}, got {text!r}")
    parsed = []
    for item in values.split(","):
        if not item.strip():
            raise argparse.ArgumentTypeError(f"empty value in {text!r}")
        try:
            parsed.append(_SWEEP_PARSERS[key](item.strip()))
        except argparse.ArgumentTypeError as error:
            raise argparse.ArgumentTypeError(f"{key}: {error}") from None
    if len(set(parsed)) != len(parsed):
        raise argparse.ArgumentTypeError(f"a value is listed twice in {text!r}")
    return key, tuple(parsed)


def build_parser() -> argparse.ArgumentParser:
    defaults = BenchConfig()
    parser = argparse.ArgumentParser(
        prog="ldb-bench",
        description="Benchmark LayerDropBack against a plain Lightning baseline: same model, data, seed and"
        " hyperparameters; reports time per mode, speed-up 1 - T_ldb/T_baseline, throughput, optimizer steps,"
        " FLOPs and accuracy, as JSON, Markdown and a PNG figure.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    run = parser.add_argument_group("what to train")
    run.add_argument(
        "--model", choices=MODEL_NAMES, default=defaults.model, help="network (CIFAR-adapted torchvision model)"
    )
    run.add_argument("--epochs", type=_positive_int, default=defaults.epochs)
    run.add_argument(
        "--train-samples", type=_positive_int, default=defaults.train_samples, help="training images per epoch"
    )
    run.add_argument("--val-samples", type=_positive_int, default=defaults.val_samples)
    run.add_argument(
        "--batch-size", type=_positive_int, default=defaults.batch_size, help="base (full-epoch) batch size"
    )
    run.add_argument("--image-size", type=_positive_int, default=defaults.image_size)
    run.add_argument("--channels", type=_positive_int, default=defaults.channels)
    run.add_argument("--num-classes", type=_positive_int, default=defaults.num_classes)
    run.add_argument(
        "--signal", type=_positive_float, default=defaults.signal, help="class-pattern amplitude of the synthetic data"
    )
    run.add_argument("--lr", type=_positive_float, default=defaults.lr, help="base SGD learning rate (cosine annealed)")
    run.add_argument("--seed", type=_non_negative_int, default=defaults.seed)
    run.add_argument("--accelerator", default=defaults.accelerator, help="Lightning accelerator: auto, cpu, gpu")
    run.add_argument("--threads", type=_positive_int, default=None, help="torch CPU threads (default: torch's choice)")

    ldb = parser.add_argument_group("LayerDropBack (the paper's defaults)")
    ldb.add_argument("--drop-rate", type=_drop_rate, default=PAPER_LDB["drop_rate"])
    ldb.add_argument("--every", type=_positive_int, default=PAPER_LDB["every"])
    ldb.add_argument("--lr-scale", type=_positive_float, default=PAPER_LDB["lr_scale"])
    ldb.add_argument("--batch-scale", type=_positive_int, default=PAPER_LDB["batch_scale"])
    ldb.add_argument("--keep-first", type=_non_negative_int, default=PAPER_LDB["keep_first"])
    ldb.add_argument("--keep-last", type=_non_negative_int, default=PAPER_LDB["keep_last"])
    ldb.add_argument("--resample", choices=("epoch", "step"), default=PAPER_LDB["resample"])
    ldb.add_argument("--granularity", choices=("module", "parameter"), default=PAPER_LDB["granularity"])

    bench = parser.add_argument_group("measurement")
    bench.add_argument(
        "--variants",
        type=_variants,
        default=",".join(defaults.variants),
        help="runs per repetition: baseline (plain Lightning), ldb, callback-only (the callback installed, no DROP"
        " epoch in range: its overhead)",
    )
    bench.add_argument(
        "--repeats", type=_positive_int, default=defaults.repeats, help="repetitions (run order alternates)"
    )
    bench.add_argument(
        "--skip-epochs",
        type=_non_negative_int,
        default=defaults.skip_epochs,
        help="warm-up epochs left out of the per-mode epoch statistics",
    )
    bench.add_argument(
        "--sweep",
        type=parse_sweep,
        metavar="KEY=V1,V2,...",
        help=f"one LDB run per value against one baseline; KEY in {', '.join(SWEEPABLE)}",
    )
    bench.add_argument(
        "--profile", action="store_true", help="also time forward/backward/optimizer of full and DROP steps"
    )
    bench.add_argument(
        "--profile-steps", type=_positive_int, default=3, help="timed steps per kind of step with --profile"
    )
    bench.add_argument(
        "--profile-only",
        action="store_true",
        help="only count FLOPs and run the step profile (writes profile.json/.md), no training runs",
    )
    bench.add_argument("--no-flops", action="store_true", help="skip the FLOP count")
    bench.add_argument("--no-hook-timing", action="store_true", help="do not time the callback's hooks")
    bench.add_argument("--no-progress-bar", action="store_true")
    bench.add_argument("--note", default="", help="a line for the report, e.g. the machine's state")
    bench.add_argument(
        "--merge",
        nargs="+",
        type=Path,
        metavar="REPORT.json",
        help="pool the runs of earlier reports into one report instead of running",
    )
    bench.add_argument("--out", type=Path, default=Path("outputs/ldb-bench"), help="folder for report.json/.md/.png")
    return parser


def config_from_args(args: argparse.Namespace, parser: argparse.ArgumentParser) -> BenchConfig:
    """The :class:`BenchConfig` the arguments describe; ``parser.error`` (exit 2) on inconsistent flags."""
    ldb = {
        "drop_rate": args.drop_rate,
        "every": args.every,
        "lr_scale": args.lr_scale,
        "batch_scale": args.batch_scale,
        "keep_first": args.keep_first,
        "keep_last": args.keep_last,
        "resample": args.resample,
        "granularity": args.granularity,
    }
    if args.skip_epochs >= args.epochs:
        parser.error(f"argument --skip-epochs: must be below --epochs ({args.epochs}), got {args.skip_epochs}")
    if args.sweep is None and report_lib.LDB in args.variants and args.every >= args.epochs:
        parser.error(
            f"argument --every: {args.every} leaves no DROP epoch in {args.epochs} epochs; raise --epochs above it"
        )
    if args.sweep is not None and args.sweep[0] == "every":
        useless = [v for v in args.sweep[1] if v >= args.epochs]
        if useless:
            parser.error(
                f"argument --sweep: every={useless} leave(s) no DROP epoch in {args.epochs} epochs; raise --epochs"
            )
    if (args.profile or args.profile_only) and args.every >= args.epochs and args.sweep is None:
        flag = "--profile-only" if args.profile_only else "--profile"
        parser.error(f"argument {flag}: needs a DROP epoch in the run (--every below --epochs)")
    return BenchConfig(
        model=args.model,
        epochs=args.epochs,
        train_samples=args.train_samples,
        val_samples=args.val_samples,
        batch_size=args.batch_size,
        image_size=args.image_size,
        channels=args.channels,
        num_classes=args.num_classes,
        signal=args.signal,
        lr=args.lr,
        seed=args.seed,
        ldb=ldb,
        variants=args.variants,
        repeats=args.repeats,
        skip_epochs=args.skip_epochs,
        accelerator=args.accelerator,
        threads=args.threads,
        progress_bar=not args.no_progress_bar,
        time_hooks=not args.no_hook_timing,
        count_flops=not args.no_flops,
        sweep=args.sweep,
        note=args.note,
    )


def write_outputs(result: dict[str, Any], out: Path) -> dict[str, Path]:
    """Write ``report.json``, ``report.md`` and ``report.png`` (``sweep.*`` for a sweep) into ``out``.

    A profile-only result gets ``profile.json`` and ``profile.md``, no figure.
    """
    out.mkdir(parents=True, exist_ok=True)
    if result["kind"] == "profile":
        paths = {"json": out / "profile.json", "markdown": out / "profile.md"}
        paths["json"].write_text(json.dumps(result, indent=1, allow_nan=False) + "\n")
        paths["markdown"].write_text(report_lib.render_profile_report(result))
        return paths
    stem = "sweep" if result["kind"] == "sweep" else "report"
    paths = {"json": out / f"{stem}.json", "markdown": out / f"{stem}.md", "png": out / f"{stem}.png"}
    paths["json"].write_text(json.dumps(result, indent=1, allow_nan=False) + "\n")
    if result["kind"] == "sweep":
        paths["markdown"].write_text(report_lib.render_sweep_markdown(result))
        plot_sweep(result, paths["png"])
    else:
        paths["markdown"].write_text(report_lib.render_markdown(result))
        plot_paired(result, paths["png"])
    return paths


def _load_report(path: Path, parser: argparse.ArgumentParser) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        parser.error(f"argument --merge: cannot read {path}: {error}")
        raise  # unreachable: parser.error exits


@contextlib.contextmanager
def _quiet_lightning() -> Iterator[None]:
    """Hide Lightning's device banner and data-loader hints (the benchmark prints its own report), then restore."""
    logger = logging.getLogger("lightning.pytorch")
    level = logger.level
    logger.setLevel(logging.WARNING)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*does not have many workers.*")
            warnings.filterwarnings("ignore", message=".*is smaller than the logging interval.*")
            yield
    finally:
        logger.setLevel(level)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of ``ldb-bench``; returns the exit code (argument errors exit with 2)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.merge:
        try:
            result = merge_reports([_load_report(path, parser) for path in args.merge])
        except ValueError as error:
            parser.error(f"argument --merge: {error}")
    else:
        config = config_from_args(args, parser)
        with _quiet_lightning():
            result = _profile_only(config, args.profile_steps) if args.profile_only else _run(config, args)
    paths = write_outputs(result, args.out)
    print(paths["markdown"].read_text())
    print("Wrote " + ", ".join(str(p) for p in paths.values()))
    return 0


def _run(config: BenchConfig, args: argparse.Namespace) -> dict[str, Any]:
    result = run_benchmark(config)
    if args.profile:
        with torch_threads(config.threads):
            result["profile"] = report_lib.to_jsonable(_profile(config, args.profile_steps))
    return result


def _profile_only(config: BenchConfig, steps: int) -> dict[str, Any]:
    with torch_threads(config.threads):
        flops = count_flops(config, [v for v in plan_variants(config) if v.ldb is not None][:1])
        profile = _profile(config, steps)
        env = environment(config)
    return report_lib.to_jsonable(
        {
            "schema": report_lib.SCHEMA,
            "kind": "profile",
            "config": config_to_dict(config),
            "environment": env,
            "flops": flops,
            "profile": profile,
        }
    )


def _profile(config: BenchConfig, steps: int) -> dict[str, Any]:
    ldb = dict(config.ldb)
    if config.sweep is not None and config.sweep[0] in ldb:
        ldb[config.sweep[0]] = config.sweep[1][0]
    print(f"Profiling full and DROP steps ({steps} timed steps each)...")
    return profile_steps(
        make_module(config),
        LayerDropBackCallback(seed=config.seed, **ldb),
        config.seed,
        config.batch_size,
        config.train_samples,
        (config.channels, config.image_size, config.image_size),
        config.num_classes,
        steps=steps,
        lr=config.lr,
        device="cuda" if uses_cuda(config.accelerator) else "cpu",
    )


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
