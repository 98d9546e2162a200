"""Shared test setup: single-threaded torch keeps timings stable on small CI machines."""

from __future__ import annotations

import pytest
import torch

from accord.plugins import reset_host

torch.set_num_threads(max(1, min(2, torch.get_num_threads())))


@pytest.fixture(autouse=True)
def _fresh_plugin_host():
    """Each test discovers plugins anew, so environment changes in one test do not leak."""
    reset_host()
    yield
    reset_host()
