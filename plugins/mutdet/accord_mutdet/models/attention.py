"""Rotated multi-scale deformable cross-attention (ARS-DETR's decoder attention) on mmcv's op."""

from __future__ import annotations

import torch
from mmcv.ops import MultiScaleDeformableAttention
from mmcv.ops.multi_scale_deform_attn import MultiScaleDeformableAttnFunction, multi_scale_deformable_attn_pytorch

__all__ = ["RotatedMultiScaleDeformableAttention", "rotated_sampling_locations"]


def rotated_sampling_locations(reference: torch.Tensor, offsets: torch.Tensor, num_points: int) -> torch.Tensor:
    """Sampling points of box-relative offsets turned by each reference box's angle.

    mmcv's box form places a point at ``centre + offset / P * (w, h) / 2``; ARS-DETR rotates that
    displacement by the reference angle, so the points follow the oriented box. The rotation is
    applied in normalised image coordinates, exact for square inputs (the ARS-DETR setting).

    Args:
        reference: ``(B, Q, 5)`` normalised ``(cx, cy, w, h, theta)``.
        offsets: ``(B, Q, H, L, P, 2)`` raw offsets from the query.
        num_points: ``P``.

    Returns:
        ``(B, Q, H, L, P, 2)`` normalised ``(x, y)`` sampling locations.
    """
    centre = reference[:, :, None, None, None, :2]
    size = reference[:, :, None, None, None, 2:4]
    theta = reference[:, :, None, None, None, 4]
    local = offsets / num_points * size * 0.5
    cos, sin = torch.cos(theta), torch.sin(theta)
    dx, dy = local[..., 0], local[..., 1]
    turned = torch.stack([dx * cos - dy * sin, dx * sin + dy * cos], dim=-1)
    return centre + turned


class RotatedMultiScaleDeformableAttention(MultiScaleDeformableAttention):
    """mmcv's ``MultiScaleDeformableAttention`` (batch-first) with offsets rotated by the reference angle.

    Parameters, their initialisation and the sampling kernels (CUDA op, or the pure-PyTorch
    ``multi_scale_deformable_attn_pytorch`` on CPU) are mmcv's; only the placement of the sampling
    points differs (:func:`rotated_sampling_locations`), which mmcv has no option for.
    """

    def __init__(self, embed_dims: int, num_heads: int, num_levels: int, num_points: int, dropout: float) -> None:
        super().__init__(embed_dims=embed_dims, num_heads=num_heads, num_levels=num_levels, num_points=num_points,
                         dropout=dropout, batch_first=True)
        self.init_weights()

    def forward(self, query: torch.Tensor, value: torch.Tensor, reference: torch.Tensor,  # type: ignore[override]
                spatial_shapes: torch.Tensor, level_start_index: torch.Tensor,
                query_pos: torch.Tensor | None = None) -> torch.Tensor:
        """Residual output ``query + dropout(attention)``.

        Args:
            query: ``(B, Q, D)``.
            value: ``(B, S, D)`` flattened multi-scale memory.
            reference: ``(B, Q, 5)`` normalised reference boxes with angles (radians).
            spatial_shapes: ``(L, 2)`` long ``(H_l, W_l)``.
            level_start_index: ``(L,)`` long.
            query_pos: ``(B, Q, D)`` added to the query for offsets and weights.
        """
        identity = query
        if query_pos is not None:
            query = query + query_pos
        batch, num_query, _ = query.shape
        num_value = value.shape[1]
        value = self.value_proj(value).view(batch, num_value, self.num_heads, -1)
        offsets = self.sampling_offsets(query).view(
            batch, num_query, self.num_heads, self.num_levels, self.num_points, 2)
        weights = self.attention_weights(query).view(
            batch, num_query, self.num_heads, self.num_levels * self.num_points).softmax(-1)
        weights = weights.view(batch, num_query, self.num_heads, self.num_levels, self.num_points)
        locations = rotated_sampling_locations(reference, offsets, self.num_points)
        if value.is_cuda:
            output = MultiScaleDeformableAttnFunction.apply(
                value, spatial_shapes, level_start_index, locations, weights, self.im2col_step)
        else:
            output = multi_scale_deformable_attn_pytorch(value, spatial_shapes, locations, weights)
        return identity + self.dropout(self.output_proj(output))
