"""The medssl tasks: ``pretrain`` (anatomy embedding or Alice), ``finetune``, ``evaluate``.

Alice runs in two pretraining stages, each an ``accord run`` of the ``pretrain`` task:

1. ``method: anatomy_embedding`` trains the small SAM-style embedding network that replaces the
   external SAM (two augmented crops of one volume, dense InfoNCE on the global and local maps);
2. ``method: alice`` mines anatomy-matched crop pairs of two different volumes with that network
   (``mining.anatomy_checkpoint``) or with precomputed embeddings (``mining.embeddings``) and trains
   the Alice student-teacher on them.

``finetune`` and ``evaluate`` (:mod:`accord_medssl.finetune`) then measure what the pretrained
SwinUNETR is worth for segmentation; the ``segmentation`` benchmark (:mod:`accord_medssl.benchmarks`)
runs the whole chain against random initialisation over label fractions and seeds.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

import torch
from pydantic import Field, model_validator
from torch import nn
from torch.utils.data import Dataset

from accord.config import ParameterFreeze, TrainerConfig
from accord.training import Trainer
from accord_medssl.alice import AliceModel, AliceOptions
from accord_medssl.anatomy import AnatomyEmbeddingPretraining, AnatomyPretrainingOptions
from accord_medssl.anatomy.model import GLOBAL_STRIDE
from accord_medssl.data import require_valid
from accord_medssl.finetune import EvaluateConfig, FinetuneConfig, evaluate, finetune
from accord_medssl.models.swin_unetr import SIZE_MULTIPLE
from accord_medssl.probe import VoxelProbeOptions, voxel_probe
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
    "PretrainConfig",
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
        "alice", description="anatomy_embedding: the SAM replacement Alice mines with; alice: Alice itself "
        "(gemini: a config with task pretrain and method gemini runs the gemini_pretrain task)"
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
    probe: VoxelProbeOptions | None = Field(
        None, description="online probe: Dice of a linear voxel classifier on the frozen features of labelled cases, "
        "every probe.every steps (None: off)"
    )
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


def pretraining_model(cfg: PretrainConfig) -> nn.Module:
    """Model factories ``medssl.alice`` / ``medssl.anatomy_embedding``: the trainer-contract model
    of ``cfg.method`` (architecture only)."""
    if cfg.method == "anatomy_embedding":
        return AnatomyEmbeddingPretraining(cfg.anatomy_embedding)
    return AlicePretraining(cfg.alice)


def build_pretraining(cfg: PretrainConfig) -> tuple[nn.Module, Dataset]:
    """The trainer-contract model and the view dataset of ``cfg.method``.

    The dataset is checked first (:func:`~accord_medssl.data.require_valid`); model weights are
    initialised from the global generator, which :func:`accord.runs.run_task` seeded from ``cfg.seed``.

    Raises:
        ValueError: an invalid dataset (every problem the check finds), or a missing embedding source.
    """
    miner = build_miner(cfg.mining, cfg.crop_size) if cfg.method == "alice" else None
    require_valid(cfg.data)
    items = pretraining_items(cfg.data)
    volumes = cfg.volumes(items, cfg.spacing)
    if cfg.method == "anatomy_embedding":
        return pretraining_model(cfg), AnatomyViewPairs(volumes, cfg.crop_size, cfg.views)
    keys = [volume_key(item["image"], cfg.data) for item in items]
    return pretraining_model(cfg), AliceViewPairs(volumes, keys, miner)


def pretrain(cfg: PretrainConfig) -> dict[str, Any]:
    """Train one pretraining stage with the core trainer.

    Its checkpoints hold the resolved config (``Trainer.for_run``): later stages, ``finetune`` and
    ``accord export`` read the architecture from the checkpoint itself. With ``probe`` set, the
    online probe (:mod:`accord_medssl.probe`) logs ``probe/dice`` and per-organ Dice as it trains.

    Returns:
        The trainer's result: the last metrics record and ``checkpoint``.
    """
    model, dataset = build_pretraining(cfg)
    callbacks = [] if cfg.probe is None else [voxel_probe(cfg)]
    return Trainer.for_run(cfg, model_factory=f"medssl.{cfg.method}", callbacks=callbacks).fit(model, dataset)
