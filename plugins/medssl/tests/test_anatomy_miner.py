"""View mining: exact recovery of known correspondences with a hand-crafted anatomical embedding.

The embedding of a voxel is a function of its position in a shared *reference* frame (multi-period
sin/cos features) plus its intensity. For a transformed copy B of a volume A with known
``B(T(p)) = A(p)``, B's cell at voxel ``q`` is embedded at reference position ``T^-1(q)``, so
corresponding voxels have identical embeddings and the miner must return ``T(p)`` exactly.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F

from accord_medssl.anatomy import (
    AnatomicalViewMiner,
    AnatomyEmbedding,
    AnatomySearchIndex,
    cell_to_voxel,
    embedding_grid_shape,
    match_points,
    voxel_to_cell,
)

SHAPE = (40, 36, 32)
SHIFT = (4, 0, 2)
LOCAL_PERIODS = (3.0, 5.0, 7.0, 60.0)
GLOBAL_PERIODS = (80.0, 160.0)


def smooth_volume(seed: int) -> torch.Tensor:
    """``(1, *SHAPE)`` smooth positive intensities, zero (background) where the shifted copy loses voxels."""
    noise = torch.rand(1, 1, *SHAPE, generator=torch.Generator().manual_seed(seed))
    volume = 0.1 + F.avg_pool3d(noise, 5, stride=1, padding=2)[0]
    volume[:, SHAPE[0] - SHIFT[0] :] = 0
    volume[:, :, :, SHAPE[2] - SHIFT[2] :] = 0
    return volume


def flip_first_axis(points: torch.Tensor) -> torch.Tensor:
    return torch.stack([SHAPE[0] - 1 - points[:, 0], points[:, 1], points[:, 2]], dim=1)


def unshift(points: torch.Tensor) -> torch.Tensor:
    return points - torch.tensor(SHIFT)


def shifted_copy(volume: torch.Tensor) -> torch.Tensor:
    copy = torch.zeros_like(volume)
    kept = tuple(slice(0, size - shift) for size, shift in zip(SHAPE, SHIFT))
    copy[(slice(None), *(slice(shift, None) for shift in SHIFT))] = volume[(slice(None), *kept)]
    return copy


def positional_features(positions: torch.Tensor, periods: tuple[float, ...]) -> torch.Tensor:
    """``(N, 3)`` positions -> ``(N, 3 * 2 * len(periods))`` unit-norm sin/cos features."""
    angles = torch.cat([positions.double()[:, None, :] * (2 * math.pi / p) for p in periods], dim=1).flatten(1)
    return F.normalize(torch.cat([angles.sin(), angles.cos()], dim=1), dim=1).float()


def handcrafted_embedding(
    volume: torch.Tensor,
    to_reference: Callable[[torch.Tensor], torch.Tensor],
    local_stride: int,
    global_stride: int,
) -> AnatomyEmbedding:
    """Embedding of each cell at its centre voxel's reference position (+ intensity on the local map)."""

    def cell_map(stride: int, periods: tuple[float, ...], with_intensity: bool) -> torch.Tensor:
        grid = embedding_grid_shape(SHAPE, stride)
        cells = torch.stack(torch.meshgrid(*(torch.arange(g) for g in grid), indexing="ij"), dim=-1).reshape(-1, 3)
        centres = cell_to_voxel(cells, stride, SHAPE)
        features = positional_features(to_reference(centres), periods)
        if with_intensity:
            intensity = volume[0][tuple(centres.T)]
            features = F.normalize(torch.cat([features, 0.3 * intensity[:, None]], dim=1), dim=1)
        return features.T.reshape(-1, *grid)

    return AnatomyEmbedding(
        global_map=cell_map(global_stride, GLOBAL_PERIODS, with_intensity=False),
        local_map=cell_map(local_stride, LOCAL_PERIODS, with_intensity=True),
        global_stride=(global_stride,) * 3,
        local_stride=(local_stride,) * 3,
        volume_shape=SHAPE,
    )


def test_exact_recovery_for_flipped_and_shifted_copies_per_sample() -> None:
    volume_a, volume_b = smooth_volume(0), smooth_volume(1)
    copies = {"a_flipped": volume_a.flip(1), "b_shifted": shifted_copy(volume_b)}
    embeddings = {
        "a": handcrafted_embedding(volume_a, lambda p: p, 1, 4),
        "b": handcrafted_embedding(volume_b, lambda p: p, 1, 4),
        "a_flipped": handcrafted_embedding(copies["a_flipped"], flip_first_axis, 1, 4),
        "b_shifted": handcrafted_embedding(copies["b_shifted"], unshift, 1, 4),
    }
    miner = AnatomicalViewMiner(lambda key, volume: embeddings[key], crop_size=(15, 15, 15))
    mined = miner.mine(
        [volume_a, volume_b, volume_a],
        [copies["a_flipped"], copies["b_shifted"], copies["a_flipped"]],
        ["a", "b", "a"],
        ["a_flipped", "b_shifted", "a_flipped"],
        generator=torch.Generator().manual_seed(0),
    )
    points = mined.query_points
    assert not torch.equal(points[0], points[2])  # one point per sample
    expected = torch.stack(
        [flip_first_axis(points[:1])[0], points[1] + torch.tensor(SHIFT), flip_first_axis(points[2:])[0]]
    )
    assert torch.equal(mined.anchor_points, expected)
    # The local term is exactly 1; the global one is slightly below (the global grids of A and of the
    # transformed copy tile the anatomy differently).
    assert mined.accepted.all() and (mined.scores > 0.99).all() and mined.attempts.tolist() == [1, 1, 1]
    # The crops show the same anatomy: mirrored for the flip, identical for the shift.
    assert torch.equal(mined.anchor[0], mined.query[0].flip(1))
    assert torch.equal(mined.anchor[1], mined.query[1])
    assert torch.equal(mined.query_boxes[:, 1] - mined.query_boxes[:, 0], torch.full((3, 3), 15))
    assert torch.equal(mined.anchor_boxes[:, 0], mined.anchor_points - 7)
    assert set(mined.as_batch()) >= {"query", "anchor"}


def test_recovery_at_model_strides_is_exact_at_cell_level() -> None:
    volume = smooth_volume(2)
    copy = shifted_copy(volume)
    embeddings = {
        "volume": handcrafted_embedding(volume, lambda p: p, 2, 8),
        "copy": handcrafted_embedding(copy, unshift, 2, 8),
    }
    miner = AnatomicalViewMiner(lambda key, v: embeddings[key], crop_size=(16, 16, 16), candidates_per_round=4)
    for seed in range(4):
        mined = miner.mine([volume], [copy], ["volume"], ["copy"], generator=torch.Generator().manual_seed(seed))
        point = mined.query_points
        # The query's local cell centre, shifted: within one voxel of the exact correspondence.
        centre = cell_to_voxel(voxel_to_cell(point, 2, SHAPE), 2, SHAPE)
        assert torch.equal(mined.anchor_points, centre + torch.tensor(SHIFT))
        assert ((mined.anchor_points - point - torch.tensor(SHIFT)).abs() <= 1).all()


def test_fallback_keeps_the_best_attempt_and_flags_it() -> None:
    volume = smooth_volume(3)
    own = handcrafted_embedding(volume, lambda p: p, 1, 4)
    # Random maps with the hand-crafted channel counts: nothing in "other" matches well.
    other = AnatomyEmbedding(
        global_map=torch.randn(own.global_map.shape, generator=torch.Generator().manual_seed(1)),
        local_map=torch.randn(own.local_map.shape, generator=torch.Generator().manual_seed(2)),
        global_stride=(4, 4, 4),
        local_stride=(1, 1, 1),
        volume_shape=SHAPE,
    )
    embeddings = {"volume": own, "other": other}
    miner = AnatomicalViewMiner(
        lambda key, v: embeddings[key],
        crop_size=(8, 8, 8),
        similarity_threshold=0.95,
        max_attempts=7,
        candidates_per_round=3,
    )
    mined = miner.mine([volume], [volume], ["volume"], ["other"], generator=torch.Generator().manual_seed(0))
    assert not mined.accepted.item() and mined.attempts.item() == 7 and mined.scores.item() < 0.95
    # Replay the 1 + 2 + 3 + 1 candidate draws (rounds double up to 3): the kept pair is the best of all seven.
    generator = torch.Generator().manual_seed(0)
    foreground = (volume[0] > 0).flatten().nonzero().squeeze(1)
    picks = torch.cat([torch.randint(foreground.numel(), (n,), generator=generator) for n in (1, 2, 3, 1)])
    flat = foreground[picks]
    points = torch.stack([flat // (SHAPE[1] * SHAPE[2]), flat // SHAPE[2] % SHAPE[1], flat % SHAPE[2]], dim=1)
    source, target = AnatomySearchIndex.from_embedding(own), AnatomySearchIndex.from_embedding(other)
    matched, scores = match_points(points, source, target)
    best = int(scores.argmax())
    assert torch.equal(mined.query_points[0], points[best]) and torch.equal(mined.anchor_points[0], matched[best])
    torch.testing.assert_close(mined.scores[0], scores[best])


def test_embeddings_are_cached_per_key() -> None:
    volume = smooth_volume(4)
    calls: list[str] = []

    def embedder(key: str, v: torch.Tensor) -> AnatomyEmbedding:
        calls.append(key)
        return handcrafted_embedding(v, lambda p: p, 2, 8)

    miner = AnatomicalViewMiner(embedder, crop_size=(8, 8, 8))
    for _ in range(2):
        miner.mine([volume, volume], [volume, volume], ["x", "y"], ["y", "x"])
    assert calls == ["x", "y"]
    small_cache = AnatomicalViewMiner(embedder, crop_size=(8, 8, 8), cache_size=1)
    calls.clear()
    small_cache.mine([volume], [volume], ["x"], ["y"])
    small_cache.mine([volume], [volume], ["x"], ["y"])
    assert calls == ["x", "y", "x", "y"]


def test_crop_at_the_border_is_zero_padded() -> None:
    volume = torch.zeros(1, *SHAPE)
    volume[0, :3, :3, :3] = torch.rand(3, 3, 3) + 0.5
    embedding = handcrafted_embedding(volume, lambda p: p, 1, 4)
    miner = AnatomicalViewMiner(lambda key, v: embedding, crop_size=(16, 16, 16))
    mined = miner.mine([volume], [volume], ["v"], ["v"], generator=torch.Generator().manual_seed(0))
    point = mined.query_points[0]
    start = mined.query_boxes[0, 0]
    assert (start < 0).all()
    inside = tuple(slice(-s, -s + 3) for s in start.tolist())
    assert torch.equal(mined.query[0][(slice(None), *inside)], volume[:, :3, :3, :3])
    torch.testing.assert_close(mined.query[0].sum(), volume.sum())
    assert torch.equal(mined.anchor_points[0], point)


def test_bad_inputs_raise() -> None:
    volume = smooth_volume(5)
    embedding = handcrafted_embedding(volume, lambda p: p, 2, 8)
    miner = AnatomicalViewMiner(lambda key, v: embedding, crop_size=(48, 16, 16))
    with pytest.raises(ValueError, match="crop_size"):
        miner.mine([volume], [volume], ["v"], ["v"])
    miner = AnatomicalViewMiner(lambda key, v: embedding, crop_size=(16, 16, 16))
    with pytest.raises(ValueError, match=r"query_volumes\[0\]"):
        miner.mine([volume[0]], [volume], ["v"], ["v"])
    with pytest.raises(ValueError, match="anchor_keys"):
        miner.mine([volume], [volume], ["v"], [])
    with pytest.raises(ValueError, match=r"query_volumes\[0\]: no voxel"):
        miner.mine([torch.zeros(1, *SHAPE)], [volume], ["z"], ["v"])
    with pytest.raises(ValueError, match="embedder"):
        miner.mine([torch.rand(1, 32, 32, 32)], [volume], ["other-shape"], ["v"])
    with pytest.raises(ValueError, match="local_map"):
        AnatomyEmbedding(
            global_map=embedding.global_map,
            local_map=embedding.local_map[:, :-1],
            global_stride=(8, 8, 8),
            local_stride=(2, 2, 2),
            volume_shape=SHAPE,
        )
    with pytest.raises(ValueError, match="similarity_threshold"):
        AnatomicalViewMiner(lambda key, v: embedding, similarity_threshold=1.0)
