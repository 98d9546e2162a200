"""The accord entry point of accord-medssl (``[project.entry-points.accord] medssl``).

Imports stay inside the hooks so that ``accord plugins`` does not pay for MONAI and nibabel.
"""

from __future__ import annotations

from pathlib import Path
from collections.abc import Callable

from accord import hookimpl
from accord.registry import Problem


def synth_msd(out_dir: str | Path, **options) -> Path:
    """``accord data synth medssl OUT``: MSD-layout abdomen CT phantoms (see :func:`accord_medssl.data.synth`)."""
    from accord_medssl.data import synth

    return synth(out_dir, **options)


def check_msd(root: str | Path) -> list[Problem]:
    """``accord data check medssl DIR``: an MSD dataset or a plain NIfTI folder (:func:`accord_medssl.data.check`)."""
    from accord_medssl.data import check

    return check(root)


@hookimpl
def plugin_info() -> dict[str, str]:
    return {
        "domain": "3D medical imaging",
        "description": "self-supervised CT/MR pretraining (Alice, GEMINI, GVSL) on MSD and NIfTI-folder data",
    }


@hookimpl
def register_datasets(register: Callable[..., None]) -> None:
    register(
        "msd",
        synth=synth_msd,
        check=check_msd,
        description="Medical Segmentation Decathlon layout (dataset.json, imagesTr/labelsTr/imagesTs) "
        "or a plain folder of NIfTI CTs",
    )
