"""The matcher extension point: :class:`Matcher` and the :class:`MatchResult` it returns.

A dense objective is split into a *matcher* (which location of view a corresponds to which location
of view b, and how much) and a *pair objective* (InfoNCE, cosine, VICReg, ... over the matched
feature pairs). Matchers only decide correspondences, so one objective serves voxel grids, LiDAR
points, regions and feature-space matches alike.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, Sequence

import torch

from accord.utils.checks import check_index_range


@dataclass(frozen=True, eq=False)
class MatchResult:
    """Weighted correspondences between the locations of two views.

    Locations are flattened per sample (``torch.flatten`` order over the spatial dims of a grid,
    or the row of a point / region list). Pair ``p`` says that location ``index_a[p]`` of view a
    corresponds to location ``index_b[p]`` of view b with weight ``weight[p]``, in sample
    ``batch[p]`` when the inputs were batched.

    Attributes:
        index_a: location in view a, ``long``.
        index_b: location in view b, ``long``.
        weight: pair weight, floating point. Each matcher documents what its weights sum to.
        batch: sample of each pair, ``long``; ``None`` for unbatched inputs. It indexes the
            leading dim of whichever view's features are batched (see :meth:`gather_a`).

    Shape:
        Every attribute: ``(P,)``, ``P`` the number of pairs (may be 0).
    """

    index_a: torch.Tensor
    index_b: torch.Tensor
    weight: torch.Tensor
    batch: torch.Tensor | None = None

    def __post_init__(self) -> None:
        # Cheap structural checks so a third-party matcher's mistake surfaces where it is made,
        # not as a silent broadcast inside a loss.
        fields = {"index_a": self.index_a, "index_b": self.index_b, "weight": self.weight}
        if self.batch is not None:
            fields["batch"] = self.batch
        for name, value in fields.items():
            if not isinstance(value, torch.Tensor) or value.ndim != 1:
                got = (
                    tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
                )
                raise ValueError(f"MatchResult.{name}: expected a 1-D tensor (P,), got {got}")
            if value.shape != self.index_a.shape:
                raise ValueError(
                    f"MatchResult.{name}: expected shape {tuple(self.index_a.shape)} like index_a, "
                    f"got {tuple(value.shape)}"
                )
            if name != "weight" and value.dtype != torch.long:
                raise ValueError(
                    f"MatchResult.{name}: expected dtype torch.long, got {value.dtype}"
                )
        if not self.weight.is_floating_point():
            raise ValueError(
                f"MatchResult.weight: expected a floating dtype, got {self.weight.dtype}"
            )

    def __len__(self) -> int:
        return int(self.index_a.shape[0])

    def select(self, keep: torch.Tensor) -> MatchResult:
        """The pairs picked by a boolean mask ``(P,)`` or an index tensor."""
        return MatchResult(
            self.index_a[keep],
            self.index_b[keep],
            self.weight[keep],
            None if self.batch is None else self.batch[keep],
        )

    @classmethod
    def concat(cls, results: Sequence[MatchResult]) -> MatchResult:
        """Stack unbatched per-sample results into one batched result.

        Args:
            results: one unbatched result per sample; sample ``i`` gets ``batch == i``.

        Returns:
            The batched result.
        """
        if not results:
            raise ValueError("results: expected at least one MatchResult, got none")
        if any(result.batch is not None for result in results):
            raise ValueError("results: expected unbatched MatchResults (batch is None)")
        device = results[0].index_a.device
        batch = torch.cat(
            [
                torch.full((len(r),), i, dtype=torch.long, device=device)
                for i, r in enumerate(results)
            ]
        )
        return cls(
            torch.cat([r.index_a for r in results]),
            torch.cat([r.index_b for r in results]),
            torch.cat([r.weight for r in results]),
            batch,
        )

    def coalesce(self) -> MatchResult:
        """Merge duplicate ``(batch, index_a, index_b)`` pairs, summing their weights.

        The result is sorted by ``(batch, index_a, index_b)``.
        """
        keys = (
            [self.index_a, self.index_b]
            if self.batch is None
            else [self.batch, self.index_a, self.index_b]
        )
        unique, inverse = torch.unique(torch.stack(keys, dim=1), dim=0, return_inverse=True)
        weight = self.weight.new_zeros(unique.shape[0]).index_add_(0, inverse, self.weight)
        batch = None if self.batch is None else unique[:, 0]
        return MatchResult(unique[:, -2], unique[:, -1], weight, batch)

    def gather_a(self, features_a: torch.Tensor) -> torch.Tensor:
        """The view-a feature vector of every pair.

        A ``(Na, C)`` input is indexed by ``index_a`` alone (e.g. a point or region list shared by
        all images); a ``(B, Na, C)`` input by ``(batch, index_a)``.

        Shape:
            features_a: ``(Na, C)`` or ``(B, Na, C)``; output: ``(P, C)``.
        """
        return self._gather_side(features_a, self.index_a, "features_a")

    def gather_b(self, features_b: torch.Tensor) -> torch.Tensor:
        """The view-b feature vector of every pair; see :meth:`gather_a`.

        Shape:
            features_b: ``(Nb, C)`` or ``(B, Nb, C)``; output: ``(P, C)``.
        """
        return self._gather_side(features_b, self.index_b, "features_b")

    def _gather_side(self, features: torch.Tensor, index: torch.Tensor, name: str) -> torch.Tensor:
        if not isinstance(features, torch.Tensor) or features.ndim not in (2, 3):
            got = (
                tuple(features.shape)
                if isinstance(features, torch.Tensor)
                else type(features).__name__
            )
            raise ValueError(f"{name}: expected shape (N, C) or (B, N, C), got {got}")
        check_index_range(index, name.replace("features", "index"), features.shape[-2])
        if features.ndim == 2:
            return features[index]
        if self.batch is None:
            raise ValueError(
                f"{name}: got batched features {tuple(features.shape)} but the match is unbatched"
            )
        check_index_range(self.batch, "batch", features.shape[0])
        return features[self.batch, index]


class Matcher(ABC):
    """Base class of correspondence matchers.

    Contract:
        * Subclasses implement :meth:`match` with *named* arguments: ``features_a`` /
          ``features_b`` for feature-based matchers, and the geometry they need under
          self-explaining names (``affine_a``, ``displacement``, ``points``, ``boxes``, ...).
          Callers pass them by keyword, so an engine can feed a batch's geometry dict
          straight in.
        * Calling a matcher runs :meth:`match` under :func:`torch.no_grad`: correspondences are
          targets, not predictions, so no gradient flows through indices or weights. An objective
          that needs gradients through geometry (e.g. GEMINI's flow) warps features itself.
        * Inputs are validated; bad rank, shape, emptiness or non-finite geometry raises one
          ``ValueError`` naming the argument and the expected shape. Having no correspondence
          (e.g. disjoint crops) is not an error: the result then has zero pairs.
        * Outputs live on the device of the inputs.

    Matchers are plain classes rather than ``nn.Module``: they hold configuration only (no
    parameters, buffers or train/eval behaviour), so being a module would only add empty
    ``state_dict`` entries to any model that kept one as an attribute.
    """

    def __call__(self, *args: Any, **kwargs: Any) -> MatchResult:
        """Run :meth:`match` without autograd (see the class contract)."""
        with torch.no_grad():
            return self.match(*args, **kwargs)

    @abstractmethod
    def match(self, *args: Any, **kwargs: Any) -> MatchResult:
        """Compute the correspondences (see the subclass for arguments and shapes)."""

    def __repr__(self) -> str:
        options = ", ".join(f"{key}={value!r}" for key, value in vars(self).items())
        return f"{type(self).__name__}({options})"
