"""``ldb-bench --profile``'s measured DROP step, and the layer kinds whose dropping costs time instead of saving it.

The FLOP ceiling assumes that FLOPs removed are time removed. Some kernels disagree: under CPU bf16 autocast a
frozen attention input projection (``nn.MultiheadAttention``'s ``in_proj_weight``) makes ``torch.matmul`` take a
batched product over the weight expanded along the batch instead of one folded matrix product (it folds a
non-contiguous 3-D input only when the weight requires a gradient), and the DROP step gets slower. So the profile
also times real steps:

- **full and DROP step at the same batch**: one fit of the user's setup with :class:`~lightning_ldb.LayerDropBackCallback`
  at the user's settings (``every=2``, ``batch_scale=1``, one batch every epoch): epochs 2, 4, 6, ... are DROP
  epochs, 3, 5, 7, ... full ones, so the two alternate on one machine under one clock (process CPU time on a CPU,
  CUDA-synchronised wall time on a GPU); the draw is the library's own (weights or block mode). Epochs 0 and 1
  (run order learnt, first graphs) and each mode's first step are left out; medians.
- **culprits**: when the weights-mode DROP step costs more than its FLOPs say by over :data:`CULPRIT_MARGIN` of a
  full step, one such fit per layer kind (the candidates' module class, e.g. ``MultiheadAttention``), every
  candidate of that kind dropped and nothing else; a kind whose step saves less than the margin although its
  FLOP share says more (:func:`is_culprit`) is named, with the ``exclude=`` patterns that keep it out of the draw
  and a fit measuring that fix.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from torch import nn

from lightning_ldb import LayerDropBackCallback

#: A DROP step (or a kind's) is flagged when its measured step ratio exceeds its FLOP ratio by this much of a full step.
CULPRIT_MARGIN = 0.05

#: ``drop_rate`` that drops every candidate (the argument's range is ``[0, 1)``; a float64 uniform never reaches it).
DROP_ALL = 1.0 - 1e-12

Clock = Callable[[], float]

#: ``fit(callbacks, epochs)``: one fit of a freshly built setup on the profiled batch, ``epochs`` epochs of one step.
Fit = Callable[[list[Callback], int], Any]


def default_clock(on_gpu: bool) -> tuple[str, Clock]:
    """The clock of the measured steps: CUDA-synchronised wall time on a GPU, process CPU time on a CPU.

    Process time on a CPU, because other processes sharing the cores move the wall clock of each step."""
    return ("perf_counter", time.perf_counter) if on_gpu else ("process_time", time.process_time)


class ModeTimer(Callback):
    """Seconds of each training step by the LDB callback's mode (``"full"``/``"drop"``), from epoch ``skip`` on.

    A step runs from ``on_train_batch_start`` to ``on_train_batch_end``: forward, backward, optimizer step and
    what the LDB callback does in between. The draw is applied at the epoch's start, before the clock starts."""

    def __init__(self, ldb: LayerDropBackCallback, clock: Clock, skip: int = 2) -> None:
        self.ldb, self.clock, self.skip = ldb, clock, skip
        self.seconds: dict[str, list[float]] = {"full": [], "drop": []}
        self.dropped: list[int] = []
        self._start: float | None = None
        self._mode = "full"

    @staticmethod
    def _sync(module: LightningModule) -> None:
        if module.device.type == "cuda":
            torch.cuda.synchronize(module.device)

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        if trainer.current_epoch < self.skip:
            return
        self._mode = self.ldb.mode
        if self._mode == "drop":
            self.dropped.append(len(self.ldb.dropped_layers))
        self._sync(pl_module)
        self._start = self.clock()

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, *args: Any) -> None:
        if self._start is None:
            return
        self._sync(pl_module)
        self.seconds[self._mode].append(self.clock() - self._start)
        self._start = None


def time_full_and_drop(fit: Fit, settings: Mapping[str, Any], steps: int, clock: Clock) -> dict[str, Any]:
    """Median seconds of a full and of a DROP step at the same batch, alternating in one fit, and their ratio.

    Args:
        fit: Runs one fit of a fresh setup with the given callbacks for the given number of epochs.
        settings: ``LayerDropBackCallback`` arguments (``every`` and ``batch_scale`` are overridden).
        steps: Timed steps per mode, after one warm-up step of each.
        clock: Returns seconds.
    """
    ldb = LayerDropBackCallback(**{**settings, "every": 2, "batch_scale": 1})
    timer = ModeTimer(ldb, clock)
    fit([ldb, timer], 2 + 2 * (steps + 1))
    full, drop = (statistics.median(timer.seconds[mode][1:] or timer.seconds[mode]) for mode in ("full", "drop"))
    return rank_zero_result({
        "full_step_s": full,
        "drop_step_s": drop,
        "ratio": drop / full if full > 0 else None,
        "dropped_layers": statistics.median(timer.dropped[1:] or timer.dropped),
    })


def rank_zero_result(result: dict[str, Any]) -> dict[str, Any]:
    """Rank 0's ``result`` on every rank of an initialised process group (``result`` itself without one).

    Each rank times its own steps, so under DDP the ranks' ratios differ; the culprit analysis decides on them
    whether to run more (collective) fits, and ranks that decided differently would wait on each other forever.
    """
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return result
    shared = [result]
    torch.distributed.broadcast_object_list(shared, src=0)
    return shared[0]


def escape(name: str) -> str:
    """``name`` as an ``fnmatch`` pattern that matches only itself."""
    return "".join(f"[{c}]" if c in "*?[" else c for c in name)


def layer_kinds(model: nn.Module, names: Sequence[str]) -> dict[str, list[str]]:
    """The candidates by kind, in order of first appearance: the module's class name (``granularity="module"``),
    or the owning module's class and the parameter's name (``granularity="parameter"``, e.g.
    ``MultiheadAttention.in_proj_weight``)."""
    modules = dict(model.named_modules())
    kinds: dict[str, list[str]] = {}
    for name in names:
        if name in modules:
            kind = type(modules[name]).__name__
        else:
            owner, _, leaf = name.rpartition(".")
            kind = f"{type(modules.get(owner, model)).__name__}.{leaf}"
        kinds.setdefault(kind, []).append(name)
    return kinds


def exclude_patterns(names: Sequence[str], candidates: Sequence[str]) -> list[str]:
    """Short ``exclude=`` patterns that match every one of ``names`` and no other of ``candidates``.

    Each name's shortest dotted suffix ``"*.<suffix>"`` that matches no candidate outside ``names`` (the full name
    when none does), e.g. ``["*.self_attention"]`` for torchvision ViT's attention modules.

    Example::

        >>> exclude_patterns(["a.0.attn", "a.1.attn"], ["a.0.attn", "a.0.mlp", "a.1.attn", "a.1.mlp"])
        ['*.attn']
    """
    from fnmatch import fnmatchcase

    others = [c for c in candidates if c not in set(names)]
    patterns: list[str] = []
    for name in names:
        if any(fnmatchcase(name, p) for p in patterns):
            continue
        parts = name.split(".")
        for k in range(1, len(parts) + 1):
            pattern = escape(name) if k == len(parts) else "*." + escape(".".join(parts[-k:]))
            if not any(fnmatchcase(other, pattern) for other in others):
                patterns.append(pattern)
                break
    return patterns


def short_of_flops(ratio: float | None, flop_share: float, margin: float = CULPRIT_MARGIN) -> bool:
    """Whether a step with ``flop_share`` of its FLOPs removed took more than ``1 - flop_share + margin`` of a full one."""
    return ratio is not None and ratio - (1.0 - flop_share) > margin


def is_culprit(ratio: float | None, flop_share: float, margin: float = CULPRIT_MARGIN) -> bool:
    """Whether a step with ``flop_share`` of its FLOPs removed cost time instead of saving it: it took more than
    ``1 - flop_share + margin`` of a full step (much less saved than the FLOPs say) and more than ``1 - margin``
    (hardly anything saved, or time lost).

    Example::

        >>> is_culprit(1.2, 0.08), is_culprit(0.9, 0.22), is_culprit(1.01, 0.0)
        (True, False, False)
    """
    return short_of_flops(ratio, flop_share, margin) and ratio is not None and ratio > 1.0 - margin


def plausibility_floor(
    flop_floor: Mapping[str, float | None], schedule: float | None, measured: Mapping[str, float | None]
) -> dict[str, Any]:
    """The shortest DROP epoch / full epoch a comparison can believe, per mode: the FLOP floor, or the measured one
    (``schedule`` times the measured DROP-step ratio) where that is higher. ``source``: ``"measured"`` when a
    measured floor was taken for either mode, else ``"flops"``.

    Example::

        >>> plausibility_floor({"weights": 0.8, "block": None}, 0.9, {"weights": 1.0, "block": None})
        {'weights': 0.9, 'block': None, 'source': 'measured'}
    """
    floor: dict[str, Any] = {}
    source = "flops"
    for mode in ("weights", "block"):
        value, ratio = flop_floor.get(mode), measured.get(mode)
        candidate = schedule * ratio if schedule is not None and ratio is not None else None
        if candidate is not None and (value is None or candidate > value):
            value, source = candidate, "measured"
        floor[mode] = value
    floor["source"] = source
    return floor
