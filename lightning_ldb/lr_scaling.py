"""The DROP-epoch learning rate: scale ``lr`` inside ``optimizer.step()`` only.

Scaling ``group["lr"]`` at epoch start and dividing at epoch end is wrong for recursive schedulers
(``CosineAnnealingLR`` with ``eta_min > 0``) and for closed-form step-interval schedulers, which
overwrite ``lr`` on every step. Scaling only for the duration of each ``step()``, through the
optimizer's step pre/post hooks, is exact for every scheduler, and schedulers,
``LearningRateMonitor`` and checkpoints only ever see the unscaled schedule.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Callable, Optional

from torch.optim import Optimizer
from torch.utils.hooks import RemovableHandle


class StepLRScaler:
    """Multiplies every param group's ``lr`` by :attr:`scale` while an optimizer steps.

    Args:
        before_step: Called with the optimizer just before each step, after the scale is applied.
    """

    def __init__(self, before_step: Optional[Callable[[Optimizer], None]] = None) -> None:
        self.scale = 1.0
        self._before_step = before_step
        self._handles: list[RemovableHandle] = []
        self._unscaled: dict[int, tuple[Optimizer, list[Any]]] = {}
        # Hook calls in progress per optimizer. torch wraps each optimizer class's own ``step`` with the hooks,
        # so a subclass whose ``step`` calls ``super().step()`` runs them twice, nested: only the outermost
        # call may scale and unscale, or the lr is scaled twice and left scaled after the step.
        self._depth: dict[int, int] = {}

    def attach(self, optimizers: Iterable[Optimizer]) -> None:
        """Hook into ``optimizers`` (replacing any earlier attachment)."""
        self.detach()
        for optimizer in optimizers:
            self._handles.append(optimizer.register_step_pre_hook(self._pre_step))
            self._handles.append(optimizer.register_step_post_hook(self._post_step))

    def detach(self) -> None:
        """Remove the hooks, and put back any learning rate a failed step left scaled."""
        self.restore()
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

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
        self._unscaled[id(optimizer)] = (optimizer, [group["lr"] for group in optimizer.param_groups])
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
