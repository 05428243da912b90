"""What ``LayerDropBack`` costs a plain PyTorch loop on epochs where it drops nothing.

A standalone measurement, not a test. The same loop (forward, cross-entropy, backward, SGD step) runs full epochs
with and without the engine, on fresh models built from one seed; the two alternate within each repeat and each
ratio is taken within one repeat, so slow drifts of a shared machine cancel. Epoch 0 of each run is left out: there
the engine records the run order, once per training run. The engine runs ``every=1000`` so that every measured epoch
is a full one: what is timed is only what it adds (its ``epoch()`` block and its hooks), never a saving.

Example::

    python benchmarks/engine_overhead.py --out benchmarks/results/engine-overhead
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn

from lightning_ldb import LayerDropBack


def deep_mlp() -> nn.Module:
    """64 blocks of Linear(32, 32) and ReLU and a head: 130 modules, each cheap, so per-module costs show."""
    return nn.Sequential(*[m for _ in range(64) for m in (nn.Linear(32, 32), nn.ReLU())], nn.Linear(32, 10))


def resnet18_small() -> nn.Module:
    """torchvision ResNet-18 (68 modules) on 16x16 inputs."""
    from torchvision.models import resnet18

    return resnet18(num_classes=10)


MODELS: dict[str, tuple[Callable[[], nn.Module], tuple[int, ...]]] = {
    "mlp-130-modules": (deep_mlp, (32,)),
    "resnet18-16px": (resnet18_small, (3, 16, 16)),
}


def run(name: str, with_engine: bool, epochs: int, samples: int, batch: int) -> list[float]:
    """Seconds of each epoch after the first, for one fresh model."""
    make, shape = MODELS[name]
    torch.manual_seed(0)
    model = make()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    ldb: Optional[LayerDropBack] = LayerDropBack(model, optimizer, every=1000, seed=0) if with_engine else None
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(samples, *shape, generator=generator)
    y = torch.randint(0, 10, (samples,), generator=generator)
    seconds = []
    for epoch in range(epochs):
        start = time.perf_counter()
        with ldb.epoch(epoch) if ldb is not None else contextlib.nullcontext():
            for i in range(0, samples, batch):
                nn.functional.cross_entropy(model(x[i : i + batch]), y[i : i + batch]).backward()
                optimizer.step()
                optimizer.zero_grad()
        seconds.append(time.perf_counter() - start)
    return seconds[1:]


def measure(name: str, args: argparse.Namespace) -> dict[str, Any]:
    ratios, plain_ms, engine_ms = [], [], []
    for repeat in range(args.repeats):
        order = [False, True] if repeat % 2 == 0 else [True, False]
        times = {kind: statistics.median(run(name, kind, args.epochs, args.samples, args.batch)) for kind in order}
        ratios.append(times[True] / times[False])
        plain_ms.append(1000 * times[False])
        engine_ms.append(1000 * times[True])
        print(f"  {name} repeat {repeat + 1}/{args.repeats}: plain {plain_ms[-1]:.1f} ms/epoch,"
              f" engine {engine_ms[-1]:.1f} ms/epoch, {ratios[-1]:.3f}x", flush=True)  # fmt: skip
    modules = sum(1 for _ in MODELS[name][0]().modules())
    return {
        "model": name,
        "modules": modules,
        "plain_ms": statistics.median(plain_ms),
        "engine_ms": statistics.median(engine_ms),
        "ratio": {"median": statistics.median(ratios), "min": min(ratios), "max": max(ratios), "n": len(ratios)},
    }


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default=",".join(MODELS), help=f"comma-separated, from {list(MODELS)}")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--epochs", type=int, default=4, help="per run; the first is left out")
    parser.add_argument("--samples", type=int, default=256)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()
    results = [measure(name, args) for name in args.models.split(",")]
    lines = ["| model | modules | plain loop (ms/epoch) | with LayerDropBack (ms/epoch) | ratio (median, range) |",
             "| --- | --- | --- | --- | --- |"]  # fmt: skip
    for r in results:
        q = r["ratio"]
        lines.append(f"| {r['model']} | {r['modules']} | {r['plain_ms']:.1f} | {r['engine_ms']:.1f} |"
                     f" {q['median']:.3f} ({q['min']:.3f} to {q['max']:.3f}, n={q['n']}) |")  # fmt: skip
    table = "\n".join(lines)
    print(table)
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        environment = {"torch": torch.__version__, "python": platform.python_version(), "cpu_count": os.cpu_count(),
                       "threads": args.threads, "load_average_before": load_before,
                       "load_average_after": os.getloadavg()}  # fmt: skip
        (args.out / "engine_overhead.json").write_text(
            json.dumps({"environment": environment, "args": {k: str(v) for k, v in vars(args).items()},
                        "results": results}, indent=1) + "\n"  # fmt: skip
        )
        (args.out / "engine_overhead.md").write_text(table + "\n")


if __name__ == "__main__":
    main()
