"""Object embeddings (step 1.4): rotated crops x1.5 through a frozen ResNet, C5 average pool.

As the reference's feature extractor: each box is enlarged by ``enlarge`` (1.5) in ``w`` and ``h``
for context and cropped from the ImageNet-normalised image with mmcv's ``RoIAlignRotated``
(``crop_size`` 224, ``spatial_scale`` 1, ``sampling_ratio`` 2, ``clockwise=True``: the le90
convention of :mod:`accord.boxes`, where a positive theta turns clockwise on screen), stretched to a
square (aspect ratio not kept), then a frozen ResNet's last stage is average-pooled (ResNet-50:
2048-d). The ResNet is MONAI's, laid out like torchvision's, so torchvision ImageNet weights load
from a local file; without one the network is random (a warning says so).
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from torch import nn

from accord_mutdet.data.dataset import IMAGENET_MEAN, IMAGENET_STD

Backbone = Literal["resnet18", "resnet34", "resnet50"]


def rotated_crops(image: torch.Tensor, boxes: torch.Tensor, *, crop_size: int = 224, enlarge: float = 1.5) -> torch.Tensor:
    """Rotated crops of le90 boxes, enlarged, resampled to ``crop_size`` squares.

    Crop column ``u`` runs along the box's ``w`` side (direction ``(cos t, sin t)``), row ``v``
    along its ``h`` side.

    Shape:
        image: ``(3, H, W)`` float; boxes: ``(N, 5)`` pixels; output: ``(N, 3, crop_size, crop_size)``.
    """
    from mmcv.ops import RoIAlignRotated

    if boxes.shape[0] == 0:
        return image.new_zeros(0, image.shape[0], crop_size, crop_size)
    rois = torch.cat([boxes.new_zeros(len(boxes), 1), boxes[:, :2], boxes[:, 2:4] * enlarge, boxes[:, 4:5]], dim=1)
    align = RoIAlignRotated(crop_size, spatial_scale=1.0, sampling_ratio=2, aligned=True, clockwise=True)
    return align(image[None].float(), rois.float())


def build_backbone(name: Backbone = "resnet50", weights: str | Path | None = None) -> nn.Module:
    """A frozen MONAI ResNet (torchvision layout, no classifier) in eval mode.

    Args:
        name: ``resnet18``, ``resnet34`` or ``resnet50``.
        weights: a torchvision-layout state dict file (``.pth``; the ``fc`` keys are ignored).

    Raises:
        ValueError: weights whose keys or shapes do not fit (names the file and the keys).
    """
    from monai.networks.nets import resnet

    factory = {"resnet18": resnet.resnet18, "resnet34": resnet.resnet34, "resnet50": resnet.resnet50}[name]
    # conv1 stride 2 and bias-free downsampling: torchvision's ResNet, so its weights load as they are.
    model = factory(spatial_dims=2, n_input_channels=3, conv1_t_stride=2, feed_forward=False, shortcut_type="B",
                    bias_downsample=False)
    if weights is None:
        warnings.warn(f"pseudo-label embeddings: no backbone weights given, the {name} is random; "
                      "pass backbone_weights (torchvision ImageNet weights) for meaningful pseudo-classes",
                      stacklevel=2)
    else:
        state = torch.load(weights, map_location="cpu", weights_only=True)
        state = state.get("state_dict", state)
        state = {k: v for k, v in state.items() if not k.startswith("fc.")}
        own = model.state_dict()
        missing = sorted(set(own) - set(state))
        unexpected = sorted(set(state) - set(own))
        wrong = sorted(k for k in set(own) & set(state) if own[k].shape != state[k].shape)
        if missing or unexpected or wrong:
            raise ValueError(f"{weights}: not {name} weights in torchvision layout; missing {missing[:3]}, "
                             f"unexpected {unexpected[:3]}, wrong shape {wrong[:3]}")
        model.load_state_dict(state)
    model.eval()
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    return model


def normalise_rgb(image: np.ndarray) -> torch.Tensor:
    """RGB uint8 ``(H, W, 3)`` to an ImageNet-normalised float tensor ``(3, H, W)``."""
    tensor = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).float() / 255.0
    return (tensor - torch.tensor(IMAGENET_MEAN)[:, None, None]) / torch.tensor(IMAGENET_STD)[:, None, None]


@torch.no_grad()
def embed_boxes(backbone: nn.Module, image: np.ndarray, boxes: np.ndarray, *, crop_size: int = 224,
                enlarge: float = 1.5, batch_size: int = 64, device: str | torch.device = "cpu") -> np.ndarray:
    """Raw object features ``(N, C)`` (C = 2048 for ResNet-50) of the boxes of one RGB image."""
    tensor = normalise_rgb(image).to(device)
    boxes_t = torch.from_numpy(np.asarray(boxes, np.float32)).to(device)
    # Crops are made batch by batch: 1000 proposals at 224^2 would be 600 MB at once.
    features = [backbone(rotated_crops(tensor, boxes_t[i:i + batch_size], crop_size=crop_size, enlarge=enlarge))
                for i in range(0, len(boxes_t), batch_size)]
    if not features:
        out_dim = backbone(torch.zeros(1, 3, crop_size, crop_size, device=device)).shape[1]
        return np.zeros((0, out_dim), np.float32)
    return torch.cat(features).float().cpu().numpy()
