"""The DROP-epoch learning rate: scale ``lr`` inside ``optimizer.step()`` only.

Scaling ``group["lr"]`` at epoch start and dividing at epoch end is wrong for recursive schedulers
(``CosineAnnealingLR`` with ``eta_min > 0``) and for closed-form step-interval schedulers, which
overwrite ``lr`` on every step. Scaling only for the duration of each ``step()``, through the
optimizer's step pre/post hooks, is exact for every scheduler, and schedulers,
``LearningRateMonitor`` and checkpoints only ever see the unscaled schedule.
"""

from __future__ import annotations

import numbers
import warnings
from collections.abc import Iterable
from typing import Any, Callable, Optional

import torch
from torch.optim import Optimizer
from torch.utils.hooks import RemovableHandle


class StepLRScaler:
    """Multiplies every param group's ``lr`` by :attr:`scale` while an optimizer steps.

    Args:
        before_step: Called with the optimizer just before each step, before the scale is applied.
        after_step: Called with the optimizer just after each step, after the unscaled ``lr`` is back.
    """

    def __init__(
        self,
        before_step: Optional[Callable[[Optimizer], None]] = None,
        after_step: Optional[Callable[[Optimizer], None]] = None,
    ) -> None:
        self.scale = 1.0
        self._before_step = before_step
        self._after_step = after_step
        self._handles: list[RemovableHandle] = []
        self._attached: dict[int, Optimizer] = {}
        self._warned: set[int] = set()
        self._unscaled: dict[int, tuple[Optimizer, list[Any]]] = {}
        # Hook calls in progress per optimizer. torch wraps each optimizer class's own ``step`` with the hooks,
        # so a subclass whose ``step`` calls ``super().step()`` runs them twice, nested: only the outermost
        # call may scale and unscale, or the lr is scaled twice and left scaled after the step.
        self._depth: dict[int, int] = {}

    def attach(self, optimizers: Iterable[Optimizer]) -> None:
        """Hook into ``optimizers`` (replacing any earlier attachment)."""
        self.detach()
        self.attach_new(optimizers)

    def attach_new(self, optimizers: Iterable[Optimizer]) -> None:
        """Hook into those of ``optimizers`` not hooked yet (optimizers recreated during fit); never twice."""
        for optimizer in optimizers:
            if self._attached.get(id(optimizer)) is optimizer:
                continue
            self._attached[id(optimizer)] = optimizer
            self._handles.append(optimizer.register_step_pre_hook(self._pre_step))
            self._handles.append(optimizer.register_step_post_hook(self._post_step))

    def detach(self) -> None:
        """Remove the hooks, and put back any learning rate a failed step left scaled."""
        self.restore()
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._attached.clear()

    def restore(self) -> None:
        """Put back the unscaled ``lr`` of any optimizer whose step raised before its post hook."""
        for optimizer, lrs in self._unscaled.values():
            for group, lr in zip(optimizer.param_groups, lrs):
                group["lr"] = lr
        self._unscaled.clear()
        self._depth.clear()

    def _pre_step(self, optimizer: Optimizer, args: Any, kwargs: Any) -> None:
        depth = self._depth.get(id(optimizer), 0)
        self._depth[id(optimizer)] = depth + 1
        if depth:
            return  # nested: the outer call has done it all
        if self._before_step is not None:
            self._before_step(optimizer)
        if self.scale == 1.0:
            return
        lrs = [group.get("lr") for group in optimizer.param_groups]
        if not all(_is_scalable(lr) for lr in lrs):
            self._warn_unscalable(optimizer, lrs)
            return
        self._unscaled[id(optimizer)] = (optimizer, lrs)
        for group in optimizer.param_groups:
            group["lr"] = group["lr"] * self.scale

    def _post_step(self, optimizer: Optimizer, args: Any, kwargs: Any) -> None:
        depth = self._depth.pop(id(optimizer), 1) - 1
        if depth:
            self._depth[id(optimizer)] = depth
            return  # nested: the outer call puts the lr back
        entry = self._unscaled.pop(id(optimizer), None)
        if entry is not None:
            for group, lr in zip(optimizer.param_groups, entry[1]):
                group["lr"] = lr
        if self._after_step is not None:
            self._after_step(optimizer)

    def _warn_unscalable(self, optimizer: Optimizer, lrs: list[Any]) -> None:
        if id(optimizer) in self._warned:
            return
        self._warned.add(id(optimizer))
        warnings.warn(
            f"LayerDropBack(lr_scale={self.scale}) cannot scale the learning rate of {type(optimizer).__name__}:"
            f" its param groups hold lr={lrs[0]!r}, so it computes its own step size (e.g. Adafactor with"
            " relative_step=True). DROP epochs still drop layers and scale the batch, at the optimizer's own step"
            " size. Give the optimizer an explicit lr to have it scaled.",
            UserWarning,
            stacklevel=2,
        )


def _is_scalable(lr: Any) -> bool:
    return (isinstance(lr, numbers.Real) and not isinstance(lr, bool)) or isinstance(lr, torch.Tensor)
