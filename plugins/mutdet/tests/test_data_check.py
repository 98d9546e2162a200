"""``accord data check mutdet``: one problem per issue with file and line; training refuses the same."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from accord.cli import app
from accord_mutdet.data import AnnotationError, check_dataset, load_checked

BAD_LINES = {
    "1 2 3 plane": "malformed DOTA line: expected 10 fields",
    "a 0 10 0 10 10 0 10 plane 0": "the first 8 fields must be numbers",
    "0 0 10 0 10 10 0 10 plane x": "difficult must be 0, 1 or 2",
    "0 0 10 0 10 10 0 10 spaceship 0": "unknown class 'spaceship'",
    "5 5 5 5 5 5 5 5 ship 0": "degenerate polygon",
    "0 0 10 10 10 0 0 10 ship 0": "self-intersecting polygon",
    "500 500 540 500 540 520 500 520 ship 0": "box outside the image",
}


def test_sample_data_is_clean(synth_root: Path):
    assert check_dataset(synth_root) == []
    assert check_dataset(synth_root / "DIOR-R") == [] and check_dataset(synth_root / "DOTA") == []


def test_every_problem_reported_once_with_file_and_line(synth_copy: Path):
    dota = synth_copy / "DOTA" / "train"
    label = sorted((dota / "labelTxt").glob("*.txt"))[0]
    first_new_line = len(label.read_text().splitlines()) + 1
    label.write_text(label.read_text() + "\n".join(BAD_LINES) + "\n")
    images = sorted((dota / "images").glob("*.png"))
    images[1].write_bytes(b"not a png")
    (dota / "labelTxt" / f"{images[2].stem}.txt").unlink()
    (dota / "labelTxt" / "P9999.txt").write_text("")
    dior = synth_copy / "DIOR-R"
    xml = sorted((dior / "Annotations" / "Oriented Bounding Boxes").glob("*.xml"))
    xml[0].unlink()
    xml[1].write_text(xml[1].read_text().replace("<name>", "<name>x", 1))

    problems = [str(p) for p in check_dataset(synth_copy)]
    for offset, expected in enumerate(BAD_LINES.values()):
        hits = [p for p in problems if f"{label}:{first_new_line + offset}:" in p]
        assert len(hits) == 1 and expected in hits[0], (expected, hits)
    assert sum("unreadable image" in p and images[1].name in p for p in problems) == 1
    assert sum("missing annotation file" in p for p in problems) == 2  # one DOTA, one DIOR-R
    assert sum("label file without image" in p and "P9999" in p for p in problems) == 1
    assert sum(f"{xml[1]}:" in p and "unknown class 'x" in p for p in problems) == 1
    assert len(problems) == len(BAD_LINES) + 5

    result = CliRunner().invoke(app, ["data", "check", "mutdet", str(synth_copy)])
    assert result.exit_code == 1
    assert sum(1 for line in result.output.splitlines() if str(synth_copy) in line) >= len(problems)

    with pytest.raises(AnnotationError) as error:  # training refuses with the same messages
        load_checked(synth_copy / "DOTA", "train")
    assert set(error.value.lines) == {p for p in problems if str(dota) in p}


def test_load_checked_reads_a_clean_split(synth_root: Path):
    records = load_checked(synth_root / "DIOR-R", "test")
    assert len(records) == 1 and records[0].boxes.shape[1] == 5


def test_unknown_dota_version_is_one_error_line(synth_root: Path):
    result = CliRunner().invoke(app, ["data", "check", "mutdet", str(synth_root / "DOTA"), "version=2.0"])
    assert result.exit_code == 2 and "DOTA version: expected one of 1.0, 1.5, got '2.0'" in result.output


def test_not_a_dataset(tmp_path: Path):
    (problem,) = check_dataset(tmp_path)
    assert "no DIOR-R root" in str(problem)
    with pytest.raises(FileNotFoundError, match="neither a DIOR-R root"):
        load_checked(tmp_path, "train")
