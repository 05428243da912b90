"""What LDB calls a layer, and which layers are candidates for dropping.

A *layer* is either a module that directly owns parameters (``granularity="module"``, the paper's
reading) or a single parameter tensor (``granularity="parameter"``, the authors' published code).
Layers are listed in ``named_modules()`` order, each shared parameter counted once, and the list
is structural: it does not depend on which parameters are trainable right now, so a draw made from
it is the same whatever the user has frozen.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from fnmatch import fnmatchcase
from typing import Optional

from torch import nn

GRANULARITIES = ("module", "parameter")


@dataclass(frozen=True)
class Layer:
    """One droppable unit: a name and the parameters it owns."""

    name: str
    parameters: tuple[nn.Parameter, ...]

    @property
    def numel(self) -> int:
        return sum(p.numel() for p in self.parameters)


def discover_layers(model: nn.Module, granularity: str = "module") -> list[Layer]:
    """List ``model``'s layers in ``named_modules()`` order, each shared parameter counted once.

    Args:
        model: The module to inspect.
        granularity: ``"module"``: a layer is a module that directly owns parameters (the root module
            is named ``""``). ``"parameter"``: a layer is one parameter tensor, named as in
            ``named_parameters()``.

    Example::

        >>> model = nn.Sequential(nn.Linear(2, 2), nn.ReLU(), nn.Linear(2, 1))
        >>> [layer.name for layer in discover_layers(model)]
        ['0', '2']
        >>> [layer.name for layer in discover_layers(model, "parameter")]
        ['0.weight', '0.bias', '2.weight', '2.bias']
    """
    if granularity == "parameter":
        return [Layer(name, (param,)) for name, param in model.named_parameters()]
    seen: set[int] = set()
    layers = []
    for name, module in model.named_modules():
        owned = []
        for param in module.parameters(recurse=False):
            if id(param) not in seen:
                seen.add(id(param))
                owned.append(param)
        if owned:
            layers.append(Layer(name, tuple(owned)))
    return layers


def _matches(name: str, patterns: Sequence[str]) -> bool:
    return any(fnmatchcase(name, pattern) for pattern in patterns)


def select_candidates(
    layers: Sequence[Layer],
    keep_first: int,
    keep_last: int,
    include: Optional[Sequence[str]] = None,
    exclude: Optional[Sequence[str]] = None,
) -> list[Layer]:
    """The layers that may be dropped.

    The first ``keep_first`` and last ``keep_last`` layers of the whole network are always trained
    (the paper keeps the first four and the last one). Of the rest, a layer is a candidate if its
    name matches one of ``include`` (all match when ``include`` is None) and none of ``exclude``
    (shell-style patterns, as in :func:`fnmatch.fnmatchcase`).

    Example::

        >>> model = nn.Sequential(*[nn.Linear(2, 2) for _ in range(6)])
        >>> [layer.name for layer in select_candidates(discover_layers(model), keep_first=2, keep_last=1)]
        ['2', '3', '4']
        >>> [layer.name for layer in select_candidates(discover_layers(model), 0, 0, exclude=["[0-3]"])]
        ['4', '5']
    """
    middle = list(layers[keep_first : max(keep_first, len(layers) - keep_last)])
    return [
        layer
        for layer in middle
        if (include is None or _matches(layer.name, include)) and not (exclude and _matches(layer.name, exclude))
    ]
