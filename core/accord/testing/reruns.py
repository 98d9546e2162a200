"""Check a task's reproducibility promise: same seed, same weights; killed then resumed, same weights.

Every plugin calls :func:`assert_reruns_are_bit_exact` on each of its training tasks with a tiny
config, so the promise in ``docs/training.md`` (bit-exact CPU reruns by default) is tested per
task rather than only on the core's toy model.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch

from accord.config import RunConfig
from accord.runs import run_task
from accord.training.checkpoint import list_checkpoints, load_checkpoint

__all__ = ["assert_reruns_are_bit_exact"]


def _final_weights(run_dir: Path) -> tuple[int, dict[str, torch.Tensor]]:
    step, path = list_checkpoints(run_dir / "checkpoints")[-1]
    return step, load_checkpoint(path)["model"]


def assert_reruns_are_bit_exact(make_config: Callable[[Path], RunConfig], workdir: Path) -> None:
    """Run a task three times and assert identical final weights.

    Run ``a`` and run ``b`` start fresh from the same config. Run ``c`` is then "killed" after its
    next-to-last checkpoint: its last checkpoint is deleted, as if the process had died just before
    writing it, and the same command is run again, which resumes from the checkpoint before.

    Args:
        make_config: ``make_config(run_dir)`` returns the task's config writing to ``run_dir``; it
            must checkpoint at least twice (``trainer.checkpoint_every`` at most half of
            ``trainer.max_steps``).
        workdir: an empty directory for the three runs.

    Raises:
        AssertionError: naming the first tensor that differs, or a run that did not checkpoint twice.
    """
    first_step, first = _run(make_config, workdir / "a")
    again_step, again = _run(make_config, workdir / "b")
    _assert_same(first, again, "two fresh runs with the same seed")

    _run(make_config, workdir / "c")
    checkpoints = list_checkpoints(workdir / "c" / "checkpoints")
    assert len(checkpoints) >= 2, f"{workdir / 'c'}: the run must write at least two checkpoints to test resuming"
    checkpoints[-1][1].unlink()
    resumed_step, resumed = _run(make_config, workdir / "c")
    assert first_step == again_step == resumed_step, (first_step, again_step, resumed_step)
    _assert_same(first, resumed, f"a fresh run and one resumed from step {checkpoints[-2][0]}")


def _run(make_config: Callable[[Path], RunConfig], run_dir: Path) -> tuple[int, dict[str, torch.Tensor]]:
    run_task(make_config(run_dir))
    return _final_weights(run_dir)


def _assert_same(expected: dict[str, torch.Tensor], actual: dict[str, torch.Tensor], what: str) -> None:
    assert expected.keys() == actual.keys(), f"{what}: different parameter names"
    for name, tensor in expected.items():
        assert torch.equal(tensor, actual[name]), f"{what}: {name} differs"
