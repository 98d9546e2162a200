"""Toy shapes dataset in the ImageFolder layout (``ROOT/<class>/<id>.png``, 8-bit grayscale).

It exists so the core can be demonstrated and tested end to end before any domain plugin is
installed: contrastive pretraining on unlabeled shapes, then a linear probe on few labels.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError

from accord.registry import Problem

__all__ = ["CLASSES", "IMAGE_SIZE", "synth_shapes", "check_shapes", "load_shapes", "split_indices", "TwoViews"]

CLASSES = ("circle", "square", "triangle", "cross")
IMAGE_SIZE = 32


def _render(kind: str, rng: np.random.Generator, size: int) -> np.ndarray:
    """One grayscale image of ``kind`` at a random position, scale, rotation and contrast."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    cy, cx = rng.uniform(size * 0.3, size * 0.7, 2)
    radius = rng.uniform(size * 0.14, size * 0.3)
    angle = rng.uniform(0, np.pi)
    # Coordinates in the shape's rotated frame, in units of its radius.
    u = ((xx - cx) * np.cos(angle) + (yy - cy) * np.sin(angle)) / radius
    v = (-(xx - cx) * np.sin(angle) + (yy - cy) * np.cos(angle)) / radius
    if kind == "circle":
        mask = u**2 + v**2 <= 1.0
    elif kind == "square":
        mask = np.maximum(np.abs(u), np.abs(v)) <= 0.8
    elif kind == "triangle":
        mask = (v >= -0.5) & (v <= 1.0 - 1.732 * np.abs(u)) & (np.abs(u) <= 0.866)
    else:  # cross
        mask = ((np.abs(u) <= 0.3) & (np.abs(v) <= 1.0)) | ((np.abs(v) <= 0.3) & (np.abs(u) <= 1.0))
    background = rng.uniform(0.1, 0.4)
    foreground = background + rng.uniform(0.3, 0.5)
    image = np.where(mask, foreground, background) + rng.normal(0, 0.06, (size, size))
    return (np.clip(image, 0, 1) * 255).astype(np.uint8)


def synth_shapes(out_dir: str | Path, per_class: int = 64, size: int = IMAGE_SIZE, seed: int = 0) -> Path:
    """Write ``per_class`` PNGs of each class to ``out_dir/<class>/<id>.png`` and return ``out_dir``."""
    out = Path(out_dir)
    rng = np.random.default_rng(seed)
    for kind in CLASSES:
        (out / kind).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            Image.fromarray(_render(kind, rng, size), mode="L").save(out / kind / f"{i:04d}.png")
    return out


def check_shapes(root: str | Path) -> list[Problem]:
    """Validate an ImageFolder of same-size 8-bit grayscale PNGs; one :class:`Problem` per issue."""
    root = Path(root)
    if not root.is_dir():
        return [Problem(str(root), "dataset root is not a directory")]
    class_dirs = sorted(p for p in root.iterdir() if p.is_dir())
    if not class_dirs:
        return [Problem(str(root), "no class sub-directories (expected ROOT/<class>/<image>.png)")]
    problems: list[Problem] = []
    sizes: dict[tuple[int, int], str] = {}
    for class_dir in class_dirs:
        files = sorted(class_dir.iterdir())
        if not any(f.suffix.lower() == ".png" for f in files):
            problems.append(Problem(str(class_dir), "class directory has no .png images"))
        for f in files:
            if f.suffix.lower() != ".png":
                problems.append(Problem(str(f), "unexpected file (only .png images are read)"))
                continue
            try:
                with Image.open(f) as img:
                    img.load()
                    mode, dims = img.mode, img.size
            except (UnidentifiedImageError, OSError) as exc:
                problems.append(Problem(str(f), f"unreadable image: {exc}"))
                continue
            if mode != "L":
                problems.append(Problem(str(f), f"expected 8-bit grayscale (mode L), got mode {mode}"))
            sizes.setdefault(dims, str(f))
    if len(sizes) > 1:
        detail = ", ".join(f"{w}x{h} (e.g. {name})" for (w, h), name in sizes.items())
        problems.append(Problem(str(root), f"images differ in size: {detail}"))
    return problems


def load_shapes(root: str | Path) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """Load a checked ImageFolder.

    Returns:
        images ``(N, 1, H, W)`` float in [0, 1], labels ``(N,)`` long, class names.

    Raises:
        ValueError: the dataset fails :func:`check_shapes` (all problems in the message).
    """
    problems = check_shapes(root)
    if problems:
        raise ValueError("dataset check failed:\n" + "\n".join(map(str, problems)))
    root = Path(root)
    classes = sorted(p.name for p in root.iterdir() if p.is_dir())
    images, labels = [], []
    for label, name in enumerate(classes):
        for f in sorted((root / name).glob("*.png")):
            with Image.open(f) as img:
                images.append(np.asarray(img, dtype=np.uint8))
            labels.append(label)
    tensor = torch.from_numpy(np.stack(images)).float().div_(255).unsqueeze(1)
    return tensor, torch.tensor(labels), classes


def split_indices(n: int, test_fraction: float = 0.3, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A deterministic train/test split of ``range(n)`` (same for every run with the same seed)."""
    keys = [hashlib.sha1(f"{seed}:{i}".encode()).hexdigest() for i in range(n)]
    order = torch.tensor(sorted(range(n), key=keys.__getitem__))
    n_test = int(round(n * test_fraction))
    return order[n_test:], order[:n_test]


class TwoViews(torch.utils.data.Dataset):
    """Two random augmentations of each image (SimCLR views): resized crop, flip, contrast, noise.

    Randomness comes from the global torch RNG, which the trainer seeds and checkpoints.

    Args:
        images: ``(N, 1, H, W)`` in [0, 1].
        min_scale: smallest crop side as a fraction of the image side.
    """

    def __init__(self, images: torch.Tensor, min_scale: float = 0.6) -> None:
        self.images = images
        self.min_scale = min_scale

    def __len__(self) -> int:
        return len(self.images)

    def _augment(self, image: torch.Tensor) -> torch.Tensor:
        _, h, w = image.shape
        side = int(h * float(torch.empty(()).uniform_(self.min_scale, 1.0)))
        top = int(torch.randint(0, h - side + 1, ()))
        left = int(torch.randint(0, w - side + 1, ()))
        crop = image[:, top : top + side, left : left + side]
        view = F.interpolate(crop[None], size=(h, w), mode="bilinear", align_corners=False)[0]
        if torch.rand(()) < 0.5:
            view = view.flip(-1)
        gain = torch.empty(()).uniform_(0.7, 1.3)
        view = (view - view.mean()) * gain + view.mean()
        return view + 0.03 * torch.randn_like(view)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        image = self.images[index]
        return self._augment(image), self._augment(image)
