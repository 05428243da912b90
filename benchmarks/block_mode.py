"""FLOPs and time of one DROP step at equal batch: full vs ``backward="weights"`` vs ``backward="block"``.

A standalone measurement, not a test. It uses LDB's mechanisms directly, exactly as a DROP step of
the callback uses them:

* weights mode: the candidates of :func:`lightning_ldb.layers.select_candidates` (``keep_first=4``,
  ``keep_last=1``), the draw of :func:`lightning_ldb.schedule.draw_dropped`, and
  :class:`lightning_ldb.dropping.ParameterFreezer` on the dropped layers;
* block mode: the branches of :func:`lightning_ldb.branches.discover_branches`, filtered by
  :func:`lightning_ldb.branches.select_branch_candidates` with the same ``keep_first``/``keep_last``,
  the same draw function, the same freezer on the dropped branches' parameters, and
  :class:`lightning_ldb.dropping.BranchInputDetacher` on their entries.

A step is ``zero_grad``, drop, forward, cross-entropy, backward, SGD step (momentum and weight
decay), release. Steps of all modes are interleaved within each repeat, and every time ratio is taken
within one repeat (mode over the full step of that repeat; the order rotates from repeat to repeat),
so slow drifts of a shared machine cancel;
the report gives the median and the range over repeats, wall-clock and process CPU time.

FLOPs (``torch.utils.flop_counter``: matrix products and convolutions, forward and backward) are
counted on a ``meta``-device copy, so they cost nothing and cover many draws: the report gives the
mean and range over ``--draws`` draws (epochs 2, 4, ...), and the FLOPs of the timed draws.

Example::

    PYTHONPATH=$PWD python benchmarks/block_mode.py --threads 1 --out benchmarks/results/block-mode
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from lightning_ldb.branches import Branch, discover_branches, select_branch_candidates
from lightning_ldb.dropping import BranchInputDetacher, ParameterFreezer
from lightning_ldb.layers import Layer, discover_layers, select_candidates
from lightning_ldb.schedule import draw_dropped

KEEP_FIRST, KEEP_LAST = 4, 1  # the callback's defaults (the paper's)


def resnet18_cifar() -> nn.Module:
    """torchvision ResNet-18 with the CIFAR stem: 3x3 stride-1 first conv, no max-pool, 10 classes."""
    from torchvision.models import resnet18

    model = resnet18(num_classes=10)
    model.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
    model.maxpool = nn.Identity()
    return model


def small_vit() -> nn.Module:
    """A small timm ViT for 32x32 inputs: patch 4 (64 tokens), width 192, depth 6, 3 heads."""
    import timm

    return timm.models.VisionTransformer(
        img_size=32, patch_size=4, embed_dim=192, depth=6, num_heads=3, num_classes=10, global_pool="token"
    )


MODELS: dict[str, Callable[[], nn.Module]] = {"resnet18-cifar": resnet18_cifar, "vit-small": small_vit}


@dataclass(frozen=True)
class Drop:
    """What one DROP step drops: the freezer's parameters and, in block mode, the detacher's branches."""

    mode: str
    drop_rate: float
    epoch: int
    parameters: tuple[nn.Parameter, ...]
    branches: tuple[Branch, ...]
    dropped: int
    candidates: int

    @property
    def key(self) -> str:
        return f"{self.mode}@p={self.drop_rate}"


def make_drop(model: nn.Module, mode: str, drop_rate: float, seed: int, epoch: int) -> Drop:
    """The draw a DROP epoch ``epoch`` makes in ``mode`` (``"weights"`` or ``"block"``) on ``model``."""
    layers = discover_layers(model)
    units: Sequence[Layer | Branch]
    if mode == "weights":
        units = select_candidates(layers, KEEP_FIRST, KEEP_LAST)
    else:
        units = select_branch_candidates(discover_branches(model), layers, KEEP_FIRST, KEEP_LAST)
    flags = draw_dropped(len(units), drop_rate, seed, epoch)
    dropped = [unit for unit, drop in zip(units, flags) if drop]
    params = tuple(p for unit in dropped for p in unit.parameters)
    branches = tuple(unit for unit in dropped if isinstance(unit, Branch))
    return Drop(mode, drop_rate, epoch, params, branches, len(dropped), len(units))


def remake_on(model_copy: nn.Module, drop: Drop) -> Drop:
    """``drop`` re-made on a deep copy of its model: the same draw, the copy's parameters and modules."""
    return drop if drop.mode == "full" else make_drop(model_copy, drop.mode, drop.drop_rate, SEED, drop.epoch)


SEED = 0


def batch(model_name: str, size: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(size, 3, 32, 32, generator=generator)
    y = torch.randint(0, 10, (size,), generator=generator)
    return x.to(device), y.to(device)


def run_step(model: nn.Module, optimizer: torch.optim.Optimizer, drop: Drop, data: Any) -> None:
    """One training step with ``drop`` applied for its duration, as the callback applies it."""
    freezer, detacher = ParameterFreezer(), BranchInputDetacher()
    optimizer.zero_grad(set_to_none=True)
    freezer.freeze(drop.parameters)
    detacher.detach(drop.branches)
    try:
        x, y = data
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
    finally:
        detacher.restore()
        freezer.restore()


def count_flops(model: nn.Module, drop: Drop, data: Any) -> int:
    """FLOPs of forward and backward of one step with ``drop``, on a meta-device copy."""
    meta = copy.deepcopy(model).to("meta")
    meta_drop = remake_on(meta, drop)
    freezer, detacher = ParameterFreezer(), BranchInputDetacher()
    freezer.freeze(meta_drop.parameters)
    detacher.detach(meta_drop.branches)
    x, y = (t.to("meta") for t in data)
    with FlopCounterMode(display=False) as counter:
        nn.functional.cross_entropy(meta(x), y).backward()
    return counter.get_total_flops()


def _summary(values: Sequence[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values)}


def measure(model_name: str, args: argparse.Namespace) -> dict[str, Any]:
    torch.manual_seed(SEED)
    model = MODELS[model_name]()
    device = torch.device(args.device)
    model.to(device).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    data = batch(model_name, args.batch, device)
    full = Drop("full", 0.0, 0, (), (), 0, 0)

    # FLOPs over many draws (cheap on meta).
    flop_epochs = [2 * (i + 1) for i in range(args.draws)]
    full_flops = count_flops(model, full, data)
    flops: dict[str, Any] = {"full": full_flops}
    for p in args.drop_rates:
        for mode in ("weights", "block"):
            ratios = [count_flops(model, make_drop(model, mode, p, SEED, e), data) / full_flops for e in flop_epochs]
            flops[f"{mode}@p={p}"] = {"ratio_to_full": _summary(ratios), "mean": statistics.mean(ratios)}

    # Timed draws: the first ``--timed-draws`` of those epochs, used in turn by the repeats.
    timed_epochs = flop_epochs[: args.timed_draws]
    drops = {
        (mode, p, e): make_drop(model, mode, p, SEED, e)
        for p in args.drop_rates
        for mode in ("weights", "block")
        for e in timed_epochs
    }
    for d in drops.values():
        flops.setdefault("timed_draws", {})[f"{d.key}@epoch={d.epoch}"] = {
            "flops_ratio_to_full": count_flops(model, d, data) / full_flops,
            "dropped": d.dropped,
            "candidates": d.candidates,
            "dropped_numel": sum(p.numel() for p in d.parameters),
        }

    def timed(drop: Drop) -> tuple[float, float]:
        if device.type == "cuda":
            torch.cuda.synchronize()
        wall, cpu = time.perf_counter(), time.process_time()
        run_step(model, optimizer, drop, data)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - wall, time.process_time() - cpu

    for _ in range(args.warmup):
        timed(full)
        for d in drops.values():
            timed(d)

    keys = [f"{m}@p={p}" for p in args.drop_rates for m in ("weights", "block")]
    wall_ratios: dict[str, list[float]] = {k: [] for k in keys}
    cpu_ratios: dict[str, list[float]] = {k: [] for k in keys}
    wall_ms: dict[str, list[float]] = {k: [] for k in ["full", *keys]}
    for repeat in range(args.repeats):
        epoch = timed_epochs[repeat % len(timed_epochs)]
        # Rotate the order so that no step always runs first, or right after the same other step.
        slots = ["full", *keys]
        order = slots[repeat % len(slots) :] + slots[: repeat % len(slots)]
        times: dict[str, tuple[float, float]] = {}
        for key in order:
            if key == "full":
                times[key] = timed(full)
            else:
                mode, p = key.split("@p=")
                times[key] = timed(drops[(mode, float(p), epoch)])
            wall_ms[key].append(1000 * times[key][0])
        full_wall, full_cpu = times["full"]
        for key in keys:
            wall_ratios[key].append(times[key][0] / full_wall)
            cpu_ratios[key].append(times[key][1] / full_cpu)
        print(
            f"  {model_name} repeat {repeat + 1}/{args.repeats}: full {1000 * full_wall:.0f} ms, "
            + ", ".join(f"{k} {wall_ratios[k][-1]:.3f}x" for k in keys),
            flush=True,
        )

    return {
        "model": model_name,
        "batch": args.batch,
        "parameters": sum(p.numel() for p in model.parameters()),
        "branches": [b.name for b in discover_branches(model)],
        "flops": flops,
        "step_ms": {k: _summary(v) for k, v in wall_ms.items()},
        "wall_ratio_to_full": {k: _summary(v) for k, v in wall_ratios.items()},
        "cpu_ratio_to_full": {k: _summary(v) for k, v in cpu_ratios.items()},
        "raw": {"wall_ms": wall_ms, "wall_ratios": wall_ratios, "cpu_ratios": cpu_ratios},
    }


def table(result: dict[str, Any], drop_rates: Sequence[float]) -> str:
    lines = [
        f"### {result['model']} (batch {result['batch']}, full step {result['step_ms']['full']['median']:.0f} ms median)",
        "",
        "| DROP step | FLOPs / full (mean over draws, range) | FLOPs / full (timed draws) | wall / full (median, range) | CPU / full (median, range) |",
        "| --- | --- | --- | --- | --- |",
    ]
    for p in drop_rates:
        for mode in ("weights", "block"):
            key = f"{mode}@p={p}"
            f = result["flops"][key]
            timed = [v["flops_ratio_to_full"] for k, v in result["flops"]["timed_draws"].items() if k.startswith(key + "@")]
            w, c = result["wall_ratio_to_full"][key], result["cpu_ratio_to_full"][key]
            lines.append(
                f"| {key} | {f['mean']:.3f} ({f['ratio_to_full']['min']:.3f}-{f['ratio_to_full']['max']:.3f}) | "
                + ", ".join(f"{t:.3f}" for t in timed)
                + f" | **{w['median']:.3f}** ({w['min']:.3f}-{w['max']:.3f}) | {c['median']:.3f} ({c['min']:.3f}-{c['max']:.3f}) |"
            )
    return "\n".join(lines)


def cpu_model() -> str:
    """The CPU's model name from ``/proc/cpuinfo`` (Linux), else what ``platform`` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="resnet18-cifar,vit-small", help=f"comma-separated, from {list(MODELS)}")
    parser.add_argument("--batch", type=int, default=32, help="samples per step, the same in every mode")
    parser.add_argument("--drop-rates", type=lambda s: [float(v) for v in s.split(",")], default=[0.3, 0.5])
    parser.add_argument("--repeats", type=int, default=7, help="interleaved timed repeats per model")
    parser.add_argument("--warmup", type=int, default=1, help="untimed rounds of every step first")
    parser.add_argument("--draws", type=int, default=20, help="draws (epochs 2, 4, ...) whose FLOPs are counted")
    parser.add_argument("--timed-draws", type=int, default=3, help="how many of those draws the repeats time, in turn")
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (1 on a shared CPU)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/block-mode"))
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    environment = {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "processor": cpu_model(),
        "cpu_count": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "device": args.device if args.device == "cpu" else torch.cuda.get_device_name(),
        "load_average_before": os.getloadavg(),
    }
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), device {environment['device']}", flush=True)
    results = [measure(name, args) for name in args.models.split(",")]
    environment["load_average_after"] = os.getloadavg()
    args.out.mkdir(parents=True, exist_ok=True)
    report = {"environment": environment, "args": {k: str(v) for k, v in vars(args).items()}, "results": results}
    (args.out / "block_mode.json").write_text(json.dumps(report, indent=2))
    markdown = "\n\n".join(table(r, args.drop_rates) for r in results)
    (args.out / "block_mode.md").write_text(
        f"torch {environment['torch']}, {environment['threads']} thread(s), {environment['device']},"
        f" load average {environment['load_average_before']} -> {environment['load_average_after']}\n\n{markdown}\n"
    )
    print(markdown)


if __name__ == "__main__":
    main()
