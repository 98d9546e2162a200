"""Registration phantoms: cases deformed from one anatomical template, with their deformation fields.

``accord data synth medssl OUT --dataset gemini_pairs`` renders one abdomen CT phantom
(:func:`~accord_medssl.data.phantom.render_phantom`) as the template and writes ``num_cases``
copies of it, each under its own random smooth displacement field, in the MSD layout (so every
medssl reader and check applies) plus the fields::

    OUT/dataset.json
    OUT/imagesTr/pair_NNN.nii.gz     # int16 HU: case(x) = template(x + flow(x)) (trilinear)
    OUT/labelsTr/pair_NNN.nii.gz     # uint8 labels of the template, warped with nearest
    OUT/flows/pair_NNN.nii.gz        # float32 (X, Y, Z, 3): flow in voxels, component i along axis i
    OUT/template/{image,label}.nii.gz

The same structure therefore sits at known, different places in every case: the labels score a
registration between any two cases (Dice of the warped label), and the fields give the exact
correspondence (case j's voxel x shows template point x + flow_j(x)).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from accord_medssl.data.layout import DATASET_JSON
from accord_medssl.data.phantom import DEFAULT_SPACING, LABELS, _save_nifti, render_phantom

__all__ = ["PAIRS_SHAPE", "random_smooth_flow", "synth_pairs"]

PAIRS_SHAPE = (64, 64, 48)
#: Largest displacement as a fraction of the smallest side; with 4 control points per axis the field
#: changes over ~1/3 of the view, which keeps |grad flow| < 1 (no folding).
MAX_DISPLACEMENT_FRACTION = 0.1
_CONTROL_POINTS = 4


def random_smooth_flow(shape: tuple[int, ...], generator: torch.Generator,
                       max_fraction: float = MAX_DISPLACEMENT_FRACTION) -> torch.Tensor:
    """A smooth random displacement ``(d, *shape)`` in voxels: random control-point values on a
    ``4^d`` grid, (tri)linearly upsampled and scaled so the largest component is ``max_fraction`` of
    the smallest side."""
    dims = len(shape)
    coarse = torch.randn((1, dims, *[_CONTROL_POINTS] * dims), generator=generator)
    mode = "trilinear" if dims == 3 else "bilinear"
    flow = F.interpolate(coarse, size=tuple(shape), mode=mode, align_corners=True)[0]
    return flow * (max_fraction * min(shape) / flow.abs().max())


def synth_pairs(out_dir: str | Path, num_cases: int = 6, shape: tuple[int, int, int] = PAIRS_SHAPE, seed: int = 0,
                spacing: tuple[float, float, float] = DEFAULT_SPACING) -> Path:
    """Write ``num_cases`` deformed copies of one phantom template (layout in the module docstring).

    Case ``i`` depends only on ``(seed, i)``; the template only on ``seed``.
    """
    from accord_medssl.gemini.warp import warp

    root = Path(out_dir)
    for folder in ("imagesTr", "labelsTr", "flows", "template"):
        (root / folder).mkdir(parents=True, exist_ok=True)
    hu, label, affine = render_phantom(shape, spacing, np.random.default_rng([seed, 10**6]))
    _save_nifti(hu, affine, root / "template" / "image.nii.gz")
    _save_nifti(label, affine, root / "template" / "label.nii.gz")
    template = torch.from_numpy(hu.astype(np.float32))[None, None]
    template_label = torch.from_numpy(label.astype(np.float32))[None, None]
    training = []
    for index in range(num_cases):
        flow = random_smooth_flow(shape, torch.Generator().manual_seed(seed * 100_003 + index))[None]
        # Air outside the view: warp HU above air so the zero padding is air.
        image = warp(template + 1024, flow)[0, 0] - 1024
        case_label = warp(template_label, flow, mode="nearest")[0, 0]
        name = f"pair_{index:03d}.nii.gz"
        _save_nifti(np.rint(image.numpy()).astype(np.int16), affine, root / "imagesTr" / name)
        _save_nifti(case_label.numpy().astype(np.uint8), affine, root / "labelsTr" / name)
        _save_nifti(flow[0].movedim(0, -1).numpy().astype(np.float32), affine, root / "flows" / name)
        training.append({"image": f"./imagesTr/{name}", "label": f"./labelsTr/{name}"})
    description = {
        "name": "MedSSLRegistrationPairs",
        "description": "Deformed copies of one abdomen CT phantom (accord-medssl); flows/ holds each case's "
                       "displacement from the template in voxels (case(x) = template(x + flow(x))).",
        "reference": "accord-medssl synth --dataset gemini_pairs",
        "licence": "CC0 1.0",
        "release": "0.1.0",
        "tensorImageSize": "3D",
        "modality": {"0": "CT"},
        "labels": {str(key): name for key, name in LABELS.items()},
        "numTraining": num_cases,
        "numTest": 0,
        "training": training,
        "test": [],
    }
    (root / DATASET_JSON).write_text(json.dumps(description, indent=4) + "\n")
    return root
