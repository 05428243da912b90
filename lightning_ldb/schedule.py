"""The LDB epoch schedule (paper, equation 1): which epochs are DROP epochs."""

from __future__ import annotations

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
