"""True optimizer-step accounting under the LDB schedule.

``trainer.estimated_stepping_batches`` assumes every epoch is as long as the first. With a larger
batch on DROP epochs those epochs are shorter, and a ``OneCycleLR`` built from Lightning's estimate
never finishes its cycle. :func:`estimated_stepping_batches` counts each epoch with its own batch size.
"""

from __future__ import annotations

import math
from typing import Union

from lightning.pytorch import Trainer
from torch.utils.data import DataLoader

from lightning_ldb import _compat
from lightning_ldb.datamodule import accumulation_schedule_of, batch_schedule_of
from lightning_ldb.schedule import BatchSchedule


def optimizer_steps_per_epoch(samples: int, batch_size: int, drop_last: bool, limit_batches: Union[int, float], accumulate: int) -> int:
    """Optimizer steps of one epoch of ``samples`` (per device) in batches of ``batch_size``.

    ``limit_batches`` is Lightning's ``limit_train_batches`` (an int caps the batch count, a float keeps
    that fraction), and an incomplete accumulation window at the end of an epoch still steps.

    Example::

        >>> optimizer_steps_per_epoch(100, 16, drop_last=False, limit_batches=1.0, accumulate=1)
        7
        >>> optimizer_steps_per_epoch(100, 16, drop_last=True, limit_batches=1.0, accumulate=2)
        3
        >>> optimizer_steps_per_epoch(100, 16, drop_last=False, limit_batches=0.5, accumulate=1)
        3
    """
    batches = samples // batch_size if drop_last else math.ceil(samples / batch_size)
    if isinstance(limit_batches, int):
        batches = min(batches, limit_batches)
    else:
        batches = int(batches * limit_batches)
    return math.ceil(batches / accumulate)


def estimated_stepping_batches(trainer: Trainer) -> Union[int, float]:
    """The number of optimizer steps the whole fit takes under the LDB schedule.

    Call it where you would call ``trainer.estimated_stepping_batches``, e.g. in ``configure_optimizers``
    for ``OneCycleLR(total_steps=...)``. It accounts for ``max_epochs``, ``max_steps``,
    ``limit_train_batches``, ``accumulate_grad_batches``, ``drop_last`` and the world size (through the
    distributed sampler Lightning injects). With ``batch_scaling="accumulate"`` DROP epochs are counted with
    their multiplied ``accumulate_grad_batches``. Without a :class:`~lightning_ldb.LayerDropBackCallback`, or
    when batch scaling is off, every epoch has the same length and Lightning's own estimate is exact.

    Raises:
        ValueError: If loader batch scaling is active and the train loader has no length or no ``batch_size``
            (an ``IterableDataset``, a custom batch sampler, several train loaders).
    """
    accumulating = accumulation_schedule_of(trainer)
    if accumulating is not None:
        return _accumulated_steps(trainer, accumulating)
    schedule = batch_schedule_of(_compat.train_data_source(trainer))
    if schedule is None:
        return trainer.estimated_stepping_batches
    max_epochs, max_steps = trainer.max_epochs, trainer.max_steps
    if (max_epochs is None or max_epochs == -1) and max_steps == -1:
        return float("inf")
    # The same call Lightning's own estimate makes: build the train loader now if it is not built yet.
    trainer.fit_loop.setup_data()
    loader = trainer.train_dataloader
    if not isinstance(loader, DataLoader) or loader.batch_size is None or not _has_len(loader.sampler):
        raise ValueError(
            "lightning_ldb.estimated_stepping_batches needs a single map-style train DataLoader built with"
            f" `batch_size=` to count DROP epochs, got {type(loader).__name__}. Count the steps yourself or pass"
            " batch_scale=1."
        )
    samples = len(loader.sampler)  # type: ignore[arg-type]  # per device, once Lightning has injected its DistributedSampler
    loaded_epoch = trainer.current_epoch  # the loader was built for this epoch's batch size
    base = schedule.base_size(loaded_epoch, loader.batch_size)
    def steps(epoch: int) -> int:
        return optimizer_steps_per_epoch(
            samples,
            schedule.batch_size(epoch, base),
            loader.drop_last,
            schedule.limit_batches(epoch),  # type: ignore[arg-type]  # the trainer's, never None
            schedule.accumulate(epoch),
        )

    if max_epochs is None or max_epochs == -1:
        return max_steps
    total = sum(steps(epoch) for epoch in range(max_epochs))
    return min(total, max_steps) if max_steps != -1 else total


def _accumulated_steps(trainer: Trainer, schedule: BatchSchedule) -> Union[int, float]:
    # Every epoch has the same batches (the loader is unchanged); DROP epochs step once per more of them.
    max_epochs, max_steps = trainer.max_epochs, trainer.max_steps
    if max_epochs is None or max_epochs == -1:
        return float("inf") if max_steps == -1 else max_steps
    if trainer.train_dataloader is None:
        trainer.fit_loop.setup_data()
    batches = trainer.num_training_batches  # per device, with limit_train_batches applied
    if batches == float("inf"):
        return max_steps  # as Lightning's own estimate (an iterable dataset: -1 without max_steps)
    total = sum(math.ceil(batches / schedule.accumulate(epoch)) for epoch in range(max(max_epochs, 1)))
    return min(total, max_steps) if max_steps != -1 else total


def _has_len(obj: object) -> bool:
    try:
        len(obj)  # type: ignore[arg-type]
    except TypeError:
        return False
    return True
