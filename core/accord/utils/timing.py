"""Timing for speed benchmarks that stays honest on a shared machine.

Every speed number accord prints is the **median** over repeats with the **min and max** beside it,
next to the thread count and the machine load seen while it ran (:func:`machine_state`). Two
implementations are compared by :func:`time_alternating`: both run in the same process, one
repeat of each in turn, so a burst of load from elsewhere hits both sides instead of one.
:func:`torch_threads` gives the 1-thread mode in which ratios are stable.

Example:
    >>> with torch_threads(1):
    ...     timings = time_alternating({"ours": ours, "reference": reference}, repeats=5)
    >>> timings["ours"].describe(1e3, "ms")      # '12.1 ms (11.8-13.0)'
"""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch

__all__ = ["Timing", "machine_state", "ratio", "time_alternating", "time_repeats", "torch_threads"]


@dataclass(frozen=True)
class Timing:
    """Wall-clock seconds of repeated runs of one thing.

    Attributes:
        seconds: one entry per timed repeat, in run order.
    """

    seconds: tuple[float, ...]

    def __post_init__(self) -> None:
        if not self.seconds:
            raise ValueError("seconds: expected at least one timed repeat")

    @property
    def median(self) -> float:
        return statistics.median(self.seconds)

    @property
    def minimum(self) -> float:
        return min(self.seconds)

    @property
    def maximum(self) -> float:
        return max(self.seconds)

    def scaled(self, factor: float) -> Timing:
        """Every repeat multiplied by ``factor`` (e.g. ``1 / items`` for seconds per item)."""
        return Timing(tuple(value * factor for value in self.seconds))

    def summary(self) -> dict[str, Any]:
        """``median_s``, ``min_s``, ``max_s`` and ``repeats`` (for results.json rows)."""
        return {"median_s": self.median, "min_s": self.minimum, "max_s": self.maximum, "repeats": len(self.seconds)}

    def describe(self, scale: float = 1.0, unit: str = "s", digits: int = 3) -> str:
        """``"median unit (min-max)"`` with every value multiplied by ``scale``."""

        def number(value: float) -> str:
            return f"{value * scale:.{digits}g}"

        return f"{number(self.median)} {unit} ({number(self.minimum)}-{number(self.maximum)})"

    def rate(self, items: float, digits: int = 3) -> str:
        """Items per second: ``"median (slowest-fastest)"``."""
        return (f"{items / self.median:.{digits}g} ({items / self.maximum:.{digits}g}-"
                f"{items / self.minimum:.{digits}g})")


def ratio(slow: Timing, fast: Timing, digits: int = 3) -> str:
    """``slow / fast`` of the medians, with the range of the per-repeat ratios (paired by repeat
    when both have as many repeats, as :func:`time_alternating` gives)."""
    if len(slow.seconds) == len(fast.seconds):
        ratios = [s / f for s, f in zip(slow.seconds, fast.seconds)]
    else:
        ratios = [slow.minimum / fast.maximum, slow.maximum / fast.minimum]
    return f"{slow.median / fast.median:.{digits}g}x ({min(ratios):.{digits}g}-{max(ratios):.{digits}g})"


def machine_state() -> dict[str, Any]:
    """The conditions of a measurement: torch threads, CPUs and the 1/5-minute load averages.

    A load above the CPU count means other processes competed for the cores while timing.
    """
    load_1, load_5, _ = os.getloadavg()
    return {"torch_threads": torch.get_num_threads(), "cpus": os.cpu_count(), "load_1min": round(load_1, 2),
            "load_5min": round(load_5, 2)}


@contextmanager
def torch_threads(count: int | None) -> Iterator[None]:
    """Run the block with ``count`` intra-op torch threads (``None``: leave as is); restored after."""
    if count is None:
        yield
        return
    if isinstance(count, bool) or not isinstance(count, int) or count < 1:
        raise ValueError(f"threads: expected a positive int or None, got {count!r}")
    previous = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _timed(function: Callable[[], Any], synchronize: Callable[[], None] | None) -> float:
    start = time.perf_counter()
    function()
    if synchronize is not None:
        synchronize()
    return time.perf_counter() - start


def time_repeats(
    function: Callable[[], Any],
    repeats: int = 5,
    warmup: int = 1,
    synchronize: Callable[[], None] | None = None,
) -> Timing:
    """Time ``repeats`` calls of ``function`` after ``warmup`` untimed ones.

    Args:
        function: the work, called with no arguments.
        repeats: timed calls.
        warmup: untimed calls first (lazy imports, allocator, caches).
        synchronize: called before each clock read (e.g. ``torch.cuda.synchronize``).
    """
    return time_alternating({"only": function}, repeats, warmup, synchronize)["only"]


def time_alternating(
    functions: Mapping[str, Callable[[], Any]],
    repeats: int = 5,
    warmup: int = 1,
    synchronize: Callable[[], None] | None = None,
) -> dict[str, Timing]:
    """Time several implementations in one process, one repeat of each in turn (A B A B ...).

    Args:
        functions: name -> work, each called with no arguments.
        repeats: timed calls of each.
        warmup: untimed rounds first.
        synchronize: called before each clock read.

    Returns:
        name -> its :class:`Timing`; repeat ``i`` of every entry ran in the same round.
    """
    if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 1:
        raise ValueError(f"repeats: expected a positive int, got {repeats!r}")
    if not functions:
        raise ValueError("functions: expected at least one implementation to time")
    for _ in range(warmup):
        for function in functions.values():
            function()
    seconds: dict[str, list[float]] = {name: [] for name in functions}
    for _ in range(repeats):
        for name, function in functions.items():
            seconds[name].append(_timed(function, synchronize))
    return {name: Timing(tuple(values)) for name, values in seconds.items()}
