"""What one benchmark run trains (:class:`Setup`) and the facts the runs and the profile read off it and the machine.

Kept apart from :mod:`~lightning_ldb.bench.runner` so that the profile, which the runner calls to bound its
verdicts, needs nothing of the runner (no import cycle).
"""

from __future__ import annotations

import os
import platform
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from lightning.pytorch import Callback, LightningDataModule, LightningModule
from lightning.pytorch.callbacks import Checkpoint, EarlyStopping, LearningRateMonitor, ModelSummary, ProgressBar

from lightning_ldb import LayerDropBack, LayerDropBackCallback

#: The user's callbacks a benchmark run leaves out: LDB (each variant brings its own), writing to disk,
#: stopping early, needing a logger, or printing (the benchmark prints its own lines).
_LEFT_OUT = (LayerDropBackCallback, Checkpoint, EarlyStopping, LearningRateMonitor, ProgressBar, ModelSummary)
_LEFT_OUT_NAMES = ("EpochSummary",)


@dataclass
class Setup:
    """What one run trains, built afresh for every run.

    Args:
        model: The LightningModule.
        datamodule: Its DataModule, or ``None`` if the module has its own loaders.
        trainer_kwargs: The user's ``Trainer`` arguments (``callbacks`` included).
    """

    model: LightningModule
    datamodule: LightningDataModule | None = None
    trainer_kwargs: dict[str, Any] = field(default_factory=dict)


def residual_branches(model: Any, branches: Any = None) -> list[Any]:
    """The residual branches block mode finds in ``model`` (``[]`` if none, or if ``branches=`` does not fit it).

    Each has ``name``, ``entry`` (the module whose input a dropped branch gets detached) and ``parameters``: the
    engine's block-mode units with nothing kept, read through the public :class:`~lightning_ldb.LayerDropBack`.
    """
    try:
        ldb = LayerDropBack(model, backward="block", branches=branches, keep_first=0, keep_last=0, seed=0)
    except (TypeError, ValueError):  # no branch, or a user's branches= that does not fit: no block mode
        return []
    try:
        return list(ldb.candidates)
    finally:
        ldb.close()


def batch_length(batch: Any) -> int | None:
    """The number of samples in ``batch``: the first dimension of its first tensor (``None`` if it has none)."""
    if isinstance(batch, torch.Tensor):
        return int(batch.shape[0]) if batch.dim() else None
    values = batch.values() if isinstance(batch, Mapping) else batch if isinstance(batch, (list, tuple)) else ()
    for value in values:
        length = batch_length(value)
        if length is not None:
            return length
    return None


def kept_callbacks(callbacks: Any) -> tuple[list[Callback], list[str]]:
    """The user's callbacks a benchmark run keeps, and the class names of those it leaves out."""
    if callbacks is None:
        return [], []
    kept, left_out = [], []
    for callback in callbacks if isinstance(callbacks, Sequence) else [callbacks]:
        if isinstance(callback, _LEFT_OUT) or type(callback).__name__ in _LEFT_OUT_NAMES:
            left_out.append(type(callback).__name__)
        else:
            kept.append(callback)
    return kept, left_out


def run_on_gpu(about: Mapping[str, Any]) -> bool:
    """Whether the runs described by ``about`` (its ``accelerator``) use a CUDA GPU."""
    accelerator = str(about.get("accelerator", "auto"))
    return accelerator in ("auto", "gpu", "cuda") and torch.cuda.is_available()


def environment(on_gpu: bool = False) -> dict[str, Any]:
    """The machine and versions the benchmark ran on, from ``torch.utils.collect_env``, and the load average."""
    import lightning
    from torch.utils import collect_env

    cpu_info = collect_env.get_cpu_info(collect_env.run) or ""
    cpu = next((line.split(":", 1)[1].strip() for line in cpu_info.splitlines() if line.startswith("Model name")), "")
    try:
        load: float | None = round(os.getloadavg()[0], 2)
    except (AttributeError, OSError):
        load = None
    return {
        "device": f"CUDA {torch.cuda.get_device_name(0)}" if on_gpu else "CPU",
        "cpu": cpu or platform.machine(),
        "cpu_count": os.cpu_count(),
        "os": collect_env.get_os(collect_env.run),
        "load_average_1min": load,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "lightning": lightning.__version__,
        "python": platform.python_version(),
        "date": time.strftime("%Y-%m-%d %H:%M:%S %z"),
    }
