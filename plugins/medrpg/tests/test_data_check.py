"""``accord data check medrpg``: one Problem per defect naming the row; training refuses with the same lines."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from accord.cli import app

from accord_medrpg.data import DataError, GroundingDataset, check, load_records, require_valid


def _records(directory: Path, split: str) -> list[dict]:
    return [json.loads(line) for line in (directory / f"{split}.jsonl").read_text().splitlines()]


def _write(directory: Path, split: str, records: list[dict]) -> None:
    (directory / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))


@pytest.fixture
def converted(grounding_dir: Path, tmp_path: Path) -> Path:
    return shutil.copytree(grounding_dir, tmp_path / "converted")


def test_valid_data_has_no_problem(mscxr_root: Path, grounding_dir: Path) -> None:
    assert check(mscxr_root) == []
    assert check(grounding_dir) == []
    assert set(require_valid(grounding_dir)) == {"train", "val", "test"}


BREAKAGES = {
    "missing image": (lambda r, d: r.update(image=str(d / "gone.png")), "gone.png: image file not found"),
    "zero size": (lambda r, d: r.update(box=[1, 1, 0, 5]), "has zero or negative size"),
    "outside": (lambda r, d: r.update(box=[r["image_width"] - 5, 0, 20, 5]), "lies outside the"),
    "not a box": (lambda r, d: r.update(box=[1, 2, 3]), "box must be 4 finite numbers"),
    "empty phrase": (lambda r, d: r.update(phrase="  "), "empty phrase"),
    "unknown category": (lambda r, d: r.update(category="Fracture"), "unknown category 'Fracture'"),
    "missing field": (lambda r, d: r.pop("dicom_id"), "field 'dicom_id' must be a str, got None"),
    "wrong aspect": (lambda r, d: r.update(image_width=r["image_width"] * 2, box=[0, 0, 4, 4]),
                     "a resized copy must keep the aspect ratio"),
}


@pytest.mark.parametrize("name", list(BREAKAGES))
def test_each_defect_is_one_problem_naming_the_row(converted: Path, name: str) -> None:
    records = _records(converted, "train")
    break_record, message = BREAKAGES[name]
    break_record(records[1], converted)
    _write(converted, "train", records)
    problems = check(converted)
    assert len(problems) == 1, problems
    assert problems[0].path == f"{converted / 'train.jsonl'}:2"
    assert message in problems[0].message
    # Training refuses with the same line.
    with pytest.raises(DataError) as error:
        GroundingDataset(converted / "train.jsonl", image_size=64, train=True)
    assert error.value.lines[1:] == [str(problems[0])]


def test_duplicate_ids_and_split_leaks(converted: Path) -> None:
    train, test = _records(converted, "train"), _records(converted, "test")
    train[2]["id"] = train[0]["id"]
    leaked = dict(train[0], id="leaked", split="test")
    _write(converted, "train", train)
    _write(converted, "test", test + [leaked])
    problems = [str(p) for p in check(converted)]
    assert problems == [
        f"{converted / 'train.jsonl'}:3: [{train[0]['id']}] duplicate id, first used at {converted / 'train.jsonl'}:1",
        f"{converted / 'train.jsonl'}:1: image {train[0]['dicom_id']!r} leaks into several splits: "
        f"train ({converted / 'train.jsonl'}:1), test ({converted / 'test.jsonl'}:{len(test) + 1}); "
        "an image (and all its phrases) must belong to one split",
    ]
    with pytest.raises(DataError) as error:
        require_valid(converted)
    assert error.value.lines[1:] == problems


def test_unreadable_image_found_by_check_and_by_decoding_loader(converted: Path) -> None:
    records = _records(converted, "val")
    broken = converted / "broken.jpg"
    broken.write_bytes(b"\xff\xd8\xff" + b"\0" * 50)  # a JPEG start, then garbage
    records[0]["image"] = "broken.jpg"  # relative to the JSONL's directory
    _write(converted, "val", records)
    problems = check(converted)
    assert len(problems) == 1 and "broken.jpg: unreadable image" in problems[0].message
    with pytest.raises(DataError, match="broken.jpg: unreadable image"):
        load_records(converted / "val.jsonl", decode_images=True)


def test_malformed_lines_and_misplaced_split(converted: Path) -> None:
    records = _records(converted, "val")
    text = "not json\n" + json.dumps([1, 2]) + "\n" + json.dumps(dict(records[0], split="train")) + "\n"
    (converted / "val.jsonl").write_text(text)
    messages = [p.message for p in check(converted)]
    assert messages[0].startswith("not valid JSON")
    assert messages[1] == "expected a JSON object, got list"
    assert messages[2] == "record of split 'train' in the val split file"


def test_csv_root_problems_name_csv_rows(mscxr_root: Path, tmp_path: Path) -> None:
    root = shutil.copytree(mscxr_root, tmp_path / "root")
    csv_path = root / "MS_CXR_Local_Alignment_v1.0.0.csv"
    lines = csv_path.read_text().splitlines()
    first = lines[1].split(",")
    (root / first[3]).unlink()
    problems = check(root)
    assert problems and all(p.path.startswith(f"{csv_path}:") for p in problems)
    assert any(p.path == f"{csv_path}:2" and "image file not found" in p.message for p in problems)


def test_cli_check_exit_codes(converted: Path, monkeypatch) -> None:
    records = _records(converted, "train")
    records[0]["phrase"] = ""
    _write(converted, "train", records)
    monkeypatch.setenv("ACCORD_LOAD_PLUGINS", "medrpg")
    run = CliRunner().invoke(app, ["data", "check", "medrpg", str(converted)])
    assert run.exit_code == 1
    assert run.stdout.splitlines() == [f"{converted / 'train.jsonl'}:1: [{records[0]['id']}] empty phrase"]


def test_csv_root_with_a_separate_image_root(mscxr_root: Path, tmp_path: Path) -> None:
    root = shutil.copytree(mscxr_root, tmp_path / "root", ignore=shutil.ignore_patterns("files"))
    shutil.copytree(mscxr_root / "files", tmp_path / "mimic" / "files")
    assert check(root) and all("image file not found" in p.message for p in check(root))
    assert check(root, images=tmp_path / "mimic") == []
