"""The droppable unit: what a draw picks from, and how a picked unit is dropped and released.

LDB draws over *units*, and the two ``backward`` modes differ only in what a unit is:

* ``"weights"`` (the paper): a unit is a layer (:class:`~lightning_ldb.layers.Layer`). Dropping it freezes its
  parameters, so autograd skips their weight gradient and no optimizer moves them.
* ``"block"``: a unit is a residual branch (:class:`~lightning_ldb.branches.Branch`). Dropping it freezes its
  parameters and feeds its entry a detached input, so autograd skips the whole branch.

Both are a :class:`Units`: *discover* the units of a model in run order, list the *candidates* among what is
trainable now, *drop* some, *release* them. The engine asks nothing else, so no code outside this module asks which
mode it runs in. Both count ``keep_first``/``keep_last`` in layers, so the two modes keep the same layers trained, and
a parameter shared with a layer that is always trained (tied weights) is never frozen.

This module imports torch, never Lightning.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Optional, Protocol

from torch import nn
from torch.nn.parameter import is_lazy

from lightning_ldb.branches import Branch, BranchesSpec, discover_branches, select_branch_candidates, unrecognised_note
from lightning_ldb.detaching import BranchInputDetacher
from lightning_ldb.freezing import ParameterFreezer
from lightning_ldb.layers import Layer, discover_layers, order_layers, select_candidates, split_kept


class Unit(Protocol):
    """One droppable unit: a name (for logs and checks) and the parameters a drop freezes."""

    @property
    def name(self) -> str: ...

    @property
    def parameters(self) -> tuple[nn.Parameter, ...]: ...


class Units(Protocol):
    """The droppable units of one model, and the mechanism that drops them."""

    #: The model's layers in registration order (empty before :meth:`discover`).
    layers: list[Layer]

    def discover(self, model: nn.Module, run_order: Sequence[str]) -> None:
        """List ``model``'s units, layers ordered by ``run_order`` (module names in the order they first ran).

        Raises:
            ValueError: If no unit can ever be a candidate (``keep_first``/``keep_last``/``include``/``exclude``).
        """

    def candidates(self) -> Sequence[Unit]:
        """The units that may be dropped now: trainable, not kept, not filtered out; in run order."""

    def drop(self, dropped: Sequence[Unit], candidates: Sequence[Unit]) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
        """Drop ``dropped`` (drawn from ``candidates``); return the frozen parameters and all droppable ones."""

    def release(self) -> None:
        """Undo every drop exactly: parameters trainable again, hooks removed."""

    def why_no_candidates(self) -> str:
        """Why :meth:`candidates` is empty now, for the nothing-to-drop warning."""


class _UnitsBase:
    """What both kinds of unit share: the layers in run order, the kept layers, and the freezer."""

    def __init__(
        self,
        freezer: ParameterFreezer,
        granularity: str,
        keep_first: int,
        keep_last: int,
        include: Optional[Sequence[str]],
        exclude: Optional[Sequence[str]],
    ) -> None:
        self.freezer = freezer
        self.granularity = granularity
        self.keep_first, self.keep_last = keep_first, keep_last
        self.include, self.exclude = include, exclude
        self.layers: list[Layer] = []  # registration order
        self.ordered: list[Layer] = []  # run order
        self.lazy = False

    def discover(self, model: nn.Module, run_order: Sequence[str]) -> None:
        self.layers = discover_layers(model, self.granularity)
        self.ordered = order_layers(self.layers, run_order, self.granularity)
        # Lazy modules materialise on the first forward; the engine discovers again after it, and checks then.
        self.lazy = any(is_lazy(p) for p in model.parameters())
        if not self.lazy:
            self._check(model)

    def release(self) -> None:
        self.freezer.restore()

    def drop(self, dropped: Sequence[Unit], candidates: Sequence[Unit]) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
        # A parameter shared with a layer that is always trained (kept first/last, excluded) is never dropped.
        kept = self._always_trained(candidates)
        droppable = [p for unit in candidates for p in unit.parameters if id(p) not in kept]
        frozen = [p for unit in dropped for p in unit.parameters if id(p) not in kept]
        self.freezer.freeze(frozen)
        return frozen, droppable

    def why_no_candidates(self) -> str:
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

    def _why_filtered(self, rest: Sequence[Layer]) -> str:
        raise NotImplementedError

    def _trainable_layers(self) -> list[Layer]:
        # keep_first/keep_last count the layers trainable now, in run order.
        return [layer for layer in self.ordered if layer.trainable]

    def _check(self, model: nn.Module) -> None:
        raise NotImplementedError

    def _always_trained(self, candidates: Sequence[Any]) -> set[int]:
        raise NotImplementedError


class LayerUnits(_UnitsBase):
    """``backward="weights"``: the units are layers; dropping one freezes its parameters."""

    def candidates(self) -> list[Layer]:
        return select_candidates(self._trainable_layers(), self.keep_first, self.keep_last, self.include, self.exclude)

    def _check(self, model: nn.Module) -> None:
        # Structural: can any layer ever be a candidate? Which ones are depends on what is trainable at each draw.
        if not select_candidates(self.layers, self.keep_first, self.keep_last, self.include, self.exclude):
            n = len(self.layers)
            raise ValueError(
                f"LayerDropBack found no candidate layer to drop in {type(model).__name__}: it has {n} layer(s)"
                f" (granularity={self.granularity!r}), keep_first={self.keep_first} and keep_last={self.keep_last}"
                f" keep {min(n, self.keep_first + self.keep_last)} of them, and include={self.include!r} /"
                f" exclude={self.exclude!r} filter the rest. Lower `keep_first`/`keep_last`, widen the patterns, or"
                " use granularity='parameter'."
            )

    def _why_filtered(self, rest: Sequence[Layer]) -> str:
        return (
            f"the {len(rest)} trainable layer(s) keep_first={self.keep_first}/keep_last={self.keep_last} leave are"
            f" all filtered out by include={self.include!r} / exclude={self.exclude!r}"
        )

    def _always_trained(self, candidates: Sequence[Any]) -> set[int]:
        candidate_ids = {id(layer) for layer in candidates}
        return {id(p) for layer in self.ordered if id(layer) not in candidate_ids for p in layer.parameters}


class BranchUnits(_UnitsBase):
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

    def drop(self, dropped: Sequence[Unit], candidates: Sequence[Unit]) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
        frozen, droppable = super().drop(dropped, candidates)
        self.detacher.detach(dropped)  # type: ignore[arg-type]  # BranchUnits only ever draws branches
        return frozen, droppable

    def release(self) -> None:
        self.detacher.restore()
        super().release()

    def _check(self, model: nn.Module) -> None:
        if not self.branches:
            raise ValueError(
                f"LayerDropBack(backward='block') found no residual branch in {type(model).__name__}: it"
                " recognises torchvision ResNet and Swin blocks, timm ViT blocks and Hugging Face GPT-2, BERT and"
                " Llama-style layers. Name your model's branches with `branches=` (e.g. {'blocks.*.norm1': ['attn']},"
                " see docs/block-mode.md), or use backward='weights'." + unrecognised_note(model, self.spec)
            )
        if not select_branch_candidates(
            self.branches, self.ordered, self.keep_first, self.keep_last, self.include, self.exclude
        ):
            raise ValueError(
                f"LayerDropBack(backward='block') found {len(self.branches)} residual branch(es) in"
                f" {type(model).__name__}, but every one holds a layer kept by keep_first={self.keep_first}/"
                f"keep_last={self.keep_last} or is filtered out by include={self.include!r} / exclude={self.exclude!r}."
                " Lower `keep_first`/`keep_last` or widen the patterns."
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
    include: Optional[Sequence[str]] = None,
    exclude: Optional[Sequence[str]] = None,
    branches: BranchesSpec = None,
) -> Units:
    """The :class:`Units` of ``backward`` (``"weights"``: layers, ``"block"``: residual branches)."""
    if backward == "block":
        return BranchUnits(freezer, granularity, keep_first, keep_last, include, exclude, branches=branches)
    return LayerUnits(freezer, granularity, keep_first, keep_last, include, exclude)
