"""What LDB calls a layer, and which layers are candidates for dropping.

A *layer* is either a module that directly owns parameters (``granularity="module"``, the paper's
reading) or a single parameter tensor (``granularity="parameter"``, the authors' published code).
:func:`discover_layers` lists them in registration (``named_modules()``) order; :func:`order_layers`
puts them in the order in which they run, as observed on a training step, since "first" and "last"
mean first and last to run. A parameter shared by several modules (tied weights) belongs to each of
their layers. Parameters of lazy modules that are not materialised yet belong to no layer.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from fnmatch import fnmatchcase
from typing import Optional

from torch import nn
from torch.nn.parameter import is_lazy

GRANULARITIES = ("module", "parameter")


@dataclass(frozen=True)
class Layer:
    """One droppable unit: a name and the parameters it owns."""

    name: str
    parameters: tuple[nn.Parameter, ...]

    @property
    def numel(self) -> int:
        return sum(p.numel() for p in self.parameters)

    @property
    def trainable(self) -> bool:
        """Whether any of its parameters requires a gradient right now."""
        return any(p.requires_grad for p in self.parameters)


def module_of(layer_name: str, granularity: str) -> str:
    """The qualified name of the module whose forward runs ``layer_name`` (a parameter's owner for ``"parameter"``)."""
    return layer_name.rpartition(".")[0] if granularity == "parameter" else layer_name


def unique_numel(parameters: Sequence[nn.Parameter]) -> int:
    """Elements of ``parameters``, each tensor counted once."""
    return sum(p.numel() for p in {id(p): p for p in parameters}.values())


def discover_layers(model: nn.Module, granularity: str = "module") -> list[Layer]:
    """List ``model``'s layers in ``named_modules()`` order.

    A parameter shared by several modules belongs to each of their layers; an uninitialised
    parameter of a lazy module (``nn.LazyLinear`` before its first forward) to none.

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
        return [Layer(name, (param,)) for name, param in model.named_parameters() if not is_lazy(param)]
    layers = []
    for name, module in model.named_modules():  # a module used twice is one layer
        owned = tuple(param for param in module.parameters(recurse=False) if not is_lazy(param))
        if owned:
            layers.append(Layer(name, owned))
    return layers


def order_layers(layers: Sequence[Layer], run_order: Sequence[str], granularity: str = "module") -> list[Layer]:
    """``layers`` in the order their modules first ran; layers never seen running keep registration order, last.

    Args:
        layers: The layers, in registration order.
        run_order: Qualified module names in the order of their first forward call on a training step.
        granularity: The granularity ``layers`` were discovered with.

    Example::

        >>> head_first = [Layer("head", ()), Layer("body", ()), Layer("unused", ())]
        >>> [layer.name for layer in order_layers(head_first, ["body", "head"])]
        ['body', 'head', 'unused']
    """
    rank = {name: index for index, name in enumerate(run_order)}
    unseen = len(rank)
    positions = {id(layer): (rank.get(module_of(layer.name, granularity), unseen), i) for i, layer in enumerate(layers)}
    return sorted(layers, key=lambda layer: positions[id(layer)])


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


class RunOrderRecorder:
    """Records the order in which ``model``'s modules first run, through forward pre-hooks, until :meth:`stop`.

    Example::

        >>> import torch
        >>> model = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 1))
        >>> recorder = RunOrderRecorder(model)
        >>> _ = model(torch.zeros(1, 2))
        >>> recorder.stop()
        ['', '0', '1']
    """

    def __init__(self, model: nn.Module) -> None:
        self._order: dict[str, None] = {}
        self._handles = [
            module.register_forward_pre_hook(self._recorder(name))
            for name, module in model.named_modules(remove_duplicate=False)
        ]

    def _recorder(self, name: str):  # noqa: ANN202
        def record(module: nn.Module, args: object) -> None:
            self._order.setdefault(name, None)

        return record

    def stop(self) -> list[str]:
        """Remove the hooks; return the module names in the order they first ran."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        return list(self._order)
