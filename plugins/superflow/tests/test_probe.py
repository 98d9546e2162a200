"""The online probe of SuperFlow pretraining: its labelled points, the features it reads, a run that logs it."""

from __future__ import annotations

import json

import pytest
import torch

from accord.config import validate_config
from accord_superflow.probe import PointProbeSet, backbone_point_features, point_probe
from accord_superflow.segmentation import IGNORE_INDEX
from accord_superflow.tasks import PretrainConfig, pretrain

TINY_BACKBONE = {"base_channels": 4, "encoder_channels": [4, 4, 8, 8], "encoder_blocks": [1, 1, 1, 1],
                 "decoder_channels": [8, 8, 4, 4], "decoder_blocks": [1, 1, 1, 1]}


def _config(root, tmp_path, **probe) -> PretrainConfig:
    return validate_config(PretrainConfig, {
        "plugin": "superflow", "task": "pretrain", "run_dir": str(tmp_path / "run"),
        "data": {"root": str(root), "version": "v1.0-mini", "split": "mini_train", "image_size": [28, 56],
                 "cache_dir": str(tmp_path / "index")},
        "model": {"backbone": TINY_BACKBONE, "teacher": {"random_width": 16, "random_layers": 1}, "embed_dim": 8,
                  "voxel_size": [0.3, 3.0, 0.3]},
        "trainer": {"max_steps": 2, "batch_size": 2, "schedule": "constant", "checkpoint_every": 2},
        "probe": {"every": 1, "keyframes": 3, "points_per_keyframe": 200, **probe},
    }, "test")


def test_the_probe_set_samples_labelled_points_of_both_splits_once(_tiny_template, tmp_path):
    cfg = _config(_tiny_template, tmp_path)
    probe_set = PointProbeSet(cfg)
    # mini_train holds two scenes of three keyframes, mini_val one: three evenly spaced keyframes each.
    assert [len(probe_set.scans[part]) for part in ("train", "test")] == [3, 3]
    for points, sampled, labels in probe_set.scans["train"]:
        assert len(sampled) == len(labels) <= 200 and bool((labels != IGNORE_INDEX).all())
        assert sampled.max() < len(points)
    again = PointProbeSet(cfg)
    assert all(torch.equal(a[1], b[1]) for a, b in zip(probe_set.scans["test"], again.scans["test"]))
    with pytest.raises(ValueError, match="split 'no_such_split' is not a v1.0-mini split"):
        PointProbeSet(_config(_tiny_template, tmp_path, test_split="no_such_split"))


def test_extract_gives_the_backbone_features_of_the_sampled_points(_tiny_template, tmp_path):
    from accord_superflow.pretrain import superflow_model

    cfg = _config(_tiny_template, tmp_path)
    torch.manual_seed(0)
    model = superflow_model(cfg, groups_per_sample=20).eval()
    probe = point_probe(cfg)
    probe_set = PointProbeSet(cfg)
    data = probe_set.extract(model)
    assert data.train_features.shape[1] == TINY_BACKBONE["decoder_channels"][-1]
    points, sampled, labels = probe_set.scans["test"][0]
    with torch.no_grad():
        expected = backbone_point_features(model, points)[sampled]
    torch.testing.assert_close(data.test_features[: len(sampled)], expected)
    keyframe_labels = data.test_labels[: len(sampled)]
    assert torch.equal(keyframe_labels, labels)
    metrics = probe.probe(model)
    assert 0 <= metrics["probe/miou"] <= 1 and "probe/iou/car" in metrics


def test_backbone_features_are_per_voxel(_tiny_template, tmp_path):
    from accord_superflow.pretrain import superflow_model

    cfg = _config(_tiny_template, tmp_path)
    model = superflow_model(cfg, groups_per_sample=20).eval()
    points = PointProbeSet(cfg).scans["train"][0][0]
    duplicated = torch.cat([points, points[:1]])  # a second point in the first point's voxel
    with torch.no_grad():
        features = backbone_point_features(model, duplicated)
    torch.testing.assert_close(features[-1], features[0])


def test_pretraining_with_a_probe_logs_its_curve(_tiny_template, tmp_path):
    cfg = _config(_tiny_template, tmp_path, every=2)
    pretrain(cfg)
    records = [json.loads(line) for line in (cfg.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [record["step"] for record in records if "probe/miou" in record] == [0, 2]
