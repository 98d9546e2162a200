"""Feature-space matching (DenseCL): the most similar location of the other view."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from accord.utils.checks import check_finite, check_tensor
from accord.matchers._grid import check_positive_int, row_chunks
from accord.matchers.base import Matcher, MatchResult


class FeatureArgmaxMatcher(Matcher):
    """Match each location of view a to its most cosine-similar location(s) of view b.

    DenseCL computes this on *backbone* features (before the dense projection head): for query
    location ``i``, the positive key location is ``argmax_j cos(a_i, b_j)``. With ``top_k > 1``
    each location of a is matched to its ``top_k`` most similar locations of b, each pair with
    weight ``1 / top_k`` (so every location of a carries total weight 1). With ``mutual=True`` a
    pair ``(i, j)`` is kept only if ``i`` is also among the ``top_k`` locations of a most similar
    to ``j`` (mutual nearest neighbours), which drops matches into background clutter.

    Similarities are computed ``chunk_size`` rows at a time, so memory is ``B * chunk_size * N``
    rather than ``B * Na * Nb``. Ties are broken arbitrarily.

    Args:
        top_k: matches per location of a.
        mutual: keep only mutual top-k matches.
        chunk_size: rows per similarity block.

    Reference:
        Wang et al., "Dense Contrastive Learning for Self-Supervised Visual Pre-Training",
        CVPR 2021 (arXiv 2011.09157).
    """

    def __init__(self, top_k: int = 1, mutual: bool = False, chunk_size: int = 1024) -> None:
        self.top_k = check_positive_int(top_k, "top_k")
        self.mutual = mutual
        self.chunk_size = check_positive_int(chunk_size, "chunk_size")

    def match(self, features_a: torch.Tensor, features_b: torch.Tensor) -> MatchResult:
        """Match by cosine similarity.

        Args:
            features_a: view a's features, channels last (a ``(B, C, H, W)`` map becomes
                ``(B, H * W, C)`` through ``x.flatten(2).transpose(1, 2)``).
            features_b: view b's features, batched like ``features_a``, same ``C``.

        Returns:
            Pairs ``(i, j)`` with weight ``1 / top_k``, sorted by ``(batch, i)``; ``batch`` is set
            for batched inputs.

        Shape:
            features_a: ``(Na, C)`` or ``(B, Na, C)``; features_b: ``(Nb, C)`` or ``(B, Nb, C)``;
            output: ``P <= B * Na * top_k``.
        """
        check_tensor(features_a, "features_a", ndim=(2, 3), floating=True)
        batched = features_a.ndim == 3
        # Same batch size and channels as a; any number of locations.
        check_tensor(
            features_b,
            "features_b",
            shape=(*features_a.shape[:-2], None, features_a.shape[-1]),
            floating=True,
        )
        needed = (
            ("features_a", features_a, self.top_k if self.mutual else 1),
            ("features_b", features_b, self.top_k),
        )
        for name, features, min_locations in needed:
            if features.shape[-2] < min_locations:
                raise ValueError(
                    f"{name}: expected at least {min_locations} location(s) (dim -2) for "
                    f"top_k={self.top_k}, got shape {tuple(features.shape)}"
                )
            check_finite(features, name)
        query = F.normalize(features_a if batched else features_a.unsqueeze(0), dim=-1)
        keys = F.normalize(features_b if batched else features_b.unsqueeze(0), dim=-1)
        batch_size, num_a = query.shape[:2]

        nearest_b = self._chunked_top_k(query, keys)  # (B, Na, k)
        index_b = nearest_b.reshape(batch_size, -1)
        index_a = (
            torch.arange(num_a, device=query.device)
            .repeat_interleave(self.top_k)
            .expand_as(index_b)
        )
        keep = torch.ones_like(index_b, dtype=torch.bool)
        if self.mutual:
            nearest_a = self._chunked_top_k(keys, query)  # (B, Nb, k)
            # For every pair (i, j): the top-k locations of a seen from j, checked for i.
            back = torch.gather(nearest_a, 1, index_b.unsqueeze(-1).expand(-1, -1, self.top_k))
            keep = (back == index_a.unsqueeze(-1)).any(dim=-1)
        batch = torch.arange(batch_size, device=query.device).unsqueeze(1).expand_as(index_b)
        weight = torch.full((int(keep.sum()),), 1.0 / self.top_k, device=query.device)
        return MatchResult(index_a[keep], index_b[keep], weight, batch[keep] if batched else None)

    def _chunked_top_k(self, query: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        """Indices of the ``top_k`` most similar keys of every query row, ``(B, Nq, top_k)``."""
        blocks = [
            torch.topk(query[:, rows] @ keys.transpose(1, 2), self.top_k, dim=-1).indices
            for rows in row_chunks(query.shape[1], self.chunk_size)
        ]
        return torch.cat(blocks, dim=1)
