"""accord.utils.timing: statistics over repeats, alternated comparisons, thread control (no timing asserts)."""

from __future__ import annotations

import pytest
import torch

from accord.utils.timing import Timing, machine_state, ratio, time_alternating, time_repeats, torch_threads


def test_timing_statistics_and_formatting() -> None:
    timing = Timing((0.3, 0.1, 0.2, 0.5))
    assert (timing.median, timing.minimum, timing.maximum) == (0.25, 0.1, 0.5)
    assert timing.summary() == {"median_s": 0.25, "min_s": 0.1, "max_s": 0.5, "repeats": 4}
    assert timing.describe(1e3, "ms") == "250 ms (100-500)"
    assert timing.scaled(0.5).seconds == (0.15, 0.05, 0.1, 0.25)
    assert timing.rate(10) == "40 (20-100)"
    assert ratio(Timing((2.0, 4.0)), Timing((1.0, 1.0))) == "3x (2-4)"
    with pytest.raises(ValueError, match="at least one"):
        Timing(())


def test_alternating_runs_every_side_once_per_round_in_order() -> None:
    calls: list[str] = []
    timings = time_alternating({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, repeats=3, warmup=1)
    assert calls == ["a", "b"] * 4
    assert {name: len(timing.seconds) for name, timing in timings.items()} == {"a": 3, "b": 3}
    synced: list[int] = []
    assert len(time_repeats(lambda: None, repeats=2, warmup=0, synchronize=lambda: synced.append(1)).seconds) == 2
    assert synced == [1, 1]
    with pytest.raises(ValueError, match="repeats"):
        time_alternating({"a": lambda: None}, repeats=0)


def test_thread_mode_is_restored_and_machine_state_reports_load() -> None:
    before = torch.get_num_threads()
    with torch_threads(1):
        assert torch.get_num_threads() == 1
        assert machine_state()["torch_threads"] == 1
    assert torch.get_num_threads() == before
    with torch_threads(None):
        assert torch.get_num_threads() == before
    state = machine_state()
    assert set(state) == {"torch_threads", "cpus", "load_1min", "load_5min"} and state["load_1min"] >= 0
    with pytest.raises(ValueError, match="threads"):
        with torch_threads(0):
            pass
