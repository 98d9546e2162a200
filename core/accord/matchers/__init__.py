"""Dense-correspondence matchers: given two views' features and/or geometry, return weighted pairs.

Every matcher is a :class:`Matcher` whose call returns a :class:`MatchResult`
(``index_a``, ``index_b``, ``weight`` and, for batched inputs, ``batch``). Grid conventions shared
by all of them: array-axis order, cell ``i`` centred at index coordinate ``i``, C-order
flattening (see :mod:`accord.matchers._grid`).
"""

from __future__ import annotations

from accord.matchers.base import Matcher, MatchResult
from accord.matchers.displacement import DisplacementFieldMatcher
from accord.matchers.feature import FeatureArgmaxMatcher
from accord.matchers.identity import IdentityMatcher
from accord.matchers.overlap import CropOverlapMatcher, crop_affine
from accord.matchers.projection import PointProjection, PointProjectionMatcher, project_points
from accord.matchers.region import RegionMatcher, pool_regions

__all__ = [
    "CropOverlapMatcher",
    "DisplacementFieldMatcher",
    "FeatureArgmaxMatcher",
    "IdentityMatcher",
    "MatchResult",
    "Matcher",
    "PointProjection",
    "PointProjectionMatcher",
    "RegionMatcher",
    "crop_affine",
    "pool_regions",
    "project_points",
]
