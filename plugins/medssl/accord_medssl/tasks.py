"""The medssl tasks: ``pretrain`` (anatomy embedding or Alice), ``finetune``, ``evaluate``, ``benchmark``.

Alice runs in two pretraining stages, each an ``accord run`` of the ``pretrain`` task:

1. ``method: anatomy_embedding`` trains the small SAM-style embedding network that replaces the
   external SAM (two augmented crops of one volume, dense InfoNCE on the global and local maps);
2. ``method: alice`` mines anatomy-matched crop pairs of two different volumes with that network
   (``mining.anatomy_checkpoint``) or with precomputed embeddings (``mining.embeddings``) and trains
   the Alice student-teacher on them.

``finetune`` and ``evaluate`` (:mod:`accord_medssl.finetune`) then measure what the pretrained
SwinUNETR is worth for segmentation, and ``benchmark`` runs the whole chain against random
initialisation over label fractions and seeds.
"""

from __future__ import annotations

import statistics
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import Field, model_validator
from torch import nn
from torch.utils.data import Dataset

from accord.config import BenchmarkConfig, ParameterFreeze, TrainerConfig, save_resolved
from accord.report import markdown_table, seed_table
from accord.training import Trainer
from accord_medssl.alice import AliceModel, AliceOptions
from accord_medssl.anatomy import AnatomyEmbeddingPretraining, AnatomyPretrainingOptions
from accord_medssl.anatomy.model import GLOBAL_STRIDE
from accord_medssl.data import require_valid, synth
from accord_medssl.finetune import EvaluateConfig, FinetuneConfig, SplitOptions, evaluate, finetune
from accord_medssl.models import SwinUNETRBackboneOptions
from accord_medssl.models.swin_unetr import SIZE_MULTIPLE
from accord_medssl.views import (
    AliceViewPairs,
    AnatomyViewOptions,
    AnatomyViewPairs,
    MiningOptions,
    VolumeRunConfig,
    build_miner,
    pretraining_items,
    volume_key,
)

__all__ = [
    "ALICE_EMA_MOMENTUM",
    "ALICE_PROTOTYPES",
    "ALICE_TRAINER_DEFAULTS",
    "AlicePretraining",
    "EvaluateConfig",
    "FinetuneConfig",
    "MedsslBenchmarkConfig",
    "PretrainConfig",
    "benchmark",
    "build_pretraining",
    "evaluate",
    "finetune",
    "pretrain",
]

#: Start of Alice's cosine EMA schedule (to 1 at the last step), the reference's ``momentum_teacher``.
ALICE_EMA_MOMENTUM = 0.996
#: Matches the parameter names of the student's prototype layers (DINO's ``last_layer``, both heads).
ALICE_PROTOTYPES = r"^student\.(pooled|token)_head\.last_layer\."
#: The reference's DINO-style optimisation (medssl §1.9), for the trainer fields an alice config does
#: not set. The prototypes stay fixed for the first 31 steps: the reference freezes them for its
#: first epoch, 2,000 CTs at global batch 64 = 31 optimizer steps, the same epoch-to-step conversion
#: as ``teacher_temperature_warmup_steps`` (940 = 30 epochs).
ALICE_TRAINER_DEFAULTS: dict[str, Any] = {
    "weight_decay": 0.04,
    "weight_decay_end": 0.4,
    "weight_decay_exempt_1d": True,
    "grad_clip_norm": 3.0,
    "grad_clip_mode": "per_tensor",
    "freeze_parameters": ParameterFreeze(pattern=ALICE_PROTOTYPES, steps=31),
}


class PretrainConfig(VolumeRunConfig):
    """The ``pretrain`` task: one pretraining stage, ``method: anatomy_embedding`` or ``alice``."""

    method: Literal["anatomy_embedding", "alice"] = Field(
        "alice", description="anatomy_embedding: the SAM replacement Alice mines with; alice: Alice itself"
    )
    spacing: tuple[float, float, float] | None = Field(None, description="resample to this voxel size (mm); None: native, as Alice")
    crop_size: tuple[int, int, int] = Field(
        (64, 64, 64), description="view size in voxels: multiples of 32 for alice (SwinUNETR), of 8 for anatomy_embedding"
    )
    anatomy_embedding: AnatomyPretrainingOptions = Field(
        AnatomyPretrainingOptions(), description="model and loss of method anatomy_embedding"
    )
    views: AnatomyViewOptions = Field(AnatomyViewOptions(), description="crop augmentation of method anatomy_embedding")
    alice: AliceOptions = Field(AliceOptions(), description="model and losses of method alice")
    mining: MiningOptions = Field(MiningOptions(), description="embedding source and matching of method alice")
    trainer: TrainerConfig = Field(
        TrainerConfig(
            max_steps=1000,
            batch_size=2,
            lr=1e-4,
            min_lr=1e-6,
            weight_decay=0.04,
            warmup_steps=50,
            grad_clip_norm=3.0,
            checkpoint_every=100,
        ),
        description="optimisation; for alice an unset ema_momentum becomes 0.996 (cosine to ema_momentum_end 1) "
        "and unset fields take ALICE_TRAINER_DEFAULTS (weight decay 0.04 -> 0.4 without biases and norms, "
        "per-tensor clip 3.0, prototypes frozen for 31 steps)",
    )

    @model_validator(mode="after")
    def _method_settings(self) -> PretrainConfig:
        multiple = SIZE_MULTIPLE if self.method == "alice" else GLOBAL_STRIDE
        if any(size % multiple for size in self.crop_size):
            raise ValueError(f"crop_size {self.crop_size} must be multiples of {multiple} for method {self.method}")
        if self.method == "alice":
            unset = {name: value for name, value in ALICE_TRAINER_DEFAULTS.items() if name not in self.trainer.model_fields_set}
            if self.trainer.ema_momentum is None:  # None would mean no teacher updates at all
                unset["ema_momentum"] = ALICE_EMA_MOMENTUM
            if unset:
                self.trainer = self.trainer.model_copy(update=unset)
        return self


class AlicePretraining(AliceModel):
    """:class:`~accord_medssl.alice.AliceModel` that also logs how well its view pairs matched.

    The extra terms (not part of ``loss``) are ``pair_similarity``, the mean cosine of the mined
    pairs, and ``pair_accepted``, the share above the threshold: an anatomy embedding too weak to
    find matches shows up in ``metrics.jsonl`` instead of silently giving random pairs.
    """

    def forward(self, batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """``batch``: :class:`~accord_medssl.views.AliceViewPairs` samples (``query``, ``anchor``,
        ``scores``, ``accepted``, ...), collated."""
        terms = super().forward(batch)
        return {**terms, "pair_similarity": batch["scores"].float().mean(), "pair_accepted": batch["accepted"].float().mean()}


def build_pretraining(cfg: PretrainConfig) -> tuple[nn.Module, Dataset]:
    """The trainer-contract model and the view dataset of ``cfg.method``.

    The dataset is checked first (:func:`~accord_medssl.data.require_valid`); model weights are
    initialised from ``cfg.seed``.

    Raises:
        ValueError: an invalid dataset (every problem the check finds), or a missing embedding source.
    """
    miner = build_miner(cfg.mining, cfg.crop_size) if cfg.method == "alice" else None
    require_valid(cfg.data)
    items = pretraining_items(cfg.data)
    volumes = cfg.volumes(items, cfg.spacing)
    torch.manual_seed(cfg.seed)
    if cfg.method == "anatomy_embedding":
        return AnatomyEmbeddingPretraining(cfg.anatomy_embedding), AnatomyViewPairs(volumes, cfg.crop_size, cfg.views)
    keys = [volume_key(item["image"], cfg.data) for item in items]
    return AlicePretraining(cfg.alice), AliceViewPairs(volumes, keys, miner)


def pretrain(cfg: PretrainConfig) -> dict[str, Any]:
    """Train one pretraining stage with the core trainer.

    ``<run_dir>/config.yaml`` is written first: later stages, ``finetune`` and ``accord export``
    read the architecture of a checkpoint from it.

    Returns:
        The trainer's result: the last metrics record and ``checkpoint``.
    """
    model, dataset = build_pretraining(cfg)
    save_resolved(cfg, cfg.run_dir)
    return Trainer(cfg.trainer, cfg.run_dir).fit(model, dataset)


# --- benchmark ---------------------------------------------------------------------------------


class MedsslBenchmarkConfig(BenchmarkConfig):
    """``accord benchmark medssl [--quick] [--data MSD_DIR] method=alice``."""

    method: Literal["alice"] = Field("alice", description="the pretraining compared with random initialisation")
    label_fractions: list[float] = Field([0.1, 1.0], min_length=1, description="shares of the train cases with labels")
    anatomy_steps: int | None = Field(None, ge=1, description="anatomy-embedding steps (None: the variant's)")
    alice_steps: int | None = Field(None, ge=1, description="Alice pretraining steps (None: the variant's)")
    finetune_steps: int | None = Field(
        None, ge=1, description="steps per fine-tuning run, validated every quarter (None: the variant's)"
    )

    def trainers(self, scale: _Scale) -> tuple[TrainerConfig, TrainerConfig, TrainerConfig]:
        """The anatomy, Alice and fine-tuning trainers of ``scale`` with the step overrides applied."""

        def with_steps(trainer: TrainerConfig, steps: int | None, checkpoints: int = 1) -> TrainerConfig:
            if steps is None:
                return trainer
            every = max(steps // checkpoints, 1)
            return trainer.model_copy(update={"max_steps": steps, "checkpoint_every": every,
                                              "log_every": min(trainer.log_every, every),
                                              "warmup_steps": min(trainer.warmup_steps, steps - 1)})

        return (with_steps(scale.anatomy_trainer, self.anatomy_steps), with_steps(scale.alice_trainer, self.alice_steps),
                with_steps(scale.finetune_trainer, self.finetune_steps, checkpoints=4))


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
    split: SplitOptions


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
    finetune_trainer=TrainerConfig(max_steps=50, batch_size=1, lr=1e-3, warmup_steps=5, checkpoint_every=25, keep_last=1, log_every=25),
    split=SplitOptions(validation_fraction=0.2, test_fraction=0.3),
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
                                   checkpoint_every=100, keep_last=1),
    split=SplitOptions(),
)


def _mean_std(values: list[float]) -> str:
    """``mean ± std`` in percent (std 0 for a single value), as :func:`accord.report.seed_table` prints."""
    scores = [value * 100 for value in values]
    std = statistics.stdev(scores) if len(scores) > 1 else 0.0
    return f"{statistics.fmean(scores):.2f} ± {std:.2f}"


def _per_class_table(rows: list[dict[str, Any]], class_names: list[str]) -> str:
    """Markdown: one line per (label fraction, init), mean ± std Dice (%) per class over seeds."""
    groups: dict[tuple[float, str], list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault((row["label_fraction"], row["init"]), []).append(row)
    lines = []
    for (fraction, init), runs in groups.items():
        cells = []
        for name in class_names:
            values = [run["dice_per_class"][name] for run in runs if run["dice_per_class"][name] is not None]
            cells.append(_mean_std(values) if values else "n/a")
        lines.append([fraction, init, *cells])
    return markdown_table(["label_fraction", "init", *class_names], lines)


def benchmark(cfg: MedsslBenchmarkConfig) -> dict[str, Any]:
    """Alice pretraining vs random initialisation, fine-tuned on each label fraction over seeds.

    Stages, each in its own directory under ``run_dir``: anatomy-embedding pretraining, Alice
    pretraining mining with it, then per label fraction, initialisation and seed a fine-tuning run
    (best validation weights) scored on the test cases by ``evaluate``. Without ``data`` it
    synthesises phantoms; ``quick`` shrinks everything to a few minutes on CPU.

    Returns:
        :func:`accord.report.seed_table`'s dict (mean test Dice, ``results.png``) whose ``markdown``
        also holds the per-class table; both tables are in ``run_dir/results.md``.
    """
    scale = QUICK if cfg.quick else FULL
    seeds = cfg.run_seeds()
    anatomy_trainer, alice_trainer, finetune_trainer = cfg.trainers(scale)
    data = cfg.data or synth(cfg.run_dir / "data", seed=cfg.seed, **scale.phantoms)
    shared = {"plugin": cfg.plugin, "data": data, "cache_dir": cfg.run_dir / "cache", "seed": cfg.seed}
    anatomy = pretrain(
        PretrainConfig(
            **shared, task="pretrain", run_dir=cfg.run_dir / "anatomy_embedding", method="anatomy_embedding",
            crop_size=scale.crop_size, anatomy_embedding=scale.anatomy_embedding, trainer=anatomy_trainer,
        )
    )
    alice = pretrain(
        PretrainConfig(
            **shared, task="pretrain", run_dir=cfg.run_dir / "alice", method="alice", crop_size=scale.crop_size,
            alice=AliceOptions(backbone=scale.backbone, **scale.alice),
            mining=MiningOptions(anatomy_checkpoint=anatomy["checkpoint"]), trainer=alice_trainer,
        )
    )
    initialisations: dict[str, Path | None] = {"random": None, cfg.method: Path(alice["checkpoint"])}
    rows = []
    for fraction in cfg.label_fractions:
        for init, checkpoint in initialisations.items():
            for seed in seeds:
                run_dir = cfg.run_dir / "finetune" / f"{init}_fraction{fraction}_seed{seed}"
                tuned = finetune(
                    FinetuneConfig(
                        **{**shared, "seed": seed}, task="finetune", run_dir=run_dir, checkpoint=checkpoint,
                        backbone=scale.backbone, label_fraction=fraction, split=scale.split, crop_size=scale.crop_size,
                        trainer=finetune_trainer.model_copy(update={"seed": seed}),
                    )
                )
                scores = evaluate(
                    EvaluateConfig(**shared, task="evaluate", run_dir=run_dir / "evaluate", checkpoint=tuned["weights"])
                )
                rows.append({"init": init, "label_fraction": fraction, "seed": seed, "dice": scores["dice"],
                             "dice_per_class": scores["dice_per_class"], "best_step": tuned["best_step"],
                             "labelled_cases": tuned["labelled_cases"]})
    where = "phantoms" if cfg.data is None else cfg.data.name
    result = seed_table(rows, cfg.run_dir, metric="dice", series="init", group="label_fraction",
                        title=f"medssl {cfg.method}: mean test Dice (%), {where}")
    per_class = _per_class_table(rows, list(rows[0]["dice_per_class"]))
    result["markdown"] += f"\n\n**Per-class test Dice (%), mean ± std over seeds**\n\n{per_class}"
    (cfg.run_dir / "results.md").write_text(result["markdown"] + "\n")
    return result
