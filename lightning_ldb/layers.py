"""What LDB calls a layer, and which layers are candidates for dropping.

A *layer* is either a module that directly owns parameters (``granularity="module"``, the paper's
reading) or a single parameter tensor (``granularity="parameter"``, the authors' published code).
:func:`discover_layers` lists them in registration (``named_modules()``) order; :func:`order_layers`
puts them in the order the data flows through them, as observed on a training step
(:class:`RunOrderRecorder`), since "first" and "last" mean first and last on the data path. A parameter
shared by several modules (tied weights) belongs to each of their layers. Parameters of lazy modules that
are not materialised yet belong to no layer. A module with parametrizations
(``torch.nn.utils.parametrize``, e.g. ``weight_norm``) is one layer with the parametrizations' tensors.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from fnmatch import fnmatchcase
from typing import Any

import torch
from torch import nn
from torch.nn.parameter import is_lazy
from torch.nn.utils import parametrize
from torch.overrides import TorchFunctionMode
from torch.utils.weak import WeakIdKeyDictionary


@dataclass(frozen=True)
class Layer:
    """One droppable unit: a name and the parameters it owns.

    ``observed`` is ``False`` for a layer that took no part in the training step the order was observed on
    (see :func:`order_layers`); ``keep_first``/``keep_last`` do not count such layers.
    """

    name: str
    parameters: tuple[nn.Parameter, ...]
    observed: bool = field(default=True, compare=False)

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
        return _parameter_layers(model)
    layers = []
    inside: list[str] = []  # the ``parametrizations`` containers of parametrized modules: part of their owner's layer
    for name, module in model.named_modules():  # a module used twice is one layer
        if any(name == prefix or name.startswith(f"{prefix}.") for prefix in inside):
            continue
        owned = list(module.parameters(recurse=False))
        if parametrize.is_parametrized(module):
            # ``weight_norm`` moves ``weight`` into ``parametrizations.weight.original0/1``: the module computes one
            # weight from them, so they and the module's other parameters are one layer, dropped together.
            inside.append(_join(name, "parametrizations"))
            owned += list(module.parametrizations.parameters())
        owned = [param for param in dict.fromkeys(owned) if not is_lazy(param)]
        if owned:
            layers.append(Layer(name, tuple(owned)))
    return layers


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _parameter_layers(model: nn.Module) -> list[Layer]:
    # A parametrized tensor (``lin.weight`` under ``weight_norm``) is one parameter as the module sees it, stored
    # as ``lin.parametrizations.weight.original0/1``: one layer named ``lin.weight``.
    groups: dict[str, list[nn.Parameter]] = {}
    for name, param in model.named_parameters():
        if is_lazy(param):
            continue
        owner, marker, rest = f".{name}".rpartition(".parametrizations.")
        if marker:  # ``<owner>.parametrizations.<tensor>.original...``
            name = _join(owner[1:], rest.partition(".")[0])
        groups.setdefault(name, []).append(param)
    return [Layer(name, tuple(params)) for name, params in groups.items()]


def order_layers(layers: Sequence[Layer], run_order: Sequence[str], granularity: str = "module") -> list[Layer]:
    """``layers`` in the order the data flows through them, as :class:`RunOrderRecorder` observed it.

    A layer takes the place of its module in ``run_order``. A layer whose module is not in it took no part in
    the observed step (a module used only in validation, an MoE expert not routed to, an auxiliary head not run
    on that step): it comes last, in registration order, marked ``observed=False``, so that ``keep_first`` and
    ``keep_last`` (:func:`split_kept`) count only layers on the data path and always keep the real head. With
    no ``run_order`` (not observed yet), ``layers`` stay in registration order, all counted.

    Args:
        layers: The layers, in registration order.
        run_order: Qualified module names in the order they took part in a training step.
        granularity: The granularity ``layers`` were discovered with.

    Example::

        >>> head_first = [Layer("head", ()), Layer("body", ()), Layer("unused", ())]
        >>> [(layer.name, layer.observed) for layer in order_layers(head_first, ["body", "head"])]
        [('body', True), ('head', True), ('unused', False)]
    """
    if not run_order:
        return list(layers)
    rank = {name: index for index, name in enumerate(run_order)}
    seen = [layer for layer in layers if module_of(layer.name, granularity) in rank]
    seen.sort(key=lambda layer: rank[module_of(layer.name, granularity)])  # stable: a module's layers in order
    unseen = [replace(layer, observed=False) for layer in layers if module_of(layer.name, granularity) not in rank]
    return seen + unseen


def split_kept(layers: Sequence[Layer], keep_first: int, keep_last: int) -> tuple[list[Layer], list[Layer]]:
    """``(kept, rest)``: the first ``keep_first`` and last ``keep_last`` observed layers, and the others.

    Layers marked ``observed=False`` (see :func:`order_layers`) are never kept by the counts: they are in ``rest``.

    Example::

        >>> layers = [Layer("a", ()), Layer("b", ()), Layer("c", ()), Layer("unused", (), observed=False)]
        >>> [[layer.name for layer in part] for part in split_kept(layers, 1, 1)]
        [['a', 'c'], ['b', 'unused']]
    """
    observed = [layer for layer in layers if layer.observed]
    end = max(keep_first, len(observed) - keep_last)
    kept_ids = {id(layer) for layer in observed[:keep_first] + observed[end:]}
    kept = [layer for layer in layers if id(layer) in kept_ids]
    return kept, [layer for layer in layers if id(layer) not in kept_ids]


def _matches(name: str, patterns: Sequence[str]) -> bool:
    return any(fnmatchcase(name, pattern) for pattern in patterns)


def select_candidates(
    layers: Sequence[Layer],
    keep_first: int,
    keep_last: int,
    include: Sequence[str] | None = None,
    exclude: Sequence[str] | None = None,
) -> list[Layer]:
    """The layers that may be dropped.

    The first ``keep_first`` and last ``keep_last`` layers of ``layers`` are always trained (the paper
    keeps the first four and the last one); layers marked ``observed=False`` are not counted
    (:func:`split_kept`). Of the rest, a layer is a candidate if its name matches one of ``include`` (all
    match when ``include`` is None) and none of ``exclude`` (shell-style patterns, as in
    :func:`fnmatch.fnmatchcase`).

    Example::

        >>> model = nn.Sequential(*[nn.Linear(2, 2) for _ in range(6)])
        >>> [layer.name for layer in select_candidates(discover_layers(model), keep_first=2, keep_last=1)]
        ['2', '3', '4']
        >>> [layer.name for layer in select_candidates(discover_layers(model), 0, 0, exclude=["[0-3]"])]
        ['4', '5']
    """
    _, middle = split_kept(layers, keep_first, keep_last)
    return [
        layer
        for layer in middle
        if (include is None or _matches(layer.name, include)) and not (exclude and _matches(layer.name, exclude))
    ]


class RunOrderRecorder:
    """Records the order in which ``model``'s modules take part in a step's data path, until :meth:`stop`.

    A module is placed where its forward first uses one of its own parameters on the data; if it does not, where
    its forward first runs (forward pre-hooks); if its forward never runs, where an operation first combines one of
    its parameters with the data (a :class:`~torch.overrides.TorchFunctionMode` sees every torch operation). So
    ``nn.MultiheadAttention``'s ``out_proj``, Swin's ``attn.qkv``, an ``nn.ParameterList`` or a parameter of
    the LightningModule are placed where the data meets them, and a head whose weight is tied to the
    embedding where the head runs.

    What is not on the data path places nothing:

    - operations on the model's parameters and buffers alone (an L2 penalty, a logged weight norm, a copy). Their
      results carry the parameters' owners on, so a transposed weight applied to the data later places its module,
      but a single number computed from them carries none (a reduction, or an operation on such a number; one
      operation on a one-element parameter, as ``logit_scale.exp()``, still carries it): a penalty added to the
      loss places no layer;
    - forwards and operations under ``torch.no_grad`` (or ``inference_mode``) outside every module forward that
      runs with autograd (an evaluation pass, another callback's weight averaging); inside such a forward,
      ``no_grad`` parts (a frozen teacher, reentrant activation checkpointing) still count;
    - everything after the first ``backward`` (the optimizer's update, a re-computation for activation
      checkpointing).

    A module that neither runs nor has a parameter meet the data is not in the order.

    Example::

        >>> import torch
        >>> model = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 1))
        >>> recorder = RunOrderRecorder(model)
        >>> penalty = sum(p.pow(2).sum() for p in model.parameters())  # not on the data path
        >>> _ = model(torch.zeros(1, 2)) + penalty
        >>> recorder.stop()
        ['', '0', '1']
    """

    def __init__(self, model: nn.Module) -> None:
        # Module name -> the event count at its first run, first use of its parameters inside its own forward, and
        # first use of its parameters anywhere: one clock for all three.
        self._events = 0
        self._runs: dict[str, int] = {}
        self._own_uses: dict[str, int] = {}
        self._uses: dict[str, int] = {}
        # The module forwards running now (a module may call itself), innermost last, each with whether it counts:
        # entered with autograd on, or inside a forward that counts.
        self._stack: list[tuple[str, bool]] = []
        self._active: dict[str, int] = {}
        owners: dict[int, list[str]] = {}
        self._handles = []
        for name, module in model.named_modules(remove_duplicate=False):
            for param in module.parameters(recurse=False):
                owners.setdefault(id(param), []).append(name)
            self._handles.append(module.register_forward_pre_hook(self._entered(name)))
            self._handles.append(module.register_forward_hook(self._left(name), always_call=True))
        # The model's state: each parameter with its owners, each buffer with none.
        state: WeakIdKeyDictionary = WeakIdKeyDictionary()
        for buffer in model.buffers():
            state[buffer] = ()
        for param in model.parameters():
            state[param] = tuple(owners.get(id(param), ()))
        self._mode: _ParameterUses | None = _ParameterUses(state, self._used)
        self._mode.__enter__()

    def _counting(self) -> bool:
        return torch.is_grad_enabled() or (bool(self._stack) and self._stack[-1][1])

    def _entered(self, name: str):  # noqa: ANN202
        def record(module: nn.Module, args: object) -> None:
            counts = self._counting()
            if counts:
                self._runs.setdefault(name, self._tick())
            self._stack.append((name, counts))
            self._active[name] = self._active.get(name, 0) + 1

        return record

    def _left(self, name: str):  # noqa: ANN202
        def record(module: nn.Module, args: object, output: object) -> None:
            for index in range(len(self._stack) - 1, -1, -1):
                if self._stack[index][0] == name:
                    del self._stack[index]
                    break
            if self._active.get(name, 0) > 1:
                self._active[name] -= 1
            else:
                self._active.pop(name, None)

        return record

    def _used(self, owners: Sequence[str]) -> None:
        if not self._counting():
            return  # without autograd outside every training forward: an evaluation pass, an EMA update
        time = self._tick()
        for name in owners:
            self._uses.setdefault(name, time)
            if name in self._active:
                self._own_uses.setdefault(name, time)

    def _tick(self) -> int:
        self._events += 1
        return self._events

    def stop(self) -> list[str]:
        """Remove the hooks; return the module names in the order they took part."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        if self._mode is not None:
            # Pushed in ``__init__`` and popped here: modes a step enters in between are left by then.
            mode, self._mode = self._mode, None
            mode.__exit__(None, None, None)
        times = {**self._uses, **self._runs, **self._own_uses}
        return sorted(times, key=times.__getitem__)


#: Torch functions that start a backward pass: parameter uses after them are not the forward's.
_BACKWARD_FUNCTIONS = (torch.Tensor.backward, torch.autograd.backward)


class _ParameterUses(TorchFunctionMode):
    """Calls ``on_use(owner module names)`` where an operation meets the data with the model's parameters, until a
    backward.

    ``state`` maps the model's parameters to their owners and its buffers to none; each result computed from
    ``state`` alone joins it, with its inputs' owners (none for a single number, see :class:`RunOrderRecorder`).
    Any other tensor is data.
    """

    def __init__(self, state: WeakIdKeyDictionary, on_use: Any) -> None:
        super().__init__()
        self.state = state
        self.on_use = on_use
        self.recording = True

    def __torch_function__(self, func: Any, types: Any, args: Sequence[Any] = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        if func in _BACKWARD_FUNCTIONS:
            self.recording = False
        result = func(*args, **kwargs)
        if not self.recording:
            return result
        # Only operations that compute a tensor use the values (``.shape`` or ``.dtype`` do not); a factory
        # (``torch.randn``, ``torch.arange``) makes data.
        outputs = [value for value in _flatten(result) if isinstance(value, torch.Tensor)]
        inputs = [value for value in _flatten((args, kwargs)) if isinstance(value, torch.Tensor)]
        if not outputs or not inputs:
            return result
        known = [self.state.get(value) for value in inputs]
        owners = tuple(dict.fromkeys(name for names in known if names for name in names))
        if all(names is not None for names in known):  # the model's state alone: not on the data path yet
            number = all(out.numel() == 1 for out in outputs)
            if number and not all(isinstance(value, nn.Parameter) and value.numel() == 1 for value in inputs):
                # A penalty, a norm: a number from the weights, not the weights applied to the data. A one-element
                # parameter keeps its owner one step (``logit_scale.exp()``, then applied to the logits).
                owners = ()
            for out in outputs:
                if out not in self.state:
                    self.state[out] = owners
        elif owners:
            self.on_use(owners)
        return result


def _flatten(value: Any) -> Iterator[Any]:
    if isinstance(value, (list, tuple)):
        for item in value:
            yield from _flatten(item)
    elif isinstance(value, dict):
        for item in value.values():
            yield from _flatten(item)
    else:
        yield value
