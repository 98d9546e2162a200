"""Weights in and out of SuperFlow runs: the 3D backbone of a pretraining checkpoint.

Training code loads weights from here; :mod:`accord_superflow.export` only exports. Both go
through :func:`backbone_state_dict`, whose spconv 1.x kernel layout without module metadata is the
one every mmdet3d loading route converts the same way (see :mod:`accord_superflow.export`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from accord.training import load_checkpoint

__all__ = ["PRETRAIN_PREFIX", "MMDET3D_PREFIX", "to_spconv1_layout", "backbone_state_dict", "load_pretrained_backbone"]

PRETRAIN_PREFIX = "backbone_3d."
MMDET3D_PREFIX = "backbone."
# Metadata version mmdet3d gives spconv 2.x modules (``register_spconv2`` sets ``SparseModule._version``).
_SPCONV2_VERSION = 2


def to_spconv1_layout(kernel: torch.Tensor) -> torch.Tensor:
    """spconv 2.x kernel ``(out, kD, kH, kW, in)`` -> spconv 1.x / mmcv ``(kD, kH, kW, in, out)``."""
    return kernel.permute(1, 2, 3, 4, 0).contiguous()


def backbone_state_dict(model_state: dict[str, Any], prefix_to: str = MMDET3D_PREFIX) -> dict[str, torch.Tensor]:
    """The ``backbone_3d.*`` tensors of a SuperFlow state dict under ``prefix_to``, kernels in spconv 1.x layout.

    Args:
        model_state: the ``model`` entry of an accord checkpoint (a ``state_dict`` with its
            ``_metadata``, which says which kernels are stored in the spconv 2.x layout).
        prefix_to: the backbone's prefix in the target model (``"backbone."`` for mmdet3d
            segmentors, ``""`` for a bare ``MinkUNetBackbone``).

    Returns:
        A plain dict (no module metadata), ready for mmdet3d's layout-converting loader.

    Raises:
        ValueError: the state has no ``backbone_3d.*`` entry (not a SuperFlow checkpoint).
    """
    metadata = getattr(model_state, "_metadata", None) or {}
    renamed = {}
    for key, value in model_state.items():
        if not key.startswith(PRETRAIN_PREFIX):
            continue
        tensor = value.detach().cpu().contiguous()
        module_path = key.rsplit(".", 1)[0]
        if tensor.ndim == 5 and metadata.get(module_path, {}).get("version") == _SPCONV2_VERSION:
            tensor = to_spconv1_layout(tensor)
        renamed[prefix_to + key[len(PRETRAIN_PREFIX):]] = tensor
    if not renamed:
        raise ValueError(f"no '{PRETRAIN_PREFIX}*' weights in the checkpoint's model state; "
                         "expected a SuperFlow pretraining checkpoint")
    return renamed


def load_pretrained_backbone(backbone: nn.Module, checkpoint: str | Path) -> dict[str, Any]:
    """Copy the ``backbone_3d.*`` weights of a SuperFlow pretraining checkpoint into ``backbone``.

    The weights go through :func:`backbone_state_dict` (spconv 1.x kernel layout, no module
    metadata), which mmdet3d's spconv loader converts back, exactly like an
    mmdet3d segmentor loading the exported file.

    Returns:
        ``{"checkpoint": path, "step": pretraining step}``.

    Raises:
        ValueError: the file is not a readable accord checkpoint, holds no SuperFlow backbone, or
            its backbone does not have ``backbone``'s architecture.
    """
    state = load_checkpoint(checkpoint)
    weights = backbone_state_dict(state["model"], prefix_to="")
    try:
        backbone.load_state_dict(weights, strict=True)
    except RuntimeError as exc:
        summary = str(exc).splitlines()[0:3]
        raise ValueError(f"{checkpoint}: its backbone_3d weights do not fit model.backbone (set model.backbone "
                         f"to the pretraining run's architecture): {' '.join(summary)}") from None
    return {"checkpoint": str(Path(checkpoint).absolute()), "step": int(state["step"])}
