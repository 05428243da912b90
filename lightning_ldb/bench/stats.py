"""The benchmark's statistics: paired ratios, their median and interval, the plausibility bound and the verdict.

Pure functions of per-repetition timings, so that the verdict can be pinned on synthetic numbers.

The design they serve (see :func:`~lightning_ldb.bench.runner.run_benchmark`): every repetition runs every
variant once, the order rotated from one repetition to the next, and each variant's whole-run time is
divided by the baseline's *of the same repetition*. A drift of the machine's speed that stretches a whole
repetition stretches both terms of its ratio; the ratios of the repetitions are then summarised by their
median and an order-statistic interval for that median (distribution-free, no resampling: nothing to seed).

A verdict is one of :data:`VERDICTS`:

- ``faster`` / ``slower``: the interval lies on one side of 1 and is narrower than the difference judged
  (below 6 repetitions the interval is the range of the ratios: the repetitions disagree by less than the
  difference);
- ``no measurable difference``: the interval holds 1 and excludes any difference beyond ``resolution``
  (5%) either way;
- ``too noisy to tell``: fewer than :data:`MIN_REPETITIONS` (3) repetitions (one measures no noise, two
  give a 50% interval), an interval that holds 1 but is wider
  than that, an interval wider than the difference judged, or an estimate beyond what the
  profile says the run's DROP epochs can save (:func:`max_speedup`).
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from typing import Any

#: The four verdicts, as written in ``report.json``.
FASTER, SLOWER, SAME, NOISY = "faster", "slower", "no measurable difference", "too noisy to tell"
VERDICTS = (FASTER, SLOWER, SAME, NOISY)

#: The confidence the interval of the median aims at (reached from 6 repetitions on; below, min to max).
CONFIDENCE = 0.95

#: "No measurable difference" means an interval within 1 +- RESOLUTION: no difference beyond 5% either way.
RESOLUTION = 0.05

#: The fewest repetitions a verdict other than "too noisy to tell" needs: with 2, the interval (their range)
#: covers the median with 50% confidence only, and one lucky pair would decide.
MIN_REPETITIONS = 3

#: How far below the profile's DROP-epoch floor a measured DROP epoch may still go (data loading and
#: Lightning's per-step work, which the profile leaves out and the halved step count also saves).
PLAUSIBILITY_MARGIN = 0.10


def median_interval(values: Sequence[float], confidence: float = CONFIDENCE) -> tuple[float, float, float]:
    """An order-statistic interval for the median of ``values``, and its coverage.

    The interval is ``[x_(k), x_(n+1-k)]`` of the sorted values with the largest ``k`` whose coverage
    ``P(k <= Binomial(n, 1/2) <= n - k)`` is at least ``confidence``. Below 6 values no such ``k`` exists
    at 95%: the interval is then the range (min to max), with its lower coverage ``1 - 2**(1 - n)``
    (50% for 2 values, 75% for 3).

    Raises:
        ValueError: If ``values`` is empty or ``confidence`` is not in (0, 1).

    Example::

        >>> median_interval([1.0, 3.0, 2.0])
        (1.0, 3.0, 0.75)
    """
    if not values:
        raise ValueError("`values` must hold at least one value, got none.")
    if not 0 < confidence < 1:
        raise ValueError(f"`confidence` must be in (0, 1), got {confidence!r}.")
    ordered, n = sorted(values), len(values)

    def coverage(k: int) -> float:  # P(k <= B <= n - k), B ~ Binomial(n, 1/2); k is 1-based
        return 1.0 - 2.0 * sum(math.comb(n, i) for i in range(k)) / 2.0**n

    chosen = 1
    for k in range(1, n // 2 + 1):
        if coverage(k) >= confidence:
            chosen = k
    return ordered[chosen - 1], ordered[n - chosen], coverage(chosen) if n > 1 else 0.0


def relative_range(values: Sequence[float]) -> float | None:
    """``(max - min) / median`` of ``values``: how far repetitions of one variant disagree (``None`` below 2).

    Example::

        >>> relative_range([2.0, 3.0, 4.0])
        0.6666666666666666
    """
    if len(values) < 2:
        return None
    middle = statistics.median(values)
    return (max(values) - min(values)) / middle if middle > 0 else None


def paired_ratios(times: Mapping[int, float], baseline: Mapping[int, float]) -> list[float]:
    """Each repetition's time over the baseline's time of the same repetition, in repetition order.

    Repetitions without a baseline (or with a zero baseline) are left out.

    Example::

        >>> paired_ratios({0: 3.0, 1: 6.0}, {0: 4.0, 1: 8.0})
        [0.75, 0.75]
    """
    return [times[r] / baseline[r] for r in sorted(times) if baseline.get(r, 0) > 0]


def max_speedup(drop_epochs: int, epochs: int, floor: float, margin: float = PLAUSIBILITY_MARGIN) -> float:
    """The largest whole-run speed-up a run can show when ``drop_epochs`` of its ``epochs`` are DROP epochs
    that take at best ``floor - margin`` of a full epoch (and the full epochs take what the baseline's do).

    Raises:
        ValueError: If the epoch counts do not fit (``0 <= drop_epochs <= epochs``, ``epochs >= 1``).

    Example::

        >>> round(max_speedup(1, 4, floor=0.78), 4)  # one DROP epoch in four, 0.68x at best
        0.08
    """
    if epochs < 1 or not 0 <= drop_epochs <= epochs:
        raise ValueError(f"`drop_epochs` must be in [0, epochs={epochs}] and `epochs` >= 1, got {drop_epochs!r}.")
    return drop_epochs / epochs * (1.0 - max(floor - margin, 0.0))


def judge(
    ratios: Sequence[float],
    bound: float | None = None,
    resolution: float = RESOLUTION,
    confidence: float = CONFIDENCE,
) -> dict[str, Any]:
    """The verdict on one variant from its paired ratios (variant time / baseline time, one per repetition).

    Args:
        ratios: The paired ratios; at least one.
        bound: The largest plausible speed-up (:func:`max_speedup`); ``None``: no bound known.
        resolution: The band around 1 within which an interval reads "no measurable difference".
        confidence: The interval's target coverage (see :func:`median_interval`).

    Returns:
        ``verdict`` (one of :data:`VERDICTS`), ``speedup`` (``1 - median ratio``), ``interval`` (of the speed-up,
        low to high), ``confidence`` (the interval's coverage), ``ratio``, ``ratio_interval``, ``repetitions``,
        ``noise`` (max - min of the ratios), ``beyond_bound`` and ``reason`` (one sentence).

    Raises:
        ValueError: If ``ratios`` is empty.

    Example::

        >>> judge([0.95, 0.96, 0.94])["verdict"]
        'faster'
        >>> judge([0.80, 0.99, 0.90])["verdict"]  # the repetitions disagree by more than the difference
        'too noisy to tell'
    """
    if not ratios:
        raise ValueError("`ratios` must hold one paired ratio per repetition, got none.")
    n = len(ratios)
    estimate = statistics.median(ratios)
    low, high, coverage = median_interval(ratios, confidence)
    noise = max(ratios) - min(ratios)
    difference = abs(1.0 - estimate)
    beyond = bound is not None and 1.0 - estimate > bound
    if beyond:
        verdict = NOISY
        reason = (f"a speed-up of {1 - estimate:.1%} is beyond the {bound:.1%} the profile allows this run's DROP"
                  " epochs, so it is the machine's noise, not LDB")  # fmt: skip
    elif n == 1:
        verdict, reason = NOISY, "one repetition: nothing measures the noise"
    elif n < MIN_REPETITIONS:
        verdict = NOISY
        reason = (f"{n} repetitions give a {coverage:.0%} interval only; a verdict needs {MIN_REPETITIONS} or more"
                  f" ({1 - estimate:+.1%} here)")  # fmt: skip
    elif low <= 1.0 <= high:
        if 1.0 - resolution <= low and high <= 1.0 + resolution:
            verdict, reason = SAME, f"the interval holds no difference beyond {resolution:.0%} either way"
        else:
            verdict, reason = NOISY, f"the interval holds both a gain and a loss beyond {resolution:.0%}"
    elif high - low > difference:
        verdict = NOISY
        reason = (f"the repetitions disagree by {high - low:.1%}, more than the {difference:.1%} difference"
                  " judged")  # fmt: skip
    else:
        verdict = FASTER if estimate < 1.0 else SLOWER
        reason = f"the interval is {high - low:.1%} wide, narrower than the {difference:.1%} difference"
    return {
        "verdict": verdict,
        "speedup": 1.0 - estimate,
        "interval": [1.0 - high, 1.0 - low],
        "confidence": coverage,
        "ratio": estimate,
        "ratio_interval": [low, high],
        "repetitions": n,
        "noise": noise,
        "beyond_bound": beyond,
        "reason": reason,
    }
