"""Export pretrained SuperFlow weights for an mmdet3d MinkUNet segmentor.

The pretraining model keeps its 3D backbone under ``backbone_3d.`` (an mmdet3d
``MinkUNetBackbone``); an mmdet3d segmentor (``EncoderDecoder3D``) keeps it under ``backbone.``.
The exporter writes an mmengine-style checkpoint ``{"state_dict": {"backbone.<key>": tensor},
"meta": {...}}`` that loads into ``configs/superflow/minkunet34_seg.py`` with no missing backbone
key, through ``load_from`` / ``mmengine.runner.load_checkpoint`` as well as through
``init_cfg=dict(type='Pretrained', checkpoint=..., prefix='backbone.')``.

Sparse-conv kernel layout: importing mmdet3d patches spconv's ``SparseModule`` loader to permute
every kernel from the spconv 1.x layout ``(k, k, k, in, out)`` to spconv 2.x's
``(out, k, k, k, in)`` unless the state dict's metadata marks the module as version 2. mmengine's
prefix loading and ``revise_keys`` drop or mismatch that metadata, so the only layout every mmdet3d
loading route agrees on is spconv 1.x without version metadata; the exporter writes exactly that.
(Loading the file into spconv without mmdet3d imported would need the kernels permuted back.)

The file holds only tensors, strings and numbers: ``torch.load(weights_only=True)`` reads it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from accord.training import load_checkpoint
from accord.training.checkpoint import write_atomically

__all__ = ["PRETRAIN_PREFIX", "MMDET3D_PREFIX", "FORMAT", "to_spconv1_layout", "backbone_state_dict",
           "export_mmdet3d"]

PRETRAIN_PREFIX = "backbone_3d."
MMDET3D_PREFIX = "backbone."
FORMAT = "accord-superflow-mmdet3d"
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


def export_mmdet3d(checkpoint: str | Path, out: str | Path) -> Path:
    """Write the backbone of a SuperFlow checkpoint as an mmdet3d segmentor checkpoint.

    Args:
        checkpoint: an accord pretraining checkpoint (``step_*.pt``).
        out: the ``.pth`` file to write (atomically).

    Returns:
        ``out``.

    Raises:
        accord.training.CheckpointError: unreadable or not an accord checkpoint.
        ValueError: no SuperFlow backbone in it.
    """
    state = load_checkpoint(checkpoint)
    payload = {
        "state_dict": backbone_state_dict(state["model"]),
        "meta": {"format": FORMAT, "step": int(state["step"]), "source": str(checkpoint),
                 "backbone": "MinkUNetBackbone(sparseconv_backend='spconv') / SFMinkUNetBackbone",
                 "kernel_layout": "spconv1 (kD, kH, kW, in, out)"},
    }
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    return write_atomically(out, lambda handle: torch.save(payload, handle))
