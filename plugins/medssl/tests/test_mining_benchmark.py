"""The mining speed benchmark runs end to end on a few tiny phantoms (the chain and the tables, not the
numbers), and the hand-built embedding on which the reference and nearest scorings disagree."""

from __future__ import annotations

from accord_medssl.benchmarks import mining_speed, scoring_acceptance


def test_mining_benchmark_compares_with_the_reference_path_at_two_dataset_sizes() -> None:
    result = mining_speed((2, 3), shape=(40, 40, 32), crop_size=8, pairs_per_round=2, repeats=1, train_steps=1,
                          threads=1)
    mining = [row for row in result.rows if row["path"] in ("reference", "accord", "accord_nearest")]
    assert [(row["volumes"], row["path"]) for row in mining] == [
        (count, path) for count in (2, 3) for path in ("reference", "accord", "accord_nearest")
    ]
    for row in mining:
        assert row["pairs"] == 4  # (warm-up + 1 timed round) x 2 pairs
        assert row["min_s"] <= row["median_s"] <= row["max_s"]
        assert 0.0 <= row["accepted"] <= 1.0 and 1 <= row["mean_tries"] <= 100
        assert 0.0 < row["local_map_read"] <= 1.0
    assert [row["path"] for row in result.rows[6:]] == ["hand-built/reference", "hand-built/nearest", "machine"]
    assert result.rows[-1]["torch_threads"] == 1 and result.rows[-1]["store_mb"] > 0
    markdown = result.markdown()
    assert "reference data path" in markdown and "speed-up over reference" in markdown and "load_1min" in markdown
    assert "Per-pair cost at 3 volumes over the cost at 2" in markdown and "hand-built embedding" in markdown


def test_the_reference_scoring_accepts_where_nearest_does_not() -> None:
    # The anchor is the query shifted by half a global cell: trilinear upsampling finds the true
    # match at the first try; the nearest global cells are 68 degrees of the field apart there.
    results = scoring_acceptance(pairs=40)
    reference, nearest = results["reference"], results["nearest"]
    assert reference["accepted_first_try"] >= 0.9 and reference["mean_error_voxels"] <= 2
    assert reference["mean_score"] > 0.9
    assert nearest["accepted_first_try"] <= 0.3 and nearest["mean_tries"] > 3 * reference["mean_tries"]
    assert nearest["mean_score"] < 0.8
