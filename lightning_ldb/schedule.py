"""Everything LDB decides from (settings, seed, epoch, step): the settings and their checks, which epochs are DROP
epochs (paper, equation 1), the batch of each epoch, and which candidates a draw drops (paper, equation 2).

Every draw comes from a private generator keyed on ``(seed, epoch[, step])``. It never touches torch's, Python's or
NumPy's global RNG, so dropout and augmentation see the same random stream with and without LDB; and the same key
gives the same draw on every rank and after a resume.

This module imports torch and the standard library only.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from lightning_ldb.branches import BranchesSpec

#: How often a DROP epoch draws: once (``"epoch"``, the paper) or before every optimizer step (``"step"``).
RESAMPLE_MODES = ("epoch", "step")
#: What a dropped unit skips in the backward pass.
BACKWARD_MODES = ("weights", "block")
#: What a layer is: a module that directly owns parameters, or one parameter tensor.
GRANULARITIES = ("module", "parameter")
#: How DDP's all-reduce follows the dropped layers under the Trainer, ``"auto"`` first (see ``docs/ddp.md``).
COMMUNICATION_METHODS = ("auto", "rewrap", "hook", "find_unused")
#: How a DROP epoch takes its ``batch_scale`` times larger batch: larger loader batches (the data source is an
#: ``LDBDataModuleMixin``), or ``batch_scale`` times more micro-batches of the base size per optimizer step.
BATCH_SCALINGS = ("loader", "accumulate")
#: The settings only the Trainer has a use for (the engine takes the others).
TRAINER_ONLY = ("batch_scaling", "communication")


# ------------------------------------------------------------------------------------------------ argument checks
def check_int(name: str, value: Any, minimum: int) -> int:
    """Return ``value`` if it is an int (not a bool) ``>= minimum``; raise otherwise."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"`{name}` must be an int >= {minimum}, got {value!r} of type {type(value).__name__}.")
    if value < minimum:
        raise ValueError(f"`{name}` must be an int >= {minimum}, got {value!r}.")
    return value


def check_float(
    name: str, value: Any, low: float, high: float | None = None, low_inclusive: bool = True, hint: str = ""
) -> float:
    """Return ``value`` as a float if it is a real number in the given interval; raise otherwise."""
    interval = f"{'[' if low_inclusive else '('}{low}, {high if high is not None else 'inf'})"
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"`{name}` must be a number in {interval}, got {value!r} of type {type(value).__name__}.{hint}")
    value = float(value)
    too_low = value < low if low_inclusive else value <= low
    too_high = high is not None and value >= high
    if too_low or too_high or value != value:  # NaN fails every comparison
        raise ValueError(f"`{name}` must be in {interval}, got {value!r}.{hint}")
    return value


def check_choice(name: str, value: Any, choices: Sequence[str]) -> str:
    """Return ``value`` if it is one of ``choices``; raise otherwise."""
    if not isinstance(value, str):
        raise TypeError(f"`{name}` must be one of {list(choices)}, got {value!r} of type {type(value).__name__}.")
    if value not in choices:
        raise ValueError(f"`{name}` must be one of {list(choices)}, got {value!r}.")
    return value


def check_patterns(name: str, value: Any) -> tuple[str, ...] | None:
    """Return ``value`` as a tuple of non-empty strings (or ``None``); raise otherwise."""
    if value is None:
        return None
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, Sequence) or not all(isinstance(p, str) and p for p in value):
        raise TypeError(
            f"`{name}` must be None, a non-empty string or a list of non-empty strings (fnmatch patterns on layer"
            f" names, e.g. ['layer3.*']), got {value!r}."
        )
    return tuple(value)


# ------------------------------------------------------------------------------------------------ the settings
@dataclass(frozen=True)
class Settings:
    """LDB's arguments, their defaults and their checks, written once: the engine, the callback, its checkpoints and
    ``ldb-bench`` all take them from here. The arguments are documented on :class:`~lightning_ldb.LayerDropBackCallback`.

    Example::

        >>> Settings().drop_rate, Settings(include="layer3.*").include
        (0.3, ('layer3.*',))
        >>> Settings(drop_rate=1.5)
        Traceback (most recent call last):
        ...
        ValueError: `drop_rate` must be in [0.0, 1.0), got 1.5.

    Raises:
        TypeError: If an argument has the wrong type.
        ValueError: If an argument is out of range, or ``branches`` is given without ``backward="block"``.
    """

    drop_rate: float = 0.3
    every: int = 2
    lr_scale: float = 2.0
    batch_scale: int = 2
    batch_scaling: str = "loader"
    keep_first: int = 4
    keep_last: int = 1
    resample: str = "epoch"
    seed: int | None = None
    granularity: str = "module"
    include: Sequence[str] | None = None
    exclude: Sequence[str] | None = None
    communication: str = "auto"
    backward: str = "weights"
    branches: BranchesSpec = None

    def __post_init__(self) -> None:
        if self.seed is not None:
            check_int("seed", self.seed, minimum=0)
        branches = self.branches
        if branches is not None and not (isinstance(branches, Mapping) or callable(branches)):
            raise TypeError(
                "`branches` must be None (the built-in rules), a mapping {entry pattern: [member names]} (e.g."
                f" {{'blocks.*.norm1': ['attn']}}) or a callable model -> branches, got {branches!r}."
            )
        checked = {
            "drop_rate": check_float("drop_rate", self.drop_rate, 0.0, 1.0),
            "every": check_int("every", self.every, minimum=1),
            "lr_scale": check_float("lr_scale", self.lr_scale, 0.0, low_inclusive=False),
            "batch_scale": check_int("batch_scale", self.batch_scale, minimum=1),
            "keep_first": check_int("keep_first", self.keep_first, minimum=0),
            "keep_last": check_int("keep_last", self.keep_last, minimum=0),
            "resample": check_choice("resample", self.resample, RESAMPLE_MODES),
            "granularity": check_choice("granularity", self.granularity, GRANULARITIES),
            "include": check_patterns("include", self.include),
            "exclude": check_patterns("exclude", self.exclude),
            "backward": check_choice("backward", self.backward, BACKWARD_MODES),
        }
        if branches is not None and self.backward != "block":
            raise ValueError(
                f"`branches` is used by backward='block' only, got backward={self.backward!r}. Pass backward='block'."
            )
        checked["batch_scaling"] = check_choice("batch_scaling", self.batch_scaling, BATCH_SCALINGS)
        checked["communication"] = check_choice("communication", self.communication, COMMUNICATION_METHODS)
        for name, value in checked.items():
            object.__setattr__(self, name, value)  # frozen: the checked (normalised) values

    @classmethod
    def from_locals(cls, values: Mapping[str, Any]) -> Settings:
        """The settings from a signature's ``locals()``: every field that is among them (the rest keep defaults)."""
        return cls(**{f.name: values[f.name] for f in fields(cls) if f.name in values})

    def engine_arguments(self) -> dict[str, Any]:
        """The keyword arguments of :class:`~lightning_ldb.LayerDropBack` these settings give."""
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name not in TRAINER_ONLY}


# ------------------------------------------------------------------------------------------------ the schedule
#: The two training modes of an epoch.
DROP = "drop"
FULL = "full"


def is_drop_epoch(epoch: int, every: int) -> bool:
    """Whether ``epoch`` is a DROP epoch: ``epoch > 0 and epoch % every == 0``.

    Args:
        epoch: Zero-based epoch index.
        every: The period ``s`` of DROP epochs (``every=2`` drops on epochs 2, 4, 6, ...).

    Raises:
        TypeError: If ``epoch`` or ``every`` is not an int.
        ValueError: If ``epoch < 0`` or ``every < 1``.

    Example::

        >>> [is_drop_epoch(e, every=2) for e in range(5)]
        [False, False, True, False, True]
    """
    check_int("epoch", epoch, minimum=0)
    check_int("every", every, minimum=1)
    return epoch > 0 and epoch % every == 0


def epoch_mode(epoch: int, every: int) -> str:
    """``"drop"`` or ``"full"``: the mode of ``epoch`` under :func:`is_drop_epoch`."""
    return DROP if is_drop_epoch(epoch, every) else FULL


@dataclass(frozen=True)
class BatchSchedule:
    """The training batch size of each epoch: ``base * batch_scale`` on DROP epochs, ``base`` otherwise.

    The value the callback hands to the data source (:class:`~lightning_ldb.LDBDataModuleMixin`) and to
    :func:`~lightning_ldb.estimated_stepping_batches`, so that neither needs the callback itself.

    With ``scaling="loader"`` the loader's batches are ``batch_scale`` times larger on DROP epochs, and the
    settings that count batches follow: an integer ``limit_train_batches`` or ``val_check_interval`` (the
    user's) becomes ``value // batch_scale`` on DROP epochs, so that a DROP epoch sees no more samples than a
    full one and validates after as many samples. With ``scaling="accumulate"`` the batches keep their size
    and ``accumulate_grad_batches`` (the user's) is multiplied by ``batch_scale`` on DROP epochs instead.

    Example::

        >>> schedule = BatchSchedule(every=2, batch_scale=2, limit_train_batches=5)
        >>> [schedule.batch_size(epoch, 32) for epoch in range(4)]
        [32, 32, 64, 32]
        >>> [schedule.limit_batches(epoch) for epoch in range(4)]
        [5, 5, 2, 5]
        >>> accumulate = BatchSchedule(every=2, batch_scale=2, scaling="accumulate", accumulate_grad_batches=3)
        >>> [(accumulate.batch_size(epoch, 32), accumulate.accumulate(epoch)) for epoch in range(3)]
        [(32, 3), (32, 3), (32, 6)]
    """

    every: int
    batch_scale: int
    limit_train_batches: int | float | None = None
    scaling: str = "loader"
    accumulate_grad_batches: int = 1
    val_check_interval: int | float | None = None

    def limit_batches(self, epoch: int) -> int | float | None:
        """``limit_train_batches`` for ``epoch``: an int limit divided by ``batch_scale`` on DROP epochs (at least 1)."""
        return self._batch_count(epoch, self.limit_train_batches)

    def val_check_batches(self, epoch: int) -> int | float | None:
        """``val_check_interval`` for ``epoch``: an int interval divided by ``batch_scale`` on DROP epochs (at least 1)."""
        return self._batch_count(epoch, self.val_check_interval)

    def batch_size(self, epoch: int, base: int) -> int:
        """The batch size of ``epoch`` for a base batch size ``base``."""
        return base * self.batch_scale if self._loader_scaled(epoch) else base

    def base_size(self, epoch: int, loaded: int) -> int:
        """The base batch size behind ``loaded``, the batch size of a loader built for ``epoch``."""
        return loaded // self.batch_scale if self._loader_scaled(epoch) else loaded

    def accumulate(self, epoch: int) -> int:
        """``accumulate_grad_batches`` for ``epoch``: the user's, times ``batch_scale`` on DROP epochs when accumulating."""
        if self.scaling == "accumulate" and is_drop_epoch(epoch, self.every):
            return self.accumulate_grad_batches * self.batch_scale
        return self.accumulate_grad_batches

    def _loader_scaled(self, epoch: int) -> bool:
        return self.scaling == "loader" and is_drop_epoch(epoch, self.every)

    def _batch_count(self, epoch: int, value: int | float | None) -> int | float | None:
        # Only a count of batches follows the batch size; a fraction of the epoch is the same fraction.
        if isinstance(value, int) and not isinstance(value, bool) and self._loader_scaled(epoch):
            return max(1, value // self.batch_scale)
        return value


# ------------------------------------------------------------------------------------------------ the draws
#: Environment variable in which ``lightning.seed_everything`` records the global seed.
GLOBAL_SEED_ENV = "PL_GLOBAL_SEED"

#: What a draw is a function of, besides the seed: ``(epoch, step)``, ``step`` ``None`` with ``resample="epoch"``.
DrawKey = tuple[int, int | None]


def draw_key(seed: int, epoch: int, step: int | None = None) -> int:
    """A 63-bit generator seed that depends on every part of ``(seed, epoch, step)``.

    Hashing (rather than, say, ``seed + epoch``) keeps the draws of nearby seeds and epochs unrelated.
    """
    digest = hashlib.blake2b(f"lightning-ldb:{seed}:{epoch}:{step}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def draw_dropped(
    num_candidates: int, drop_rate: float, seed: int, epoch: int, step: int | None = None
) -> tuple[bool, ...]:
    """Drop each of ``num_candidates`` layers independently with probability ``drop_rate``.

    Returns one flag per candidate, ``True`` for dropped. ``drop_rate=0`` drops nothing.

    Example::

        >>> draw_dropped(5, 0.5, seed=0, epoch=2) == draw_dropped(5, 0.5, seed=0, epoch=2)
        True
        >>> draw_dropped(3, 0.0, seed=0, epoch=2)
        (False, False, False)
    """
    if num_candidates == 0 or drop_rate <= 0.0:
        return (False,) * num_candidates
    generator = torch.Generator(device="cpu").manual_seed(draw_key(seed, epoch, step))
    uniform = torch.rand(num_candidates, generator=generator, dtype=torch.float64)
    return tuple((uniform < drop_rate).tolist())


def global_seed() -> int | None:
    """The seed last passed to ``lightning.seed_everything`` in this process, if any."""
    value = os.environ.get(GLOBAL_SEED_ENV)
    return int(value) if value is not None else None


def fresh_seed() -> int:
    """A seed from the operating system's entropy (not from any global RNG)."""
    return int.from_bytes(os.urandom(4), "little")
