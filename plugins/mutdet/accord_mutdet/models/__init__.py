"""The detector: ARS-DETR-style rotated deformable DETR with MutDet's pretraining additions."""

from accord_mutdet.models.detector import CLASS_HEAD_PREFIXES, MUTDET_PREFIX, RotatedDETR
from accord_mutdet.models.options import DetectorOptions, MutDetOptions

__all__ = ["CLASS_HEAD_PREFIXES", "MUTDET_PREFIX", "DetectorOptions", "MutDetOptions", "RotatedDETR"]
