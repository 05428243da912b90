"""The DROP-epoch batch under the Trainer: ``LDBDataModuleMixin``, the train-loader reload, the accumulation,
``estimated_stepping_batches``, and their checks.

Lightning builds the train loader *before* ``on_train_epoch_start``, and inside ``train_dataloader()``
``trainer.current_epoch`` is already the epoch being loaded: so the batch size is chosen there, not by the callback at
epoch start (which would be one epoch late). ``trainer.estimated_stepping_batches`` assumes every epoch is as long as
the first; :func:`estimated_stepping_batches` counts each epoch with its own batch size.
"""

from __future__ import annotations

import contextlib
import functools
import math
import random
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities import CombinedLoader, rank_zero_warn
from torch.utils.data import DataLoader

from lightning_ldb import _compat
from lightning_ldb.schedule import BatchSchedule, is_drop_epoch
from lightning_ldb.undo import UndoList

_BATCH_SIZE_ATTRIBUTES = ("self.batch_size", "self.hparams.batch_size")
#: Where a data source holds the batch schedule of the fit it serves (set by the callback, removed after the fit).
_SCHEDULE_ATTRIBUTE = "_ldb_batch_schedule"
#: Set on a data source while its loader is built ahead for this (DROP) epoch, to check it before training.
_LOADING_EPOCH_ATTRIBUTE = "_ldb_loading_epoch"


def schedule_for(trainer: Trainer, every: int, batch_scale: int, scaling: str) -> BatchSchedule:
    """The fit's :class:`BatchSchedule`, with the user's batch-counted trainer settings it scales.

    An integer ``val_check_interval`` counts the epoch's batches only while ``check_val_every_n_epoch`` is set;
    with ``check_val_every_n_epoch=None`` it counts batches across epochs, cannot exceed an epoch, and is left as is.
    """
    val_check = trainer.val_check_interval if trainer.check_val_every_n_epoch is not None else None
    return BatchSchedule(
        every,
        batch_scale,
        trainer.limit_train_batches,
        scaling=scaling,
        accumulate_grad_batches=trainer.accumulate_grad_batches,
        val_check_interval=val_check,
    )


def accumulation_schedule_of(trainer: Trainer) -> BatchSchedule | None:
    """The batch schedule of the running fit if its DROP epochs accumulate micro-batches, else ``None``."""
    schedule = getattr(trainer, _SCHEDULE_ATTRIBUTE, None)
    return schedule if isinstance(schedule, BatchSchedule) and schedule.batch_scale > 1 else None


class GradientAccumulationScaler:
    """``batch_scaling="accumulate"``: DROP epochs take ``accumulate_grad_batches * batch_scale`` micro-batches per step.

    The loader keeps its batch size, so memory is that of a full epoch; Lightning divides each micro-batch's loss
    by ``accumulate_grad_batches`` and runs DDP's all-reduce on the last micro-batch of a step only, so a DROP
    epoch's effective batch, optimizer steps and all-reduces are those of a ``batch_scale`` times larger batch.

    The value is written at every batch start (the epoch is right there, also on resume), and the user's value is
    put back at every epoch end and when the fit ends. A value someone else wrote since (``StochasticWeightAveraging``
    , ``GradientAccumulationScheduler``) is taken as the user's, and multiplied on DROP epochs.

    Args:
        trainer: The trainer of the fit.
        schedule: The fit's batch schedule (``scaling="accumulate"``).
        undo: Where the user's setting is recorded, to be put back when the fit ends.
    """

    def __init__(self, trainer: Trainer, schedule: BatchSchedule, undo: UndoList) -> None:
        self._schedule = schedule
        self._user = trainer.accumulate_grad_batches
        self._written: int | None = None
        # Recorded unchanged: the value is set per batch, and the undo puts the user's back.
        undo.set_attribute(trainer, "accumulate_grad_batches", trainer.accumulate_grad_batches)
        # ``lightning_ldb.estimated_stepping_batches`` finds the schedule on the trainer (no mixin here).
        undo.set_attribute(trainer, _SCHEDULE_ATTRIBUTE, schedule)

    def on_train_start(self, trainer: Trainer) -> None:
        """Set the accumulation of the epoch that runs (a mid-epoch resume starts inside it)."""
        self._apply(trainer, trainer.current_epoch)

    def on_loader_built(self, trainer: Trainer) -> None:
        """Every batch start: set the epoch's accumulation, before the loss is divided by it."""
        self._apply(trainer, trainer.current_epoch)

    def on_train_epoch_end(self, trainer: Trainer) -> None:
        """Put the user's value back between epochs, where other callbacks may change it."""
        self._take_foreign_value(trainer)
        trainer.accumulate_grad_batches = self._written = self._user

    def _apply(self, trainer: Trainer, epoch: int) -> None:
        self._take_foreign_value(trainer)
        user = self._user
        value = user * self._schedule.batch_scale if is_drop_epoch(epoch, self._schedule.every) else user
        trainer.accumulate_grad_batches = self._written = value

    def _take_foreign_value(self, trainer: Trainer) -> None:
        if self._written is not None and trainer.accumulate_grad_batches != self._written:
            self._user = trainer.accumulate_grad_batches


def attach_batch_schedule(source: Any, schedule: BatchSchedule, undo: UndoList) -> bool:
    """Hand ``schedule`` to the train data source for one fit, if it is an :class:`LDBDataModuleMixin`.

    Args:
        source: The object that supplies the train loader (LightningModule, DataModule or loader).
        schedule: The fit's batch schedule.
        undo: Where the change is recorded, to be undone when the fit ends.

    Returns:
        Whether DROP epochs will load scaled batches.
    """
    if not isinstance(source, LDBDataModuleMixin):
        return False
    undo.set_attribute(source, _SCHEDULE_ATTRIBUTE, schedule)
    return True


def batch_schedule_of(source: Any) -> BatchSchedule | None:
    """The batch schedule ``source`` serves in the running fit, or ``None`` if it loads unscaled batches."""
    schedule = getattr(source, _SCHEDULE_ATTRIBUTE, None)
    return schedule if isinstance(schedule, BatchSchedule) and schedule.batch_scale > 1 else None


class TrainLoaderReloader:
    """Makes the trainer rebuild the train loader, and only it, before an epoch whose batch size differs.

    ``reload_dataloaders_every_n_epochs=1`` for the whole fit would rebuild the validation loaders every
    epoch too. Instead it is set to 1 just before an epoch whose batch size differs from the loaded one,
    and put back as soon as the new train loader is built (the validation loop reads it later, during the
    epoch). An integer ``limit_train_batches`` and ``val_check_interval`` are set for the epoch alike (see
    :class:`BatchSchedule`): Lightning reads both when it builds the train loader.

    At the start of training the loader of the first DROP epoch is built once and discarded, unread, so that a
    ``train_dataloader()`` that does not serve the scaled batch fails before the full epochs run.

    Args:
        trainer: The trainer of the fit.
        schedule: The fit's batch schedule (with the user's ``limit_train_batches``).
        undo: Where the user's settings are recorded, to be put back when the fit ends.
    """

    def __init__(self, trainer: Trainer, schedule: BatchSchedule, undo: UndoList) -> None:
        self._schedule = schedule
        self._user_reload = trainer.reload_dataloaders_every_n_epochs  # type: ignore[attr-defined]  # set in fit
        self._forced = False
        # Recorded as it is now (the value is unchanged here): ``_prepare`` changes it per epoch, the undo puts it back.
        undo.set_attribute(trainer, "limit_train_batches", trainer.limit_train_batches)
        if schedule.val_check_interval is not None:
            undo.set_attribute(trainer, "val_check_interval", trainer.val_check_interval)
        undo.callback(self.on_loader_built, trainer)

    def on_train_start(self, trainer: Trainer) -> None:
        """Rebuild the train loader if it was built for another epoch than the first one to run.

        On resume from an end-of-epoch checkpoint Lightning builds the loader while ``current_epoch`` still
        reads the finished epoch; with the setting at 1 it rebuilds it for the epoch that runs, and only then.
        Then check the loader of the first DROP epoch still to run (see :func:`check_drop_epoch_loader`).
        """
        self._prepare(trainer, trainer.current_epoch)
        epoch = first_drop_epoch(trainer.current_epoch, self._schedule.every)
        if trainer.max_epochs is None or trainer.max_epochs < 0 or epoch < trainer.max_epochs:
            check_drop_epoch_loader(_compat.train_data_source(trainer), epoch)

    def on_train_epoch_end(self, trainer: Trainer) -> None:
        """Request a rebuild of the train loader if the next epoch has another batch size."""
        epoch = trainer.current_epoch
        if self._schedule.batch_size(epoch + 1, 1) != self._schedule.batch_size(epoch, 1):
            self._prepare(trainer, epoch + 1)

    def on_loader_built(self, trainer: Trainer) -> None:
        """The train loader of this epoch is built (epoch or first batch start): put the user's setting back."""
        if self._forced:
            trainer.reload_dataloaders_every_n_epochs = self._user_reload  # type: ignore[attr-defined]
            self._forced = False

    def _prepare(self, trainer: Trainer, epoch: int) -> None:
        trainer.limit_train_batches = self._schedule.limit_batches(epoch)  # type: ignore[assignment]  # the user's
        if self._schedule.val_check_interval is not None:
            # An int is a number of batches: Lightning refuses one larger than the (shorter) DROP epoch.
            trainer.val_check_interval = self._schedule.val_check_batches(epoch)  # type: ignore[assignment]
        if self._user_reload != 1:
            trainer.reload_dataloaders_every_n_epochs = 1  # type: ignore[attr-defined]
            self._forced = True


def first_drop_epoch(epoch: int, every: int) -> int:
    """The first DROP epoch at or after ``epoch``."""
    return epoch if is_drop_epoch(epoch, every) else max(every, (epoch // every + 1) * every)


def check_drop_epoch_loader(source: Any, epoch: int) -> None:
    """Build ``source``'s train loader for DROP epoch ``epoch`` and discard it, unread, to check its batch size.

    The mixin's check (``ValueError`` if a loader does not serve the scaled batch) then runs before training
    rather than at the first DROP epoch. The global random state is put back afterwards, so the real epochs load
    and train exactly what they would without the check.

    Args:
        source: The train data source, an :class:`LDBDataModuleMixin`.
        epoch: The DROP epoch to build the loader for.

    Raises:
        ValueError: If the loader does not serve the scaled batch size (see :class:`LDBDataModuleMixin`).
    """
    if not isinstance(source, LDBDataModuleMixin):
        return
    with _preserved_global_rng():
        setattr(source, _LOADING_EPOCH_ATTRIBUTE, epoch)
        try:
            source.train_dataloader()
        finally:
            delattr(source, _LOADING_EPOCH_ATTRIBUTE)


@contextlib.contextmanager
def _preserved_global_rng() -> Iterator[None]:
    # A ``train_dataloader()`` may draw (a random split, a shuffled index): the check must not shift what follows.
    python_state = random.getstate()
    try:
        import numpy

        numpy_state: Any = numpy.random.get_state()
    except ImportError:  # pragma: no cover - numpy ships with torch's usual installs
        numpy, numpy_state = None, None  # type: ignore[assignment]
    with torch.random.fork_rng(devices=range(torch.cuda.device_count()) if torch.cuda.is_initialized() else []):
        try:
            yield
        finally:
            random.setstate(python_state)
            if numpy is not None:
                numpy.random.set_state(numpy_state)


class LDBDataModuleMixin:
    """Gives a DataModule (or a LightningModule with its own ``train_dataloader``) the DROP-epoch batch size.

    Put it first among the bases. While ``train_dataloader()`` runs, ``self.batch_size`` (or
    ``self.hparams.batch_size``) reads ``batch_size * batch_scale`` if the epoch being loaded is a DROP
    epoch of the trainer's :class:`~lightning_ldb.LayerDropBackCallback` (which hands the mixin its batch
    schedule for the duration of a fit), and the original value
    otherwise. Validation, test and predict loaders never change. Loaders built some other way can call
    :meth:`ldb_batch_size` themselves.

    Raises:
        ValueError: From ``train_dataloader()`` if batch scaling is active, neither ``self.batch_size``
            nor ``self.hparams.batch_size`` is an int, and the loader did not call :meth:`ldb_batch_size`.

    Example::

        >>> import torch
        >>> from lightning.pytorch import LightningDataModule
        >>> from torch.utils.data import DataLoader, TensorDataset
        >>> class Digits(LDBDataModuleMixin, LightningDataModule):
        ...     def __init__(self, batch_size=32):
        ...         super().__init__()
        ...         self.batch_size = batch_size
        ...     def train_dataloader(self):
        ...         return DataLoader(TensorDataset(torch.zeros(64, 2)), batch_size=self.batch_size)
        >>> Digits().train_dataloader().batch_size  # no trainer attached: the base size
        32
    """

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        own = cls.__dict__.get("train_dataloader")
        if own is not None and not getattr(own, "_ldb_scaled", False):
            cls.train_dataloader = _scaled_train_dataloader(own)  # type: ignore[method-assign,assignment]

    def train_dataloader(self) -> Any:
        # Reached when the mixin sits before a base class that defines ``train_dataloader``.
        return _scaled_train_dataloader(super().train_dataloader.__func__)(self)  # type: ignore[misc]

    def ldb_batch_size(self, base: int) -> int:
        """The training batch size for the epoch being loaded: ``base * batch_scale`` on DROP epochs.

        For loaders built from something other than ``self.batch_size``/``self.hparams.batch_size``.
        While the mixin has already scaled ``self.batch_size`` it returns ``base`` as is, so a batch size
        is never scaled twice.
        """
        self._ldb_helper_used = True
        if getattr(self, "_ldb_scaling", False):
            return base
        schedule = batch_schedule_of(self)
        trainer = _attached_trainer(self)
        if schedule is None or trainer is None:
            return base
        epoch = getattr(self, _LOADING_EPOCH_ATTRIBUTE, None)  # set while the loader is built ahead, for a check
        return schedule.batch_size(trainer.current_epoch if epoch is None else epoch, base)


def _attached_trainer(obj: Any) -> Trainer | None:
    # ``LightningModule.trainer`` raises when detached; ``LightningDataModule.trainer`` is None.
    try:
        return obj.trainer
    except RuntimeError:
        return None


def _scaled_train_dataloader(train_dataloader: Callable[[Any], Any]) -> Callable[[Any], Any]:
    @functools.wraps(train_dataloader)
    def wrapper(self: Any) -> Any:
        if getattr(self, "_ldb_scaling", False):  # an outer wrapper already scaled the batch size
            return train_dataloader(self)
        if batch_schedule_of(self) is None or _attached_trainer(self) is None:
            return train_dataloader(self)
        holders = _batch_size_holders(self)
        if not holders:
            self._ldb_helper_used = False
            loader = train_dataloader(self)
            if not self._ldb_helper_used:
                raise ValueError(
                    f"LDBDataModuleMixin found no batch size on {type(self).__name__}: it looks for an int in"
                    f" {' or '.join(_BATCH_SIZE_ATTRIBUTES)} (a property needs a setter). Set one of them, or build"
                    " the train loader with `batch_size=self.ldb_batch_size(base)`."
                )
            return loader
        bases = [holder[key] for holder, key in holders]
        scaled = [self.ldb_batch_size(base) for base in bases]
        self._ldb_scaling = True
        try:
            for (holder, key), size in zip(holders, scaled, strict=False):
                holder[key] = size
            loader = train_dataloader(self)
        finally:
            for (holder, key), base in zip(holders, bases, strict=False):
                holder[key] = base
            self._ldb_scaling = False
        if scaled != bases:
            _check_scaled(self, loader, bases, scaled)
        return loader

    wrapper._ldb_scaled = True  # type: ignore[attr-defined]
    return wrapper


class _AttributeHolder:
    """``holder[key]`` access to an object's attribute, so attributes and hparams are patched alike."""

    def __init__(self, obj: Any) -> None:
        self.obj = obj

    def __getitem__(self, key: str) -> Any:
        return getattr(self.obj, key)

    def __setitem__(self, key: str, value: Any) -> None:
        setattr(self.obj, key, value)


def _check_scaled(obj: Any, loader: Any, bases: list[int], scaled: list[int]) -> None:
    """Raise if a loader ``train_dataloader()`` returned on a DROP epoch does not load the scaled batch size.

    Every loader counts: a dict or list of loaders, or a ``CombinedLoader``, is checked loader by loader.
    """
    for where, inner in _inner_loaders(loader, ""):
        loaded = _loader_batch_size(inner)
        if loaded is None or loaded in scaled:
            continue  # a loader of unknown batch size (custom sampler) cannot be checked
        _raise_unscaled(obj, where, loaded, bases, scaled)


def _inner_loaders(loader: Any, where: str) -> Iterator[tuple[str, Any]]:
    if isinstance(loader, CombinedLoader):
        loader = loader.iterables
    if isinstance(loader, Mapping):
        for key, inner in loader.items():
            yield from _inner_loaders(inner, f"{where}[{key!r}]")
    elif isinstance(loader, (list, tuple)):
        for index, inner in enumerate(loader):
            yield from _inner_loaders(inner, f"{where}[{index}]")
    else:
        yield where, loader


def _raise_unscaled(obj: Any, where: str, loaded: int, bases: list[int], scaled: list[int]) -> None:
    what = f"a loader{where and ' at ' + where}"
    raise ValueError(
        f"LDBDataModuleMixin scaled {type(obj).__name__}'s batch size from {bases[0]} to {scaled[0]} for a DROP epoch,"
        f" but train_dataloader() returned {what} with batch_size={loaded}. Build the train loader from self.batch_size"
        " in train_dataloader(), not once in setup()."
    )


def _loader_batch_size(loader: Any) -> int | None:
    size = getattr(loader, "batch_size", None)
    if size is None:
        size = getattr(getattr(loader, "batch_sampler", None), "batch_size", None)
    return size if _is_int(size) else None


def _batch_size_holders(obj: Any) -> list[tuple[Any, str]]:
    holders: list[tuple[Any, str]] = []
    declared = getattr(type(obj), "batch_size", None)
    settable = not isinstance(declared, property) or declared.fset is not None
    if _is_int(getattr(obj, "batch_size", None)) and settable:
        holders.append((_AttributeHolder(obj), "batch_size"))
    hparams = getattr(obj, "hparams", None)
    if hparams is not None and _is_int(hparams.get("batch_size") if hasattr(hparams, "get") else None):
        holders.append((hparams, "batch_size"))
    return holders


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


# ------------------------------------------------------------------------------------------------ the fit's wiring
def attach(
    trainer: Trainer, pl_module: LightningModule, every: int, batch_scale: int, scaling: str, undo: UndoList
) -> TrainLoaderReloader | GradientAccumulationScaler | None:
    """Hand the fit's batch schedule to what changes the batch: the train loader's source if it is a mixin, or (with
    ``batch_scaling="accumulate"``) the trainer's accumulation."""
    if batch_scale == 1:
        return None
    schedule = schedule_for(trainer, every, batch_scale, scaling)
    if scaling == "accumulate":  # no mixin: the loader keeps its batches, Lightning accumulates them
        check_accumulate_scaling(pl_module, batch_scale)
        return GradientAccumulationScaler(trainer, schedule, undo)
    source = _compat.train_data_source(trainer)
    if attach_batch_schedule(source, schedule, undo):
        return TrainLoaderReloader(trainer, schedule, undo)
    mixins = [obj for obj in (_datamodule(trainer), pl_module) if isinstance(obj, LDBDataModuleMixin)]
    if mixins:
        why = (
            f" {type(mixins[0]).__name__} uses `LDBDataModuleMixin`, but the train loader comes from"
            f" {_describe_source(source)}. Put the mixin on the object that supplies the train loader,"
        )
    else:
        why = (
            " neither the DataModule nor the LightningModule uses `LDBDataModuleMixin`. Put"
            " `LDBDataModuleMixin` first among its bases (see the README),"
        )
    rank_zero_warn(
        f"LayerDropBackCallback(batch_scale={batch_scale}): the DROP-epoch batch size stays unscaled, because"
        f"{why} or pass batch_scale=1."
    )
    return None


def _describe_source(source: Any) -> str:
    if isinstance(source, LightningModule) or hasattr(source, "train_dataloader"):
        return f"{type(source).__name__}.train_dataloader()"
    if isinstance(source, Sequence) or source is None:
        return "the loaders passed to `fit`"
    return f"the {type(source).__name__} passed to `fit`"


def _datamodule(trainer: Trainer) -> Any:
    return trainer.datamodule  # type: ignore[attr-defined]  # a Trainer property the stubs do not show


def check_accumulate_scaling(pl_module: LightningModule, batch_scale: int) -> None:
    """Refuse ``batch_scaling="accumulate"`` where Lightning does not accumulate: manual optimization.

    Raises:
        ValueError: If the LightningModule uses manual optimization.
    """
    # Lightning ignores ``accumulate_grad_batches`` under manual optimization (it refuses a value != 1 at
    # fit start, before LDB changes it): the DROP epochs would step every micro-batch with the scaled LR.
    if not pl_module.automatic_optimization:
        raise ValueError(
            f"LayerDropBackCallback(batch_scaling='accumulate') needs automatic optimization, which"
            f" {type(pl_module).__name__} turns off. Use batch_scaling='loader' with LDBDataModuleMixin, or"
            " batch_scale=1."
        )


def warn_if_step_checkpoints(trainer: Trainer, batch_scale: int) -> None:
    """Warn that step-triggered checkpoints saved on a DROP epoch's last batch resume short (batch scaling on)."""
    # Lightning places a checkpoint saved on an epoch's last batch by comparing the batches done with the
    # length of the epoch it resumes into. With DROP epochs shorter, the FULL epoch after one resumes as if
    # mid-epoch and runs short. No public hook can correct Lightning's count, so say so up front.
    by_step = [
        cb
        for cb in trainer.checkpoint_callbacks
        if isinstance(cb, ModelCheckpoint) and _compat.checkpoint_triggers_on_steps(cb)
    ]
    if by_step:
        rank_zero_warn(
            f"LayerDropBackCallback(batch_scale={batch_scale}) with ModelCheckpoint(every_n_train_steps or"
            " train_time_interval): a checkpoint saved on the last batch of a DROP epoch resumes the next epoch short"
            " (README.md#the-drop-epoch-batch-size)."
        )


def warn_if_resumed_short_epoch(trainer: Trainer, every: int) -> None:
    """Warn when this resume is from a checkpoint saved on the last batch of a DROP epoch (batch scaling on)."""
    # The case ``warn_if_step_checkpoints`` announces, detected on resume. Lightning's loop progress is read
    # (never written): ``restarted_on_train_batch_end`` with ``is_last_batch`` means the checkpoint was saved
    # on the last batch of the epoch before ``current_epoch``, and Lightning carries its position over.
    epoch = trainer.current_epoch
    if epoch == 0:
        return
    carried = _compat.batches_carried_from_last_batch(trainer)
    if not carried:
        return
    if is_drop_epoch(epoch - 1, every) and not is_drop_epoch(epoch, every):
        rank_zero_warn(
            f"LayerDropBackCallback: this checkpoint was saved on the last batch of DROP epoch {epoch - 1}"
            f" ({carried} batches), so epoch {epoch} runs short by {carried} batches. Resume from that epoch's"
            " end-of-epoch checkpoint instead."
        )


# ------------------------------------------------------------------------------------------------ optimizer steps
def optimizer_steps_per_epoch(
    samples: int, batch_size: int, drop_last: bool, limit_batches: int | float, accumulate: int
) -> int:
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
    batches = min(batches, limit_batches) if isinstance(limit_batches, int) else int(batches * limit_batches)
    return math.ceil(batches / accumulate)


def estimated_stepping_batches(trainer: Trainer) -> int | float:
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
    _compat.setup_train_data(trainer)
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


def _accumulated_steps(trainer: Trainer, schedule: BatchSchedule) -> int | float:
    # Every epoch has the same batches (the loader is unchanged); DROP epochs step once per more of them.
    max_epochs, max_steps = trainer.max_epochs, trainer.max_steps
    if max_epochs is None or max_epochs == -1:
        return float("inf") if max_steps == -1 else max_steps
    if trainer.train_dataloader is None:
        _compat.setup_train_data(trainer)
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
