"""Anatomical embeddings (a small SAM) and Alice's anatomy-matched view mining."""

from __future__ import annotations

from accord_medssl.anatomy.embedding import (
    AnatomyEmbedding,
    Embedder,
    file_embedder,
    load_anatomy_embedding,
    load_embedding_volume,
)
from accord_medssl.anatomy.grid import cell_to_voxel, crop_with_zero_padding, embedding_grid_shape, voxel_to_cell
from accord_medssl.anatomy.miner import AnatomicalViewMiner, AnatomySearchIndex, MinedViews, match_points, similarity_map
from accord_medssl.anatomy.model import AnatomyEmbeddingModel, AnatomyEmbeddingOptions, model_embedder
from accord_medssl.anatomy.pretraining import (
    AnatomyEmbeddingPretraining,
    AnatomyPretrainingOptions,
    sample_view_pairs,
)

__all__ = [
    "AnatomicalViewMiner",
    "AnatomyEmbedding",
    "AnatomyEmbeddingModel",
    "AnatomyEmbeddingOptions",
    "AnatomyEmbeddingPretraining",
    "AnatomyPretrainingOptions",
    "AnatomySearchIndex",
    "Embedder",
    "MinedViews",
    "cell_to_voxel",
    "crop_with_zero_padding",
    "embedding_grid_shape",
    "file_embedder",
    "load_anatomy_embedding",
    "load_embedding_volume",
    "match_points",
    "model_embedder",
    "sample_view_pairs",
    "similarity_map",
    "voxel_to_cell",
]
