"""GEMINI samples: pairs of *different* images, one shared spatial transform, the corrupted copy.

Per sample (medssl §2.6-2.7): image A is the dataset's item, B a random other image (from the same
group where groups exist, e.g. chest X-ray view x sex); with restoration, ``t(A)`` is A under the
Models-Genesis corruption (:mod:`~accord_medssl.gemini.corruption`); then one random affine
(rotation +-20 degrees per axis, scale +-25 % per axis, zero padding; MONAI ``RandAffined``) moves
A, B and ``t(A)`` (and a labelled image and its label, nearest, for GEMINI-Semi) alike.

All randomness comes from the torch global generator, which the core trainer seeds from the run
seed and stores in its checkpoints: B's index and one seed per sample that reseeds the MONAI
transforms, so a resumed run draws the same samples as an uninterrupted one.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Literal

import torch
from monai.transforms import RandAffined, ResizeWithPadOrCrop
from torch.utils.data import Dataset

from accord_medssl.gemini.corruption import CorruptionOptions, genesis_corruption

__all__ = ["CT_CLIP", "GeminiPairs", "fixed_size", "normalise_intensity", "shared_affine"]

#: GVSL/GEMINI CT normalisation: HU + 1024 clipped to [0, 2048], divided by 2048.
CT_CLIP = 2048.0


def normalise_intensity(image: torch.Tensor, mode: Literal["minmax", "ct_clip", "none"]) -> torch.Tensor:
    """``minmax``: negatives to 0, then the volume's min-max to [0, 1] (a constant image gives 0);
    ``ct_clip``: ``clip(HU + 1024, 0, 2048) / 2048``; ``none``: unchanged (already in [0, 1])."""
    image = image.float()
    if mode == "ct_clip":
        return (image + 1024).clamp(0, CT_CLIP) / CT_CLIP
    if mode == "minmax":
        image = image.clamp_min(0)
        low, high = image.min(), image.max()
        return (image - low) / (high - low) if high > low else torch.zeros_like(image)
    return image


def shared_affine(keys: Sequence[str], spatial_dims: int, label_keys: Sequence[str] = ()) -> RandAffined:
    """GEMINI's spatial augmentation: one random rotation (+-pi/9 per axis) and per-axis scale (+-25 %)."""
    rotations = (math.pi / 9,) * (3 if spatial_dims == 3 else 1)
    modes = ["nearest" if key in label_keys else "bilinear" for key in keys]
    return RandAffined(list(keys), prob=1.0, rotate_range=rotations, scale_range=(0.25,) * spatial_dims,
                       mode=modes, padding_mode="zeros")


def _sample_seed() -> int:
    return int(torch.randint(2**31 - 1, ()))


class GeminiPairs(Dataset):
    """GEMINI-MIP / GEMINI-Semi samples over a list of images.

    Args:
        load: ``load(index) -> (C, *spatial)`` float image in [0, 1] of the expected size.
        count: number of images.
        groups: group id per image (a pair comes from one group), or None for one group.
        spatial_dims: 2 or 3.
        augment: apply :func:`shared_affine`.
        corruption: add ``corrupted_a`` (restoration), or None.
        labelled: ``labelled() -> {"labelled_image", "label"}``, a random labelled case for GEMINI-Semi
            (drawn from the torch generator), or None.

    Returns (per sample):
        ``image_a``, ``image_b`` and, as configured, ``corrupted_a`` ``(C, *spatial)``, and
        ``labelled_image`` ``(C, *spatial)`` with ``label`` ``(K, *spatial)``; float32.

    Raises:
        ValueError: fewer than two images, or a group with a single image.
    """

    def __init__(self, load: Callable[[int], torch.Tensor], count: int, *, groups: Sequence[str] | None = None,
                 spatial_dims: int = 3, augment: bool = True, corruption: CorruptionOptions | None = None,
                 labelled: Callable[[], dict[str, torch.Tensor]] | None = None):
        groups = list(groups) if groups is not None else ["all"] * count
        members: dict[str, list[int]] = {}
        for index, group in enumerate(groups):
            members.setdefault(group, []).append(index)
        lonely = [group for group, indices in members.items() if len(indices) < 2]
        if count < 2 or lonely:
            raise ValueError(f"GEMINI pairs two different images of one group; groups with fewer than two images: "
                             f"{lonely or ['all']}")
        self.load, self.count, self.groups, self.members = load, count, groups, members
        self.corrupt = genesis_corruption(corruption) if corruption is not None else None
        self.labelled = labelled
        keys = ["image_a", "image_b"] + (["corrupted_a"] if corruption is not None else [])
        keys += ["labelled_image", "label"] if labelled is not None else []
        self.affine = shared_affine(keys, spatial_dims, label_keys=["label"]) if augment else None

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        others = [other for other in self.members[self.groups[index]] if other != index]
        partner = others[int(torch.randint(len(others), ()))]
        sample = {"image_a": self.load(index), "image_b": self.load(partner)}
        if self.corrupt is not None:
            self.corrupt.set_random_state(seed=_sample_seed())
            sample["corrupted_a"] = self.corrupt(sample["image_a"])
        if self.labelled is not None:
            sample.update(self.labelled())
        if self.affine is not None:
            self.affine.set_random_state(seed=_sample_seed())
            sample = self.affine(sample)
        return {key: torch.as_tensor(value).as_subclass(torch.Tensor).float() for key, value in sample.items()}


def fixed_size(size: Sequence[int]) -> ResizeWithPadOrCrop:
    """Centre crop / zero pad to ``size`` (GEMINI trains on whole, fixed-size images)."""
    return ResizeWithPadOrCrop(tuple(size))
