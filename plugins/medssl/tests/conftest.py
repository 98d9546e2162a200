"""Shared fixtures: one tiny synthesized MSD dataset per session (48 x 48 x 32 voxels per case).

Tests run with ``--import-mode=importlib``, so test modules cannot import this file; the
dataset's parameters reach them through the ``phantom_spec`` fixture instead.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest

from accord.plugins import reset_host

from accord_medssl.data import synth


@dataclass(frozen=True)
class PhantomSpec:
    shape: tuple[int, int, int] = (48, 48, 32)
    spacing: tuple[float, float, float] = (1.5, 1.5, 2.0)
    num_train: int = 4
    num_test: int = 1


@pytest.fixture(scope="session")
def phantom_spec() -> PhantomSpec:
    return PhantomSpec()


@pytest.fixture(scope="session")
def msd_root(tmp_path_factory: pytest.TempPathFactory, phantom_spec: PhantomSpec) -> Path:
    """A shared MSD dataset of abdomen phantoms: copy it before modifying anything."""
    return synth(
        tmp_path_factory.mktemp("msd"),
        num_train=phantom_spec.num_train,
        num_test=phantom_spec.num_test,
        shape=phantom_spec.shape,
        spacing=phantom_spec.spacing,
    )


@pytest.fixture(scope="session")
def tiny_alice() -> dict:
    """``AliceOptions`` fields of the smallest Alice network (SwinUNETR feature size 12, 32-d heads)."""
    return {
        "backbone": {"feature_size": 12, "depths": (1, 1, 1, 1), "num_heads": (1, 2, 4, 8), "window_size": 4,
                     "norm_name": "batch"},
        "out_dim": 32,
        "head_hidden_dim": 32,
        "head_bottleneck_dim": 16,
        "casa_hidden_dim": 32,
        "casa_num_heads": 4,
    }


@pytest.fixture
def only_medssl(monkeypatch: pytest.MonkeyPatch):
    """Load medssl alone (other plugins of the checkout may be mid-installation) with a fresh host."""
    monkeypatch.setenv("ACCORD_LOAD_PLUGINS", "medssl")
    reset_host()
    yield
    reset_host()
