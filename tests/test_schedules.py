"""Cosine, linear and warm-up-cosine schedules: endpoints, monotonicity, argument checks."""

from __future__ import annotations

import math

import numpy as np
import pytest

from accord.utils.schedules import cosine_schedule, linear_schedule, linear_warmup_cosine


def test_cosine_schedule_endpoints_midpoint_and_monotone():
    values = [cosine_schedule(step, 1000, 0.996, 1.0) for step in range(1001)]
    assert values[0] == 0.996 and values[-1] == 1.0
    assert values[500] == pytest.approx(0.998)
    assert np.all(np.diff(values) >= 0)
    assert cosine_schedule(1500, 1000, 0.996, 1.0) == 1.0
    decreasing = [cosine_schedule(step, 37, 0.5, 0.1) for step in range(38)]
    assert decreasing[0] == 0.5 and decreasing[-1] == 0.1 and np.all(np.diff(decreasing) <= 0)
    assert cosine_schedule(3, 10, 1.0, 0.0) == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.3)))


def test_linear_schedule_endpoints_and_clamp():
    assert linear_schedule(0, 30, 0.008, 0.01) == 0.008
    assert linear_schedule(30, 30, 0.008, 0.01) == 0.01
    assert linear_schedule(99, 30, 0.008, 0.01) == 0.01
    assert linear_schedule(10, 40, 0.0, 2.0) == pytest.approx(0.5)


@pytest.mark.parametrize(
    ("warmup", "total", "base", "final"),
    [(10, 100, 1e-3, 1e-6), (0, 50, 0.1, 0.0), (7, 33, 5e-4, 5e-4), (3, 17, 1.25e-5, 1e-4)],
)
def test_linear_warmup_cosine_endpoints_and_monotone(warmup, total, base, final):
    values = np.array([linear_warmup_cosine(step, warmup, total, base, final) for step in range(total + 1)])
    assert values[warmup] == base  # exactly
    assert values[total] == final  # exactly
    if warmup:
        assert values[0] == 0.0 and np.all(np.diff(values[: warmup + 1]) > 0)
    decay = np.diff(values[warmup:])
    assert np.all(decay <= 0) if final <= base else np.all(decay >= 0)
    assert linear_warmup_cosine(total + 5, warmup, total, base, final) == final


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda: cosine_schedule(-1, 10, 0.0, 1.0), "step"),
        (lambda: cosine_schedule(1.5, 10, 0.0, 1.0), "step"),
        (lambda: cosine_schedule(0, 0, 0.0, 1.0), "max_steps"),
        (lambda: cosine_schedule(0, 10, float("nan"), 1.0), "start"),
        (lambda: linear_schedule(0, 10, 0.0, float("inf")), "end"),
        (lambda: linear_warmup_cosine(0, 10, 10, 1.0, 0.0), "warmup_steps"),
        (lambda: linear_warmup_cosine(0, -1, 10, 1.0, 0.0), "warmup_steps"),
        (lambda: linear_warmup_cosine(0, 2, 10, -1.0, 0.0), "base"),
        (lambda: linear_warmup_cosine(0, 2, 10, 1.0, -0.5), "final"),
        (lambda: linear_warmup_cosine(True, 2, 10, 1.0, 0.0), "step"),
    ],
)
def test_schedules_reject_bad_arguments(call, match):
    with pytest.raises(ValueError, match=match):
        call()
