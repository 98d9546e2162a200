"""The anatomy embedding on real anatomy: nilearn's MNI152 T1 template and its tissue masks."""

from __future__ import annotations

from accord_medssl.benchmarks import QUICK, anatomy_matching


def test_a_briefly_trained_embedding_localises_mni152_tissue_better_than_an_untrained_one(one_torch_thread) -> None:
    result = anatomy_matching({"untrained": None, "trained": QUICK.anatomy_embedding}, datasets=("mni152",),
                              steps=30, num_points=64)
    rows = {row["variant"]: row for row in result.rows}
    untrained, trained = rows["untrained"], rows["trained"]
    assert untrained["dataset"] == "mni152" and untrained["points"] > 0
    # Three tissue labels (other brain, grey, white matter) of real data, balanced queries: chance is low.
    assert untrained["chance_hit_rate"] < 0.2
    assert trained["error_mm_mean"] < 0.8 * untrained["error_mm_mean"]
    assert trained["hit_rate"] > trained["chance_hit_rate"]
