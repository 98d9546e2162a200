"""SuperFlow++-style temporal voting (accord implementation).

SuperFlow++ (arXiv 2503.19912) adds "a temporal voting strategy that propagates semantic
information across LiDAR scans"; its code is not released, so the rule here is this project's own
(method spec §4.6, an inference-time option of ``evaluate``):

1. the segmenter runs on keyframes ``t - n .. t + n`` of the **same scene**, found by following the
   info index's explicit ``prev_index`` / ``next_index`` links (never list order, so a scene border
   or an unordered index cannot pair unrelated scans);
2. each neighbour's points are moved into keyframe ``t``'s LiDAR frame with the calibrations and
   ego poses (``lidar_s -> ego(t_s) -> global -> ego(t) -> lidar_t``), which compensates the ego
   motion (objects that move themselves are not compensated);
3. points are matched by a cubic voxel grid in that frame: a point of ``t`` is matched to the
   neighbour points that fall into its voxel;
4. the class probabilities are averaged: for a point ``p`` of ``t``,
   ``P(p) = (P_t(p) + w * sum_s mean_{q in voxel(p), q from s} P_s(q)) / (1 + w * #matched s)``,
   neighbours without a point in ``p``'s voxel leaving it out; the prediction is ``argmax P(p)``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from pydantic import Field

from accord.utils.checks import check_tensor
from accord.config import StrictModel
from accord_superflow.data.geometry import RigidTransform, sensor_to_sensor
from accord_superflow.data.index import InfoIndex, KeyframeInfo, SensorFrame

__all__ = ["TemporalVotingConfig", "neighbour_keyframes", "lidar_to_lidar", "vote_probabilities"]


class TemporalVotingConfig(StrictModel):
    """``evaluate``'s ``temporal_voting`` option (SuperFlow++-style temporal voting, accord implementation)."""

    neighbours: int = Field(1, ge=1, description="keyframes on each side of t (same scene only)")
    neighbour_weight: float = Field(1.0, gt=0, description="weight of a neighbour's probabilities (t has weight 1)")
    voxel_size: float = Field(0.2, gt=0, description="edge of the cubic matching voxels in metres")


def neighbour_keyframes(index: InfoIndex, keyframe: KeyframeInfo, neighbours: int) -> list[KeyframeInfo]:
    """Keyframes ``t - n .. t + n`` of ``keyframe``'s scene except ``t``, by ``prev_index`` / ``next_index`` links.

    Fewer are returned near a scene border.
    """
    found = []
    for link in ("prev_index", "next_index"):
        current = keyframe
        for _ in range(neighbours):
            position = getattr(current, link)
            if position is None:
                break
            current = index.keyframes[position]
            found.append(current)
    return found


def lidar_to_lidar(source: SensorFrame, target: SensorFrame) -> RigidTransform:
    """Maps points of the ``source`` scan into the ``target`` scan's LiDAR frame (ego motion compensated)."""
    return sensor_to_sensor(source.sensor_to_ego, source.ego_to_global, target.sensor_to_ego, target.ego_to_global)


def _voxel_keys(xyz: torch.Tensor, voxel_size: float) -> torch.Tensor:
    return torch.floor(xyz / voxel_size).long()


def vote_probabilities(target_xyz: torch.Tensor, target_probabilities: torch.Tensor,
                       neighbours: Sequence[tuple[torch.Tensor, torch.Tensor]], voxel_size: float,
                       neighbour_weight: float = 1.0) -> torch.Tensor:
    """Average the class probabilities of a scan's points with those of matching neighbour points.

    Args:
        target_xyz: ``(N, 3)`` points of scan ``t``.
        target_probabilities: ``(N, K)`` their class probabilities.
        neighbours: per neighbour scan, ``(M_s, 3)`` points **already in t's frame** and their
            ``(M_s, K)`` probabilities.
        voxel_size: edge of the cubic matching voxels.
        neighbour_weight: ``w`` in the module docstring's rule.

    Returns:
        ``(N, K)`` voted probabilities (rows sum to 1 when the inputs' rows do).

    Raises:
        ValueError: mismatched shapes or a non-positive voxel size.
    """
    check_tensor(target_xyz, "target_xyz", shape=(None, 3), floating=True, min_rows=0)
    check_tensor(target_probabilities, "target_probabilities", shape=(target_xyz.shape[0], None), floating=True,
                 min_rows=0)
    if not voxel_size > 0:
        raise ValueError(f"voxel_size: expected a positive edge length, got {voxel_size}")
    num_points, num_classes = target_probabilities.shape
    total = target_probabilities.clone()
    weight = torch.ones(num_points, dtype=total.dtype, device=total.device)
    target_keys = _voxel_keys(target_xyz, voxel_size)
    for number, (xyz, probabilities) in enumerate(neighbours):
        check_tensor(xyz, f"neighbours[{number}] points", shape=(None, 3), floating=True, min_rows=0)
        check_tensor(probabilities, f"neighbours[{number}] probabilities", shape=(xyz.shape[0], num_classes),
                     floating=True, min_rows=0)
        # One voxel numbering for both scans: the target points' voxels come first in `inverse`.
        _, inverse = torch.unique(torch.cat([target_keys, _voxel_keys(xyz, voxel_size)]), dim=0,
                                  return_inverse=True)
        target_voxel, neighbour_voxel = inverse[:num_points], inverse[num_points:]
        num_voxels = int(inverse.max()) + 1 if len(inverse) else 0
        sums = total.new_zeros(num_voxels, num_classes).index_add_(0, neighbour_voxel, probabilities.to(total.dtype))
        counts = total.new_zeros(num_voxels).index_add_(0, neighbour_voxel, total.new_ones(len(neighbour_voxel)))
        matched = counts[target_voxel] > 0
        mean = sums[target_voxel] / counts[target_voxel].clamp(min=1).unsqueeze(1)
        total += neighbour_weight * mean * matched.unsqueeze(1)
        weight += neighbour_weight * matched
    return total / weight.unsqueeze(1)
