"""The anatomical embedding network and its SAM-style pretraining."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from accord_medssl.anatomy import (
    AnatomicalViewMiner,
    AnatomyEmbeddingModel,
    AnatomyEmbeddingOptions,
    AnatomyEmbeddingPretraining,
    AnatomyPretrainingOptions,
    crop_with_zero_padding,
    model_embedder,
    sample_view_pairs,
)

TINY = AnatomyEmbeddingOptions(widths=(8, 16, 32), fpn_dim=16, global_dim=16, local_dim=16)


def synthetic_volume(shape: tuple[int, int, int] = (48, 48, 40), seed: int = 0) -> torch.Tensor:
    """``(1, *shape)`` smooth random structure in [0, 1]."""
    noise = torch.rand(1, 1, *shape, generator=torch.Generator().manual_seed(seed))
    smooth = F.avg_pool3d(noise, 5, stride=1, padding=2)[0]
    return (smooth - smooth.min()) / (smooth.max() - smooth.min())


def test_maps_have_the_documented_strides_and_unit_norm() -> None:
    model = AnatomyEmbeddingModel(TINY)
    global_map, local_map = model(torch.rand(2, 1, 32, 16, 24))
    assert global_map.shape == (2, 16, 4, 2, 3) and local_map.shape == (2, 16, 16, 8, 12)
    torch.testing.assert_close(global_map.norm(dim=1), torch.ones(2, 4, 2, 3))
    torch.testing.assert_close(local_map.norm(dim=1), torch.ones(2, 16, 8, 12))
    with pytest.raises(ValueError, match="images"):
        model(torch.rand(1, 1, 30, 16, 16))


def test_embed_volume_pads_crops_and_restores_the_mode() -> None:
    torch.manual_seed(0)
    model = AnatomyEmbeddingModel(TINY).train()
    volume = torch.rand(1, 20, 17, 16)
    embedding = model.embed_volume(volume)
    assert model.training
    assert embedding.global_map.shape == (16, 3, 3, 2) and embedding.local_map.shape == (16, 10, 9, 8)
    assert embedding.volume_shape == (20, 17, 16)
    model.eval()
    with torch.no_grad():
        global_map, local_map = model(F.pad(volume, (0, 0, 0, 7, 0, 4))[None])
    torch.testing.assert_close(embedding.local_map, local_map[0, :, :10, :9, :8])
    torch.testing.assert_close(embedding.global_map, global_map[0, :, :3, :3, :2])


def test_view_pairs_record_their_geometry() -> None:
    volume = synthetic_volume()
    batch = sample_view_pairs([volume, volume], crop_size=(16, 16, 16), scale_range=(1.0, 1.0), intensity_jitter=0.0)
    assert batch["view_a"].shape == batch["view_b"].shape == (2, 1, 16, 16, 16)
    assert batch["affine_a"].shape == (2, 4, 4) and batch["affine_a"].dtype == torch.float64
    # At scale 1 a view is the plain crop whose first voxel is the affine's translation.
    for view, affine in zip(batch["view_b"], batch["affine_b"]):
        torch.testing.assert_close(affine[:3, :3], torch.eye(3, dtype=torch.float64))
        torch.testing.assert_close(view, crop_with_zero_padding(volume, affine[:3, 3].long().tolist(), (16, 16, 16)))
    with pytest.raises(ValueError, match="scale_range"):
        sample_view_pairs([volume], scale_range=(0.0, 1.0))
    with pytest.raises(ValueError, match=r"volumes\[0\]"):
        sample_view_pairs([volume[0]])


def test_pretraining_loss_decreases_on_a_synthetic_volume() -> None:
    torch.manual_seed(0)
    module = AnatomyEmbeddingPretraining(AnatomyPretrainingOptions(model=TINY, max_pairs=256))
    volume = synthetic_volume()
    batch = sample_view_pairs([volume, volume], crop_size=(32, 32, 32), generator=torch.Generator().manual_seed(0))
    optimizer = torch.optim.Adam(module.parameters(), lr=3e-3)
    losses = []
    for _ in range(6):
        terms = module(batch)
        assert set(terms) == {"loss", "global", "local"} and all(torch.isfinite(v) for v in terms.values())
        optimizer.zero_grad()
        terms["loss"].backward()
        optimizer.step()
        losses.append(terms["loss"].item())
    assert losses[-1] < losses[0] - 0.1, losses


def test_disjoint_views_give_a_zero_loss_attached_to_the_graph() -> None:
    module = AnatomyEmbeddingPretraining(AnatomyPretrainingOptions(model=TINY))
    far = torch.eye(4, dtype=torch.float64).repeat(2, 1, 1)
    far[:, 0, 3] = 1000.0
    batch = {
        "view_a": torch.rand(2, 1, 16, 16, 16),
        "view_b": torch.rand(2, 1, 16, 16, 16),
        "affine_a": torch.eye(4, dtype=torch.float64).repeat(2, 1, 1),
        "affine_b": far,
    }
    terms = module(batch)
    assert terms["loss"].item() == 0.0 and terms["loss"].requires_grad
    with pytest.raises(ValueError, match="batch"):
        module({"view_a": batch["view_a"]})
    with pytest.raises(ValueError, match=r"batch\['affine_b'\]"):
        module({**batch, "affine_b": far[:1]})


def test_model_embedder_feeds_the_miner() -> None:
    torch.manual_seed(0)
    model = AnatomyEmbeddingModel(TINY)
    volume = synthetic_volume((32, 32, 24))
    miner = AnatomicalViewMiner(model_embedder(model), crop_size=(16, 16, 16))
    mined = miner.mine([volume], [volume], ["v"], ["v"], generator=torch.Generator().manual_seed(0))
    # Self-matching: the query's own local cell scores 1 and wins (or ties with an identical vector),
    # up to the float16 rounding of the stored, pre-normalised embeddings.
    assert mined.accepted.item() and mined.scores.item() == pytest.approx(1.0, abs=1e-3)
