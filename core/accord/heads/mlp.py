"""Projection, prediction and DINO heads, plus a dense (per-location) projection head.

All heads are plain MLPs built by one function, :func:`_mlp_layers`; the dense head reuses the
vector head per location instead of duplicating it as 1x1 convolutions.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.parametrizations import weight_norm

from accord.utils.checks import check_tensor

__all__ = ["ProjectionHead", "PredictionHead", "DINOHead", "DenseProjectionHead"]


def _check_dim(value: int, name: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name}: expected a positive int, got {value!r}")


def _mlp_layers(
    in_dim: int,
    hidden_dim: int,
    out_dim: int,
    num_layers: int,
    batch_norm: bool,
    last_bn: bool,
    activation: type[nn.Module],
) -> list[nn.Module]:
    """Linear layers; every layer but the last is followed by (BN) and the activation."""
    for value, name in ((in_dim, "in_dim"), (hidden_dim, "hidden_dim"), (out_dim, "out_dim")):
        _check_dim(value, name)
    _check_dim(num_layers, "num_layers")
    dims = [in_dim] + [hidden_dim] * (num_layers - 1) + [out_dim]
    layers: list[nn.Module] = []
    for index, (layer_in, layer_out) in enumerate(zip(dims[:-1], dims[1:])):
        is_last = index == num_layers - 1
        with_bn = last_bn if is_last else batch_norm
        # A bias directly before BatchNorm is cancelled by the mean subtraction, so drop it.
        layers.append(nn.Linear(layer_in, layer_out, bias=not with_bn))
        if with_bn:
            # The output BN (SimCLR v2, MoCo v3) is not followed by an affine map in those methods.
            layers.append(nn.BatchNorm1d(layer_out, affine=not is_last))
        if not is_last:
            layers.append(activation())
    return layers


class ProjectionHead(nn.Module):
    """Generic MLP projection head (SimCLR / MoCo / BYOL / VICReg style).

    ``num_layers`` linear layers; hidden layers are ``Linear -> [BatchNorm1d] -> activation``; the
    last layer is ``Linear -> [BatchNorm1d(affine=False)]`` when ``last_bn``.

    Args:
        in_dim: input feature size ``C_in``.
        hidden_dim: width of the hidden layers (unused when ``num_layers == 1``).
        out_dim: output size ``C_out``.
        num_layers: number of linear layers, ``>= 1``.
        batch_norm: BatchNorm after each hidden linear layer.
        last_bn: non-affine BatchNorm after the last linear layer.
        activation: activation class for the hidden layers.

    Shape:
        - Input: ``(N, C_in)``.
        - Output: ``(N, C_out)``.

    Example:
        >>> head = ProjectionHead(512, 2048, 128, num_layers=2)
        >>> head(torch.randn(4, 512)).shape
        torch.Size([4, 128])
    """

    def __init__(
        self,
        in_dim: int,
        hidden_dim: int,
        out_dim: int,
        num_layers: int = 2,
        batch_norm: bool = True,
        last_bn: bool = False,
        activation: type[nn.Module] = nn.ReLU,
    ) -> None:
        super().__init__()
        self.in_dim = in_dim
        self.out_dim = out_dim
        self.layers = nn.Sequential(
            *_mlp_layers(in_dim, hidden_dim, out_dim, num_layers, batch_norm, last_bn, activation)
        )

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """Project ``features`` of shape ``(N, C_in)`` to ``(N, C_out)``."""
        check_tensor(features, "features", shape=(None, self.in_dim), floating=True)
        return self.layers(features)


class PredictionHead(ProjectionHead):
    """BYOL / SimSiam predictor: ``Linear -> BatchNorm1d -> ReLU -> Linear``.

    Args:
        in_dim: input size (the projection size).
        hidden_dim: hidden width (4096 in BYOL, 512 in SimSiam).
        out_dim: output size (equal to ``in_dim`` in both methods).

    Shape:
        - Input: ``(N, in_dim)``.
        - Output: ``(N, out_dim)``.
    """

    def __init__(self, in_dim: int = 256, hidden_dim: int = 4096, out_dim: int = 256) -> None:
        super().__init__(in_dim, hidden_dim, out_dim, num_layers=2, batch_norm=True, last_bn=False)


class DINOHead(nn.Module):
    """DINO / iBOT head: MLP -> L2 normalisation -> weight-normalised prototype layer.

    The MLP (GELU, trunc-normal init with std 0.02 as in DINO) maps to a ``bottleneck_dim``
    embedding, which is L2-normalised and scored against ``out_dim`` prototypes by a bias-free,
    weight-normalised linear layer. With ``norm_last_layer`` the weight-norm gain is fixed at 1, so
    the logits are cosine similarities to unit-norm prototypes (DINO's stabilising default).

    Args:
        in_dim: backbone feature size ``C_in``.
        out_dim: number of prototypes ``K`` (65536 in DINO).
        hidden_dim: MLP hidden width.
        bottleneck_dim: size of the normalised embedding.
        num_layers: number of MLP linear layers, ``>= 1``.
        batch_norm: BatchNorm in the MLP hidden layers.
        norm_last_layer: freeze the weight-norm gain of the prototype layer at 1.

    Shape:
        - Input: ``(N, C_in)`` or ``(B, T, C_in)`` (tokens, for iBOT-style patch heads).
        - Output: ``(N, K)`` or ``(B, T, K)``.
    """

    def __init__(
        self,
        in_dim: int,
        out_dim: int = 65536,
        hidden_dim: int = 2048,
        bottleneck_dim: int = 256,
        num_layers: int = 3,
        batch_norm: bool = False,
        norm_last_layer: bool = True,
    ) -> None:
        super().__init__()
        self.in_dim = in_dim
        self.mlp = nn.Sequential(
            *_mlp_layers(in_dim, hidden_dim, bottleneck_dim, num_layers, batch_norm, False, nn.GELU)
        )
        for module in self.mlp.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        _check_dim(out_dim, "out_dim")
        self.last_layer = weight_norm(nn.Linear(bottleneck_dim, out_dim, bias=False))
        gain = self.last_layer.parametrizations.weight.original0
        with torch.no_grad():
            gain.fill_(1.0)
        gain.requires_grad_(not norm_last_layer)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """Prototype logits for ``features`` of shape ``(N, C_in)`` or ``(B, T, C_in)``."""
        check_tensor(features, "features", ndim=(2, 3), floating=True)
        if features.shape[-1] != self.in_dim:
            raise ValueError(f"features: expected last dim {self.in_dim}, got shape {tuple(features.shape)}")
        # BatchNorm1d needs (N, C): fold any token dim into the batch.
        embedding = self.mlp(features.reshape(-1, self.in_dim))
        embedding = F.normalize(embedding, dim=-1)
        return self.last_layer(embedding).reshape(*features.shape[:-1], -1)


class DenseProjectionHead(nn.Module):
    """Per-location projection head for dense feature maps (DenseCL / PixPro / 3D voxel grids).

    Applies a :class:`ProjectionHead` at every spatial location. This is exactly a stack of 1x1 (or
    1x1x1) convolutions with ``BatchNorm{2,3}d``: per-channel BatchNorm over ``(B, *spatial)`` equals
    BatchNorm1d over the flattened locations. Working on the flattened locations lets one
    implementation serve 1D, 2D and 3D maps.

    Args:
        in_dim: input channels ``C_in``.
        hidden_dim: hidden width.
        out_dim: output channels ``C_out``.
        num_layers: number of layers, ``>= 1``.
        batch_norm: BatchNorm after each hidden layer.
        last_bn: non-affine BatchNorm after the last layer.
        activation: activation class for the hidden layers.

    Shape:
        - Input: ``(B, C_in, *spatial)`` with one to three spatial dims.
        - Output: ``(B, C_out, *spatial)``.

    Example:
        >>> head = DenseProjectionHead(64, 128, 32)
        >>> head(torch.randn(2, 64, 4, 4, 4)).shape
        torch.Size([2, 32, 4, 4, 4])
    """

    def __init__(
        self,
        in_dim: int,
        hidden_dim: int,
        out_dim: int,
        num_layers: int = 2,
        batch_norm: bool = True,
        last_bn: bool = False,
        activation: type[nn.Module] = nn.ReLU,
    ) -> None:
        super().__init__()
        self.in_dim = in_dim
        self.head = ProjectionHead(in_dim, hidden_dim, out_dim, num_layers, batch_norm, last_bn, activation)

    def forward(self, feature_map: torch.Tensor) -> torch.Tensor:
        """Project ``feature_map`` of shape ``(B, C_in, *spatial)`` to ``(B, C_out, *spatial)``."""
        check_tensor(feature_map, "feature_map", ndim=(3, 4, 5), floating=True)
        if feature_map.shape[1] != self.in_dim:
            raise ValueError(
                f"feature_map: expected {self.in_dim} channels in dim 1 (B, C, *spatial), "
                f"got shape {tuple(feature_map.shape)}"
            )
        channels_last = feature_map.movedim(1, -1)
        projected = self.head(channels_last.reshape(-1, self.in_dim))
        return projected.reshape(*channels_last.shape[:-1], -1).movedim(-1, 1)
