"""An undo list: every change LDB makes to an object it does not own, recorded so it can be put back exactly."""

from __future__ import annotations

from collections.abc import MutableMapping
from typing import Any, Callable

_ABSENT = object()


class UndoList:
    """Records changes to other objects' attributes and mapping items, and reverts them in reverse order.

    Example::

        >>> class Trainer: reload_dataloaders_every_n_epochs = 0
        >>> trainer, undo = Trainer(), UndoList()
        >>> undo.set_attribute(trainer, "reload_dataloaders_every_n_epochs", 1)
        >>> undo.set_item(kwargs := {}, "find_unused_parameters", True)
        >>> undo.undo()
        >>> trainer.reload_dataloaders_every_n_epochs, kwargs
        (0, {})
    """

    def __init__(self) -> None:
        self._actions: list[Callable[[], None]] = []

    def __len__(self) -> int:
        return len(self._actions)

    def set_attribute(self, obj: Any, name: str, value: Any) -> None:
        """``setattr(obj, name, value)``, undone by restoring the old value (or deleting an attribute that was absent)."""
        old = getattr(obj, name, _ABSENT)

        def revert() -> None:
            if old is not _ABSENT:
                setattr(obj, name, old)
            elif hasattr(obj, name):
                delattr(obj, name)

        setattr(obj, name, value)
        self._actions.append(revert)

    def set_item(self, mapping: MutableMapping[str, Any], key: str, value: Any) -> None:
        """``mapping[key] = value``, undone by restoring the old value (or removing a key that was absent)."""
        old = mapping.get(key, _ABSENT)

        def revert() -> None:
            if old is _ABSENT:
                mapping.pop(key, None)
            else:
                mapping[key] = old

        mapping[key] = value
        self._actions.append(revert)

    def on_undo(self, action: Callable[[], None]) -> None:
        """Run ``action`` when the list is undone (for changes that are not a plain assignment)."""
        self._actions.append(action)

    def undo(self) -> None:
        """Revert every recorded change, newest first, and forget them; safe to call more than once."""
        while self._actions:
            self._actions.pop()()
