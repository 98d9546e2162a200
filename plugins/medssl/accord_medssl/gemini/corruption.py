"""Models-Genesis appearance corruption, as GEMINI-MIP applies it (medssl §2.7), as MONAI transforms.

In this order on the un-augmented image (values in [0, 1]), before the shared spatial transform:

1. :class:`RandLocalPixelShuffle` (probability 0.8): 5000 random blocks of at most ``dim/20`` voxels
   per axis, each with its voxels permuted;
2. :class:`RandBezierIntensity` (probability 0.9): a monotone Bézier curve through (0, 0), two
   random control points and (1, 1), applied with ``np.interp``;
3. :class:`RandInPaint` (always): up to 30 boxes (the loop continues with probability 0.95 per box)
   of ``U[dim/10, dim/5)`` voxels per axis, at least 3 voxels from the borders, filled with U(0, 1)
   noise;
4. :class:`RandOutPaint` (Models Genesis; probability 0 in GEMINI, which stores but never uses it):
   noise everywhere but a few boxes of the image.

MONAI has only approximations (``RandCoarseShuffle`` shuffles across a whole hole, ``RandCoarseDropout``
and ``RandHistogramShift`` draw other shapes), so these are written out. Each is a
``RandomizableTransform``: its randomness comes from ``self.R``, which :func:`genesis_corruption`'s
``Compose`` seeds (the GEMINI datasets reseed it per sample from the run's torch generator).
"""

from __future__ import annotations

import math

import numpy as np
import torch
from monai.transforms import Compose, RandomizableTransform
from pydantic import Field

from accord.config import StrictModel

__all__ = [
    "CorruptionOptions",
    "RandBezierIntensity",
    "RandInPaint",
    "RandLocalPixelShuffle",
    "RandOutPaint",
    "genesis_corruption",
]


def _as_array(image: np.ndarray | torch.Tensor) -> np.ndarray:
    return image.detach().cpu().numpy().copy() if isinstance(image, torch.Tensor) else np.array(image, copy=True)


class RandLocalPixelShuffle(RandomizableTransform):
    """Permute the voxels inside ``num_blocks`` random small blocks.

    Args:
        prob: chance of applying it.
        num_blocks: blocks per image (5000 in GEMINI).
        max_fraction: largest block side as a fraction of each axis (1/20), at least one voxel.
    """

    def __init__(self, prob: float = 0.8, num_blocks: int = 5000, max_fraction: float = 1 / 20):
        super().__init__(prob)
        self.num_blocks = num_blocks
        self.max_fraction = max_fraction

    def __call__(self, image: np.ndarray | torch.Tensor) -> torch.Tensor:
        """``image``: ``(C, *spatial)``; returns a float32 tensor of the same shape."""
        self.randomize(None)
        array = _as_array(image)
        if self._do_transform:
            spatial = array.shape[1:]
            for _ in range(self.num_blocks):
                size = [int(self.R.randint(1, max(1, int(n * self.max_fraction)) + 1)) for n in spatial]
                start = [int(self.R.randint(0, n - s + 1)) for n, s in zip(spatial, size)]
                box = (slice(None), *[slice(a, a + s) for a, s in zip(start, size)])
                block = array[box]
                flat = block.reshape(block.shape[0], -1)
                array[box] = flat[:, self.R.permutation(flat.shape[1])].reshape(block.shape)
        return torch.as_tensor(array, dtype=torch.float32)


class RandBezierIntensity(RandomizableTransform):
    """Map intensities in [0, 1] through a random monotone cubic Bézier curve from (0, 0) to (1, 1)."""

    def __init__(self, prob: float = 0.9, samples: int = 1000):
        super().__init__(prob)
        self.samples = samples

    def __call__(self, image: np.ndarray | torch.Tensor) -> torch.Tensor:
        self.randomize(None)
        array = _as_array(image)
        if self._do_transform:
            controls = np.array([[0.0, 0.0], self.R.rand(2), self.R.rand(2), [1.0, 1.0]])
            t = np.linspace(0.0, 1.0, self.samples)[:, None]
            bernstein = np.stack([math.comb(3, k) * t[:, 0] ** k * (1 - t[:, 0]) ** (3 - k) for k in range(4)], axis=1)
            curve = bernstein @ controls
            # Sorting both coordinates makes the curve monotone increasing, as np.interp needs.
            array = np.interp(array, np.sort(curve[:, 0]), np.sort(curve[:, 1])).astype(np.float32)
        return torch.as_tensor(array, dtype=torch.float32)


class RandInPaint(RandomizableTransform):
    """Fill up to ``max_boxes`` random boxes with U(0, 1) noise (always applied in GEMINI).

    Args:
        max_boxes: upper bound on the boxes (30).
        continue_prob: chance of drawing each next box (0.95), also for the first.
        size_range: box side as fractions ``[low, high)`` of each axis (1/10, 1/5).
        margin: smallest distance of a box from the border, voxels (3).
    """

    def __init__(self, prob: float = 1.0, max_boxes: int = 30, continue_prob: float = 0.95,
                 size_range: tuple[float, float] = (0.1, 0.2), margin: int = 3):
        super().__init__(prob)
        self.max_boxes, self.continue_prob, self.size_range, self.margin = max_boxes, continue_prob, size_range, margin

    def _box(self, spatial: tuple[int, ...]) -> tuple[slice, ...] | None:
        sizes = [int(self.R.randint(max(1, int(n * self.size_range[0])), max(2, int(n * self.size_range[1])))) for n in spatial]
        if any(n - s - 2 * self.margin < 0 for n, s in zip(spatial, sizes)):
            return None  # the image is too small for a box with its margins
        starts = [int(self.R.randint(self.margin, n - s - self.margin + 1)) for n, s in zip(spatial, sizes)]
        return tuple(slice(a, a + s) for a, s in zip(starts, sizes))

    def __call__(self, image: np.ndarray | torch.Tensor) -> torch.Tensor:
        self.randomize(None)
        array = _as_array(image)
        if self._do_transform:
            spatial = array.shape[1:]
            for _ in range(self.max_boxes):
                if self.R.rand() >= self.continue_prob:
                    break
                box = self._box(spatial)
                if box is not None:
                    region = array[(slice(None), *box)]
                    array[(slice(None), *box)] = self.R.rand(*region.shape)
        return torch.as_tensor(array, dtype=torch.float32)


class RandOutPaint(RandInPaint):
    """Models Genesis out-painting: noise everywhere except up to ``max_boxes`` boxes of the image."""

    def __init__(self, prob: float = 0.0, max_boxes: int = 5, continue_prob: float = 0.95,
                 size_range: tuple[float, float] = (0.5, 0.8), margin: int = 3):
        super().__init__(prob, max_boxes, continue_prob, size_range, margin)

    def __call__(self, image: np.ndarray | torch.Tensor) -> torch.Tensor:
        self.randomize(None)
        original = _as_array(image)
        if not self._do_transform:
            return torch.as_tensor(original, dtype=torch.float32)
        array = self.R.rand(*original.shape).astype(np.float32)
        spatial = original.shape[1:]
        for index in range(self.max_boxes):
            if index and self.R.rand() >= self.continue_prob:  # the first box is always kept
                break
            box = self._box(spatial)
            if box is not None:
                array[(slice(None), *box)] = original[(slice(None), *box)]
        return torch.as_tensor(array, dtype=torch.float32)


class CorruptionOptions(StrictModel):
    """Probabilities of the Models-Genesis corruption (GEMINI's values by default)."""

    shuffle_probability: float = Field(0.8, ge=0, le=1, description="local pixel shuffling")
    shuffle_blocks: int = Field(5000, ge=0, description="blocks shuffled per image")
    intensity_probability: float = Field(0.9, ge=0, le=1, description="non-linear Bezier intensity map")
    inpaint_probability: float = Field(1.0, ge=0, le=1, description="in-painting (always in GEMINI)")
    outpaint_probability: float = Field(0.0, ge=0, le=1, description="out-painting (unused in GEMINI)")


def genesis_corruption(options: CorruptionOptions = CorruptionOptions()) -> Compose:
    """The corruption pipeline ``t`` of GEMINI-MIP: ``(C, *spatial)`` in [0, 1] -> float32 tensor."""
    return Compose([
        RandLocalPixelShuffle(options.shuffle_probability, options.shuffle_blocks),
        RandBezierIntensity(options.intensity_probability),
        RandInPaint(options.inpaint_probability),
        RandOutPaint(options.outpaint_probability),
    ])
