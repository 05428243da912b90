"""``LayerDropBack`` without the Trainer on 2 CPU processes (gloo); every rank writes what it saw.

``python engine_run.py --out DIR --mode readme``: the README's Fabric example itself, with
``Fabric(accelerator="cpu", devices=2, strategy="ddp")`` and ``fabric.launch()`` (which re-launches this script as
rank 1); each rank saves the draws and its final weights. ``--mode fabric``: the same loop, instrumented. ``--mode ddp``: a ``DistributedDataParallel`` the user built with
``find_unused_parameters=True``, ranks started with ``torch.multiprocessing.spawn``. ``--mode ddp_strict``: the same
with DDP's defaults, which LDB must refuse at the first DROP epoch on every rank (no hang).

Each rank saves ``rank{R}.pt``: per optimizer step its epoch and dropped layers and the gradient elements it
all-reduced; the weights at the end of every epoch (before LDB releases the layers); the error, if any; and the
``requires_grad`` flags at the end.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader
from torch.utils.data.distributed import DistributedSampler

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # ``helpers`` lives in tests/

from helpers import TinyMLP, end_launched_script, make_dataset  # noqa: E402

from lightning_ldb import LayerDropBack  # noqa: E402

#: As the single-process tests: with seed 3, DROP epoch 2 drops some but not all candidates.
LDB_KWARGS: dict[str, Any] = dict(drop_rate=0.5, every=2, keep_first=2, keep_last=1, seed=3)
EPOCHS = 4


class AllReduceCounter:
    """Counts the elements LDB's communication hook hands to ``torch.distributed.all_reduce`` (DDP's own are C++)."""

    def __init__(self) -> None:
        self.count = 0
        self._original = dist.all_reduce

        def counting(tensor: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
            self.count += tensor.numel()
            return self._original(tensor, *args, **kwargs)

        dist.all_reduce = counting


def train(model: nn.Module, optimizer: Any, ldb: LayerDropBack, loader_for: Any, backward: Any, rank: int) -> dict:
    counter = AllReduceCounter()
    record: dict[str, Any] = {"steps": {}, "weights": {}, "error": None}
    module = ldb.module
    try:
        for epoch in range(EPOCHS):
            loader = loader_for(ldb.batch_size(8, epoch), epoch)
            with ldb.epoch(epoch):
                for x, y in loader:
                    loss = nn.functional.mse_loss(model(x), y)
                    dropped = ldb.dropped_layers  # after the forward: a resample="step" draw is applied just before it
                    counter.count = 0
                    backward(loss)
                    optimizer.step()
                    optimizer.zero_grad()
                    record["steps"][ldb.steps - 1] = {"epoch": epoch, "dropped": dropped, "reduced": counter.count}
                record["weights"][epoch] = {n: p.detach().clone() for n, p in module.named_parameters()}
    except ValueError as error:
        record["error"] = str(error)
    record["requires_grad"] = {n: p.requires_grad for n, p in module.named_parameters()}
    record["numel"] = {n: p.numel() for n, p in module.named_parameters()}
    ldb.close()
    return record


def run_fabric(out: Path, resample: str) -> None:
    from lightning.fabric import Fabric

    # The README's example, with two CPU processes.
    fabric = Fabric(accelerator="cpu", devices=2, strategy="ddp")
    fabric.launch()
    torch.manual_seed(0)
    model = TinyMLP()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-2)  # every kept one moves
    model, optimizer = fabric.setup(model, optimizer)
    ldb = LayerDropBack(model, optimizer, **LDB_KWARGS, resample=resample, fabric=fabric)

    def loader_for(batch_size: int, epoch: int) -> Any:
        return fabric.setup_dataloaders(DataLoader(make_dataset(64), batch_size=batch_size))

    record = train(model, optimizer, ldb, loader_for, fabric.backward, fabric.global_rank)
    torch.save(record, out / f"rank{fabric.global_rank}.pt")


def run_readme(out: Path) -> None:
    import re

    import lightning_ldb

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    [block] = [b for b in re.findall(r"```python\n(.*?)```", readme, flags=re.S) if "fabric=fabric" in b]
    single = 'Fabric(accelerator="cpu", devices=1)'
    assert single in block, "the README's Fabric example changed: update this script"
    line = next(line for line in block.splitlines() if single in line)
    block = block.replace(line, 'fabric = Fabric(accelerator="cpu", devices=2, strategy="ddp")\nfabric.launch()')
    draws: list[Any] = []

    class Recorded(LayerDropBack):  # the README imports ``lightning_ldb.LayerDropBack``: this one records its draws
        def _draw(self, epoch: int, step: Any = None) -> None:
            super()._draw(epoch, step)
            draws.append((epoch, step, self.dropped_layers))

    lightning_ldb.LayerDropBack = Recorded  # type: ignore[misc]
    namespace: dict[str, Any] = {"__name__": "__readme__"}
    torch.manual_seed(0)  # the same initial model on both ranks (Fabric broadcasts it anyway)
    exec(compile(block, "README.md (Fabric example)", "exec"), namespace)
    fabric, model = namespace["fabric"], namespace["model"]
    record = {
        "draws": draws,
        "weights": {n: p.detach().clone() for n, p in model.module.named_parameters()},
        "requires_grad": {n: p.requires_grad for n, p in model.module.named_parameters()},
    }
    torch.save(record, out / f"rank{fabric.global_rank}.pt")


def ddp_worker(rank: int, out: Path, resample: str, find_unused: bool) -> None:
    dist.init_process_group("gloo", rank=rank, world_size=2)
    torch.manual_seed(0)
    model = torch.nn.parallel.DistributedDataParallel(TinyMLP(), find_unused_parameters=find_unused)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-2)  # every kept one moves
    ldb = LayerDropBack(model, optimizer, **LDB_KWARGS, resample=resample)
    data = make_dataset(64)

    def loader_for(batch_size: int, epoch: int) -> Any:
        return DataLoader(data, batch_size=batch_size, sampler=DistributedSampler(data, shuffle=False))

    record = train(model, optimizer, ldb, loader_for, lambda loss: loss.backward(), rank)
    torch.save(record, out / f"rank{rank}.pt")
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--mode", choices=["readme", "fabric", "ddp", "ddp_strict"], required=True)
    parser.add_argument("--resample", default="epoch")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(1)
    if args.mode == "readme":
        run_readme(out)
    elif args.mode == "fabric":
        run_fabric(out, args.resample)
    else:
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        torch.multiprocessing.spawn(ddp_worker, args=(out, args.resample, args.mode == "ddp"), nprocs=2)


if __name__ == "__main__":
    main()
    end_launched_script()
