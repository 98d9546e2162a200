"""The anatomy-matching measurement: known answers on hand-built embeddings and deformations."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from accord_medssl.anatomy import AnatomyEmbedding, AnatomySearchIndex, cell_to_voxel
from accord_medssl.anatomy.evaluation import (
    ACCEPTANCE_CRITERIA,
    MatchOutcomes,
    match_labelled_points,
    random_deformed_copy,
    sample_labelled_points,
    second_best_scores,
)

SHAPE = (8, 4, 4)
LOCAL_GRID = (4, 2, 2)


def one_hot_embedding(cell_of_vector: torch.Tensor) -> AnatomyEmbedding:
    """Local map (stride 2): cell ``c`` holds one-hot vector ``cell_of_vector[c]``; one constant global vector."""
    local = F.one_hot(cell_of_vector, num_classes=cell_of_vector.numel()).T.float().reshape(-1, *LOCAL_GRID)
    return AnatomyEmbedding(
        global_map=torch.ones(3, 2, 1, 1),
        local_map=local,
        global_stride=(4, 4, 4),
        local_stride=(2, 2, 2),
        volume_shape=SHAPE,
    )


def shifted_pair() -> tuple[AnatomySearchIndex, AnatomySearchIndex]:
    """The target's anatomy is the query's moved one local cell (2 voxels) along axis 0, cyclically."""
    cells = torch.arange(16).reshape(LOCAL_GRID)
    query = one_hot_embedding(cells.flatten())
    # Target cell (i, j, k) carries the vector of query cell (i - 1, j, k).
    target = one_hot_embedding(cells.roll(1, dims=0).flatten())
    return AnatomySearchIndex.from_embedding(query), AnatomySearchIndex.from_embedding(target)


def layered_labels() -> torch.Tensor:
    """Label 1 on axis-0 voxels 0-3, label 2 on voxels 4-7."""
    labels = torch.ones(SHAPE, dtype=torch.long)
    labels[4:] = 2
    return labels


def test_matching_finds_the_known_shift_and_scores_hits_and_errors() -> None:
    query, target = shifted_pair()
    points = torch.stack(torch.meshgrid(*(torch.arange(size) for size in SHAPE), indexing="ij"), -1).reshape(-1, 3)
    labels = layered_labels()
    moved_labels = labels.roll(2, dims=0)  # the labels moved with the anatomy: every match is a hit
    true_points = points.double() + torch.tensor([2.0, 0.0, 0.0])
    outcomes = match_labelled_points(points, query, target, labels, moved_labels, true_points, spacing=(2.0, 1.0, 1.0))
    assert bool(outcomes.hit.all())
    # Constant global part (cosine 1) + one-hot local part: 1 at the match, 1/2 at the 15 other cells.
    torch.testing.assert_close(outcomes.score, torch.ones(len(points)))
    torch.testing.assert_close(outcomes.similarity_mean, torch.full((len(points),), (1 + 15 * 0.5) / 16))
    matched_cell = torch.div(points, 2, rounding_mode="floor") + torch.tensor([1, 0, 0])
    matched = cell_to_voxel(matched_cell % torch.tensor(LOCAL_GRID), 2, SHAPE)
    expected_error = ((matched - true_points) * torch.tensor([2.0, 1.0, 1.0])).norm(dim=1)
    torch.testing.assert_close(outcomes.error_mm, expected_error)
    # Labels that stay put: the matches from cells 1 and 3 land in the other layer.
    outcomes = match_labelled_points(points, query, target, labels, labels)
    torch.testing.assert_close(outcomes.hit, torch.div(points[:, 0], 2, rounding_mode="floor") % 2 == 0)
    assert outcomes.error_mm is None
    torch.testing.assert_close(outcomes.chance, torch.full((len(points),), 0.5, dtype=torch.float64))


def test_summary_pools_points_and_counts_acceptance() -> None:
    outcomes = MatchOutcomes.concatenate(
        [
            MatchOutcomes(torch.tensor([True, False]), torch.tensor([0.9, 0.8]), torch.tensor([0.1, 0.2]),
                          torch.tensor([0.5, 0.5], dtype=torch.float64), torch.tensor([1.0, 3.0])),
            MatchOutcomes(torch.tensor([True, True]), torch.tensor([0.6, 0.95]), torch.tensor([0.3, 0.4]),
                          torch.tensor([0.25, 0.25], dtype=torch.float64), torch.tensor([2.0, 6.0])),
        ]
    )
    summary = outcomes.summary(threshold=0.7)
    assert summary["points"] == 4 and summary["hit_rate"] == pytest.approx(0.75)
    assert summary["chance_hit_rate"] == pytest.approx(0.375)
    assert summary["accepted"] == pytest.approx(0.75)  # 0.9, 0.8 and 0.95
    assert summary["accepted_hit_rate"] == pytest.approx(2 / 3)
    assert summary["score_mean"] == pytest.approx(0.8125) and summary["similarity_mean"] == pytest.approx(0.25)
    # Hits score 0.9, 0.6, 0.95 against one miss at 0.8: 2 of 3 comparisons won.
    assert summary["hit_score_auc"] == pytest.approx(2 / 3)
    assert summary["error_mm_mean"] == pytest.approx(3.0) and summary["error_mm_p50"] == pytest.approx(2.5)
    nothing_accepted = outcomes.summary(threshold=0.99)
    assert nothing_accepted["accepted"] == 0 and math.isnan(nothing_accepted["accepted_hit_rate"])
    with pytest.raises(ValueError, match="mixes pairs with and without error_mm"):
        MatchOutcomes.concatenate([outcomes, MatchOutcomes(*(getattr(outcomes, name) for name in ("hit", "score", "similarity_mean", "chance")))])


def test_second_best_and_cycle_error_on_an_ambiguous_and_a_missing_anatomy() -> None:
    # The target is the query except that cell 5 = (1, 0, 1) repeats cell 4's vector: cell 4's
    # anatomy appears twice in the target, cell 5's not at all.
    cells = torch.arange(16)
    query = AnatomySearchIndex.from_embedding(one_hot_embedding(cells))
    target = AnatomySearchIndex.from_embedding(one_hot_embedding(torch.where(cells == 5, 4, cells)))
    grid_cells = torch.stack(torch.meshgrid(*(torch.arange(n) for n in LOCAL_GRID), indexing="ij"), -1).reshape(-1, 3)
    centres = cell_to_voxel(grid_cells, 2, SHAPE)
    labels = torch.ones(SHAPE, dtype=torch.long)
    outcomes = match_labelled_points(
        centres, query, target, labels, labels, spacing=(2.0, 1.0, 1.0), exclusion_radius=0
    )
    # Local one-hot + constant global: 1 at an equal vector, 1/2 elsewhere.
    expected_second = torch.full((16,), 0.5)
    expected_second[4] = 1.0  # cell 4's other copy, outside the radius-0 box
    expected_second[5] = 0.5  # cell 5 matches nothing: every cell scores 1/2
    torch.testing.assert_close(outcomes.second_score, expected_second)
    # Cell 5 lands on target cell 0 (the first of equal scores), which returns to query cell 0.
    expected_cycle = torch.zeros(16, dtype=torch.float64)
    expected_cycle[5] = math.hypot(2 * 2.0, 2 * 1.0)
    torch.testing.assert_close(outcomes.cycle_error_mm, expected_cycle)
    criteria = outcomes.criteria()
    assert set(criteria) == set(ACCEPTANCE_CRITERIA)
    assert criteria["distinctiveness"][4] == 0 and criteria["distinctiveness"][0] > 1e6
    # A box covering the whole grid leaves no second-best cell.
    scores = torch.rand(3, 16)
    assert bool(torch.isneginf(second_best_scores(scores, target, exclusion_radius=4)).all())
    box_one = second_best_scores(torch.eye(16)[:1] + torch.arange(16) / 100, target, exclusion_radius=1)
    # Best cell 0 = (0, 0, 0); cells within one cell per axis are (0|1, 0|1, 0|1): 0-7 all excluded.
    torch.testing.assert_close(box_one, torch.tensor([0.15]))
    with pytest.raises(ValueError, match="exclusion_radius"):
        second_best_scores(scores, target, exclusion_radius=-1)


def test_summary_scores_each_acceptance_criterion() -> None:
    outcomes = MatchOutcomes(
        hit=torch.tensor([True, True, False, False]),
        score=torch.tensor([0.9, 0.8, 0.95, 0.85]),
        similarity_mean=torch.tensor([0.1, 0.1, 0.1, 0.1]),
        chance=torch.full((4,), 0.5, dtype=torch.float64),
        error_mm=torch.tensor([1.0, 2.0, 3.0, 4.0]),
        second_score=torch.tensor([0.5, 0.5, 0.9, 0.9]),
        cycle_error_mm=torch.tensor([0.0, 1.0, 9.0, 3.0]),
    )
    summary = outcomes.summary()
    # Raw scores: hits 0.9, 0.8 against misses 0.95, 0.85: one of four comparisons won.
    assert summary["hit_score_auc"] == pytest.approx(0.25)
    assert summary["hit_margin_auc"] == pytest.approx(0.25)
    # Distinctiveness 5, 2.5 for the hits against 2, 2/3 for the misses; cycle 0, -1 against -9, -3.
    assert summary["hit_distinctiveness_auc"] == pytest.approx(1.0) and summary["hit_cycle_auc"] == pytest.approx(1.0)
    assert summary["cycle_top_half_hit_rate"] == pytest.approx(1.0)
    assert summary["cycle_top_half_error_mm_mean"] == pytest.approx(1.5)
    assert summary["score_top_half_hit_rate"] == pytest.approx(0.5)
    assert summary["score_top_quarter_hit_rate"] == pytest.approx(0.0)  # only 0.95, a miss
    without_extras = MatchOutcomes(*(getattr(outcomes, name) for name in ("hit", "score", "similarity_mean", "chance")))
    assert "hit_cycle_auc" not in without_extras.summary() and "hit_margin_auc" in without_extras.summary()
    with pytest.raises(ValueError, match="mixes pairs with and without cycle_error_mm"):
        MatchOutcomes.concatenate([outcomes, MatchOutcomes(**{**vars(outcomes), "cycle_error_mm": None})])


def test_labelled_points_are_balanced_over_labels() -> None:
    labels = torch.zeros(10, 10, 10, dtype=torch.long)
    labels[:8] = 1
    labels[9, :2, :2] = 2  # 4 voxels
    points = sample_labelled_points(labels, 20, torch.Generator().manual_seed(0))
    sampled = labels[tuple(points.T)]
    assert (sampled == 1).sum() == 10 and (sampled == 2).sum() == 4  # label 2 gives all it has
    assert len(torch.unique(points[sampled == 1], dim=0)) == 10
    with pytest.raises(ValueError, match="labels: expected at least one voxel with a label above 0"):
        sample_labelled_points(torch.zeros(4, 4, 4, dtype=torch.long), 5)


def test_deformed_copy_samples_the_original_at_its_source_points() -> None:
    shape = (20, 16, 12)
    grid = torch.stack(torch.meshgrid(*(torch.arange(size, dtype=torch.float64) for size in shape), indexing="ij"), -1)
    # Trilinear interpolation reproduces a linear ramp exactly, so the copy must equal the ramp
    # evaluated at each voxel's source point, in the right axis order.
    slope = torch.tensor([1.0, 10.0, 100.0], dtype=torch.float64)
    volume = (grid @ slope)[None]
    labels = (grid[..., 0] >= 10).long() + 1
    copy = random_deformed_copy(
        volume, labels, spacing=(1.0, 1.5, 2.0), max_translation_mm=3.0, generator=torch.Generator().manual_seed(3)
    )
    inside = ((copy.source_points >= 0) & (copy.source_points <= torch.tensor(shape) - 1)).all(dim=-1)
    assert inside.float().mean() > 0.5
    moved = (copy.source_points - grid).norm(dim=-1)
    assert moved.max() > 1.0  # a real deformation, not the identity
    torch.testing.assert_close(copy.volume[0][inside], (copy.source_points @ slope)[inside])
    expected_labels = labels[copy.source_points.round().long()[inside].unbind(-1)]
    assert (copy.labels[inside] == expected_labels).float().mean() > 0.99  # ties at .5 may round either way
    outside = ((copy.source_points < -0.5) | (copy.source_points > torch.tensor(shape) - 0.5)).any(dim=-1)
    assert outside.any() and bool((copy.labels[outside] == 0).all())


def test_deformed_copy_rejects_bad_inputs() -> None:
    volume = torch.rand(1, 8, 8, 8)
    labels = torch.zeros(8, 8, 8, dtype=torch.long)
    with pytest.raises(ValueError, match="labels"):
        random_deformed_copy(volume, labels[:4])
    with pytest.raises(ValueError, match="spacing"):
        random_deformed_copy(volume, labels, spacing=(1.0, 0.0, 1.0))
    with pytest.raises(ValueError, match="max_scale"):
        random_deformed_copy(volume, labels, max_scale=1.0)
