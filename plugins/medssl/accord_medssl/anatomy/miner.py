"""Alice's view mining: anatomy-matched crop pairs from two different volumes (medssl §1.3).

For a random foreground point of the query volume, the anchor point is the voxel of the other
volume whose anatomical embedding is most similar. One vectorised search scores a whole round of
candidate query points against every local cell of the anchor volume (one matrix product per map).
Two scorings (``scoring=``):

- ``"reference"`` (default; the reference's ``interfaces.find_point_in_vol``): the (unit-vector,
  as SAM's) global map is trilinearly upsampled to the local grid (``F.interpolate(...,
  mode="trilinear", align_corners=False)``) and re-normalised, on both sides; the score of a cell is
  ``(up_q . up_x + local_q . local_x) / 2`` with the query's vectors taken at its local cell. Since
  interpolation is linear, ``up_q . up_x`` is the upsampled map of the global-grid similarities
  divided by the norm of the upsampled (un-normalised) global vector at ``x``; that norm is
  computed once per volume (:attr:`AnatomySearchIndex.upsampled_global_norms`), so the search never
  builds the ``(C_g, *local_grid)`` upsampled map the reference recomputes on every try.
- ``"nearest"``: the global vector of a local cell is the global cell containing the cell's centre
  voxel (no interpolation); the earlier accord scoring, stricter on the same embeddings.

A pair is accepted when the score exceeds ``similarity_threshold`` (0.7). Otherwise new random
foreground points are tried, up to ``max_attempts`` points in all; if none passes, the best-scoring
attempt is used and flagged ``accepted=False`` (the reference silently keeps its last attempt).
Each sample of a batch gets its own point (the reference used sample 0's point for all, §1.13
bug 2).

Embeddings are prepared once per volume (:class:`AnatomySearchIndex`: L2-normalised, float16,
channel-last, the local map in blocks of ``LOCAL_BLOCK^3`` cells) and either kept in an LRU cache or
written to an embedding store and memory-mapped (:func:`store_embedder`). A search reads the
query's vectors at its candidate cells, the target's global map (small; with the reference scoring
also one float32 norm per local cell) and only the **local blocks that can still hold the best
match** (:func:`match_points`: branch and bound over blocks, exact), so its cost depends on the two
volumes and on how peaked the embedding is, never on how many volumes the dataset holds.
"""

from __future__ import annotations

import functools
import math
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F

from accord.utils.checks import check_tensor
from accord_medssl.anatomy.embedding import (
    STORE_SUFFIX,
    AnatomyEmbedding,
    Embedder,
    read_embedding_store,
    write_embedding_store,
)
from accord_medssl.anatomy.grid import (
    cell_to_voxel,
    check_stride,
    crop_with_zero_padding,
    embedding_grid_shape,
    voxel_to_cell,
)

__all__ = [
    "LOCAL_BLOCK",
    "SCORINGS",
    "AnatomicalViewMiner",
    "AnatomySearchIndex",
    "MatchResult",
    "MinedViews",
    "Scoring",
    "best_matches",
    "match_points",
    "search",
    "similarity_map",
    "store_embedder",
    "unravel_cells",
]

Scoring = Literal["reference", "nearest"]
#: The matching scores :func:`similarity_map` implements (module docstring).
SCORINGS: tuple[str, ...] = ("reference", "nearest")
#: Storage dtype of prepared vectors: unit vectors need no more than float16's 3 decimal digits.
VECTOR_DTYPE = torch.float16
#: Channels upsampled at once when computing the norms (bounds the temporary on large volumes).
_NORM_CHUNK_CHANNELS = 16
#: Local cells per block edge: the local map is stored and read in blocks of ``LOCAL_BLOCK^3``
#: cells (512 cells, 128 KiB at 128 float16 channels), the windows a search reads.
LOCAL_BLOCK = 8
#: Most blocks :func:`match_points` scores in one step (a float32 copy of at most 16 MiB at 128 channels).
MAX_BLOCKS_PER_STEP = 64
#: Added to every block's bound: float32 rounding of a 128-term dot product is far below it, so
#: a block is skipped only when no cell in it can reach the best score found.
_BOUND_SLACK = 1e-4


def _ravel(cells: torch.Tensor, grid: Sequence[int]) -> torch.Tensor:
    """C-order flat index of ``(..., 3)`` cells on ``grid``."""
    return (cells[..., 0] * grid[1] + cells[..., 1]) * grid[2] + cells[..., 2]


def unravel_cells(flat: torch.Tensor, grid: Sequence[int]) -> torch.Tensor:
    """``(..., 3)`` cells of C-order flat indices on a 3D ``grid``."""
    return torch.stack(torch.unravel_index(flat, tuple(grid)), dim=-1)


def _upsample(maps: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """``(C, *grid)`` -> ``(C, *size)``: the reference's trilinear upsampling (align_corners=False)."""
    return F.interpolate(maps[None], size=tuple(size), mode="trilinear", align_corners=False)[0]


def _upsampled_norms(
    global_vectors: torch.Tensor, global_grid: Sequence[int], local_grid: Sequence[int]
) -> torch.Tensor:
    """``(N_l,)`` float32 norm of the trilinearly upsampled global map at every local cell."""
    maps = global_vectors.float().T.reshape(-1, *global_grid)
    squares = torch.zeros(tuple(local_grid), device=maps.device)
    for chunk in maps.split(_NORM_CHUNK_CHANNELS):
        squares += _upsample(chunk, local_grid).square().sum(dim=0)
    return squares.sqrt().flatten()


@functools.lru_cache(maxsize=64)
def _linear_sources(size_in: int, size_out: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per output index: lower and upper source index and the upper weight of PyTorch's linear
    upsampling with ``align_corners=False`` (source ``(o + 0.5) in / out - 0.5``, clamped at 0)."""
    source = ((torch.arange(size_out, dtype=torch.float32) + 0.5) * (size_in / size_out) - 0.5).clamp(min=0)
    lower = source.floor().long().clamp(max=size_in - 1)
    return lower, (lower + 1).clamp(max=size_in - 1), source - lower


def _upsampled_vectors(
    global_vectors: torch.Tensor, global_grid: Sequence[int], local_grid: Sequence[int], cells: torch.Tensor
) -> torch.Tensor:
    """``(n, C_g)`` un-normalised upsampled global vectors at local ``cells`` ``(n, 3)`` (8 corners)."""
    axes = [
        [part.to(cells.device)[cells[:, axis]] for part in _linear_sources(global_grid[axis], local_grid[axis])]
        for axis in range(3)
    ]
    result = 0
    for corner in range(8):
        bits = [(corner >> (2 - axis)) & 1 for axis in range(3)]
        index = torch.stack([axes[axis][bits[axis]] for axis in range(3)], dim=-1)
        weight = math.prod(axes[axis][2] if bits[axis] else 1 - axes[axis][2] for axis in range(3))
        result = result + weight[:, None] * global_vectors[_ravel(index, global_grid)].float()
    return result


@functools.lru_cache(maxsize=64)
def _global_of_local(
    local_grid: tuple[int, ...], local_stride: tuple[int, ...], global_stride: tuple[int, ...],
    volume_shape: tuple[int, ...],
) -> torch.Tensor:
    """``(N_l,)`` flat global cell containing each local cell's centre voxel ("nearest" scoring)."""
    local_cells = unravel_cells(torch.arange(math.prod(local_grid)), local_grid)
    centres = cell_to_voxel(local_cells, local_stride, volume_shape)
    global_cells = voxel_to_cell(centres, global_stride, volume_shape)
    return _ravel(global_cells, embedding_grid_shape(volume_shape, global_stride))


def _blocked_shape(grid: Sequence[int]) -> tuple[int, int, int]:
    """Blocks of :data:`LOCAL_BLOCK` cells per axis that cover ``grid`` (the last ones padded)."""
    return tuple(-(-size // LOCAL_BLOCK) for size in grid)


def _to_blocks(values: torch.Tensor, grid: Sequence[int], fill: float) -> torch.Tensor:
    """``(n, N, *rest)`` values in C order over ``grid`` -> ``(n, num_blocks, LOCAL_BLOCK^3, *rest)``,
    blocks in C order, cells C order within a block, padding cells set to ``fill``."""
    blocks = _blocked_shape(grid)
    rest = values.shape[2:]
    volume = values.reshape(values.shape[0], *grid, -1)
    pad = [0, 0]
    for size, count in zip(reversed(grid), reversed(blocks)):
        pad += [0, count * LOCAL_BLOCK - size]
    volume = F.pad(volume, pad, value=fill)
    volume = volume.reshape(values.shape[0], blocks[0], LOCAL_BLOCK, blocks[1], LOCAL_BLOCK, blocks[2], LOCAL_BLOCK, -1)
    blocked = volume.permute(0, 1, 3, 5, 2, 4, 6, 7).reshape(values.shape[0], math.prod(blocks), LOCAL_BLOCK**3, -1)
    return blocked.reshape(*blocked.shape[:3], *rest)


def _from_blocks(blocked: torch.Tensor, grid: Sequence[int]) -> torch.Tensor:
    """Inverse of :func:`_to_blocks` for one volume: ``(num_blocks, LOCAL_BLOCK^3, C)`` -> ``(N, C)``."""
    blocks = _blocked_shape(grid)
    volume = blocked.reshape(*blocks, LOCAL_BLOCK, LOCAL_BLOCK, LOCAL_BLOCK, -1).permute(0, 3, 1, 4, 2, 5, 6)
    volume = volume.reshape(*(count * LOCAL_BLOCK for count in blocks), -1)
    return volume[: grid[0], : grid[1], : grid[2]].reshape(math.prod(grid), -1)


def _block_positions(cells: torch.Tensor, grid: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Block and position within the block of ``(n, 3)`` local cells."""
    block = torch.div(cells, LOCAL_BLOCK, rounding_mode="floor")
    within = cells - block * LOCAL_BLOCK
    return _ravel(block, _blocked_shape(grid)), _ravel(within, (LOCAL_BLOCK,) * 3)


def _cells_of_block_positions(block: torch.Tensor, position: torch.Tensor, grid: Sequence[int]) -> torch.Tensor:
    """C-order flat local cell of (block, position within it) pairs (inverse of :func:`_block_positions`)."""
    cells = unravel_cells(block, _blocked_shape(grid)) * LOCAL_BLOCK + unravel_cells(position, (LOCAL_BLOCK,) * 3)
    return _ravel(cells, grid)


@dataclass(frozen=True, eq=False)
class AnatomySearchIndex:
    """An embedding prepared for matching: L2-normalised float16 vectors, channel-last.

    Built in memory (:meth:`from_embedding`) or memory-mapped from an embedding store file
    (:meth:`open`); both give the same values, so matching does not depend on where it came from.
    The local map is kept in blocks of ``LOCAL_BLOCK^3`` cells (zero vectors pad the last blocks),
    the windows :func:`match_points` reads.

    Attributes:
        global_vectors: ``(N_g, C_g)`` over the global grid, C order.
        local_blocks: ``(num_blocks, LOCAL_BLOCK^3, C_l)``: blocks in C order over the local grid
            padded to whole blocks, cells in C order within a block.
        local_block_norms: ``(num_blocks,)`` float32 largest norm of a (float16) local vector in
            each block, for the bound of :func:`match_points`.
        upsampled_global_norms: ``(N_l,)`` float32 norm of the trilinearly upsampled
            ``global_vectors`` at each local cell, C order ("reference" scoring).
        global_stride: voxels per global cell along each axis.
        local_stride: voxels per local cell along each axis.
        volume_shape: the embedded volume's ``(D, H, W)``.
    """

    global_vectors: torch.Tensor
    local_blocks: torch.Tensor
    local_block_norms: torch.Tensor
    upsampled_global_norms: torch.Tensor
    global_stride: tuple[int, int, int]
    local_stride: tuple[int, int, int]
    volume_shape: tuple[int, int, int]

    @property
    def global_grid(self) -> tuple[int, int, int]:
        return embedding_grid_shape(self.volume_shape, self.global_stride)

    @property
    def local_grid(self) -> tuple[int, int, int]:
        return embedding_grid_shape(self.volume_shape, self.local_stride)

    @property
    def local_channels(self) -> int:
        return self.local_blocks.shape[2]

    @classmethod
    def from_embedding(cls, embedding: AnatomyEmbedding) -> AnatomySearchIndex:
        """Prepare ``embedding`` (the vectors stay on its device)."""
        global_vectors = F.normalize(embedding.global_map.flatten(1).T.float(), dim=1).to(VECTOR_DTYPE)
        local_grid = tuple(embedding.local_map.shape[1:])
        local_vectors = F.normalize(embedding.local_map.flatten(1).T.float(), dim=1).to(VECTOR_DTYPE)
        local_blocks = _to_blocks(local_vectors[None], local_grid, 0.0)[0]
        return cls(
            global_vectors=global_vectors,
            local_blocks=local_blocks,
            local_block_norms=local_blocks.float().norm(dim=2).amax(dim=1),
            upsampled_global_norms=_upsampled_norms(global_vectors, embedding.global_map.shape[1:], local_grid),
            global_stride=tuple(embedding.global_stride),
            local_stride=tuple(embedding.local_stride),
            volume_shape=tuple(embedding.volume_shape),
        )

    def save(self, path: str | Path) -> Path:
        """Write this index as an embedding store file (:func:`~accord_medssl.anatomy.write_embedding_store`)."""
        header = {"volume_shape": list(self.volume_shape), "global_stride": list(self.global_stride),
                  "local_stride": list(self.local_stride), "local_block": LOCAL_BLOCK}
        arrays = {name: getattr(self, name) for name in _STORE_ARRAYS}
        return write_embedding_store(path, header, {name: value.cpu().numpy() for name, value in arrays.items()})

    @classmethod
    def open(cls, path: str | Path) -> AnatomySearchIndex:
        """Memory-map a store file written by :meth:`save`; only the pages a search touches are read.

        Raises:
            ValueError: not a store file, another format version, a truncated file or arrays that
                do not fit the recorded geometry (the message names the file).
        """
        header, arrays = read_embedding_store(path)
        try:
            volume_shape = tuple(int(size) for size in header["volume_shape"])
            global_stride = check_stride(tuple(header["global_stride"]), "global_stride")
            local_stride = check_stride(tuple(header["local_stride"]), "local_stride")
            if header["local_block"] != LOCAL_BLOCK:
                raise ValueError(f"local blocks of {header['local_block']} cells, expected {LOCAL_BLOCK}")
            local_cells = math.prod(embedding_grid_shape(volume_shape, local_stride))
            blocks = math.prod(_blocked_shape(embedding_grid_shape(volume_shape, local_stride)))
            expected = {
                "global_vectors": (math.prod(embedding_grid_shape(volume_shape, global_stride)), None),
                "local_blocks": (blocks, LOCAL_BLOCK**3, None),
                "local_block_norms": (blocks,),
                "upsampled_global_norms": (local_cells,),
            }
            for name, shape in expected.items():
                actual = arrays[name].shape
                if len(actual) != len(shape) or any(e is not None and a != e for a, e in zip(actual, shape)):
                    raise ValueError(f"{name} has shape {actual}, expected {shape} for volume {volume_shape}")
        except (KeyError, TypeError, ValueError) as error:
            raise ValueError(f"{path}: corrupt anatomy-embedding store: {error}") from None
        return cls(
            **{name: torch.from_numpy(arrays[name]) for name in _STORE_ARRAYS},
            global_stride=global_stride,
            local_stride=local_stride,
            volume_shape=volume_shape,
        )

    def point_cells(self, points: torch.Tensor) -> torch.Tensor:
        """``(n, 3)`` local cells of voxel ``points`` ``(n, 3)``."""
        return voxel_to_cell(points, self.local_stride, self.volume_shape)

    def local_vectors_at(self, cells: torch.Tensor) -> torch.Tensor:
        """Float32 ``(n, C_l)`` local vectors at ``(n, 3)`` local cells (reads their blocks' rows only)."""
        block, position = _block_positions(cells.to(self.local_blocks.device), self.local_grid)
        return self.local_blocks[block, position].float()

    def local_vectors(self) -> torch.Tensor:
        """The whole local map, ``(N_l, C_l)`` float16 in C order over the local grid (reads every block)."""
        return _from_blocks(self.local_blocks, self.local_grid)

    def query_vectors(self, points: torch.Tensor, scoring: Scoring) -> tuple[torch.Tensor, torch.Tensor]:
        """Float32 global ``(n, C_g)`` and local ``(n, C_l)`` unit vectors at voxel ``points`` ``(n, 3)``."""
        local_cells = self.point_cells(points).to(self.local_blocks.device)
        local = self.local_vectors_at(local_cells)
        if scoring == "reference":
            upsampled = _upsampled_vectors(self.global_vectors, self.global_grid, self.local_grid, local_cells)
            return F.normalize(upsampled, dim=1), local
        global_cells = voxel_to_cell(points, self.global_stride, self.volume_shape).to(self.global_vectors.device)
        return self.global_vectors[_ravel(global_cells, self.global_grid)].float(), local

    def global_similarity(self, query_global: torch.Tensor, scoring: Scoring) -> torch.Tensor:
        """``(n, N_l)``: similarity of ``(n, C_g)`` unit query vectors with each local cell's global vector."""
        on_global_grid = query_global @ self.global_vectors.float().T  # (n, N_g)
        if scoring == "reference":
            upsampled = _upsample(on_global_grid.reshape(-1, *self.global_grid), self.local_grid).flatten(1)
            # F.normalize's eps: a cell whose upsampled vector vanishes scores 0, as in the reference.
            return upsampled / self.upsampled_global_norms.clamp_min(1e-12)
        lookup = _global_of_local(self.local_grid, self.local_stride, self.global_stride, self.volume_shape)
        return on_global_grid[:, lookup.to(on_global_grid.device)]


#: The arrays of a store file, in file order.
_STORE_ARRAYS = ("global_vectors", "local_blocks", "local_block_norms", "upsampled_global_norms")


def _check_compatible(source: AnatomySearchIndex, target: AnatomySearchIndex) -> None:
    for kind, source_dim, target_dim in (
        ("global", source.global_vectors.shape[1], target.global_vectors.shape[1]),
        ("local", source.local_channels, target.local_channels),
    ):
        if source_dim != target_dim:
            raise ValueError(f"target: {kind} embedding has {target_dim} channels, the source's has {source_dim}")


def _check_scoring(scoring: str) -> None:
    if scoring not in SCORINGS:
        raise ValueError(f"scoring: expected one of {SCORINGS}, got {scoring!r}")


def similarity_map(
    points: torch.Tensor, source: AnatomySearchIndex, target: AnatomySearchIndex, scoring: Scoring = "reference"
) -> torch.Tensor:
    """The matching score of each source point against every local cell of the target.

    ``(global_q . global_x + local_q . local_x) / 2`` with the global vectors of ``scoring``
    (module docstring): trilinearly upsampled and re-normalised (``"reference"``) or the global cell
    containing the local cell's centre (``"nearest"``). Reads the target's whole local map (for
    evaluation; mining uses :func:`match_points`, which reads only the blocks it needs).

    Args:
        points: voxel indices in the source volume.
        source: the source volume's index.
        target: the target volume's index (same embedding sizes as ``source``).
        scoring: ``"reference"`` or ``"nearest"``.

    Returns:
        Scores in ``[-1, 1]`` (up to float16 rounding) on the target's device, C-order over the
        target's local grid.

    Shape:
        points: ``(n, 3)``; output: ``(n, N_l)``.

    Raises:
        ValueError: points outside the source volume, embeddings of different sizes or an unknown
            scoring.
    """
    query_local, global_similarity = _query_similarities(points, source, target, scoring)
    return 0.5 * (query_local @ target.local_vectors().float().T + global_similarity)


def _query_similarities(
    points: torch.Tensor, source: AnatomySearchIndex, target: AnatomySearchIndex, scoring: Scoring
) -> tuple[torch.Tensor, torch.Tensor]:
    """The query points' local vectors ``(n, C_l)`` and global similarity over the target ``(n, N_l)``."""
    check_tensor(points, "points", shape=(None, 3), floating=False)
    _check_scoring(scoring)
    _check_compatible(source, target)
    query_global, query_local = source.query_vectors(points, scoring)
    device = target.local_blocks.device
    return query_local.to(device), target.global_similarity(query_global.to(device), scoring)


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
    local_cells = unravel_cells(best_cell, target.local_grid)
    return cell_to_voxel(local_cells, target.local_stride, target.volume_shape), best_score


@dataclass(frozen=True)
class MatchResult:
    """What :func:`search` found for ``n`` query points.

    Attributes:
        matched: ``(n, 3)`` long target voxels (centre voxel of the best local cell).
        scores: ``(n,)`` best scores.
        blocks_read: local blocks of the target read, summed over the points.
        blocks_total: the target's local blocks times ``n`` (what an exhaustive search reads).
    """

    matched: torch.Tensor
    scores: torch.Tensor
    blocks_read: int
    blocks_total: int


def _best_in_blocks(
    query_local: torch.Tensor, blocked_global: torch.Tensor, target: AnatomySearchIndex, blocks: torch.Tensor
) -> tuple[float, int]:
    """Best score and its C-order local cell among ``blocks`` for one query (lowest cell on ties)."""
    local = target.local_blocks[blocks].float() @ query_local  # (m, K)
    scores = 0.5 * (local + blocked_global[blocks])
    best = scores.max()
    block_rows, positions = (scores == best).nonzero(as_tuple=True)
    cells = _cells_of_block_positions(blocks[block_rows], positions, target.local_grid)
    return float(best), int(cells.min())


def search(
    points: torch.Tensor, source: AnatomySearchIndex, target: AnatomySearchIndex, scoring: Scoring = "reference"
) -> MatchResult:
    """:func:`match_points` with the count of local blocks it read (see there)."""
    query_local, global_similarity = _query_similarities(points, source, target, scoring)
    grid = target.local_grid
    # The global part of every cell's score, blockwise; padding cells score -inf.
    blocked_global = _to_blocks(global_similarity, grid, -math.inf)  # (n, B, K)
    num_blocks = blocked_global.shape[1]
    block_norms = target.local_block_norms.to(query_local.device).float()
    scores, cells, read = [], [], 0
    for row in range(len(points)):
        query = query_local[row]
        # No cell of a block scores above half its best global similarity plus |q| times its
        # longest local vector (Cauchy-Schwarz): visit blocks by that bound, stop below the best.
        bound = 0.5 * (blocked_global[row].amax(dim=1) + query.norm() * block_norms) + _BOUND_SLACK
        bound, order = bound.sort(descending=True)
        best, best_cell, start, step = -math.inf, 0, 0, 1
        while start < num_blocks and float(bound[start]) >= best:
            stop = min(start + step, num_blocks)
            # Within a step too, only blocks whose bound still reaches the best found so far.
            candidates = order[start:stop][bound[start:stop] >= best]
            score, cell = _best_in_blocks(query, blocked_global[row], target, candidates)
            read += len(candidates)
            if score > best or (score == best and cell < best_cell):
                best, best_cell = score, cell
            start, step = stop, min(2 * step, MAX_BLOCKS_PER_STEP)
        scores.append(best)
        cells.append(best_cell)
    best_cells = unravel_cells(torch.tensor(cells, device=query_local.device), grid)
    matched = cell_to_voxel(best_cells, target.local_stride, target.volume_shape)
    return MatchResult(
        matched=matched.to(points.device),
        scores=torch.tensor(scores, dtype=global_similarity.dtype, device=points.device),
        blocks_read=read,
        blocks_total=num_blocks * len(points),
    )


def match_points(
    points: torch.Tensor, source: AnatomySearchIndex, target: AnatomySearchIndex, scoring: Scoring = "reference"
) -> tuple[torch.Tensor, torch.Tensor]:
    """The best-matching target voxel of each source point: the argmax of :func:`similarity_map`,
    reading only the target's local blocks that can hold it.

    Exact branch and bound: each local block's best possible score is bounded by half its best
    global similarity (cheap: the global map is small) plus ``|q|`` times its longest local vector;
    blocks are read in order of that bound, in steps of 1, 2, 4, ... blocks, until the bound falls
    below the best score found. With an embedding that tells anatomy apart, a search reads a small
    share of the target's local map; the result is the exhaustive argmax (lowest cell on ties).

    Args:
        points: voxel indices in the source volume.
        source: the source volume's index.
        target: the target volume's index (same embedding sizes as ``source``).
        scoring: ``"reference"`` or ``"nearest"`` (:func:`similarity_map`).

    Returns:
        ``(matched, score)``: target voxel indices (the centre voxel of the best local cell) and
        the best :func:`similarity_map` score.

    Shape:
        points: ``(n, 3)``; matched: ``(n, 3)`` long on ``points``' device; score: ``(n,)``.

    Raises:
        ValueError: points outside the source volume, embeddings of different sizes or an unknown
            scoring.
    """
    result = search(points, source, target, scoring)
    return result.matched, result.scores


def store_embedder(directory: str | Path, fallback: Embedder | None = None, open_files: int = 256) -> Embedder:
    """An :data:`Embedder` backed by an embedding store: ``{directory}/{key}.anat``, memory-mapped.

    A key without a store file is embedded by ``fallback`` (a model, or ``.npy`` / NIfTI maps via
    :func:`~accord_medssl.anatomy.embedding.file_embedder`), prepared, written once and then
    memory-mapped like the others; without a fallback a missing file is an error.

    The last ``open_files`` mappings stay open (one file descriptor each, no memory of their own):
    a volume drawn again is searched through the same mapping, whose pages the kernel still maps,
    instead of being opened again and paying a page fault per page read (what makes a miss of the
    miner's small in-memory cache cheap on a large dataset).

    Returns:
        ``embedder(key, volume) -> AnatomySearchIndex``.
    """
    if isinstance(open_files, bool) or not isinstance(open_files, int) or open_files < 1:
        raise ValueError(f"open_files: expected a positive int, got {open_files!r}")
    root = Path(directory)
    opened: OrderedDict[str, AnatomySearchIndex] = OrderedDict()

    def embed(key: str, volume: torch.Tensor) -> AnatomySearchIndex:
        if key in opened:
            opened.move_to_end(key)
            return opened[key]
        path = root / f"{key}{STORE_SUFFIX}"
        if not path.is_file():
            if fallback is None:
                raise ValueError(f"{path}: no anatomy-embedding store file for volume {key!r}")
            prepared = fallback(key, volume)
            if not isinstance(prepared, AnatomySearchIndex):
                prepared = AnatomySearchIndex.from_embedding(prepared)
            prepared.save(path)
        opened[key] = AnatomySearchIndex.open(path)
        if len(opened) > open_files:
            opened.popitem(last=False)
        return opened[key]

    return embed


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
        embedder: ``embedder(key, volume)`` returning an :class:`AnatomyEmbedding` or a prepared
            :class:`AnatomySearchIndex` (:func:`model_embedder`, :func:`file_embedder`,
            :func:`store_embedder` or any callable); called once per key while it stays cached.
        crop_size: crop size per axis (64^3 in Alice).
        similarity_threshold: accept a pair when its score exceeds this (0.7 in Alice).
        max_attempts: query points tried per sample before falling back to the best one (the
            reference's loop allows about 100).
        candidates_per_round: the most query points matched together in one search; rounds start
            with one point and double up to this (1, 2, 4, ...), so a pair accepted on its first
            try (usual with the reference scoring) costs one point's search.
        foreground_threshold: query points are drawn among voxels above this intensity (0: the
            reference's "HU above the window's lower end" on [0, 1] windowed CT).
        cache_size: volumes whose prepared embeddings are kept (least recently used dropped; a
            memory-mapped store index costs only its mapping).
        scoring: ``"reference"`` (the reference's upsampled global map) or ``"nearest"``
            (:func:`similarity_map`).
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
        scoring: Scoring = "reference",
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
        _check_scoring(scoring)
        self.embedder = embedder
        self.crop_size = size
        self.similarity_threshold = similarity_threshold
        self.max_attempts = max_attempts
        self.candidates_per_round = candidates_per_round
        self.foreground_threshold = foreground_threshold
        self.cache_size = cache_size
        self.scoring = scoring
        self._cache: OrderedDict[str, AnatomySearchIndex] = OrderedDict()
        #: Running totals over every search: local blocks read, and what exhaustive searches would read.
        self.blocks_read = 0
        self.blocks_total = 0

    def search_index(self, key: str, volume: torch.Tensor) -> AnatomySearchIndex:
        """The prepared embedding of ``volume`` ``(1, D, H, W)``, from the cache or the embedder.

        Raises:
            ValueError: the embedder returned an embedding of another volume shape.
        """
        if key in self._cache:
            self._cache.move_to_end(key)
            return self._cache[key]
        embedded = self.embedder(key, volume)
        if tuple(embedded.volume_shape) != tuple(volume.shape[1:]):
            raise ValueError(
                f"embedder: returned an embedding of volume shape {tuple(embedded.volume_shape)} for "
                f"{key!r}, whose volume has shape {tuple(volume.shape[1:])}"
            )
        index = embedded if isinstance(embedded, AnatomySearchIndex) else AnatomySearchIndex.from_embedding(embedded)
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
        round_size = 1
        while attempts < self.max_attempts and not accepted:
            count = min(round_size, self.candidates_per_round, self.max_attempts - attempts)
            round_size *= 2
            picks = torch.randint(foreground.numel(), (count,), generator=generator).to(foreground.device)
            points = unravel_cells(foreground[picks], shape)
            result = search(points, query_index, anchor_index, self.scoring)
            matched, scores = result.matched, result.scores
            self.blocks_read += result.blocks_read
            self.blocks_total += result.blocks_total
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
