"""Self-supervised training of :class:`AnatomyEmbeddingModel`, SAM-style (medssl §1.3).

SAM learns its embeddings from two augmented, overlapping crops of the *same* volume: voxels at
the same anatomical position must embed alike and unlike every other voxel, once for the coarse
global map and once for the fine local map. Here:

- :func:`sample_view_pairs` cuts the two crops (random centre, random shift, isotropic rescale,
  intensity jitter) and records each view's voxel-to-source affine (core
  :func:`~accord.matchers.crop_affine`);
- the correspondences between the two views' embedding cells come from the core
  :class:`~accord.matchers.CropOverlapMatcher` (``"nearest"`` mode) on those affines; a random
  subset of ``max_pairs`` matched cells per level are the queries, in both directions;
- each level's loss is an InfoNCE of each query against its matched cell, with negatives chosen
  by ``negatives``:

  - ``"all"`` (default): every cell of the other view across the batch is a negative, neighbours
    included (core :class:`~accord.losses.InfoNCELoss`);
  - ``"hard"`` (SAM): among the cells of *both* views of the same volume that lie farther than
    ``exclusion_radius`` cells from the query's position (a neighbour of the positive is the same
    anatomy, not a negative), the ``hard_negative_pool`` most similar ones, of which
    ``hard_negatives`` are drawn at random (hard and still diverse), plus ``batch_negatives``
    random cells of the *other* volumes of the batch. Similarity for the local map's mining is the
    miner's score, the mean of the global and local cosines, so the cells that the miner would
    confuse with the query are the ones pushed away; the global map mines on its own cosine.
    Loss: the core :func:`~accord.losses.info_nce` with per-row ``candidates`` (each query's own
    negatives, indexed among all cells of the batch).

``docs_alice.md`` ("Anatomy matching: measured") gives the numbers behind the defaults: a lower
temperature and more steps helped; hard negatives did not, at the quick benchmark's scale.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from accord.utils.checks import check_tensor
from accord.config import StrictModel
from accord.losses import InfoNCELoss, info_nce
from accord.matchers import CropOverlapMatcher, MatchResult, crop_affine
from accord_medssl.anatomy.grid import crop_with_zero_padding
from accord_medssl.anatomy.model import AnatomyEmbeddingModel, AnatomyEmbeddingOptions

__all__ = ["AnatomyEmbeddingPretraining", "AnatomyPretrainingOptions", "sample_view_pairs"]


class AnatomyPretrainingOptions(StrictModel):
    """Options of :class:`AnatomyEmbeddingPretraining`."""

    model: AnatomyEmbeddingOptions = Field(default_factory=AnatomyEmbeddingOptions)
    temperature: float = Field(
        0.1, gt=0.0, description="InfoNCE temperature (SAM's configs use 0.5; 0.1 matched anatomy better here)"
    )
    global_weight: float = Field(1.0, ge=0.0, description="weight of the global-map loss")
    local_weight: float = Field(1.0, ge=0.0, description="weight of the local-map loss")
    max_pairs: int = Field(
        512, ge=1, description="matched cells per level and batch used as queries (random subset; bounds cost)"
    )
    negatives: Literal["all", "hard"] = Field(
        "all",
        description="all: every cell of the other view across the batch (neighbours of the positive included); "
        "hard: SAM's mined negatives from both views of the volume plus random cells of other volumes "
        "(no better matching at the quick scale and about 4x slower per step, see docs_alice.md)",
    )
    hard_negatives: int = Field(100, ge=0, description="hard: mined negatives per query (drawn from the pool)")
    hard_negative_pool: int = Field(
        500, ge=1, description="hard: the most similar candidate cells the mined negatives are drawn from"
    )
    exclusion_radius: float = Field(
        2.0, ge=0.0, description="hard: cells within this many cells of the query's position are never negatives"
    )
    batch_negatives: int = Field(
        0, ge=0, description="hard: random cells of the other volumes of the batch added as negatives per query"
    )


def _check_affines(value: object, name: str, batch_size: int) -> torch.Tensor:
    return check_tensor(value, name, shape=(batch_size, 4, 4), floating=True)


def _cell_grid(grid: Sequence[int], device: torch.device) -> torch.Tensor:
    """``(N, 4)`` homogeneous float64 indices of every cell of ``grid``, in C (flatten) order."""
    axes = [torch.arange(size, dtype=torch.float64, device=device) for size in grid]
    cells = torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1).reshape(-1, len(grid))
    return torch.cat([cells, torch.ones(len(cells), 1, dtype=torch.float64, device=device)], dim=1)


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
        affines = (
            _check_affines(batch["affine_a"], "batch['affine_a']", batch_size),
            _check_affines(batch["affine_b"], "batch['affine_b']", batch_size),
        )
        # One pass over both views: BatchNorm statistics are shared, as in SAM's batches.
        global_maps, local_maps = self.model(torch.cat([view_a, view_b]))
        view_shape = tuple(view_a.shape[2:])
        if self.options.negatives == "all":
            global_loss = self._dense_loss(global_maps, affines, view_shape)
            local_loss = self._dense_loss(local_maps, affines, view_shape)
        else:
            # The local map mines with the miner's score, (global + local cosine) / 2: the global
            # map upsampled to the local grid by nearest neighbour (a local cell's global cell).
            global_at_local = F.interpolate(global_maps, size=local_maps.shape[2:], mode="nearest")
            global_loss = self._mined_loss(global_maps, global_maps, affines, view_shape)
            local_loss = self._mined_loss(local_maps, torch.cat([global_at_local, local_maps], dim=1), affines, view_shape)
        loss = self.options.global_weight * global_loss + self.options.local_weight * local_loss
        return {"loss": loss, "global": global_loss, "local": local_loss}

    def _cell_affines(
        self, maps: torch.Tensor, affines: tuple[torch.Tensor, torch.Tensor], view_shape: tuple[int, ...]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Each view's ``(B, 4, 4)`` embedding-cell-to-source affine for maps ``(2B, C, *grid)``."""
        # Embedding cell -> view voxel (stride = view / grid), then view voxel -> source voxel.
        cell_to_view = crop_affine(origin=(0, 0, 0), size=view_shape, grid_size=maps.shape[2:])
        cell_to_view = cell_to_view.to(affines[0].device)
        return affines[0].double() @ cell_to_view, affines[1].double() @ cell_to_view

    def _matches(self, cell_affines: tuple[torch.Tensor, torch.Tensor], grid: tuple[int, ...]) -> MatchResult:
        """Matched cells of the two views, at most ``max_pairs`` of them (a random subset)."""
        matches = self.matcher(affine_a=cell_affines[0], affine_b=cell_affines[1], grid_size_a=grid)
        if len(matches) > self.options.max_pairs:
            subset = torch.randperm(len(matches), device=matches.index_a.device)[: self.options.max_pairs]
            matches = matches.select(subset)
        return matches

    def _dense_loss(
        self, maps: torch.Tensor, affines: tuple[torch.Tensor, torch.Tensor], view_shape: tuple[int, ...]
    ) -> torch.Tensor:
        """Symmetric InfoNCE of matched cells against every cell of the other view across the batch.

        Args:
            maps: ``(2B, C, *grid)``, view a's maps then view b's.
            affines: each view's ``(B, 4, 4)`` voxel-to-source affine.
            view_shape: the views' spatial shape.
        """
        grid = tuple(maps.shape[2:])
        matches = self._matches(self._cell_affines(maps, affines, view_shape), grid)
        if len(matches) == 0:
            # Disjoint crops: a zero loss that keeps every parameter in the graph (DDP).
            return maps.sum() * 0.0
        maps_a, maps_b = maps.chunk(2)
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

    def _mined_loss(
        self,
        maps: torch.Tensor,
        mining_maps: torch.Tensor,
        affines: tuple[torch.Tensor, torch.Tensor],
        view_shape: tuple[int, ...],
    ) -> torch.Tensor:
        """InfoNCE of matched cells (both directions) against SAM-style mined negatives.

        Args:
            maps: ``(2B, C, *grid)``, view a's maps then view b's (what the loss trains).
            mining_maps: ``(2B, C', *grid)`` features whose cosine (divided by the number of
                unit-norm maps stacked in them, which does not change the ranking) ranks candidate
                negatives by hardness.
            affines: each view's ``(B, 4, 4)`` voxel-to-source affine.
            view_shape: the views' spatial shape.
        """
        options = self.options
        grid = tuple(maps.shape[2:])
        cell_affines = self._cell_affines(maps, affines, view_shape)
        matches = self._matches(cell_affines, grid)
        if len(matches) == 0:
            return maps.sum() * 0.0
        batch_size = maps.shape[0] // 2
        cells = maps[0, 0].numel()
        # Per volume, its 2N cells: view a's then view b's; features (B, 2N, C), positions (B, 2N, 3).
        features = maps.flatten(2).transpose(1, 2).reshape(2, batch_size, cells, -1).transpose(0, 1).flatten(1, 2)
        mining = mining_maps.flatten(2).transpose(1, 2).reshape(2, batch_size, cells, -1).transpose(0, 1).flatten(1, 2)
        homogeneous = _cell_grid(grid, maps.device)
        positions = torch.cat([homogeneous @ affine.transpose(1, 2) for affine in cell_affines], dim=1)[..., :3]
        # Queries in both directions: a -> b, then b -> a; indices into the volume's 2N cells.
        sample = torch.cat([matches.batch, matches.batch])
        query_cell = torch.cat([matches.index_a, matches.index_b + cells])
        positive_cell = torch.cat([matches.index_b + cells, matches.index_a])
        cell_stride = torch.tensor(view_shape, dtype=torch.float64, device=maps.device) / torch.tensor(grid, device=maps.device)
        radius = options.exclusion_radius * float(cell_stride.max())
        negative_cells = self._hard_negative_cells(mining, positions, sample, query_cell, positive_cell, radius)
        # Keys are all cells of the batch, volume by volume: cell c of volume b is key b * 2N + c.
        volume_cells = 2 * cells
        candidates = sample[:, None] * volume_cells + negative_cells  # (Q, K)
        if options.batch_negatives and batch_size > 1:
            # Uniform over the other volumes' cells: skip the query's own volume by an offset.
            draw = torch.randint((batch_size - 1) * volume_cells, (len(sample), options.batch_negatives), device=maps.device)
            other_sample = (sample[:, None] + 1 + torch.div(draw, volume_cells, rounding_mode="floor")) % batch_size
            candidates = torch.cat([candidates, other_sample * volume_cells + draw % volume_cells], dim=1)
        return info_nce(
            features[sample, query_cell],
            features.flatten(0, 1),
            positive_index=sample * volume_cells + positive_cell,
            candidates=candidates,
            temperature=options.temperature,
        )

    @torch.no_grad()
    def _hard_negative_cells(
        self,
        mining: torch.Tensor,
        positions: torch.Tensor,
        sample: torch.Tensor,
        query_cell: torch.Tensor,
        positive_cell: torch.Tensor,
        radius: float,
    ) -> torch.Tensor:
        """Per query, ``hard_negatives`` cells drawn from the ``hard_negative_pool`` most similar ones.

        Candidates are the 2N cells of the query's own volume (both views) farther than ``radius``
        source voxels from the query cell's position; the query and positive cells are never
        candidates. When fewer candidates remain for some query, pool and draw shrink to fit all.

        Args:
            mining: ``(B, 2N, C')`` features ranking the candidates.
            positions: ``(B, 2N, 3)`` source-voxel position of every cell.
            sample: ``(Q,)`` volume of each query.
            query_cell: ``(Q,)`` query cell among its volume's 2N cells.
            positive_cell: ``(Q,)`` positive cell among its volume's 2N cells.
            radius: exclusion radius in source voxels.

        Returns:
            ``(Q, K)`` long cell indices among the volume's 2N cells (``K`` may be 0).
        """
        options = self.options
        query_mining = mining[sample, query_cell]  # (Q, C')
        # One volume at a time keeps the similarity block (queries of the volume) x (its 2N cells).
        similarity = torch.empty(len(sample), mining.shape[1], dtype=mining.dtype, device=mining.device)
        for volume in range(mining.shape[0]):
            rows = (sample == volume).nonzero().squeeze(1)
            if rows.numel() == 0:
                continue
            block = query_mining[rows] @ mining[volume].T
            near = torch.cdist(positions[volume, query_cell[rows]], positions[volume]) <= radius
            similarity[rows] = block.masked_fill(near, float("-inf"))
        rows = torch.arange(len(sample), device=mining.device)
        similarity[rows, query_cell] = float("-inf")
        similarity[rows, positive_cell] = float("-inf")
        available = int(torch.isfinite(similarity).sum(dim=1).min())
        pool = min(options.hard_negative_pool, available)
        count = min(options.hard_negatives, pool)
        hardest = similarity.topk(pool, dim=1).indices
        draw = torch.rand(len(sample), pool, device=mining.device).argsort(dim=1)[:, :count]
        return hardest.gather(1, draw)


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
