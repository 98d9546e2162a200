"""The training / evaluation dataset: images resized and padded, le90 boxes kept consistent.

Each item (see :class:`DetectionDataset`) is a dict:

* ``image``: float32 ``(3, S, S)``, ImageNet-normalised RGB. The image is resized so its longer
  side is ``S = image_size`` (aspect ratio kept, like mmrotate's ``RResize`` with keep-ratio),
  then zero-padded (= the mean colour after normalisation) on the right / bottom to ``S x S``;
* ``boxes``: float32 ``(N, 5)`` le90 ``(cx, cy, w, h, theta)`` in pixels of the returned image
  (original pixels times ``scale``, then the augmentation);
* ``labels``: int64 ``(N,)``: the index into ``class_names``, or with ``pseudo_dir`` the
  pseudo-class (cluster) id;
* ``embeddings``: float32 ``(N, D)`` object embeddings, only with ``pseudo_dir``;
* ``difficult``: bool ``(N,)`` (all False for pseudo-labels);
* ``image_id``: str; ``scale``: float, returned pixels per original pixel (divide predicted
  ``cx, cy, w, h`` by it to get original pixels; augmentation is off when ``train=False``).

Training augmentation, as the reference's ``RRandomFlip`` (horizontal, vertical, diagonal, each with
probability 0.25) plus, with ``rotate90=True``, a rotation by a random multiple of 90 degrees. They
act on the padded square, so no pixel leaves the canvas, and boxes follow exactly: a flip maps
``theta -> -theta``, a 90-degree turn ``theta -> theta - pi/2`` (then canonical le90 again).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from accord.boxes import normalise_le90
from accord_mutdet.data.records import ImageRecord, read_rgb

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def prepare_image(rgb: np.ndarray, image_size: int) -> tuple[torch.Tensor, float]:
    """Resize (longer side ``image_size``, ratio kept), normalise and pad an RGB uint8 ``(H, W, 3)``.

    Returns:
        The image ``(3, image_size, image_size)`` float32 and the scale (new / original pixels).
    """
    import cv2

    height, width = rgb.shape[:2]
    scale = image_size / max(height, width)
    new_w, new_h = max(1, round(width * scale)), max(1, round(height * scale))
    resized = cv2.resize(rgb, (new_w, new_h), interpolation=cv2.INTER_LINEAR) if (new_w, new_h) != (width, height) else rgb
    tensor = torch.from_numpy(np.ascontiguousarray(resized)).permute(2, 0, 1).float() / 255.0
    tensor = (tensor - torch.tensor(IMAGENET_MEAN)[:, None, None]) / torch.tensor(IMAGENET_STD)[:, None, None]
    canvas = torch.zeros(3, image_size, image_size)
    canvas[:, :new_h, :new_w] = tensor
    return canvas, scale


def flip_boxes(boxes: torch.Tensor, size: int, *, horizontal: bool) -> torch.Tensor:
    """le90 boxes ``(N, 5)`` after flipping a ``size x size`` image (x -> size - x, or y)."""
    flipped = boxes.clone()
    axis = 0 if horizontal else 1
    flipped[:, axis] = size - boxes[:, axis]
    flipped[:, 4] = -boxes[:, 4]
    return normalise_le90(flipped)


def rot90_boxes(boxes: torch.Tensor, size: int, k: int) -> torch.Tensor:
    """le90 boxes after ``torch.rot90(image, k, dims=(-2, -1))`` of a ``size x size`` image.

    One turn (counter-clockwise on screen) maps ``(x, y) -> (y, size - x)``: the ``w`` direction
    ``(cos t, sin t)`` becomes ``(sin t, -cos t)``, i.e. ``t - pi/2``.
    """
    out = boxes.clone()
    for _ in range(k % 4):
        x, y = out[:, 0].clone(), out[:, 1].clone()
        out[:, 0], out[:, 1] = y, size - x
        out[:, 4] = out[:, 4] - math.pi / 2
        out = normalise_le90(out)
    return out


class DetectionDataset(Dataset):
    """Images and rotated boxes for the detector (item layout in the module docstring).

    Args:
        records: the images (:func:`accord_mutdet.data.load_checked` or a loader).
        image_size: side ``S`` of the returned square image.
        train: apply the random flips (and 90-degree turns with ``rotate90``).
        pseudo_dir: a folder of ``<id>.npz`` pseudo-labels (:mod:`accord_mutdet.pseudo`); its boxes,
            pseudo-classes and embeddings replace the records' annotations (pretraining).
        class_names: class name of each label index (required without ``pseudo_dir``).
        rotate90: add random 90-degree rotations to the training flips.
    """

    def __init__(self, records: Sequence[ImageRecord], *, image_size: int, train: bool,
                 pseudo_dir: str | Path | None = None, class_names: Sequence[str] | None = None,
                 rotate90: bool = False) -> None:
        if pseudo_dir is None and class_names is None:
            raise ValueError("DetectionDataset: class_names is required for labelled data (no pseudo_dir)")
        self.records = list(records)
        self.image_size = int(image_size)
        self.train = train
        self.rotate90 = rotate90
        self.pseudo_dir = Path(pseudo_dir) if pseudo_dir is not None else None
        self.class_names = list(class_names) if class_names is not None else None
        if self.class_names is not None and self.pseudo_dir is None:
            index = {name: i for i, name in enumerate(self.class_names)}
            for record in self.records:
                unknown = sorted(set(record.labels) - index.keys())
                if unknown:
                    raise ValueError(f"{record.image}: class names {unknown} are not in class_names {self.class_names}")
        if self.pseudo_dir is not None:
            missing = [r.id for r in self.records if not (self.pseudo_dir / f"{r.id}.npz").is_file()]
            if missing:
                raise FileNotFoundError(f"{self.pseudo_dir}: no pseudo-labels for {len(missing)} image(s), e.g. "
                                        f"{missing[0]}.npz; run the mutdet pseudolabel task on these images first")

    def __len__(self) -> int:
        return len(self.records)

    def _targets(self, record: ImageRecord) -> dict[str, torch.Tensor]:
        if self.pseudo_dir is None:
            return {"boxes": torch.from_numpy(record.boxes.copy()),
                    "labels": torch.tensor([self.class_names.index(n) for n in record.labels], dtype=torch.long),
                    "difficult": torch.from_numpy(record.difficult.copy())}
        from accord_mutdet.pseudo.store import read_pseudo_labels

        pseudo = read_pseudo_labels(self.pseudo_dir / f"{record.id}.npz")
        return {"boxes": torch.from_numpy(pseudo["boxes"]), "labels": torch.from_numpy(pseudo["pseudo_class"]).long(),
                "embeddings": torch.from_numpy(pseudo["embeddings"]),
                "difficult": torch.zeros(len(pseudo["boxes"]), dtype=torch.bool)}

    def __getitem__(self, index: int) -> dict[str, Any]:
        record = self.records[index]
        image, scale = prepare_image(read_rgb(record.image), self.image_size)
        item = self._targets(record)
        boxes = item["boxes"].float().reshape(-1, 5).clone()
        boxes[:, :4] *= scale
        if self.train:
            image, boxes = self.augment(image, boxes)
        item.update(image=image, boxes=boxes, image_id=record.id, scale=scale)
        return item

    def augment(self, image: torch.Tensor, boxes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Random flip (none / horizontal / vertical / diagonal, 0.25 each) and optional 90-degree turn."""
        size = image.shape[-1]
        choice = int(torch.randint(4, ()))
        if choice in (1, 3):
            image, boxes = image.flip(-1), flip_boxes(boxes, size, horizontal=True)
        if choice in (2, 3):
            image, boxes = image.flip(-2), flip_boxes(boxes, size, horizontal=False)
        if self.rotate90:
            k = int(torch.randint(4, ()))
            image, boxes = torch.rot90(image, k, dims=(-2, -1)), rot90_boxes(boxes, size, k)
        return image.contiguous(), boxes


def collate_detection(items: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Batch :class:`DetectionDataset` items.

    Returns:
        ``images`` ``(B, 3, S, S)``, ``scales`` ``(B,)`` float, ``image_ids`` list of str, and per
        image lists ``boxes`` (each ``(N_i, 5)``), ``labels`` (``(N_i,)``), ``difficult`` and, when
        the items have them, ``embeddings`` (``(N_i, D)``).
    """
    batch: dict[str, Any] = {
        "images": torch.stack([item["image"] for item in items]),
        "scales": torch.tensor([item["scale"] for item in items], dtype=torch.float32),
        "image_ids": [item["image_id"] for item in items],
        "boxes": [item["boxes"] for item in items],
        "labels": [item["labels"] for item in items],
        "difficult": [item["difficult"] for item in items],
    }
    if "embeddings" in items[0]:
        batch["embeddings"] = [item["embeddings"] for item in items]
    return batch
