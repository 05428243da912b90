"""The LDB epoch schedule (paper, equation 1): which epochs are DROP epochs."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Union

from lightning_ldb._checks import check_int

#: The two training modes of an epoch.
DROP = "drop"
FULL = "full"

#: How a DROP epoch takes its ``batch_scale`` times larger batch: larger loader batches (the data source is an
#: ``LDBDataModuleMixin``), or ``batch_scale`` times more micro-batches of the base size per optimizer step.
BATCH_SCALINGS = ("loader", "accumulate")


def is_drop_epoch(epoch: int, every: int) -> bool:
    """Whether ``epoch`` is a DROP epoch: ``epoch > 0 and epoch % every == 0``.

    Args:
        epoch: Zero-based epoch index.
        every: The period ``s`` of DROP epochs (``every=2`` drops on epochs 2, 4, 6, ...).

    Raises:
        TypeError: If ``epoch`` or ``every`` is not an int.
        ValueError: If ``epoch < 0`` or ``every < 1``.

    Example::

        >>> [is_drop_epoch(e, every=2) for e in range(5)]
        [False, False, True, False, True]
    """
    check_int("epoch", epoch, minimum=0)
    check_int("every", every, minimum=1)
    return epoch > 0 and epoch % every == 0


def epoch_mode(epoch: int, every: int) -> str:
    """``"drop"`` or ``"full"``: the mode of ``epoch`` under :func:`is_drop_epoch`."""
    return DROP if is_drop_epoch(epoch, every) else FULL


@dataclass(frozen=True)
class BatchSchedule:
    """The training batch size of each epoch: ``base * batch_scale`` on DROP epochs, ``base`` otherwise.

    The value the callback hands to the data source (:class:`~lightning_ldb.LDBDataModuleMixin`) and to
    :func:`~lightning_ldb.estimated_stepping_batches`, so that neither needs the callback itself.

    With ``scaling="loader"`` the loader's batches are ``batch_scale`` times larger on DROP epochs, and the
    settings that count batches follow: an integer ``limit_train_batches`` or ``val_check_interval`` (the
    user's) becomes ``value // batch_scale`` on DROP epochs, so that a DROP epoch sees no more samples than a
    full one and validates after as many samples. With ``scaling="accumulate"`` the batches keep their size
    and ``accumulate_grad_batches`` (the user's) is multiplied by ``batch_scale`` on DROP epochs instead.

    Example::

        >>> schedule = BatchSchedule(every=2, batch_scale=2, limit_train_batches=5)
        >>> [schedule.batch_size(epoch, 32) for epoch in range(4)]
        [32, 32, 64, 32]
        >>> [schedule.limit_batches(epoch) for epoch in range(4)]
        [5, 5, 2, 5]
        >>> accumulate = BatchSchedule(every=2, batch_scale=2, scaling="accumulate", accumulate_grad_batches=3)
        >>> [(accumulate.batch_size(epoch, 32), accumulate.accumulate(epoch)) for epoch in range(3)]
        [(32, 3), (32, 3), (32, 6)]
    """

    every: int
    batch_scale: int
    limit_train_batches: Union[int, float, None] = None
    scaling: str = "loader"
    accumulate_grad_batches: int = 1
    val_check_interval: Optional[Union[int, float]] = None

    def limit_batches(self, epoch: int) -> Union[int, float, None]:
        """``limit_train_batches`` for ``epoch``: an int limit divided by ``batch_scale`` on DROP epochs (at least 1)."""
        return self._batch_count(epoch, self.limit_train_batches)

    def val_check_batches(self, epoch: int) -> Optional[Union[int, float]]:
        """``val_check_interval`` for ``epoch``: an int interval divided by ``batch_scale`` on DROP epochs (at least 1)."""
        return self._batch_count(epoch, self.val_check_interval)

    def batch_size(self, epoch: int, base: int) -> int:
        """The batch size of ``epoch`` for a base batch size ``base``."""
        return base * self.batch_scale if self._loader_scaled(epoch) else base

    def base_size(self, epoch: int, loaded: int) -> int:
        """The base batch size behind ``loaded``, the batch size of a loader built for ``epoch``."""
        return loaded // self.batch_scale if self._loader_scaled(epoch) else loaded

    def accumulate(self, epoch: int) -> int:
        """``accumulate_grad_batches`` for ``epoch``: the user's, times ``batch_scale`` on DROP epochs when accumulating."""
        if self.scaling == "accumulate" and is_drop_epoch(epoch, self.every):
            return self.accumulate_grad_batches * self.batch_scale
        return self.accumulate_grad_batches

    def _loader_scaled(self, epoch: int) -> bool:
        return self.scaling == "loader" and is_drop_epoch(epoch, self.every)

    def _batch_count(self, epoch: int, value: Optional[Union[int, float]]) -> Optional[Union[int, float]]:
        # Only a count of batches follows the batch size; a fraction of the epoch is the same fraction.
        if isinstance(value, int) and not isinstance(value, bool) and self._loader_scaled(epoch):
            return max(1, value // self.batch_scale)
        return value
