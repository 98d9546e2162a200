"""Shared synthetic DIOR-R / DOTA sample data: one session-wide (read-only) and fresh copies to damage."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from accord_mutdet.data import synth_mutdet


@pytest.fixture(scope="session")
def synth_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``accord data synth mutdet`` output, small: 3 train, 1 val, 1 test canvases of 160 px. Do not modify."""
    return synth_mutdet(tmp_path_factory.mktemp("mutdet") / "data", num_train=3, num_val=1, num_test=1, size=160,
                        min_objects=3, max_objects=6, seed=0)


@pytest.fixture
def synth_copy(synth_root: Path, tmp_path: Path) -> Path:
    """A fresh copy of the sample data that the test may damage."""
    return Path(shutil.copytree(synth_root, tmp_path / "data"))


@pytest.fixture(autouse=True)
def _one_intra_op_thread(one_torch_thread):
    """A tiny DETR step runs about 12x faster on one thread than on two on a shared 2-core box."""
