"""Benchmarks of the medssl plugin (registered in :mod:`accord_medssl.plugin`).

* ``segmentation`` (pipeline, ``accord benchmark medssl``): Alice pretraining vs random
  initialisation over label fractions and seeds, by two protocols: SwinUNETR fine-tuning, and a
  frozen-feature probe (a linear voxel classifier on the frozen network) (:func:`segmentation`);
  with ``--method gemini`` GEMINI's comparisons instead
  (:mod:`accord_medssl.gemini.segmentation_benchmark`), also registered as ``gemini_segmentation``;
* ``pretraining_speed``, ``loader_throughput``, ``anatomy_matching`` (``accord benchmark medssl
  --speed NAME``): pretraining steps per second with peak memory, data-loader throughput (uncached
  vs MONAI's disk cache), and how well anatomy embeddings match anatomy.
"""

from __future__ import annotations

import functools
import math
import resource
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from pydantic import Field, model_validator
from torch.utils.data import DataLoader, Dataset

from accord.benchmarking import BenchmarkResult, DownstreamRun, Group, PipelineSpec, ResultTable, preset, run_pipeline
from accord.config import BenchmarkConfig, ParameterFreeze, TrainerConfig
from accord.runs import run_task
from accord.utils.timing import Timing, machine_state, ratio, time_alternating, torch_threads
from accord_medssl.alice import AliceOptions
from accord_medssl.anatomy import (
    AnatomyEmbedding,
    AnatomyEmbeddingModel,
    AnatomyPretrainingOptions,
    AnatomySearchIndex,
    crop_with_zero_padding,
    embedding_grid_shape,
)
from accord_medssl.anatomy.evaluation import (
    ACCEPTANCE_CRITERIA,
    MatchOutcomes,
    match_labelled_points,
    random_deformed_copy,
    sample_labelled_points,
)
from accord_medssl.data.layout import decathlon_items
from accord_medssl.data.phantom import DEFAULT_SHAPE, synth
from accord_medssl.data.pipeline import build_dataset
from accord_medssl.finetune import EvaluateConfig, FinetuneConfig, SplitOptions
from accord_medssl.gemini.segmentation_benchmark import GeminiSegmentationOptions, gemini_segmentation
from accord_medssl.models import SwinUNETRBackboneOptions
from accord_medssl.probe import FrozenProbeConfig, FrozenProbeOptions, VoxelProbeOptions, frozen_probe
from accord_medssl.tasks import ALICE_PROTOTYPES, PretrainConfig
from accord_medssl.views import AnatomyViewOptions, AnatomyViewPairs, MiningOptions

__all__ = [
    "FULL",
    "QUICK",
    "AnatomyMatchingConfig",
    "GeminiSegmentationConfig",
    "LoaderThroughputConfig",
    "MedsslBenchmarkConfig",
    "MiningSpeedConfig",
    "PretrainingSpeedConfig",
    "anatomy_matching",
    "loader_throughput",
    "mining_speed",
    "pretraining_speed",
    "run_anatomy_matching",
    "run_loader_throughput",
    "run_mining_speed",
    "run_pretraining_speed",
    "scoring_acceptance",
    "segmentation",
    "shifted_field_pair",
]


# --- benchmark ---------------------------------------------------------------------------------


#: MedsslBenchmarkConfig fields that only method alice reads.
ALICE_ONLY = ("protocols", "finetune_label_fractions", "anatomy_steps", "alice_steps", "finetune_steps")


class MedsslBenchmarkConfig(BenchmarkConfig):
    """``accord benchmark medssl segmentation [--quick] [--data MSD_DIR] [--method alice|gemini]``: :func:`segmentation`."""

    method: Literal["alice", "gemini"] = Field(
        "alice", description="alice: Alice pretraining vs random initialisation; gemini: GEMINI-Semi vs supervised only "
        "and GEMINI-MIP vs random initialisation (accord_medssl.gemini.segmentation_benchmark)")
    label_fractions: list[float] = Field([0.1, 1.0], min_length=1, description="shares of the train cases with labels")
    gemini: GeminiSegmentationOptions = Field(GeminiSegmentationOptions(), description="settings of method gemini")
    protocols: list[Literal["finetune", "frozen_probe"]] = Field(
        ["finetune", "frozen_probe"], min_length=1,
        description="finetune: the whole SwinUNETR trained; frozen_probe: a linear voxel classifier on the frozen one",
    )
    finetune_label_fractions: list[float] | None = Field(
        None, min_length=1, description="label fractions of the finetune protocol (None: label_fractions; quick: the "
        "largest of label_fractions, as one fine-tuning run costs more than all the frozen probes together)",
    )
    anatomy_steps: int | None = Field(None, ge=1, description="anatomy-embedding steps (None: the variant's)")
    alice_steps: int | None = Field(None, ge=1, description="Alice pretraining steps (None: the variant's)")
    finetune_steps: int | None = Field(
        None, ge=1, description="steps per fine-tuning run, validated every quarter (None: the variant's)"
    )

    @model_validator(mode="after")
    def _method_settings(self) -> MedsslBenchmarkConfig:
        if self.method == "gemini":
            stray = [name for name in ALICE_ONLY if name in self.model_fields_set]
            if stray:
                raise ValueError(f"{', '.join(stray)}: settings of method alice; method gemini's are under gemini.")
            if self.data is not None and self.gemini.datasets is not None:
                raise ValueError("gemini.datasets: the generated sets; with --data the benchmark runs on that dataset")
        elif "gemini" in self.model_fields_set:
            raise ValueError("gemini: settings of method gemini, but method is alice")
        return self

    def trainers(self, scale: _Scale) -> tuple[TrainerConfig, TrainerConfig, TrainerConfig]:
        """The anatomy, Alice and fine-tuning trainers of ``scale`` with the step overrides applied."""

        def with_steps(trainer: TrainerConfig, steps: int | None, validations: int | None = None) -> TrainerConfig:
            if steps is None:
                return trainer
            every = max(steps // (validations or 1), 1)
            cadence = "validate_every" if validations else "checkpoint_every"
            return trainer.model_copy(update={"max_steps": steps, cadence: every,
                                              "log_every": min(trainer.log_every, every),
                                              "warmup_steps": min(trainer.warmup_steps, steps - 1)})

        return (with_steps(scale.anatomy_trainer, self.anatomy_steps), with_steps(scale.alice_trainer, self.alice_steps),
                with_steps(scale.finetune_trainer, self.finetune_steps, validations=4))


@dataclass(frozen=True)
class _Scale:
    """Sizes of one benchmark variant."""

    phantoms: dict[str, Any]
    crop_size: tuple[int, int, int]
    backbone: SwinUNETRBackboneOptions
    alice: dict[str, Any]
    anatomy_embedding: AnatomyPretrainingOptions
    anatomy_trainer: TrainerConfig
    alice_trainer: TrainerConfig
    finetune_trainer: TrainerConfig
    #: FinetuneConfig fields besides the network, data, split, crop and trainer.
    finetune: dict[str, Any]
    frozen_probe: FrozenProbeOptions
    split: SplitOptions
    anatomy_probe: VoxelProbeOptions | None
    alice_probe: VoxelProbeOptions | None


#: Minutes on two CPU cores: 32^3 crops of 48 x 48 x 32 phantoms, the smallest SwinUNETR.
QUICK = _Scale(
    phantoms={"num_train": 10, "num_test": 0, "shape": (48, 48, 32)},
    crop_size=(32, 32, 32),
    backbone=SwinUNETRBackboneOptions(feature_size=12, depths=(1, 1, 1, 1), num_heads=(1, 2, 4, 8), window_size=4, norm_name="batch"),
    alice={"out_dim": 64, "head_hidden_dim": 128, "head_bottleneck_dim": 32, "casa_hidden_dim": 128, "casa_num_heads": 4,
           "teacher_temperature_warmup_steps": 10},
    anatomy_embedding=AnatomyPretrainingOptions(model={"widths": (8, 16, 32), "fpn_dim": 16, "global_dim": 32, "local_dim": 32}),
    anatomy_trainer=TrainerConfig(max_steps=200, batch_size=2, lr=1e-3, warmup_steps=5, checkpoint_every=40, log_every=10),
    # Prototypes frozen for one epoch of the 10 phantoms (5 steps), not the full-size 31 of 20 steps.
    alice_trainer=TrainerConfig(max_steps=20, batch_size=2, lr=5e-4, warmup_steps=5, grad_clip_norm=3.0, ema_momentum=0.99,
                                freeze_parameters=ParameterFreeze(pattern=ALICE_PROTOTYPES, steps=5),
                                checkpoint_every=20, log_every=10),
    # What kept the small organs out of reach: the background is 94 % of the phantoms' voxels, so an
    # unweighted loss learns the liver (3 %) and rarely spleen or kidneys (0.3-0.5 %) even in 300
    # steps; with class weights at lr 3e-3 they appear only after 150-300 steps, at 1e-2 by step
    # 110, the left kidney (the last) in some seeds only after 120.
    finetune_trainer=TrainerConfig(max_steps=150, batch_size=1, lr=1e-2, warmup_steps=5, validate_every=30, keep_last=1,
                                   log_every=30),
    finetune={"class_weights": "inverse_sqrt_frequency"},
    frozen_probe=FrozenProbeOptions(),
    split=SplitOptions(validation_fraction=0.2, test_fraction=0.3),
    anatomy_probe=VoxelProbeOptions(every=50),
    alice_probe=VoxelProbeOptions(every=10),
)
#: The paper's crop size and MONAI's default SwinUNETR on full-size phantoms: a GPU run.
FULL = _Scale(
    phantoms={"num_train": 20, "num_test": 0},
    crop_size=(64, 64, 64),
    backbone=SwinUNETRBackboneOptions(),
    alice={},
    anatomy_embedding=AnatomyPretrainingOptions(),
    anatomy_trainer=TrainerConfig(max_steps=2000, batch_size=4, lr=1e-3, warmup_steps=50, checkpoint_every=500),
    alice_trainer=TrainerConfig(max_steps=2000, batch_size=2, lr=1e-4, min_lr=1e-6, weight_decay=0.04, warmup_steps=50,
                                grad_clip_norm=3.0, checkpoint_every=500),
    finetune_trainer=TrainerConfig(max_steps=1000, batch_size=1, lr=1e-4, weight_decay=1e-5, warmup_steps=20,
                                   validate_every=100, checkpoint_every=250, keep_last=1),
    finetune={},
    frozen_probe=FrozenProbeOptions(),
    split=SplitOptions(),
    anatomy_probe=VoxelProbeOptions(every=250),
    alice_probe=VoxelProbeOptions(every=250),
)


#: The Alice abstract (arXiv 2302.05615 v1); the per-organ tables are not reproduced.
PAPER = ResultTable(
    "Paper (Alice, arXiv 2302.05615 v1): Dice over the previous best self-supervised method "
    "(nnFormer backbone, FLARE22 pretraining on 2,000 unlabelled CTs)",
    ["dataset", "Dice gain (%)"],
    [["FLARE 2022", "+2.11"], ["BTCV", "+1.77"]],
)


#: How the tables name the protocols.
PROTOCOL_TITLES = {"finetune": "fine-tune", "frozen_probe": "frozen probe"}


def segmentation(cfg: MedsslBenchmarkConfig) -> BenchmarkResult:
    """Alice pretraining vs random initialisation, by two protocols, on each label fraction over seeds.

    Pretraining is the anatomy-embedding stage, then Alice mining with it. Then per protocol, label
    fraction, initialisation and seed one run (``downstream/<protocol>_<percent>/<init>_seed<s>/``):

    - ``finetune``: the whole SwinUNETR trained (best validation weights) and scored on the test
      cases by ``evaluate``;
    - ``frozen_probe``: :func:`~accord_medssl.probe.frozen_probe`, the network fine-tuning would
      start from kept frozen, a linear voxel classifier (1x1x1 convolution) on its last decoder
      block and decoder tokens fitted on the same labelled cases and scored on the same test
      cases: what the pretrained features alone are worth.

    Without ``data`` it synthesises phantoms; ``quick`` shrinks everything to a few minutes on CPU.
    The quick run pretrains once per seed (``pretrain/seed<s>/``). The full variant pretrains once
    (``pretrain/``): each pretraining is 4,000 GPU steps, and every seed's runs start from the same
    checkpoint.

    ``method: gemini`` runs :func:`~accord_medssl.gemini.segmentation_benchmark.gemini_segmentation`.
    """
    if cfg.method == "gemini":
        return gemini_segmentation(cfg)
    scale = QUICK if cfg.quick else FULL
    anatomy_trainer, alice_trainer, finetune_trainer = cfg.trainers(scale)
    cache_dir = cfg.run_dir / "cache"

    def pretrain(data: Path, run_dir: Path, seed: int) -> Path:
        stage = {"plugin": cfg.plugin, "task": "pretrain", "data": data, "cache_dir": cache_dir, "seed": seed,
                 "crop_size": scale.crop_size}
        anatomy = run_task(PretrainConfig(**stage, run_dir=run_dir / "anatomy_embedding", method="anatomy_embedding",
                                          anatomy_embedding=scale.anatomy_embedding, trainer=anatomy_trainer,
                                          probe=scale.anatomy_probe))
        alice = run_task(PretrainConfig(**stage, run_dir=run_dir / "alice", method="alice",
                                        alice=AliceOptions(backbone=scale.backbone, **scale.alice),
                                        mining=MiningOptions(anatomy_checkpoint=anatomy["checkpoint"]),
                                        trainer=alice_trainer, probe=scale.alice_probe))
        return Path(alice["checkpoint"])

    def downstream(run: DownstreamRun) -> dict[str, Any]:
        protocol, fraction = run.group.options
        shared = {"plugin": cfg.plugin, "data": run.data, "cache_dir": cache_dir, "seed": run.seed,
                  "checkpoint": run.checkpoint, "backbone": scale.backbone, "label_fraction": fraction,
                  "split": scale.split, "crop_size": scale.crop_size}
        if protocol == "frozen_probe":
            scores = frozen_probe(FrozenProbeConfig(**shared, run_dir=run.run_dir, probe=scale.frozen_probe))
            return {"protocol": protocol, "label_fraction": fraction, **scores}
        tuned = run_task(FinetuneConfig(**shared, task="finetune", run_dir=run.run_dir, trainer=finetune_trainer,
                                        **scale.finetune))
        scores = run_task(EvaluateConfig(**{key: shared[key] for key in ("plugin", "data", "cache_dir", "seed")},
                                         task="evaluate", run_dir=run.run_dir / "evaluate", checkpoint=tuned["weights"]))
        return {"protocol": protocol, "label_fraction": fraction, "dice": scores["dice"],
                "dice_per_class": scores["dice_per_class"], "best_step": tuned["best_step"],
                "labelled_cases": tuned["labelled_cases"], "class_weights": tuned["class_weights"]}

    fractions = {"finetune": preset(cfg, "finetune_label_fractions", [max(cfg.label_fractions)])
                             or cfg.label_fractions,
                 "frozen_probe": cfg.label_fractions}

    def groups(data: Path) -> list[Group]:
        return [Group(f"{PROTOCOL_TITLES[protocol]}, {100 * fraction:g}% labels", (protocol, fraction))
                for protocol in cfg.protocols for fraction in fractions[protocol]]

    weights = scale.finetune.get("class_weights", "none")
    notes = [
        f"fine-tune: every SwinUNETR weight trained, {finetune_trainer.max_steps} steps at lr {finetune_trainer.lr:g} "
        f"(DiceCE, class weights: {weights}), the best validation Dice kept, scored on the test cases.",
        "frozen probe: the same network frozen (Alice's student, or the random weights fine-tuning starts from); "
        "a linear voxel classifier (a 1x1x1 convolution, the pretraining runs' online probe) on its last decoder "
        f"block and upsampled decoder tokens, fitted on {scale.frozen_probe.voxels_per_class} voxels per class of "
        f"each labelled case, scored on up to {scale.frozen_probe.test_voxels:,} voxels of each test case, pooled.",
    ]
    return run_pipeline(cfg, PipelineSpec(
        title=f"medssl: {cfg.method} pretraining vs random initialisation, SwinUNETR segmentation",
        dataset="medssl.msd", synth_options={"seed": cfg.seed, **scale.phantoms},
        pretrain=pretrain, downstream=downstream, groups=groups, group="protocol, labels",
        metric="dice", metric_title="mean test Dice (%)", inits=("random", cfg.method), pretrained_init=cfg.method,
        seed_independent_pretraining=not cfg.quick, per_class_key="dice_per_class",
        per_class_title="Per-class test Dice (%), mean ± std over seeds", paper=PAPER, notes=tuple(notes),
    ))


class GeminiSegmentationConfig(MedsslBenchmarkConfig):
    """``accord benchmark medssl gemini_segmentation [--quick]``: ``--method gemini`` as a benchmark of its own
    (``accord demo`` runs every pipeline benchmark with its defaults)."""

    method: Literal["alice", "gemini"] = Field("gemini", description="gemini (alice: the segmentation benchmark's)")


# --- speed benchmarks -----------------------------------------------------------------------------




def _epoch_seconds(dataset: Dataset, num_workers: int) -> float:
    """Wall time of one full pass over ``dataset`` (batch 1, as the medssl methods train)."""
    loader = DataLoader(dataset, batch_size=1, num_workers=num_workers)
    start = time.perf_counter()
    for _ in loader:
        pass
    return time.perf_counter() - start


def loader_throughput(
    root: str | Path | None = None,
    *,
    spacing: Sequence[float] | None = None,
    num_workers: int = 0,
    num_cases: int = 8,
    shape: tuple[int, int, int] = DEFAULT_SHAPE,
    repeats: int = 3,
    threads: int | None = None,
) -> dict[str, Any]:
    """Volumes per second through the preprocessing pipeline: uncached, disk-cache cold and warm.

    Passes over the training split: the first pass of a fresh disk cache (decode + preprocess +
    write, once), then ``repeats`` rounds alternating a plain decoding pass (what every epoch costs
    without a cache) with a warm cache pass (read the preprocessed tensors back). Rates are at the
    median pass time, with the slowest and fastest pass in brackets.

    Args:
        root: an MSD dataset; ``None`` synthesises ``num_cases`` phantoms of ``shape`` in a
            temporary directory.
        spacing: target spacing handed to the pipeline (``None``: native grid).
        num_workers: DataLoader worker processes.
        num_cases: phantoms to synthesise when ``root`` is None.
        shape: phantom shape when ``root`` is None.
        repeats: alternated uncached / warm-cache rounds.
        threads: torch threads while timing (None: torch's default).

    Returns:
        ``volumes``, ``uncached_volumes_per_s`` and ``cached_volumes_per_s`` (at the median pass
        time), ``cold_volumes_per_s``, ``cache_speedup`` (ratio of the median pass times),
        ``uncached_pass`` / ``cached_pass`` (median (min-max) seconds), ``cache_speedup_per_round``
        (with the range of the per-round ratios), ``cache_mb`` and ``machine`` (threads and load).
    """

    with tempfile.TemporaryDirectory(prefix="medssl-bench-") as scratch, torch_threads(threads):
        scratch_dir = Path(scratch)
        if root is None:
            root = synth(scratch_dir / "data", num_train=num_cases, num_test=0, shape=shape)
        items = decathlon_items(root)
        cache_dir = scratch_dir / "cache"
        uncached_dataset = build_dataset(items, cache="none", spacing=spacing)
        # One untimed read, so lazy imports and first-call set-up do not count against a pass.
        uncached_dataset[0]
        disk = build_dataset(items, cache="disk", cache_dir=cache_dir, spacing=spacing)
        cold = _epoch_seconds(disk, num_workers)
        timings = time_alternating({"uncached": lambda: _epoch_seconds(uncached_dataset, num_workers),
                                    "cached": lambda: _epoch_seconds(disk, num_workers)}, repeats=repeats, warmup=0)
        cache_bytes = sum(path.stat().st_size for path in cache_dir.iterdir())
        state = machine_state()
    volumes = len(items)
    return {
        "volumes": volumes,
        "uncached_volumes_per_s": volumes / timings["uncached"].median,
        "cold_volumes_per_s": volumes / cold,
        "cached_volumes_per_s": volumes / timings["cached"].median,
        "cache_speedup": timings["uncached"].median / timings["cached"].median,
        "uncached_pass": timings["uncached"].describe(1.0, "s"),
        "cached_pass": timings["cached"].describe(1.0, "s"),
        "cache_speedup_per_round": ratio(timings["uncached"], timings["cached"]),
        "cache_mb": cache_bytes / 2**20,
        "machine": state,
    }


def pretraining_speed(
    method: Literal["alice", "anatomy_embedding"] = "alice",
    *,
    crop_size: int = 64,
    batch_size: int = 2,
    steps: int = 6,
    warmup_steps: int = 2,
    options: dict[str, Any] | None = None,
    num_cases: int = 4,
    device: Literal["auto", "cpu", "cuda"] = "auto",
    threads: int | None = None,
) -> dict[str, Any]:
    """Optimizer steps per second and peak memory of ``pretrain`` on synthesised phantoms.

    Each step is a full trainer step: view cutting (and, for Alice, anatomy matching against cached
    embeddings), forward, backward, optimizer and EMA update. The first ``warmup_steps`` are not
    timed (one-off kernel selection, and the first embedding of each volume for Alice). Alice mines
    with an anatomy-embedding network trained for one step first (untimed).

    Args:
        method: the pretraining stage to time.
        crop_size: edge of the cubic views (Alice: a multiple of 32).
        batch_size: view pairs per step.
        steps: steps to run, timed ones included.
        warmup_steps: leading steps left out of the rate.
        options: the method's options section (``alice`` / ``anatomy_embedding``); None: the
            defaults, i.e. the reference sizes (SwinUNETR feature size 48, 512 prototypes).
        num_cases: phantoms of 96 x 96 x 64 voxels to cut the views from.
        device: the trainer's device.
        threads: torch threads (None: torch's default).

    Returns:
        ``steps_per_s`` (at the median step time), ``seconds_per_step`` (median (min-max) over
        the timed steps), ``peak_memory_mb``: on CUDA the peak allocated by torch, on the CPU the
        peak resident size of the whole process (run it in a fresh process), ``device`` and
        ``machine`` (threads and load).
    """
    from accord.training.progress import read_metrics

    if steps <= warmup_steps:
        raise ValueError(f"steps ({steps}) must exceed warmup_steps ({warmup_steps})")
    crop = (crop_size,) * 3
    trainer = TrainerConfig(max_steps=steps, batch_size=batch_size, checkpoint_every=steps, log_every=1, device=device)
    with tempfile.TemporaryDirectory(prefix="medssl-speed-") as scratch:
        scratch_dir = Path(scratch)
        data = synth(scratch_dir / "data", num_train=num_cases, num_test=0)
        shared = {"plugin": "medssl", "task": "pretrain", "data": data, "cache_dir": scratch_dir / "cache", "crop_size": crop}
        timed = {"method": method, "run_dir": scratch_dir / method, "trainer": trainer, method: options or {}}
        if method == "alice":
            anatomy = run_task(PretrainConfig(**shared, method="anatomy_embedding", run_dir=scratch_dir / "anatomy",
                                              trainer=trainer.model_copy(update={"max_steps": 1, "checkpoint_every": 1})))
            timed["mining"] = {"anatomy_checkpoint": anatomy["checkpoint"]}
        cuda = torch.cuda.is_available() and device != "cpu"
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        with torch_threads(threads):
            run_task(PretrainConfig(**shared, **timed))
            state = machine_state()
        records = read_metrics(scratch_dir / method / "metrics.jsonl")[warmup_steps:]
    timing = Timing(tuple(batch_size / record["samples_per_s"] for record in records))
    if cuda:
        peak_mb = torch.cuda.max_memory_allocated() / 2**20
    else:
        # ru_maxrss is in KiB on Linux.
        peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {
        "steps_per_s": 1 / timing.median,
        "seconds_per_step": timing.describe(1.0, "s"),
        "peak_memory_mb": peak_mb,
        "device": "cuda" if cuda else "cpu",
        "machine": state,
    }


# --- anatomy matching --------------------------------------------------------------------------

#: Random transforms of the "deformed copy" pairs (:func:`random_deformed_copy` arguments): about a
#: tenth of the field of view in shift, with rotation, scale and a smooth elastic part on top.
PHANTOM_DEFORMATION = {"max_rotation_deg": 10.0, "max_scale": 0.1, "max_translation_mm": 5.0, "max_elastic_mm": 3.0}
MNI_DEFORMATION = {"max_rotation_deg": 10.0, "max_scale": 0.1, "max_translation_mm": 10.0, "max_elastic_mm": 4.0}


@dataclass(frozen=True)
class _MatchingPair:
    """Query and target volumes with labels; ``source_points`` are the query voxels' true target positions."""

    query: torch.Tensor
    query_labels: torch.Tensor
    target: torch.Tensor
    target_labels: torch.Tensor
    spacing: tuple[float, float, float]
    source_points: torch.Tensor | None = None


@dataclass(frozen=True)
class _MatchingSet:
    """Volumes an embedding trains on, and the labelled pairs it is then scored on, by pair kind."""

    name: str
    train_volumes: list[torch.Tensor]
    pairs: dict[str, list[_MatchingPair]]


def _deformed_pair(
    volume: torch.Tensor, labels: torch.Tensor, spacing: tuple[float, float, float], seed: int, deformation: dict
) -> _MatchingPair:
    """The original as target and a seeded random deformed copy of it as query."""
    copy = random_deformed_copy(volume, labels, spacing, generator=torch.Generator().manual_seed(seed), **deformation)
    return _MatchingPair(copy.volume, copy.labels, volume, labels, spacing, copy.source_points)


def _phantom_set(root: Path, num_cases: int, shape: tuple[int, int, int], seed: int, copies: int) -> _MatchingSet:
    """Quick-benchmark phantoms: train on all cases, match each case into the next, and copies into originals."""
    items = decathlon_items(synth(root, num_train=num_cases, num_test=0, shape=shape, seed=seed))
    cases = [build_dataset([item], cache="none")[0] for item in items]
    volumes = [case["image"].as_subclass(torch.Tensor) for case in cases]
    labels = [case["label"].as_subclass(torch.Tensor)[0].long() for case in cases]
    spacing = tuple(float(size) for size in cases[0]["image"].affine[:3, :3].norm(dim=0))
    cross = [
        _MatchingPair(volumes[index], labels[index], volumes[(index + 1) % num_cases], labels[(index + 1) % num_cases], spacing)
        for index in range(num_cases)
    ]
    deformed = [
        _deformed_pair(volumes[index], labels[index], spacing, seed + 1000 + index, PHANTOM_DEFORMATION)
        for index in range(min(copies, num_cases))
    ]
    return _MatchingSet("phantoms", volumes, {"cross-case": cross, "deformed copy": deformed})


def _mni152_set(seed: int, train_copies: int, copies: int) -> _MatchingSet:
    """nilearn's MNI152 T1 template (2 mm, shipped with nilearn) with tissue labels.

    Labels: 1 other brain (mostly CSF), 2 grey matter, 3 white matter, from nilearn's masks. The
    embedding trains on the template and ``train_copies`` deformed copies; the scored pairs are
    ``copies`` other deformed copies matched into the template.

    Raises:
        ImportError: nilearn is not installed.
    """
    try:
        from nilearn import datasets
    except ImportError as error:
        raise ImportError("the MNI152 matching set needs nilearn: pip install 'accord-medssl[test]'") from error

    def array(image) -> torch.Tensor:
        return torch.from_numpy(image.get_fdata(dtype="float32"))

    template = datasets.load_mni152_template(resolution=2)
    brain = array(datasets.load_mni152_brain_mask(resolution=2)) > 0
    grey = array(datasets.load_mni152_gm_mask(resolution=2)) > 0
    white = array(datasets.load_mni152_wm_mask(resolution=2)) > 0
    labels = torch.where(white, 3, torch.where(grey, 2, torch.where(brain, 1, 0)))
    volume = array(template)[None]
    spacing = tuple(float(size) for size in template.header.get_zooms()[:3])
    train = [volume] + [
        _deformed_pair(volume, labels, spacing, seed + index, MNI_DEFORMATION).query for index in range(train_copies)
    ]
    pairs = [_deformed_pair(volume, labels, spacing, seed + 1000 + index, MNI_DEFORMATION) for index in range(copies)]
    return _MatchingSet("mni152", train, {"deformed copy": pairs})


def _train_embedding(
    volumes: list[torch.Tensor], options: AnatomyPretrainingOptions, steps: int, seed: int, run_dir: Path
) -> AnatomyEmbeddingModel:
    """The quick benchmark's anatomy stage (its crops, augmentation and trainer) for ``steps`` steps."""
    from accord.training import Trainer
    from accord_medssl.anatomy import AnatomyEmbeddingPretraining

    trainer = QUICK.anatomy_trainer.model_copy(
        update={"max_steps": steps, "checkpoint_every": steps, "log_every": steps,
                "warmup_steps": min(QUICK.anatomy_trainer.warmup_steps, steps - 1)}
    )
    torch.manual_seed(seed)
    module = AnatomyEmbeddingPretraining(options)
    dataset = AnatomyViewPairs([{"image": volume} for volume in volumes], QUICK.crop_size, AnatomyViewOptions())
    Trainer(trainer, run_dir, seed=seed).fit(module, dataset)
    return module.model


def _score_pairs(model: AnatomyEmbeddingModel, pairs: list[_MatchingPair], num_points: int, seed: int) -> MatchOutcomes:
    """Match ``num_points`` label-balanced query points per pair with ``model``'s embeddings."""
    generator = torch.Generator().manual_seed(seed)
    outcomes = []
    for pair in pairs:
        points = sample_labelled_points(pair.query_labels, num_points, generator)
        true_points = None if pair.source_points is None else pair.source_points[tuple(points.T)]
        outcomes.append(
            match_labelled_points(
                points,
                AnatomySearchIndex.from_embedding(model.embed_volume(pair.query)),
                AnatomySearchIndex.from_embedding(model.embed_volume(pair.target)),
                pair.query_labels,
                pair.target_labels,
                true_points=true_points,
                spacing=pair.spacing,
            )
        )
    return MatchOutcomes.concatenate(outcomes)


def _percent(value: float) -> str:
    return "n/a" if math.isnan(value) else f"{100 * value:.1f}"


def anatomy_matching(
    variants: Mapping[str, AnatomyPretrainingOptions | None] | None = None,
    *,
    datasets: Sequence[Literal["phantoms", "mni152"]] = ("phantoms", "mni152"),
    steps: int | None = None,
    num_points: int = 256,
    threshold: float = 0.7,
    seed: int = 0,
) -> BenchmarkResult:
    """How well anatomy embeddings find corresponding points, trained at the quick benchmark's scale.

    Each variant's embedding network is trained like the quick benchmark's anatomy stage (32^3 crops,
    batch 2, its learning rate, ``steps`` steps) on each dataset, then scored with
    :mod:`accord_medssl.anatomy.evaluation` (the miner's own similarity search):

    - ``phantoms``: the quick benchmark's 10 phantoms of 48 x 48 x 32 voxels; *cross-case* pairs
      match every case into the next (organ hit rate), *deformed copy* pairs match a randomly
      affine + elastically deformed copy of a case into the case (hit rate and error in mm);
    - ``mni152``: nilearn's MNI152 T1 template at 2 mm with tissue labels (grey matter, white
      matter, other brain); trained on the template and 7 deformed copies, scored on 3 other
      copies matched into the template.

    Args:
        variants: name -> pretraining options; ``None`` options give the untrained network
            (initialised from ``seed``). Default: untrained and the quick benchmark's options.
        datasets: which sets to run.
        steps: training steps; ``None``: the quick benchmark's anatomy steps.
        num_points: query points per pair, balanced over labels.
        threshold: the miner's acceptance threshold.
        seed: seed of the data, the networks and the query points.

    Returns:
        ``rows`` (one dict per dataset, pair kind and variant: :meth:`MatchOutcomes.summary` plus
        ``dataset``, ``pairs``, ``variant`` and ``train_seconds``) and two tables: hit rates, scores
        and errors per row, and per acceptance criterion of
        :data:`~accord_medssl.anatomy.evaluation.ACCEPTANCE_CRITERIA` its hit-vs-miss AUC and the
        hit rate and error among the most confident half and quarter of the points.
    """
    if variants is None:
        variants = {"untrained": None, "trained": QUICK.anatomy_embedding}
    steps = QUICK.anatomy_trainer.max_steps if steps is None else steps
    rows = []
    with tempfile.TemporaryDirectory(prefix="medssl-matching-") as scratch:
        scratch_dir = Path(scratch)
        for dataset in datasets:
            if dataset == "phantoms":
                shape = QUICK.phantoms["shape"]
                matching_set = _phantom_set(scratch_dir / "phantoms", QUICK.phantoms["num_train"], shape, seed, copies=3)
            elif dataset == "mni152":
                matching_set = _mni152_set(seed, train_copies=7, copies=3)
            else:
                raise ValueError(f"datasets: expected 'phantoms' or 'mni152', got {dataset!r}")
            for variant, options in variants.items():
                start = time.perf_counter()
                if options is None:
                    torch.manual_seed(seed)
                    model = AnatomyEmbeddingModel(QUICK.anatomy_embedding.model)
                else:
                    run_dir = scratch_dir / "runs" / f"{dataset}_{variant}"
                    model = _train_embedding(matching_set.train_volumes, options, steps, seed, run_dir)
                train_seconds = time.perf_counter() - start
                for kind, pairs in matching_set.pairs.items():
                    summary = _score_pairs(model, pairs, num_points, seed).summary(threshold)
                    rows.append({"dataset": dataset, "pairs": kind, "variant": variant,
                                 "train_seconds": train_seconds, **summary})
    header = ["dataset", "pairs", "variant", "hit % (chance)", "best score mean [p05, p95]", "mean score",
              f"accepted % (> {threshold})", "hit % if accepted", "hit-vs-miss score AUC", "error mm mean (p50)"]
    lines = [
        [row["dataset"], row["pairs"], row["variant"],
         f"{_percent(row['hit_rate'])} ({_percent(row['chance_hit_rate'])})",
         f"{row['score_mean']:.3f} [{row['score_p05']:.3f}, {row['score_p95']:.3f}]",
         f"{row['similarity_mean']:.3f}", _percent(row["accepted"]), _percent(row["accepted_hit_rate"]),
         "n/a" if math.isnan(row["hit_score_auc"]) else f"{row['hit_score_auc']:.2f}",
         f"{row['error_mm_mean']:.1f} ({row['error_mm_p50']:.1f})" if "error_mm_mean" in row else "-"]
        for row in rows
    ]
    criteria_header = ["dataset", "pairs", "variant", "criterion", "hit-vs-miss AUC",
                       "hit % (error mm) in top half", "hit % (error mm) in top quarter"]

    def kept(row: dict[str, Any], criterion: str, share: str) -> str:
        error = row.get(f"{criterion}_{share}_error_mm_mean")
        return _percent(row[f"{criterion}_{share}_hit_rate"]) + ("" if error is None else f" ({error:.1f})")

    criteria_lines = [
        [row["dataset"], row["pairs"], row["variant"], criterion,
         "n/a" if math.isnan(row[f"hit_{criterion}_auc"]) else f"{row[f'hit_{criterion}_auc']:.2f}",
         kept(row, criterion, "top_half"), kept(row, criterion, "top_quarter")]
        for row in rows
        for criterion in ACCEPTANCE_CRITERIA
    ]
    return BenchmarkResult(
        f"medssl: anatomy matching of embeddings trained {steps} steps at the quick scale ({', '.join(datasets)})",
        [ResultTable("Matching", header, lines), ResultTable("Acceptance criteria", criteria_header, criteria_lines)],
        rows=rows,
        # The one timing here (train_seconds, a single run per variant) is read with the machine's state.
        notes=[f"Machine: {machine_state()}."],
    )


# --- Alice view mining at dataset scale --------------------------------------------------------------


def _reference_read_info(path: Path) -> tuple[tuple[float, ...], tuple[int, ...]]:
    """The reference's ``read_info``: a whole NIfTI read (header and voxels) for its spacing and shape."""
    import nibabel

    image = nibabel.load(path)
    return tuple(float(size) for size in image.header.get_zooms()[:3]), np.asanyarray(image.dataobj).shape


def _reference_find_point(query: dict[str, Any], key: dict[str, Any], point: torch.Tensor,
                          stride: int) -> tuple[torch.Tensor, float]:
    """The reference's ``find_point_in_vol`` (medssl §1.3) on its pickled embedding dicts: upsample
    both coarse maps to their fine grids and re-normalise (on every call), take the query's vectors
    at its fine cell, then 1 x 1 x 1 convolutions over the key's maps and the argmax."""
    import torch.nn.functional as F

    def maps(embedding: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        fine = torch.from_numpy(embedding["fine_emb"]).float()
        coarse = F.interpolate(torch.from_numpy(embedding["coarse_emb"]).float(), fine.shape[2:], mode="trilinear",
                               align_corners=False)
        return F.normalize(coarse, dim=1), fine

    query_coarse, query_fine = maps(query)
    cell = tuple((point // stride).tolist())
    coarse_vector = query_coarse[(0, slice(None), *cell)]
    fine_vector = query_fine[(0, slice(None), *cell)]
    key_coarse, key_fine = maps(key)
    similarity = (F.conv3d(key_fine, fine_vector[None, :, None, None, None])
                  + F.conv3d(key_coarse, coarse_vector[None, :, None, None, None]))[0, 0].flatten() / 2
    score, best = similarity.max(dim=0)
    cells = torch.stack(torch.unravel_index(best, key_fine.shape[2:]))
    matched = torch.minimum((cells * stride + 0.5).long(), torch.tensor(key["im_shape"]) - 1)
    return matched, float(score)


@dataclass(frozen=True)
class _MiningCase:
    """One volume of the mining benchmark: its name, NIfTI path and windowed ``(1, D, H, W)`` image."""

    name: str
    path: Path
    image: torch.Tensor


def _read_reference_embedding(path: Path) -> dict[str, Any]:
    """The reference's per-volume embedding dict, every array read into memory (no pickle)."""
    with np.load(path, allow_pickle=False) as arrays:
        embedding = {key: arrays[key] for key in arrays.files}
    embedding["im_shape"] = tuple(int(side) for side in embedding["im_shape"])
    return embedding


def _reference_mine(query: _MiningCase, anchor: _MiningCase, embed_dir: Path, crop_size: Sequence[int],
                    threshold: float, max_attempts: int, stride: int, generator: torch.Generator) -> dict[str, Any]:
    """One pair along the reference's data path (engine_pretrain.py + interfaces.py, medssl §1.3).

    Per pair: both embedding files are read whole (the reference unpickles a dict per volume; the same
    arrays are stored here as ``.npz``, read without pickle, so a benchmark never runs code from
    data); per try: a random foreground voxel, the three whole-NIfTI ``read_info`` reads, and
    :func:`_reference_find_point`, until the score exceeds ``threshold`` or ``max_attempts`` tries
    were made; then the two crops.
    """
    query_embedding = _read_reference_embedding(embed_dir / f"{query.name}.npz")
    anchor_embedding = _read_reference_embedding(embed_dir / f"{anchor.name}.npz")
    foreground = (query.image[0] > 0).flatten().nonzero().squeeze(1)
    tries, score = 0, -math.inf
    while tries < max_attempts and score <= threshold:
        flat = foreground[torch.randint(foreground.numel(), (), generator=generator)]
        point = torch.stack(torch.unravel_index(flat, query.image.shape[1:]))
        for path in (query.path, anchor.path, query.path):
            _reference_read_info(path)
        matched, score = _reference_find_point(query_embedding, anchor_embedding, point, stride)
        tries += 1
    size = torch.tensor(tuple(crop_size))
    crop_with_zero_padding(query.image, (point - size // 2).tolist(), crop_size)
    crop_with_zero_padding(anchor.image, (matched - size // 2).tolist(), crop_size)
    return {"tries": tries, "accepted": score > threshold, "score": score}


def shifted_field_pair(
    degrees_per_voxel: float = 17.0,
    shift: int = 4,
    shape: tuple[int, int, int] = (64, 16, 16),
    local_dim: int = 16,
    seed: int = 0,
) -> tuple[AnatomyEmbedding, AnatomyEmbedding]:
    """A hand-built query / anchor embedding pair on which the two scorings disagree.

    The anchor volume is the query volume shifted by ``shift`` voxels along axis 0 (half a global
    cell of 8 voxels). Both global maps (stride 8) sample one smooth field, a unit vector turning by
    ``degrees_per_voxel`` per voxel along axis 0, at their own cell centres; both local maps
    (stride 2) hold a random code per anatomical position, so the true match has local similarity 1.
    Trilinear upsampling (``scoring="reference"``) rebuilds the field between cell centres on both
    sides: the true match scores about 0.94. The ``nearest`` scoring compares the field at the two
    enclosing cells' centres, always ``shift`` voxels apart (68 degrees at the defaults): the true
    match scores ``(1 + cos 68 deg) / 2 = 0.69``, below Alice's 0.7, and another cell often wins.

    Returns:
        ``(query, anchor)`` embeddings of volumes of ``shape``.
    """
    if shift % 2:
        raise ValueError(f"shift: expected a multiple of the local stride 2, got {shift}")
    generator = torch.Generator().manual_seed(seed)
    # One code per anatomical local cell along axis 0 (the anchor reaches shift voxels further).
    codes = torch.randn(local_dim, (shape[0] + shift) // 2 + 1, generator=generator)
    global_grid = embedding_grid_shape(shape, 8)
    local_grid = embedding_grid_shape(shape, 2)

    def embedding(offset: int) -> AnatomyEmbedding:
        centres = torch.arange(global_grid[0]) * 8 + 3.5 + offset  # anatomical position of each cell centre
        angle = torch.deg2rad(degrees_per_voxel * centres)
        global_map = torch.zeros(2, *global_grid)
        global_map[0] = angle.cos()[:, None, None]
        global_map[1] = angle.sin()[:, None, None]
        local_cells = torch.arange(local_grid[0]) + offset // 2
        local_map = codes[:, local_cells, None, None].expand(-1, -1, *local_grid[1:]).contiguous()
        return AnatomyEmbedding(global_map=global_map, local_map=local_map, global_stride=(8, 8, 8),
                                local_stride=(2, 2, 2), volume_shape=shape)

    return embedding(0), embedding(shift)


def scoring_acceptance(
    pairs: int = 200, threshold: float = 0.7, max_attempts: int = 100, seed: int = 0
) -> dict[str, dict[str, float]]:
    """Mine ``pairs`` crop pairs on :func:`shifted_field_pair` with each scoring.

    Returns:
        Per scoring: ``accepted_first_try`` and ``accepted`` (shares), ``mean_tries``,
        ``mean_score`` and ``mean_error_voxels`` (distance along axis 0 between the matched and
        the true anchor voxel).
    """
    from accord_medssl.anatomy import AnatomicalViewMiner

    query, anchor = shifted_field_pair(seed=seed)
    shift = 4
    embeddings = {"query": query, "anchor": anchor}
    volume = torch.ones(1, *query.volume_shape)
    results = {}
    for scoring in ("reference", "nearest"):
        miner = AnatomicalViewMiner(lambda key, _: embeddings[key], crop_size=(8, 8, 8), similarity_threshold=threshold,
                                    max_attempts=max_attempts, scoring=scoring)
        generator = torch.Generator().manual_seed(seed)
        mined = [miner.mine([volume], [volume], ["query"], ["anchor"], generator) for _ in range(pairs)]
        tries = torch.cat([views.attempts for views in mined]).float()
        errors = torch.cat([(views.anchor_points[:, 0] + shift - views.query_points[:, 0]).abs() for views in mined])
        results[scoring] = {
            "accepted_first_try": float(((tries == 1) & torch.cat([views.accepted for views in mined])).float().mean()),
            "accepted": float(torch.cat([views.accepted for views in mined]).float().mean()),
            "mean_tries": float(tries.mean()),
            "mean_score": float(torch.cat([views.scores for views in mined]).mean()),
            "mean_error_voxels": float(errors.float().mean()),
        }
    return results


def mining_speed(
    volume_counts: Sequence[int] = (30, 120),
    *,
    shape: tuple[int, int, int] = (64, 64, 48),
    crop_size: int = 32,
    pairs_per_round: int = 8,
    repeats: int = 5,
    train_steps: int = 30,
    threshold: float = 0.7,
    max_attempts: int = 100,
    threads: int | None = 1,
    seed: int = 0,
) -> BenchmarkResult:
    """Alice view mining at dataset scale: accord's miner against the reference's data path.

    ``max(volume_counts)`` phantoms are synthesised and windowed by the data pipeline; an anatomy
    embedding is trained ``train_steps`` steps at the quick benchmark's scale (on 10 of them) and
    embeds all of them. Its maps are written twice, untimed, as the two sides precompute them:

    - the reference's per-case embedding dict (fp16 ``coarse_emb`` / ``fine_emb``; the reference
      pickles it, here the same arrays are an ``{name}.npz`` read without pickle), read whole by
      :func:`_reference_mine` (two loads per pair, three whole-NIfTI reads per try, coarse maps
      upsampled on every try);
    - accord's embedding store (one memory-mapped ``.anat`` per volume, normalised float16, the
      local map in blocks), read by :class:`~accord_medssl.anatomy.AnatomicalViewMiner` through
      :func:`~accord_medssl.anatomy.store_embedder`, with the reference's scoring and with the
      ``nearest`` option; a search reads only the local blocks that can hold the best match.

    For each count ``n`` of ``volume_counts``, each round draws ``pairs_per_round`` random
    (query, anchor) pairs of different volumes among the first ``n``; every implementation mines
    the same pairs in the same round, one after the other, and all counts alternate in one process
    (:func:`accord.utils.timing.time_alternating`), so per-pair costs at different dataset sizes
    are compared under the same load. :func:`scoring_acceptance` then shows, untimed, the two
    scorings on a hand-built embedding where they disagree.

    Returns:
        Tables of milliseconds per mined pair (median and min-max over rounds), tries per pair,
        acceptance rate, the share of the anchors' local maps read and the speed-up over the
        reference, per dataset size; and the hand-built scoring case. With the thread count and
        machine load.
    """
    from accord_medssl.anatomy import AnatomicalViewMiner, store_embedder

    counts = sorted({int(count) for count in volume_counts})
    if not counts or counts[0] < 2:
        raise ValueError(f"volume_counts: expected counts of at least 2 volumes, got {list(volume_counts)}")
    crop = (crop_size,) * 3
    with tempfile.TemporaryDirectory(prefix="medssl-mining-") as scratch, torch_threads(threads):
        scratch_dir = Path(scratch)
        items = decathlon_items(synth(scratch_dir / "data", num_train=counts[-1], num_test=0, shape=shape, seed=seed))
        dataset = build_dataset(items, cache="none")
        cases = [_MiningCase(Path(item["image"]).name.split(".")[0], Path(item["image"]),
                             dataset[index]["image"].as_subclass(torch.Tensor)) for index, item in enumerate(items)]
        model = _train_embedding([case.image for case in cases[:10]], QUICK.anatomy_embedding, train_steps, seed,
                                 scratch_dir / "anatomy")
        embed_dir, store_dir = scratch_dir / "reference", scratch_dir / "store"
        embed_dir.mkdir()
        stride = model.local_stride
        for case in cases:
            embedding = model.embed_volume(case.image)
            np.savez(embed_dir / f"{case.name}.npz",
                     coarse_emb=embedding.global_map[None].numpy().astype(np.float16),
                     fine_emb=embedding.local_map[None].numpy().astype(np.float16),
                     im_norm_ratio=np.ones(3), im_shape=np.asarray(case.image.shape[1:]))
            AnatomySearchIndex.from_embedding(embedding).save(store_dir / f"{case.name}.anat")
        store_mb = sum(path.stat().st_size for path in store_dir.iterdir()) / 2**20
        reference_mb = sum(path.stat().st_size for path in embed_dir.iterdir()) / 2**20
        paths = ("reference", "accord", "accord_nearest")
        # Every store opened once, untimed, as after a training run's first pass over its data (the
        # embedder keeps up to 256 mappings open); what a first opening costs is reported apart.
        stores = store_embedder(store_dir)
        start = time.perf_counter()
        for case in cases:
            stores(case.name, case.image)
        open_ms = 1e3 * (time.perf_counter() - start) / len(cases)
        miners = {(count, scoring): AnatomicalViewMiner(stores, crop_size=crop,
                                                        similarity_threshold=threshold, max_attempts=max_attempts,
                                                        scoring=scoring)
                  for count in counts for scoring in ("reference", "nearest")}
        pair_generator = torch.Generator().manual_seed(seed)
        outcomes: dict[tuple[int, str], list[dict[str, Any]]] = {
            (count, path): [] for count in counts for path in paths
        }
        rounds: dict[int, list[list[tuple[_MiningCase, _MiningCase]]]] = {count: [] for count in counts}

        def draw_round(count: int) -> list[tuple[_MiningCase, _MiningCase]]:
            pairs = []
            for _ in range(pairs_per_round):
                first, second = torch.randperm(count, generator=pair_generator)[:2].tolist()
                pairs.append((cases[first], cases[second]))
            rounds[count].append(pairs)
            return pairs

        def run_reference(count: int) -> None:
            generator = torch.Generator().manual_seed(len(rounds[count]))
            pairs = draw_round(count)  # the reference runs first in each round and draws its pairs
            for query, anchor in pairs:
                outcomes[count, "reference"].append(_reference_mine(query, anchor, embed_dir, crop, threshold,
                                                                    max_attempts, stride, generator))

        def run_accord(count: int, scoring: str, path: str) -> None:
            generator = torch.Generator().manual_seed(len(rounds[count]))
            for query, anchor in rounds[count][-1]:
                mined = miners[count, scoring].mine([query.image], [anchor.image], [query.name], [anchor.name],
                                                    generator)
                outcomes[count, path].append({"tries": int(mined.attempts), "accepted": bool(mined.accepted),
                                              "score": float(mined.scores)})

        functions: dict[str, Any] = {}
        for count in counts:
            functions[f"{count}/reference"] = functools.partial(run_reference, count)
            functions[f"{count}/accord"] = functools.partial(run_accord, count, "reference", "accord")
            functions[f"{count}/accord_nearest"] = functools.partial(run_accord, count, "nearest", "accord_nearest")
        timings = time_alternating(functions, repeats=repeats, warmup=1)
        state = machine_state()
        scorings = scoring_acceptance(threshold=threshold, max_attempts=max_attempts, seed=seed)
    titles = {"reference": "reference data path (pickles, 3 NIfTI reads + upsampling per try)",
              "accord": "accord, memory-mapped store, reference scoring",
              "accord_nearest": "accord, memory-mapped store, nearest scoring"}
    rows, lines = [], []
    for count in counts:
        for path in paths:
            timing = timings[f"{count}/{path}"]
            per_pair = timing.scaled(1 / pairs_per_round)
            results = outcomes[count, path]
            tries = [result["tries"] for result in results]
            accepted = sum(result["accepted"] for result in results) / len(results)
            mean_score = float(np.mean([result["score"] for result in results]))
            miner = miners.get((count, "nearest" if path == "accord_nearest" else "reference"))
            read = None if path == "reference" else miner.blocks_read / miner.blocks_total
            rows.append({"path": path, "volumes": count, **per_pair.summary(), "mean_tries": float(np.mean(tries)),
                         "median_tries": float(np.median(tries)), "accepted": accepted, "mean_score": mean_score,
                         "local_map_read": 1.0 if read is None else read, "pairs": len(results)})
            lines.append([str(count), titles[path], per_pair.describe(1e3, "ms"),
                          f"{np.mean(tries):.1f} ({np.median(tries):g})", f"{100 * accepted:.0f}", f"{mean_score:.3f}",
                          "100" if read is None else f"{100 * read:.0f}",
                          "1" if path == "reference" else ratio(timings[f"{count}/reference"], timing)])
    header = ["volumes", "path", "ms per mined pair, median (min-max)", "tries per pair, mean (median)",
              f"accepted % (> {threshold})", "mean score", "anchor local map read %",
              "speed-up over reference (per round)"]
    scaling = [f"{path}: {ratio(timings[f'{counts[-1]}/{path}'], timings[f'{counts[0]}/{path}'])}" for path in paths]
    scoring_lines = [[scoring, f"{100 * values['accepted_first_try']:.0f}", f"{100 * values['accepted']:.0f}",
                      f"{values['mean_tries']:.2f}", f"{values['mean_score']:.3f}",
                      f"{values['mean_error_voxels']:.1f}"]
                     for scoring, values in scorings.items()]
    scoring_header = ["scoring", "accepted at the first try %", f"accepted within {max_attempts} tries %",
                      "tries per pair, mean", "mean score", "anchor error along the shift, mean (voxels)"]
    notes = [f"{counts[-1]} phantoms of {shape[0]} x {shape[1]} x {shape[2]} voxels, {crop_size}^3 crops, "
             f"{repeats} rounds of {pairs_per_round} random pairs among the first {' / '.join(map(str, counts))} "
             f"volumes (warm-up round untimed), threshold {threshold}, at most {max_attempts} tries (tries, acceptance "
             f"and the share of local map read over every mined pair, warm-up included); embeddings: {train_steps} "
             f"training steps, store {store_mb:.1f} MB (normalised float16) vs reference pickles "
             f"{reference_mb:.1f} MB. Stores opened once before timing ({open_ms:.2f} ms per volume, paid once "
             "per run for up to 256 open stores).",
             f"Per-pair cost at {counts[-1]} volumes over the cost at {counts[0]} (median, per-round range): "
             + "; ".join(scaling) + ".",
             "Hand-built scoring case (shifted_field_pair: the anchor is the query shifted by half a global cell, "
             "the global field turns 17 degrees per voxel): 200 pairs per scoring.",
             f"Machine: {state}."]
    rows += [{"path": f"hand-built/{scoring}", **values} for scoring, values in scorings.items()]
    rows.append({"path": "machine", **state, "store_mb": store_mb, "reference_mb": reference_mb,
                 "store_open_ms": open_ms})
    return BenchmarkResult(f"medssl: Alice view mining over {counts[-1]} volumes, accord vs the reference data path",
                           [ResultTable("Mining", header, lines),
                            ResultTable("Scorings on a hand-built embedding", scoring_header, scoring_lines)],
                           rows=rows, notes=notes)


# --- registered speed benchmarks: configs and runs ------------------------------------------------


class PretrainingSpeedConfig(BenchmarkConfig):
    """``accord benchmark medssl --speed pretraining_speed``: :func:`pretraining_speed`."""

    method: Literal["alice", "anatomy_embedding"] = Field("alice", description="the pretraining stage to time")
    crop_size: int = Field(64, ge=8, description="edge of the cubic views (alice: a multiple of 32; quick: 32)")
    batch_size: int = Field(2, ge=1, description="view pairs per step")
    steps: int = Field(6, ge=2, description="steps run, timed ones included (quick: 3)")
    warmup_steps: int = Field(2, ge=0, description="leading steps left out of the rate (quick: 1)")
    num_cases: int = Field(4, ge=1, description="phantoms to cut the views from")
    device: Literal["auto", "cpu", "cuda"] = "auto"


def run_pretraining_speed(cfg: PretrainingSpeedConfig) -> BenchmarkResult:
    """The reference sizes (SwinUNETR feature size 48, 512 prototypes); quick: the quick pipeline's networks."""
    quick_options = ({"backbone": QUICK.backbone.model_dump(), **QUICK.alice} if cfg.method == "alice"
                     else QUICK.anatomy_embedding.model_dump())
    crop_size = preset(cfg, "crop_size", QUICK.crop_size[0])
    values = pretraining_speed(cfg.method, crop_size=crop_size, batch_size=cfg.batch_size,
                               steps=preset(cfg, "steps", 3), warmup_steps=preset(cfg, "warmup_steps", 1),
                               options=quick_options if cfg.quick else None, num_cases=cfg.num_cases,
                               device=cfg.device, threads=cfg.threads)
    return BenchmarkResult.measured(f"medssl: {cfg.method} pretraining speed, batch {cfg.batch_size} of {crop_size}^3",
                                    values)


class LoaderThroughputConfig(BenchmarkConfig):
    """``accord benchmark medssl --speed loader_throughput [--data MSD_DIR]``: :func:`loader_throughput`."""

    spacing: tuple[float, float, float] | None = Field(
        None, description="resample to this voxel size (mm); None: native"
    )
    num_workers: int = Field(0, ge=0, description="DataLoader worker processes")
    num_cases: int = Field(8, ge=1, description="phantoms synthesised without --data (quick: 4 of 48 x 48 x 32)")
    repeats: int = Field(3, ge=1, description="alternated uncached / warm-cache passes (quick: 2)")


def run_loader_throughput(cfg: LoaderThroughputConfig) -> BenchmarkResult:
    """Uncached, cold and warm disk-cache passes over ``--data`` or synthesised phantoms."""
    values = loader_throughput(cfg.data, spacing=cfg.spacing, num_workers=cfg.num_workers,
                               num_cases=preset(cfg, "num_cases", 4),
                               shape=QUICK.phantoms["shape"] if cfg.quick else DEFAULT_SHAPE,
                               repeats=preset(cfg, "repeats", 2), threads=cfg.threads)
    return BenchmarkResult.measured("medssl: data-loader throughput, uncached vs MONAI disk cache", values)


class AnatomyMatchingConfig(BenchmarkConfig):
    """``accord benchmark medssl --speed anatomy_matching``: :func:`anatomy_matching` (untrained vs trained)."""

    datasets: list[Literal["phantoms", "mni152"]] = Field(
        ["phantoms", "mni152"], min_length=1, description="matching sets (quick: phantoms); mni152 needs nilearn"
    )
    steps: int | None = Field(None, ge=1, description="training steps; None: the quick pipeline's (quick: 30)")
    num_points: int = Field(256, ge=1, description="query points per pair (quick: 64)")
    threshold: float = Field(0.7, gt=-1, lt=1, description="the miner's acceptance threshold")


def run_anatomy_matching(cfg: AnatomyMatchingConfig) -> BenchmarkResult:
    """About 10 minutes on two cores for both sets; quick: phantoms only, 30 steps."""
    return anatomy_matching(datasets=preset(cfg, "datasets", ["phantoms"]), steps=preset(cfg, "steps", 30),
                            num_points=preset(cfg, "num_points", 64), threshold=cfg.threshold, seed=cfg.seed)


class MiningSpeedConfig(BenchmarkConfig):
    """``accord benchmark medssl --speed mining``: :func:`mining_speed` (accord's miner vs the reference path)."""

    volume_counts: list[int] = Field(
        [30, 120], min_length=1, description="dataset sizes compared in one run: pairs are drawn among the first n "
        "of max(volume_counts) phantoms (quick: 30 and 100 of 48 x 48 x 32)",
    )
    crop_size: int = Field(32, ge=4, description="edge of the cubic crops")
    pairs_per_round: int = Field(8, ge=1, description="pairs mined by each implementation per timed round")
    repeats: int = Field(5, ge=1, description="timed rounds (quick: 3)")
    train_steps: int = Field(30, ge=1, description="anatomy-embedding training steps (quick: 20)")
    threshold: float = Field(0.7, gt=-1, lt=1, description="acceptance threshold (the reference's 0.7)")
    max_attempts: int = Field(100, ge=1, description="tries per pair before giving up")
    threads: int | None = Field(1, ge=1, description="torch threads while timing; 1 gives stable ratios on a shared "
                                                     "machine; None: torch's default")


def run_mining_speed(cfg: MiningSpeedConfig) -> BenchmarkResult:
    """About 4 minutes on two cores (phantoms, a short embedding training, then the timed rounds)."""
    return mining_speed(preset(cfg, "volume_counts", [30, 100]),
                        shape=QUICK.phantoms["shape"] if cfg.quick else (64, 64, 48), crop_size=cfg.crop_size,
                        pairs_per_round=cfg.pairs_per_round, repeats=preset(cfg, "repeats", 3),
                        train_steps=preset(cfg, "train_steps", 20), threshold=cfg.threshold,
                        max_attempts=cfg.max_attempts, threads=cfg.threads, seed=cfg.seed)
