"""What LDB's DDP communication methods all-reduce, and how long a step takes, on FULL and DROP epochs.

Run (2 gloo processes on CPU; Lightning starts the second rank by re-running this script)::

    python benchmarks/ddp_communication.py                 # all configurations, about 2-4 minutes
    python benchmarks/ddp_communication.py --json out.json # also write the numbers

Each configuration trains the same MLP for 3 epochs (0 and 1 FULL, 2 DROP with ``every=2``) with
``strategy="ddp"``, ``accelerator="cpu"``, ``devices=2``:

* ``no LDB``: plain DDP, the reference;
* ``LDB epoch, rewrap``: ``resample="epoch"`` with LDB's default under DDP (a fresh DDP wrapper
  when the DROP epoch starts and ends);
* ``LDB epoch, find_unused``: the same draws with only ``find_unused_parameters=True`` (what LDB did
  before; forced with ``communication="find_unused"``);
* ``LDB step, hook``: ``resample="step"`` with LDB's default (``find_unused_parameters=True`` and a
  communication hook that all-reduces only the trainable gradients);
* ``LDB step, find_unused``: ``resample="step"`` without the hook.

Bytes are counted by ``torch.profiler`` from the gloo collectives themselves (``record_shapes``)
over a few profiled steps per epoch; they are deterministic and the primary measure. Step times
are the median and 10th percentile of the wall clock over the other steps on rank 0, plus the
median CPU time of rank 0's process (all its threads, gloo's included), which is less sensitive
to other programs competing for the cores; all of them are noisy on a shared 2-core machine.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from typing import Any, Callable, Optional

import lightning
import torch
from lightning.pytorch import LightningModule, Trainer, seed_everything
from lightning.pytorch.callbacks import Callback
from torch import nn
from torch.profiler import ProfilerActivity, profile
from torch.utils.data import DataLoader, TensorDataset

from lightning_ldb import LayerDropBackCallback

#: (label, resample or None for no LDB, communication method forced through the environment)
CONFIGURATIONS: list[tuple[str, Optional[str], str]] = [
    ("no LDB", None, "auto"),
    ("LDB epoch, rewrap", "epoch", "auto"),
    ("LDB epoch, find_unused", "epoch", "find_unused"),
    ("LDB step, hook", "step", "auto"),
    ("LDB step, find_unused", "step", "find_unused"),
]
_BYTES = {"float": 4, "double": 8, "half": 2, "bfloat16": 2, "int": 4, "long int": 8, "long": 8, "bool": 1}


class DeepMLP(LightningModule):
    """``depth`` Linear layers of ``width`` units: gradients large enough for communication to matter."""

    def __init__(self, width: int, depth: int, samples: int, batch_size: int) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        for _ in range(depth - 1):
            layers += [nn.Linear(width, width), nn.ReLU()]
        layers.append(nn.Linear(width, 1))
        self.net = nn.Sequential(*layers)
        generator = torch.Generator().manual_seed(0)
        self.data = TensorDataset(torch.randn(samples, width, generator=generator), torch.randn(samples, 1, generator=generator))
        self.batch_size = batch_size

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return nn.functional.mse_loss(self.net(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=1e-3, momentum=0.9)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.data, batch_size=self.batch_size)


class CommunicationMeter(Callback):
    """Placed after the LDB callback: times steps, and counts the collectives of a few profiled steps."""

    def __init__(self, profiled_batches: tuple[int, ...], warmup: int) -> None:
        self.profiled_batches = profiled_batches
        self.warmup = warmup
        self.epochs: dict[int, dict[str, Any]] = {}
        self._profiler: Optional[profile] = None
        self._started = 0.0
        self._started_cpu = 0.0

    def on_train_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        ldb = next((cb for cb in trainer.callbacks if isinstance(cb, LayerDropBackCallback)), None)
        total = sum(p.numel() for p in pl_module.parameters())
        trainable = sum(p.numel() for p in pl_module.parameters() if p.requires_grad)
        self.epochs[trainer.current_epoch] = {
            "mode": ldb.mode if ldb is not None else "full",
            "trainable_fraction_at_start": trainable / total,
            "step_seconds": [],
            "step_cpu_seconds": [],
            "profiled": [],
        }

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        if batch_idx in self.profiled_batches:
            self._profiler = profile(activities=[ProfilerActivity.CPU], record_shapes=True)
            self._profiler.__enter__()
        self._started = time.perf_counter()
        self._started_cpu = time.process_time()

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        elapsed = time.perf_counter() - self._started
        cpu = time.process_time() - self._started_cpu
        record = self.epochs[trainer.current_epoch]
        if self._profiler is None:
            if batch_idx >= self.warmup:
                record["step_seconds"].append(elapsed)
                record["step_cpu_seconds"].append(cpu)
            return
        self._profiler.__exit__(None, None, None)
        record["profiled"].append(collective_bytes(self._profiler))
        self._profiler = None


def collective_bytes(profiler: profile) -> dict[str, int]:
    """Bytes each kind of gloo collective moved in ``profiler``'s window (input sizes, per rank)."""
    totals: dict[str, int] = {}
    for event in profiler.events():
        if not event.name.startswith("gloo:"):
            continue
        dtypes = [str(d) for d in (getattr(event, "input_dtypes", None) or [])]
        size = _BYTES.get(dtypes[0], 4) if dtypes else 4
        numel = sum(_prod(shape) for shape in event.input_shapes if shape)
        # Gradients are float all-reduces; DDP's per-step "which parameters were used" map is an int one.
        integral = bool(dtypes) and ("int" in dtypes[0] or "long" in dtypes[0])
        kind = event.name[len("gloo:") :] + (" (int)" if integral else "")
        totals[kind] = totals.get(kind, 0) + numel * size
    return totals


def _prod(shape: list[int]) -> int:
    result = 1
    for size in shape:
        result *= size
    return result


class BoundaryClock(Callback):
    """Times (and for one boundary, profiles) the LDB hooks where the re-wrap happens: at an epoch's first batch
    (LDB applies the epoch's draw there) and at its end.

    Two instances bracket the LDB callback: ``first=True`` before it, ``first=False`` after it.
    """

    def __init__(self, first: bool, shared: dict[str, Any], profiled_epoch: int) -> None:
        self.first = first
        self.shared = shared
        self.profiled_epoch = profiled_epoch

    def _mark(self, trainer: Trainer, where: str) -> None:
        key = f"epoch {trainer.current_epoch} {where}"
        profiled = where == "start" and trainer.current_epoch == self.profiled_epoch
        if self.first:
            if profiled:
                self.shared["profiler"] = profile(activities=[ProfilerActivity.CPU], record_shapes=True)
                self.shared["profiler"].__enter__()
            self.shared["t0"] = time.perf_counter()
            return
        elapsed = time.perf_counter() - self.shared.pop("t0")
        entry = self.shared.setdefault("boundaries", {}).setdefault(key, {})
        if profiled:
            prof = self.shared.pop("profiler")
            prof.__exit__(None, None, None)
            entry["bytes"] = collective_bytes(prof)
        else:
            entry["seconds"] = elapsed

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        if batch_idx == 0:
            self._mark(trainer, "start")

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._mark(trainer, "end")


def run_configuration(args: argparse.Namespace, label: str, resample: Optional[str], method: str) -> dict[str, Any]:
    seed_everything(0)
    model = DeepMLP(args.width, args.depth, samples=args.batch_size * args.steps * 2, batch_size=args.batch_size)
    profiled = tuple(range(args.warmup, args.warmup + args.profiled))
    meter = CommunicationMeter(profiled_batches=profiled, warmup=args.warmup + args.profiled)
    shared: dict[str, Any] = {}
    callbacks: list[Callback] = [BoundaryClock(True, shared, profiled_epoch=2)]
    if resample is not None:
        ldb = LayerDropBackCallback(
            drop_rate=args.drop_rate, every=2, batch_scale=1, resample=resample, seed=0, communication=method
        )
        callbacks.append(ldb)
    callbacks += [BoundaryClock(False, shared, profiled_epoch=2), meter]
    trainer = Trainer(
        accelerator="cpu",
        devices=2,
        strategy="ddp",
        max_epochs=3,
        callbacks=callbacks,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
    )
    trainer.fit(model)
    epochs = {}
    for epoch, record in meter.epochs.items():
        profiled = record["profiled"]
        kinds = sorted({k for p in profiled for k in p})
        epochs[epoch] = {
            "mode": record["mode"],
            "bytes_per_step": {k: statistics.mean(p.get(k, 0) for p in profiled) for k in kinds},
            "step_ms_median": 1000 * statistics.median(record["step_seconds"]),
            "step_ms_p10": 1000 * statistics.quantiles(record["step_seconds"], n=10)[0],
            "step_cpu_ms_median": 1000 * statistics.median(record["step_cpu_seconds"]),
            "steps_timed": len(record["step_seconds"]),
        }
    return {"label": label, "epochs": epochs, "boundaries": shared.get("boundaries", {}), "rank": trainer.global_rank}


def print_report(results: list[dict[str, Any]], args: argparse.Namespace, param_bytes: int) -> None:
    print()
    print(
        f"DDP communication per optimizer step: 2 gloo processes on CPU ({os.cpu_count()} cores), torch {torch.__version__},"
        f" lightning {lightning.__version__}; load average {args.load_before:.1f} before, {os.getloadavg()[0]:.1f} after"
    )
    print(
        f"model: {args.depth} x Linear({args.width}, {args.width}) MLP, {param_bytes / 1e6:.2f} MB of float32 gradients;"
        f" batch {args.batch_size} per rank; LDB drop_rate={args.drop_rate}, keep_first=4, keep_last=1, every=2"
    )
    header = (
        f"{'configuration':<24} {'epoch':>5} {'mode':>4}  {'grad all-reduce/step':>20} {'vs full':>8}"
        f"  {'other collectives/step':<24} {'step ms median':>14} {'p10':>6} {'CPU ms':>7}"
    )
    print(header)
    print("-" * len(header))
    for result in results:
        full = result["epochs"][1]["bytes_per_step"].get("all_reduce", 0)
        for epoch in (1, 2):
            record = result["epochs"][epoch]
            grads = record["bytes_per_step"].get("all_reduce", 0)
            other = ", ".join(f"{k} {v:,.0f} B" for k, v in record["bytes_per_step"].items() if k != "all_reduce") or "-"
            print(
                f"{result['label']:<24} {epoch:>5} {record['mode']:>4}  {grads / 1e6:>17.3f} MB {grads / full:>8.1%}"
                f"  {other:<24} {record['step_ms_median']:>14.1f} {record['step_ms_p10']:>6.1f}"
                f" {record['step_cpu_ms_median']:>7.1f}"
            )
    print()
    print("Epoch boundaries (LDB's own hooks: the draw check and, with rewrap, the new DDP wrapper):")
    for result in results:
        if result["label"] == "no LDB":
            continue
        bounds = result["boundaries"]
        start = bounds.get("epoch 2 start", {}).get("bytes", {})
        moved = ", ".join(f"{k} {v / 1e6:.3f} MB" if v > 1e4 else f"{k} {v} B" for k, v in start.items()) or "nothing"
        seconds = bounds.get("epoch 2 end", {}).get("seconds", float("nan"))
        print(f"  {result['label']:<24} DROP start moved: {moved}; DROP end took {1000 * seconds:.1f} ms")


def run_benchmark(
    description: str,
    configurations: list[tuple[str, Optional[str], str]],
    run: Callable[[argparse.Namespace, str, Optional[str], str], dict[str, Any]],
    report: Callable[[list[dict[str, Any]], argparse.Namespace, int], None],
    steps: int,
    profiled: int,
) -> None:
    """The command line both communication benchmarks share: parse, run each configuration, report on rank 0."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--width", type=int, default=512)
    parser.add_argument("--depth", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=steps, help="optimizer steps per epoch and rank")
    parser.add_argument("--profiled", type=int, default=profiled, help="steps per epoch whose collectives are counted")
    parser.add_argument("--warmup", type=int, default=2, help="steps of each epoch left out of the timings")
    parser.add_argument("--drop-rate", type=float, default=0.3)
    parser.add_argument("--only", nargs="*", help="labels of the configurations to run (default: all)")
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args()
    args.load_before = os.getloadavg()[0]
    torch.set_num_threads(1)  # one core per rank: the two ranks share the machine's two cores
    results = [run(args, *configuration) for configuration in configurations if not args.only or configuration[0] in args.only]
    if results and results[0]["rank"] == 0:
        param_bytes = 4 * sum(p.numel() for p in DeepMLP(args.width, args.depth, 1, 1).parameters())
        report(results, args, param_bytes)
        if args.json:
            with open(args.json, "w") as handle:
                json.dump({"args": vars(args), "results": results}, handle, indent=1)


def main() -> None:
    run_benchmark(__doc__, CONFIGURATIONS, run_configuration, print_report, steps=30, profiled=4)


if __name__ == "__main__":
    main()
