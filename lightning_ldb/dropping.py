"""How a drawn unit is dropped and released: the units of a model, freezing, detaching, and what compiled code and
optimizers make of it.

LDB draws over *units*, and the two ``backward`` modes differ only in what a unit is:

* ``"weights"`` (the paper): a unit is a layer (:class:`~lightning_ldb.layers.Layer`). Dropping it freezes its
  parameters (:class:`ParameterFreezer`), so autograd skips their weight gradient and no optimizer moves them.
* ``"block"``: a unit is a residual branch (:class:`~lightning_ldb.branches.Branch`). Dropping it freezes its
  parameters and feeds its entry a detached input (:class:`BranchInputDetacher`), so autograd skips the whole branch.

Both are a :class:`Units`: *discover* the units of a model in run order, list the *candidates* among what is
trainable now, *drop* some, *release* them. Both count ``keep_first``/``keep_last`` in layers, so the two modes keep
the same layers trained, and a parameter shared with a layer that is always trained (tied weights) is never frozen.

This module imports torch, never Lightning.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable, Sequence
from typing import Any, Protocol

import torch
from lightning_utilities.core.apply_func import apply_to_collection
from torch import nn
from torch.nn.parameter import is_lazy
from torch.optim import Optimizer
from torch.utils.hooks import RemovableHandle

from lightning_ldb import _compat
from lightning_ldb.branches import Branch, BranchesSpec, discover_branches, select_branch_candidates, unrecognised_note
from lightning_ldb.layers import Layer, discover_layers, order_layers, select_candidates, split_kept


# ------------------------------------------------------------------------------------------------ freezing
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

    def freeze(self, parameters: Iterable[nn.Parameter]) -> int:
        """Freeze those of ``parameters`` that are trainable now, and clear their gradients.

        ``requires_grad=False`` before the forward makes autograd skip the weight gradient, and
        ``grad=None`` (never a zero tensor) keeps every optimizer, momentum and weight decay
        included, from moving them.

        Calling it again with the same parameters re-freezes any that someone else made trainable
        in between (e.g. ``BackboneFinetuning`` unfreezing a whole backbone after LDB dropped part
        of it); :meth:`restore` still makes them trainable, which is what that someone asked for.

        Returns:
            How many parameters this call froze (newly or again).
        """
        frozen_ids = {id(p) for p in self._frozen}
        count = 0
        for param in parameters:
            if not param.requires_grad:
                continue  # frozen by its owner, or still frozen by this freezer
            param.requires_grad_(False)
            param.grad = None
            count += 1
            if id(param) not in frozen_ids:
                self._frozen.append(param)
                frozen_ids.add(id(param))
        return count

    def clear_grads(self, optimizer: Optimizer | None = None) -> None:
        """Drop any gradient a frozen parameter picked up (e.g. a ``zero_grad(set_to_none=False)``).

        Args:
            optimizer: Only the frozen parameters of this optimizer (the one about to step), so that
                another optimizer's placeholder (:meth:`give_placeholder_grads`) survives until its own
                step. ``None``: all of them.
        """
        stray = [param for param in self._frozen if param.grad is not None]
        if not stray:  # the usual case, and every full epoch's: no set of the optimizer's parameters per step
            return
        owned = None if optimizer is None else {id(p) for group in optimizer.param_groups for p in group["params"]}
        for param in stray:
            if owned is None or id(param) in owned:
                param.grad = None

    def give_placeholder_grads(self, optimizers: Iterable[Optimizer]) -> None:
        """Give a zero gradient to one frozen parameter of each optimizer that holds no gradient at all.

        For ``torch.amp.GradScaler``, which refuses to step an optimizer without a single gradient.
        The placeholder must not reach the optimizer (a zero tensor still moves weights through
        momentum and weight decay): :meth:`clear_grads`, called right before each step, removes it.
        """
        frozen_ids = {id(p) for p in self._frozen}
        for optimizer in optimizers:
            params = [p for group in optimizer.param_groups for p in group["params"]]
            if any(p.grad is not None for p in params):
                continue
            mine = [p for p in params if id(p) in frozen_ids]
            if mine:
                smallest = min(mine, key=lambda p: p.numel())
                smallest.grad = torch.zeros_like(smallest)

    def restore(self) -> None:
        """Make every parameter this freezer froze trainable again, without any gradient left from its frozen time."""
        for param in self._frozen:
            param.requires_grad_(True)
            param.grad = None  # a scaler placeholder, or the zero tensor of ``zero_grad(set_to_none=False)``
        self._frozen.clear()


#: Optimizers that move a parameter without a gradient, checked by experiment: ``LBFGS`` steps every parameter
#: along one flat search direction built from past steps, and counts a missing gradient as zero, so a dropped
#: layer moves (by 0.4 to 1.2 per element in one step on a small MLP). Checked and safe: the ``torch.optim``
#: first-order optimizers, ``ZeroRedundancyOptimizer`` (its shard optimizer skips a parameter without a gradient,
#: with or without bucket views), the schedule-free optimizers.
MOVES_PARAMETERS_WITHOUT_GRADIENT: tuple[type[Optimizer], ...] = (torch.optim.LBFGS,)


def refuse_optimizers_that_move_dropped_parameters(optimizers: Iterable[Optimizer]) -> None:
    """Raise if one of ``optimizers`` would move parameters that have no gradient (dropped layers).

    Args:
        optimizers: The trainer's optimizers.

    Raises:
        ValueError: Naming the first such optimizer, its index, and what to use instead.
    """
    for index, optimizer in enumerate(optimizers):
        if isinstance(optimizer, MOVES_PARAMETERS_WITHOUT_GRADIENT):
            raise ValueError(
                f"LDB cannot train with {type(optimizer).__name__} (optimizer {index}): dropped layers would move (it"
                " counts a missing gradient as zero). Use an optimizer that skips parameters without a gradient (SGD,"
                " Adam, AdamW)."
            )


# ------------------------------------------------------------------------------------------------ detaching
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


# ------------------------------------------------------------------------------------------------ units
class Unit(Protocol):
    """One droppable unit: a name (for logs and checks) and the parameters a drop freezes."""

    @property
    def name(self) -> str: ...

    @property
    def parameters(self) -> tuple[nn.Parameter, ...]: ...


class Units(ABC):
    """The droppable units of one model, and the mechanism that drops them: layers (:class:`LayerUnits`) or residual
    branches (:class:`BranchUnits`). Both share the layers in run order, the kept layers, and the freezer."""

    def __init__(
        self,
        freezer: ParameterFreezer,
        granularity: str,
        keep_first: int,
        keep_last: int,
        include: Sequence[str] | None,
        exclude: Sequence[str] | None,
    ) -> None:
        self.freezer = freezer
        self.granularity = granularity
        self.keep_first, self.keep_last = keep_first, keep_last
        self.include, self.exclude = include, exclude
        self.layers: list[Layer] = []  # registration order
        self.branches: list[Branch] = []  # the residual branches (block mode only)
        self.ordered: list[Layer] = []  # run order
        self.lazy = False

    def discover(self, model: nn.Module, run_order: Sequence[str]) -> None:
        """List ``model``'s units, layers ordered by ``run_order`` (module names in the order they first ran).

        Raises:
            ValueError: If no unit can ever be a candidate (``keep_first``/``keep_last``/``include``/``exclude``).
        """
        self.layers = discover_layers(model, self.granularity)
        self.ordered = order_layers(self.layers, run_order, self.granularity)
        # Lazy modules materialise on the first forward; the engine discovers again after it, and checks then.
        self.lazy = any(is_lazy(p) for p in model.parameters())
        if not self.lazy:
            self._check(model)

    @abstractmethod
    def candidates(self) -> Sequence[Unit]:
        """The units that may be dropped now: trainable, not kept, not filtered out; in run order."""

    def release(self) -> None:
        """Undo every drop exactly: parameters trainable again, hooks removed."""
        self.freezer.restore()

    def drop(
        self, dropped: Sequence[Unit], candidates: Sequence[Unit]
    ) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
        """Drop ``dropped`` (drawn from ``candidates``); return the frozen parameters and all droppable ones."""
        # A parameter shared with a layer that is always trained (kept first/last, excluded) is never dropped.
        kept = self._always_trained(candidates)
        droppable = [p for unit in candidates for p in unit.parameters if id(p) not in kept]
        frozen = [p for unit in dropped for p in unit.parameters if id(p) not in kept]
        self.freezer.freeze(frozen)
        return frozen, droppable

    def why_no_candidates(self) -> str:
        """Why :meth:`candidates` is empty now, for the nothing-to-drop warning."""
        trainable = self._trainable_layers()
        _, rest = split_kept(trainable, self.keep_first, self.keep_last)
        if not trainable:
            return "no layer is trainable"
        if not rest:
            return (
                f"all {len(trainable)} trainable layer(s) are kept by keep_first={self.keep_first}/"
                f"keep_last={self.keep_last} (a frozen backbone: a linear probe, or the epochs before"
                " BackboneFinetuning unfreezes it)"
            )
        return self._why_filtered(rest)

    @abstractmethod
    def _why_filtered(self, rest: Sequence[Layer]) -> str: ...

    def _trainable_layers(self) -> list[Layer]:
        # keep_first/keep_last count the layers trainable now, in run order.
        return [layer for layer in self.ordered if layer.trainable]

    @abstractmethod
    def _check(self, model: nn.Module) -> None: ...

    @abstractmethod
    def _always_trained(self, candidates: Sequence[Any]) -> set[int]: ...


class LayerUnits(Units):
    """``backward="weights"``: the units are layers; dropping one freezes its parameters."""

    def candidates(self) -> list[Layer]:
        return select_candidates(self._trainable_layers(), self.keep_first, self.keep_last, self.include, self.exclude)

    def _check(self, model: nn.Module) -> None:
        # Structural: can any layer ever be a candidate? Which ones are depends on what is trainable at each draw.
        if not select_candidates(self.layers, self.keep_first, self.keep_last, self.include, self.exclude):
            n = len(self.layers)
            raise ValueError(
                f"LayerDropBack found no candidate layer in {type(model).__name__}: keep_first={self.keep_first}/"
                f"keep_last={self.keep_last} keep {min(n, self.keep_first + self.keep_last)} of its {n} layers and"
                " include/exclude filter the rest. Lower keep_first/keep_last or widen the patterns."
            )

    def _why_filtered(self, rest: Sequence[Layer]) -> str:
        return (
            f"the {len(rest)} trainable layer(s) keep_first={self.keep_first}/keep_last={self.keep_last} leave are"
            f" all filtered out by include={self.include!r} / exclude={self.exclude!r}"
        )

    def _always_trained(self, candidates: Sequence[Any]) -> set[int]:
        candidate_ids = {id(layer) for layer in candidates}
        return {id(p) for layer in self.ordered if id(layer) not in candidate_ids for p in layer.parameters}


class BranchUnits(Units):
    """``backward="block"``: the units are residual branches; dropping one freezes it and detaches its input.

    Args:
        branches: What ``branches=`` names (``None``: the built-in rules).
    """

    def __init__(self, *args: Any, branches: BranchesSpec = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.spec = branches
        self.branches: list[Branch] = []
        self.detacher = BranchInputDetacher()

    def discover(self, model: nn.Module, run_order: Sequence[str]) -> None:
        self.branches = discover_branches(model, self.spec)
        super().discover(model, run_order)

    def candidates(self) -> list[Branch]:
        # A trainable branch that holds no kept layer; keep_first/keep_last count layers, as in weights mode.
        branches = [branch for branch in self.branches if any(p.requires_grad for p in branch.parameters)]
        return select_branch_candidates(
            branches, self._trainable_layers(), self.keep_first, self.keep_last, self.include, self.exclude
        )

    def drop(
        self, dropped: Sequence[Unit], candidates: Sequence[Unit]
    ) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
        frozen, droppable = super().drop(dropped, candidates)
        self.detacher.detach(dropped)  # type: ignore[arg-type]  # BranchUnits only ever draws branches
        return frozen, droppable

    def release(self) -> None:
        self.detacher.restore()
        super().release()

    def _check(self, model: nn.Module) -> None:
        if not self.branches:
            raise ValueError(
                f"LayerDropBack(backward='block') found no residual branch in {type(model).__name__}. Name them with"
                " `branches=` (docs/block-mode.md#naming-branches-of-other-models-branches) or use"
                " backward='weights'." + unrecognised_note(model, self.spec)
            )
        if not select_branch_candidates(
            self.branches, self.ordered, self.keep_first, self.keep_last, self.include, self.exclude
        ):
            raise ValueError(
                f"LayerDropBack(backward='block'): each of the {len(self.branches)} branches in {type(model).__name__}"
                f" holds a layer kept by keep_first={self.keep_first}/keep_last={self.keep_last} or is filtered out."
                " Lower keep_first/keep_last or widen include/exclude."
            )

    def _why_filtered(self, rest: Sequence[Layer]) -> str:
        return (
            "every trainable residual branch holds a layer kept by keep_first/keep_last or is filtered out by"
            f" include={self.include!r} / exclude={self.exclude!r}"
        )

    def _always_trained(self, candidates: Sequence[Any]) -> set[int]:
        in_branches = {id(p) for branch in candidates for p in branch.parameters}
        # A layer not wholly inside the candidate branches (kept, excluded, or not residual) is always trained.
        outside = [layer for layer in self.ordered if any(id(p) not in in_branches for p in layer.parameters)]
        return {id(p) for layer in outside for p in layer.parameters}


def units_for(
    backward: str,
    freezer: ParameterFreezer,
    granularity: str,
    keep_first: int,
    keep_last: int,
    include: Sequence[str] | None = None,
    exclude: Sequence[str] | None = None,
    branches: BranchesSpec = None,
) -> Units:
    """The :class:`Units` of ``backward`` (``"weights"``: layers, ``"block"``: residual branches)."""
    if backward == "block":
        return BranchUnits(freezer, granularity, keep_first, keep_last, include, exclude, branches=branches)
    return LayerUnits(freezer, granularity, keep_first, keep_last, include, exclude)


# ------------------------------------------------------------------------------------------------ torch.compile
def compiled_holders(module: nn.Module, candidates: Sequence[Unit]) -> list[str]:
    """Names of the ``torch.compile``'d submodules of ``module`` that hold a droppable unit, in module order."""
    compiled = _compat.compiled_module_type()
    if compiled is None:
        return []
    prefixes = [name for name, sub in module.named_modules() if name and isinstance(sub, compiled)]
    return [
        name for name in prefixes if any(unit.name == name or unit.name.startswith(f"{name}.") for unit in candidates)
    ]


def describe_compiled(holders: Sequence[str]) -> str:
    """``"submodule 'a'"`` or ``"submodule 'a' (and 2 more)"``."""
    return f"submodule {holders[0]!r}" + (f" (and {len(holders) - 1} more)" if len(holders) > 1 else "")


def recompile_warning(who: str, what: str) -> str:
    """The warning for ``what`` (a compiled model or submodule holding droppable units), said by ``who``."""
    return (
        f"{who}: {what} is compiled with torch.compile, and contains layers LDB drops. A compiled graph is"
        " specialised on which parameters require a gradient, so each new set of dropped layers compiles anew (once"
        " per DROP epoch with resample='epoch', for every step with resample='step'); beyond"
        " torch._dynamo.config.recompile_limit such sets run uncompiled. Training stays correct. To keep the speed,"
        " compile only layers LDB never drops (see `include`/`exclude`), or raise the recompile limit."
    )
