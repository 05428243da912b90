"""LDB under ``ModelParallelStrategy`` + FSDP2 ``fully_shard``: 2 CPU processes (gloo), every rank recorded.

Run by ``tests/test_fsdp.py`` as ``python fsdp_run.py --out DIR`` (Lightning re-launches the script
as rank 1, so it cannot run inside pytest). To keep to one launch, the processes run three fits:

``epoch``
    ``resample="epoch"``, SGD with momentum and weight decay, a layer frozen by the user, the
    DROP-epoch batch size through ``LDBDataModuleMixin``, and a sharded (distributed) checkpoint
    after every epoch.
``resumed``
    A fresh model and callback (``seed=None``, so only the checkpoint can give it ``epoch``'s seed) resumed
    from ``epoch``'s sharded checkpoint after epoch 1, i.e. at the start of DROP epoch 2.
``step``
    ``resample="step"`` with AdamW.
``disagree``
    Rank 1 excludes a layer that rank 0 drops in DROP epoch 2; the fit must fail on both ranks
    before the forward that would pair up mismatched reduce-scatters, and leave the flags as the
    user set them. Last, since the failed fit ends the processes' use of the process group.

Each rank writes ``{fit}_rank{R}.pt``: per epoch its mode, the dropped layers, the full (unsharded,
``DTensor.full_tensor()``) weights at the start and after every batch, the ``requires_grad`` flags,
the per-device batch sizes, whether dropped parameters held a gradient at the optimizer step, and
how many gradient elements FSDP2 reduce-scattered per batch (counted by wrapping
``torch.distributed.reduce_scatter_single``, which FSDP2 calls for each group, in this script only).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any, Optional

import torch
import torch.distributed as dist
from lightning.pytorch import LightningModule, Trainer, seed_everything
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.strategies import ModelParallelStrategy
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # ``helpers`` lives in tests/

from helpers import TinyDataModule, TinyMLP, end_launched_script, make_trainer  # noqa: E402

from lightning_ldb import LayerDropBackCallback  # noqa: E402
from lightning_ldb.layers import discover_layers  # noqa: E402

#: The layer the user freezes before ``fit`` in the ``epoch`` and ``resumed`` fits.
USER_FROZEN = "net.5"
#: Per-device batch size on FULL epochs; DROP epochs load ``batch_scale`` (2) times more.
BATCH_SIZE = 4
LDB_KWARGS: dict[str, Any] = dict(drop_rate=0.5, every=2, keep_first=2, keep_last=1, batch_scale=2)
#: Fits in launch order, and the epochs of each.
FITS = {"epoch": 5, "resumed": 5, "step": 3, "disagree": 3}
#: The checkpoint ``resumed`` starts from: written after epoch 1, so the resumed run begins with DROP epoch 2.
RESUME_FROM = "epoch=1.ckpt"

_reduce_scatter_numel: list[int] = []


def _counting_reduce_scatter(original: Any) -> Any:
    def reduce_scatter_single(*args: Any, **kwargs: Any) -> Any:
        tensor = kwargs["input"] if "input" in kwargs else args[1]
        _reduce_scatter_numel.append(tensor.numel())
        return original(*args, **kwargs)

    return reduce_scatter_single


class RankDependentLDB(LayerDropBackCallback):
    """Configured differently on rank 1 (excludes a layer that rank 0 drops): a deliberate cross-rank mismatch."""

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if trainer.global_rank == 1:
            self.exclude = ["net.13"]
        super().setup(trainer, pl_module, stage)


class ShardedMLP(TinyMLP):
    """TinyMLP sharded with FSDP2: one ``fully_shard`` group per layer that owns parameters, and the root."""

    def configure_model(self) -> None:
        mesh = self.device_mesh["data_parallel"]
        for module in self.net:
            if any(True for _ in module.parameters()):
                fully_shard(module, mesh=mesh)
        fully_shard(self.net, mesh=mesh)


def full_snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter's full (unsharded) value; a collective, so every rank calls it at the same point."""
    return {
        name: (p.full_tensor() if isinstance(p, DTensor) else p).detach().clone() for name, p in module.named_parameters()
    }


def padded_numel(param: torch.Tensor, world_size: int) -> int:
    """FSDP2 pads dim 0 to a multiple of the world size before it reduce-scatters a gradient."""
    shape = list(param.shape)
    rows = -(-shape[0] // world_size) * world_size
    rest = 1
    for size in shape[1:]:
        rest *= size
    return rows * rest


class RankRecorder(Callback):
    """Placed after the LDB callback: records draws, full weights, batch sizes and reduce-scatter volume."""

    def __init__(self, out_path: str) -> None:
        self.out_path = out_path
        self.epochs: dict[int, dict[str, Any]] = {}
        self.layers: dict[str, Any] = {}

    def _ldb(self, trainer: Trainer) -> LayerDropBackCallback:
        return next(cb for cb in trainer.callbacks if isinstance(cb, LayerDropBackCallback))

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.layers = {
            "numel": {layer.name: layer.numel for layer in discover_layers(pl_module)},
            "all_dtensor": all(isinstance(p, DTensor) for p in pl_module.parameters()),
            "candidates": self._ldb(trainer).candidate_layers,
        }

    def on_train_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.epochs[trainer.current_epoch] = {
            "mode": self._ldb(trainer).mode,
            "start": full_snapshot(pl_module),
            "batches": {},
        }

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        _reduce_scatter_numel.clear()
        if batch_idx == 0:  # LDB applies the epoch's draw before its first forward
            self.epochs[trainer.current_epoch]["dropped"] = self._ldb(trainer).dropped_layers
            self.epochs[trainer.current_epoch]["requires_grad"] = {
                n: p.requires_grad for n, p in pl_module.named_parameters()
            }
        world_size = trainer.world_size
        self.epochs[trainer.current_epoch]["batches"][batch_idx] = {
            "dropped": self._ldb(trainer).dropped_layers,
            "batch_size": len(batch[0]),
            "trainable_padded_numel": sum(
                padded_numel(p, world_size) for p in pl_module.parameters() if p.requires_grad
            ),
        }

    def on_before_optimizer_step(self, trainer: Trainer, pl_module: LightningModule, optimizer: Any) -> None:
        batch = self.epochs[trainer.current_epoch]["batches"][max(self.epochs[trainer.current_epoch]["batches"])]
        batch["frozen_grads"] = [p.grad is not None for p in pl_module.parameters() if not p.requires_grad]
        batch["trainable_grads"] = [p.grad is not None for p in pl_module.parameters() if p.requires_grad]

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        record = self.epochs[trainer.current_epoch]
        record["batches"][batch_idx]["reduce_scatter_numel"] = sum(_reduce_scatter_numel)
        record["end"] = record["batches"][batch_idx]["end"] = full_snapshot(pl_module)

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        record = {
            "rank": trainer.global_rank,
            "world_size": trainer.world_size,
            "epochs": self.epochs,
            "layers": self.layers,
            "final": full_snapshot(pl_module),
            "final_requires_grad": {n: p.requires_grad for n, p in pl_module.named_parameters()},
            "seed": self._ldb(trainer).seed,
        }
        torch.save(record, self.out_path.format(rank=trainer.global_rank))


def run_fit(out_dir: str, name: str) -> None:
    resample = "step" if name == "step" else "epoch"
    seed_everything(0, workers=True)  # also seeds the DistributedSampler's shuffle: the resumed run needs the same
    model = ShardedMLP(optimizer="adamw" if name == "step" else "sgd", lr=0.05)
    if name != "step":
        for param in model.get_submodule(USER_FROZEN).parameters():
            param.requires_grad_(False)
    # ``resumed`` must get LDB's seed (1) from the checkpoint: without it, it would take seed_everything's (0).
    ldb_class = RankDependentLDB if name == "disagree" else LayerDropBackCallback
    ldb = ldb_class(resample=resample, seed=None if name == "resumed" else 1, **LDB_KWARGS)
    callbacks: list[Callback] = [ldb, RankRecorder(os.path.join(out_dir, f"{name}_rank{{rank}}.pt"))]
    checkpoint_dir = os.path.join(out_dir, "checkpoints")
    if name == "epoch":
        callbacks.append(ModelCheckpoint(dirpath=checkpoint_dir, filename="{epoch}", save_top_k=-1))
    trainer = make_trainer(
        FITS[name],
        callbacks,
        devices=2,
        strategy=ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1),
        enable_checkpointing=name == "epoch",
    )
    ckpt_path = os.path.join(checkpoint_dir, RESUME_FROM) if name == "resumed" else None
    datamodule = TinyDataModule(batch_size=BATCH_SIZE, n=32)
    if name != "disagree":
        trainer.fit(model, datamodule=datamodule, ckpt_path=ckpt_path)
        return
    try:
        trainer.fit(model, datamodule=datamodule)
        error = None
    except RuntimeError as exception:
        error = str(exception)
    record = {
        "rank": trainer.global_rank,
        "world_size": trainer.world_size,
        "error": error,
        "epoch": trainer.current_epoch,
        "global_step": trainer.global_step,
        "requires_grad": {n: p.requires_grad for n, p in model.named_parameters()},
    }
    torch.save(record, os.path.join(out_dir, f"{name}_rank{trainer.global_rank}.pt"))


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", required=True)
    parser.add_argument("--fits", nargs="+", default=list(FITS), choices=list(FITS))
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    dist.reduce_scatter_single = _counting_reduce_scatter(dist.reduce_scatter_single)
    for name in args.fits:
        run_fit(args.out, name)


if __name__ == "__main__":
    main()
    end_launched_script()
