"""Projection / prediction / DINO heads, a dense per-location head, and the EMA teacher."""

from accord.heads.ema import EMATeacher
from accord.heads.mlp import DenseProjectionHead, DINOHead, PredictionHead, ProjectionHead

__all__ = ["ProjectionHead", "PredictionHead", "DINOHead", "DenseProjectionHead", "EMATeacher"]
