"""Same-grid identity matching: two views sampled on one grid (e.g. two intensity augmentations)."""

from __future__ import annotations

import torch

from accord.utils.checks import check_tensor
from accord.matchers.base import Matcher, MatchResult


class IdentityMatcher(Matcher):
    """Pair every location of view a with the same location of view b.

    For views that share their geometry (intensity-only augmentations, or two encoders of one
    input), location ``i`` of a corresponds to location ``i`` of b. Every pair has weight 1.

    Example:
        >>> features = torch.randn(2, 16, 8)
        >>> result = IdentityMatcher()(features_a=features, features_b=features)
        >>> len(result)
        32
    """

    def match(
        self,
        features_a: torch.Tensor,
        features_b: torch.Tensor,
        mask: torch.Tensor | None = None,
    ) -> MatchResult:
        """Match location ``i`` of a to location ``i`` of b.

        Args:
            features_a: features of view a; only the shape is used.
            features_b: features of view b on the same grid (the channel count may differ).
            mask: ``True`` where a location is valid (e.g. not padding); invalid locations get
                no pair.

        Returns:
            Pairs ``(i, i)`` with weight 1, ``batch`` set for batched inputs.

        Shape:
            features_a, features_b: ``(N, C)`` or ``(B, N, C)``; mask: ``(N,)`` or ``(B, N)``,
            bool; output: ``P = N`` (times ``B``) minus the masked-out locations.
        """
        check_tensor(features_a, "features_a", ndim=(2, 3))
        check_tensor(features_b, "features_b", ndim=(2, 3))
        grid_shape = features_a.shape[:-1]
        if features_a.shape[-2] == 0:
            raise ValueError(
                f"features_a: expected at least one location, got shape {tuple(features_a.shape)}"
            )
        if features_b.shape[:-1] != grid_shape:
            raise ValueError(
                f"features_b: expected leading shape {tuple(grid_shape)} like features_a "
                f"(same grid), got {tuple(features_b.shape)}"
            )
        if mask is None:
            valid = torch.ones(grid_shape, dtype=torch.bool, device=features_a.device)
        else:
            check_tensor(mask, "mask", shape=tuple(grid_shape))
            if mask.dtype != torch.bool:
                raise ValueError(f"mask: expected dtype torch.bool, got {mask.dtype}")
            valid = mask
        coordinates = valid.nonzero()
        location = coordinates[:, -1]
        weight = torch.ones(location.shape, device=features_a.device)
        batch = coordinates[:, 0] if valid.ndim == 2 else None
        return MatchResult(location, location.clone(), weight, batch)
