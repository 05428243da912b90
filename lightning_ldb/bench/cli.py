"""``ldb-bench`` (``python -m lightning_ldb.bench``): why LDB is faster or slower, in one command.

Examples::

    ldb-bench --quick                                 # digits CNN on real digits, every variant, 2 repetitions
    ldb-bench --model resnet18 --epochs 5             # ResNet-18, CIFAR stem, CIFAR-shaped synthetic data
    ldb-bench --model mnist1d-cnn --variants baseline,ldb,batch-only
    ldb-bench --suite gpu                             # ResNet-50 and ViT-B/16 on one GPU
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import time
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from lightning_ldb.bench import report
from lightning_ldb.bench.runner import (
    PAPER_LDB,
    VARIANTS,
    BenchConfig,
    run_benchmark,
    variant_names,
)
from lightning_ldb.bench.workloads import WORKLOADS
from lightning_ldb.callback import LayerDropBackCallback

#: ``--quick``: real data, a cheap model, every variant twice.
QUICK = {"model": "digits_cnn", "epochs": 4, "repeats": 2}

#: ``--suite gpu``: the issue's GPU measurement, one entry per model (explicit flags override each).
GPU_SUITE = (
    {"model": "resnet50", "epochs": 5, "repeats": 2, "variants": "baseline,ldb,batch-only,ldb-block"},
    {"model": "vit-b16", "epochs": 4, "repeats": 2, "variants": "baseline,ldb,batch-only,ldb-block"},
)

#: Defaults of the options whose default does not come from the model preset.
DEFAULTS: dict[str, Any] = {
    "model": "resnet18",
    "epochs": 5,
    "val_samples": 256,
    "repeats": 2,
    "skip_epochs": 1,
    "seed": 0,
    "accelerator": "auto",
    "sd_rate": 0.5,
    **PAPER_LDB,
}


def _number(kind: type, low: float, high: Optional[float] = None, low_open: bool = False) -> Callable[[str], Any]:
    """An argparse ``type``: a ``kind`` in ``[low, high)`` (``(low, ...`` if ``low_open``), else a one-line error."""
    interval = f"{'(' if low_open else '['}{low:g}, {'inf' if high is None else f'{high:g}'})"
    noun = "an integer" if kind is int else "a number"

    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {noun} in {interval}, got {text!r}") from None
        if value < low or (low_open and value == low) or (high is not None and value >= high) or value != value:
            raise argparse.ArgumentTypeError(f"expected {noun} in {interval}, got {text!r}")
        return value

    return parse


def _variants(text: str) -> tuple[str, ...]:
    try:
        return variant_names([name.strip() for name in text.split(",") if name.strip()])
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


#: ``(group, flag, type, help)`` of every option; ``(default: ...)`` is added from :data:`DEFAULTS` where it is there.
_PRESET, _LDB, _MEASURE = (
    "what to train (a model preset picks its own data and input shape)",
    "LayerDropBack (defaults: the paper's settings)",
    "measurement",
)
_OPTIONS: tuple[tuple[str, str, Optional[Callable[[str], Any]], str], ...] = (
    (_PRESET, "--epochs", _number(int, 1), "training epochs per run"),
    (_PRESET, "--train-samples", _number(int, 1), "training samples (default: the preset's)"),
    (_PRESET, "--val-samples", _number(int, 1), "validation samples"),
    (_PRESET, "--batch-size", _number(int, 1), "base (full-epoch) batch size (default: the preset's)"),
    (_PRESET, "--lr", _number(float, 0, low_open=True), "base SGD learning rate (default: the preset's)"),
    (_PRESET, "--image-size", _number(int, 1), "side of synthetic images (default: the preset's)"),
    (_PRESET, "--seed", _number(int, 0), "seed of weights, data order and draws"),
    (_PRESET, "--accelerator", None, "Lightning accelerator: auto, cpu, gpu"),
    (_PRESET, "--precision", None, "Lightning precision (default: 32-true; bf16-mixed for --suite gpu on a GPU)"),
    (_PRESET, "--threads", _number(int, 1), "torch CPU threads (default: 1 on CPU, measured faster on small or"
     " shared machines than torch's choice, which is kept on a GPU)"),
    (_LDB, "--drop-rate", _number(float, 0, 1), "fraction of candidate layers dropped"),
    (_LDB, "--every", _number(int, 1), "a DROP epoch every N epochs"),
    (_LDB, "--lr-scale", _number(float, 0, low_open=True), "DROP-epoch learning-rate factor"),
    (_LDB, "--batch-scale", _number(int, 1), "DROP-epoch batch-size factor"),
    (_LDB, "--keep-first", _number(int, 0), "first layers never dropped"),
    (_LDB, "--keep-last", _number(int, 0), "last layers never dropped"),
    (_LDB, "--sd-rate", _number(float, 0, 1), "stochastic-depth: the last block's drop rate, decaying linearly"
     " to the first (Huang et al.)"),
    (_MEASURE, "--variants", _variants, "comma-separated, from: "
     + "; ".join(f"{name}: {what}" for name, (_, what) in VARIANTS.items())
     + " (default: all that apply: ldb-block on residual models, stochastic-depth on ResNets)"),
    (_MEASURE, "--repeats", _number(int, 1), "repetitions, the run order alternating"),
    (_MEASURE, "--skip-epochs", _number(int, 0), "warm-up epochs left out of the DROP / full epoch ratio"),
)  # fmt: skip


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ldb-bench",
        description="Train one model with LayerDropBack and its attribution variants side by side (same data,"
        " seed and hyperparameters) and print which part of the speed-up is the batch/LR schedule and which the"
        " dropping. Writes report.json (all numbers), report.md and report.png.",
    )
    groups = {title: parser.add_argument_group(title) for title in (_PRESET, _LDB, _MEASURE)}
    models = "; ".join(f"{name} ({workload.about})" for name, workload in WORKLOADS.items())
    groups[_PRESET].add_argument(
        "--model", choices=tuple(WORKLOADS), metavar="NAME", help=f"one of {models} (default: resnet18)"
    )
    groups[_PRESET].add_argument(
        "--quick",
        action="store_true",
        help="the short check: digits_cnn on the real 8x8 digits, 4 epochs, 2 repetitions, every variant;"
        " meant to finish within 3 minutes on 2 CPU cores",
    )
    groups[_PRESET].add_argument(
        "--suite",
        choices=("gpu",),
        help="gpu: ResNet-50 (32x32, from scratch) and ViT-B/16 (224x224) with baseline, ldb, batch-only and"
        " ldb-block, each in its own folder under --out; other flags given override the suite's sizes",
    )
    for group, flag, kind, text in _OPTIONS:
        name = flag[2:].replace("-", "_")
        default = f" (default: {DEFAULTS[name]:g})" if isinstance(DEFAULTS.get(name), float) else ""
        default = default or (f" (default: {DEFAULTS[name]})" if name in DEFAULTS else "")
        groups[group].add_argument(flag, type=kind, help=text + default)
    groups[_MEASURE].add_argument(
        "--out", type=Path, default=Path("outputs/ldb-bench"), help="output folder (default: outputs/ldb-bench)"
    )
    return parser


def resolve(args: argparse.Namespace, preset: dict[str, Any], parser: argparse.ArgumentParser) -> BenchConfig:
    """The configuration: explicit flags, then ``preset`` (``--quick``, a suite entry), then the model's defaults.

    Bad combinations end in ``parser.error`` (one line naming the argument, exit code 2).
    """

    def pick(name: str, fallback: Any = None) -> Any:
        value = getattr(args, name, None)
        if value is not None:
            return value
        return preset.get(name, DEFAULTS.get(name, fallback))

    model = pick("model")
    workload = WORKLOADS[model]
    accelerator = pick("accelerator")
    on_gpu = accelerator in ("auto", "gpu", "cuda") and torch.cuda.is_available()
    if args.image_size is not None and workload.data != "synthetic":
        parser.error(f"argument --image-size: {model} trains on {workload.data} data of fixed shape {workload.shape}")
    variants = pick("variants")
    if isinstance(variants, str):
        variants = _variants(variants)
    if variants is None:
        variants = tuple(
            name for name in VARIANTS
            if (name != "ldb-block" or workload.branches) and (name != "stochastic-depth" or workload.residual)
        )  # fmt: skip
    if "ldb-block" in variants and not workload.branches:
        parser.error(f"argument --variants: ldb-block needs residual branches, which --model {model} has not")
    if "stochastic-depth" in variants and not workload.residual:
        parser.error(f"argument --variants: stochastic-depth needs a ResNet, got --model {model}")
    config = BenchConfig(
        model=model,
        variants=variants,
        epochs=pick("epochs"),
        train_samples=pick("train_samples", workload.train_samples),
        val_samples=pick("val_samples"),
        batch_size=pick("batch_size", workload.batch_size),
        lr=pick("lr", workload.lr),
        image_size=args.image_size,
        repeats=pick("repeats"),
        skip_epochs=pick("skip_epochs"),
        seed=pick("seed"),
        threads=pick("threads", None if on_gpu else 1),
        accelerator=accelerator,
        precision=pick("precision", "bf16-mixed" if on_gpu and preset.get("suite") else "32-true"),
        sd_rate=pick("sd_rate"),
        ldb={key: pick(key) for key in PAPER_LDB},
    )
    _check(config, parser)
    return config


def _check(config: BenchConfig, parser: argparse.ArgumentParser) -> None:
    if config.skip_epochs >= config.epochs:
        parser.error(f"argument --skip-epochs: must be below --epochs ({config.epochs}), got {config.skip_epochs}")
    if any(config.callback_args(v) for v in config.variants) and config.ldb["every"] >= config.epochs:
        parser.error(f"argument --every: {config.ldb['every']} leaves no DROP epoch in {config.epochs} epochs;"
                     f" raise --epochs above it")  # fmt: skip
    for variant in config.variants:
        args = config.callback_args(variant)
        try:
            if args is not None:
                LayerDropBackCallback(**args)
        except (TypeError, ValueError) as error:
            parser.error(f"LDB settings of variant {variant}: {error}")


@contextlib.contextmanager
def _quiet_lightning() -> Iterator[None]:
    """Hide Lightning's banners and data-loader hints (the benchmark prints its own progress), then restore."""
    logger = logging.getLogger("lightning.pytorch")
    level = logger.level
    logger.setLevel(logging.WARNING)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*does not have many workers.*")
            warnings.filterwarnings("ignore", message=".*is smaller than the logging interval.*")
            warnings.filterwarnings("ignore", message=".*reload_dataloaders_every_n_epochs.*")
            yield
    finally:
        logger.setLevel(level)


def _warn_if_busy() -> None:
    try:
        load, cores = os.getloadavg()[0], os.cpu_count() or 1
    except (AttributeError, OSError):
        return
    if load > 0.75 * cores:
        print(f"Note: load average {load:.1f} on {cores} cores; other jobs share this machine, so expect wide ranges.")


def write_outputs(result: dict[str, Any], out: Path) -> str:
    """Write ``report.json``, ``report.md`` and ``report.png`` into ``out``; return the Markdown."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps(result, indent=1, allow_nan=False) + "\n")
    markdown = report.render_markdown(result)
    (out / "report.md").write_text(markdown)
    report.plot(result, out / "report.png")
    return markdown


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of ``ldb-bench``; returns the exit code (argument errors exit with 2)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.quick and args.suite:
        parser.error("argument --quick: not allowed with --suite")
    if args.suite:
        if args.model is not None:
            parser.error("argument --model: not allowed with --suite (the suite names its models)")
        plans = [(resolve(args, {**entry, "suite": True}, parser), args.out / entry["model"]) for entry in GPU_SUITE]
    else:
        plans = [(resolve(args, QUICK if args.quick else {}, parser), args.out)]
    _warn_if_busy()
    started = time.perf_counter()
    with _quiet_lightning():
        for config, out in plans:
            markdown = write_outputs(run_benchmark(config), out)
            print("\n" + markdown + f"Wrote {out}/report.json, report.md, report.png")
    print(f"ldb-bench finished in {time.perf_counter() - started:.0f} s.")
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
