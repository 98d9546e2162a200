"""Downstream segmentation: class mapping, loss, head learning rate, truly frozen linear probing, finetune task."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from accord.config import TrainerConfig, validate_config
from accord.training import Trainer
from accord.training.progress import read_metrics
from accord_superflow.data import load_info_index
from accord_superflow.data.schema import LIDARSEG_CLASSES
from accord_superflow.evaluate import EvaluateConfig, evaluate
from accord_superflow.finetune import FinetuneConfig, build_finetune_model, finetune
from accord_superflow.segmentation import (
    IGNORE_INDEX,
    LIDARSEG_TO_SEGMENTATION,
    SEGMENTATION_CLASSES,
    LidarSegDataset,
    SegmentationLoss,
    collate_scans,
    load_segmentation_labels,
)

TINY_BACKBONE = {"base_channels": 4, "encoder_channels": [4, 4, 8, 8], "encoder_blocks": [1, 1, 1, 1],
                 "decoder_channels": [8, 8, 4, 4], "decoder_blocks": [1, 1, 1, 1], "bn_momentum": 0.02}
COARSE_VOXELS = [0.3, 3.0, 0.3]


def finetune_config(root: Path, run_dir: Path, **changes) -> dict:
    """A tiny ``finetune`` config (dict) on the tiny synthetic dataset."""
    config = {
        "plugin": "superflow", "task": "finetune", "run_dir": str(run_dir),
        "data": {"root": str(root), "version": "v1.0-mini", "train_split": "mini_train",
                 "validation_split": "mini_val", "cache_dir": str(run_dir.parent / "index")},
        "model": {"backbone": TINY_BACKBONE, "voxel_size": COARSE_VOXELS},
        "trainer": {"max_steps": 4, "batch_size": 2, "lr": 0.01, "warmup_steps": 1, "validate_every": 2,
                    "checkpoint_every": 4, "log_every": 1},
    }
    for key, value in changes.items():
        section, _, field = key.rpartition(".")
        (config[section] if section else config)[field] = value
    return config


def test_label_mapping_is_the_devkit_challenge_mapping(_tiny_template):
    from nuscenes import NuScenes
    from nuscenes.eval.lidarseg.utils import LidarsegClassMapper

    mapper = LidarsegClassMapper(NuScenes(version="v1.0-mini", dataroot=str(_tiny_template), verbose=False))
    coarse_names = {index: name for name, index in mapper.coarse_name_2_coarse_idx_mapping.items()}
    # The devkit numbers the classes 1..16 with 0 = ignore; ours are 0..15 with 16 = ignore.
    assert [coarse_names[i + 1] for i in range(16)] == list(SEGMENTATION_CLASSES)
    for fine, name in enumerate(LIDARSEG_CLASSES):
        expected = mapper.fine_idx_2_coarse_idx_mapping[fine] - 1
        assert LIDARSEG_TO_SEGMENTATION[fine] == (IGNORE_INDEX if expected < 0 else expected), name


def test_labels_are_checked_against_the_scan(tmp_path):
    path = tmp_path / "x_lidarseg.bin"
    np.array([17, 24, 0, 9], dtype=np.uint8).tofile(path)
    assert load_segmentation_labels(path, 4).tolist() == [3, 10, IGNORE_INDEX, 0]
    with pytest.raises(ValueError, match="4 labels for a scan of 5 points"):
        load_segmentation_labels(path, 5)
    np.array([40], dtype=np.uint8).tofile(path)
    with pytest.raises(ValueError, match="lidarseg index 40"):
        load_segmentation_labels(path, 1)


def test_loss_is_cross_entropy_plus_twice_lovasz_over_labelled_voxels():
    from mmdet3d.models.losses import LovaszLoss

    torch.manual_seed(0)
    logits = torch.randn(30, 16, requires_grad=True)
    labels = torch.randint(0, 17, (30,))
    terms = SegmentationLoss(lovasz_weight=2.0)(logits, labels)
    keep = labels != IGNORE_INDEX
    lovasz = LovaszLoss(reduction="none")(logits[keep], labels[keep], ignore_index=None)
    assert torch.allclose(terms["ce"], F.cross_entropy(logits, labels, ignore_index=IGNORE_INDEX))
    assert torch.allclose(terms["loss"], terms["ce"] + 2 * lovasz)
    # One labelled voxel and none at all still give finite losses.
    one = torch.full((30,), IGNORE_INDEX)
    one[3] = 5
    assert torch.isfinite(SegmentationLoss()(logits, one)["loss"])
    empty = SegmentationLoss()(logits, torch.full((30,), IGNORE_INDEX))["loss"]
    assert empty.item() == 0
    empty.backward()


@pytest.mark.parametrize("linear_probe", [False, True])
def test_head_learns_head_lr_mult_times_faster_through_trainer_groups(_tiny_template, tmp_path, linear_probe):
    from accord.training.optim import parameter_groups

    cfg = validate_config(FinetuneConfig, finetune_config(_tiny_template, tmp_path / "run", head_lr_mult=10.0,
                                                          linear_probe=linear_probe), "test")
    model, _ = build_finetune_model(cfg)
    groups = parameter_groups(model, cfg.trainer)
    head = {id(p) for p in model.segmenter.head.parameters()}
    [fast] = [g for g in groups if g["lr"] == pytest.approx(10 * cfg.trainer.lr)]
    assert {id(p) for p in fast["params"]} == head
    slow = [p for g in groups if g is not fast for p in g["params"]]
    assert len(slow) == (0 if linear_probe else sum(1 for _ in model.segmenter.backbone.parameters()))


def _backbone_state(model) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.segmenter.backbone.state_dict().items()}


@pytest.mark.parametrize("linear_probe", [True, False])
def test_linear_probing_keeps_the_backbone_bit_identical(_tiny_template, tmp_path, linear_probe):
    cfg = validate_config(FinetuneConfig, finetune_config(_tiny_template, tmp_path / "run", linear_probe=linear_probe),
                          "test")
    index = load_info_index(_tiny_template, "v1.0-mini", "mini_train", max_sweeps=0, cache_dir=tmp_path / "index")
    torch.manual_seed(0)
    model, _ = build_finetune_model(cfg)
    backbone_before = _backbone_state(model)
    head_before = model.segmenter.head.weight.detach().clone()
    dataset = LidarSegDataset(_tiny_template, index, cfg.data.augmentation)
    Trainer(TrainerConfig(max_steps=3, batch_size=2, lr=0.01, schedule="constant", checkpoint_every=10),
            tmp_path / "run", seed=0).fit(model, dataset, collate_fn=collate_scans)
    after = _backbone_state(model)
    assert not torch.equal(model.segmenter.head.weight, head_before)
    running = [k for k in after if k.endswith(("running_mean", "running_var"))]
    assert running
    if linear_probe:
        assert all(torch.equal(backbone_before[k], after[k]) for k in after), "frozen backbone changed"
        assert not model.segmenter.backbone.training and model.segmenter.head.training
        assert all(not p.requires_grad for p in model.segmenter.backbone.parameters())
    else:  # the same run without freezing does move weights and BN statistics
        assert any(not torch.equal(backbone_before[k], after[k]) for k in running)
        assert any(not torch.equal(backbone_before[k], after[k]) for k in after if k.endswith("weight"))


def test_downstream_bn_momentum_and_pretrained_backbone(_tiny_template, tmp_path, superflow_checkpoint):
    from accord.training import load_checkpoint

    config = finetune_config(_tiny_template, tmp_path / "run", checkpoint=str(superflow_checkpoint["path"]))
    config["model"]["backbone"] = {**superflow_checkpoint["backbone"], "bn_momentum": 0.02}
    cfg = validate_config(FinetuneConfig, config, "test")
    model, initialisation = build_finetune_model(cfg)
    assert initialisation["initialisation"]["step"] == 1
    momenta = {m.momentum for m in model.segmenter.backbone.modules() if isinstance(m, torch.nn.BatchNorm1d)}
    assert momenta == {0.02}
    pretrained = load_checkpoint(superflow_checkpoint["path"])["model"]
    for key, value in model.segmenter.backbone.state_dict().items():
        assert torch.equal(value, pretrained["backbone_3d." + key]), key

    config["model"]["backbone"] = TINY_BACKBONE | {"base_channels": 8}
    with pytest.raises(ValueError, match="do not fit model.backbone"):
        build_finetune_model(validate_config(FinetuneConfig, config, "test"))


def test_finetune_task_validates_and_keeps_the_best_weights(_tiny_template, tmp_path):
    from typer.testing import CliRunner
    import yaml

    from accord.cli import app
    from accord_superflow.evaluate import load_segmenter

    run_dir = tmp_path / "run"
    config = tmp_path / "finetune.yaml"
    config.write_text(yaml.safe_dump(finetune_config(_tiny_template, run_dir)))
    result = CliRunner().invoke(app, ["run", str(config)])
    assert result.exit_code == 0, result.output
    validations = [r for r in read_metrics(run_dir / "metrics.jsonl") if "val/miou" in r]
    assert [v["step"] for v in validations] == [2, 4]
    assert all(0 <= v["val/miou"] <= 1 and 0 <= v["val/accuracy"] <= 1 for v in validations)
    segmenter, record = load_segmenter(run_dir / "best.pt")
    best = max(validations, key=lambda v: v["val/miou"])
    assert record["step"] == best["step"] and math.isclose(record["validation_miou"], best["val/miou"])
    assert record["validation_iou_per_class"]["car"] == best.get("val/iou/car")
    assert record["label_fraction"] == 100 and record["train_scenes"] == ["scene-0061", "scene-0553"]
    # The saved weights (spconv kernels included) reload into the same network: evaluate reproduces
    # the validation score of the kept step.
    scored = evaluate(validate_config(EvaluateConfig, {
        "plugin": "superflow", "run_dir": str(tmp_path / "eval"), "checkpoint": str(run_dir / "best.pt"),
        "data": {"root": str(_tiny_template), "version": "v1.0-mini", "split": "mini_val",
                 "cache_dir": str(tmp_path / "index")}}, "test"))
    assert scored["miou"] == pytest.approx(best["val/miou"], abs=1e-12)
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert all(np.isfinite(m["ce"]) and np.isfinite(m["lovasz"]) for m in metrics if "loss" in m)


def test_finetune_rejects_a_fraction_that_keeps_no_scene(_tiny_template, tmp_path):
    config = finetune_config(_tiny_template, tmp_path / "run", **{"data.label_fraction": 1})
    cfg = validate_config(FinetuneConfig, config, "test")
    with pytest.raises(ValueError, match="keeps none"):
        finetune(cfg)
    with pytest.raises(Exception, match="one of"):
        validate_config(FinetuneConfig, finetune_config(_tiny_template, tmp_path / "run", **{"data.label_fraction": 3}),
                        "test")


def test_finetune_reruns_and_resumes_bit_exact(_tiny_template, tmp_path):
    from accord.testing.reruns import assert_reruns_are_bit_exact

    def config(run_dir: Path) -> FinetuneConfig:
        return validate_config(FinetuneConfig, finetune_config(_tiny_template, run_dir, **{"trainer.checkpoint_every": 2,
                                                                                 "trainer.keep_last": 2}),
                               "test")

    assert_reruns_are_bit_exact(config, tmp_path)
