"""The DROP-epoch batch size: ``LDBDataModuleMixin``.

Lightning builds the train loader *before* ``on_train_epoch_start``, and inside ``train_dataloader()``
``trainer.current_epoch`` is already the epoch being loaded: so the batch size is chosen there, not
by the callback at epoch start (which would be one epoch late).
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Optional

from lightning.pytorch import Trainer
from lightning.pytorch.utilities import rank_zero_info

_BATCH_SIZE_ATTRIBUTES = ("self.batch_size", "self.hparams.batch_size")


def find_ldb_callback(trainer: Optional[Trainer]) -> Any:
    """The trainer's :class:`~lightning_ldb.LayerDropBackCallback`, or ``None``."""
    from lightning_ldb.callback import LayerDropBackCallback

    if trainer is None:
        return None
    return next((cb for cb in trainer.callbacks if isinstance(cb, LayerDropBackCallback)), None)


def enable_batch_scaling(trainer: Trainer) -> None:
    """Make ``trainer`` rebuild the train loader every epoch, so each epoch gets its own batch size."""
    if trainer.reload_dataloaders_every_n_epochs != 1:
        trainer.reload_dataloaders_every_n_epochs = 1
        rank_zero_info(
            "LayerDropBackCallback: set reload_dataloaders_every_n_epochs=1 so that DROP epochs load batches of the"
            " scaled size."
        )


class LDBDataModuleMixin:
    """Gives a DataModule (or a LightningModule with its own ``train_dataloader``) the DROP-epoch batch size.

    Put it first among the bases. While ``train_dataloader()`` runs, ``self.batch_size`` (or
    ``self.hparams.batch_size``) reads ``batch_size * batch_scale`` if the epoch being loaded is a DROP
    epoch of the trainer's :class:`~lightning_ldb.LayerDropBackCallback`, and the original value
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
            cls.train_dataloader = _scaled_train_dataloader(own)  # type: ignore[method-assign]

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
        trainer = _attached_trainer(self)
        callback = find_ldb_callback(trainer)
        if callback is None:
            return base
        return callback.batch_size_for_epoch(trainer.current_epoch, base)


def _attached_trainer(obj: Any) -> Optional[Trainer]:
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
        callback = find_ldb_callback(_attached_trainer(self))
        if callback is None or callback.batch_scale == 1:
            return train_dataloader(self)
        holders = _batch_size_holders(self)
        if not holders:
            self._ldb_helper_used = False
            loader = train_dataloader(self)
            if not self._ldb_helper_used:
                raise ValueError(
                    f"LDBDataModuleMixin found no batch size on {type(self).__name__}: it looks for an int in"
                    f" {' or '.join(_BATCH_SIZE_ATTRIBUTES)}. Set one of them, or build the train loader with"
                    " `batch_size=self.ldb_batch_size(base)`."
                )
            return loader
        bases = [holder[key] for holder, key in holders]
        scaled = [self.ldb_batch_size(base) for base in bases]
        self._ldb_scaling = True
        try:
            for (holder, key), size in zip(holders, scaled):
                holder[key] = size
            return train_dataloader(self)
        finally:
            for (holder, key), base in zip(holders, bases):
                holder[key] = base
            self._ldb_scaling = False

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


def _batch_size_holders(obj: Any) -> list[tuple[Any, str]]:
    holders: list[tuple[Any, str]] = []
    if _is_int(getattr(obj, "batch_size", None)) and not isinstance(getattr(type(obj), "batch_size", None), property):
        holders.append((_AttributeHolder(obj), "batch_size"))
    hparams = getattr(obj, "hparams", None)
    if hparams is not None and _is_int(hparams.get("batch_size") if hasattr(hparams, "get") else None):
        holders.append((hparams, "batch_size"))
    return holders


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)
