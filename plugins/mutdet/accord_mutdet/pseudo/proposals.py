"""Class-agnostic proposals (step 1.2-1.3 of MutDet) behind one interface.

A proposal source is called as ``source(record, image) -> Proposals`` with the image record and its
RGB uint8 pixels ``(H, W, 3)``. Sources:

* :class:`PngMaskSource`: instance masks from PNG files ``<dir>/<id>.png`` (pixel value k > 0 =
  instance k; 8 or 16 bit), e.g. ``accord data synth mutdet``'s ``Masks`` / ``masks`` folders or
  any segmenter run elsewhere;
* :class:`CocoRleSource`: SAM's automatic-mask-generator output as written by its
  ``--convert-to-rle`` option: ``<dir>/<id>.json``, a list of ``{"segmentation": {"size": [h, w],
  "counts": ...}, "predicted_iou": ...}`` (decoded with pycocotools, COCO's own RLE codec);
* :class:`DotaBoxSource`: ready-made boxes as DOTA label files ``<dir>/<id>.txt`` (any class
  names, e.g. the reference's ``SAMObject`` files);
* :class:`FelzenszwalbSource`: the built-in source that needs no download: scikit-image's
  Felzenszwalb-Huttenlocher graph segmentation. Chosen over SLIC because its regions follow colour
  edges and their number adapts to the image, so a whole object tends to become one region, while
  SLIC tiles the image into compact superpixels of about one size that cut large objects apart and
  turn plain ground into many object-like squares; it is also the segmentation that selective
  search (DETReg's proposals) starts from. Regions covering more than ``max_area_fraction`` of the
  image (ground, water) or fewer than ``min_area`` pixels are dropped.

Masks become le90 boxes as in the reference (step 1.3): the largest external contour (most points,
``cv2.findContours`` with ``RETR_EXTERNAL`` / ``CHAIN_APPROX_NONE``), then ``cv2.minAreaRect``.
Its corners go through :func:`accord.boxes.corners_to_le90`, so the angle convention does not
depend on the OpenCV version.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import torch

from accord.boxes import corners_to_le90
from accord_mutdet.data.dota import parse_dota_labels
from accord_mutdet.data.records import ImageRecord, polygons_to_boxes


@dataclass
class Proposals:
    """Class-agnostic boxes of one image: ``boxes`` float32 ``(N, 5)`` le90 pixels, ``scores`` ``(N,)``."""

    boxes: np.ndarray
    scores: np.ndarray

    @classmethod
    def empty(cls) -> Proposals:
        return cls(np.zeros((0, 5), np.float32), np.zeros(0, np.float32))


class ProposalSource(Protocol):
    """What the pseudo-label pipeline calls for each image."""

    def __call__(self, record: ImageRecord, image: np.ndarray) -> Proposals: ...


def mask_to_le90(mask: np.ndarray) -> np.ndarray | None:
    """le90 box ``(5,)`` of a binary mask ``(H, W)``, or None for an empty mask.

    OpenCV's contour points are pixel centres (integers); boxes use pixel edges (pixel ``i`` covers
    ``[i, i + 1)``), so the rectangle is shifted by half a pixel and grown by one pixel in ``w`` and
    ``h``: a mask of ``w x h`` axis-aligned pixels gives a ``w x h`` box.
    """
    import cv2

    contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
    if not contours:
        return None
    largest = max(contours, key=len)
    corners = cv2.boxPoints(cv2.minAreaRect(largest)).astype(np.float64) + 0.5
    box = corners_to_le90(torch.from_numpy(corners)).numpy()
    box[2:4] += 1.0
    return box.astype(np.float32)


def masks_to_proposals(masks: list[np.ndarray], scores: list[float]) -> Proposals:
    """Binary masks (each ``(H, W)``) and their scores to :class:`Proposals` (empty masks dropped)."""
    boxes, kept = [], []
    for mask, score in zip(masks, scores):
        box = mask_to_le90(mask)
        if box is not None:
            boxes.append(box)
            kept.append(score)
    if not boxes:
        return Proposals.empty()
    return Proposals(np.stack(boxes).astype(np.float32), np.asarray(kept, np.float32))


def instance_map_to_proposals(instances: np.ndarray) -> Proposals:
    """An instance-id image ``(H, W)`` (0 = background) to proposals, in increasing id order, score 1."""
    ids = [int(i) for i in np.unique(instances) if i != 0]
    return masks_to_proposals([instances == i for i in ids], [1.0] * len(ids))


@dataclass
class PngMaskSource:
    """Instance-id PNGs ``<mask_dir>/<id>.png`` (0 = background)."""

    mask_dir: Path

    def __call__(self, record: ImageRecord, image: np.ndarray) -> Proposals:
        import cv2

        path = Path(self.mask_dir) / f"{record.id}.png"
        instances = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
        if instances is None:
            raise FileNotFoundError(f"{path}: instance mask PNG missing or unreadable (expected one per image)")
        if instances.ndim != 2 or instances.shape != image.shape[:2]:
            raise ValueError(f"{path}: expected a single-channel {image.shape[1]}x{image.shape[0]} instance-id image, "
                             f"got shape {instances.shape}")
        return instance_map_to_proposals(instances)


@dataclass
class CocoRleSource:
    """SAM-style per-image JSON lists of COCO-RLE masks ``<json_dir>/<id>.json``."""

    json_dir: Path

    def __call__(self, record: ImageRecord, image: np.ndarray) -> Proposals:
        from pycocotools import mask as mask_utils

        path = Path(self.json_dir) / f"{record.id}.json"
        try:
            entries = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise ValueError(f"{path}: unreadable mask JSON ({exc})") from exc
        if isinstance(entries, dict):
            entries = entries.get("annotations", entries.get("masks"))
        if not isinstance(entries, list):
            raise ValueError(f"{path}: expected a list of {{'segmentation': {{'size', 'counts'}}}} entries")
        masks, scores = [], []
        for number, entry in enumerate(entries):
            rle = entry.get("segmentation") if isinstance(entry, dict) else None
            if not isinstance(rle, dict) or "size" not in rle or "counts" not in rle:
                raise ValueError(f"{path}: entry {number} has no COCO-RLE 'segmentation' with 'size' and 'counts'")
            if list(rle["size"]) != list(image.shape[:2]):
                raise ValueError(f"{path}: entry {number} mask size {rle['size']} differs from the image's "
                                 f"{list(image.shape[:2])}")
            if isinstance(rle["counts"], list):  # uncompressed RLE
                rle = mask_utils.frPyObjects(rle, *rle["size"])
            masks.append(mask_utils.decode(rle).astype(bool))
            scores.append(float(entry.get("predicted_iou", entry.get("score", 1.0))))
        return masks_to_proposals(masks, scores)


@dataclass
class DotaBoxSource:
    """Boxes from DOTA label files ``<label_dir>/<id>.txt`` (any class name; score 1)."""

    label_dir: Path

    def __call__(self, record: ImageRecord, image: np.ndarray) -> Proposals:
        from accord_mutdet.data.records import AnnotationError

        path = Path(self.label_dir) / f"{record.id}.txt"
        if not path.is_file():
            raise FileNotFoundError(f"{path}: proposal label file missing (expected one per image)")
        parsed = parse_dota_labels(path, None)
        if parsed.problems:
            raise AnnotationError(parsed.problems)
        return Proposals(polygons_to_boxes(parsed.polygons), np.ones(len(parsed.labels), np.float32))


@dataclass
class FelzenszwalbSource:
    """scikit-image ``felzenszwalb`` regions as proposals (module docstring), score = fill of the box.

    Args:
        scale: higher means larger regions (scikit-image's ``scale``).
        sigma: Gaussian smoothing before segmenting.
        min_size: smallest region scikit-image keeps (pixels, merged into neighbours otherwise).
        min_area: regions with fewer pixels are dropped.
        max_area_fraction: regions covering more of the image are dropped (background).
    """

    # scale / sigma picked on the sample data: 74 of 76 drawn objects at IoU > 0.5, ~20 proposals per
    # 256 px image (scale 300 / sigma 0.8: 55 of 76).
    scale: float = 150.0
    sigma: float = 0.5
    min_size: int = 40
    min_area: int = 40
    max_area_fraction: float = 0.1

    def __call__(self, record: ImageRecord, image: np.ndarray) -> Proposals:
        from skimage.segmentation import felzenszwalb

        regions = felzenszwalb(image, scale=self.scale, sigma=self.sigma, min_size=self.min_size)
        counts = np.bincount(regions.ravel())
        limit = self.max_area_fraction * regions.size
        masks, scores = [], []
        for region in np.flatnonzero((counts >= self.min_area) & (counts <= limit)):
            mask = regions == region
            box = mask_to_le90(mask)
            if box is None:
                continue
            masks.append(mask)
            scores.append(float(counts[region] / max(box[2] * box[3], 1.0)))
        return masks_to_proposals(masks, scores)
