"""Pretraining samples, collate, the SuperFlow model, the pretrain task (config, CLI, resume)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from accord.config import ConfigError, load_config, validate_config
from accord_superflow.data import load_semantic_superpixels, pair_points_with_cameras, superpixel_dir, synth_nuscenes
from accord_superflow.pretrain import (
    CLOUD_FRAMES,
    AugmentationConfig,
    PretrainDataConfig,
    SuperFlowPretrainDataset,
    collate_pretrain,
    load_lidar_points,
)
from accord_superflow.tasks import PretrainConfig

CONFIG = Path(__file__).resolve().parents[3] / "configs" / "superflow" / "pretrain.yaml"
IMAGE_SIZE = (28, 56)
TINY_BACKBONE = {"base_channels": 8, "encoder_channels": [8, 8, 16, 16], "encoder_blocks": [1, 1, 1, 1],
                 "decoder_channels": [16, 16, 8, 8], "decoder_blocks": [1, 1, 1, 1]}
# Coarse voxels keep CPU sparse convolutions fast; the grid itself is tested in test_models.py.
COARSE_VOXELS = [0.2, 2.0, 0.2]




def _options(root: Path, cache: Path, **changes) -> PretrainDataConfig:
    return PretrainDataConfig(root=root, version="v1.0-mini", split="mini_train", image_size=IMAGE_SIZE,
                              cache_dir=cache, **changes)


@pytest.fixture(scope="module")
def sparse_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two scenes with very sparse scans (48 azimuth steps): for tests that run the model on the CPU."""
    return synth_nuscenes(tmp_path_factory.mktemp("sparse") / "data", scene_names=("scene-0061", "scene-0553"),
                          keyframes_per_scene=3, sweeps_between_keyframes=2, image_width=112,
                          lidar_azimuth_steps=48)


@pytest.fixture
def dataset(_tiny_template: Path, tmp_path: Path) -> SuperFlowPretrainDataset:
    return SuperFlowPretrainDataset(_options(_tiny_template, tmp_path / "index"))


def _sample(dataset: SuperFlowPretrainDataset, position: int, seed: int = 0):
    torch.manual_seed(seed)
    return dataset[position]


def test_neighbours_come_from_the_same_scene_and_repeat_at_scene_borders(dataset):
    keyframes = dataset.index.keyframes
    first_of_second_scene = next(k.index for k in keyframes if k.scene_name != keyframes[0].scene_name)
    for position in range(len(dataset)):
        sample = _sample(dataset, position)
        keyframe = keyframes[position]
        expected = [keyframe.index,
                    keyframe.prev_index if keyframe.prev_index is not None else keyframe.index,
                    keyframe.next_index if keyframe.next_index is not None else keyframe.index]
        for cloud, source in zip(sample.clouds[:3], expected):
            raw = load_lidar_points(dataset.root / keyframes[source].lidar.path)
            # Augmentation moves points but never reorders them or touches intensity.
            assert np.array_equal(cloud[:, 3], raw[:, 3])
            assert keyframes[source].scene_name == keyframe.scene_name
    assert keyframes[first_of_second_scene].prev_index is None


def test_dense_cloud_is_the_keyframe_plus_sweeps_in_the_keyframe_frame(dataset):
    keyframe = next(k for k in dataset.index.keyframes if len(k.sweeps) >= 2)
    sample = _sample(dataset, keyframe.index)
    raw = load_lidar_points(dataset.root / keyframe.lidar.path)
    sweeps = [load_lidar_points(dataset.root / s.path) for s in keyframe.sweeps[:2]]
    assert len(sample.clouds[3]) == len(raw) + sum(len(s) for s in sweeps)
    assert np.array_equal(sample.clouds[3][:, 3], np.concatenate([raw[:, 3], *(s[:, 3] for s in sweeps)]))


def test_point_augmentation_is_a_rigid_flip_rotation_and_scale(dataset):
    sample = _sample(dataset, 1)
    raw = load_lidar_points(dataset.root / dataset.index.keyframes[1].lidar.path)
    ratio_xy = np.linalg.norm(sample.clouds[0][:, :2], axis=1) / np.linalg.norm(raw[:, :2], axis=1)
    ratio_z = sample.clouds[0][:, 2] / raw[:, 2]
    scale = np.median(ratio_xy)
    assert 0.95 <= scale <= 1.05
    assert np.allclose(ratio_xy, scale, rtol=1e-4) and np.allclose(ratio_z, scale, rtol=1e-3)


def test_pairs_are_computed_before_augmentation_and_follow_the_images(_tiny_template, tmp_path):
    flipping = SuperFlowPretrainDataset(_options(_tiny_template, tmp_path / "a"))
    no_flip = SuperFlowPretrainDataset(_options(_tiny_template, tmp_path / "b",
                                                augmentation=AugmentationConfig(image_flip_probability=0.0)))
    flipped, straight = _sample(flipping, 1, seed=3), _sample(no_flip, 1, seed=3)
    assert flipped.cameras == straight.cameras
    keyframe = flipping.index.keyframes[1]
    cameras = [keyframe.cameras[c] for c in straight.cameras]
    raw = load_lidar_points(flipping.root / keyframe.lidar.path)
    expected = pair_points_with_cameras(raw, keyframe.lidar, cameras, min_depth=1.0, margin_px=0.0)
    assert np.array_equal(straight.pairs[0][:, 0], expected.point_index)
    assert np.array_equal(straight.pairs[0][:, 1], expected.camera_index)

    # The pair's superpixel after resizing agrees with the full-resolution map for most pairs
    # (nearest-neighbour resizing of 160x90 to 56x28 moves a few boundary pixels).
    full = [load_semantic_superpixels(superpixel_dir(flipping.root, "semantic") / f"{c.sample_data_token}.png")
            for c in cameras]
    rows, cols = expected.pixel_rc.T
    full_ids = np.array([full[k][r, c] for k, r, c in zip(expected.camera_index, rows, cols)])
    resized_ids = straight.superpixels[0][straight.pairs[0][:, 1], straight.pairs[0][:, 2], straight.pairs[0][:, 3]]
    assert np.mean(full_ids == resized_ids) > 0.9

    width = IMAGE_SIZE[1]
    for kind, frame in enumerate(CLOUD_FRAMES):
        a, b = flipped.pairs[kind], straight.pairs[kind]
        assert np.array_equal(a[:, :3], b[:, :3])
        mirrored = np.array([not np.array_equal(flipped.images[frame, k], straight.images[frame, k])
                             for k in range(len(flipped.cameras))])
        expected_col = np.where(mirrored[b[:, 1]], width - 1 - b[:, 3], b[:, 3])
        assert np.array_equal(a[:, 3], expected_col)
        # The superpixel under each pair is unchanged by the flip.
        assert np.array_equal(flipped.superpixels[frame][a[:, 1], a[:, 2], a[:, 3]],
                              straight.superpixels[frame][b[:, 1], b[:, 2], b[:, 3]])
    for frame in range(3):
        for k in range(len(flipped.cameras)):
            image, reference = flipped.images[frame, k], straight.images[frame, k]
            assert np.array_equal(image, reference) or np.array_equal(image, reference[:, ::-1])


def test_collate_numbers_clouds_images_and_pairs_globally(dataset):
    samples = [_sample(dataset, 0), _sample(dataset, 4, seed=1)]
    batch = collate_pretrain(samples)
    num_cameras = dataset.options.num_cameras
    assert batch["images"].shape == (3 * 2 * num_cameras, 3, *IMAGE_SIZE) and batch["images"].dtype == torch.uint8
    assert batch["superpixels"].shape == (3 * 2 * num_cameras, *IMAGE_SIZE)
    assert batch["cloud_kind"].tolist() == [0, 0, 1, 1, 2, 2, 3, 3]
    assert batch["cloud_sample"].tolist() == [0, 1] * 4
    pair_cloud = batch["point_cloud"][batch["pair_point"]]
    pair_kind = batch["cloud_kind"][pair_cloud]
    frames = torch.tensor(CLOUD_FRAMES)[pair_kind]
    assert torch.equal(batch["image_frame"][batch["pair_image"]], frames)
    assert torch.equal(batch["image_sample"][batch["pair_image"]], batch["cloud_sample"][pair_cloud])
    # Pair by pair, the collated tensors reproduce each sample's own pairs and pixels.
    for sample_number, sample in enumerate(samples):
        for kind in range(4):
            selected = (pair_kind == kind) & (batch["cloud_sample"][pair_cloud] == sample_number)
            own = sample.pairs[kind]
            first_point = int(torch.nonzero(batch["point_cloud"] == kind * 2 + sample_number)[0])
            assert torch.equal(batch["pair_point"][selected] - first_point, torch.from_numpy(own[:, 0]))
            assert torch.equal(batch["pair_pixel"][selected], torch.from_numpy(own[:, 2:]))
    assert batch["superpixels"].max() < dataset.groups_per_sample


def test_slic_superpixels_offset_ids_per_camera(_tiny_template, tmp_path):
    import shutil

    root = Path(shutil.copytree(_tiny_template, tmp_path / "data"))
    dataset = SuperFlowPretrainDataset(_options(root, tmp_path / "index", superpixels="slic", num_cameras=2))
    assert dataset.groups_per_sample == 2 * 150
    sample = _sample(dataset, 0)
    for slot in range(2):
        ids = sample.superpixels[:, slot]
        assert ids.min() >= slot * 150 and ids.max() < (slot + 1) * 150


def _config_data(root: Path, run_dir: Path, cache: Path, **trainer) -> dict:
    return {
        "plugin": "superflow", "task": "pretrain", "run_dir": str(run_dir),
        "data": {"root": str(root), "version": "v1.0-mini", "split": "mini_train", "image_size": list(IMAGE_SIZE),
                 "cache_dir": str(cache)},
        "model": {"backbone": TINY_BACKBONE, "teacher": {"random_width": 16, "random_heads": 2, "random_layers": 1},
                  "embed_dim": 16, "voxel_size": COARSE_VOXELS},
        "trainer": {"max_steps": 4, "batch_size": 2, "lr": 0.01, "weight_decay": 0.01, "warmup_steps": 1,
                    "checkpoint_every": 2, "log_every": 1, **trainer},
    }


def test_shipped_config_validates(_tiny_template, tmp_path):
    cfg = load_config(CONFIG, [f"data.root={_tiny_template}", "model.teacher.weights=null"])
    assert isinstance(cfg, PretrainConfig)
    assert cfg.loss.temperature == 0.07 and cfg.model.backbone.encoder_blocks == [2, 3, 4, 6]
    assert cfg.model.backbone.bn_momentum == 0.05 and cfg.data.num_cameras == 3 and cfg.data.num_sweeps == 2


def test_config_rejects_temporal_contrast_with_per_image_superpixels(_tiny_template, tmp_path):
    data = _config_data(_tiny_template, tmp_path, tmp_path)
    data["data"]["superpixels"] = "slic"
    with pytest.raises(ConfigError, match="temporal_weight"):
        validate_config(PretrainConfig, data, "test")
    data["loss"] = {"temporal_weight": 0}
    validate_config(PretrainConfig, data, "test")
    data["model"]["backbon"] = {}
    with pytest.raises(ConfigError, match="did you mean 'model.backbone'"):
        validate_config(PretrainConfig, data, "test")


def test_model_forward_returns_finite_losses_with_gradients(sparse_root, tmp_path):
    from accord_superflow.losses import SuperFlowLossConfig
    from accord_superflow.models import BackboneConfig, TeacherConfig
    from accord_superflow.pretrain import SuperFlowModelConfig, build_superflow

    dataset = SuperFlowPretrainDataset(_options(sparse_root, tmp_path / "index"))
    torch.manual_seed(0)
    config = SuperFlowModelConfig(backbone=BackboneConfig(**TINY_BACKBONE), teacher=TeacherConfig(random_width=16),
                                  embed_dim=16, voxel_size=COARSE_VOXELS)
    model = build_superflow(config, SuperFlowLossConfig(), dataset.groups_per_sample)
    batch = collate_pretrain([_sample(dataset, 1), _sample(dataset, 4)])
    model.train()
    terms = model(batch)
    assert set(terms) == {"loss", "spatial", "dense_to_sparse", "temporal"}
    assert all(torch.isfinite(v) for v in terms.values())
    terms["loss"].backward()
    assert model.backbone_3d.conv_input[0][0].weight.grad is not None
    assert model.head_2d.projection.head.layers[0].weight.grad is not None
    assert all(p.grad is None for p in model.teacher.parameters())
    assert not model.teacher.training
    assert [m.momentum for m in model.backbone_3d.modules() if isinstance(m, torch.nn.BatchNorm1d)][0] == 0.05


def test_pretrain_cli_trains_resumes_and_logs_all_terms(sparse_root, tmp_path):
    import yaml
    from typer.testing import CliRunner

    from accord.cli import app

    run_dir = tmp_path / "run"
    config = tmp_path / "pretrain.yaml"
    config.write_text(yaml.safe_dump(_config_data(sparse_root, run_dir, tmp_path / "index", max_steps=8)))
    runner = CliRunner()
    result = runner.invoke(app, ["run", str(config), "trainer.max_steps=4"])
    assert result.exit_code == 0, result.output
    # Resume from step 4 (spconv kernels reload through mmdet3d's layout-aware loader) to step 8.
    result = runner.invoke(app, ["run", str(config)])
    assert result.exit_code == 0, result.output
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "loss" in r]
    assert [r["step"] for r in steps] == list(range(1, 9))
    for record in steps:
        assert all(np.isfinite(record[k]) for k in ("loss", "spatial", "dense_to_sparse", "temporal"))
    losses = [r["loss"] for r in steps]
    assert np.mean(losses[-3:]) < np.mean(losses[:3]), losses
    assert (run_dir / "checkpoints" / "step_00000008.pt").is_file()


def test_pretrain_refuses_an_invalid_dataset(tiny_root, tmp_path):
    from accord_superflow.tasks import pretrain

    (tiny_root / "v1.0-mini" / "sample.json").unlink()
    cfg = validate_config(PretrainConfig, _config_data(tiny_root, tmp_path / "run", tmp_path / "index"), "test")
    with pytest.raises(ValueError, match="sample.json"):
        pretrain(cfg)


def test_pretrain_reruns_and_resumes_bit_exact(sparse_root, tmp_path):
    from accord.testing.reruns import assert_reruns_are_bit_exact

    assert_reruns_are_bit_exact(
        lambda run_dir: validate_config(PretrainConfig, _config_data(sparse_root, run_dir, tmp_path / "index"), "test"),
        tmp_path)
