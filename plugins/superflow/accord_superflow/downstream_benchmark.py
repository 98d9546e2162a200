"""The ``lidarseg`` benchmark, ``accord benchmark superflow [--quick] [--data DIR]``: SuperFlow
pretraining vs random initialisation, on :func:`accord.benchmarking.run_pipeline`.

The chain, each stage in its own directory under ``run_dir``:

1. ``pretrain/seed<s>/``: SuperFlow pretraining on the train split, per seed (the full variant:
   once, ``pretrain/``);
2. for each protocol, initialisation (the pretrained backbone, a random one) and seed
   (``downstream/<protocol>/<init>_seed<s>/``): linear probing on the whole train split (backbone
   frozen) or fine-tuning on the label fraction (SuperFlow's headline: 1 %); both keep their best
   validation weights, as SuperFlow's downstream configs do;
3. each run is scored by ``evaluate`` on the validation split, fine-tuned runs also with
   SuperFlow++-style temporal voting (accord implementation).

Without ``--data`` a synthetic nuScenes (v1.0-mini layout) is generated. SLidR's 1 % keeps every
100th scene, which keeps no scene of a small dataset; the label fraction then defaults to the
smallest of 1/5/10/25/100 % that keeps one (25 % of the quick run's four train scenes).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import Field, field_validator

from accord.benchmarking import BenchmarkResult, DownstreamRun, Group, PipelineSpec, ResultTable, run_pipeline
from accord.config import BenchmarkConfig, ExistingPath, TrainerConfig
from accord.runs import run_task
from accord_superflow.data.index import LABEL_FRACTIONS, label_fraction_scenes, load_info_index
from accord_superflow.evaluate import EvaluateConfig, EvaluateDataConfig
from accord_superflow.finetune import FinetuneConfig, FinetuneDataConfig
from accord_superflow.models.config import BackboneConfig, TeacherConfig
from accord_superflow.pretrain import PretrainDataConfig, SuperFlowModelConfig
from accord_superflow.probe import PointProbeOptions
from accord_superflow.segmentation import DOWNSTREAM_BN_MOMENTUM, SegmentationModelConfig
from accord_superflow.tasks import PretrainConfig
from accord_superflow.voting import TemporalVotingConfig

__all__ = ["SPLITS", "SuperFlowBenchmarkConfig", "QUICK", "FULL", "smallest_label_fraction", "lidarseg"]

#: (train, validation) official splits of each table version.
SPLITS = {"v1.0-mini": ("mini_train", "mini_val"), "v1.0-trainval": ("train", "val")}
#: SuperFlow's nuScenes numbers (MinkUNet-34, ViT-B teacher; README), mIoU (%).
PAPER = ResultTable("Paper, nuScenes val (MinkUNet-34, DINOv2 ViT-B), mIoU (%)",
                    ["protocol", "SuperFlow", "random init"],
                    [["linear probing", "47.66", "8.10"], ["fine-tuning 1%", "48.09", "30.30"]])


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
    pretrain_probe: PointProbeOptions | None


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
                                validate_every=10, keep_last=1, log_every=25),
    finetune_trainer=TrainerConfig(max_steps=50, batch_size=2, lr=5e-3, weight_decay=0.01, warmup_steps=5,
                                   validate_every=10, keep_last=1, log_every=25),
    pretrain_probe=PointProbeOptions(every=20),
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
                                min_lr=4e-7, validate_every=100, checkpoint_every=250, keep_last=1),
    finetune_trainer=TrainerConfig(max_steps=1000, batch_size=4, lr=1e-3, weight_decay=0.01, warmup_steps=200,
                                   min_lr=4e-7, validate_every=100, checkpoint_every=250, keep_last=1),
    pretrain_probe=PointProbeOptions(every=250, keyframes=8),
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


@dataclass(frozen=True)
class _Protocol:
    """How one group of downstream runs trains: linear probing or fine-tuning, label percent, trainer."""

    linear_probe: bool
    percent: int
    trainer: TrainerConfig


def lidarseg(cfg: SuperFlowBenchmarkConfig) -> BenchmarkResult:
    """Pretrain, then linear probing and fine-tuning from the pretrained and from a random backbone.

    Every downstream run keeps its best validation weights and is scored on the validation split;
    fine-tuned runs a second time with temporal voting (a group of its own in the tables).
    The quick run pretrains once per seed (``pretrain/seed<s>/``), so the spread over seeds
    includes the pretraining's; each takes about 20 s of the 70 s on two cores. The full variant
    pretrains once (``pretrain/``, 2,000 GPU steps) and starts every seed from it.
    """
    with _cpu_threads(cfg.cpu_threads):
        return run_pipeline(cfg, _spec(cfg))


def _spec(cfg: SuperFlowBenchmarkConfig) -> PipelineSpec:
    scale = QUICK if cfg.quick else FULL
    train_split, validation_split = SPLITS[cfg.version]
    cache_dir = cfg.run_dir / "cache"

    def protocols(root: Path) -> list[Group]:
        scenes = load_info_index(root, cfg.version, train_split, max_sweeps=0, cache_dir=cache_dir).scene_names()
        fraction = cfg.label_fraction or smallest_label_fraction(scenes)
        return [Group("linear probing", _Protocol(True, 100, scale.probe_trainer)),
                Group(f"fine-tuning {fraction}%", _Protocol(False, fraction, scale.finetune_trainer))]

    def pretrain(root: Path, run_dir: Path, seed: int) -> Path:
        result = run_task(PretrainConfig(
            plugin=cfg.plugin, task="pretrain", run_dir=run_dir, seed=seed,
            data=PretrainDataConfig(root=root, version=cfg.version, split=train_split, superpixels=cfg.superpixels,
                                    image_size=scale.image_size, cache_dir=cache_dir),
            model=SuperFlowModelConfig(backbone=scale.backbone,
                                       teacher=scale.teacher.model_copy(update={"weights": cfg.teacher_weights}),
                                       embed_dim=scale.embed_dim, voxel_size=scale.voxel_size),
            loss={"temporal_weight": 0.0} if cfg.superpixels == "slic" else {},
            trainer=scale.pretrain_trainer, probe=scale.pretrain_probe))
        return Path(result["checkpoint"])

    model = SegmentationModelConfig(
        backbone=scale.backbone.model_copy(update={"bn_momentum": DOWNSTREAM_BN_MOMENTUM}), voxel_size=scale.voxel_size)

    def train_and_score(run: DownstreamRun) -> list[dict[str, Any]]:
        protocol: _Protocol = run.group.options
        tuned = run_task(FinetuneConfig(
            plugin=cfg.plugin, run_dir=run.run_dir, seed=run.seed, checkpoint=run.checkpoint, model=model,
            linear_probe=protocol.linear_probe,
            data=FinetuneDataConfig(root=run.data, version=cfg.version, train_split=train_split,
                                    validation_split=validation_split, label_fraction=protocol.percent,
                                    cache_dir=cache_dir),
            trainer=protocol.trainer))
        evaluations = {run.group.label: None}
        if not protocol.linear_probe:
            evaluations[f"{run.group.label} + temporal voting"] = TemporalVotingConfig(neighbours=1)
        rows = []
        for name, voting in evaluations.items():
            scores = run_task(EvaluateConfig(
                plugin=cfg.plugin, run_dir=run.run_dir / ("evaluate_voting" if voting else "evaluate"), seed=run.seed,
                data=EvaluateDataConfig(root=run.data, version=cfg.version, split=validation_split,
                                        cache_dir=cache_dir),
                checkpoint=tuned["weights"], temporal_voting=voting))
            rows.append({"protocol": name, "miou": scores["miou"] or 0.0, "iou_per_class": scores["iou_per_class"],
                         "label_fraction": protocol.percent, "best_step": tuned["best_step"],
                         "train_keyframes": tuned["train_keyframes"]})
        return rows

    return PipelineSpec(
        title="superflow: SuperFlow pretraining vs random initialisation, LiDAR segmentation",
        dataset="superflow.nuscenes", synth_options={"seed": cfg.seed, **scale.synth},
        pretrain=pretrain, downstream=train_and_score, groups=protocols,
        metric="miou", metric_title=f"validation mIoU (%), {validation_split}", group="protocol",
        inits=("superflow", "random"), pretrained_init="superflow", seed_independent_pretraining=not cfg.quick,
        per_class_key="iou_per_class", per_class_title="Per-class IoU (%), mean ± std over seeds", paper=PAPER,
        notes=("Fine-tuning uses SLidR's 1 % label fraction, or the smallest of 5/10/25/100 % that keeps a train "
               "scene where 1 % keeps none (a small dataset); linear probing trains on every train scene. Temporal "
               "voting: SuperFlow++-style (accord implementation), +-1 keyframe.",),
    )
