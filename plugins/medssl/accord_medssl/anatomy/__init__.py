"""Anatomical embeddings (a small SAM) and Alice's anatomy-matched view mining."""

from __future__ import annotations

from accord_medssl.anatomy.embedding import (
    AnatomyEmbedding,
    Embedder,
    file_embedder,
    load_anatomy_embedding,
    load_embedding_volume,
    read_embedding_store,
    write_embedding_store,
)
from accord_medssl.anatomy.grid import cell_to_voxel, crop_with_zero_padding, embedding_grid_shape, voxel_to_cell
from accord_medssl.anatomy.miner import (
    SCORINGS,
    AnatomicalViewMiner,
    AnatomySearchIndex,
    MatchResult,
    MinedViews,
    Scoring,
    match_points,
    search,
    similarity_map,
    store_embedder,
)
from accord_medssl.anatomy.model import AnatomyEmbeddingModel, AnatomyEmbeddingOptions, model_embedder
from accord_medssl.anatomy.pretraining import (
    AnatomyEmbeddingPretraining,
    AnatomyPretrainingOptions,
    sample_view_pairs,
)

__all__ = [
    "SCORINGS",
    "AnatomicalViewMiner",
    "AnatomyEmbedding",
    "AnatomyEmbeddingModel",
    "AnatomyEmbeddingOptions",
    "AnatomyEmbeddingPretraining",
    "AnatomyPretrainingOptions",
    "AnatomySearchIndex",
    "Embedder",
    "MatchResult",
    "MinedViews",
    "Scoring",
    "cell_to_voxel",
    "crop_with_zero_padding",
    "embedding_grid_shape",
    "file_embedder",
    "load_anatomy_embedding",
    "load_embedding_volume",
    "match_points",
    "model_embedder",
    "read_embedding_store",
    "sample_view_pairs",
    "search",
    "similarity_map",
    "store_embedder",
    "voxel_to_cell",
    "write_embedding_store",
]
