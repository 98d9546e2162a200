"""Alice's view mining: anatomy-matched crop pairs from two different volumes (medssl §1.3).

For a random foreground point of the query volume, the anchor point is the voxel of the other
volume whose anatomical embedding is most similar. The embedding of a point is its global and
local vectors concatenated; with both L2-normalised, the cosine of the concatenations is
``(global_q . global_x + local_q . local_x) / 2``, the reference's score. One vectorised search
covers every anchor voxel at the local grid's resolution:

- the global similarities are computed on the (small) global grid and looked up for each local
  cell through the global cell containing the local cell's centre voxel (coarse-to-fine without
  upsampling the global map);
- a whole round of candidate query points is matched with one matrix product.

A pair is accepted when the score exceeds ``similarity_threshold`` (0.7). Otherwise new random
foreground points are tried, up to ``max_attempts`` points in all; if none passes, the best-scoring
attempt is used and flagged ``accepted=False`` (the reference silently keeps its last attempt).
Each sample of a batch gets its own point (the reference used sample 0's point for all, §1.13
bug 2). Embeddings are computed once per volume key and kept in an LRU cache.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from accord.utils.checks import check_tensor
from accord_medssl.anatomy.embedding import AnatomyEmbedding, Embedder
from accord_medssl.anatomy.grid import cell_to_voxel, crop_with_zero_padding, voxel_to_cell

__all__ = [
    "AnatomicalViewMiner",
    "AnatomySearchIndex",
    "MinedViews",
    "best_matches",
    "match_points",
    "similarity_map",
    "unravel_cells",
]


def _ravel(cells: torch.Tensor, grid: Sequence[int]) -> torch.Tensor:
    """C-order flat index of ``(..., 3)`` cells on ``grid``."""
    return (cells[..., 0] * grid[1] + cells[..., 1]) * grid[2] + cells[..., 2]


def unravel_cells(flat: torch.Tensor, grid: Sequence[int]) -> torch.Tensor:
    """``(..., 3)`` cells of C-order flat indices on a 3D ``grid``."""
    return torch.stack(torch.unravel_index(flat, tuple(grid)), dim=-1)


@dataclass(frozen=True)
class AnatomySearchIndex:
    """An embedding prepared for matching: flattened, normalised maps and the local-to-global lookup.

    Attributes:
        embedding: the source embedding (its geometry).
        global_vectors: ``(N_g, C_g)`` L2-normalised, C-order over the global grid.
        local_vectors: ``(N_l, C_l)`` L2-normalised, C-order over the local grid.
        global_of_local: ``(N_l,)`` flat global cell containing each local cell's centre voxel.
    """

    embedding: AnatomyEmbedding
    global_vectors: torch.Tensor
    local_vectors: torch.Tensor
    global_of_local: torch.Tensor

    @classmethod
    def from_embedding(cls, embedding: AnatomyEmbedding) -> AnatomySearchIndex:
        """Prepare ``embedding`` (maps stay on their device)."""
        local_grid = tuple(embedding.local_map.shape[1:])
        global_grid = tuple(embedding.global_map.shape[1:])
        flat_local = torch.arange(embedding.local_map[0].numel(), device=embedding.local_map.device)
        local_cells = unravel_cells(flat_local, local_grid)
        centres = cell_to_voxel(local_cells, embedding.local_stride, embedding.volume_shape)
        global_cells = voxel_to_cell(centres, embedding.global_stride, embedding.volume_shape)
        return cls(
            embedding=embedding,
            global_vectors=F.normalize(embedding.global_map.flatten(1).T.float(), dim=1),
            local_vectors=F.normalize(embedding.local_map.flatten(1).T.float(), dim=1),
            global_of_local=_ravel(global_cells, global_grid).to(embedding.global_map.device),
        )

    def point_vectors(self, points: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Global ``(n, C_g)`` and local ``(n, C_l)`` vectors at voxel ``points`` ``(n, 3)``."""
        embedding = self.embedding
        local_cells = voxel_to_cell(points, embedding.local_stride, embedding.volume_shape)
        global_cells = voxel_to_cell(points, embedding.global_stride, embedding.volume_shape)
        local_index = _ravel(local_cells, embedding.local_map.shape[1:]).to(self.local_vectors.device)
        global_index = _ravel(global_cells, embedding.global_map.shape[1:]).to(self.global_vectors.device)
        return self.global_vectors[global_index], self.local_vectors[local_index]


def _check_compatible(source: AnatomySearchIndex, target: AnatomySearchIndex) -> None:
    for kind in ("global", "local"):
        source_dim = getattr(source, f"{kind}_vectors").shape[1]
        target_dim = getattr(target, f"{kind}_vectors").shape[1]
        if source_dim != target_dim:
            raise ValueError(f"target: {kind} embedding has {target_dim} channels, the source's has {source_dim}")


def similarity_map(points: torch.Tensor, source: AnatomySearchIndex, target: AnatomySearchIndex) -> torch.Tensor:
    """The matching score of each source point against every local cell of the target.

    The score is the cosine of the concatenated global + local embeddings,
    ``(global_q . global_{cell(x)} + local_q . local_x) / 2``, with the global similarities taken
    on the global grid and looked up per local cell.

    Args:
        points: voxel indices in the source volume.
        source: the source volume's index.
        target: the target volume's index (same embedding sizes as ``source``).

    Returns:
        Scores in ``[-1, 1]`` on the target's device, C-order over the target's local grid.

    Shape:
        points: ``(n, 3)``; output: ``(n, N_l)``.

    Raises:
        ValueError: points outside the source volume or embeddings of different sizes.
    """
    check_tensor(points, "points", shape=(None, 3), floating=False)
    _check_compatible(source, target)
    query_global, query_local = source.point_vectors(points)
    device = target.local_vectors.device
    global_similarity = query_global.to(device) @ target.global_vectors.T  # (n, N_g)
    local_similarity = query_local.to(device) @ target.local_vectors.T  # (n, N_l)
    return 0.5 * (local_similarity + global_similarity[:, target.global_of_local])


def best_matches(scores: torch.Tensor, target: AnatomySearchIndex) -> tuple[torch.Tensor, torch.Tensor]:
    """The best-scoring target voxel of each row of a :func:`similarity_map`.

    Args:
        scores: ``(n, N_l)`` scores over the target's local grid.
        target: the index the scores were computed against.

    Returns:
        ``(matched, score)``: ``(n, 3)`` long voxel indices (the centre voxel of the best local
        cell) and ``(n,)`` best scores, on ``scores``' device.
    """
    best_score, best_cell = scores.max(dim=1)
    embedding = target.embedding
    local_cells = unravel_cells(best_cell, embedding.local_map.shape[1:])
    return cell_to_voxel(local_cells, embedding.local_stride, embedding.volume_shape), best_score


def match_points(
    points: torch.Tensor, source: AnatomySearchIndex, target: AnatomySearchIndex
) -> tuple[torch.Tensor, torch.Tensor]:
    """The best-matching target voxel of each source point, by one vectorised similarity search.

    Args:
        points: voxel indices in the source volume.
        source: the source volume's index.
        target: the target volume's index (same embedding sizes as ``source``).

    Returns:
        ``(matched, score)``: target voxel indices (the centre voxel of the best local cell) and
        the cosine similarity of the concatenated global + local embeddings, in ``[-1, 1]``
        (:func:`similarity_map`).

    Shape:
        points: ``(n, 3)``; matched: ``(n, 3)`` long on ``points``' device; score: ``(n,)``.

    Raises:
        ValueError: points outside the source volume or embeddings of different sizes.
    """
    matched, best_score = best_matches(similarity_map(points, source, target), target)
    return matched.to(points.device), best_score.to(points.device)


@dataclass(frozen=True)
class MinedViews:
    """A batch of anatomy-matched crop pairs.

    Attributes:
        query: crops of the query volumes, ``(B, 1, *crop_size)``, zero outside the volume.
        anchor: crops of the anchor volumes, same shape.
        query_points: crop centres in the query volumes, ``(B, 3)`` voxel indices.
        anchor_points: matched centres in the anchor volumes, ``(B, 3)``.
        query_boxes: ``(B, 2, 3)`` ``[start, stop)`` voxel box of each query crop (may leave the volume).
        anchor_boxes: ``(B, 2, 3)`` boxes of the anchor crops.
        scores: ``(B,)`` similarity of each pair.
        accepted: ``(B,)`` bool, whether the score passed the threshold.
        attempts: ``(B,)`` query points tried per sample.
    """

    query: torch.Tensor
    anchor: torch.Tensor
    query_points: torch.Tensor
    anchor_points: torch.Tensor
    query_boxes: torch.Tensor
    anchor_boxes: torch.Tensor
    scores: torch.Tensor
    accepted: torch.Tensor
    attempts: torch.Tensor

    def as_batch(self) -> dict[str, torch.Tensor]:
        """The fields as a dict (``"query"`` and ``"anchor"`` are what :class:`AliceModel` reads)."""
        return dict(vars(self))


class AnatomicalViewMiner:
    """Mine Alice's query / anchor crop pairs with anatomical embeddings.

    Args:
        embedder: ``embedder(key, volume) -> AnatomyEmbedding`` (:func:`model_embedder`,
            :func:`file_embedder` or any callable); called once per key while it stays cached.
        crop_size: crop size per axis (64^3 in Alice).
        similarity_threshold: accept a pair when its score exceeds this (0.7 in Alice).
        max_attempts: query points tried per sample before falling back to the best one (the
            reference's loop allows about 100).
        candidates_per_round: query points matched together in one search.
        foreground_threshold: query points are drawn among voxels above this intensity (0: the
            reference's "HU above the window's lower end" on [0, 1] windowed CT).
        cache_size: volumes whose prepared embeddings are kept (least recently used dropped).
    """

    def __init__(
        self,
        embedder: Embedder,
        crop_size: Sequence[int] = (64, 64, 64),
        similarity_threshold: float = 0.7,
        max_attempts: int = 100,
        candidates_per_round: int = 10,
        foreground_threshold: float = 0.0,
        cache_size: int = 16,
    ) -> None:
        if not callable(embedder):
            raise ValueError(f"embedder: expected a callable (key, volume) -> AnatomyEmbedding, got {embedder!r}")
        size = tuple(crop_size)
        if len(size) != 3 or not all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in size):
            raise ValueError(f"crop_size: expected 3 positive ints, got {crop_size!r}")
        if not -1.0 <= similarity_threshold < 1.0:
            raise ValueError(f"similarity_threshold: expected a cosine in [-1, 1), got {similarity_threshold!r}")
        counts = {"max_attempts": max_attempts, "candidates_per_round": candidates_per_round, "cache_size": cache_size}
        for name, value in counts.items():
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}: expected a positive int, got {value!r}")
        self.embedder = embedder
        self.crop_size = size
        self.similarity_threshold = similarity_threshold
        self.max_attempts = max_attempts
        self.candidates_per_round = candidates_per_round
        self.foreground_threshold = foreground_threshold
        self.cache_size = cache_size
        self._cache: OrderedDict[str, AnatomySearchIndex] = OrderedDict()

    def search_index(self, key: str, volume: torch.Tensor) -> AnatomySearchIndex:
        """The prepared embedding of ``volume`` ``(1, D, H, W)``, from the cache or the embedder.

        Raises:
            ValueError: the embedder returned an embedding of another volume shape.
        """
        if key in self._cache:
            self._cache.move_to_end(key)
            return self._cache[key]
        embedding = self.embedder(key, volume)
        if tuple(embedding.volume_shape) != tuple(volume.shape[1:]):
            raise ValueError(
                f"embedder: returned an embedding of volume shape {tuple(embedding.volume_shape)} for "
                f"{key!r}, whose volume has shape {tuple(volume.shape[1:])}"
            )
        index = AnatomySearchIndex.from_embedding(embedding)
        self._cache[key] = index
        if len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)
        return index

    def mine(
        self,
        query_volumes: Sequence[torch.Tensor],
        anchor_volumes: Sequence[torch.Tensor],
        query_keys: Sequence[str],
        anchor_keys: Sequence[str],
        generator: torch.Generator | None = None,
    ) -> MinedViews:
        """One matched crop pair per sample.

        Args:
            query_volumes: ``B`` volumes ``(1, D, H, W)`` (shapes may differ between samples).
            anchor_volumes: ``B`` other volumes ``(1, D', H', W')`` (Alice: the previous batch's).
            query_keys: cache keys of the query volumes (e.g. case names).
            anchor_keys: cache keys of the anchor volumes.
            generator: CPU random source of the query points.

        Returns:
            The crops, points, boxes and scores.

        Raises:
            ValueError: mismatched lengths, a volume that is not ``(1, D, H, W)``, a crop larger
                than a volume, a query volume without foreground, or an embedding that does not
                fit its volume.
        """
        count = len(query_volumes)
        if count == 0:
            raise ValueError("query_volumes: expected at least one volume")
        others = {"anchor_volumes": anchor_volumes, "query_keys": query_keys, "anchor_keys": anchor_keys}
        for name, values in others.items():
            if len(values) != count:
                raise ValueError(f"{name}: expected {count} entries (one per query volume), got {len(values)}")
        results = [
            self._mine_one(
                index, query_volumes[index], anchor_volumes[index], query_keys[index], anchor_keys[index], generator
            )
            for index in range(count)
        ]
        return MinedViews(**{field: torch.stack([result[field] for result in results]) for field in results[0]})

    def _check_volume(self, volume: torch.Tensor, name: str) -> None:
        check_tensor(volume, name, shape=(1, None, None, None), floating=True)
        if any(crop > size for crop, size in zip(self.crop_size, volume.shape[1:])):
            raise ValueError(f"crop_size: {self.crop_size} is larger than {name} of shape {tuple(volume.shape[1:])}")

    def _mine_one(
        self,
        sample: int,
        query_volume: torch.Tensor,
        anchor_volume: torch.Tensor,
        query_key: str,
        anchor_key: str,
        generator: torch.Generator | None,
    ) -> dict[str, torch.Tensor]:
        self._check_volume(query_volume, f"query_volumes[{sample}]")
        self._check_volume(anchor_volume, f"anchor_volumes[{sample}]")
        query_index = self.search_index(query_key, query_volume)
        anchor_index = self.search_index(anchor_key, anchor_volume)
        foreground = (query_volume[0] > self.foreground_threshold).flatten().nonzero().squeeze(1)
        if foreground.numel() == 0:
            raise ValueError(
                f"query_volumes[{sample}]: no voxel above foreground_threshold={self.foreground_threshold}"
            )
        shape = tuple(query_volume.shape[1:])
        best: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
        attempts = 0
        accepted = False
        while attempts < self.max_attempts and not accepted:
            count = min(self.candidates_per_round, self.max_attempts - attempts)
            picks = torch.randint(foreground.numel(), (count,), generator=generator).to(foreground.device)
            points = unravel_cells(foreground[picks], shape)
            matched, scores = match_points(points, query_index, anchor_index)
            passing = (scores > self.similarity_threshold).nonzero()
            # The first passing candidate, as if the points had been tried one after another.
            choice = int(passing[0]) if passing.numel() else int(scores.argmax())
            accepted = passing.numel() > 0
            attempts += choice + 1 if accepted else count
            if accepted or best is None or scores[choice] > best[2]:
                best = (points[choice], matched[choice], scores[choice])
        query_point, anchor_point, score = best
        size = torch.tensor(self.crop_size, device=query_point.device)
        query_start = query_point - size // 2
        anchor_start = anchor_point - size // 2
        return {
            "query": crop_with_zero_padding(query_volume, query_start.tolist(), self.crop_size),
            "anchor": crop_with_zero_padding(anchor_volume, anchor_start.tolist(), self.crop_size),
            "query_points": query_point,
            "anchor_points": anchor_point,
            "query_boxes": torch.stack([query_start, query_start + size]),
            "anchor_boxes": torch.stack([anchor_start, anchor_start + size]),
            "scores": score,
            "accepted": torch.tensor(accepted, device=score.device),
            "attempts": torch.tensor(attempts, device=score.device),
        }
