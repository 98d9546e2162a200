"""Axis-aligned box formats and image-size normalisation.

Formats (continuous coordinates, x to the right, y down, image spanning ``[0, W] x [0, H]``):

* ``"xyxy"``: ``(x1, y1, x2, y2)``, top-left and bottom-right corners;
* ``"xywh"``: ``(x1, y1, w, h)``, top-left corner and size (COCO, MS-CXR records);
* ``"cxcywh"``: ``(cx, cy, w, h)``, centre and size (DETR / TransVG heads).

Every function takes ``(..., 4)`` (any leading dims, including none or zero boxes), is built from
differentiable tensor ops, and keeps dtype and device.
"""

from __future__ import annotations

from typing import Literal, Sequence

import torch

from accord.utils.checks import check_tensor

BoxFormat = Literal["xyxy", "xywh", "cxcywh"]
BOX_FORMATS: tuple[str, ...] = ("xyxy", "xywh", "cxcywh")


def check_boxes(boxes: object, name: str, size: int | Sequence[int] = 4) -> torch.Tensor:
    """Require a floating tensor of shape ``(..., size)`` (zero boxes allowed).

    Args:
        boxes: the value to check.
        name: the argument name used in error messages.
        size: allowed last-dim size(s), e.g. 4 for axis-aligned, 5 for rotated boxes.

    Returns:
        The tensor, unchanged.
    """
    check_tensor(boxes, name, min_rows=0, floating=True)
    allowed = (size,) if isinstance(size, int) else tuple(size)
    if boxes.ndim == 0 or boxes.shape[-1] not in allowed:
        want = " or ".join(f"(..., {s})" for s in allowed)
        raise ValueError(f"{name}: expected shape {want}, got {tuple(boxes.shape)}")
    return boxes


def cxcywh_to_xyxy(boxes: torch.Tensor) -> torch.Tensor:
    """``(cx, cy, w, h)`` to ``(x1, y1, x2, y2)``.

    Shape:
        boxes: ``(..., 4)``; output: ``(..., 4)``.
    """
    cx, cy, w, h = check_boxes(boxes, "boxes").unbind(-1)
    return torch.stack([cx - 0.5 * w, cy - 0.5 * h, cx + 0.5 * w, cy + 0.5 * h], dim=-1)


def xyxy_to_cxcywh(boxes: torch.Tensor) -> torch.Tensor:
    """``(x1, y1, x2, y2)`` to ``(cx, cy, w, h)``.

    Shape:
        boxes: ``(..., 4)``; output: ``(..., 4)``.
    """
    x1, y1, x2, y2 = check_boxes(boxes, "boxes").unbind(-1)
    return torch.stack([0.5 * (x1 + x2), 0.5 * (y1 + y2), x2 - x1, y2 - y1], dim=-1)


def xywh_to_xyxy(boxes: torch.Tensor) -> torch.Tensor:
    """``(x1, y1, w, h)`` to ``(x1, y1, x2, y2)``.

    Shape:
        boxes: ``(..., 4)``; output: ``(..., 4)``.
    """
    x1, y1, w, h = check_boxes(boxes, "boxes").unbind(-1)
    return torch.stack([x1, y1, x1 + w, y1 + h], dim=-1)


def xyxy_to_xywh(boxes: torch.Tensor) -> torch.Tensor:
    """``(x1, y1, x2, y2)`` to ``(x1, y1, w, h)``.

    Shape:
        boxes: ``(..., 4)``; output: ``(..., 4)``.
    """
    x1, y1, x2, y2 = check_boxes(boxes, "boxes").unbind(-1)
    return torch.stack([x1, y1, x2 - x1, y2 - y1], dim=-1)


_TO_XYXY = {"xyxy": lambda boxes: boxes, "xywh": xywh_to_xyxy, "cxcywh": cxcywh_to_xyxy}
_FROM_XYXY = {"xyxy": lambda boxes: boxes, "xywh": xyxy_to_xywh, "cxcywh": xyxy_to_cxcywh}


def box_convert(boxes: torch.Tensor, in_fmt: BoxFormat, out_fmt: BoxFormat) -> torch.Tensor:
    """Convert between ``"xyxy"``, ``"xywh"`` and ``"cxcywh"`` (through xyxy).

    Args:
        boxes: boxes in ``in_fmt``.
        in_fmt: format of ``boxes``.
        out_fmt: format of the result.

    Returns:
        The boxes in ``out_fmt`` (``boxes`` itself when the formats are equal).

    Shape:
        boxes: ``(..., 4)``; output: ``(..., 4)``.
    """
    for name, fmt in (("in_fmt", in_fmt), ("out_fmt", out_fmt)):
        if fmt not in BOX_FORMATS:
            raise ValueError(f"{name}: expected one of {BOX_FORMATS}, got {fmt!r}")
    check_boxes(boxes, "boxes")
    if in_fmt == out_fmt:
        return boxes
    return _FROM_XYXY[out_fmt](_TO_XYXY[in_fmt](boxes))


def _rescale(
    boxes: torch.Tensor, image_size: Sequence[float] | torch.Tensor, inverse: bool
) -> torch.Tensor:
    """Divide (or, ``inverse``, multiply) x entries by W and y entries by H; keep theta."""
    check_boxes(boxes, "boxes", size=(4, 5))
    size = torch.as_tensor(image_size, dtype=boxes.dtype, device=boxes.device)
    if size.ndim == 0 or size.shape[-1] != 2:
        raise ValueError(
            f"image_size: expected (H, W) or a tensor of shape (..., 2), got {tuple(size.shape)}"
        )
    if not bool((size > 0).all()):
        raise ValueError(f"image_size: expected positive sizes, got {size.tolist()}")
    width_height = size.flip(-1)
    scale = torch.cat([width_height, width_height], dim=-1)  # (W, H, W, H)
    scaled = boxes[..., :4] * scale if inverse else boxes[..., :4] / scale
    return torch.cat([scaled, boxes[..., 4:]], dim=-1) if boxes.shape[-1] == 5 else scaled


def normalise_boxes(
    boxes: torch.Tensor, image_size: Sequence[float] | torch.Tensor
) -> torch.Tensor:
    """Pixel boxes to fractions of the image: x coordinates / W, y coordinates / H.

    Valid for all three axis-aligned formats (each has x at positions 0, 2 and y at 1, 3). A
    rotated ``(cx, cy, w, h, theta)`` box gets its first four entries divided the same way and
    theta unchanged, which is the normalised frame of rotated DETRs (ARS-DETR); it is a true
    rotated rectangle again only when ``W == H`` (a rotated side is not parallel to x or y).

    Args:
        boxes: boxes in pixels.
        image_size: ``(H, W)``, or a tensor ``(..., 2)`` of per-image ``(H, W)`` broadcastable
            against ``boxes``' leading dims (e.g. ``(B, 1, 2)`` for ``(B, Q, 4)`` boxes).

    Returns:
        The boxes in ``[0, 1]`` units.

    Shape:
        boxes: ``(..., 4)`` or ``(..., 5)``; output: same as ``boxes``.
    """
    return _rescale(boxes, image_size, inverse=False)


def denormalise_boxes(
    boxes: torch.Tensor, image_size: Sequence[float] | torch.Tensor
) -> torch.Tensor:
    """Inverse of :func:`normalise_boxes`: fractions of the image back to pixels.

    Args:
        boxes: boxes in ``[0, 1]`` units.
        image_size: ``(H, W)`` or a broadcastable tensor ``(..., 2)``, as in
            :func:`normalise_boxes`.

    Returns:
        The boxes in pixels.

    Shape:
        boxes: ``(..., 4)`` or ``(..., 5)``; output: same as ``boxes``.
    """
    return _rescale(boxes, image_size, inverse=True)
