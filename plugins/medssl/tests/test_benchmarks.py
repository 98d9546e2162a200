"""The loader-throughput benchmark returns the numbers the docs quote."""

from __future__ import annotations

from pathlib import Path

import pytest

from accord_medssl.benchmarks import loader_throughput


def test_loader_throughput_reports_cold_and_cached_rates(msd_root: Path, phantom_spec) -> None:
    result = loader_throughput(msd_root)
    assert result["volumes"] == phantom_spec.num_train
    rates = ("uncached_volumes_per_s", "cold_volumes_per_s", "cached_volumes_per_s")
    assert all(result[key] > 0 for key in rates)
    assert result["cache_speedup"] == pytest.approx(result["cached_volumes_per_s"] / result["uncached_volumes_per_s"])
    # Image float32 + label uint8 per case, plus pickled metadata.
    voxels = phantom_spec.shape[0] * phantom_spec.shape[1] * phantom_spec.shape[2]
    assert result["cache_mb"] * 2**20 > phantom_spec.num_train * voxels * 5


def test_loader_throughput_synthesises_when_no_root_is_given() -> None:
    assert loader_throughput(num_cases=2, shape=(24, 24, 16))["volumes"] == 2
