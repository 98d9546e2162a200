"""Negative-cosine losses without negatives: BYOL / SimSiam (global) and PixPro-style (dense)."""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from accord.utils.checks import check_finite, check_same_shape, check_tensor
from accord.losses.precision import float32_forward

__all__ = ["NegativeCosineSimilarity", "MaskedDenseCosineLoss"]

def _check_features(tensor: torch.Tensor, name: str, ndim: int | Sequence[int]) -> None:
    check_tensor(tensor, name, ndim=ndim, floating=True)
    check_finite(tensor, name)


def _check_location_tensor(
    tensor: torch.Tensor, name: str, location_shape: torch.Size, dtype_name: str, dtype_ok: bool
) -> None:
    """Per-location mask / weight: the feature shape without its channel dim, and the right dtype."""
    if not isinstance(tensor, torch.Tensor) or tensor.shape != location_shape or not dtype_ok:
        got = f"{tensor.dtype} {tuple(tensor.shape)}" if isinstance(tensor, torch.Tensor) else type(tensor).__name__
        raise ValueError(
            f"{name}: expected a {dtype_name} tensor of shape {tuple(location_shape)} (the feature shape "
            f"without the channel dim), got {got}"
        )


class NegativeCosineSimilarity(nn.Module):
    """Negative cosine similarity between predictions and (stop-gradient) targets.

    BYOL (arXiv 2006.07733) and SimSiam (arXiv 2011.10566): ``D(p, z) = -cos(p, sg(z))``, averaged
    over the batch. BYOL's ``2 - 2 cos`` differs by an affine map only.

    - ``symmetric=False``: ``mean_i D(prediction_i, target_i)``.
    - ``symmetric=True``: the two-view form ``(D(p_0, z_1) + D(p_1, z_0)) / 2``, where
      ``prediction[v]`` / ``target[v]`` are the predictor output and target of view ``v``.

    Args:
        symmetric: use the two-view symmetric form.
        detach_target: stop the gradient through the target (SimSiam's essential stop-gradient; a
            no-op for EMA-teacher targets, which carry no gradient anyway).
        eps: lower bound on vector norms in the cosine.

    Shape:
        - ``symmetric=False``: ``prediction`` and ``target`` ``(B, D)``.
        - ``symmetric=True``: ``prediction`` and ``target`` ``(2, B, D)`` or a pair of ``(B, D)``.
        - Output: scalar, in ``[-1, 1]``.

    Example:
        >>> loss_fn = NegativeCosineSimilarity()
        >>> round(loss_fn(torch.ones(2, 3), torch.ones(2, 3)).item(), 6)
        -1.0
    """

    def __init__(self, symmetric: bool = False, detach_target: bool = True, eps: float = 1e-8) -> None:
        super().__init__()
        self.symmetric = symmetric
        self.detach_target = detach_target
        self.eps = eps

    @float32_forward
    def forward(
        self,
        prediction: torch.Tensor | Sequence[torch.Tensor],
        target: torch.Tensor | Sequence[torch.Tensor],
    ) -> torch.Tensor:
        """Compute the loss; see the class docstring for shapes."""
        if self.symmetric:
            predictions, targets = self._two_views(prediction, "prediction"), self._two_views(target, "target")
            return 0.5 * (self._loss(predictions[0], targets[1]) + self._loss(predictions[1], targets[0]))
        return self._loss(prediction, target)  # type: ignore[arg-type]

    @staticmethod
    def _two_views(views: torch.Tensor | Sequence[torch.Tensor], name: str) -> Sequence[torch.Tensor]:
        if isinstance(views, torch.Tensor):
            check_tensor(views, name, ndim=3)
        if len(views) != 2:
            raise ValueError(f"{name}: symmetric=True expects exactly 2 views (2, B, D), got {len(views)}")
        return views

    def _loss(self, prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        _check_features(prediction, "prediction", ndim=2)
        _check_features(target, "target", ndim=2)
        check_same_shape(prediction, target, "prediction", "target")
        if self.detach_target:
            target = target.detach()
        return -F.cosine_similarity(prediction, target, dim=1, eps=self.eps).mean()


class MaskedDenseCosineLoss(nn.Module):
    """Mean of ``1 - cos`` over the valid locations of two aligned dense feature maps.

    For PixPro-style (arXiv 2011.10043) or matched-voxel objectives: ``prediction`` and ``target``
    are already aligned location by location (by a matcher or a shared grid). The loss is

    ``sum_l w_l (1 - cos(p_l, sg(t_l))) / sum_l w_l``

    with ``w_l = mask_l * weight_l`` (either may be omitted). It is a mean over valid locations
    across the whole batch, so samples contribute in proportion to their valid locations.

    Args:
        channel_dim: the feature dim: ``1`` for ``(B, C, *spatial)`` maps, ``-1`` for ``(B, T, C)``
            tokens.
        detach_target: stop the gradient through ``target`` (momentum-encoder targets).
        eps: lower bound on vector norms in the cosine.

    Shape:
        - ``prediction``, ``target``: ``(B, C, *spatial)`` (``channel_dim=1``) or ``(B, T, C)``
          (``channel_dim=-1``).
        - ``mask``: bool, the feature shape without the channel dim: ``(B, *spatial)`` / ``(B, T)``.
        - ``weight``: non-negative float, same shape as ``mask``.
        - Output: scalar in ``[0, 2]``.

    Raises:
        ValueError: shapes that do not match, non-finite features, negative weights, or no valid
            location (mask all False or all weights 0): the mean would be undefined.
    """

    def __init__(self, channel_dim: int = 1, detach_target: bool = True, eps: float = 1e-8) -> None:
        super().__init__()
        if channel_dim not in (1, -1):
            raise ValueError(f"channel_dim: expected 1 (B, C, *spatial) or -1 (B, T, C), got {channel_dim!r}")
        self.channel_dim = channel_dim
        self.detach_target = detach_target
        self.eps = eps

    @float32_forward
    def forward(
        self,
        prediction: torch.Tensor,
        target: torch.Tensor,
        mask: torch.Tensor | None = None,
        weight: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Compute the loss; see the class docstring for shapes."""
        _check_features(prediction, "prediction", ndim=(3, 4, 5) if self.channel_dim == 1 else 3)
        _check_features(target, "target", ndim=prediction.ndim)
        check_same_shape(prediction, target, "prediction", "target")
        if self.detach_target:
            target = target.detach()
        location_shape = prediction.shape[:1] + prediction.shape[2:] if self.channel_dim == 1 else prediction.shape[:-1]
        location_weight = torch.ones(location_shape, dtype=prediction.dtype, device=prediction.device)
        if mask is not None:
            _check_location_tensor(mask, "mask", location_shape, "bool", mask.dtype == torch.bool)
            location_weight = location_weight * mask
        if weight is not None:
            _check_location_tensor(weight, "weight", location_shape, "floating-point", weight.is_floating_point())
            check_finite(weight, "weight")
            if (weight < 0).any():
                raise ValueError("weight: expected non-negative per-location weights")
            location_weight = location_weight * weight
        total_weight = location_weight.sum()
        if total_weight <= 0:
            raise ValueError(
                "mask/weight: no valid location (mask all False or all weights 0); "
                "the mean over valid locations is undefined"
            )
        cosine = F.cosine_similarity(prediction, target, dim=self.channel_dim, eps=self.eps)
        return ((1.0 - cosine) * location_weight).sum() / total_weight
