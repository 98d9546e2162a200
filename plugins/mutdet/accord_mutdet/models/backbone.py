"""ResNet backbone (MONAI) returning the C3, C4 and C5 feature maps ARS-DETR reads."""

from __future__ import annotations

import pickle
from pathlib import Path

import torch
from monai.networks.nets import ResNet
from torch import nn

__all__ = ["ARCHITECTURES", "ResNetBackbone", "load_backbone_weights"]

#: name -> (block, blocks per stage, stage widths); "resnet50" is the paper's, the others are for
#: CPU-sized runs and tests.
ARCHITECTURES = {
    "resnet50": ("bottleneck", [3, 4, 6, 3], [64, 128, 256, 512]),
    "resnet18": ("basic", [2, 2, 2, 2], [64, 128, 256, 512]),
    "tiny": ("basic", [1, 1, 1, 1], [8, 16, 32, 64]),
}


class ResNetBackbone(nn.Module):
    """A 2-D MONAI ResNet cut after its four stages: outputs C3, C4, C5 (strides 8, 16, 32).

    Batch norms always run in eval mode (frozen statistics, mmdet's ``norm_eval=True``), as in
    ARS-DETR. ``frozen=True`` also stops every parameter (MutDet pretraining); otherwise the stem and
    the first stage stay frozen (``frozen_stages=1``, the fine-tuning setting).

    MONAI's module names (``conv1``, ``bn1``, ``layer1.0.conv1``, ``...downsample.0``) are
    torchvision's, so an ImageNet ``resnet50`` state dict loads as is (:func:`load_backbone_weights`).

    Args:
        arch: a key of :data:`ARCHITECTURES`.
        frozen: freeze the whole backbone.
    """

    def __init__(self, arch: str = "resnet50", frozen: bool = False) -> None:
        super().__init__()
        if arch not in ARCHITECTURES:
            raise ValueError(f"backbone: expected one of {sorted(ARCHITECTURES)}, got {arch!r}")
        block, layers, widths = ARCHITECTURES[arch]
        self.body = ResNet(block, layers, widths, spatial_dims=2, n_input_channels=3, conv1_t_size=7,
                           conv1_t_stride=2, feed_forward=False)
        expansion = 4 if block == "bottleneck" else 1
        self.out_channels = [w * expansion for w in widths[1:]]
        self.frozen = frozen
        frozen_parts = [self.body] if frozen else [self.body.conv1, self.body.bn1, self.body.layer1]
        for part in frozen_parts:
            part.requires_grad_(False)

    def train(self, mode: bool = True) -> "ResNetBackbone":
        super().train(mode)
        for module in self.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.eval()
        return self

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        """``(B, 3, H, W)`` normalised images -> ``[C3, C4, C5]`` of shapes ``(B, C_i, H / s, W / s)``."""
        body = self.body
        x = body.act(body.bn1(body.conv1(images)))
        x = body.layer1(body.maxpool(x))
        c3 = body.layer2(x)
        c4 = body.layer3(c3)
        return [c3, c4, body.layer4(c4)]


def load_backbone_weights(backbone: ResNetBackbone, path: str | Path) -> None:
    """Load a torchvision-layout ResNet state dict from a local file (``fc.*`` ignored).

    Accepts a plain state dict or one under ``"state_dict"`` / ``"model"``; keys may carry a
    ``backbone.`` or ``module.`` prefix.

    Raises:
        ValueError: unreadable file, or its tensors do not fit the architecture (names the keys).
    """
    path = Path(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, EOFError, pickle.UnpicklingError) as exc:
        raise ValueError(f"{path}: not a readable torch state dict ({exc})") from None
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict):
        raise ValueError(f"{path}: expected a state dict of tensors, got {type(state).__name__}")
    cleaned = {}
    for key, value in state.items():
        for prefix in ("module.", "backbone."):
            if key.startswith(prefix):
                key = key[len(prefix):]
        if not key.startswith("fc."):
            cleaned[key] = value
    try:
        result = backbone.body.load_state_dict(cleaned, strict=False)
    except RuntimeError as exc:
        raise ValueError(f"{path}: tensor shapes do not fit the backbone: {str(exc).splitlines()[1:3]}") from None
    if result.missing_keys or result.unexpected_keys:
        raise ValueError(f"{path}: does not fit the {len(backbone.out_channels)}-stage ResNet: missing "
                         f"{result.missing_keys[:5]}, unexpected {result.unexpected_keys[:5]} "
                         f"({len(result.missing_keys)} missing, {len(result.unexpected_keys)} unexpected)")
