"""The undo list: every change LDB makes to an object it does not own, recorded so it can be put back exactly.

A :class:`contextlib.ExitStack` with two helpers for the changes LDB makes (an attribute, a mapping item): closing
the stack reverts them newest first, on every exit path, and a second close does nothing.
"""

from __future__ import annotations

from collections.abc import MutableMapping
from contextlib import ExitStack
from typing import Any

_ABSENT = object()


class UndoList(ExitStack):
    """An :class:`~contextlib.ExitStack` that records assignments to other objects and reverts them on :meth:`close`.

    Example::

        >>> class Trainer: reload_dataloaders_every_n_epochs = 0
        >>> trainer, undo = Trainer(), UndoList()
        >>> undo.set_attribute(trainer, "reload_dataloaders_every_n_epochs", 1)
        >>> undo.set_item(kwargs := {}, "find_unused_parameters", True)
        >>> undo.close()
        >>> trainer.reload_dataloaders_every_n_epochs, kwargs
        (0, {})
    """

    def set_attribute(self, obj: Any, name: str, value: Any) -> None:
        """``setattr(obj, name, value)``, undone by restoring the old value (or deleting an attribute that was absent)."""
        old = getattr(obj, name, _ABSENT)

        def revert() -> None:
            if old is not _ABSENT:
                setattr(obj, name, old)
            elif hasattr(obj, name):
                delattr(obj, name)

        setattr(obj, name, value)
        self.callback(revert)

    def set_item(self, mapping: MutableMapping[str, Any], key: str, value: Any) -> None:
        """``mapping[key] = value``, undone by restoring the old value (or removing a key that was absent)."""
        old = mapping.get(key, _ABSENT)

        def revert() -> None:
            if old is _ABSENT:
                mapping.pop(key, None)
            else:
                mapping[key] = old

        mapping[key] = value
        self.callback(revert)
