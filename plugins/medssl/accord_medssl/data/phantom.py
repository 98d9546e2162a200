"""Synthetic abdomen CT phantoms written in the Medical Segmentation Decathlon layout.

Each case is a small non-contrast abdominal CT: air outside an elliptic body with subcutaneous fat,
an abdominal-wall and paraspinal muscle layer, a mottled fat/bowel interior with a few gas pockets,
and labelled organs (liver, spleen, both kidneys with cortex and medulla, the spine with
intervertebral discs and the aorta). Organ centres, radii and in-plane rotation are jittered per
case, then a smooth random displacement field bends everything, so the same organ in two cases is
a genuine cross-volume correspondence with different position, size and shape. Gaussian noise of
10-18 HU is added after a slight point-spread blur.

The displacement warps the *coordinates* at which the analytic anatomy is evaluated (a pull-back,
the same as resampling a rendered volume through the field) instead of resampling rendered
volumes: it is exact, keeps labels and CT consistent without nearest-neighbour jaggies, and costs
tens of milliseconds where a B-spline resample (TorchIO/SimpleITK) costs ~0.45 s per volume.

Frames: the arrays are stored with voxel axes running to patient Left, Posterior, Superior
(``nibabel.aff2axcodes == ("L", "P", "S")``, i.e. the affine has negative x and y scales), the
usual order of DICOM-derived CT, with the volume centre at world (RAS) origin. The anatomy is
scaled to the field of view, so any ``shape`` gives a complete (if small) abdomen.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
import torch.nn.functional as F
from monai.transforms import GaussianSmooth

from accord_medssl.data.layout import DATASET_JSON

__all__ = ["LABELS", "AXCODES", "DEFAULT_SHAPE", "DEFAULT_SPACING", "msd_header", "phantom_affine", "render_phantom", "synth"]

#: Label ids as written to dataset.json (MSD convention: string keys, "0" is background).
LABELS: dict[int, str] = {
    0: "background",
    1: "liver",
    2: "spleen",
    3: "kidney_right",
    4: "kidney_left",
    5: "spine",
    6: "aorta",
}
_ID = {name: label_id for label_id, name in LABELS.items()}
#: Voxel-axis directions of the written volumes (see the module docstring).
AXCODES = ("L", "P", "S")
DEFAULT_SHAPE = (96, 96, 64)
DEFAULT_SPACING = (1.5, 1.5, 2.0)

# Hounsfield units of a non-contrast abdominal CT.
AIR_HU, FAT_HU, MUSCLE_HU, CSF_HU, DISC_HU, GAS_HU = -1000.0, -100.0, 45.0, 10.0, 90.0, -950.0
LIVER_HU, SPLEEN_HU, AORTA_HU = 60.0, 50.0, 40.0
KIDNEY_CORTEX_HU, KIDNEY_MEDULLA_HU = 38.0, 24.0
CORTICAL_BONE_HU, CANCELLOUS_BONE_HU, POSTERIOR_ELEMENT_HU = 700.0, 300.0, 500.0
# Radii of the body rings, in units of the body's semi-axes.
BODY_SKIN, ABDOMINAL_WALL, CAVITY = 1.0, 0.9, 0.84
# Vertebral height and disc thickness along z, in mm (a real spine scaled like the body, ~0.4x).
VERTEBRA_PERIOD_MM, DISC_MM = 14.0, 3.0
# Peak displacement as a fraction of the field of view (about 6 mm at 144 mm), carried by a few
# sine modes of at most ~1.2 periods across the view: organs bend but the field does not fold.
DEFORMATION_FRACTION = 0.04
DEFORMATION_MODES = 4
NOISE_HU = (10.0, 18.0)
PSF_SIGMA_VOXELS = 0.7


@dataclass(frozen=True)
class _Ellipsoid:
    """An ellipsoid in body-normalised coordinates (u: patient right, v: anterior, w: superior).

    ``radii[2] = inf`` makes it a cylinder along z; ``yaw`` rotates it in the axial plane (radians).
    """

    centre: tuple[float, float, float]
    radii: tuple[float, float, float]
    yaw: float = 0.0

    def level(self, u: np.ndarray, v: np.ndarray, w: np.ndarray) -> np.ndarray:
        """Squared ellipsoidal radius: ``<= 1`` inside. Inputs broadcast to ``(X, Y, Z)``."""
        du, dv, dw = u - self.centre[0], v - self.centre[1], w - self.centre[2]
        cos, sin = np.cos(self.yaw), np.sin(self.yaw)
        return (
            ((cos * du + sin * dv) / self.radii[0]) ** 2
            + ((-sin * du + cos * dv) / self.radii[1]) ** 2
            + (dw / self.radii[2]) ** 2
        )

    def jittered(self, rng: np.random.Generator, shift: float = 0.05, scale: float = 0.15) -> _Ellipsoid:
        """The same organ in another patient: shifted centre, rescaled radii, rotated a little."""
        return _Ellipsoid(
            centre=tuple(np.asarray(self.centre) + rng.uniform(-shift, shift, 3)),
            radii=tuple(np.asarray(self.radii) * rng.uniform(1 - scale, 1 + scale, 3)),
            yaw=self.yaw + rng.uniform(-np.pi / 18, np.pi / 18),
        )


_INF = float("inf")
# The mean anatomy (+u is the patient's right): liver right and anterior, spleen posterior-left,
# kidneys posterior on both sides, aorta left-anterior of the vertebral body.
_LIVER_RIGHT_LOBE = _Ellipsoid((0.40, 0.10, 0.40), (0.42, 0.50, 0.50))
_LIVER_LEFT_LOBE = _Ellipsoid((0.00, 0.30, 0.50), (0.35, 0.25, 0.30))
_SPLEEN = _Ellipsoid((-0.55, -0.30, 0.40), (0.20, 0.30, 0.30), yaw=np.pi / 6)
_KIDNEY_RIGHT = _Ellipsoid((0.45, -0.45, -0.35), (0.15, 0.20, 0.38), yaw=-np.pi / 9)
_KIDNEY_LEFT = _Ellipsoid((-0.45, -0.45, -0.35), (0.15, 0.20, 0.38), yaw=np.pi / 9)
_VERTEBRAL_BODY = _Ellipsoid((0.0, -0.48, 0.0), (0.14, 0.17, _INF))
_SPINAL_CANAL = _Ellipsoid((0.0, -0.72, 0.0), (0.06, 0.06, _INF))
_SPINOUS_PROCESS = _Ellipsoid((0.0, -0.83, 0.0), (0.04, 0.06, _INF))
_PARASPINAL = (_Ellipsoid((0.2, -0.72, 0.0), (0.16, 0.14, _INF)), _Ellipsoid((-0.2, -0.72, 0.0), (0.16, 0.14, _INF)))
_AORTA = _Ellipsoid((-0.10, -0.25, 0.0), (0.07, 0.085, _INF))
# Fraction of a kidney's radius that is medulla/sinus; the rest is cortex.
_KIDNEY_MEDULLA_FRACTION = 0.6
# Fraction of the vertebral body's radius inside the cortical shell.
_CANCELLOUS_FRACTION = 0.75


def phantom_affine(shape: tuple[int, int, int], spacing: tuple[float, float, float]) -> np.ndarray:
    """The ``(4, 4)`` voxel-to-RAS affine of a phantom: axes L, P, S, volume centre at the origin."""
    affine = np.diag([-spacing[0], -spacing[1], spacing[2], 1.0])
    affine[:3, 3] = -affine[:3, :3] @ ((np.asarray(shape) - 1) / 2)
    return affine


def _smooth_field(shape: tuple[int, int, int], rng: np.random.Generator, cells: int = 6) -> np.ndarray:
    """Low-frequency noise in [0, 1]: a coarse uniform grid trilinearly upsampled to ``shape``."""
    coarse = torch.from_numpy(rng.random((1, 1, cells, cells, cells), dtype=np.float32))
    return F.interpolate(coarse, size=shape, mode="trilinear", align_corners=True)[0, 0].numpy()


def _smooth_displacement(grid: tuple[np.ndarray, np.ndarray, np.ndarray], rng: np.random.Generator) -> list[np.ndarray]:
    """A smooth random displacement field: a few random low-frequency sine modes per component.

    Args:
        grid: voxel-centre coordinates normalised to [-1, 1] across the field of view, shaped
            ``(X, 1, 1)``, ``(1, Y, 1)``, ``(1, 1, Z)``.
        rng: source of the modes.

    Returns:
        Three ``(X, Y, Z)`` arrays, the displacement along each axis in the same normalised units,
        each bounded by :data:`DEFORMATION_FRACTION` times 2 (i.e. a fraction of the field of view).
    """
    field = []
    for _ in range(3):
        frequencies = rng.uniform(0.3, 1.2, (DEFORMATION_MODES, 3)) * rng.choice([-1.0, 1.0], (DEFORMATION_MODES, 3))
        phases = rng.uniform(0.0, 2 * np.pi, DEFORMATION_MODES)
        weights = rng.dirichlet(np.ones(DEFORMATION_MODES)) * 2 * DEFORMATION_FRACTION
        field.append(
            sum(
                weight * np.sin(np.pi * (f[0] * grid[0] + f[1] * grid[1] + f[2] * grid[2]) + phase)
                for f, phase, weight in zip(frequencies, phases, weights, strict=True)
            )
        )
    return field


def render_phantom(
    shape: tuple[int, int, int] = DEFAULT_SHAPE,
    spacing: tuple[float, float, float] = DEFAULT_SPACING,
    rng: np.random.Generator | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Render one abdomen CT phantom.

    Args:
        shape: voxels along the (L, P, S) axes.
        spacing: voxel size in mm along the same axes.
        rng: source of the case's anatomy and noise (default: a fresh unseeded generator).

    Returns:
        ``hu`` ``(X, Y, Z)`` int16 Hounsfield units, ``label`` ``(X, Y, Z)`` uint8 ids of
        :data:`LABELS`, and the ``(4, 4)`` voxel-to-RAS ``affine``.
    """
    rng = rng if rng is not None else np.random.default_rng()
    affine = phantom_affine(shape, spacing)
    fov_mm = np.asarray(spacing) * np.asarray(shape)
    # Voxel-centre world (RAS) coordinates over the half field of view, broadcasting to (X, Y, Z).
    half_fov = fov_mm / 2
    grid = (
        ((affine[0, 0] * np.arange(shape[0]) + affine[0, 3]) / half_fov[0]).astype(np.float32)[:, None, None],
        ((affine[1, 1] * np.arange(shape[1]) + affine[1, 3]) / half_fov[1]).astype(np.float32)[None, :, None],
        ((affine[2, 2] * np.arange(shape[2]) + affine[2, 3]) / half_fov[2]).astype(np.float32)[None, None, :],
    )
    # Anatomy is evaluated at displaced points: (X, Y, Z) world coordinates in mm.
    x, y, z = ((g + d) * h for g, d, h in zip(grid, _smooth_displacement(grid, rng), half_fov, strict=True))

    # Body-normalised coordinates; the body is a per-case ellipse that widens slightly upwards.
    w = z / half_fov[2]
    half_width = 0.42 * fov_mm[0] * rng.uniform(0.9, 1.05) * (1 + 0.06 * w)
    half_depth = 0.34 * fov_mm[1] * rng.uniform(0.9, 1.05)
    u = (x - rng.uniform(-0.03, 0.03) * fov_mm[0]) / half_width
    v = (y - rng.uniform(-0.03, 0.03) * fov_mm[1]) / half_depth
    body_radius = np.sqrt(u**2 + v**2)

    hu = np.full(shape, AIR_HU, dtype=np.float32)
    label = np.zeros(shape, dtype=np.uint8)
    hu[body_radius <= BODY_SKIN] = FAT_HU
    hu[body_radius <= ABDOMINAL_WALL] = MUSCLE_HU
    cavity = body_radius <= CAVITY
    # Mottled visceral fat (-95 HU) and bowel (+25 HU) with soft transitions between them.
    bowel_fraction = np.clip((_smooth_field(shape, rng) - 0.35) / 0.3, 0.0, 1.0)
    hu[cavity] = (-95.0 + 120.0 * bowel_fraction)[cavity]
    for _ in range(rng.integers(2, 6)):
        gas = _Ellipsoid(
            (rng.uniform(-0.5, 0.5), rng.uniform(-0.2, 0.6), rng.uniform(-0.9, 0.3)), tuple(rng.uniform(0.04, 0.09, 3))
        )
        hu[cavity & (gas.level(u, v, w) <= 1)] = GAS_HU
    for muscle in _PARASPINAL:
        hu[(muscle.jittered(rng, shift=0.02).level(u, v, w) <= 1) & (body_radius <= ABDOMINAL_WALL)] = MUSCLE_HU

    def paint(mask: np.ndarray, value: float, label_id: int | None) -> None:
        hu[mask] = value
        if label_id is not None:
            label[mask] = label_id

    vertebral_body = _VERTEBRAL_BODY.jittered(rng, shift=0.02, scale=0.08)
    vertebral_level = vertebral_body.level(u, v, w)
    in_disc = ((z - rng.uniform(0, VERTEBRA_PERIOD_MM)) % VERTEBRA_PERIOD_MM) < DISC_MM
    paint((vertebral_level <= 1) & ~in_disc, CORTICAL_BONE_HU, _ID["spine"])
    paint((vertebral_level <= _CANCELLOUS_FRACTION**2) & ~in_disc, CANCELLOUS_BONE_HU, _ID["spine"])
    paint((vertebral_level <= 1) & in_disc, DISC_HU, None)
    paint(_SPINAL_CANAL.level(u, v, w) <= 1, CSF_HU, None)
    paint(_SPINOUS_PROCESS.jittered(rng, shift=0.01, scale=0.1).level(u, v, w) <= 1, POSTERIOR_ELEMENT_HU, _ID["spine"])
    paint(_AORTA.jittered(rng, shift=0.03, scale=0.1).level(u, v, w) <= 1, AORTA_HU, _ID["aorta"])

    liver = (_LIVER_RIGHT_LOBE.jittered(rng).level(u, v, w) <= 1) | (_LIVER_LEFT_LOBE.jittered(rng).level(u, v, w) <= 1)
    paint(liver & cavity, LIVER_HU, _ID["liver"])
    paint((_SPLEEN.jittered(rng).level(u, v, w) <= 1) & cavity, SPLEEN_HU, _ID["spleen"])
    for kidney, label_id in ((_KIDNEY_RIGHT, _ID["kidney_right"]), (_KIDNEY_LEFT, _ID["kidney_left"])):
        kidney_level = kidney.jittered(rng).level(u, v, w)
        paint((kidney_level <= 1) & cavity, KIDNEY_CORTEX_HU, label_id)
        paint((kidney_level <= _KIDNEY_MEDULLA_FRACTION**2) & cavity, KIDNEY_MEDULLA_HU, label_id)

    # Partial-volume blur of the scanner's point-spread function, then quantum noise. The blur
    # zero-pads, so it runs on HU above air: the padding is then air, not a 0 HU frame.
    hu = GaussianSmooth(sigma=PSF_SIGMA_VOXELS)(hu[None] - AIR_HU)[0].numpy() + AIR_HU
    hu = hu + rng.normal(0.0, rng.uniform(*NOISE_HU), shape).astype(np.float32)
    # The usual stored CT range (12-bit detector values shifted by -1024).
    return np.clip(np.rint(hu), -1024, 3071).astype(np.int16), label, affine


def _save_nifti(array: np.ndarray, affine: np.ndarray, path: Path) -> None:
    image = nib.Nifti1Image(array, affine)
    # Code 1 ("scanner") for both forms, as DICOM converters write them.
    image.set_qform(affine, code=1)
    image.set_sform(affine, code=1)
    image.header.set_xyzt_units("mm", "sec")
    nib.save(image, path)



def msd_header(name: str, description: str, *, reference: str, modality: str, labels: dict[int, str],
               licence: str = "CC0 1.0") -> dict:
    """The ``dataset.json`` fields of a generated 3D MSD dataset besides its counts and file lists."""
    return {"name": name, "description": description, "reference": reference, "licence": licence,
            "release": "0.1.0", "tensorImageSize": "3D", "modality": {"0": modality},
            "labels": {str(key): label for key, label in labels.items()}}

def synth(
    out_dir: str | Path,
    num_train: int = 6,
    num_test: int = 2,
    shape: tuple[int, int, int] = DEFAULT_SHAPE,
    seed: int = 0,
    spacing: tuple[float, float, float] = DEFAULT_SPACING,
) -> Path:
    """Write an MSD-layout dataset of abdomen CT phantoms and return its root.

    Writes ``imagesTr/phantom_NNN.nii.gz`` (int16 HU) with ``labelsTr/phantom_NNN.nii.gz`` (uint8
    ids of :data:`LABELS`) for the first ``num_train`` cases, ``imagesTs/`` for the next
    ``num_test`` (unlabelled, as in MSD), and ``dataset.json``. Case ``i`` depends only on
    ``(seed, i)``.

    Args:
        out_dir: dataset root; created if missing, existing files of the same names are overwritten.
        num_train: labelled training cases.
        num_test: unlabelled test cases.
        shape: voxels per case along the (L, P, S) axes.
        seed: base seed.
        spacing: voxel size in mm.
    """
    root = Path(out_dir)
    for folder in ("imagesTr", "labelsTr", "imagesTs"):
        (root / folder).mkdir(parents=True, exist_ok=True)
    training, test = [], []
    for index in range(num_train + num_test):
        hu, label, affine = render_phantom(shape, spacing, np.random.default_rng([seed, index]))
        name = f"phantom_{index:03d}.nii.gz"
        if index < num_train:
            _save_nifti(hu, affine, root / "imagesTr" / name)
            _save_nifti(label, affine, root / "labelsTr" / name)
            training.append({"image": f"./imagesTr/{name}", "label": f"./labelsTr/{name}"})
        else:
            _save_nifti(hu, affine, root / "imagesTs" / name)
            test.append(f"./imagesTs/{name}")
    description = {
        **msd_header("MedSSLPhantoms",
                     "Synthetic non-contrast abdominal CT phantoms (accord-medssl). Voxel axes "
                     f"{''.join(AXCODES)}, spacing {spacing[0]} x {spacing[1]} x {spacing[2]} mm, int16 HU.",
                     reference="accord-medssl synth", modality="CT", labels=LABELS),
        "numTraining": num_train,
        "numTest": num_test,
        "training": training,
        "test": test,
    }
    (root / DATASET_JSON).write_text(json.dumps(description, indent=4) + "\n")
    return root
