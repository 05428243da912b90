"""FLOPs of one full and one DROP training step, counted with ``torch.utils.flop_counter``.

A DROP step drops exactly the layers the callback would drop: the candidates come from
:func:`~lightning_ldb.discover_layers` and :func:`~lightning_ldb.select_candidates` with the callback's
own arguments, and the draw from :func:`~lightning_ldb.draw_dropped` with its seed and the epoch (and,
with ``resample="step"``, the epoch's first optimizer step). Freezing goes through the callback's
:class:`~lightning_ldb.freezing.ParameterFreezer`, so the counted backward is the one training runs:
a dropped middle layer skips its weight gradient only, a dropped prefix also the input gradients below
the first trainable layer.

Counting runs on a copy of the model on the ``meta`` device: shapes only, no arithmetic, so it takes
well under a second even for a ResNet. The optimizer update is not counted (it is a few FLOPs per
trainable parameter, and ``FlopCounterMode`` only counts matrix products and convolutions).
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from lightning_ldb.callback import LayerDropBackCallback
from lightning_ldb.freezing import ParameterFreezer
from lightning_ldb.layers import Layer, discover_layers, select_candidates
from lightning_ldb.sampling import draw_dropped
from lightning_ldb.schedule import epoch_mode, is_drop_epoch
from lightning_ldb.steps import optimizer_steps_per_epoch

#: ``loss_fn(module, batch) -> loss``: the part of a training step whose forward and backward are counted.
LossFn = Callable[[nn.Module, Any], torch.Tensor]
#: ``make_batch(batch_size, device) -> batch``.
BatchFn = Callable[[int, torch.device], Any]


def count_step_flops(module: nn.Module, loss_fn: LossFn, batch: Any, frozen: Iterable[nn.Parameter] = ()) -> int:
    """FLOPs of ``loss_fn(module, batch).backward()`` with the ``frozen`` parameters frozen.

    The freezing is undone and every gradient reset to ``None`` afterwards.

    Args:
        module: The model (on any device; ``meta`` counts without computing).
        loss_fn: Computes the scalar loss of ``batch``.
        batch: The input ``loss_fn`` takes.
        frozen: Parameters to freeze (``requires_grad=False``) for this step, as LDB does.

    Example::

        >>> model = nn.Sequential(nn.Linear(4, 3, bias=False), nn.Linear(3, 2, bias=False))
        >>> loss = lambda m, x: m(x).sum()
        >>> # forward 2*5*(4*3 + 3*2) = 180; backward: dW of both (120 + 60), dX of the second only (60)
        >>> count_step_flops(model, loss, torch.zeros(5, 4))
        420
        >>> count_step_flops(model, loss, torch.zeros(5, 4), frozen=model[1].parameters())  # its dW (60) is saved
        360
    """
    freezer = ParameterFreezer()
    freezer.freeze(frozen)
    try:
        with FlopCounterMode(display=False) as counter:
            loss_fn(module, batch).backward()
        return int(counter.get_total_flops())
    finally:
        freezer.restore()
        for param in module.parameters():
            param.grad = None


def candidate_layers(module: nn.Module, callback: LayerDropBackCallback) -> list[Layer]:
    """The layers ``callback`` may drop in ``module``, found as the callback finds them."""
    layers = discover_layers(module, callback.granularity)
    return select_candidates(layers, callback.keep_first, callback.keep_last, callback.include, callback.exclude)


def dropped_layers(
    module: nn.Module, callback: LayerDropBackCallback, seed: int, epoch: int, step: Optional[int] = None
) -> list[Layer]:
    """The layers ``callback`` drops on DROP epoch ``epoch`` (and optimizer step ``step`` with ``resample="step"``).

    Args:
        module: The LightningModule (or a copy of it) the callback trains: names and order must match.
        callback: Supplies ``drop_rate``, ``granularity``, ``keep_first``, ``keep_last``, ``include`` and ``exclude``.
        seed: The seed the callback draws with.
        epoch: The DROP epoch.
        step: The global optimizer step, with ``resample="step"``; ``None`` with ``resample="epoch"``.
    """
    candidates = candidate_layers(module, callback)
    flags = draw_dropped(len(candidates), callback.drop_rate, seed, epoch, step)
    return [layer for layer, drop in zip(candidates, flags) if drop]


def first_step_of_epoch(epoch: int, samples: int, batch_size: int, callback: LayerDropBackCallback) -> int:
    """The global optimizer step at which ``epoch`` starts, with the callback's batch scaling.

    Example::

        >>> first_step_of_epoch(3, samples=100, batch_size=10, callback=LayerDropBackCallback(every=2, batch_scale=2))
        25
    """
    return sum(
        optimizer_steps_per_epoch(samples, callback.batch_size_for_epoch(e, batch_size), False, 1.0, 1)
        for e in range(epoch)
    )


@dataclass(frozen=True)
class StepFlops:
    """FLOPs of a full training step and of the DROP steps of a run."""

    #: FLOPs of one full step of ``full_batch`` samples.
    full_step: int
    full_batch: int
    #: Mean FLOPs of one DROP step of ``drop_batch`` samples over :attr:`drop_epochs` (``None`` without one).
    drop_step: Optional[float]
    drop_batch: int
    #: The DROP epochs counted; :attr:`drop_step_each` holds the FLOPs of each one's step, and
    #: :attr:`dropped` the names of the layers it drops.
    drop_epochs: tuple[int, ...]
    drop_step_each: tuple[int, ...]
    #: The global step of each counted draw with ``resample="step"`` (``None`` with ``resample="epoch"``).
    drop_steps: tuple[Optional[int], ...]
    dropped: tuple[tuple[str, ...], ...]
    candidates: int

    def to_dict(self) -> dict[str, Any]:
        return {
            "full_step": self.full_step,
            "full_batch": self.full_batch,
            "drop_step": self.drop_step,
            "drop_batch": self.drop_batch,
            "drop_epochs": list(self.drop_epochs),
            "drop_step_each": list(self.drop_step_each),
            "drop_steps": list(self.drop_steps),
            "dropped": [list(names) for names in self.dropped],
            "candidates": self.candidates,
        }


def ldb_step_flops(
    module: nn.Module,
    loss_fn: LossFn,
    make_batch: BatchFn,
    callback: LayerDropBackCallback,
    seed: int,
    batch_size: int,
    epochs: int,
    samples: int,
) -> StepFlops:
    """FLOPs of a full step and of the DROP steps of an LDB run of ``epochs`` epochs.

    Each DROP epoch of the run drops other layers; the DROP-step FLOPs are the mean over them.

    Args:
        module: The LightningModule the callback will train (it is copied to the ``meta`` device, not changed).
        loss_fn: ``loss_fn(module, batch) -> loss``.
        make_batch: ``make_batch(batch_size, device) -> batch``.
        callback: The callback whose draws are counted (unused, unattached: only its arguments are read).
        seed: The seed the callback draws with.
        batch_size: The base (full-epoch) training batch size.
        epochs: Epochs of the run.
        samples: Training samples per epoch (decides the step index of a ``resample="step"`` draw).

    Raises:
        ValueError: If ``batch_size``, ``epochs`` or ``samples`` is below 1.
    """
    for name, value in (("batch_size", batch_size), ("epochs", epochs), ("samples", samples)):
        if value < 1:
            raise ValueError(f"`{name}` must be >= 1, got {value!r}.")
    meta = torch.device("meta")
    counted = copy.deepcopy(module).to(meta)
    full = count_step_flops(counted, loss_fn, make_batch(batch_size, meta))
    drop_batch = batch_size * callback.batch_scale
    drop_epochs = tuple(e for e in range(epochs) if is_drop_epoch(e, callback.every))
    steps: list[Optional[int]] = []
    per_epoch: list[int] = []
    names: list[tuple[str, ...]] = []
    for epoch in drop_epochs:
        step = first_step_of_epoch(epoch, samples, batch_size, callback) if callback.resample == "step" else None
        dropped = dropped_layers(counted, callback, seed, epoch, step)
        frozen = [param for layer in dropped for param in layer.parameters]
        per_epoch.append(count_step_flops(counted, loss_fn, make_batch(drop_batch, meta), frozen))
        steps.append(step)
        names.append(tuple(layer.name for layer in dropped))
    return StepFlops(
        full_step=full,
        full_batch=batch_size,
        drop_step=sum(per_epoch) / len(per_epoch) if per_epoch else None,
        drop_batch=drop_batch,
        drop_epochs=drop_epochs,
        drop_step_each=tuple(per_epoch),
        drop_steps=tuple(steps),
        dropped=tuple(names),
        candidates=len(candidate_layers(counted, callback)),
    )


def epoch_modes(epochs: int, every: int) -> Sequence[str]:
    """The mode (``"full"``/``"drop"``) of each of ``epochs`` epochs."""
    return [epoch_mode(e, every) for e in range(epochs)]
