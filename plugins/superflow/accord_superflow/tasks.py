"""Runnable tasks of the ``superflow`` plugin and their configs.

Registered (``accord run CONFIG`` with ``plugin: superflow``; configs under ``configs/superflow/``):

* ``pretrain``: SuperFlow pretraining of MinkUNet-34 on nuScenes (:func:`pretrain`);
* ``finetune``: LiDAR segmentation on the 16 nuScenes-lidarseg classes from the ``backbone_3d.*``
  weights of a pretraining checkpoint (or random init), SLidR label fractions, and linear probing
  with ``linear_probe: true`` (:mod:`accord_superflow.finetune`);
* ``evaluate``: point per-class IoU / mIoU of fine-tuned weights by mmdet3d's ``seg_eval``, the
  devkit's ``LidarSegEval`` as a check, optional SuperFlow++-style temporal voting
  (:mod:`accord_superflow.evaluate`, :mod:`accord_superflow.voting`).

The ``lidarseg`` benchmark (``accord benchmark superflow [--quick] [--data DIR]``,
:mod:`accord_superflow.downstream_benchmark`) chains these tasks: pretraining, then linear probing
and low-label fine-tuning from SuperFlow vs random init over seeds.

To add a task, write ``run(config) -> dict`` with a :class:`accord.config.RunConfig` subclass (a
``trainer: TrainerConfig`` section for training) and add one ``register(...)`` line to
``register_tasks`` in :mod:`accord_superflow.plugin`. The ``mmdet3d`` exporter and
``configs/superflow/minkunet34_seg.py`` give the mmdet3d segmentor route for pretrained weights.
"""

from __future__ import annotations

import logging
from typing import Any

from pydantic import Field, model_validator

from accord.config import RunConfig, TrainerConfig
from accord_superflow.evaluate import EvaluateConfig, evaluate
from accord_superflow.finetune import FinetuneConfig, finetune
from accord_superflow.losses import SuperFlowLossConfig
from accord_superflow.pretrain import PretrainDataConfig, SuperFlowModelConfig
from accord_superflow.probe import PointProbeOptions, point_probe

__all__ = ["EvaluateConfig", "FinetuneConfig", "PretrainConfig", "evaluate", "finetune", "pretrain"]

log = logging.getLogger(__name__)

# SuperFlow: AdamW(lr 0.01, wd 0.01), batch 4 per GPU, OneCycle(pct_start 0.2, div 25, final_div 100).
# accord's schedule is warm-up + cosine; 20 % warm-up and min_lr = lr / 2500 follow the OneCycle shape.
_PRETRAIN_TRAINER = TrainerConfig(max_steps=1000, batch_size=4, lr=0.01, weight_decay=0.01, warmup_steps=200,
                                  min_lr=4e-6, checkpoint_every=500)


class PretrainConfig(RunConfig):
    """``task: pretrain``: data, networks, loss terms and the trainer."""

    data: PretrainDataConfig
    model: SuperFlowModelConfig = SuperFlowModelConfig()
    loss: SuperFlowLossConfig = SuperFlowLossConfig()
    probe: PointProbeOptions | None = Field(None, description="online probe: mIoU of a linear point classifier on "
                                                              "the frozen backbone, every probe.every steps (None: off)")
    trainer: TrainerConfig = _PRETRAIN_TRAINER

    @model_validator(mode="after")
    def _temporal_term_needs_view_consistent_superpixels(self) -> PretrainConfig:
        if self.data.superpixels == "slic" and self.loss.temporal_weight:
            raise ValueError("loss.temporal_weight: SLIC ids are per image, so the same id means nothing across "
                             "frames; set it to 0 or use data.superpixels: semantic")
        return self


def pretrain(cfg: PretrainConfig) -> dict[str, Any]:
    """Validate the dataset, build the model and run the Trainer.

    Returns:
        The Trainer's last metrics record (``loss``, ``spatial``, ``dense_to_sparse``,
        ``temporal``, ...) and ``checkpoint``.

    Raises:
        ValueError: the dataset check fails (every problem listed), or the image size is not a
            multiple of the teacher's patch size.
    """
    from accord.training import Trainer
    from accord_superflow.data import generate_slic_superpixels, require_valid
    from accord_superflow.pretrain import SuperFlowPretrainDataset, build_superflow, collate_pretrain

    require_valid(cfg.data.root, version=cfg.data.version, splits=[cfg.data.split])
    dataset = SuperFlowPretrainDataset(cfg.data)
    if cfg.data.superpixels == "slic":
        # Computed once up front, so DataLoader workers only read the cache.
        generate_slic_superpixels(cfg.data.root, dataset.index)
    model = build_superflow(cfg.model, cfg.loss, dataset.groups_per_sample)
    patch = model.teacher.patch_size
    if any(side % patch for side in cfg.data.image_size):
        raise ValueError(f"data.image_size {tuple(cfg.data.image_size)}: both sides must be multiples of the "
                         f"teacher's patch size {patch}")
    log.info("SuperFlow pretraining on %d keyframes of %s/%s", len(dataset), cfg.data.version, cfg.data.split)
    trainer = Trainer.for_run(cfg, model_factory="superflow.superflow",
                              model_options={"groups_per_sample": dataset.groups_per_sample},
                              callbacks=[] if cfg.probe is None else [point_probe(cfg)])
    return trainer.fit(model, dataset, collate_pretrain)

