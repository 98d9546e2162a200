"""The mining speed benchmark runs end to end on a few tiny phantoms (the chain and the table, not the numbers)."""

from __future__ import annotations

from accord_medssl.benchmarks import mining_speed


def test_mining_benchmark_compares_with_the_reference_path() -> None:
    result = mining_speed(3, shape=(40, 40, 32), crop_size=8, pairs_per_round=2, repeats=1, train_steps=1, threads=1)
    paths = [row["path"] for row in result.rows]
    assert paths == ["reference", "accord", "accord_nearest", "machine"]
    for row in result.rows[:3]:
        assert row["pairs"] == 4  # (warm-up + 1 timed round) x 2 pairs
        assert row["min_s"] <= row["median_s"] <= row["max_s"]
        assert 0.0 <= row["accepted"] <= 1.0 and 1 <= row["mean_tries"] <= 100
    assert result.rows[3]["torch_threads"] == 1 and result.rows[3]["store_mb"] > 0
    markdown = result.markdown()
    assert "reference data path" in markdown and "speed-up over reference" in markdown and "load_1min" in markdown
