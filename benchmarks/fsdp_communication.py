"""What FSDP2 communicates per optimizer step on FULL and DROP epochs under LDB, and how long a step takes.

Run (2 gloo processes on CPU; Lightning starts the second rank by re-running this script)::

    python benchmarks/fsdp_communication.py                  # all configurations, about 1-3 minutes
    python benchmarks/fsdp_communication.py --json out.json  # also write the numbers

Each configuration trains the same MLP as ``ddp_communication.py`` for 3 epochs (0 and 1 FULL, 2
DROP with ``every=2``) under ``ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1)``,
``accelerator="cpu"``, ``devices=2``, with FSDP2 ``fully_shard`` applied in ``configure_model``:

* ``no LDB``: plain FSDP2, one group per Linear plus the root, the reference;
* ``LDB epoch, per-layer``: ``resample="epoch"``, the same groups;
* ``LDB step, per-layer``: ``resample="step"``, the same groups;
* ``LDB epoch, one group``: ``fully_shard`` on the root only, so every parameter is in one group;
* ``LDB epoch, unused on``: per-layer groups with ``set_reduce_scatter_unused_params(True)``
  (FSDP2's public switch that reduce-scatters zeros for parameters that got no gradient).

Over a few profiled steps per epoch, per rank, it counts (deterministic, the primary measure):

* the gradient bytes and calls FSDP2 hands to ``torch.distributed.reduce_scatter_single`` (one call
  per group with at least one gradient), by wrapping that function in this script;
* what gloo itself moved, from ``torch.profiler`` (``record_shapes``): gloo performs that
  reduce-scatter as an ``all_reduce`` of the whole input (NCCL has a native reduce-scatter), and the
  parameter ``all_gather`` s before the forward and, with the default ``reshard_after_forward=True``,
  again before the backward (input sizes: each rank's shard).

Step times (median wall clock over the other steps on rank 0, and the median CPU time of rank 0's process) are
noisy on a shared 2-core machine.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
from pathlib import Path
from typing import Any, Optional

import lightning
import torch
import torch.distributed as dist
from lightning.pytorch import Trainer, seed_everything
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.strategies import ModelParallelStrategy
from torch.distributed.fsdp import fully_shard

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the sibling DDP benchmark's model and byte counter

from ddp_communication import CommunicationMeter, DeepMLP, run_benchmark  # noqa: E402

from lightning_ldb import LayerDropBackCallback  # noqa: E402

#: (label, resample or None for no LDB, grouping: "layer", "root" or "layer_unused")
CONFIGURATIONS: list[tuple[str, Optional[str], str]] = [
    ("no LDB", None, "layer"),
    ("LDB epoch, per-layer", "epoch", "layer"),
    ("LDB step, per-layer", "step", "layer"),
    ("LDB epoch, one group", "epoch", "root"),
    ("LDB epoch, unused on", "epoch", "layer_unused"),
]


class ShardedDeepMLP(DeepMLP):
    """``DeepMLP`` sharded with FSDP2 in ``configure_model``, with the grouping of the configuration."""

    def __init__(self, grouping: str, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.grouping = grouping

    def configure_model(self) -> None:
        mesh = self.device_mesh["data_parallel"]
        if self.grouping != "root":
            for module in self.net:
                if any(True for _ in module.parameters()):
                    fully_shard(module, mesh=mesh)
        fully_shard(self.net, mesh=mesh)
        if self.grouping == "layer_unused":
            self.net.set_reduce_scatter_unused_params(True)


class FSDPCommunicationMeter(CommunicationMeter):
    """The DDP benchmark's meter, also counting the collective *calls* of each kind in a profiled step.

    Under FSDP2 each group that holds at least one gradient issues one reduce-scatter, so the call
    count shows whether a group whose parameters were all dropped was skipped.
    """

    def on_train_batch_end(self, trainer: Trainer, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        profiler = self._profiler
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        if profiler is None:
            return
        calls: dict[str, int] = {}
        for event in profiler.events():
            if event.name.startswith("gloo:"):
                calls[event.name[len("gloo:") :]] = calls.get(event.name[len("gloo:") :], 0) + 1
        record = self.epochs[trainer.current_epoch]
        record.setdefault("calls", []).append(calls)
        record.setdefault("reduce_scatter", []).append(tuple(_REDUCE_SCATTER))

    def on_train_batch_start(self, trainer: Trainer, pl_module: Any, batch: Any, batch_idx: int) -> None:
        _REDUCE_SCATTER[:] = [0, 0]
        super().on_train_batch_start(trainer, pl_module, batch, batch_idx)


#: [input bytes, calls] of ``torch.distributed.reduce_scatter_single`` in the current step (FSDP2 calls it once per
#: group with gradients). Gloo carries it out as an all-reduce of the whole input, so the profiler shows ``all_reduce``.
_REDUCE_SCATTER = [0, 0]


def count_reduce_scatters() -> None:
    """Wrap ``torch.distributed.reduce_scatter_single`` (this benchmark only) to count what FSDP2 hands it."""
    original = dist.reduce_scatter_single

    def reduce_scatter_single(*args: Any, **kwargs: Any) -> Any:
        tensor = kwargs["input"] if "input" in kwargs else args[1]
        _REDUCE_SCATTER[0] += tensor.numel() * tensor.element_size()
        _REDUCE_SCATTER[1] += 1
        return original(*args, **kwargs)

    dist.reduce_scatter_single = reduce_scatter_single


def run_configuration(args: argparse.Namespace, label: str, resample: Optional[str], grouping: str) -> dict[str, Any]:
    seed_everything(0)
    model = ShardedDeepMLP(
        grouping, width=args.width, depth=args.depth, samples=args.batch_size * args.steps * 2, batch_size=args.batch_size
    )
    profiled = tuple(range(args.warmup, args.warmup + args.profiled))
    meter = FSDPCommunicationMeter(profiled_batches=profiled, warmup=args.warmup + args.profiled)
    callbacks: list[Callback] = []
    if resample is not None:
        callbacks.append(LayerDropBackCallback(drop_rate=args.drop_rate, every=2, batch_scale=1, resample=resample, seed=0))
    callbacks.append(meter)
    trainer = Trainer(
        accelerator="cpu",
        devices=2,
        strategy=ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1),
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
        profiled_bytes = record["profiled"]
        kinds = sorted({k for p in profiled_bytes for k in p})
        epochs[epoch] = {
            "mode": record["mode"],
            "trainable_fraction_at_start": record["trainable_fraction_at_start"],
            "bytes_per_step": {k: statistics.mean(p.get(k, 0) for p in profiled_bytes) for k in kinds},
            "calls_per_step": {k: statistics.mean(c.get(k, 0) for c in record["calls"]) for k in kinds},
            "reduce_scatter_input_bytes": statistics.mean(b for b, _ in record["reduce_scatter"]),
            "reduce_scatter_calls": statistics.mean(c for _, c in record["reduce_scatter"]),
            "step_ms_median": 1000 * statistics.median(record["step_seconds"]),
            "step_cpu_ms_median": 1000 * statistics.median(record["step_cpu_seconds"]),
            "steps_timed": len(record["step_seconds"]),
        }
    return {"label": label, "epochs": epochs, "rank": trainer.global_rank}


def _kind(record: dict[str, Any], word: str) -> float:
    return sum(v for k, v in record["bytes_per_step"].items() if word in k)


def print_report(results: list[dict[str, Any]], args: argparse.Namespace, param_bytes: int) -> None:
    print()
    print(
        f"FSDP2 communication per optimizer step and rank: 2 gloo processes on CPU ({os.cpu_count()} cores),"
        f" torch {torch.__version__}, lightning {lightning.__version__}; load average {args.load_before:.1f} before,"
        f" {os.getloadavg()[0]:.1f} after"
    )
    print(
        f"model: {args.depth} x Linear({args.width}, {args.width}) MLP, {param_bytes / 1e6:.2f} MB of float32 parameters;"
        f" batch {args.batch_size} per rank; LDB drop_rate={args.drop_rate}, keep_first=4, keep_last=1, every=2"
    )
    header = (
        f"{'configuration':<22} {'epoch':>5} {'mode':>4} {'trainable':>9}  {'reduce-scatter in':>17} {'vs full':>8}"
        f" {'calls':>5}  {'gloo all-reduce':>15}  {'all-gather':>11} {'vs full':>8}  {'step ms':>8} {'CPU ms':>7}"
    )
    print(header)
    print("-" * len(header))
    for result in results:
        full = result["epochs"][1]
        for epoch in (1, 2):
            record = result["epochs"][epoch]
            scatter, gather = record["reduce_scatter_input_bytes"], _kind(record, "all_gather")
            print(
                f"{result['label']:<22} {epoch:>5} {record['mode']:>4} {record['trainable_fraction_at_start']:>9.1%}"
                f"  {scatter / 1e6:>14.3f} MB {scatter / max(full['reduce_scatter_input_bytes'], 1):>8.1%}"
                f" {record['reduce_scatter_calls']:>5.0f}  {_kind(record, 'all_reduce') / 1e6:>12.3f} MB"
                f"  {gather / 1e6:>8.3f} MB {gather / max(_kind(full, 'all_gather'), 1):>8.1%}"
                f"  {record['step_ms_median']:>8.1f} {record['step_cpu_ms_median']:>7.1f}"
            )
    kinds = sorted({k for r in results for e in r["epochs"].values() for k in e["bytes_per_step"]})
    print(f"\ngloo collectives seen by the profiler: {', '.join(kinds)}")


def main() -> None:
    count_reduce_scatters()
    run_benchmark(__doc__, CONFIGURATIONS, run_configuration, print_report, steps=8, profiled=2)


if __name__ == "__main__":
    main()
