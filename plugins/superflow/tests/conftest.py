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
def _one_intra_op_thread():
    """spconv's CPU loops slow down up to 30x with 2 OpenMP threads when other jobs share the cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


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
