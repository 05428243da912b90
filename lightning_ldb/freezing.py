"""The dropping mechanism: freeze parameters so autograd skips their weight gradient, and undo it exactly."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Optional

import torch
from torch import nn
from torch.optim import Optimizer


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

    def clear_grads(self, optimizer: Optional[Optimizer] = None) -> None:
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
                f"LayerDropBackCallback cannot train with {type(optimizer).__name__} (optimizer {index}): it moves every"
                " parameter along one flat search direction and counts a missing gradient as zero, so dropped layers"
                " would move (and it reads its lr before evaluating the closure, so the DROP-epoch lr_scale would not"
                " reach its update). Use an optimizer that skips parameters without a gradient (SGD, Adam, AdamW,"
                " ...), or remove LayerDropBackCallback."
            )
