"""The pseudo-label task (MutDet step 1) end to end, resumable over a large image set.

``accord run pseudolabel.yaml`` with ``plugin: mutdet, task: pseudolabel`` runs three phases, all
under ``run_dir``:

1. ``features/<id>.npz``: per image, the proposals (``boxes``, ``score``) and their raw backbone
   features (:mod:`~accord_mutdet.pseudo.proposals`, :mod:`~accord_mutdet.pseudo.embed`);
2. ``pseudo_classes.npz``: PCA + spherical k-means fitted on (up to ``fit_samples`` of) all
   features (:mod:`~accord_mutdet.pseudo.cluster`);
3. ``labels/<id>.npz``: the pseudo-labels :class:`accord_mutdet.data.DetectionDataset` reads
   (``boxes``, ``embeddings``, ``pseudo_class``, ``score``; :mod:`~accord_mutdet.pseudo.store`).

Every file is written atomically, so an interrupted run resumes where it stopped: finished images
are skipped in phases 1 and 3, a fitted model is reused while its settings match, and label files
made with another model (its ``model_id``) are redone. Progress goes to stdout.
"""

from __future__ import annotations

import hashlib
import json
import sys
import time
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from pydantic import Field

from accord.config import RunConfig
from accord.utils.files import write_text_atomically
from accord_mutdet.data.records import ImageRecord, image_size, read_rgb
from accord_mutdet.pseudo.cluster import PseudoClassModel, fit_pseudo_classes
from accord_mutdet.pseudo.embed import build_backbone, embed_boxes
from accord_mutdet.pseudo.proposals import (
    CocoRleSource,
    DotaBoxSource,
    FelzenszwalbSource,
    PngMaskSource,
    ProposalSource,
    Proposals,
)
from accord_mutdet.pseudo.store import write_npz

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")


class PseudoLabelConfig(RunConfig):
    """The ``pseudolabel`` task: proposals, object embeddings and pseudo-classes for a set of images."""

    plugin: str = "mutdet"
    task: str = "pseudolabel"
    data: Path = Field(..., description="a DIOR-R root, a DOTA root, or a folder of images (layout: folder)")
    layout: Literal["auto", "dior_r", "dota", "folder"] = Field(
        "auto", description="how to find the images; auto: DIOR-R / DOTA from the structure, else a plain folder")
    split: str = Field("train", description="the DIOR-R / DOTA split (ignored for a folder)")
    proposals: Literal["felzenszwalb", "png_masks", "coco_rle", "dota_boxes"] = Field(
        "felzenszwalb", description="proposal source: built-in segmentation, or masks / boxes from proposal_dir")
    proposal_dir: Path | None = Field(None, description="folder of <id>.png / <id>.json / <id>.txt for file sources")
    felzenszwalb: dict[str, float] = Field({}, description="FelzenszwalbSource options (scale, sigma, min_size, "
                                                           "min_area, max_area_fraction)")
    min_box_side: float = Field(2.0, ge=0, description="proposals with a shorter side (pixels) are dropped")
    max_proposals: int = Field(1000, ge=1, description="most proposals per image, by score (reference: 1000)")
    backbone: Literal["resnet18", "resnet34", "resnet50"] = Field("resnet50", description="frozen embedding network")
    backbone_weights: Path | None = Field(None, description="torchvision-layout weights file; None: random (warned)")
    crop_size: int = Field(224, ge=8, description="rotated crop side (reference: 224)")
    enlarge: float = Field(1.5, gt=0, description="box enlargement for context (reference: 1.5)")
    embed_dim: int = Field(256, ge=1, description="PCA dimensions (reference: 256)")
    clusters: int = Field(256, ge=1, description="pseudo-classes (reference: 256)")
    kmeans_iterations: int = Field(50, ge=1, description="most spherical k-means rounds")
    fit_samples: int = Field(100_000, ge=1, description="most embeddings the PCA and k-means are fitted on")
    batch_size: int = Field(64, ge=1, description="crops per backbone call")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="where the backbone runs")


def folder_records(folder: Path) -> list[ImageRecord]:
    """Every image of a folder as a record without annotations."""
    images = sorted(p for p in Path(folder).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not images:
        raise FileNotFoundError(f"{folder}: no images ({', '.join(IMAGE_SUFFIXES)})")
    return [ImageRecord(p, *image_size(p), id=p.stem) for p in images]


def task_records(cfg: PseudoLabelConfig) -> list[ImageRecord]:
    """The images the config names (annotations, if any, are not used)."""
    from accord_mutdet.data.check import is_dior_root, is_dota_root
    from accord_mutdet.data.dior import load_dior_r
    from accord_mutdet.data.dota import load_dota

    layout = cfg.layout
    if layout == "auto":
        layout = "dior_r" if is_dior_root(cfg.data) else "dota" if is_dota_root(cfg.data) else "folder"
    if layout == "dior_r":
        return load_dior_r(cfg.data, cfg.split)
    if layout == "dota":
        return load_dota(cfg.data, cfg.split)
    return folder_records(cfg.data)


def proposal_source(cfg: PseudoLabelConfig) -> ProposalSource:
    if cfg.proposals == "felzenszwalb":
        return FelzenszwalbSource(**cfg.felzenszwalb)
    if cfg.proposal_dir is None:
        raise ValueError(f"proposals: {cfg.proposals!r} reads files; set proposal_dir to their folder")
    return {"png_masks": PngMaskSource, "coco_rle": CocoRleSource, "dota_boxes": DotaBoxSource}[cfg.proposals](
        cfg.proposal_dir)


def _select(proposals: Proposals, min_side: float, limit: int) -> Proposals:
    keep = np.flatnonzero(proposals.boxes[:, 3] >= min_side) if len(proposals.boxes) else np.zeros(0, int)
    keep = keep[np.argsort(-proposals.scores[keep], kind="stable")][:limit]
    return Proposals(proposals.boxes[keep], proposals.scores[keep])


def _progress(phase: str, done: int, total: int, started: float) -> None:
    if done == total or done % max(1, total // 20) == 0:
        rate = done / max(time.perf_counter() - started, 1e-9)
        print(f"pseudolabel {phase}: {done}/{total} images ({rate:.2f}/s)", file=sys.stdout, flush=True)


def _model_id(cfg: PseudoLabelConfig, feature_files: list[Path]) -> str:
    settings = {key: str(getattr(cfg, key)) for key in ("embed_dim", "clusters", "kmeans_iterations", "fit_samples",
                                                       "seed", "backbone", "backbone_weights", "crop_size", "enlarge",
                                                       "proposals", "felzenszwalb")}
    settings["images"] = sorted(p.stem for p in feature_files)
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]


def _sample_features(feature_files: list[Path], limit: int, seed: int) -> np.ndarray:
    """Up to ``limit`` feature rows drawn uniformly over all files, reading one file at a time.

    Only the chosen rows are kept, so the memory is ``limit`` rows however large the image set.
    """
    counts = []
    for path in feature_files:
        with np.load(path) as stored:
            counts.append(len(stored["boxes"]))
    total = int(sum(counts))
    chosen = np.arange(total) if total <= limit else np.sort(np.random.default_rng(seed).choice(total, limit, replace=False))
    rows, start = [], 0
    for path, count in zip(feature_files, counts):
        wanted = chosen[(chosen >= start) & (chosen < start + count)] - start
        if len(wanted):
            with np.load(path) as stored:
                rows.append(stored["features"][wanted].astype(np.float32))
        start += count
    return np.concatenate(rows) if rows else np.zeros((0, 1), np.float32)


def _fit(cfg: PseudoLabelConfig, feature_files: list[Path], model_path: Path) -> tuple[PseudoClassModel, str]:
    model_id = _model_id(cfg, feature_files)
    if model_path.is_file():
        with np.load(model_path) as stored:
            if str(stored["model_id"]) == model_id:
                return PseudoClassModel(stored["mean"], stored["components"], stored["centroids"]), model_id
    pooled = _sample_features(feature_files, cfg.fit_samples, cfg.seed)
    if len(pooled) < cfg.clusters:
        raise ValueError(f"{len(pooled)} proposals over {len(feature_files)} images cannot make clusters={cfg.clusters} "
                         "pseudo-classes; lower clusters or add images")
    print(f"pseudolabel fit: PCA {pooled.shape[1]} -> {cfg.embed_dim}, spherical k-means k={cfg.clusters} "
          f"on {len(pooled)} embeddings", flush=True)
    model = fit_pseudo_classes(pooled, dim=cfg.embed_dim, clusters=cfg.clusters, iterations=cfg.kmeans_iterations,
                               seed=cfg.seed)
    write_npz(model_path, {"mean": model.mean, "components": model.components, "centroids": model.centroids,
                           "model_id": np.array(model_id)})
    return model, model_id


def run_pseudolabel(cfg: PseudoLabelConfig) -> dict[str, Any]:
    """Run (or resume) the three phases; returns counts and the output folders."""
    records = task_records(cfg)
    out = Path(cfg.run_dir)
    feature_dir, label_dir = out / "features", out / "labels"
    source = proposal_source(cfg)
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("device: 'cuda' was asked for but torch sees no GPU; use device: auto or cpu")
    device = torch.device("cuda" if cfg.device == "auto" and torch.cuda.is_available() else
                          "cpu" if cfg.device == "auto" else cfg.device)
    backbone = None
    started, computed = time.perf_counter(), 0
    for done, record in enumerate(records, start=1):
        path = feature_dir / f"{record.id}.npz"
        if not path.is_file():
            if backbone is None:  # built only when there is work left
                backbone = build_backbone(cfg.backbone, cfg.backbone_weights).to(device)
            image = read_rgb(record.image)
            proposals = _select(source(record, image), cfg.min_box_side, cfg.max_proposals)
            features = embed_boxes(backbone, image, proposals.boxes, crop_size=cfg.crop_size, enlarge=cfg.enlarge,
                                   batch_size=cfg.batch_size, device=device)
            write_npz(path, {"boxes": proposals.boxes, "score": proposals.scores, "features": features})
            computed += 1
        _progress("features", done, len(records), started)
    feature_files = [feature_dir / f"{r.id}.npz" for r in records]
    model, model_id = _fit(cfg, feature_files, out / "pseudo_classes.npz")
    started, labelled, boxes_total = time.perf_counter(), 0, 0
    used = np.zeros(cfg.clusters, np.int64)
    for done, (record, path) in enumerate(zip(records, feature_files), start=1):
        target = label_dir / f"{record.id}.npz"
        with np.load(path) as stored:
            boxes, scores, features = stored["boxes"], stored["score"], stored["features"]
        stale = True
        if target.is_file():
            with np.load(target) as existing:
                stale = "model_id" not in existing or str(existing["model_id"]) != model_id
        embeddings = model.embed(features) if len(features) else np.zeros((0, cfg.embed_dim), np.float32)
        classes = model.assign(embeddings)
        if stale:
            write_npz(target, {"boxes": boxes, "embeddings": embeddings, "pseudo_class": classes, "score": scores,
                               "model_id": np.array(model_id)})
            labelled += 1
        used += np.bincount(classes, minlength=cfg.clusters)
        boxes_total += len(boxes)
        _progress("labels", done, len(records), started)
    summary = {"images": len(records), "features_computed": computed, "labels_written": labelled,
               "boxes": int(boxes_total), "clusters_used": int((used > 0).sum()), "labels_dir": str(label_dir),
               "model_id": model_id}
    write_text_atomically(out / "pseudolabel.json", json.dumps(summary, indent=2))
    return summary
