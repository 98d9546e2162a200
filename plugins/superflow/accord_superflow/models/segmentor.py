"""mmdet3d components for a downstream MinkUNet segmentor on SuperFlow's cylindrical voxels.

Importing this module (``custom_imports`` in ``configs/superflow/minkunet34_seg.py``) registers in
mmdet3d's ``MODELS``:

* ``SFMinkUNetBackbone`` (:mod:`accord_superflow.models.backbone`);
* ``SFCylindricalDataPreprocessor``: mmdet3d's ``Det3DDataPreprocessor`` with SuperFlow's
  cylindrical voxelisation (the pretraining grid, so downstream features match pretraining;
  mmdet3d's ``'minkunet'`` voxeliser is Cartesian and CUDA-only). It fills what mmdet3d's
  ``MinkUNet`` segmentor and ``MinkUNetHead`` read: ``data_sample.point2voxel_map`` (point -> voxel
  of its own sample), ``data_sample.batch_idx`` and, when points are labelled,
  ``gt_pts_seg.voxel_semantic_mask`` (majority label of the voxel's points).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from accord_superflow.models.backbone import SFMinkUNetBackbone
from accord_superflow.models.voxelize import DEFAULT_VOXEL_SIZE, cylindrical_voxelize

from mmdet3d.models.data_preprocessors import Det3DDataPreprocessor  # isort: skip
from mmdet3d.registry import MODELS  # isort: skip

__all__ = ["SFMinkUNetBackbone", "SFCylindricalDataPreprocessor", "majority_voxel_labels"]


def majority_voxel_labels(labels: torch.Tensor, point_to_voxel: torch.Tensor, num_voxels: int) -> torch.Tensor:
    """Most frequent label of each voxel's points (ties: the smallest label).

    Args:
        labels: ``(N,)`` non-negative integer point labels.
        point_to_voxel: ``(N,)`` voxel of every point, in ``[0, num_voxels)``.
        num_voxels: ``V``.

    Returns:
        ``(V,)`` int64 labels.
    """
    num_labels = int(labels.max()) + 1
    counts = torch.bincount(point_to_voxel * num_labels + labels.long(), minlength=num_voxels * num_labels)
    return counts.view(num_voxels, num_labels).argmax(dim=1)


@MODELS.register_module()
class SFCylindricalDataPreprocessor(Det3DDataPreprocessor):
    """``Det3DDataPreprocessor`` whose voxeliser is SuperFlow's cylindrical grid.

    Args:
        voxel_size: ``(rho m, phi deg, z m)``.
        **kwargs: ``Det3DDataPreprocessor`` options (image normalisation etc.), except the
            voxelisation ones it replaces.
    """

    def __init__(self, voxel_size: Sequence[float] = DEFAULT_VOXEL_SIZE, **kwargs) -> None:
        super().__init__(voxel=False, **kwargs)
        # Turn on mmdet3d's voxelize() call, served by the override below (no mmdet3d voxel layer).
        self.voxel = True
        self.voxel_size = tuple(voxel_size)

    @torch.no_grad()
    def voxelize(self, points: list[torch.Tensor], data_samples) -> dict[str, torch.Tensor]:
        """Voxelise every sample's points (all columns are averaged into the voxel features).

        Returns:
            ``{"voxels": (V, C) features, "coors": (V, 4) int32 (sample, rho, phi, z)}``.
        """
        sizes = [len(p) for p in points]
        cloud = torch.repeat_interleave(torch.arange(len(points), device=points[0].device),
                                        torch.tensor(sizes, device=points[0].device))
        voxels = cylindrical_voxelize(torch.cat(points), cloud, len(points), self.voxel_size)
        # Voxels are sorted by sample, so each sample's voxels are one contiguous block.
        voxel_starts = torch.searchsorted(voxels.coords[:, 0].contiguous(),
                                          torch.arange(len(points), device=cloud.device, dtype=torch.int32))
        point_starts = [0, *torch.tensor(sizes).cumsum(0).tolist()]
        for sample, data_sample in enumerate(data_samples):
            point_to_voxel = voxels.point_to_voxel[point_starts[sample]:point_starts[sample + 1]]
            data_sample.point2voxel_map = point_to_voxel - voxel_starts[sample]
            data_sample.batch_idx = voxels.coords[voxels.coords[:, 0] == sample, 0]
            labels = data_sample.gt_pts_seg.get("pts_semantic_mask") if "gt_pts_seg" in data_sample else None
            if labels is not None:
                in_sample = voxels.coords[:, 0] == sample
                data_sample.gt_pts_seg.voxel_semantic_mask = majority_voxel_labels(
                    labels, data_sample.point2voxel_map, int(in_sample.sum()))
        return {"voxels": voxels.features, "coors": voxels.coords}
