"""The one annotation format every mutdet reader produces: :class:`ImageRecord`.

Boxes are le90 rotated boxes ``(cx, cy, w, h, theta)`` in the pixels of the original image
(x right, y down, theta in radians in ``[-pi/2, pi/2)``, ``w >= h``; see
:mod:`accord.boxes.rotated`). DIOR-R's four ``robndbox`` corners and DOTA's eight coordinates are
turned into boxes by :func:`accord.boxes.polygon_to_le90` (minimum-area rectangle, as mmrotate's
``poly2obb_np_le90``), so both datasets give the same boxes for the same quadrilateral.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from accord.boxes import le90_to_polygon, polygon_to_le90
from accord.errors import UserError
from accord.registry import Problem
from accord.utils.files import write_atomically

#: DIOR-R's 20 classes, in the column order of the paper's Table 2. Files spell two of them
#: ``Expressway-Service-area`` / ``Expressway-toll-station``; names are matched lower-cased.
DIOR_R_CLASSES: tuple[str, ...] = (
    "airplane", "airport", "baseballfield", "basketballcourt", "bridge", "chimney", "dam",
    "expressway-service-area", "expressway-toll-station", "golffield", "groundtrackfield", "harbor",
    "overpass", "ship", "stadium", "storagetank", "tenniscourt", "trainstation", "vehicle", "windmill",
)

#: DOTA v1.0's 15 classes, in the column order of the paper's Table 3.
DOTA_V1_CLASSES: tuple[str, ...] = (
    "plane", "baseball-diamond", "bridge", "ground-track-field", "small-vehicle", "large-vehicle",
    "ship", "tennis-court", "basketball-court", "storage-tank", "soccer-ball-field", "roundabout",
    "harbor", "swimming-pool", "helicopter",
)

#: DOTA v1.5 adds ``container-crane`` to the v1.0 classes.
DOTA_V15_CLASSES: tuple[str, ...] = DOTA_V1_CLASSES + ("container-crane",)


@dataclass
class ImageRecord:
    """One image and its oriented-box annotations.

    Attributes:
        image: path of the image file.
        width: image width in pixels.
        height: image height in pixels.
        boxes: le90 boxes ``(cx, cy, w, h, theta)`` in original pixels, float32, shape ``(N, 5)``.
        labels: the class name of each box (``N`` strings).
        difficult: the dataset's difficult flag of each box, bool, shape ``(N,)``; VOC07 AP
            ignores detections matched to difficult boxes (:mod:`accord_mutdet.evaluation`).
        id: the image id (file stem), unique within a dataset.
    """

    image: Path
    width: int
    height: int
    boxes: np.ndarray = field(default_factory=lambda: np.zeros((0, 5), np.float32))
    labels: list[str] = field(default_factory=list)
    difficult: np.ndarray = field(default_factory=lambda: np.zeros(0, bool))
    id: str = ""

    def __post_init__(self) -> None:
        self.image = Path(self.image)
        self.boxes = np.asarray(self.boxes, dtype=np.float32).reshape(-1, 5)
        self.difficult = np.asarray(self.difficult, dtype=bool).reshape(-1)
        self.labels = list(self.labels)
        if not (len(self.boxes) == len(self.labels) == len(self.difficult)):
            raise ValueError(
                f"ImageRecord {self.id or self.image}: boxes {len(self.boxes)}, labels {len(self.labels)} "
                f"and difficult {len(self.difficult)} must have the same length"
            )
        if not self.id:
            self.id = self.image.stem

    def polygons(self) -> np.ndarray:
        """The boxes as DOTA polygons ``(x1, y1, ..., x4, y4)``, float64, shape ``(N, 8)``."""
        return le90_to_polygon(torch.from_numpy(self.boxes).double()).numpy()


class AnnotationError(UserError, ValueError):
    """Annotations that cannot be used; ``lines`` holds one ``file:line: problem`` per issue."""

    def __init__(self, problems: list[Problem]) -> None:
        self.problems = list(problems)
        self.lines = [str(problem) for problem in self.problems]
        super().__init__("; ".join(self.lines))


def polygons_to_boxes(polygons: np.ndarray) -> np.ndarray:
    """DOTA / DIOR-R quadrilaterals ``(N, 8)`` to le90 boxes ``(N, 5)`` float32 (min-area rectangle)."""
    polygons = np.asarray(polygons, dtype=np.float64).reshape(-1, 8)
    return polygon_to_le90(torch.from_numpy(polygons)).float().numpy()


def polygon_problems(polygon: np.ndarray, width: int, height: int, where: str) -> list[Problem]:
    """Geometry problems of one quadrilateral ``(8,)`` in an image of ``width x height`` pixels.

    A polygon is *degenerate* when its points span less than one square pixel, *self-intersecting* when its
    four points in file order cross (shapely's validity), and *outside the image* when less than
    half of its area lies inside the image (boxes cut by the border are normal in DOTA and in
    patches; a box mostly outside means wrong coordinates).
    """
    from shapely.geometry import Polygon, box
    from shapely.validation import explain_validity

    shape = Polygon(np.asarray(polygon, dtype=np.float64).reshape(4, 2))
    # The hull, not the polygon: a crossed "bow tie" has zero signed area but is no degenerate box.
    if shape.convex_hull.area < 1.0:
        return [Problem(where, f"degenerate polygon (area {shape.convex_hull.area:.3g} px^2 < 1): {_coords(polygon)}")]
    if not shape.is_valid:
        return [Problem(where, f"self-intersecting polygon ({explain_validity(shape)}): {_coords(polygon)}; "
                               "expected the four corners in order around the box")]
    inside = shape.intersection(box(0, 0, width, height)).area / shape.area
    if inside < 0.5:
        return [Problem(where, f"box outside the image ({inside:.0%} of it inside {width}x{height}): "
                               f"{_coords(polygon)}")]
    return []


def _coords(polygon: np.ndarray) -> str:
    return " ".join(f"{value:g}" for value in np.asarray(polygon).reshape(-1))


def image_size(path: Path) -> tuple[int, int]:
    """``(width, height)`` of an image from its header (PIL reads no pixels)."""
    from PIL import Image

    with Image.open(path) as image:
        return image.size


def read_rgb(path: Path) -> np.ndarray:
    """An image file as RGB uint8 ``(H, W, 3)``; ValueError naming the file when it cannot be decoded."""
    import cv2

    image = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if image is None:
        raise ValueError(f"{path}: unreadable image (opencv could not decode it)")
    return np.ascontiguousarray(image[..., ::-1])


def write_image(path: Path, image: np.ndarray) -> Path:
    """Write an RGB ``(H, W, 3)`` or single-channel image atomically, format from the suffix."""
    import cv2

    path = Path(path)
    ok, encoded = cv2.imencode(path.suffix, image[..., ::-1] if image.ndim == 3 else image)
    if not ok:
        raise OSError(f"{path}: opencv could not encode the image")
    return write_atomically(path, lambda handle: handle.write(encoded.tobytes()))


def detection_arrays(image_id: str, detections: dict) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(boxes (M, 5) float32, scores (M,) float64, labels (M,) int64)`` from a detections dict.

    Accepts numpy arrays, lists or tensors on any device; ValueError naming the image otherwise.
    """
    def numpy(value) -> np.ndarray:  # noqa: ANN001 - array-like
        return value.detach().cpu().numpy() if isinstance(value, torch.Tensor) else np.asarray(value)

    try:
        boxes = numpy(detections["boxes"]).astype(np.float32).reshape(-1, 5)
        scores = numpy(detections["scores"]).astype(np.float64).reshape(-1)
        labels = numpy(detections["labels"]).astype(np.int64).reshape(-1)
    except (KeyError, ValueError, TypeError) as exc:
        raise ValueError(f"detections of {image_id}: expected boxes (M, 5), scores (M,), labels (M,) ({exc})") from exc
    if not len(boxes) == len(scores) == len(labels):
        raise ValueError(f"detections of {image_id}: {len(boxes)} boxes, {len(scores)} scores, {len(labels)} labels")
    return boxes, scores, labels
