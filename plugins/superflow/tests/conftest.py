"""Shared synthetic nuScenes datasets: one realistic (session-wide, read-only) and one tiny per test."""

from __future__ import annotations

import shutil
from pathlib import Path

import matplotlib
import pytest
import torch

from accord_superflow.data import synth_nuscenes

matplotlib.use("Agg")

VERSION = "v1.0-mini"
# Two mini_train scenes (so an index holds a scene border) and one mini_val scene.
TINY_SCENES = ("scene-0061", "scene-0553", "scene-0103")


@pytest.fixture(autouse=True)
def _one_intra_op_thread(one_torch_thread):
    """spconv's CPU loops slow down up to 30x with 2 OpenMP threads when other jobs share the cores."""


@pytest.fixture(scope="session")
def nuscenes_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The default synthetic dataset (2 scenes x 4 keyframes, 20 Hz sweeps). Do not modify it."""
    return synth_nuscenes(tmp_path_factory.mktemp("nuscenes") / "data")


@pytest.fixture(scope="session")
def nusc(nuscenes_root: Path):
    from nuscenes import NuScenes

    return NuScenes(version=VERSION, dataroot=str(nuscenes_root), verbose=False)


@pytest.fixture(scope="session")
def _tiny_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return synth_nuscenes(tmp_path_factory.mktemp("tiny") / "data", scene_names=TINY_SCENES,
                          keyframes_per_scene=3, sweeps_between_keyframes=2, image_width=160,
                          lidar_azimuth_steps=180)


@pytest.fixture
def tiny_root(_tiny_template: Path, tmp_path: Path) -> Path:
    """A fresh copy of a very small synthetic dataset that the test may damage."""
    return Path(shutil.copytree(_tiny_template, tmp_path / "data"))


#: A small MinkUNet with every stage, for checkpoints that tests fine-tune from.
PRETRAIN_TINY_BACKBONE = {"base_channels": 4, "encoder_channels": [4, 4, 8, 8], "encoder_blocks": [1, 1, 1, 1],
                          "decoder_channels": [8, 8, 4, 4], "decoder_blocks": [1, 1, 1, 1]}


@pytest.fixture(scope="session")
def pretrain_one_step(_tiny_template: Path, tmp_path_factory: pytest.TempPathFactory):
    """``(backbone options, name) -> checkpoint path``: SuperFlow pretraining for one optimizer step
    on the tiny dataset (random 1-layer teacher, coarse voxels)."""
    from accord.config import TrainerConfig
    from accord.training import Trainer
    from accord_superflow.losses import SuperFlowLossConfig
    from accord_superflow.models import BackboneConfig, TeacherConfig
    from accord_superflow.pretrain import (
        PretrainDataConfig,
        SuperFlowModelConfig,
        SuperFlowPretrainDataset,
        build_superflow,
        collate_pretrain,
    )

    def pretrain(backbone: dict, name: str) -> Path:
        work = tmp_path_factory.mktemp(name)
        dataset = SuperFlowPretrainDataset(PretrainDataConfig(root=_tiny_template, version="v1.0-mini",
                                                              split="mini_train", image_size=(28, 56),
                                                              cache_dir=work / "index"))
        torch.manual_seed(0)
        model = build_superflow(SuperFlowModelConfig(backbone=BackboneConfig(**backbone),
                                                     teacher=TeacherConfig(random_width=16, random_layers=1),
                                                     embed_dim=8, voxel_size=(0.3, 3.0, 0.3)),
                                SuperFlowLossConfig(), dataset.groups_per_sample)
        result = Trainer(TrainerConfig(max_steps=1, batch_size=2, schedule="constant"), work / "run", seed=0).fit(
            model, dataset, collate_pretrain)
        return Path(result["checkpoint"])

    return pretrain


@pytest.fixture(scope="session")
def superflow_checkpoint(pretrain_one_step) -> dict:
    """``{"path", "backbone"}``: a SuperFlow pretraining checkpoint after one step and its backbone options."""
    return {"path": pretrain_one_step(PRETRAIN_TINY_BACKBONE, "pretrained"), "backbone": PRETRAIN_TINY_BACKBONE}
