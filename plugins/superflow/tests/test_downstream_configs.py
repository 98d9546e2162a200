"""The shipped downstream configs validate and say what the method spec says."""

from __future__ import annotations

import math
from pathlib import Path

from accord.config import load_config
from accord_superflow.evaluate import EvaluateConfig
from accord_superflow.finetune import FinetuneConfig

CONFIGS = Path(__file__).resolve().parents[3] / "configs" / "superflow"


def test_finetune_config_is_superflows_one_percent_protocol(_tiny_template):
    cfg = load_config(CONFIGS / "finetune.yaml", [f"data.root={_tiny_template}"])
    assert isinstance(cfg, FinetuneConfig) and cfg.task == "finetune" and not cfg.linear_probe
    assert cfg.data.label_fraction == 1 and cfg.data.validation_split == "val"
    assert cfg.model.backbone.bn_momentum == 0.02 and cfg.model.backbone.encoder_blocks == [2, 3, 4, 6]
    assert cfg.head_lr_mult == 10 and cfg.lovasz_weight == 2
    assert cfg.trainer.optimizer == "adamw" and cfg.trainer.lr == 1e-3 and cfg.trainer.weight_decay == 0.01
    assert cfg.data.augmentation.rotation_range == (-math.pi, math.pi)


def test_linear_probe_config_freezes_and_uses_every_scene(_tiny_template):
    cfg = load_config(CONFIGS / "linear_probe.yaml", [f"data.root={_tiny_template}"])
    assert isinstance(cfg, FinetuneConfig) and cfg.linear_probe and cfg.data.label_fraction == 100


def test_evaluate_config_checks_with_the_devkit_and_votes(_tiny_template, tmp_path):
    weights = tmp_path / "best.pt"
    weights.touch()
    cfg = load_config(CONFIGS / "evaluate.yaml", [f"data.root={_tiny_template}", f"checkpoint={weights}"])
    assert isinstance(cfg, EvaluateConfig) and cfg.data.split == "val" and cfg.devkit_check
    assert cfg.temporal_voting.neighbours == 1 and cfg.temporal_voting.voxel_size == 0.2
    cfg = load_config(CONFIGS / "evaluate.yaml", [f"data.root={_tiny_template}", f"checkpoint={weights}",
                                                  "temporal_voting=null"])
    assert cfg.temporal_voting is None
