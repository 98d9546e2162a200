"""Self-supervised training of :class:`AnatomyEmbeddingModel`, SAM-style (medssl §1.3).

SAM learns its embeddings from two augmented, overlapping crops of the *same* volume: voxels at
the same anatomical position must embed alike and unlike every other voxel, once for the coarse
global map and once for the fine local map. Here:

- :func:`sample_view_pairs` cuts the two crops (random centre, random shift, isotropic rescale,
  intensity jitter) and records each view's voxel-to-source affine (core
  :func:`~accord.matchers.crop_affine`);
- the correspondences between the two views' embedding cells come from the core
  :class:`~accord.matchers.CropOverlapMatcher` (``"nearest"`` mode) on those affines;
- each level's loss is the core InfoNCE (:class:`~accord.losses.InfoNCELoss`) of a random subset
  of matched cells of one view against *all* cells of the other view across the batch (the other
  cells of the same crop and of the other samples are the negatives), symmetrised over the views.

Simplified against SAM: no hard-negative mining and no exclusion radius around the positive (a
neighbouring cell is a negative, which sharpens the local map); see docs_alice.md.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from accord.checks import check_tensor
from accord.config import StrictModel
from accord.losses import InfoNCELoss
from accord.matchers import CropOverlapMatcher, crop_affine
from accord_medssl.anatomy.grid import crop_with_zero_padding
from accord_medssl.anatomy.model import AnatomyEmbeddingModel, AnatomyEmbeddingOptions

__all__ = ["AnatomyEmbeddingPretraining", "AnatomyPretrainingOptions", "sample_view_pairs"]


class AnatomyPretrainingOptions(StrictModel):
    """Options of :class:`AnatomyEmbeddingPretraining`."""

    model: AnatomyEmbeddingOptions = Field(default_factory=AnatomyEmbeddingOptions)
    temperature: float = Field(0.5, gt=0.0, description="InfoNCE temperature (SAM's configs use 0.5)")
    global_weight: float = Field(1.0, ge=0.0, description="weight of the global-map loss")
    local_weight: float = Field(1.0, ge=0.0, description="weight of the local-map loss")
    max_pairs: int = Field(
        512, ge=1, description="matched cells per level and batch used as queries (random subset; bounds cost)"
    )


def _check_affines(value: object, name: str, batch_size: int) -> torch.Tensor:
    return check_tensor(value, name, shape=(batch_size, 4, 4), floating=True)


class AnatomyEmbeddingPretraining(nn.Module):
    """Trainer-contract module: two crops of one volume in, ``{"loss", "global", "local"}`` out.

    Args:
        options: model and loss options.

    Example:
        >>> module = AnatomyEmbeddingPretraining()
        >>> batch = sample_view_pairs([torch.rand(1, 48, 48, 48)] * 2, crop_size=(32, 32, 32))
        >>> sorted(module(batch))
        ['global', 'local', 'loss']
    """

    def __init__(self, options: AnatomyPretrainingOptions | None = None) -> None:
        super().__init__()
        self.options = options if options is not None else AnatomyPretrainingOptions()
        self.model = AnatomyEmbeddingModel(self.options.model)
        self.matcher = CropOverlapMatcher(mode="nearest")
        self.contrast = InfoNCELoss(temperature=self.options.temperature)

    def forward(self, batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Global and local dense-contrast losses for a batch of view pairs.

        Args:
            batch: as made by :func:`sample_view_pairs`: ``"view_a"``, ``"view_b"``
                ``(B, C, d, h, w)`` (equal shapes, multiples of 8) and ``"affine_a"``,
                ``"affine_b"`` ``(B, 4, 4)``, each view's voxel-to-source affine in the source
                volume's voxel indices.

        Returns:
            Scalars ``"loss"`` (weighted sum), ``"global"`` and ``"local"``.

        Raises:
            ValueError: a missing key or a bad shape.
        """
        keys = {"view_a", "view_b", "affine_a", "affine_b"}
        if not isinstance(batch, Mapping) or not keys <= batch.keys():
            got = sorted(batch) if isinstance(batch, Mapping) else type(batch).__name__
            raise ValueError(f"batch: expected a mapping with {sorted(keys)}, got {got}")
        view_a = check_tensor(batch["view_a"], "batch['view_a']", ndim=5, floating=True)
        view_b = check_tensor(batch["view_b"], "batch['view_b']", shape=tuple(view_a.shape), floating=True)
        batch_size = view_a.shape[0]
        affine_a = _check_affines(batch["affine_a"], "batch['affine_a']", batch_size)
        affine_b = _check_affines(batch["affine_b"], "batch['affine_b']", batch_size)
        # One pass over both views: BatchNorm statistics are shared, as in SAM's batches.
        global_maps, local_maps = self.model(torch.cat([view_a, view_b]))
        view_shape = tuple(view_a.shape[2:])
        global_loss = self._level_loss(*global_maps.chunk(2), affine_a, affine_b, view_shape)
        local_loss = self._level_loss(*local_maps.chunk(2), affine_a, affine_b, view_shape)
        loss = self.options.global_weight * global_loss + self.options.local_weight * local_loss
        return {"loss": loss, "global": global_loss, "local": local_loss}

    def _level_loss(
        self,
        maps_a: torch.Tensor,
        maps_b: torch.Tensor,
        affine_a: torch.Tensor,
        affine_b: torch.Tensor,
        view_shape: tuple[int, ...],
    ) -> torch.Tensor:
        """Symmetric InfoNCE of matched cells of ``maps_a`` / ``maps_b`` ``(B, C, *grid)``."""
        grid = tuple(maps_a.shape[2:])
        # Embedding cell -> view voxel (stride = view / grid), then view voxel -> source voxel.
        cell_to_view = crop_affine(origin=(0, 0, 0), size=view_shape, grid_size=grid).to(affine_a.device)
        matches = self.matcher(
            affine_a=affine_a.double() @ cell_to_view, affine_b=affine_b.double() @ cell_to_view, grid_size_a=grid
        )
        if len(matches) == 0:
            # Disjoint crops: a zero loss that keeps every parameter in the graph (DDP).
            return maps_a.sum() * 0.0
        if len(matches) > self.options.max_pairs:
            subset = torch.randperm(len(matches), device=matches.index_a.device)[: self.options.max_pairs]
            matches = matches.select(subset)
        cells = maps_a[0, 0].numel()
        features_a = maps_a.flatten(2).transpose(1, 2)  # (B, N, C)
        features_b = maps_b.flatten(2).transpose(1, 2)
        channels = features_a.shape[-1]
        a_to_b = self.contrast(
            matches.gather_a(features_a),
            features_b.reshape(-1, channels),
            positive_index=matches.batch * cells + matches.index_b,
        )
        b_to_a = self.contrast(
            matches.gather_b(features_b),
            features_a.reshape(-1, channels),
            positive_index=matches.batch * cells + matches.index_a,
        )
        return 0.5 * (a_to_b + b_to_a)


def sample_view_pairs(
    volumes: Sequence[torch.Tensor] | torch.Tensor,
    crop_size: Sequence[int] = (64, 64, 64),
    scale_range: tuple[float, float] = (0.8, 1.25),
    max_shift: float = 0.25,
    intensity_jitter: float = 0.1,
    generator: torch.Generator | None = None,
) -> dict[str, torch.Tensor]:
    """Two overlapping, augmented crops of each volume with their recorded geometry.

    Per volume: a random centre voxel; view b's centre is shifted by up to ``max_shift`` crop
    sizes per axis; each view takes a box of ``crop_size * scale`` voxels (``scale`` uniform in
    ``scale_range``, isotropic, zero-padded outside the volume) resampled trilinearly to
    ``crop_size`` (``align_corners=False``, the geometry of :func:`~accord.matchers.crop_affine`),
    then gets a random intensity gain and offset of up to ``intensity_jitter``.

    Args:
        volumes: ``B`` volumes ``(C, D, H, W)`` (a list, or one ``(B, C, D, H, W)`` tensor).
        crop_size: the views' size ``(d, h, w)``.
        scale_range: ``(low, high)`` of the box-to-view size ratio.
        max_shift: largest centre offset between the views, as a fraction of ``crop_size``.
        intensity_jitter: largest relative gain change and absolute offset.
        generator: random source (CPU).

    Returns:
        ``{"view_a", "view_b"}`` ``(B, C, d, h, w)`` and ``{"affine_a", "affine_b"}``
        ``(B, 4, 4)`` float64 view-voxel-to-source-voxel affines.

    Raises:
        ValueError: no volume, a volume that is not 4-D, or bad ranges.
    """
    if isinstance(volumes, torch.Tensor):
        check_tensor(volumes, "volumes", ndim=5)
        volumes = list(volumes)
    if not isinstance(volumes, Sequence) or len(volumes) == 0:
        raise ValueError("volumes: expected a non-empty sequence of (C, D, H, W) tensors")
    size = tuple(crop_size)
    if len(size) != 3 or not all(isinstance(s, int) and s > 0 for s in size):
        raise ValueError(f"crop_size: expected 3 positive ints, got {crop_size!r}")
    low, high = scale_range
    if not 0.0 < low <= high:
        raise ValueError(f"scale_range: expected 0 < low <= high, got {scale_range!r}")
    if max_shift < 0.0 or intensity_jitter < 0.0:
        raise ValueError(f"max_shift, intensity_jitter: expected >= 0, got {max_shift!r}, {intensity_jitter!r}")
    crop = torch.tensor(size, dtype=torch.float64)
    views: dict[str, list[torch.Tensor]] = {"view_a": [], "view_b": [], "affine_a": [], "affine_b": []}
    for index, volume in enumerate(volumes):
        check_tensor(volume, f"volumes[{index}]", ndim=4, floating=True)
        shape = torch.tensor(volume.shape[1:], dtype=torch.float64)
        centre_a = torch.floor(torch.rand(3, generator=generator, dtype=torch.float64) * shape)
        shift = torch.round((2 * torch.rand(3, generator=generator, dtype=torch.float64) - 1) * max_shift * crop)
        centre_b = torch.minimum(torch.clamp(centre_a + shift, min=0), shape - 1)
        for name, centre in (("a", centre_a), ("b", centre_b)):
            scale = low + (high - low) * float(torch.rand((), generator=generator))
            extent = torch.clamp(torch.round(crop * scale), min=1)
            origin = centre - torch.div(extent, 2, rounding_mode="floor")
            box = crop_with_zero_padding(volume, origin.long().tolist(), extent.long().tolist())
            view = F.interpolate(box[None], size=size, mode="trilinear", align_corners=False)[0]
            gain, offset = intensity_jitter * (2 * torch.rand(2, generator=generator) - 1)
            views[f"view_{name}"].append(view * (1 + gain.item()) + offset.item())
            views[f"affine_{name}"].append(crop_affine(origin, extent, size))
    return {key: torch.stack(items) for key, items in views.items()}
