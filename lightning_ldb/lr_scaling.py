"""The DROP-epoch learning rate: scale ``lr`` for the update inside ``optimizer.step()`` only.

Scaling ``group["lr"]`` at epoch start and dividing at epoch end is wrong for recursive schedulers
(``CosineAnnealingLR`` with ``eta_min > 0``) and for closed-form step-interval schedulers, which
overwrite ``lr`` on every step. Scaling only for the duration of the update, through the
optimizer's step pre/post hooks, is exact for every scheduler, and schedulers,
``LearningRateMonitor`` and checkpoints only ever see the unscaled schedule.

When ``step`` is given a closure (Lightning's 32-bit and bf16 precision run ``training_step``, the
backward and ``on_before_optimizer_step`` inside it), the scale is applied only once the closure has
returned: the user's LR code, which runs in the closure, reads and writes the unscaled ``lr``, and
its writes are kept. Without a closure (manual optimization, ``16-mixed``), the scale is applied as
``step`` starts.

A ``step`` that raises (an out-of-memory error in a lazy state allocation, a closure that fails) runs no post hook.
Each call is therefore tied to the frame of torch's hook wrapper that runs it: a call whose frame is no longer on the
stack has ended, and :meth:`StepLRScaler.recover` (run by the next step, and by the engine before each forward and
at each epoch's end) puts its learning rate back and forgets it, so the next step scales and counts as if the failed
one had not happened.
"""

from __future__ import annotations

import inspect
import numbers
import threading
import warnings
import weakref
from collections.abc import Callable, Iterable
from types import FrameType
from typing import Any

import torch
from torch.optim import Optimizer
from torch.utils.hooks import RemovableHandle

#: Param-group entries some optimizers derive from ``lr`` during ``step`` and keep (schedule-free optimizers):
#: after a scaled step each is put back to what the unscaled ``lr`` would have left there.
#: ``"max"``: a running maximum of the lr; ``"value"``: the lr of the last step.
LR_DERIVED_ENTRIES = {"lr_max": "max", "scheduled_lr": "value"}


class StepLRScaler:
    """Multiplies every param group's ``lr`` by :attr:`scale` for the update of each optimizer step.

    Args:
        before_step: Called with the optimizer just before the update: when ``step`` starts, or, when
            ``step`` is given a closure, each time the closure has returned (after the backward).
        after_step: Called with the optimizer just after each step, once the unscaled ``lr`` is back.
    """

    def __init__(
        self,
        before_step: Callable[[Optimizer], None] | None = None,
        after_step: Callable[[Optimizer], None] | None = None,
    ) -> None:
        self.scale = 1.0
        self._before_step = before_step
        self._after_step = after_step
        # Held weakly: an optimizer replaced by the user (recreated each epoch) is freed with its state and hooks.
        self._attached: weakref.WeakKeyDictionary[Optimizer, list[RemovableHandle]] = weakref.WeakKeyDictionary()
        self._warned: weakref.WeakSet[Optimizer] = weakref.WeakSet()
        # Per optimizer being scaled: the optimizer, its groups and, per group, the unscaled lr and the
        # lr-derived entries (``LR_DERIVED_ENTRIES``) as they were before the update.
        self._unscaled: dict[int, tuple[Optimizer, list[dict[str, Any]], list[tuple[Any, dict[str, Any]]]]] = {}
        # Hook calls in progress per optimizer, outermost first, each as the frame of torch's wrapper that runs its
        # hooks (``None`` where the interpreter has no frames). torch wraps each optimizer class's own ``step`` with
        # the hooks, so a subclass whose ``step`` calls ``super().step()`` runs them twice, nested: only the outermost
        # call may scale and unscale, or the lr is scaled twice and left scaled after the step. A call that raised
        # runs no post hook: its frame has left the stack, which is how :meth:`recover` tells it from a nested one.
        # Held strongly while listed (a step's own frame, gone at its post hook), so no frame id is ever reused.
        # With the thread the calls run in: another thread's stack (a DataParallel replica's forward) says nothing.
        self._calls: dict[int, tuple[int, list[FrameType | None]]] = {}

    def is_attached(self, optimizer: Optimizer | None = None) -> bool:
        """Whether ``optimizer`` is hooked; without one, whether any is (without one, no ``step()`` is scaled or seen)."""
        if optimizer is None:
            return len(self._attached) > 0
        return optimizer in self._attached

    def attached(self) -> list[Optimizer]:
        """The optimizers hooked now (those still alive)."""
        return list(self._attached)

    def attach(self, optimizers: Iterable[Optimizer]) -> None:
        """Hook into ``optimizers`` (replacing any earlier attachment)."""
        self.detach()
        self.attach_new(optimizers)

    def attach_new(self, optimizers: Iterable[Optimizer]) -> None:
        """Hook into those of ``optimizers`` not hooked yet (optimizers recreated during fit); never twice."""
        for optimizer in optimizers:
            if optimizer in self._attached:
                continue
            self._attached[optimizer] = [
                optimizer.register_step_pre_hook(self._pre_step),
                optimizer.register_step_post_hook(self._post_step),
            ]

    def detach(self) -> None:
        """Remove the hooks, and put back any learning rate a failed step left scaled."""
        self.restore()
        for handles in list(self._attached.values()):
            for handle in handles:
                handle.remove()
        self._attached.clear()

    def restore(self) -> None:
        """Put back the unscaled ``lr`` of every optimizer, and forget every step call (only with no step running)."""
        for key in list(self._unscaled):
            self._unscale(key)
        self._calls.clear()

    def recover(self) -> None:
        """Forget the step calls that raised (before their post hook), and put back the ``lr`` they left scaled.

        Safe at any time, inside a step too: a call still running (its frame on the stack) is left alone.
        """
        if self._calls:
            live = _frames_on_stack()
            for key in list(self._calls):
                self._forget_ended_calls(key, live)

    def _forget_ended_calls(self, key: int, live: set[int]) -> None:
        thread, calls = self._calls[key]
        if thread != threading.get_ident():
            return
        while calls and calls[-1] is not None and id(calls[-1]) not in live:
            calls.pop()  # ended by an exception: the frames it ran in are gone
        if not calls:
            del self._calls[key]
            self._unscale(key)  # the outermost call raised: as if it had not happened

    def _pre_step(self, optimizer: Optimizer, args: Any, kwargs: Any) -> tuple[Any, Any] | None:
        key = id(optimizer)
        if key in self._calls:  # nested in a running call, or left behind by a call that raised
            self._forget_ended_calls(key, _frames_on_stack())
        frame = inspect.currentframe()
        caller = frame.f_back if frame is not None else None  # torch's wrapper, alive until this call's post hook
        del frame
        calls = self._calls.setdefault(key, (threading.get_ident(), []))[1]
        calls.append(caller)
        if len(calls) > 1:
            return None  # nested: the outer call has done it all
        closure, positional = _find_closure(args, kwargs)
        if closure is None:
            self._prepare_update(optimizer)
            return None

        def scaled_after(*closure_args: Any, **closure_kwargs: Any) -> Any:
            # A re-evaluation (LBFGS's line search, a second closure call) runs the user's code again: unscaled.
            self._unscale(id(optimizer))
            result = closure(*closure_args, **closure_kwargs)
            self._prepare_update(optimizer)
            return result

        if positional:  # handed back where it came from: the optimizer may name its argument otherwise
            return (args[0], scaled_after, *tuple(args)[2:]), kwargs
        return args, {**kwargs, "closure": scaled_after}

    def _post_step(self, optimizer: Optimizer, args: Any, kwargs: Any) -> None:
        key = id(optimizer)
        calls = self._calls.get(key, (0, []))[1]
        frame = inspect.currentframe()
        caller = frame.f_back if frame is not None else None  # the same wrapper frame as this call's pre hook
        del frame
        # This call's entry, and those of the calls nested in it that raised (a subclass that caught its failure).
        while calls:
            if calls.pop() is caller:
                break
        if calls:
            return  # nested: the outer call puts the lr back
        self._calls.pop(key, None)
        self._unscale(key)
        if self._after_step is not None:
            self._after_step(optimizer)

    def _prepare_update(self, optimizer: Optimizer) -> None:
        """Clear what must not reach the update, then scale the lr the user's code left in the groups."""
        if self._before_step is not None:
            self._before_step(optimizer)
        if self.scale == 1.0:
            return
        groups = _all_groups(optimizer)
        lrs = [group.get("lr") for group in groups]
        if not all(_is_scalable(lr) for lr in lrs):
            self._warn_unscalable(optimizer, lrs)
            return
        derived = [{key: group[key] for key in LR_DERIVED_ENTRIES if key in group} for group in groups]
        self._unscaled[id(optimizer)] = (optimizer, groups, list(zip(lrs, derived, strict=False)))
        for group in groups:
            group["lr"] = group["lr"] * self.scale

    def _unscale(self, key: int) -> None:
        entry = self._unscaled.pop(key, None)
        if entry is None:
            return
        _, groups, saved = entry
        for group, (lr, derived) in zip(groups, saved, strict=False):
            group["lr"] = lr
            for name, before in derived.items():
                group[name] = _unscaled_entry(LR_DERIVED_ENTRIES[name], before, group.get(name, before), self.scale)

    def _warn_unscalable(self, optimizer: Optimizer, lrs: list[Any]) -> None:
        if optimizer in self._warned:
            return
        self._warned.add(optimizer)
        warnings.warn(
            f"LayerDropBack(lr_scale={self.scale}) cannot scale the learning rate of {type(optimizer).__name__}"
            f" (lr={lrs[0]!r}: it computes its own step size). Give it an explicit lr to have it scaled.",
            UserWarning,
            stacklevel=2,
        )


def _frames_on_stack() -> set[int]:
    """The ids of the frames on the calling thread's stack (compared only with frames held alive)."""
    live: set[int] = set()
    frame = inspect.currentframe()
    while frame is not None:
        live.add(id(frame))
        frame = frame.f_back
    return live


def _find_closure(args: Any, kwargs: Any) -> tuple[Callable[..., Any] | None, bool]:
    """The closure ``step`` was given (as ``closure=`` or as its first argument after ``self``), and whether positionally.

    The step hooks get ``args`` with the optimizer itself first.
    """
    if kwargs.get("closure") is not None:
        return kwargs["closure"], False
    if len(args) > 1 and callable(args[1]):
        return args[1], True
    return None, False


def _all_groups(optimizer: Optimizer) -> list[dict[str, Any]]:
    """The optimizer's param groups, and those of an optimizer it wraps and copies its groups into when ``step``
    starts (``ZeroRedundancyOptimizer.optim``), which would miss a scale applied after the closure."""
    groups = list(optimizer.param_groups)
    inner = getattr(optimizer, "optim", None)
    if isinstance(inner, Optimizer) and inner is not optimizer:
        groups += [group for group in inner.param_groups if all(group is not g for g in groups)]
    return groups


def _unscaled_entry(kind: str, before: Any, after: Any, scale: float) -> Any:
    """What an lr-derived entry would hold after the step had the lr not been scaled.

    A running maximum the scaled lr did not raise is left as it is (with ``scale < 1`` the unscaled lr might
    have raised it; the next unscaled step does).
    """
    if not (_is_number(before) and _is_number(after)) or after == before:
        return after  # not written by this step
    if kind == "max":
        return max(before, after / scale)
    return after / scale


def _is_number(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _is_scalable(lr: Any) -> bool:
    return (isinstance(lr, numbers.Real) and not isinstance(lr, bool)) or isinstance(lr, torch.Tensor)
