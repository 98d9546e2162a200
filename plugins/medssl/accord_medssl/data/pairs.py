"""Registration phantoms: cases deformed from one anatomical template, with their deformation fields.

``accord data synth medssl OUT kind=pairs`` renders one abdomen CT phantom
(:func:`~accord_medssl.data.phantom.render_phantom`) as the template; ``kind=mni152`` takes
nilearn's MNI152 T1 template (real anatomy) with its grey / white-matter masks as labels
(:func:`mni152_template`). Either writes ``num_cases`` copies of the template, each under its own
random smooth displacement field, in the MSD layout (so every medssl reader and check applies)
plus the fields::

    OUT/dataset.json
    OUT/imagesTr/pair_NNN.nii.gz     # case(x) = template(x + flow(x)) (trilinear); int16 HU (pairs),
                                     # float32 in [0, 1] (mni152)
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
from accord_medssl.data.phantom import DEFAULT_SPACING, LABELS, _save_nifti, msd_header, render_phantom

__all__ = [
    "MNI152_LABELS",
    "MNI152_SHAPE",
    "PAIRS_SHAPE",
    "mni152_template",
    "random_smooth_flow",
    "synth_mni152",
    "synth_pairs",
    "write_deformed_cases",
]

PAIRS_SHAPE = (64, 64, 48)
#: nilearn's 2 mm MNI152 grid is 99 x 117 x 95; this keeps its aspect at about 4 mm.
MNI152_SHAPE = (48, 56, 48)
MNI152_LABELS = {0: "background", 1: "grey matter", 2: "white matter"}
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


def write_deformed_cases(root: str | Path, image: np.ndarray, label: np.ndarray, affine: np.ndarray, *,
                         num_cases: int, seed: int, max_fraction: float = MAX_DISPLACEMENT_FRACTION,
                         background: float = 0.0, description: dict) -> Path:
    """Write ``num_cases`` deformed copies of ``(image, label)`` in the layout of the module docstring.

    Args:
        root: output folder.
        image: ``(X, Y, Z)`` template; its dtype is the cases' dtype (integers are rounded).
        label: ``(X, Y, Z)`` integer labels of the template.
        affine: ``(4, 4)`` voxel-to-world affine of every written volume.
        num_cases: number of cases; case ``i``'s field depends only on ``(seed, i)``.
        max_fraction: largest displacement as a fraction of the smallest side (see :func:`random_smooth_flow`).
        background: intensity outside the view (air: -1024 HU), which the zero-padded warp fills in.
        description: the ``dataset.json`` fields besides the counts and file lists
            (:func:`~accord_medssl.data.phantom.msd_header`).
    """
    from accord_medssl.gemini.warp import warp

    root = Path(root)
    for folder in ("imagesTr", "labelsTr", "flows", "template"):
        (root / folder).mkdir(parents=True, exist_ok=True)
    _save_nifti(image, affine, root / "template" / "image.nii.gz")
    _save_nifti(label, affine, root / "template" / "label.nii.gz")
    template = torch.from_numpy(image.astype(np.float32))[None, None]
    template_label = torch.from_numpy(label.astype(np.float32))[None, None]
    training = []
    for index in range(num_cases):
        generator = torch.Generator().manual_seed(seed * 100_003 + index)
        flow = random_smooth_flow(image.shape, generator, max_fraction)[None]
        # Shift so that the warp's zero padding is the background intensity.
        case = (warp(template - background, flow)[0, 0] + background).numpy()
        case_label = warp(template_label, flow, mode="nearest")[0, 0]
        name = f"pair_{index:03d}.nii.gz"
        stored = (np.rint(case) if np.issubdtype(image.dtype, np.integer) else case).astype(image.dtype)
        _save_nifti(stored, affine, root / "imagesTr" / name)
        _save_nifti(case_label.numpy().astype(np.uint8), affine, root / "labelsTr" / name)
        _save_nifti(flow[0].movedim(0, -1).numpy().astype(np.float32), affine, root / "flows" / name)
        training.append({"image": f"./imagesTr/{name}", "label": f"./labelsTr/{name}"})
    description = {**description, "numTraining": num_cases, "numTest": 0, "training": training, "test": []}
    (root / DATASET_JSON).write_text(json.dumps(description, indent=4) + "\n")
    return root


def synth_pairs(out_dir: str | Path, num_cases: int = 6, shape: tuple[int, int, int] = PAIRS_SHAPE, seed: int = 0,
                spacing: tuple[float, float, float] = DEFAULT_SPACING,
                max_displacement: float = MAX_DISPLACEMENT_FRACTION) -> Path:
    """Write ``num_cases`` deformed copies of one abdomen CT phantom (layout in the module docstring).

    Case ``i`` depends only on ``(seed, i)``; the template only on ``seed``. ``max_displacement``:
    the largest displacement as a fraction of the smallest side.
    """
    hu, label, affine = render_phantom(tuple(shape), spacing, np.random.default_rng([seed, 10**6]))
    return write_deformed_cases(out_dir, hu, label, affine, num_cases=num_cases, seed=seed,
                                max_fraction=max_displacement, background=-1024.0, description=msd_header(
        "MedSSLRegistrationPairs",
        "Deformed copies of one abdomen CT phantom (accord-medssl); flows/ holds each case's displacement from the "
        "template in voxels (case(x) = template(x + flow(x))).",
        reference="accord-medssl synth kind=pairs", modality="CT", labels=LABELS))


def mni152_template(shape: tuple[int, int, int] = MNI152_SHAPE) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """nilearn's MNI152 T1 template (shipped with nilearn, 2 mm) and its tissue labels, resampled to ``shape``.

    The image (in [0, 1]) is resampled trilinearly; the labels (1 grey matter, 2 white matter, from
    nilearn's grey- and white-matter masks) by the largest of the trilinearly resampled background /
    grey / white indicator maps, so thin structures are kept where they dominate a voxel.

    Returns:
        ``(image float32 (X, Y, Z), label uint8 (X, Y, Z), affine (4, 4))``, the affine scaled to the new grid.

    Raises:
        ImportError: nilearn is not installed.
    """
    try:
        from nilearn import datasets
    except ImportError as error:
        raise ImportError("the MNI152 template needs nilearn: pip install 'accord-medssl[test]'") from error

    template = datasets.load_mni152_template(resolution=2)
    grey = datasets.load_mni152_gm_mask(resolution=2).get_fdata() > 0
    white = datasets.load_mni152_wm_mask(resolution=2).get_fdata() > 0
    tissue = np.where(white, 2, np.where(grey, 1, 0))
    indicators = torch.from_numpy(np.stack([tissue == k for k in MNI152_LABELS]).astype(np.float32))[None]
    image = torch.from_numpy(template.get_fdata(dtype=np.float32))[None, None]
    resized = F.interpolate(image, size=tuple(shape), mode="trilinear", align_corners=True)[0, 0]
    label = F.interpolate(indicators, size=tuple(shape), mode="trilinear", align_corners=True)[0].argmax(0)
    # align_corners=True maps the first and last voxel centres onto each other.
    scale = [(old - 1) / (new - 1) for old, new in zip(template.shape, shape)]
    affine = template.affine @ np.diag([*scale, 1.0])
    return resized.clamp(0, 1).numpy(), label.numpy().astype(np.uint8), affine


def synth_mni152(out_dir: str | Path, num_cases: int = 6, shape: tuple[int, int, int] = MNI152_SHAPE, seed: int = 0,
                 max_displacement: float = MAX_DISPLACEMENT_FRACTION) -> Path:
    """Write ``num_cases`` deformed copies of the MNI152 T1 template with grey / white-matter labels
    (:func:`mni152_template` at ``shape``; layout in the module docstring)."""
    image, label, affine = mni152_template(tuple(shape))
    return write_deformed_cases(out_dir, image, label, affine, num_cases=num_cases, seed=seed,
                                max_fraction=max_displacement, description=msd_header(
        "MedSSLMNI152Pairs",
        "Deformed copies of nilearn's MNI152 T1 template (ICBM 2009, resampled) with its grey and white matter masks "
        "as labels; flows/ holds each case's displacement from the template in voxels.",
        reference="accord-medssl synth kind=mni152 (template: nilearn.datasets.load_mni152_template)", modality="MR",
        labels=MNI152_LABELS, licence="see the MNI ICBM 2009 template licence shipped with nilearn"))
