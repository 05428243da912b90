"""The examples' argument checks: each error names the argument, the value and the fix.

The examples use the library's public names only, so they keep their own copy of these few lines.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Optional


def check_int(name: str, value: Any, minimum: int) -> int:
    """Return ``value`` if it is an int (not a bool) ``>= minimum``; raise otherwise."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"`{name}` must be an int >= {minimum}, got {value!r} of type {type(value).__name__}.")
    if value < minimum:
        raise ValueError(f"`{name}` must be an int >= {minimum}, got {value!r}.")
    return value


def check_float(
    name: str, value: Any, low: float, high: Optional[float] = None, low_inclusive: bool = True, hint: str = ""
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
