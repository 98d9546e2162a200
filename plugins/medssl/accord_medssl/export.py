"""``accord export CKPT --format monai``: an Alice checkpoint's SwinUNETR as a MONAI weights file.

Export only: loading weights for training lives in :mod:`accord_medssl.weights`, which also
documents the MONAI weights file format.
"""

from __future__ import annotations

from pathlib import Path

from monai.networks.nets import SwinUNETR

from accord_medssl.weights import alice_backbone, save_monai_weights

__all__ = ["export_monai"]


def export_monai(checkpoint: str | Path, out: str | Path) -> Path:
    """``accord export CKPT --format monai --out FILE``: an Alice checkpoint's student SwinUNETR.

    The weights include the reconstruction head (``out.*``, one channel per input channel), so
    ``SwinUNETR(**kwargs)`` with the saved kwargs loads them with ``strict=True``; for a
    segmentation network with other ``out_channels``, load with ``strict=False`` and expect only
    ``out.*`` to be missing.

    Raises:
        ValueError: not an Alice checkpoint, or weights that do not fit the recorded architecture.
    """
    options, state, step = alice_backbone(checkpoint)
    kwargs = options.monai_kwargs()
    try:
        SwinUNETR(**kwargs).load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise ValueError(f"{checkpoint}: weights do not fit the architecture recorded in the checkpoint: {exc}") from None
    provenance = {"source_checkpoint": str(Path(checkpoint).absolute()), "step": step, "weights": "student"}
    return save_monai_weights(state, kwargs, out, provenance)
