"""The dropping mechanism: freeze parameters so autograd skips their weight gradient, and undo it exactly."""

from __future__ import annotations

from collections.abc import Iterable

from torch import nn


class ParameterFreezer:
    """Freezes trainable parameters and later unfreezes exactly those it froze.

    A parameter that is already frozen (by the user, a fine-tuning callback, ...) is never touched,
    so restoring never unfreezes anything LDB did not freeze itself.
    """

    def __init__(self) -> None:
        self._frozen: list[nn.Parameter] = []

    @property
    def frozen(self) -> tuple[nn.Parameter, ...]:
        """The parameters this freezer froze and has not restored yet."""
        return tuple(self._frozen)

    def freeze(self, parameters: Iterable[nn.Parameter]) -> None:
        """Freeze those of ``parameters`` that are trainable now, and clear their gradients.

        ``requires_grad=False`` before the forward makes autograd skip the weight gradient, and
        ``grad=None`` (never a zero tensor) keeps every optimizer, momentum and weight decay
        included, from moving them.
        """
        frozen_ids = {id(p) for p in self._frozen}
        for param in parameters:
            if param.requires_grad and id(param) not in frozen_ids:
                param.requires_grad_(False)
                param.grad = None
                self._frozen.append(param)
                frozen_ids.add(id(param))

    def clear_grads(self) -> None:
        """Drop any gradient a frozen parameter picked up (e.g. a ``zero_grad(set_to_none=False)``)."""
        for param in self._frozen:
            if param.grad is not None:
                param.grad = None

    def restore(self) -> None:
        """Make every parameter this freezer froze trainable again."""
        for param in self._frozen:
            param.requires_grad_(True)
        self._frozen.clear()
