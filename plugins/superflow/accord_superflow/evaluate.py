"""Point-level segmentation scores: the ``evaluate`` task and the fine-tuning validation.

Every keyframe of a split is segmented on its own (no augmentation, no test-time augmentation);
each point takes the logits of its voxel, optionally refined by SuperFlow++-style temporal voting
(:mod:`accord_superflow.voting`). The scores are per-class IoU and mIoU over the 16 classes,
with the ``ignore`` points left out, computed by mmdet3d's ``seg_eval`` (what ``SegMetric``
runs). The predictions are also written in the nuScenes-lidarseg results format
(``<run_dir>/predictions/lidarseg/<split>/<lidar token>_lidarseg.bin``, uint8 classes ``1..16``),
and ``devkit_check`` scores them again with the devkit's own ``LidarSegEval``.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Iterator
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pydantic import Field

from accord.config import ExistingPath, RunConfig
from accord.report import markdown_table
from accord.utils.files import write_text_atomically
from accord_superflow.data.index import KeyframeInfo
from accord_superflow.segmentation import (
    IGNORE_INDEX,
    SEGMENTATION_CLASSES,
    LidarSegDataset,
    LidarSegmenter,
    SegmentationDataConfig,
    SegmentationModelConfig,
    build_segmenter,
)
from accord_superflow.voting import TemporalVotingConfig, lidar_to_lidar, neighbour_keyframes, vote_probabilities

__all__ = [
    "SEGMENTER_FORMAT",
    "EvaluateDataConfig",
    "EvaluateConfig",
    "save_segmenter",
    "load_segmenter",
    "segmenter_record",
    "predict_keyframes",
    "mmdet3d_scores",
    "write_devkit_predictions",
    "devkit_scores",
    "score_segmenter",
    "scores_markdown",
    "evaluate",
]

log = logging.getLogger(__name__)

SEGMENTER_FORMAT = "accord-superflow-segmenter"
#: Agreement required between mmdet3d's and the devkit's scores (both are float64 ratios of counts).
_AGREEMENT_TOLERANCE = 1e-6


class EvaluateDataConfig(SegmentationDataConfig):
    """The labelled split to score."""

    split: str = Field("val", description="official split (v1.0-mini: mini_val)")


class EvaluateConfig(RunConfig):
    """``task: evaluate``: per-class IoU and mIoU of fine-tuned weights on a split's points."""

    task: str = "evaluate"
    data: EvaluateDataConfig
    checkpoint: ExistingPath = Field(description="segmenter weights written by finetune (<run_dir>/best.pt)")
    temporal_voting: TemporalVotingConfig | None = Field(
        None, description="SuperFlow++-style temporal voting (accord implementation); None: each scan alone")
    devkit_check: bool = Field(False, description="also score the written predictions with the devkit's "
                                                  "LidarSegEval (needs every scene of the split in the dataset)")


def save_segmenter(path: Path, segmenter: LidarSegmenter, model: SegmentationModelConfig,
                   record: dict[str, Any]) -> Path:
    """Write segmenter weights with the config that rebuilds them and ``record`` (atomically)."""
    from accord.training.checkpoint import write_atomically

    payload = {"format": SEGMENTER_FORMAT, "model_config": model.model_dump(mode="json"),
               "state_dict": segmenter.state_dict(), "record": record}
    path.parent.mkdir(parents=True, exist_ok=True)
    return write_atomically(path, lambda handle: torch.save(payload, handle))


def _read_segmenter_file(path: str | Path) -> dict[str, Any]:
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for corrupt or foreign files
        raise ValueError(f"{path}: not a readable weights file ({type(exc).__name__}: {exc})") from None
    if not isinstance(payload, dict) or payload.get("format") != SEGMENTER_FORMAT:
        raise ValueError(f"{path}: not segmenter weights written by the superflow finetune task "
                         f"(expected format {SEGMENTER_FORMAT!r})")
    return payload


def segmenter_record(path: str | Path) -> dict[str, Any]:
    """The record stored with :func:`save_segmenter` weights (step, validation mIoU, provenance).

    Raises:
        ValueError: not such a file.
    """
    return _read_segmenter_file(path)["record"]


def load_segmenter(path: str | Path) -> tuple[LidarSegmenter, dict[str, Any]]:
    """The segmenter in a :func:`save_segmenter` file (eval mode, CPU) and its record.

    Raises:
        ValueError: not such a file.
    """
    payload = _read_segmenter_file(path)
    segmenter = build_segmenter(SegmentationModelConfig(**payload["model_config"]))
    segmenter.load_state_dict(payload["state_dict"])
    return segmenter.eval(), payload["record"]


def predict_keyframes(segmenter: LidarSegmenter, dataset: LidarSegDataset, voting: TemporalVotingConfig | None = None
                      ) -> Iterator[tuple[KeyframeInfo, np.ndarray, np.ndarray]]:
    """Segment every keyframe of ``dataset`` (in eval mode; the mode is restored afterwards).

    Yields:
        ``(keyframe, predictions (N,) int64 in 0..15, labels (N,) int64)`` per keyframe.
    """
    device = next(segmenter.parameters()).device

    # Each scan is a neighbour of up to 2n others: keep the probabilities of the current window.
    @lru_cache(maxsize=2 * (voting.neighbours if voting else 0) + 2)
    def probabilities(position: int) -> tuple[torch.Tensor, torch.Tensor, np.ndarray]:
        points, labels = dataset.scan(dataset.index.keyframes[position])
        points = torch.from_numpy(points).to(device)
        logits, voxels = segmenter(points, torch.zeros(len(points), dtype=torch.long, device=device), 1)
        return points[:, :3].double().cpu(), voxels.to_points(logits).softmax(dim=1).double().cpu(), labels

    was_training = segmenter.training
    segmenter.eval()
    try:
        with torch.no_grad():
            for keyframe in dataset.index.keyframes:
                xyz, scores, labels = probabilities(keyframe.index)
                if voting is not None:
                    warped = []
                    for neighbour in neighbour_keyframes(dataset.index, keyframe, voting.neighbours):
                        neighbour_xyz, neighbour_scores, _ = probabilities(neighbour.index)
                        moved = lidar_to_lidar(neighbour.lidar, keyframe.lidar).apply(neighbour_xyz.numpy())
                        warped.append((torch.from_numpy(moved), neighbour_scores))
                    scores = vote_probabilities(xyz, scores, warped, voting.voxel_size, voting.neighbour_weight)
                yield keyframe, scores.argmax(dim=1).numpy(), labels
    finally:
        segmenter.train(was_training)


def _finite_or_none(value: float) -> float | None:
    """An IoU for JSON: NaN (class neither labelled nor predicted) becomes null."""
    return None if math.isnan(value) else float(value)


def mmdet3d_scores(labels: list[np.ndarray], predictions: list[np.ndarray]) -> dict[str, Any]:
    """Per-class IoU, mIoU and accuracy by mmdet3d's ``seg_eval`` (points labelled ``IGNORE_INDEX`` left out).

    Args:
        labels: per scan, ``(N,)`` labels in ``0..15`` or ``IGNORE_INDEX``.
        predictions: per scan, ``(N,)`` predicted classes in ``0..15``.

    Returns:
        ``{"miou", "iou_per_class": {class: IoU or None}, "accuracy"}`` as fractions.
    """
    from mmdet3d.evaluation.functional import seg_eval

    label_to_class = dict(enumerate(SEGMENTATION_CLASSES))
    with np.errstate(divide="ignore", invalid="ignore"):  # classes absent from labels and predictions
        scores = seg_eval(labels, predictions, label_to_class, IGNORE_INDEX, logger="silent")
    return {"miou": _finite_or_none(scores["miou"]),
            "iou_per_class": {name: _finite_or_none(scores[name]) for name in SEGMENTATION_CLASSES},
            "accuracy": _finite_or_none(scores["acc"])}


def write_devkit_predictions(results_folder: Path, split: str, keyframe: KeyframeInfo,
                             predictions: np.ndarray) -> Path:
    """Write ``(N,)`` classes ``0..15`` as the devkit's ``lidarseg/<split>/<token>_lidarseg.bin`` (uint8 ``1..16``)."""
    folder = results_folder / "lidarseg" / split
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{keyframe.lidar.sample_data_token}_lidarseg.bin"
    # The devkit's coarse classes are ours shifted by one: 0 is its ignore class.
    (predictions + 1).astype(np.uint8).tofile(path)
    return path


def devkit_scores(root: Path, version: str, results_folder: Path, split: str) -> dict[str, Any]:
    """Score written predictions with nuscenes-devkit's ``LidarSegEval`` (the official evaluation).

    Raises:
        ValueError: a scene of the split is missing from the dataset (the devkit scores whole splits).
    """
    from nuscenes import NuScenes
    from nuscenes.eval.lidarseg.evaluate import LidarSegEval
    from nuscenes.utils.splits import create_splits_scenes

    nusc = NuScenes(version=version, dataroot=str(root), verbose=False)
    missing = sorted(set(create_splits_scenes()[split]) - {scene["name"] for scene in nusc.scene})
    if missing:
        raise ValueError(f"devkit_check: LidarSegEval scores every scene of split {split!r}, but {root} lacks "
                         f"{len(missing)} of them ({', '.join(missing[:3])}...)")
    scores = LidarSegEval(nusc, str(results_folder), split).evaluate()
    return {"miou": _finite_or_none(scores["miou"]),
            "iou_per_class": {name: _finite_or_none(scores["iou_per_class"][name]) for name in SEGMENTATION_CLASSES}}


def score_segmenter(segmenter: LidarSegmenter, dataset: LidarSegDataset, voting: TemporalVotingConfig | None = None,
                    results_folder: Path | None = None) -> dict[str, Any]:
    """:func:`mmdet3d_scores` of ``segmenter`` on ``dataset``; predictions written to ``results_folder`` if given.

    Returns:
        The scores plus ``keyframes`` and ``points`` (labelled ones counted).
    """
    labels, predictions = [], []
    for keyframe, predicted, labelled in predict_keyframes(segmenter, dataset, voting):
        if results_folder is not None:
            write_devkit_predictions(results_folder, dataset.index.split, keyframe, predicted)
        labels.append(labelled)
        predictions.append(predicted)
    scores = mmdet3d_scores(labels, predictions)
    labelled_points = sum(int((scan_labels != IGNORE_INDEX).sum()) for scan_labels in labels)
    return {**scores, "keyframes": len(labels), "points": labelled_points}


def _percent(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.2f}"


def scores_markdown(rows: dict[str, dict[str, Any]]) -> str:
    """Markdown table: one line per named score dict, mIoU then per-class IoU in percent."""
    header = ["", "mIoU", *SEGMENTATION_CLASSES]
    lines = [[name, _percent(scores["miou"]), *(_percent(scores["iou_per_class"][c]) for c in SEGMENTATION_CLASSES)]
             for name, scores in rows.items()]
    return markdown_table(header, lines)


def evaluate(cfg: EvaluateConfig) -> dict[str, Any]:
    """Score fine-tuned weights on a split; write ``results.json``, ``results.md`` and the devkit predictions.

    Returns:
        ``miou``, ``iou_per_class``, ``accuracy``, ``keyframes``, ``points``, ``split``,
        ``checkpoint``, ``temporal_voting``, ``predictions`` (the devkit results folder) and, with
        ``devkit_check``, ``devkit`` (LidarSegEval's mIoU and per-class IoU).

    Raises:
        ValueError: unreadable weights, a bad split, scans without labels, a split the devkit
            cannot score, or devkit scores that disagree with mmdet3d's.
    """
    segmenter, record = load_segmenter(cfg.checkpoint)
    segmenter.to(torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    dataset = LidarSegDataset(cfg.data.root, cfg.data.index(cfg.data.split))
    results_folder = cfg.run_dir / "predictions"
    scores = score_segmenter(segmenter, dataset, cfg.temporal_voting, results_folder)
    result = {**scores, "split": cfg.data.split, "checkpoint": str(cfg.checkpoint),
              "trained": {key: record.get(key) for key in ("initialisation", "linear_probe", "label_fraction", "step")},
              "temporal_voting": cfg.temporal_voting.model_dump() if cfg.temporal_voting else None,
              "predictions": str(results_folder)}
    rows = {"mmdet3d seg_eval": scores}
    if cfg.devkit_check:
        result["devkit"] = devkit_scores(cfg.data.root, cfg.data.version, results_folder, cfg.data.split)
        rows["devkit LidarSegEval"] = result["devkit"]
        _require_agreement(scores, result["devkit"])
    cfg.run_dir.mkdir(parents=True, exist_ok=True)
    write_text_atomically(cfg.run_dir / "results.json", json.dumps(result, indent=2))
    voting = "" if cfg.temporal_voting is None else (
        f", SuperFlow++-style temporal voting (accord implementation) over +-{cfg.temporal_voting.neighbours} "
        "keyframes")
    title = f"**Point IoU (%) on {cfg.data.version}/{cfg.data.split}, {scores['keyframes']} keyframes{voting}**"
    write_text_atomically(cfg.run_dir / "results.md", f"{title}\n\n{scores_markdown(rows)}\n")
    log.info("mIoU %.2f %% on %d keyframes of %s", 100 * (scores["miou"] or 0.0), scores["keyframes"], cfg.data.split)
    return result


def _require_agreement(ours: dict[str, Any], devkit: dict[str, Any]) -> None:
    """Raise when mmdet3d's and the devkit's per-class IoU differ (a label-mapping or format bug)."""
    for name in ("miou", *SEGMENTATION_CLASSES):
        a = ours["miou"] if name == "miou" else ours["iou_per_class"][name]
        b = devkit["miou"] if name == "miou" else devkit["iou_per_class"][name]
        if (a is None) != (b is None) or (a is not None and abs(a - b) > _AGREEMENT_TOLERANCE):
            raise ValueError(f"devkit_check: {name} is {a} by mmdet3d's seg_eval but {b} by the devkit's "
                             "LidarSegEval on the same predictions")
