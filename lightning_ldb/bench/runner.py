"""The runs: every variant on the same model, data, seed and hyperparameters, timed by one synchronised clock.

Every run builds its network after ``seed_everything(seed)`` (identical initial weights) and trains on
the same batches in the same order (:class:`~lightning_ldb.bench.data.TensorDataModule`). Variants
differ only in what is listed in :data:`VARIANTS`. Repetitions alternate the run order (``A B C``,
then ``C B A``), so slow drift of the machine's speed favours no variant.
"""

from __future__ import annotations

import gc
import os
import platform
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Optional

import torch
from lightning.pytorch import Callback, LightningModule, Trainer, seed_everything

from lightning_ldb.bench.data import TensorDataModule, load_splits
from lightning_ldb.bench.workloads import BenchClassifier, Workload, workload_for
from lightning_ldb.callback import LayerDropBackCallback
from lightning_ldb.examples import TorchThreads
from lightning_ldb.schedule import DROP, FULL, epoch_mode

#: The paper's LDB settings (section 4.3.3): p = 0.3, a DROP epoch every second epoch, LR and batch x2,
#: the first four layers and the last one always trained.
PAPER_LDB: dict[str, Any] = {
    "drop_rate": 0.3,
    "every": 2,
    "lr_scale": 2.0,
    "batch_scale": 2,
    "keep_first": 4,
    "keep_last": 1,
    "resample": "epoch",
    "granularity": "module",
}

#: Variant -> what it changes in the LDB arguments (``None``: no callback), and what it measures.
VARIANTS: dict[str, tuple[Optional[dict[str, Any]], str]] = {
    "baseline": (None, "plain Lightning"),
    "ldb": ({}, "LDB, the paper's settings"),
    "batch-only": ({"drop_rate": 0.0}, "the same LR and batch scaling on the same DROP epochs, nothing dropped"),
    "drop-only": ({"batch_scale": 1}, "layers dropped and LR scaled, batch unchanged"),
    "ldb-block": ({"backward": "block"}, "LDB with block-mode backward"),
    "stochastic-depth": (None, "Stochastic Depth on the residual blocks (the paper's Table 5 peer), no LDB"),
}


@dataclass
class BenchConfig:
    """One invocation's settings, resolved (no ``None`` left but ``threads``)."""

    model: str = "resnet18"
    variants: tuple[str, ...] = ("baseline", "ldb", "batch-only", "drop-only")
    epochs: int = 5
    train_samples: int = 1024
    val_samples: int = 256
    batch_size: int = 64
    lr: float = 0.1
    num_classes: int = 10
    image_size: Optional[int] = None
    repeats: int = 2
    skip_epochs: int = 1
    seed: int = 0
    threads: Optional[int] = 1
    accelerator: str = "auto"
    precision: str = "32-true"
    sd_rate: float = 0.5
    ldb: dict[str, Any] = field(default_factory=lambda: dict(PAPER_LDB))

    @property
    def workload(self) -> Workload:
        return workload_for(self.model, self.image_size)

    def callback_args(self, variant: str) -> Optional[dict[str, Any]]:
        """The LDB callback's arguments in ``variant`` (``None``: no callback)."""
        change = VARIANTS[variant][0]
        return None if change is None else {**self.ldb, **change, "seed": self.seed}


class SyncedEpochClock(Callback):
    """Wall-clock seconds, optimizer steps, batch size and ``val_acc`` of each training epoch.

    The clock stops at the end of the epoch's last training batch, before validation, and waits for
    queued CUDA work at both ends, so asynchronous kernels are billed to the epoch that launched them.

    Args:
        log: Receives one progress line per epoch.
    """

    def __init__(self, log: Callable[[str], None] = print) -> None:
        self.epochs: list[dict[str, Any]] = []
        self._log = log
        self._start = 0.0
        self._steps = 0
        self._batch_size = 0

    @staticmethod
    def _sync(pl_module: LightningModule) -> None:
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize(pl_module.device)

    def on_train_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._sync(pl_module)
        self._steps, self._batch_size = 0, 0
        self._start = time.perf_counter()

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self._steps += 1
        self._batch_size = max(self._batch_size, len(batch[1]))
        if batch_idx + 1 >= trainer.num_training_batches:
            self._sync(pl_module)
            seconds = time.perf_counter() - self._start
            record = {"epoch": trainer.current_epoch, "seconds": seconds, "steps": self._steps}
            self.epochs.append({**record, "batch_size": self._batch_size})

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.epochs and "val_acc" in trainer.callback_metrics:
            record = self.epochs[-1]
            record["val_acc"] = float(trainer.callback_metrics["val_acc"])
            self._log(
                f"    epoch {record['epoch']}: {record['seconds']:.2f} s, {record['steps']} steps of"
                f" {record['batch_size']}, val_acc {record['val_acc']:.3f}"
            )


def run_variant(config: BenchConfig, variant: str, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Train ``variant`` once; return its record (per-epoch seconds, steps, modes, accuracy).

    Raises:
        ValueError: If ``variant`` is unknown, or ``stochastic-depth`` is asked of a non-residual model.
    """
    if variant not in VARIANTS:
        raise ValueError(f"`variant` must be one of {list(VARIANTS)}, got {variant!r}.")
    workload = config.workload
    train_set, val_set = load_splits(
        workload.data, config.train_samples, config.val_samples, workload.shape, config.num_classes, config.seed
    )
    datamodule = TensorDataModule(train_set, val_set, config.batch_size, config.seed)
    seed_everything(config.seed, verbose=False)
    sd_rate = config.sd_rate if variant == "stochastic-depth" else 0.0
    module = BenchClassifier(config.model, config.num_classes, config.lr, config.image_size, sd_rate, config.seed)
    clock = SyncedEpochClock(log)
    # The clock goes first, so it also times the work LDB does at epoch start.
    callbacks: list[Callback] = [clock]
    if config.threads is not None:
        callbacks.append(TorchThreads(config.threads))
    ldb_args = config.callback_args(variant)
    if ldb_args is not None:
        callbacks.append(LayerDropBackCallback(**ldb_args))
    trainer = Trainer(
        accelerator=config.accelerator,
        devices=1,
        precision=config.precision,
        max_epochs=config.epochs,
        callbacks=callbacks,
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        enable_progress_bar=False,
        num_sanity_val_steps=0,
        # Every variant rebuilds its train loader every epoch, so all do the same loading work.
        reload_dataloaders_every_n_epochs=1,
    )
    trainer.fit(module, datamodule=datamodule)
    every = ldb_args["every"] if ldb_args else None
    for record in clock.epochs:
        record["mode"] = epoch_mode(record["epoch"], every) if every else FULL
    del trainer, module, datamodule
    gc.collect()
    return {"variant": variant, "epochs": clock.epochs}


def run_benchmark(config: BenchConfig, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Every repetition of every variant; the result is the JSON the report and plots are drawn from."""
    runs = []
    total = config.repeats * len(config.variants)
    for repeat in range(config.repeats):
        ordered = config.variants if repeat % 2 == 0 else config.variants[::-1]
        for variant in ordered:
            log(f"[{len(runs) + 1}/{total}] {config.model}: {variant} (repetition {repeat + 1}/{config.repeats})")
            runs.append({**run_variant(config, variant, log), "repeat": repeat})
    return {"schema": "ldb-bench/2", "config": asdict(config), "environment": environment(config), "runs": runs}


def environment(config: BenchConfig) -> dict[str, Any]:
    """The machine and the versions the benchmark ran on."""
    import lightning

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as info:
            cpu = next((line.split(":", 1)[1].strip() for line in info if line.startswith("model name")), cpu)
    except OSError:
        pass
    on_gpu = config.accelerator in ("auto", "gpu", "cuda") and torch.cuda.is_available()
    return {
        "device": f"CUDA {torch.cuda.get_device_name(0)}" if on_gpu else "CPU",
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "lightning": lightning.__version__,
        "python": platform.python_version(),
        "date": time.strftime("%Y-%m-%d %H:%M:%S %z"),
    }


def variant_names(names: Sequence[str]) -> tuple[str, ...]:
    """``names`` checked against :data:`VARIANTS`.

    Raises:
        ValueError: If a name is unknown or repeated.
    """
    unknown = [name for name in names if name not in VARIANTS]
    if unknown or not names or len(set(names)) != len(names):
        raise ValueError(f"expected distinct names among {', '.join(VARIANTS)}, got {','.join(names)!r}")
    return tuple(names)
