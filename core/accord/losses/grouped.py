"""Group-pooled contrast: pool two feature sets per shared region id, then contrast the regions.

The SLidR / PPKT pattern (superpoint <-> superpixel), DetCon-style region pooling, or any pair of
modalities whose elements carry a shared segment id: average each modality's features per group,
keep the groups present in both, and apply an InfoNCE in which pooled ``a`` of group ``g`` must
pick pooled ``b`` of the same group among all kept groups of the (global) batch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from accord import dist as accord_dist
from accord.utils.checks import check_finite, check_index_range, check_tensor
from accord.losses.precision import float32_forward
from accord.losses.infonce import InfoNCELoss

__all__ = ["group_mean_pool", "GroupedContrastLoss"]

_DEFAULT_TEMPERATURE = 0.07


def _check_group_ids(group_ids: torch.Tensor, name: str, num_rows: int) -> None:
    check_tensor(group_ids, name, shape=(num_rows,), floating=False)


def group_mean_pool(
    features: torch.Tensor,
    group_ids: torch.Tensor,
    num_groups: int | None = None,
    ignore_index: int = -1,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean of ``features`` per group id, vectorised with ``index_add`` (differentiable).

    Args:
        features: per-element features.
        group_ids: integer group of each element, in ``[0, num_groups)``, or ``ignore_index`` for
            elements that belong to no group.
        num_groups: number of groups ``G``; ``None`` uses ``max(group_ids) + 1`` (0 when every
            element is ignored).
        ignore_index: negative id marking ungrouped elements.

    Returns:
        ``(pooled, present)``: per-group means (rows of absent groups are zero) and whether each
        group has at least one element.

    Shape:
        - ``features``: ``(N, C)``; ``group_ids``: ``(N,)`` integer.
        - ``pooled``: ``(G, C)``; ``present``: ``(G,)`` bool.

    Raises:
        ValueError: wrong shapes or dtypes, an empty input, ids out of range, a non-negative
            ``ignore_index``.

    Example:
        >>> pooled, present = group_mean_pool(torch.tensor([[1.0], [3.0], [5.0]]), torch.tensor([1, 1, -1]))
        >>> pooled.flatten().tolist(), present.tolist()
        ([0.0, 2.0], [False, True])
    """
    check_tensor(features, "features", ndim=2, floating=True)
    _check_group_ids(group_ids, "group_ids", features.shape[0])
    if ignore_index >= 0:
        raise ValueError(f"ignore_index: must be negative so it cannot collide with a group id, got {ignore_index}")
    valid = group_ids != ignore_index
    if num_groups is None:
        num_groups = int(group_ids[valid].max()) + 1 if bool(valid.any()) else 0
    elif isinstance(num_groups, bool) or not isinstance(num_groups, int) or num_groups < 0:
        raise ValueError(f"num_groups: expected a non-negative int or None, got {num_groups!r}")
    check_index_range(group_ids[valid], "group_ids", upper=num_groups)
    # Ignored elements go to an extra trailing slot that is dropped, avoiding a data-dependent
    # boolean selection of the (large) per-element tensor.
    slots = torch.where(valid, group_ids, num_groups)
    sums = features.new_zeros(num_groups + 1, features.shape[1]).index_add(0, slots, features)
    counts = features.new_zeros(num_groups + 1).index_add(0, slots, features.new_ones(features.shape[0]))
    sums, counts = sums[:num_groups], counts[:num_groups]
    return sums / counts.clamp(min=1.0).unsqueeze(1), counts > 0


class GroupedContrastLoss(nn.Module):
    """InfoNCE between per-group mean features of two modalities (positive = same group).

    ``features_a`` (e.g. LiDAR points) and ``features_b`` (e.g. image pixels) carry group ids
    (superpoints / superpixels / regions). Each side is mean-pooled per group
    (:func:`group_mean_pool`), groups present on both sides are kept, and
    ``pair_loss(pooled_a[kept], pooled_b[kept])`` is returned: pooled ``a`` of each group must pick
    pooled ``b`` of the same group among all kept groups, so other groups of the same and of other
    samples are negatives.

    Batches: group ids are per sample (``0 .. groups_per_sample - 1``); pass ``batch_index_a`` /
    ``batch_index_b`` and the loss combines them into ``sample * groups_per_sample + group`` so
    that group 3 of sample 0 and group 3 of sample 1 stay distinct.

    Distributed (``gather_distributed=True``): the pooled features of every rank are gathered with
    :func:`accord.dist.gather_with_grad` into rank-major blocks, which offsets every rank's group
    ids by its block start and keeps them distinct. Every rank then evaluates ``pair_loss`` on the
    same global set of kept groups (group counts are small, so the ``M x M`` logits are cheap), so
    the loss value equals the single-process loss on the concatenated batch. Its gradient reaches
    each rank's features ``world_size`` times through the gather's all-reduce, and DDP's ``1 /
    world_size`` averaging cancels that exactly. ``pair_loss`` must therefore be a non-distributed
    loss.

    Args:
        pair_loss: module mapping ``(anchors (M, C), positives (M, C))`` with row-aligned positives
            to a scalar; default: ``InfoNCELoss(temperature)`` (one direction, a -> b, cosine
            logits, as SLidR).
        temperature: temperature of the default pair loss (default 0.07, as SLidR); only valid when
            ``pair_loss`` is ``None``.
        gather_distributed: contrast against the groups of all ranks.
        ignore_index: negative group id of elements that belong to no group.

    Shape:
        - ``features_a``: ``(N_a, C)``; ``group_ids_a``, ``batch_index_a``: ``(N_a,)`` integer.
        - ``features_b``: ``(N_b, C)``; ``group_ids_b``, ``batch_index_b``: ``(N_b,)`` integer.
        - Output: scalar.
    """

    def __init__(
        self,
        pair_loss: nn.Module | None = None,
        temperature: float | None = None,
        gather_distributed: bool = False,
        ignore_index: int = -1,
    ) -> None:
        super().__init__()
        if pair_loss is not None and temperature is not None:
            raise ValueError("temperature: only applies to the default pair loss; set it on pair_loss instead")
        if pair_loss is None:
            temperature = _DEFAULT_TEMPERATURE if temperature is None else temperature
            pair_loss = InfoNCELoss(temperature=temperature)
        if ignore_index >= 0:
            raise ValueError(f"ignore_index: must be negative so it cannot collide with a group id, got {ignore_index}")
        self.pair_loss = pair_loss
        self.gather_distributed = gather_distributed
        self.ignore_index = ignore_index

    @float32_forward
    def forward(
        self,
        features_a: torch.Tensor,
        group_ids_a: torch.Tensor,
        features_b: torch.Tensor,
        group_ids_b: torch.Tensor,
        batch_index_a: torch.Tensor | None = None,
        batch_index_b: torch.Tensor | None = None,
        groups_per_sample: int | None = None,
    ) -> torch.Tensor:
        """Pool both sides per (sample, group) and contrast the groups present on both sides.

        Args:
            features_a: features of modality a.
            group_ids_a: group of each row of ``features_a`` (per sample), or ``ignore_index``.
            features_b: features of modality b, same channel count.
            group_ids_b: group of each row of ``features_b``, or ``ignore_index``.
            batch_index_a: sample of each row of ``features_a``; ``None`` means one sample.
            batch_index_b: sample of each row of ``features_b``; give both or neither.
            groups_per_sample: upper bound on per-sample group ids; ``None`` infers
                ``max(group ids) + 1``.

        Returns:
            The scalar loss.

        Raises:
            ValueError: bad shapes / dtypes / ranges, non-finite features, or no group present on
                both sides (over all ranks when distributed).
        """
        for features, name in ((features_a, "features_a"), (features_b, "features_b")):
            check_tensor(features, name, ndim=2, floating=True)
            check_finite(features, name)
        if features_a.shape[1] != features_b.shape[1]:
            raise ValueError(
                f"features_b: expected {features_a.shape[1]} channels (as features_a), "
                f"got shape {tuple(features_b.shape)}"
            )
        _check_group_ids(group_ids_a, "group_ids_a", features_a.shape[0])
        _check_group_ids(group_ids_b, "group_ids_b", features_b.shape[0])
        if (batch_index_a is None) != (batch_index_b is None):
            raise ValueError("batch_index_a and batch_index_b: give both or neither")
        if groups_per_sample is None:
            groups_per_sample = max(self._max_group_id(group_ids_a), self._max_group_id(group_ids_b)) + 1
        elif isinstance(groups_per_sample, bool) or not isinstance(groups_per_sample, int) or groups_per_sample <= 0:
            raise ValueError(f"groups_per_sample: expected a positive int or None, got {groups_per_sample!r}")
        for group_ids, name in ((group_ids_a, "group_ids_a"), (group_ids_b, "group_ids_b")):
            check_index_range(group_ids[group_ids != self.ignore_index], name, upper=groups_per_sample)
        if batch_index_a is None or batch_index_b is None:
            ids_a, ids_b, num_groups = group_ids_a, group_ids_b, groups_per_sample
        else:
            _check_group_ids(batch_index_a, "batch_index_a", features_a.shape[0])
            _check_group_ids(batch_index_b, "batch_index_b", features_b.shape[0])
            num_samples = max(int(batch_index_a.max()), int(batch_index_b.max())) + 1
            check_index_range(batch_index_a, "batch_index_a", upper=num_samples)
            check_index_range(batch_index_b, "batch_index_b", upper=num_samples)
            ids_a = self._combine(group_ids_a, batch_index_a, groups_per_sample)
            ids_b = self._combine(group_ids_b, batch_index_b, groups_per_sample)
            num_groups = num_samples * groups_per_sample
        pooled_a, present_a = group_mean_pool(features_a, ids_a, num_groups, self.ignore_index)
        pooled_b, present_b = group_mean_pool(features_b, ids_b, num_groups, self.ignore_index)
        if self.gather_distributed and accord_dist.is_distributed():
            pooled_a, pooled_b, present_a, present_b = self._gather(pooled_a, pooled_b, present_a, present_b)
        kept = present_a & present_b
        if not bool(kept.any()):
            raise ValueError("group_ids_a/group_ids_b: no group is present in both features_a and features_b")
        return self.pair_loss(pooled_a[kept], pooled_b[kept])

    def _max_group_id(self, group_ids: torch.Tensor) -> int:
        valid = group_ids[group_ids != self.ignore_index]
        return int(valid.max()) if valid.numel() else -1

    def _combine(self, group_ids: torch.Tensor, batch_index: torch.Tensor, groups_per_sample: int) -> torch.Tensor:
        combined = batch_index * groups_per_sample + group_ids
        return torch.where(group_ids != self.ignore_index, combined, torch.full_like(combined, self.ignore_index))

    @staticmethod
    def _gather(
        pooled_a: torch.Tensor, pooled_b: torch.Tensor, present_a: torch.Tensor, present_b: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        # Ranks may see different sample counts, but gather_with_grad needs equal shapes: pad every
        # rank's group table to the largest one with absent (present=False) rows.
        local_rows = torch.tensor([pooled_a.shape[0]], device=pooled_a.device)
        max_rows = int(accord_dist.gather_no_grad(local_rows).max())
        padding = max_rows - pooled_a.shape[0]
        gathered_a = accord_dist.gather_with_grad(F.pad(pooled_a, (0, 0, 0, padding)))
        gathered_b = accord_dist.gather_with_grad(F.pad(pooled_b, (0, 0, 0, padding)))
        # Presence masks carry no gradient; uint8 because not every backend all-gathers bool.
        presence = torch.stack([present_a, present_b], dim=1).to(torch.uint8)
        gathered_presence = accord_dist.gather_no_grad(F.pad(presence, (0, 0, 0, padding))).bool()
        return gathered_a, gathered_b, gathered_presence[:, 0], gathered_presence[:, 1]
