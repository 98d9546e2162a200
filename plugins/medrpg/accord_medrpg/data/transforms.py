"""MedRPG's negative sampler and augmentation policy, with boxes carried through every step.

Boxes are ``xyxy`` pixel tensors ``(R, 4)``: the GT first, then the negatives. Every geometric
step (resize, crop, pad) applies to the image and to all boxes at once, so the GT and its
negatives stay consistent. The reference crops the image and GT twice when negatives are present
but shifts the negatives once (spec §9.1); here the crop happens once for everything.

Sizes follow the reference at a 640 canvas and scale with the canvas ``size``: training resizes the
long side to one of ``{640, 608, ..., 448} * size / 640``; without a direction word in the phrase,
half of the samples first resize the short side to ``{400, 500, 600} * size / 640`` and take a
random crop of ``[384, 600] * size / 640`` per side that holds the GT centre. Evaluation resizes
the long side to ``size`` and centres the image on the canvas.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from accord.boxes import box_iou

__all__ = [
    "DIRECTION_WORDS",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "Placement",
    "has_direction_word",
    "place_on_canvas",
    "sample_negatives",
]

#: A phrase containing one of these (as a substring, like the reference) is never cropped.
DIRECTION_WORDS = ("left", "right", "top", "bottom", "middle")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_REFERENCE_CANVAS = 640
_LONG_SIDES = tuple(640 - 32 * i for i in range(7))
_SHORT_SIDES = (400, 500, 600)
_CROP_RANGE = (384, 600)
_CROP_TRIES = 20


def has_direction_word(phrase: str) -> bool:
    """True when the phrase holds a direction word (then the crop branch is never taken)."""
    lowered = phrase.lower()
    return any(word in lowered for word in DIRECTION_WORDS)


def sample_negatives(gt: torch.Tensor, width: float, height: float, num: int, rng: np.random.Generator, *,
                     max_iou: float = 0.25, jitter: float = 0.1, max_attempts: int = 300) -> torch.Tensor:
    """Random same-image boxes of the GT's size (+-``jitter``) that barely overlap it.

    Each candidate takes the GT's width and height times ``U(1 - jitter, 1 + jitter)`` (capped at
    the image size) and a centre drawn uniformly among the positions that keep it inside the image
    (the reference draws centres anywhere and rejects boxes that leave the image: the same
    distribution). A candidate is accepted when its IoU with the GT is at most ``max_iou``.

    Exhaustion: after ``max_attempts`` candidates (the reference's 300), the missing negatives are
    the lowest-IoU candidates drawn, inside the image but overlapping the GT more than ``max_iou``
    (the reference then accepts the next candidate whatever its IoU). This only happens when the
    GT covers most of the image.

    Args:
        gt: ``(4,)`` xyxy GT box in pixels.
        width, height: image size in pixels.
        num: negatives wanted.
        rng: the generator (the dataset seeds it per sample and epoch).

    Returns:
        ``(num, 4)`` xyxy pixel boxes inside ``[0, width] x [0, height]``.
    """
    if num == 0:
        return gt.new_zeros((0, 4))
    gt = gt.to(torch.float64)
    size = (gt[2:] - gt[:2]).numpy()
    sizes = size * rng.uniform(1 - jitter, 1 + jitter, size=(max_attempts, 2))
    sizes = np.minimum(sizes, [width, height])
    corners = rng.uniform(0.0, 1.0, size=(max_attempts, 2)) * ([width, height] - sizes)
    candidates = torch.from_numpy(np.concatenate((corners, corners + sizes), axis=1))
    ious = box_iou(candidates, gt[None]).squeeze(1)
    accepted = torch.nonzero(ious <= max_iou).squeeze(1)[:num]
    if len(accepted) < num:
        rest = torch.argsort(ious, stable=True)
        rest = rest[ious[rest] > max_iou][: num - len(accepted)]
        accepted = torch.cat((accepted, rest))
    return candidates[accepted].to(torch.float32)


@dataclass
class Placement:
    """How an original image maps onto the canvas: ``canvas_px = original_px * scale + offset``.

    Attributes:
        scale_x, scale_y: canvas pixels per original pixel.
        offset_x, offset_y: canvas position of the original's origin (padding, minus any crop shift).
    """

    scale_x: float
    scale_y: float
    offset_x: float
    offset_y: float


#: An image, its boxes and its placement after a transform step.
_Moved = tuple[np.ndarray, torch.Tensor, Placement]


def _resize(image: np.ndarray, boxes: torch.Tensor, placement: Placement, new_w: int,
            new_h: int) -> _Moved:
    import cv2

    height, width = image.shape
    sx, sy = new_w / width, new_h / height
    interpolation = cv2.INTER_AREA if new_w < width else cv2.INTER_LINEAR
    image = cv2.resize(image, (new_w, new_h), interpolation=interpolation)
    boxes = boxes * boxes.new_tensor([sx, sy, sx, sy])
    return image, boxes, Placement(placement.scale_x * sx, placement.scale_y * sy, placement.offset_x * sx,
                                   placement.offset_y * sy)


def _resize_long(image: np.ndarray, boxes: torch.Tensor, placement: Placement, long_side: int) -> _Moved:
    height, width = image.shape
    ratio = long_side / max(height, width)
    return _resize(image, boxes, placement, max(1, round(width * ratio)), max(1, round(height * ratio)))


def _resize_short(image: np.ndarray, boxes: torch.Tensor, placement: Placement, short_side: int) -> _Moved:
    height, width = image.shape
    ratio = short_side / min(height, width)
    return _resize(image, boxes, placement, max(1, round(width * ratio)), max(1, round(height * ratio)))


def _random_crop(image: np.ndarray, boxes: torch.Tensor, placement: Placement, rng: np.random.Generator, low: int,
                 high: int) -> _Moved:
    """The reference's RandomSizeCrop: up to 20 tries for a crop that holds the GT centre.

    The reference only asks for the crop's origin to lie above-left of the GT centre, so the crop
    can miss the GT entirely and leave a zero-size target; here the centre must lie inside.
    """
    height, width = image.shape
    centre = ((boxes[0, :2] + boxes[0, 2:]) / 2).tolist()
    for _ in range(_CROP_TRIES):
        crop_w = int(rng.integers(min(low, width), min(width, high) + 1))
        crop_h = int(rng.integers(min(low, height), min(height, high) + 1))
        left = int(rng.integers(0, width - crop_w + 1))
        top = int(rng.integers(0, height - crop_h + 1))
        if left < centre[0] < left + crop_w and top < centre[1] < top + crop_h:
            image = image[top:top + crop_h, left:left + crop_w]
            shift = boxes.new_tensor([left, top, left, top])
            limit = boxes.new_tensor([crop_w, crop_h, crop_w, crop_h])
            boxes = torch.minimum((boxes - shift).clamp(min=0), limit)
            return image, boxes, Placement(placement.scale_x, placement.scale_y, placement.offset_x - left,
                                           placement.offset_y - top)
    return image, boxes, placement  # no acceptable crop: the image stays whole, as upstream


def _colour_jitter(image: np.ndarray, rng: np.random.Generator, strength: float = 0.4) -> np.ndarray:
    """PIL-style brightness and contrast in a random order (saturation does nothing on grey)."""
    steps = ["brightness", "contrast"]
    rng.shuffle(steps)
    for step in steps:
        factor = rng.uniform(1 - strength, 1 + strength)
        if step == "brightness":
            image = image * factor
        else:
            image = image.mean() + factor * (image - image.mean())
        image = np.clip(image, 0.0, 1.0)
    return image


def place_on_canvas(image: np.ndarray, boxes: torch.Tensor, phrase: str, size: int, *, augment: bool,
                    rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, torch.Tensor, Placement]:
    """Resize (and in training crop and jitter) an image and its boxes, then pad to ``size x size``.

    Args:
        image: ``(H, W)`` grey in ``[0, 1]``.
        boxes: ``(R, 4)`` xyxy pixels of ``image``; row 0 is the GT (the crop keeps its centre).
        phrase: decides whether the crop branch may be taken.
        size: canvas side.
        augment: training augmentation (random scale, crop, colour jitter, random offset);
            otherwise long side to ``size`` and centred.
        rng: the sample's generator.

    Returns:
        ``canvas (size, size)`` grey (0 on padding), ``padding (size, size)`` bool (True on
        padding), ``boxes (R, 4)`` xyxy canvas pixels, and the :class:`Placement` of ``image``.
    """
    placement = Placement(1.0, 1.0, 0.0, 0.0)
    ratio = size / _REFERENCE_CANVAS
    if augment:
        long_side = round(_LONG_SIDES[int(rng.integers(len(_LONG_SIDES)))] * ratio)
        if not has_direction_word(phrase) and rng.random() < 0.5:
            short_side = round(_SHORT_SIDES[int(rng.integers(len(_SHORT_SIDES)))] * ratio)
            image, boxes, placement = _resize_short(image, boxes, placement, short_side)
            image, boxes, placement = _random_crop(image, boxes, placement, rng, round(_CROP_RANGE[0] * ratio),
                                                   round(_CROP_RANGE[1] * ratio))
        image, boxes, placement = _resize_long(image, boxes, placement, long_side)
        if rng.random() < 0.8:
            image = _colour_jitter(image, rng)
    else:
        image, boxes, placement = _resize_long(image, boxes, placement, size)
    height, width = image.shape
    if augment:
        top, left = int(rng.integers(0, size - height + 1)), int(rng.integers(0, size - width + 1))
    else:
        top, left = (size - height) // 2, (size - width) // 2
    canvas = np.zeros((size, size), dtype=np.float32)
    canvas[top:top + height, left:left + width] = image
    padding = np.ones((size, size), dtype=bool)
    padding[top:top + height, left:left + width] = False
    boxes = boxes + boxes.new_tensor([left, top, left, top])
    placement = Placement(placement.scale_x, placement.scale_y, placement.offset_x + left, placement.offset_y + top)
    return canvas, padding, boxes, placement
