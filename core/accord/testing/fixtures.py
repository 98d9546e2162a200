"""pytest fixtures shared by the core's and every plugin's tests (loaded with ``-p accord.testing.fixtures``,
see ``[tool.pytest.ini_options]`` in the root ``pyproject.toml``).

Use one in a test module with ``pytestmark = pytest.mark.usefixtures("one_torch_thread")``, or by
naming it as a test's argument.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch


@pytest.fixture
def one_torch_thread() -> Iterator[None]:
    """Run the test with one intra-op thread, then restore the previous count.

    Tiny tensors gain nothing from a second thread, and on a 2-core machine shared with other jobs
    OpenMP's spinning threads make small convolutions and spconv's CPU loops up to 30x slower.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
