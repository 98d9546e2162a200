"""Grounding metrics: Acc@0.5, mIoU and the per-category table, correct under DDP.

The reference computes the IoU of the predicted box (clamped to the canvas) with the GT in
normalised canvas coordinates, and under ``torch.distributed`` sums the per-sample tensors
element-wise across ranks (``dist.all_reduce``), which is wrong with more than one process (spec
§9.2). Here every rank's per-sample results (dataset index, IoU, category, predicted box) are
gathered (:func:`accord.dist.gather_rows`: ranks may hold different counts), duplicates that a
``DistributedSampler`` adds to even out the ranks are dropped by dataset index, and the metrics are
computed once over the whole set: the distributed result equals the single-process one.

IoUs are computed in pixels of the original image, the prediction clipped to the image (a uniform
scale and a shift onto the canvas do not change IoU; clipping to the image instead of the canvas
only matters for a box reaching over the padding, which the reference's square 640 images have none of).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from accord import dist as adist
from accord.boxes import box_iou

from accord_medrpg.data.dataset import canvas_to_original
from accord_medrpg.data.records import CATEGORIES

__all__ = ["ACC_IOU", "GroundingScores", "evaluate_grounding", "gather_samples", "grounding_scores", "sample_ious"]

#: IoU at or above which a prediction counts as correct (Acc@0.5).
ACC_IOU = 0.5


@dataclass
class GroundingScores:
    """Acc@0.5 and mIoU overall and per category.

    Attributes:
        acc: fraction of samples with IoU >= 0.5.
        miou: mean IoU.
        count: samples scored.
        per_category: ``{category: {"count", "acc", "miou"}}`` for the categories present, in
            MS-CXR order.
        samples: per sample ``{"index", "iou", "category", "pred_box"}`` (``pred_box`` xyxy pixels
            of the original image, when known), sorted by dataset index.
    """

    acc: float
    miou: float
    count: int
    per_category: dict[str, dict[str, float]] = field(default_factory=dict)
    samples: list[dict[str, Any]] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        """Flat metrics for logs: ``acc``, ``miou``, ``count`` and ``<category>/acc``, ``<category>/miou``."""
        flat: dict[str, Any] = {"acc": self.acc, "miou": self.miou, "count": self.count}
        for category, row in self.per_category.items():
            flat[f"{category}/acc"] = row["acc"]
            flat[f"{category}/miou"] = row["miou"]
        return flat

    def markdown(self) -> str:
        """The per-category table (percentages), overall last."""
        lines = ["| category | n | Acc@0.5 (%) | mIoU (%) |", "|---|---:|---:|---:|"]
        for category, row in self.per_category.items():
            lines.append(f"| {category} | {int(row['count'])} | {100 * row['acc']:.2f} | {100 * row['miou']:.2f} |")
        lines.append(f"| **all** | {self.count} | {100 * self.acc:.2f} | {100 * self.miou:.2f} |")
        return "\n".join(lines)


def sample_ious(pred_xyxy: torch.Tensor, gt_xyxy: torch.Tensor) -> torch.Tensor:
    """IoU of each prediction with its GT, ``(N, 4)`` x ``(N, 4)`` xyxy -> ``(N,)``."""
    return box_iou(pred_xyxy, gt_xyxy, aligned=True)


def grounding_scores(ious: torch.Tensor, categories: Sequence[str], *,
                     samples: list[dict[str, Any]] | None = None) -> GroundingScores:
    """Acc@0.5, mIoU and the per-category table from per-sample IoUs.

    Args:
        ious: ``(N,)`` IoU of each sample.
        categories: N MS-CXR category names.
        samples: per-sample details to keep on the result.

    Raises:
        ValueError: lengths differ, no samples, or an unknown category.
    """
    ious = torch.as_tensor(ious, dtype=torch.float64).flatten()
    if len(ious) != len(categories):
        raise ValueError(f"grounding_scores: {len(ious)} IoUs but {len(categories)} categories")
    if len(ious) == 0:
        raise ValueError("grounding_scores: no samples to score")
    unknown = sorted(set(categories) - set(CATEGORIES))
    if unknown:
        raise ValueError(f"grounding_scores: unknown categor(ies) {unknown}; expected MS-CXR's {list(CATEGORIES)}")
    correct = (ious >= ACC_IOU).double()
    per_category = {}
    for category in CATEGORIES:
        chosen = torch.tensor([c == category for c in categories])
        if chosen.any():
            per_category[category] = {"count": int(chosen.sum()), "acc": float(correct[chosen].mean()),
                                      "miou": float(ious[chosen].mean())}
    return GroundingScores(float(correct.mean()), float(ious.mean()), len(ious), per_category, samples or [])


def gather_samples(index: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """All ranks' per-sample rows, one per dataset index, sorted by index (identity in one process).

    Ranks may hold different numbers of rows (:func:`accord.dist.gather_rows`). A sample seen by several
    ranks (a ``DistributedSampler`` repeats samples to even out the ranks) keeps its first row.

    Args:
        index: ``(n,)`` long dataset indices of this rank's samples.
        values: ``(n, C)`` float64 per-sample values.

    Returns:
        ``(index (M,), values (M, C))`` over all ranks, unique indices ascending.
    """
    index = index.to(torch.long).flatten()
    values = values.to(torch.float64)
    rows = torch.cat((index[:, None].to(torch.float64), values), dim=1)
    rows, _ = adist.gather_rows(rows)
    order = torch.argsort(rows[:, 0], stable=True)
    rows = rows[order]
    first = torch.ones(len(rows), dtype=torch.bool, device=rows.device)
    first[1:] = rows[1:, 0] != rows[:-1, 0]
    rows = rows[first]
    return rows[:, 0].to(torch.long), rows[:, 1:]


@torch.no_grad()
def evaluate_grounding(model: torch.nn.Module, batches: Iterable[Mapping[str, Any]], *,
                       device: torch.device | str | None = None) -> GroundingScores:
    """Score a grounding model on ``collate_grounding`` batches (every rank its shard under DDP).

    Args:
        model: ``model(image (B, 3, S, S), image_mask (B, S, S), phrases) -> {"pred_box": (B, 4), ...}``
            with normalised canvas ``cx, cy, w, h``.
        batches: e.g. a ``DataLoader`` over a :class:`~accord_medrpg.data.GroundingDataset` with
            ``collate_fn=collate_grounding`` (and a ``DistributedSampler`` under DDP).
        device: where the model runs (default: its parameters' device).

    Returns:
        The same :class:`GroundingScores` on every rank.
    """
    if device is None:
        device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    indices, rows = [], []
    try:
        for batch in batches:
            output = model(batch["image"].to(device), batch["image_mask"].to(device), list(batch["phrase"]))
            pred = canvas_to_original(output["pred_box"].detach().to(device), batch["meta"])
            gt = canvas_to_original(batch["box"].to(device), batch["meta"])
            category = torch.tensor([CATEGORIES.index(c) for c in batch["category"]], dtype=torch.float64,
                                    device=device)
            indices.append(batch["index"].to(device))
            rows.append(torch.cat((sample_ious(pred, gt)[:, None], category[:, None], pred), dim=1))
    finally:
        model.train(was_training)
    # A rank without samples still joins the gather (the others would wait for it).
    index, values = gather_samples(torch.cat(indices) if indices else torch.zeros(0, dtype=torch.long, device=device),
                                   torch.cat(rows) if rows else torch.zeros(0, 6, dtype=torch.float64, device=device))
    if not len(index):
        raise ValueError("evaluate_grounding: the data yielded no samples")
    categories = [CATEGORIES[int(c)] for c in values[:, 1].tolist()]
    samples = [{"index": int(i), "iou": float(v[0]), "category": c, "pred_box": [float(x) for x in v[2:]]}
               for i, v, c in zip(index.tolist(), values.cpu(), categories)]
    return grounding_scores(values[:, 0].cpu(), categories, samples=samples)
