"""Per-step value schedules: EMA momentum, teacher temperature, learning rate, weight decay.

Every schedule is a pure function of an integer step, so a resumed run recomputes the same value
from the step counter alone (nothing to checkpoint). Endpoints are exact: each value is written as a
convex combination ``start * (1 - w) + end * w`` whose weight is exactly 0 or 1 at the ends.

Example:
    >>> cosine_schedule(0, 100, 0.996, 1.0)
    0.996
    >>> cosine_schedule(100, 100, 0.996, 1.0)
    1.0
    >>> linear_warmup_cosine(10, warmup_steps=10, max_steps=100, base=1e-3, final=1e-6)
    0.001
"""

from __future__ import annotations

import math

__all__ = ["linear_schedule", "cosine_schedule", "linear_warmup_cosine"]


def _check_step(step: int, max_steps: int) -> None:
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise ValueError(f"step: expected a non-negative int, got {step!r}")
    if isinstance(max_steps, bool) or not isinstance(max_steps, int) or max_steps <= 0:
        raise ValueError(f"max_steps: expected a positive int, got {max_steps!r}")


def _check_finite_value(value: float, name: str) -> None:
    if not math.isfinite(value):
        raise ValueError(f"{name}: expected a finite number, got {value!r}")


def _interpolate(start: float, end: float, weight: float) -> float:
    # The convex form (not ``start + (end - start) * weight``) returns ``start`` / ``end`` bit-exactly
    # at weight 0 / 1, which callers rely on (e.g. "exactly base at the end of warm-up").
    return start * (1.0 - weight) + end * weight


def linear_schedule(step: int, max_steps: int, start: float, end: float) -> float:
    """Linear ramp from ``start`` (step 0) to ``end`` (step ``max_steps``), constant afterwards.

    Used for the DINO teacher-temperature warm-up and the learning-rate warm-up. Note that DINO's
    ``np.linspace(start, end, n)`` reaches ``end`` at index ``n - 1``; pass ``max_steps = n - 1`` to
    reproduce it.

    Args:
        step: current step, ``>= 0``; steps past ``max_steps`` return ``end``.
        max_steps: length of the ramp, ``> 0``.
        start: value at step 0.
        end: value at and after ``max_steps``.

    Returns:
        The scheduled value.

    Raises:
        ValueError: negative or non-int ``step``, non-positive ``max_steps``, non-finite values.
    """
    _check_step(step, max_steps)
    _check_finite_value(start, "start")
    _check_finite_value(end, "end")
    return _interpolate(start, end, min(step, max_steps) / max_steps)


def cosine_schedule(step: int, max_steps: int, start: float, end: float) -> float:
    """Half-cosine from ``start`` (step 0) to ``end`` (step ``max_steps``), constant afterwards.

    The EMA-teacher momentum of BYOL / DINO / Alice (0.996 -> 1, per iteration) and cosine decays.

    Args:
        step: current step, ``>= 0``; steps past ``max_steps`` return ``end`` (a run that overshoots
            its nominal length keeps the final value rather than cycling back).
        max_steps: length of the schedule, ``> 0``.
        start: value at step 0.
        end: value at and after ``max_steps``.

    Returns:
        ``end + (start - end) * (1 + cos(pi * step / max_steps)) / 2``, monotone between the endpoints.

    Raises:
        ValueError: negative or non-int ``step``, non-positive ``max_steps``, non-finite values.
    """
    _check_step(step, max_steps)
    _check_finite_value(start, "start")
    _check_finite_value(end, "end")
    progress = min(step, max_steps) / max_steps
    return _interpolate(start, end, 0.5 * (1.0 - math.cos(math.pi * progress)))


def linear_warmup_cosine(step: int, warmup_steps: int, max_steps: int, base: float, final: float) -> float:
    """Learning-rate schedule: linear warm-up from 0 to ``base``, then cosine from ``base`` to ``final``.

    The value is exactly ``base`` at ``step == warmup_steps`` and exactly ``final`` at
    ``step == max_steps`` (and after). It rises monotonically during warm-up and then moves
    monotonically towards ``final``; if ``final > base`` (Alice's README settings, medssl §1.9) it
    keeps rising, which is allowed but is almost always a configuration mistake.

    Args:
        step: current step, ``>= 0``.
        warmup_steps: warm-up length, ``0 <= warmup_steps < max_steps`` (0 starts at ``base``).
        max_steps: total number of steps, ``> 0``.
        base: peak value reached at the end of warm-up.
        final: value at ``max_steps``.

    Returns:
        The scheduled value.

    Raises:
        ValueError: invalid steps (see above), ``base < 0`` or ``final < 0``, non-finite values.
    """
    _check_step(step, max_steps)
    if isinstance(warmup_steps, bool) or not isinstance(warmup_steps, int) or not 0 <= warmup_steps < max_steps:
        raise ValueError(
            f"warmup_steps: expected an int in [0, max_steps={max_steps}), got {warmup_steps!r}"
        )
    for value, name in ((base, "base"), (final, "final")):
        _check_finite_value(value, name)
        if value < 0:
            raise ValueError(f"{name}: expected a non-negative value, got {value!r}")
    if step < warmup_steps:
        return linear_schedule(step, warmup_steps, 0.0, base)
    return cosine_schedule(step - warmup_steps, max_steps - warmup_steps, base, final)
