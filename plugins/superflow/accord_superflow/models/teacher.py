"""The frozen 2D teacher: a DINOv2 ViT from ``transformers`` (SuperFlow / ScaLR ``ImageTeacher``).

SuperFlow distils the last block's tokens **before** the final LayerNorm (``x_pre_norm`` of the
DINOv2 code). In ``transformers`` that is ``hidden_states[-1]`` of ``Dinov2Model`` (the output of
the last layer); ``last_hidden_state`` is the same tensor after ``layernorm``. The class token is
dropped and the patch tokens are reshaped to a ``(C, H / 14, W / 14)`` map (16 x 32 for the
224 x 448 input). Position embeddings are interpolated by ``Dinov2Model`` itself.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import nn

from accord.utils.checks import check_tensor
from accord_superflow.models.config import TeacherConfig

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "DinoV2Teacher", "build_teacher", "random_dinov2_config"]

log = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def random_dinov2_config(hidden_size: int = 32, num_layers: int = 2, num_heads: int = 2, patch_size: int = 14):
    """A small randomly initialised ``Dinov2Config`` for tests and demos (no weights exist offline)."""
    from transformers import Dinov2Config

    return Dinov2Config(hidden_size=hidden_size, num_hidden_layers=num_layers, num_attention_heads=num_heads,
                        intermediate_size=4 * hidden_size, patch_size=patch_size, image_size=patch_size * 16)


class DinoV2Teacher(nn.Module):
    """Frozen DINOv2 feature extractor: images -> pre-LayerNorm patch-token maps.

    Frozen means: every parameter has ``requires_grad=False``, the forward runs under
    ``torch.no_grad()``, and the module stays in eval mode even when a parent calls ``train()``
    (the Trainer does so every step).

    Args:
        vit: a ``transformers.Dinov2Model``.

    Shape:
        - Input: ``(I, 3, H, W)`` uint8 RGB in 0..255 or float RGB in [0, 1]; ``H`` and ``W``
          multiples of the patch size.
        - Output: ``(I, C_vit, H / patch, W / patch)`` float.
    """

    def __init__(self, vit: nn.Module) -> None:
        super().__init__()
        self.vit = vit
        self.vit.requires_grad_(False)
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)
        self.train(False)

    @classmethod
    def from_pretrained(cls, path: str | Path) -> DinoV2Teacher:
        """Load a ``Dinov2Model`` saved with ``save_pretrained`` (e.g. ``facebook/dinov2-base``) from disk.

        Raises:
            ValueError: ``path`` is not a directory with a DINOv2 ``config.json`` and weights.
        """
        from transformers import Dinov2Model

        try:
            vit = Dinov2Model.from_pretrained(str(path), local_files_only=True)
        except (OSError, ValueError) as exc:
            raise ValueError(f"{path}: not a local Dinov2Model directory (config.json + weights): {exc}") from None
        return cls(vit)

    @classmethod
    def from_config(cls, config) -> DinoV2Teacher:
        """A randomly initialised teacher (tests and demos only: its features carry no knowledge)."""
        from transformers import Dinov2Model

        log.warning("2D teacher: randomly initialised DINOv2 (%d layers, width %d); distillation from it is "
                    "only a smoke test", config.num_hidden_layers, config.hidden_size)
        return cls(Dinov2Model(config))

    @property
    def patch_size(self) -> int:
        return int(self.vit.config.patch_size)

    @property
    def embed_dim(self) -> int:
        return int(self.vit.config.hidden_size)

    def train(self, mode: bool = True) -> DinoV2Teacher:
        # Frozen: ignore train(True) from a parent module.
        return super().train(False)

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Patch-token maps of ``images`` (see the class docstring for shapes)."""
        check_tensor(images, "images", ndim=4)
        count, channels, height, width = images.shape
        patch = self.patch_size
        if channels != 3 or height % patch or width % patch:
            raise ValueError(f"images: expected (I, 3, H, W) with H and W multiples of {patch}, "
                             f"got {tuple(images.shape)}")
        pixels = images.float() / 255.0 if images.dtype == torch.uint8 else images.float()
        pixels = (pixels - self.mean) / self.std
        hidden = self.vit(pixel_values=pixels, output_hidden_states=True).hidden_states[-1]
        grid = (height // patch, width // patch)
        if hidden.shape[1] != 1 + grid[0] * grid[1]:
            raise ValueError(f"teacher returned {hidden.shape[1]} tokens, expected 1 class token + "
                             f"{grid[0]}x{grid[1]} patches (DINOv2 with register tokens is not supported)")
        patches = hidden[:, 1:]
        return patches.transpose(1, 2).reshape(count, hidden.shape[2], *grid)


def build_teacher(config: TeacherConfig = TeacherConfig()) -> DinoV2Teacher:
    """The teacher of a :class:`TeacherConfig`: local weights, or a random ViT when none are given."""
    if config.weights is not None:
        return DinoV2Teacher.from_pretrained(config.weights)
    return DinoV2Teacher.from_config(random_dinov2_config(config.random_width, config.random_layers,
                                                          config.random_heads))
