"""The ``backward="block"`` mechanism: compute a dropped branch on its detached input, and undo it exactly.

With the branch's entry fed ``x.detach()`` (and its parameters frozen by
:class:`~lightning_ldb.freezing.ParameterFreezer`), nothing of the branch requires a gradient, so
autograd records none of it: the backward pass computes neither its weight nor its input gradients.
``detach()`` returns a tensor sharing the same storage, so the forward value is bit-for-bit the same.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn
from lightning_utilities.core.apply_func import apply_to_collection
from torch.utils.hooks import RemovableHandle

from lightning_ldb.branches import Branch


def _detach_inputs(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Any, Any]:
    # Every tensor, also inside tuples, lists, dicts and dataclasses (Hugging Face blocks pass keyword arguments).
    return apply_to_collection((args, kwargs), torch.Tensor, torch.Tensor.detach)


class BranchInputDetacher:
    """Detaches the inputs of branch entries with forward pre-hooks, and removes exactly those hooks.

    Every positional and keyword input of an entry (Hugging Face blocks call their submodules with
    keyword arguments) is replaced by its ``.detach()`` on every call of the entry, until
    :meth:`restore`.

    Example::

        >>> from lightning_ldb.branches import discover_branches
        >>> class Residual(nn.Module):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.fc = nn.Linear(2, 2)
        ...     def forward(self, x):
        ...         return x + self.fc(x)
        >>> model = Residual()
        >>> detacher = BranchInputDetacher()
        >>> detacher.detach(discover_branches(model, {"fc": []}))
        1
        >>> x = torch.ones(1, 2, requires_grad=True)
        >>> model.fc.requires_grad_(False)(x).requires_grad  # the branch alone no longer needs a gradient
        False
        >>> detacher.restore(); model.fc._forward_pre_hooks
        OrderedDict()
    """

    def __init__(self) -> None:
        self._handles: dict[int, tuple[Branch, RemovableHandle]] = {}

    def detach(self, branches: Iterable[Branch]) -> int:
        """Detach the inputs of these branches' entries from now on.

        An entry already detached (by an earlier call, or by another branch sharing it) gets no second hook.

        Returns:
            How many entries this call newly detached.
        """
        count = 0
        for branch in branches:
            key = id(branch.entry)
            if key in self._handles:
                continue
            handle = branch.entry.register_forward_pre_hook(_detach_inputs, with_kwargs=True)
            self._handles[key] = (branch, handle)
            count += 1
        return count

    def restore(self) -> None:
        """Remove every hook this detacher registered; the entries run as before. Safe to call twice."""
        for _, handle in self._handles.values():
            handle.remove()
        self._handles.clear()
