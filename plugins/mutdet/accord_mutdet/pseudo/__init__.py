"""Pseudo-labels for MutDet pretraining (step 1): class-agnostic proposals, object embeddings, pseudo-classes.

:func:`run_pseudolabel` (the ``pseudolabel`` task) writes ``<run_dir>/labels/<id>.npz`` files
(:mod:`accord_mutdet.pseudo.store`) that :class:`accord_mutdet.data.DetectionDataset` reads with
``pseudo_dir``.
"""

from accord_mutdet.pseudo.cluster import PseudoClassModel, fit_pseudo_classes, spherical_kmeans
from accord_mutdet.pseudo.embed import build_backbone, embed_boxes, rotated_crops
from accord_mutdet.pseudo.pipeline import PseudoLabelConfig, run_pseudolabel
from accord_mutdet.pseudo.proposals import (
    CocoRleSource,
    DotaBoxSource,
    FelzenszwalbSource,
    PngMaskSource,
    Proposals,
    ProposalSource,
    mask_to_le90,
)
from accord_mutdet.pseudo.store import read_pseudo_labels, write_pseudo_labels

__all__ = [
    "CocoRleSource", "DotaBoxSource", "FelzenszwalbSource", "PngMaskSource", "PseudoClassModel", "PseudoLabelConfig",
    "Proposals", "ProposalSource", "build_backbone", "embed_boxes", "fit_pseudo_classes", "mask_to_le90",
    "read_pseudo_labels", "rotated_crops", "run_pseudolabel", "spherical_kmeans", "write_pseudo_labels",
]
