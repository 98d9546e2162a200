"""The grounding training / evaluation dataset over a split JSONL, its collate function and box mapping."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from accord.boxes import cxcywh_to_xyxy, xywh_to_xyxy, xyxy_to_cxcywh

from accord_medrpg.data.images import read_image
from accord_medrpg.data.records import load_records, resolve_image
from accord_medrpg.data.transforms import IMAGENET_MEAN, IMAGENET_STD, place_on_canvas, sample_negatives

__all__ = ["GroundingDataset", "canvas_to_original", "collate_grounding", "normalise_image"]

_META_KEYS = ("orig_width", "orig_height", "scale_x", "scale_y", "offset_x", "offset_y", "canvas_size")


def normalise_image(canvas: np.ndarray, padding: np.ndarray) -> torch.Tensor:
    """Grey ``(S, S)`` in ``[0, 1]`` -> ``(3, S, S)`` ImageNet-normalised, grey replicated, 0 on padding."""
    mean = np.asarray(IMAGENET_MEAN, dtype=np.float32)[:, None, None]
    inverse_std = 1.0 / np.asarray(IMAGENET_STD, dtype=np.float32)[:, None, None]
    # numpy, single-threaded: this runs in data-loader workers, where torch ops contend for threads.
    image = (canvas[None] - mean) * inverse_std
    image *= ~padding
    return torch.from_numpy(image)


class GroundingDataset(Dataset):
    """Phrase-box pairs of one split file, ready for TransVG / MedRPG.

    The records are validated when the dataset is built (:func:`~accord_medrpg.data.records.load_records`,
    image headers); bad data raises :class:`~accord_medrpg.data.records.DataError`.

    Per sample: the image is read at its stored size (a large JPEG at a reduced scale, still at
    least ``image_size`` on each side, see :func:`~accord_medrpg.data.images.read_image`); the
    declared box (``[x, y, w, h]`` in the record's ``image_width x image_height`` frame) is scaled to
    it; ``num_negatives`` negatives are drawn there
    (:func:`~accord_medrpg.data.transforms.sample_negatives`); image, GT and negatives go through
    :func:`~accord_medrpg.data.transforms.place_on_canvas` together.

    Randomness comes from ``numpy.random.default_rng((seed, epoch, index))``: the same sample in
    the same epoch is identical whatever the worker layout; :meth:`set_epoch` changes it per epoch.

    Items (``S = image_size``, ``K = num_negatives``):
        ``image`` float32 ``(3, S, S)``; ``image_mask`` bool ``(S, S)`` True on padding; ``box``
        float32 ``(4,)`` normalised ``cx, cy, w, h`` on the canvas; ``negatives`` float32 ``(K, 4)``
        likewise; ``phrase``, ``category``, ``id`` str; ``index`` int (position in the file);
        ``meta`` dict of floats ``orig_width, orig_height`` (the record's frame), ``scale_x,
        scale_y, offset_x, offset_y`` (``canvas_px = orig_px * scale + offset``), ``canvas_size``.

    Args:
        jsonl_path: a split file written by ``accord data convert medrpg``.
        image_size: canvas side ``S``.
        train: draw fresh negatives per epoch and (with ``augment``) augment; otherwise the
            evaluation transform (long side to ``S``, centred).
        num_negatives: ``K`` (MedRPG: 5).
        augment: the training augmentation policy (only with ``train``).
        seed: the sampler's and augmentation's seed.
    """

    def __init__(self, jsonl_path: str | Path, *, image_size: int = 640, train: bool, num_negatives: int = 5,
                 augment: bool = True, seed: int = 0):
        if image_size < 32:
            raise ValueError(f"image_size must be >= 32, got {image_size}")
        if num_negatives < 0:
            raise ValueError(f"num_negatives must be >= 0, got {num_negatives}")
        self.path = Path(jsonl_path)
        self.items = load_records(self.path)
        self.image_size = image_size
        self.train = train
        self.augment = augment and train
        self.num_negatives = num_negatives
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Draw the negatives and augmentations of ``epoch``."""
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.items)

    @property
    def records(self) -> list[dict[str, Any]]:
        """The records in file order."""
        return [item.record for item in self.items]

    def __getitem__(self, index: int) -> dict[str, Any]:
        item = self.items[index]
        record = item.record
        rng = np.random.default_rng((self.seed, self.epoch if self.train else 0, index))
        grey = read_image(resolve_image(record["image"], item.base), min_size=self.image_size)
        height, width = grey.shape
        to_stored = torch.tensor([width / record["image_width"], height / record["image_height"]] * 2)
        gt = xywh_to_xyxy(torch.tensor(record["box"], dtype=torch.float64)) * to_stored
        negatives = sample_negatives(gt, width, height, self.num_negatives, rng)
        boxes = torch.cat((gt.to(torch.float32)[None], negatives))
        canvas, padding, boxes, placement = place_on_canvas(grey, boxes, record["phrase"], self.image_size,
                                                            augment=self.augment, rng=rng)
        normalised = xyxy_to_cxcywh(boxes) / self.image_size
        return {
            "image": normalise_image(canvas, padding),
            "image_mask": torch.from_numpy(padding),
            "box": normalised[0].to(torch.float32),
            "negatives": normalised[1:].to(torch.float32),
            "phrase": record["phrase"],
            "category": record["category"],
            "id": record["id"],
            "index": index,
            "meta": {
                "orig_width": float(record["image_width"]),
                "orig_height": float(record["image_height"]),
                "scale_x": placement.scale_x * width / record["image_width"],
                "scale_y": placement.scale_y * height / record["image_height"],
                "offset_x": placement.offset_x,
                "offset_y": placement.offset_y,
                "canvas_size": float(self.image_size),
            },
        }


def collate_grounding(batch: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Stack :class:`GroundingDataset` items: tensors stacked, strings as lists, ``meta`` as a dict of
    float64 ``(B,)`` tensors, ``index`` as a long ``(B,)`` tensor."""
    if not batch:
        raise ValueError("collate_grounding: empty batch")
    return {
        "image": torch.stack([b["image"] for b in batch]),
        "image_mask": torch.stack([b["image_mask"] for b in batch]),
        "box": torch.stack([b["box"] for b in batch]),
        "negatives": torch.stack([b["negatives"] for b in batch]),
        "phrase": [b["phrase"] for b in batch],
        "category": [b["category"] for b in batch],
        "id": [b["id"] for b in batch],
        "index": torch.tensor([b["index"] for b in batch], dtype=torch.long),
        "meta": {key: torch.tensor([b["meta"][key] for b in batch], dtype=torch.float64) for key in _META_KEYS},
    }


def canvas_to_original(boxes: torch.Tensor, meta: Mapping[str, Any], *, clip: bool = True) -> torch.Tensor:
    """Normalised canvas ``cx, cy, w, h`` back to ``x1, y1, x2, y2`` pixels of the original image.

    Args:
        boxes: ``(B, 4)`` (or ``(4,)`` with a single item's ``meta``) normalised canvas boxes,
            e.g. a model's ``pred_box``.
        meta: an item's ``meta`` (floats) or a collated batch's (``(B,)`` tensors).
        clip: clip to the original image (a prediction may extend over the padding).

    Returns:
        float64 xyxy boxes in the record's ``image_width x image_height`` frame, same leading shape.
    """
    values = {key: torch.as_tensor(meta[key], dtype=torch.float64, device=boxes.device) for key in _META_KEYS}
    canvas = cxcywh_to_xyxy(boxes.to(torch.float64)) * values["canvas_size"][..., None]
    scale = torch.stack([values["scale_x"], values["scale_y"]] * 2, dim=-1)
    offset = torch.stack([values["offset_x"], values["offset_y"]] * 2, dim=-1)
    original = (canvas - offset) / scale
    if clip:
        limit = torch.stack([values["orig_width"], values["orig_height"]] * 2, dim=-1)
        original = torch.minimum(original.clamp(min=0), limit)
    return original
