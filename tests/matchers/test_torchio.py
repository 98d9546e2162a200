"""Crop-overlap matching driven by a real TorchIO transform history (the medical 3D case)."""

from __future__ import annotations

import torch
import torchio as tio
from accord.matchers import CropOverlapMatcher, crop_affine

SOURCE_SHAPE = (10, 12, 8)


def _affine_from_history(view: tio.Subject) -> torch.Tensor:
    """Cell-to-source affine from the plain parameters TorchIO records (Crop, Flip, Resize)."""
    origin, size, flip = [0] * 3, list(SOURCE_SHAPE), ()
    for transform in view.get_applied_transforms():
        if isinstance(transform, tio.Crop):
            low, high = transform.cropping[0::2], transform.cropping[1::2]
            origin = [o + lo for o, lo in zip(origin, low)]
            size = [s - lo - hi for s, lo, hi in zip(size, low, high)]
        elif isinstance(transform, tio.Flip):
            flip = tuple(transform.axes)
    return crop_affine(origin, size, view.spatial_shape, flip=flip)


def _views() -> tuple[tio.Subject, tio.Subject]:
    # Every source voxel holds its own index, so matched voxels must hold the same value.
    source = tio.Subject(
        image=tio.LabelMap(
            tensor=torch.arange(torch.Size(SOURCE_SHAPE).numel()).view(1, *SOURCE_SHAPE)
        )
    )
    view_a = tio.Compose([tio.Crop((1, 2, 3, 1, 0, 2)), tio.Flip(axes=(0,))])(source)
    # Resize uses nearest interpolation for label maps: each fine voxel copies a source voxel.
    view_b = tio.Compose([tio.Crop((3, 0, 0, 4, 1, 1)), tio.Resize((14, 16, 12))])(source)
    return view_a, view_b


def test_history_affines_agree_with_torchio_image_affines() -> None:
    view_a, view_b = _views()
    # TorchIO tracks crops and resampling in image.affine (source affine = identity) but not flips.
    assert torch.allclose(_affine_from_history(view_b), torch.from_numpy(view_b.image.affine))
    unflipped = crop_affine((1, 3, 0), (7, 8, 6), view_a.spatial_shape)
    assert torch.allclose(unflipped, torch.from_numpy(view_a.image.affine))


def test_matched_voxels_hold_the_same_source_voxel() -> None:
    view_a, view_b = _views()
    values_a, values_b = view_a.image.data.flatten(), view_b.image.data.flatten()
    # Each fine voxel of b is matched to the voxel of a that contains its centre.
    result = CropOverlapMatcher(mode="nearest")(
        affine_a=_affine_from_history(view_b),
        affine_b=_affine_from_history(view_a),
        grid_size_a=view_b.spatial_shape,
        grid_size_b=view_a.spatial_shape,
    )
    assert torch.equal(values_b[result.index_a], values_a[result.index_b])
    overlap = torch.isin(values_b, values_a)
    assert len(result) == int(overlap.sum()) > 0
    assert set(result.index_a.tolist()) == set(overlap.nonzero().squeeze(1).tolist())
