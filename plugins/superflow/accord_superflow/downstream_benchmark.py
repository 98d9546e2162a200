"""``accord benchmark superflow [--quick] [--data DIR]``: SuperFlow pretraining vs random initialisation.

The chain, each stage in its own directory under ``run_dir``:

1. ``pretrain/``: SuperFlow pretraining on the train split;
2. for each initialisation (the pretrained backbone, a random one) and seed:
   ``linear_probe/<init>_seed<s>/``: linear probing on the whole train split (backbone frozen) and
   ``finetune/<init>_seed<s>/``: fine-tuning on the label fraction (SuperFlow's headline: 1 %);
   both keep their best validation weights, as SuperFlow's downstream configs do;
3. each run is scored by ``evaluate`` on the validation split, fine-tuned runs also with
   SuperFlow++-style temporal voting (accord implementation).

Without ``--data`` a synthetic nuScenes (v1.0-mini layout) is generated. SLidR's 1 % keeps every
100th scene, which keeps no scene of a small dataset; the label fraction then defaults to the
smallest of 1/5/10/25/100 % that keeps one (25 % of the quick run's four train scenes).
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Literal

import torch
from pydantic import Field, field_validator

from accord.config import BenchmarkConfig, ExistingPath, TrainerConfig
from accord.report import markdown_table, seed_table
from accord_superflow.data.index import LABEL_FRACTIONS, label_fraction_scenes, load_info_index
from accord_superflow.evaluate import EvaluateConfig, EvaluateDataConfig, evaluate, scores_markdown
from accord_superflow.finetune import FinetuneConfig, FinetuneDataConfig, finetune
from accord_superflow.models.config import BackboneConfig, TeacherConfig
from accord_superflow.pretrain import PretrainDataConfig, SuperFlowModelConfig
from accord_superflow.segmentation import DOWNSTREAM_BN_MOMENTUM, SegmentationModelConfig
from accord_superflow.voting import TemporalVotingConfig

__all__ = ["SPLITS", "SuperFlowBenchmarkConfig", "QUICK", "FULL", "smallest_label_fraction", "benchmark"]

#: (train, validation) official splits of each table version.
SPLITS = {"v1.0-mini": ("mini_train", "mini_val"), "v1.0-trainval": ("train", "val")}
#: SuperFlow's nuScenes numbers (MinkUNet-34, ViT-B teacher; README): (pretrained, random) mIoU.
PAPER = {"linear probing": (47.66, 8.10), "fine-tuning 1%": (48.09, 30.30)}


class SuperFlowBenchmarkConfig(BenchmarkConfig):
    """``accord benchmark superflow [--quick] [--data NUSCENES_ROOT] [key=value ...]``."""

    version: str = Field("v1.0-mini", description="table version of --data (v1.0-mini or v1.0-trainval)")
    label_fraction: int | None = Field(None, description="fine-tuning percent; None: 1, or the smallest of "
                                                         f"{LABEL_FRACTIONS} that keeps a train scene")
    superpixels: Literal["semantic", "slic"] = Field("semantic", description="pretraining superpixels (semantic: "
                                                                             "SuperFlow; slic: no temporal term)")
    teacher_weights: ExistingPath | None = Field(None, description="local DINOv2 (Dinov2Model) directory; None: "
                                                                   "a random ViT (smoke runs)")
    cpu_threads: int = Field(1, ge=1, description="torch intra-op threads without CUDA: spconv's CPU loops run "
                                                  "several times slower with 2 threads on shared cores")

    @field_validator("version")
    @classmethod
    def _known_version(cls, value: str) -> str:
        if value not in SPLITS:
            raise ValueError(f"expected one of {', '.join(SPLITS)} (versions with a labelled validation split)")
        return value


@dataclass(frozen=True)
class _Scale:
    """Sizes of one benchmark variant."""

    synth: dict[str, Any]
    backbone: BackboneConfig
    teacher: TeacherConfig
    embed_dim: int
    voxel_size: tuple[float, float, float]
    image_size: tuple[int, int]
    pretrain_trainer: TrainerConfig
    probe_trainer: TrainerConfig
    finetune_trainer: TrainerConfig


#: Minutes on two CPU cores: sparse scans, a 4-stage MinkUNet of width 8, coarse voxels, a 1-layer ViT.
QUICK = _Scale(
    synth={"scene_names": ("scene-0061", "scene-0553", "scene-0655", "scene-0757", "scene-0103"),
           "keyframes_per_scene": 3, "sweeps_between_keyframes": 2, "image_width": 160, "lidar_azimuth_steps": 180},
    backbone=BackboneConfig(base_channels=8, encoder_channels=[8, 8, 16, 16], encoder_blocks=[1, 1, 1, 1],
                            decoder_channels=[16, 16, 8, 8], decoder_blocks=[1, 1, 1, 1]),
    teacher=TeacherConfig(random_width=16, random_layers=1, random_heads=2),
    embed_dim=16,
    voxel_size=(0.3, 3.0, 0.3),
    image_size=(28, 56),
    pretrain_trainer=TrainerConfig(max_steps=80, batch_size=2, lr=0.01, weight_decay=0.01, warmup_steps=10,
                                   checkpoint_every=80, keep_last=1, log_every=20),
    probe_trainer=TrainerConfig(max_steps=50, batch_size=2, lr=5e-3, weight_decay=0.01, warmup_steps=5,
                                checkpoint_every=10, keep_last=1, log_every=25),
    finetune_trainer=TrainerConfig(max_steps=50, batch_size=2, lr=5e-3, weight_decay=0.01, warmup_steps=5,
                                   checkpoint_every=10, keep_last=1, log_every=25),
)
#: The paper's networks on the whole synthetic mini (or --data): a GPU run.
FULL = _Scale(
    synth={"scene_names": ("scene-0061", "scene-0553", "scene-0655", "scene-0757", "scene-0796", "scene-1077",
                           "scene-1094", "scene-1100", "scene-0103", "scene-0916"),
           "keyframes_per_scene": 10, "lidar_azimuth_steps": 1084},
    backbone=BackboneConfig(),
    teacher=TeacherConfig(random_width=768, random_layers=12, random_heads=12),
    embed_dim=64,
    voxel_size=(0.1, 1.0, 0.1),
    image_size=(224, 448),
    pretrain_trainer=TrainerConfig(max_steps=2000, batch_size=4, lr=0.01, weight_decay=0.01, warmup_steps=400,
                                   min_lr=4e-6, checkpoint_every=500, keep_last=1),
    probe_trainer=TrainerConfig(max_steps=1000, batch_size=4, lr=1e-3, weight_decay=0.01, warmup_steps=200,
                                min_lr=4e-7, checkpoint_every=100, keep_last=1),
    finetune_trainer=TrainerConfig(max_steps=1000, batch_size=4, lr=1e-3, weight_decay=0.01, warmup_steps=200,
                                   min_lr=4e-7, checkpoint_every=100, keep_last=1),
)


def smallest_label_fraction(scene_names: list[str]) -> int:
    """1 if SLidR's 1 % keeps a scene of ``scene_names``, else the smallest fraction that does.

    Raises:
        ValueError: no scene at all.
    """
    for percent in LABEL_FRACTIONS:
        try:
            label_fraction_scenes(scene_names, percent)
        except ValueError:
            continue
        return percent
    raise ValueError("the train split holds no scene")


def _percent_cell(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}"


@contextmanager
def _cpu_threads(threads: int) -> Iterator[None]:
    """Run with ``threads`` torch intra-op threads on a CPU-only machine (restored afterwards)."""
    previous = torch.get_num_threads()
    if not torch.cuda.is_available():
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def benchmark(cfg: SuperFlowBenchmarkConfig) -> dict[str, Any]:
    """Pretrain, then linear probing and fine-tuning from the pretrained and from a random backbone.

    Returns:
        :func:`accord.report.seed_table`'s dict (mean validation mIoU per protocol and init,
        ``results.png``); its ``markdown`` (also ``run_dir/results.md``) adds the paper's numbers,
        per-class IoU and the wall time. ``results.json`` holds every run.
    """
    with _cpu_threads(cfg.cpu_threads):
        return _benchmark(cfg)


def _benchmark(cfg: SuperFlowBenchmarkConfig) -> dict[str, Any]:
    from accord_superflow.data import synth_nuscenes
    from accord_superflow.tasks import PretrainConfig, pretrain  # tasks imports this module

    started = time.perf_counter()
    scale = QUICK if cfg.quick else FULL
    seeds = cfg.run_seeds()
    root = cfg.data or synth_nuscenes(cfg.run_dir / "data", seed=cfg.seed, **scale.synth)
    train_split, validation_split = SPLITS[cfg.version]
    cache_dir = cfg.run_dir / "cache"
    train_scenes = load_info_index(root, cfg.version, train_split, max_sweeps=0, cache_dir=cache_dir).scene_names()
    fraction = cfg.label_fraction or smallest_label_fraction(train_scenes)

    pretrained = pretrain(PretrainConfig(
        plugin=cfg.plugin, task="pretrain", run_dir=cfg.run_dir / "pretrain", seed=cfg.seed,
        data=PretrainDataConfig(root=root, version=cfg.version, split=train_split, superpixels=cfg.superpixels,
                                image_size=scale.image_size, cache_dir=cache_dir),
        model=SuperFlowModelConfig(backbone=scale.backbone,
                                   teacher=scale.teacher.model_copy(update={"weights": cfg.teacher_weights}),
                                   embed_dim=scale.embed_dim, voxel_size=scale.voxel_size),
        loss={"temporal_weight": 0.0} if cfg.superpixels == "slic" else {},
        trainer=scale.pretrain_trainer))

    model = SegmentationModelConfig(
        backbone=scale.backbone.model_copy(update={"bn_momentum": DOWNSTREAM_BN_MOMENTUM}), voxel_size=scale.voxel_size)
    protocols = {"linear probing": ("linear_probe", 100, scale.probe_trainer),
                 f"fine-tuning {fraction}%": ("finetune", fraction, scale.finetune_trainer)}
    voting = TemporalVotingConfig(neighbours=1)
    evaluation_data = EvaluateDataConfig(root=root, version=cfg.version, split=validation_split, cache_dir=cache_dir)
    rows = []
    for protocol, (folder, percent, trainer) in protocols.items():
        for init, checkpoint in (("superflow", pretrained["checkpoint"]), ("random", None)):
            for seed in seeds:
                run_dir = cfg.run_dir / folder / f"{init}_seed{seed}"
                tuned = finetune(FinetuneConfig(
                    plugin=cfg.plugin, run_dir=run_dir, seed=seed, checkpoint=checkpoint, model=model,
                    linear_probe=folder == "linear_probe",
                    data=FinetuneDataConfig(root=root, version=cfg.version, train_split=train_split,
                                            validation_split=validation_split, label_fraction=percent,
                                            cache_dir=cache_dir),
                    trainer=trainer.model_copy(update={"seed": seed})))
                evaluations = {protocol: None}
                if folder == "finetune":
                    evaluations[f"{protocol} + temporal voting"] = voting
                for name, option in evaluations.items():
                    scores = evaluate(EvaluateConfig(
                        plugin=cfg.plugin, run_dir=run_dir / ("evaluate_voting" if option else "evaluate"),
                        data=evaluation_data, checkpoint=tuned["weights"], temporal_voting=option))
                    rows.append({"protocol": name, "init": init, "seed": seed, "miou": scores["miou"] or 0.0,
                                 "iou_per_class": scores["iou_per_class"], "best_step": tuned["best_step"],
                                 "train_keyframes": tuned["train_keyframes"]})

    where = "synthetic nuScenes" if cfg.data is None else f"{cfg.data.name} ({cfg.version})"
    result = seed_table(rows, cfg.run_dir, metric="miou", series="init", group="protocol",
                        title=f"superflow: validation mIoU (%), {where}")
    minutes = (time.perf_counter() - started) / 60
    paper = markdown_table(["protocol", "SuperFlow", "random init"],
                           [[name, *map(_percent_cell, values)] for name, values in PAPER.items()])
    per_class = {f"{row['protocol']}, {row['init']}, seed {row['seed']}": row for row in rows}
    result["markdown"] += (
        f"\n\nLabel fraction {fraction}% ({'SLidR 1 %' if fraction == 1 else '1 % keeps no scene here'}); "
        f"validation split {validation_split}; temporal voting: SuperFlow++-style (accord implementation), "
        f"+-1 keyframe. Wall time {minutes:.1f} min{' (quick)' if cfg.quick else ''}.\n\n"
        f"**Paper, nuScenes val (MinkUNet-34, DINOv2 ViT-B)**\n\n{paper}\n\n"
        f"**Per-class IoU (%)**\n\n{scores_markdown(per_class)}")
    (cfg.run_dir / "results.md").write_text(result["markdown"] + "\n")
    (cfg.run_dir / "results.json").write_text(json.dumps(
        {"rows": rows, "summary": result["summary"], "label_fraction": fraction, "pretrain": pretrained,
         "wall_time_min": minutes}, indent=2, default=str))
    return result
