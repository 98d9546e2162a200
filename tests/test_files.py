"""Every output goes through accord.utils.files.write_atomically: atomic, O_EXCL temp files, never through a symlink."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import pytest

from accord.config import RunConfig, save_resolved
from accord.training.checkpoint import list_checkpoints, remove_temp_files
from accord.training.progress import plot_loss_curves
from accord.utils.files import write_atomically, write_text_atomically


def _plot(run_dir: Path) -> Path:
    metrics = run_dir / "metrics.jsonl"
    metrics.write_text("".join(json.dumps({"step": s, "loss": 1.0 / s, "time": 0}) + "\n" for s in (1, 2)))
    return plot_loss_curves(metrics, run_dir / "loss_curves.png")


WRITERS: dict[str, tuple[str, Callable[[Path], Path]]] = {
    "write_atomically": ("out.bin", lambda d: write_atomically(d / "out.bin", lambda h: h.write(b"new"))),
    "save_resolved": ("config.yaml", lambda d: save_resolved(RunConfig(plugin="core", task="pretrain", run_dir=d), d)),
    "loss-curve plot": ("loss_curves.png", _plot),
}


@pytest.mark.parametrize("writer", WRITERS, ids=list(WRITERS))
def test_a_symlink_at_the_destination_is_replaced_and_its_target_untouched(tmp_path: Path, writer: str) -> None:
    name, write = WRITERS[writer]
    run_dir, outside = tmp_path / "run", tmp_path / "outside.txt"
    run_dir.mkdir()
    outside.write_text("precious")
    (run_dir / name).symlink_to(outside)
    assert write(run_dir) == run_dir / name
    assert outside.read_text() == "precious"
    assert not (run_dir / name).is_symlink() and (run_dir / name).stat().st_size > 0
    assert sorted(p.name for p in run_dir.iterdir() if p.name.startswith(".")) == []  # no temp file left


def test_a_planted_predictable_temp_name_is_not_used(tmp_path: Path) -> None:
    outside = tmp_path / "outside.txt"
    outside.write_text("precious")
    for pid in range(1, 40000, 997):  # the names the old writer would have opened
        (tmp_path / f".out.txt.{pid}.tmp").symlink_to(outside)
    write_text_atomically(tmp_path / "out.txt", "new")
    assert (tmp_path / "out.txt").read_text() == "new" and outside.read_text() == "precious"


def test_a_failed_write_leaves_the_old_file_and_no_temp_file(tmp_path: Path) -> None:
    write_text_atomically(tmp_path / "out.txt", "old")

    def fail(handle) -> None:
        handle.write(b"half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        write_atomically(tmp_path / "out.txt", fail)
    assert [p.name for p in tmp_path.iterdir()] == ["out.txt"] and (tmp_path / "out.txt").read_text() == "old"


def test_temp_files_never_look_like_checkpoints_and_are_removed(tmp_path: Path) -> None:
    seen: list[str] = []

    def peek(handle) -> None:
        seen.extend(p.name for p in tmp_path.iterdir())
        handle.write(b"x")
        raise KeyboardInterrupt  # a writer killed mid-write

    with pytest.raises(KeyboardInterrupt):
        write_atomically(tmp_path / "step_00000001.pt", peek)
    [temp] = seen
    assert temp.startswith(".step_00000001.pt.") and temp.endswith(".tmp")
    leftover = tmp_path / temp
    leftover.write_bytes(b"torn")  # what SIGKILL would leave
    assert list_checkpoints(tmp_path) == []
    remove_temp_files(tmp_path)
    assert not leftover.exists()


def test_an_existing_directory_at_the_destination_is_an_oserror(tmp_path: Path) -> None:
    (tmp_path / "out").mkdir()
    with pytest.raises(OSError):
        write_text_atomically(tmp_path / "out", "x")
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
