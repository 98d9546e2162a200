"""Export pretrained SuperFlow weights for an mmdet3d MinkUNet segmentor (export only: loading
weights for training, and the kernel-layout conversion both share, live in
:mod:`accord_superflow.weights`).

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

import torch

from accord.training import load_checkpoint
from accord.training.checkpoint import write_atomically
from accord_superflow.weights import backbone_state_dict

__all__ = ["FORMAT", "export_mmdet3d"]

FORMAT = "accord-superflow-mmdet3d"



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
