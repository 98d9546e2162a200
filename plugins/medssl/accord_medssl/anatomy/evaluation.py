"""How well an anatomy embedding finds corresponding points: the measurement behind its defaults.

Alice's miner (:mod:`accord_medssl.anatomy.miner`) takes, for a point of one volume, the most
similar voxel of another volume and accepts the pair when the score exceeds 0.7. Whether that
anchor lands on the same anatomy is measured here on labelled volumes, with the miner's own
vectorised search (:func:`~accord_medssl.anatomy.miner.similarity_map`):

- **cross-case** (two different labelled cases, e.g. phantoms): the query point's label must be
  the label at its match (*organ hit rate*), against the chance of a random voxel;
- **known deformation** (:func:`random_deformed_copy`: a volume and a randomly affine + elastically
  deformed copy whose pull-back gives every copy voxel's true position in the original): the
  distance in mm between the match and the true point (*localisation error*), besides the hit rate.

Both report the best-match score distribution and the share accepted at the miner's threshold, so a
uniformly similar embedding (every score near 1, acceptance regardless of correctness) shows up as
a small gap between ``score_mean`` and ``similarity_mean`` and an ``accepted_hit_rate`` no better
than ``hit_rate``. Besides the raw score, three other acceptance criteria are scored on the same
matches (:data:`ACCEPTANCE_CRITERIA`): the margin over the mean score, the distinctiveness of the
best match against the best one outside a small radius, and cycle consistency.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from accord.utils.checks import check_tensor
from accord_medssl.anatomy.miner import AnatomySearchIndex, best_matches, similarity_map, unravel_cells

__all__ = [
    "ACCEPTANCE_CRITERIA",
    "DeformedCopy",
    "MatchOutcomes",
    "match_labelled_points",
    "random_deformed_copy",
    "sample_labelled_points",
    "second_best_scores",
]


def sample_labelled_points(labels: torch.Tensor, count: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Random voxels with a label above 0, the same number from each label present.

    Balanced sampling keeps a large organ (the liver) from dominating the hit rate.

    Args:
        labels: integer label map ``(D, H, W)``, 0 for background.
        count: points in all (split evenly over the labels present, at least one each).
        generator: CPU random source.

    Returns:
        ``(n, 3)`` long voxel indices, grouped by label; a label with fewer voxels than its share
        contributes every voxel it has.

    Raises:
        ValueError: a label map that is not 3-D integers, or one without any labelled voxel.
    """
    check_tensor(labels, "labels", ndim=3, floating=False)
    present = [int(value) for value in labels.unique() if value > 0]
    if not present:
        raise ValueError("labels: expected at least one voxel with a label above 0")
    share = max(1, count // len(present))
    points = []
    for label in present:
        voxels = (labels == label).nonzero()
        picks = torch.randperm(len(voxels), generator=generator)[:share].to(voxels.device)
        points.append(voxels[picks])
    return torch.cat(points)


#: Acceptance criteria scored by :meth:`MatchOutcomes.summary`, each "higher is more confident":
#: ``score`` the best-match cosine (the miner's rule); ``margin`` the best score minus the query's
#: mean score over the target; ``distinctiveness`` the cosine-distance ratio
#: ``(1 - second_score) / (1 - score)`` of the best cell outside the exclusion radius over the best
#: (Lowe's ratio test); ``cycle`` minus ``cycle_error_mm``, how far the match's own best match back
#: in the query volume lands from the query point.
ACCEPTANCE_CRITERIA = ("score", "margin", "distinctiveness", "cycle")

#: Shares of the points kept, most confident first, at which :meth:`MatchOutcomes.summary` reports
#: each criterion's hit rate (a threshold at the share's quantile of that criterion).
KEPT_SHARES = {"top_half": 0.5, "top_quarter": 0.25}


@dataclass(frozen=True)
class MatchOutcomes:
    """Per-point results of matching query points into a target volume.

    Attributes:
        hit: ``(n,)`` bool, the label at the match equals the query point's label.
        score: ``(n,)`` best-match score (the miner's cosine).
        similarity_mean: ``(n,)`` mean score of the query point over every target cell: the
            background level against which ``score`` stands out (or does not).
        chance: ``(n,)`` share of target voxels carrying the query point's label (the hit rate of a
            random match).
        error_mm: ``(n,)`` distance between the match and the known true point, or ``None``.
        second_score: ``(n,)`` best score among target cells farther than the exclusion radius
            from the best cell (:func:`match_labelled_points`), or ``None``.
        cycle_error_mm: ``(n,)`` distance between the query point and the best match, back in the
            query volume, of its match, or ``None``.
    """

    hit: torch.Tensor
    score: torch.Tensor
    similarity_mean: torch.Tensor
    chance: torch.Tensor
    error_mm: torch.Tensor | None = None
    second_score: torch.Tensor | None = None
    cycle_error_mm: torch.Tensor | None = None

    @classmethod
    def concatenate(cls, outcomes: Sequence[MatchOutcomes]) -> MatchOutcomes:
        """Pool the points of several volume pairs (each optional field in all of them or in none).

        Raises:
            ValueError: no outcomes, or an optional field present in some and ``None`` in others.
        """
        if not outcomes:
            raise ValueError("outcomes: expected at least one MatchOutcomes")
        fields = ["hit", "score", "similarity_mean", "chance"]
        for name in ("error_mm", "second_score", "cycle_error_mm"):
            present = {getattr(outcome, name) is not None for outcome in outcomes}
            if len(present) > 1:
                raise ValueError(f"outcomes: mixes pairs with and without {name}")
            fields += [name] if present.pop() else []
        return cls(**{name: torch.cat([getattr(outcome, name) for outcome in outcomes]) for name in fields})

    def criteria(self) -> dict[str, torch.Tensor]:
        """The :data:`ACCEPTANCE_CRITERIA` these outcomes allow, as ``(n,)`` float64, higher = more confident."""
        score = self.score.double()
        values = {"score": score, "margin": score - self.similarity_mean.double()}
        if self.second_score is not None:
            values["distinctiveness"] = (1 - self.second_score.double()) / (1 - score).clamp(min=1e-9)
        if self.cycle_error_mm is not None:
            values["cycle"] = -self.cycle_error_mm.double()
        return values

    def summary(self, threshold: float = 0.7) -> dict[str, float]:
        """Pooled statistics.

        Args:
            threshold: the miner's acceptance threshold (Alice: 0.7).

        Returns:
            ``points``; ``hit_rate`` and ``chance_hit_rate``; ``score_mean``, ``score_p05``,
            ``score_p50``, ``score_p95`` of the best-match score; ``similarity_mean`` (mean score
            over all target cells); ``accepted`` (share with ``score > threshold``) and
            ``accepted_hit_rate`` (NaN when none is accepted); for each of :meth:`criteria`
            (``score`` always) ``hit_{criterion}_auc``, the chance that a hit scores above a miss
            (ties count half; 0.5: the criterion says nothing about correctness, NaN without both
            hits and misses) and, for each of :data:`KEPT_SHARES`, ``{criterion}_{share}_hit_rate``,
            the hit rate among the points whose criterion is at least its ``1 - share`` quantile;
            with known true points also ``error_mm_mean``, ``error_mm_p50``, ``error_mm_p90`` and
            ``{criterion}_{share}_error_mm_mean``.
        """
        score = self.score.double()
        accepted = score > threshold
        quantiles = torch.quantile(score, torch.tensor([0.05, 0.5, 0.95], dtype=torch.float64, device=score.device))
        result = {
            "points": float(len(score)),
            "hit_rate": self.hit.double().mean().item(),
            "chance_hit_rate": self.chance.double().mean().item(),
            "score_mean": score.mean().item(),
            "score_p05": quantiles[0].item(),
            "score_p50": quantiles[1].item(),
            "score_p95": quantiles[2].item(),
            "similarity_mean": self.similarity_mean.double().mean().item(),
            "accepted": accepted.double().mean().item(),
            "accepted_hit_rate": self.hit[accepted].double().mean().item() if bool(accepted.any()) else math.nan,
        }
        error = None if self.error_mm is None else self.error_mm.double()
        if error is not None:
            error_quantiles = torch.quantile(error, torch.tensor([0.5, 0.9], dtype=torch.float64, device=error.device))
            result.update(
                error_mm_mean=error.mean().item(),
                error_mm_p50=error_quantiles[0].item(),
                error_mm_p90=error_quantiles[1].item(),
            )
        for criterion, values in self.criteria().items():
            result[f"hit_{criterion}_auc"] = _auc(values[self.hit], values[~self.hit])
            for share_name, share in KEPT_SHARES.items():
                kept = values >= torch.quantile(values, 1 - share)
                result[f"{criterion}_{share_name}_hit_rate"] = self.hit[kept].double().mean().item()
                if error is not None:
                    result[f"{criterion}_{share_name}_error_mm_mean"] = error[kept].mean().item()
        return result


def _auc(positive: torch.Tensor, negative: torch.Tensor) -> float:
    """Mann-Whitney AUC of ``positive`` over ``negative`` scores, ties counted half (NaN if either is empty)."""
    if positive.numel() == 0 or negative.numel() == 0:
        return math.nan
    above = (positive[:, None] > negative[None]).double().mean()
    tied = (positive[:, None] == negative[None]).double().mean()
    return (above + 0.5 * tied).item()


def second_best_scores(scores: torch.Tensor, target: AnatomySearchIndex, exclusion_radius: int) -> torch.Tensor:
    """Each row's best score among the cells farther than ``exclusion_radius`` from its best cell.

    Distances are Chebyshev distances on the target's local grid, so the excluded neighbourhood is
    the ``(2 r + 1)^3`` box of cells around the best one (cut at the grid's edges).

    Args:
        scores: ``(n, N_l)`` scores over the target's local grid (:func:`similarity_map`).
        target: the index the scores were computed against.
        exclusion_radius: cells per axis around the best cell left out (>= 0).

    Returns:
        ``(n,)`` second-best scores, ``-inf`` for a row whose box covers the whole grid.

    Raises:
        ValueError: a negative radius or scores of another grid size.
    """
    if exclusion_radius < 0:
        raise ValueError(f"exclusion_radius: expected >= 0 cells, got {exclusion_radius!r}")
    grid = target.local_grid
    check_tensor(scores, "scores", shape=(None, math.prod(grid)), floating=True)
    best_cells = unravel_cells(scores.argmax(dim=1), grid)  # (n, 3)
    near = [
        (torch.arange(size, device=scores.device)[None] - best_cells[:, axis, None]).abs() <= exclusion_radius
        for axis, size in enumerate(grid)
    ]  # per axis (n, size)
    box = near[0][:, :, None, None] & near[1][:, None, :, None] & near[2][:, None, None, :]  # (n, *grid)
    return scores.masked_fill(box.flatten(1), -math.inf).amax(dim=1)


def match_labelled_points(
    points: torch.Tensor,
    query: AnatomySearchIndex,
    target: AnatomySearchIndex,
    query_labels: torch.Tensor,
    target_labels: torch.Tensor,
    true_points: torch.Tensor | None = None,
    spacing: Sequence[float] = (1.0, 1.0, 1.0),
    exclusion_radius: int = 2,
) -> MatchOutcomes:
    """Match query points into the target as the miner does and score the matches.

    Besides the miner's best score, records what the other :data:`ACCEPTANCE_CRITERIA` need: the
    second-best score outside ``exclusion_radius`` and the cycle error (each match matched back
    into the query volume).

    Args:
        points: ``(n, 3)`` long voxel indices in the query volume.
        query: the query volume's search index.
        target: the target volume's search index.
        query_labels: ``(D, H, W)`` integer labels of the query volume.
        target_labels: ``(D', H', W')`` integer labels of the target volume.
        true_points: ``(n, 3)`` float true positions of the points in target voxel coordinates,
            if known (e.g. :attr:`DeformedCopy.source_points`).
        spacing: the voxel size in mm of both volumes, for ``error_mm`` and ``cycle_error_mm``.
        exclusion_radius: local cells around the best match left out of ``second_score``.

    Returns:
        The per-point outcomes (on the CPU).

    Raises:
        ValueError: label maps that do not fit their volumes, or ``true_points`` of another shape.
    """
    check_tensor(query_labels, "query_labels", shape=tuple(query.volume_shape), floating=False)
    check_tensor(target_labels, "target_labels", shape=tuple(target.volume_shape), floating=False)
    scores = similarity_map(points, query, target)
    matched, best_score = best_matches(scores, target)
    returned, _ = best_matches(similarity_map(matched, target, query), query)
    millimetres = torch.tensor(tuple(spacing), dtype=torch.float64)
    matched = matched.cpu()
    query_label = query_labels.cpu()[tuple(points.cpu().T)]
    target_labels = target_labels.cpu()
    hit = target_labels[tuple(matched.T)] == query_label
    label_share = torch.bincount(target_labels.flatten().long(), minlength=int(query_label.max()) + 1).double()
    label_share = label_share / target_labels.numel()
    error_mm = None
    if true_points is not None:
        check_tensor(true_points, "true_points", shape=tuple(points.shape), floating=True)
        error_mm = ((matched.double() - true_points.cpu().double()) * millimetres).norm(dim=1)
    return MatchOutcomes(
        hit=hit,
        score=best_score.cpu(),
        similarity_mean=scores.mean(dim=1).cpu(),
        chance=label_share[query_label.long()],
        error_mm=error_mm,
        second_score=second_best_scores(scores, target, exclusion_radius).cpu(),
        cycle_error_mm=((returned.cpu() - points.cpu()).double() * millimetres).norm(dim=1),
    )


@dataclass(frozen=True)
class DeformedCopy:
    """A volume resampled through a known random transform.

    Attributes:
        volume: ``(C, D, H, W)`` the deformed image (zero where it samples outside the original).
        labels: ``(D, H, W)`` the deformed labels (nearest neighbour; 0 outside the original).
        source_points: ``(D, H, W, 3)`` float64, for each voxel of the copy the voxel coordinates
            in the original it was sampled from (the true correspondence).
    """

    volume: torch.Tensor
    labels: torch.Tensor
    source_points: torch.Tensor


def _rotation(angles: torch.Tensor) -> torch.Tensor:
    """``(3, 3)`` rotation about the three axes by ``angles`` (radians), composed in axis order."""
    rotation = torch.eye(3, dtype=torch.float64)
    for axis, angle in enumerate(angles.tolist()):
        first, second = [other for other in range(3) if other != axis]
        plane = torch.eye(3, dtype=torch.float64)
        plane[first, first] = plane[second, second] = math.cos(angle)
        plane[first, second], plane[second, first] = -math.sin(angle), math.sin(angle)
        rotation = plane @ rotation
    return rotation


def random_deformed_copy(
    volume: torch.Tensor,
    labels: torch.Tensor,
    spacing: Sequence[float] = (1.0, 1.0, 1.0),
    *,
    max_rotation_deg: float = 10.0,
    max_scale: float = 0.1,
    max_translation_mm: float = 10.0,
    max_elastic_mm: float = 4.0,
    elastic_control_points: int = 4,
    generator: torch.Generator | None = None,
) -> DeformedCopy:
    """Resample a volume and its labels through a random affine + smooth elastic pull-back.

    Copy voxel ``x`` (in mm, ``x * spacing``) samples the original at
    ``c + A (x - c) + t + u(x)``: ``c`` the volume centre, ``A`` a rotation by up to
    ``max_rotation_deg`` about each axis times a per-axis scale in ``1 +- max_scale``, ``t`` a shift
    of up to ``max_translation_mm`` per axis, and ``u`` a displacement of up to ``max_elastic_mm``
    per axis drawn on ``elastic_control_points ** 3`` control points and interpolated trilinearly
    (smooth, and small against the control spacing, so it does not fold).

    Args:
        volume: ``(C, D, H, W)`` float image.
        labels: ``(D, H, W)`` integer labels.
        spacing: voxel size in mm per axis.
        max_rotation_deg: largest rotation per axis.
        max_scale: largest relative scale change per axis.
        max_translation_mm: largest shift per axis.
        max_elastic_mm: largest elastic displacement per axis.
        elastic_control_points: control points per axis of the elastic field (>= 2).
        generator: CPU random source.

    Returns:
        The copy, its labels and each copy voxel's source position.

    Raises:
        ValueError: a volume that is not ``(C, D, H, W)``, labels of another grid, or bad ranges.
    """
    check_tensor(volume, "volume", ndim=4, floating=True)
    shape = tuple(volume.shape[1:])
    check_tensor(labels, "labels", shape=shape, floating=False)
    millimetres = torch.tensor(tuple(spacing), dtype=torch.float64)
    if millimetres.shape != (3,) or bool((millimetres <= 0).any()):
        raise ValueError(f"spacing: expected 3 positive voxel sizes in mm, got {spacing!r}")
    ranges = {"max_rotation_deg": max_rotation_deg, "max_scale": max_scale,
              "max_translation_mm": max_translation_mm, "max_elastic_mm": max_elastic_mm}
    for name, value in ranges.items():
        if value < 0:
            raise ValueError(f"{name}: expected >= 0, got {value!r}")
    if max_scale >= 1:
        raise ValueError(f"max_scale: expected < 1 (scales stay positive), got {max_scale!r}")
    if elastic_control_points < 2:
        raise ValueError(f"elastic_control_points: expected >= 2, got {elastic_control_points!r}")

    def uniform(*size: int) -> torch.Tensor:
        """Uniform in [-1, 1]."""
        return 2 * torch.rand(*size, generator=generator, dtype=torch.float64) - 1

    linear = _rotation(uniform(3) * math.radians(max_rotation_deg)) @ torch.diag(1 + max_scale * uniform(3))
    translation = uniform(3) * max_translation_mm
    control = uniform(1, 3, *(elastic_control_points,) * 3) * max_elastic_mm
    elastic = F.interpolate(control, size=shape, mode="trilinear", align_corners=True)[0]  # (3, D, H, W) mm
    grid = torch.stack(torch.meshgrid(*(torch.arange(size, dtype=torch.float64) for size in shape), indexing="ij"), -1)
    centre = (torch.tensor(shape, dtype=torch.float64) - 1) / 2 * millimetres
    source_mm = (grid * millimetres - centre) @ linear.T + centre + translation + elastic.permute(1, 2, 3, 0)
    source_points = source_mm / millimetres
    # grid_sample wants (x, y, z) = (W, H, D) order, normalised so -1 / 1 are the first / last voxel centres.
    extent = torch.tensor(shape, dtype=torch.float64) - 1
    sampling = (2 * source_points / extent.clamp(min=1) - 1).flip(-1)[None].to(volume.dtype)
    warped = F.grid_sample(volume[None], sampling, mode="bilinear", padding_mode="zeros", align_corners=True)[0]
    warped_labels = F.grid_sample(
        labels[None, None].to(volume.dtype), sampling, mode="nearest", padding_mode="zeros", align_corners=True
    )[0, 0].round().to(labels.dtype)
    return DeformedCopy(volume=warped, labels=warped_labels, source_points=source_points)
