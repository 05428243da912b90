"""Compare an LDB run with its baseline, as the paper's tables do: speed-up and accuracy difference.

Run both with the same base and experiment configs (they log to lightning_logs/<experiment>/<method>/):

    ldb fit -c configs/base/cifar.yaml -c configs/scratch/cifar10_resnet50.yaml -c configs/method/baseline.yaml
    ldb fit -c configs/base/cifar.yaml -c configs/scratch/cifar10_resnet50.yaml -c configs/method/ldb.yaml
    python examples/compare_runs.py lightning_logs/cifar10_resnet50 --plot cifar10_resnet50.png

or name the two metrics.csv files: --baseline PATH --ldb PATH. ``--plot`` draws the training-loss
and validation curves of both runs (the paper's Figure 4).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional, Sequence

from lightning_ldb.examples import Comparison, compare_runs


def plot(comparison: Comparison, path: Path) -> None:
    """Training loss and the monitored metric per epoch, baseline and LDB on the same axes."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display needed
    import matplotlib.pyplot as plt

    figure, (loss_axes, metric_axes) = plt.subplots(1, 2, figsize=(10, 4))
    for name, run in (("baseline", comparison.baseline), ("LDB", comparison.ldb)):
        if run.train_loss:
            loss_axes.plot(range(len(run.train_loss)), run.train_loss, label=name)
        metric_axes.plot(range(len(run.monitored)), run.monitored, label=name)
    loss_axes.set(xlabel="epoch", ylabel="training loss", title="Training loss")
    metric_axes.set(xlabel="epoch", ylabel=comparison.monitor, title=comparison.monitor)
    for axes in (loss_axes, metric_axes):
        axes.legend()
        axes.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("experiment", nargs="?", type=Path, help="folder holding baseline/ and ldb/ runs")
    parser.add_argument("--baseline", type=Path, help="metrics.csv of the baseline run")
    parser.add_argument("--ldb", type=Path, help="metrics.csv of the LDB run")
    parser.add_argument("--monitor", default="val_acc", help="validation metric to compare (default: val_acc)")
    parser.add_argument("--plot", type=Path, help="write the loss and metric curves to this image file")
    args = parser.parse_args(argv)
    if args.experiment is not None:
        args.baseline = args.baseline or args.experiment / "baseline" / "metrics.csv"
        args.ldb = args.ldb or args.experiment / "ldb" / "metrics.csv"
    if args.baseline is None or args.ldb is None:
        parser.error("give an experiment folder, or both --baseline and --ldb")
    for path in (args.baseline, args.ldb):
        if not path.is_file():
            parser.error(f"{path} does not exist: run the experiment first (see the commands above)")

    comparison = compare_runs(args.baseline, args.ldb, monitor=args.monitor)
    print(comparison.format())
    if args.plot is not None:
        plot(comparison, args.plot)
        print(f"Curves written to {args.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
