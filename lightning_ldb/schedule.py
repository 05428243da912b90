"""The LDB epoch schedule (paper, equation 1): which epochs are DROP epochs."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Union

from lightning_ldb._checks import check_int

#: The two training modes of an epoch.
DROP = "drop"
FULL = "full"


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

    An integer ``limit_train_batches`` (the user's, a number of batches) becomes ``limit // batch_scale``
    on DROP epochs, so that a DROP epoch sees no more samples than a full one.

    Example::

        >>> schedule = BatchSchedule(every=2, batch_scale=2, limit_train_batches=5)
        >>> [schedule.batch_size(epoch, 32) for epoch in range(4)]
        [32, 32, 64, 32]
        >>> [schedule.limit_batches(epoch) for epoch in range(4)]
        [5, 5, 2, 5]
    """

    every: int
    batch_scale: int
    limit_train_batches: Union[int, float, None] = None

    def limit_batches(self, epoch: int) -> Union[int, float, None]:
        """``limit_train_batches`` for ``epoch``: an int limit divided by ``batch_scale`` on DROP epochs (at least 1)."""
        limit = self.limit_train_batches
        if isinstance(limit, int) and not isinstance(limit, bool) and is_drop_epoch(epoch, self.every):
            return max(1, limit // self.batch_scale)
        return limit

    def batch_size(self, epoch: int, base: int) -> int:
        """The batch size of ``epoch`` for a base batch size ``base``."""
        return base * self.batch_scale if is_drop_epoch(epoch, self.every) else base

    def base_size(self, epoch: int, loaded: int) -> int:
        """The base batch size behind ``loaded``, the batch size of a loader built for ``epoch``."""
        return loaded // self.batch_scale if is_drop_epoch(epoch, self.every) else loaded
