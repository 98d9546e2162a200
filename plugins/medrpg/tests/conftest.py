"""Shared fixtures: one tiny synthetic MS-CXR root and its converted JSONL directory per session.

Both are read-only for tests: copy them (``shutil.copytree``) before changing anything.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from accord.plugins import reset_host

from accord_medrpg.data import convert, synth

#: 12 radiographs of 128 pixels: every finding kind, every format (JPEG, PNG, DICOM) and all splits.
TINY = {"num_images": 12, "image_size": 128, "seed": 0}


@pytest.fixture(scope="session")
def mscxr_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A synthetic MS-CXR root: annotation CSV, MIMIC-layout images, reference split files."""
    return synth(tmp_path_factory.mktemp("mscxr"), **TINY)


@pytest.fixture(scope="session")
def grounding_dir(mscxr_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``mscxr_root`` converted: train.jsonl, val.jsonl, test.jsonl."""
    out = tmp_path_factory.mktemp("grounding")
    convert(mscxr_root, out)
    return out


@pytest.fixture(autouse=True)
def _fresh_plugin_host():
    """Each test discovers plugins anew, so environment changes in one test do not leak."""
    reset_host()
    yield
    reset_host()
