"""One LDB training run under DDP (2 CPU processes, gloo) that writes what every rank holds.

Used two ways by ``tests/test_ddp.py``:

* imported, :func:`fit` runs under ``ddp_spawn`` inside pytest;
* as a script (``python ddp_run.py --out DIR --strategy ddp ...``), for ``strategy="ddp"``, which
  re-launches the script once per extra rank and so cannot run inside pytest.

Each rank saves ``rank{R}.pt``: per epoch its mode, the dropped layers, the weights at the first
batch, after every batch and after the last optimizer step (before LDB releases the layers and re-wraps DDP, which
re-broadcasts rank 0's weights and would hide a divergence), the ``requires_grad`` flags, and the
number of gradient elements all-reduced per optimizer step (counted by the profiler).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any, Optional

import torch
from lightning.pytorch import LightningModule, Trainer, seed_everything
from lightning.pytorch.callbacks import Callback
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # ``helpers`` lives in tests/

from helpers import TinyMLP, end_launched_script, make_trainer  # noqa: E402

from lightning_ldb import LayerDropBackCallback  # noqa: E402

#: The layer the user freezes before ``fit`` (it would be a candidate were it trainable, so LDB must not touch it).
USER_FROZEN = "net.5"
#: LDB settings shared by every run; with seed 1, DROP epoch 2 drops net.7 and net.13 (net.5, frozen by the user, is
#: not a candidate).
LDB_KWARGS: dict[str, Any] = dict(drop_rate=0.5, every=2, keep_first=2, keep_last=1, batch_scale=1, seed=1)


class RankDependentLDB(LayerDropBackCallback):
    """An LDB callback configured differently on rank 1 (excludes a layer): a deliberate cross-rank mismatch."""

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if trainer.global_rank == 1:
            self.exclude = ["net.3"]
        super().setup(trainer, pl_module, stage)


class RankRecorder(Callback):
    """Placed after the LDB callback: records the draw, the weights and the traffic of every epoch on this rank.

    The profiler counts the gradient elements all-reduced in batch :data:`PROFILED_BATCH` of each epoch
    (the first optimizer step with ``accumulate_grad_batches=2``); profiling every batch would cost
    about 0.25 s of start-up per batch.
    """

    def __init__(self, out_dir: str) -> None:
        self.out_dir = out_dir
        self.epochs: dict[int, dict[str, Any]] = {}
        self._profiler: Optional[profile] = None

    def _ldb(self, trainer: Trainer) -> LayerDropBackCallback:
        return next(cb for cb in trainer.callbacks if isinstance(cb, LayerDropBackCallback))

    def on_train_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.epochs[trainer.current_epoch] = {"mode": self._ldb(trainer).mode, "batches": {}}

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        record = self.epochs[trainer.current_epoch]
        if batch_idx == 0:  # LDB applies the epoch's draw before its first forward
            record["start"] = _snapshot(pl_module)
            record["dropped"] = self._ldb(trainer).dropped_layers
            record["requires_grad"] = {n: p.requires_grad for n, p in pl_module.named_parameters()}
        record["batches"][batch_idx] = {
            "dropped": self._ldb(trainer).dropped_layers,
            "trainable_numel": sum(p.numel() for p in pl_module.parameters() if p.requires_grad),
        }
        if batch_idx == PROFILED_BATCH:
            self._profiler = profile(activities=[ProfilerActivity.CPU], record_shapes=True)
            self._profiler.__enter__()

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        record = self.epochs[trainer.current_epoch]
        # After this batch's optimizer step (if it was the last micro-batch of one), before any release.
        record["end"] = record["batches"][batch_idx]["end"] = _snapshot(pl_module)
        if self._profiler is None:
            return
        self._profiler.__exit__(None, None, None)
        # Gradient all-reduces carry floats; DDP's per-step "which parameters were used" map is an int tensor.
        record["batches"][batch_idx]["allreduce_numel"] = sum(
            _numel(event.input_shapes)
            for event in self._profiler.events()
            if event.name.startswith("gloo") and "all_reduce" in event.name and _is_float(event)
        )
        self._profiler = None

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        record = {
            "rank": trainer.global_rank,
            "world_size": trainer.world_size,
            "epochs": self.epochs,
            "final": _snapshot(pl_module),
            "final_requires_grad": {n: p.requires_grad for n, p in pl_module.named_parameters()},
            "candidates": self._ldb(trainer).candidate_layers,
        }
        torch.save(record, os.path.join(self.out_dir, f"rank{trainer.global_rank}.pt"))


#: The batch of each epoch whose all-reduces are counted.
PROFILED_BATCH = 1


def _snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in module.named_parameters()}


def _numel(shapes: list[list[int]]) -> int:
    total = 0
    for shape in shapes:
        count = 1
        for size in shape:
            count *= size
        total += count if shape else 0
    return total


def _is_float(event: Any) -> bool:
    dtypes = getattr(event, "input_dtypes", None) or []
    return not dtypes or any("float" in str(dtype).lower() or "half" in str(dtype).lower() for dtype in dtypes)


def fit(
    out_dir: str,
    strategy: str = "ddp_spawn",
    resample: str = "epoch",
    accumulate_grad_batches: int = 2,
    max_epochs: int = 5,
    disagree: bool = False,
    model: Optional[LightningModule] = None,
    backward: str = "weights",
) -> None:
    """Train TinyMLP (or ``model``) with LDB on 2 CPU processes; every rank writes ``rank{R}.pt`` to ``out_dir``.

    With the default TinyMLP the user freezes :data:`USER_FROZEN` before ``fit``; SGD with momentum and
    weight decay would move any layer whose gradient is a zero tensor instead of ``None``. A ``model``
    given by the caller (its class importable by the spawned ranks) is trained as it is, with
    ``backward`` passed to the callback.
    """
    seed_everything(0, workers=True)
    if model is None:
        model = TinyMLP(batch_size=8, n=64, optimizer="sgd")
        for param in model.get_submodule(USER_FROZEN).parameters():
            param.requires_grad_(False)
    ldb_class = RankDependentLDB if disagree else LayerDropBackCallback
    ldb = ldb_class(resample=resample, backward=backward, **LDB_KWARGS)
    trainer = make_trainer(
        max_epochs,
        [ldb, RankRecorder(out_dir)],
        devices=2,
        strategy=strategy,
        accumulate_grad_batches=accumulate_grad_batches,
    )
    trainer.fit(model)


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", required=True)
    parser.add_argument("--strategy", default="ddp")
    parser.add_argument("--resample", default="epoch", choices=["epoch", "step"])
    parser.add_argument("--accumulate", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=5)
    args = parser.parse_args(argv)
    fit(args.out, args.strategy, args.resample, args.accumulate, args.epochs)


if __name__ == "__main__":
    main()
    end_launched_script()
