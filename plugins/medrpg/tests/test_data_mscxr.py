"""MS-CXR layout: the synthetic root's exact format, reading it, split files, conversion to JSONL."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import pytest
import torch

from accord_medrpg.data import CATEGORIES, DataError, convert, read_mscxr, read_reference_split, synth
from accord_medrpg.data.mscxr import CSV_COLUMNS


def _csv_rows(root: Path) -> list[dict]:
    with (root / "MS_CXR_Local_Alignment_v1.0.0.csv").open(newline="") as handle:
        return list(csv.DictReader(handle))


def _write_csv(root: Path, rows: list[dict], columns=CSV_COLUMNS) -> None:
    with (root / "MS_CXR_Local_Alignment_v1.0.0.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(columns))
        writer.writeheader()
        writer.writerows(rows)


def test_synth_writes_the_mscxr_layout(mscxr_root: Path) -> None:
    with (mscxr_root / "MS_CXR_Local_Alignment_v1.0.0.csv").open() as handle:
        assert handle.readline().strip() == ",".join(CSV_COLUMNS)
    rows = _csv_rows(mscxr_root)
    assert len(rows) >= 12 and {r["category_name"] for r in rows} <= set(CATEGORIES)
    assert {Path(r["path"]).suffix for r in rows} == {".jpg", ".png", ".dcm"}
    for row in rows:
        assert row["path"].startswith("files/p1") and Path(row["path"]).stem == row["dicom_id"]
        assert (mscxr_root / row["path"]).is_file()
        x, y, w, h, width, height = (int(row[k]) for k in ("x", "y", "w", "h", "image_width", "image_height"))
        assert w > 0 and h > 0 and x >= 0 and y >= 0 and x + w <= width and y + h <= height
    # The reference split files: torch.save'd lists of 8-tuples, loadable with weights_only=True.
    listed = []
    for split in ("train", "val", "test"):
        entries = torch.load(mscxr_root / f"MS_CXR_{split}.pth", weights_only=True)
        assert entries and all(isinstance(e, tuple) and len(e) == 8 for e in entries)
        anno_id, image_id, category_id, img_file, bbox, _, _, phrase = entries[0]
        assert isinstance(anno_id, int) and isinstance(image_id, int) and 1 <= category_id <= 8
        assert isinstance(img_file, str) and isinstance(phrase, str)
        assert len(bbox) == 4 and all(isinstance(v, int) and 0 <= v <= 640 for v in bbox)
        listed += entries
    assert len(listed) == len(rows)


def test_synth_is_deterministic(tmp_path: Path) -> None:
    first = synth(tmp_path / "a", num_images=4, image_size=64, seed=3)
    second = synth(tmp_path / "b", num_images=4, image_size=64, seed=3)
    assert _csv_rows(first) == _csv_rows(second)
    for row in _csv_rows(first):
        assert (first / row["path"]).read_bytes() == (second / row["path"]).read_bytes()


def test_convert_writes_one_documented_jsonl_per_split(mscxr_root: Path, grounding_dir: Path) -> None:
    records = {split: [json.loads(line) for line in (grounding_dir / f"{split}.jsonl").read_text().splitlines()]
               for split in ("train", "val", "test")}
    every = [r for split in records.values() for r in split]
    assert len(every) == len(_csv_rows(mscxr_root))
    assert len({r["id"] for r in every}) == len(every)
    for split, rows in records.items():
        assert rows and all(r["split"] == split for r in rows)
    record = every[0]
    assert set(record) == {"id", "dicom_id", "image", "phrase", "category", "box", "image_width", "image_height",
                           "split"}
    assert Path(record["image"]).is_absolute() and Path(record["image"]).is_file()
    images_by_split = {split: {r["dicom_id"] for r in rows} for split, rows in records.items()}
    assert not (images_by_split["train"] & images_by_split["test"])


def test_reference_split_files_choose_the_rows(mscxr_root: Path, tmp_path: Path) -> None:
    root = shutil.copytree(mscxr_root, tmp_path / "root")
    entries = torch.load(root / "MS_CXR_test.pth", weights_only=True)
    torch.save(entries[1:], root / "MS_CXR_test.pth")  # the reference leaves rows out
    summary = convert(root, tmp_path / "out")
    assert summary["left_out"] == 1 and summary["records"]["test"] == len(entries) - 1


def test_split_file_that_is_not_plain_data_is_refused(mscxr_root: Path, tmp_path: Path) -> None:
    root = shutil.copytree(mscxr_root, tmp_path / "root")
    torch.save([(1, 2, 3, "files/x.jpg", (0, 0, 1, 1), 1, 1, Path("not allowed"))], root / "MS_CXR_val.pth")
    _, problems = read_reference_split(root / "MS_CXR_val.pth")
    assert len(problems) == 1 and "weights_only=True" in problems[0].message
    with pytest.raises(DataError, match="MS_CXR_val.pth"):
        convert(root, tmp_path / "out")


def test_split_file_entry_without_csv_row(mscxr_root: Path, tmp_path: Path) -> None:
    root = shutil.copytree(mscxr_root, tmp_path / "root")
    entries = torch.load(root / "MS_CXR_val.pth", weights_only=True)
    torch.save([(1, 2, 3)] + entries + [(99, 99, 1, "files/p10/unknown.jpg", (1, 1, 5, 5), 10, 10, "cardiomegaly")],
               root / "MS_CXR_val.pth")
    with pytest.raises(DataError) as error:
        convert(root, tmp_path / "out")
    assert error.value.lines[1:] == [
        f"{root / 'MS_CXR_val.pth'}[0]: expected (anno_id, image_id, category_id 1..8, img_file, (x, y, w, h), "
        "width, height, phrase), got (1, 2, 3)",
        f"{root / 'MS_CXR_val.pth'}[{len(entries) + 1}]: no CSV row has path 'files/p10/unknown.jpg' and phrase "
        "'cardiomegaly'"]


def test_split_column_and_seeded_split(mscxr_root: Path, tmp_path: Path) -> None:
    root = shutil.copytree(mscxr_root, tmp_path / "root")
    for split in ("train", "val", "test"):
        (root / f"MS_CXR_{split}.pth").unlink()
    rows = _csv_rows(root)
    records, problems, _ = read_mscxr(root, seed=1)
    assert not problems and len(records) == len(rows)
    splits_of = {}
    for item in records:
        splits_of.setdefault(item.record["dicom_id"], set()).add(item.record["split"])
    assert all(len(s) == 1 for s in splits_of.values())  # seeded split is by image
    # v1.1.0's split column wins over the seeded split; "category" is accepted for "category_name".
    for row in rows:
        row["split"] = "val"
        row["category"] = row.pop("category_name")
    _write_csv(root, rows, [c if c != "category_name" else "category" for c in CSV_COLUMNS] + ["split"])
    records, problems, _ = read_mscxr(root)
    assert not problems and {item.record["split"] for item in records} == {"val"}


def test_image_root_variants_and_dicom_fallback(mscxr_root: Path, tmp_path: Path) -> None:
    root = shutil.copytree(mscxr_root, tmp_path / "root")
    jpeg_row = next(r for r in _csv_rows(root) if r["path"].endswith(".jpg"))
    # MIMIC DICOMs next to where the CSV's JPEG name points: the .dcm is used.
    from accord_medrpg.data import read_image, write_dicom

    jpeg = root / jpeg_row["path"]
    write_dicom(jpeg.with_suffix(".dcm"), read_image(jpeg))
    jpeg.unlink()
    records, problems, _ = read_mscxr(root)
    assert not problems
    chosen = next(i.record for i in records if i.record["dicom_id"] == jpeg_row["dicom_id"])
    assert chosen["image"].endswith(".dcm")
    # An image root that already ends in files/.
    records, _, _ = read_mscxr(root, images=root / "files")
    assert all(Path(i.record["image"]).is_file() for i in records)


def test_convert_refuses_bad_rows_with_one_line_each(mscxr_root: Path, tmp_path: Path) -> None:
    root = shutil.copytree(mscxr_root, tmp_path / "root")
    rows = _csv_rows(root)
    rows[0]["x"] = "abc"
    rows[1]["category_name"] = "Fracture"
    _write_csv(root, rows)
    with pytest.raises(DataError) as error:
        convert(root, tmp_path / "out")
    csv_path = root / "MS_CXR_Local_Alignment_v1.0.0.csv"
    assert error.value.lines[1].startswith(f"{csv_path}:2: x, y, w, h, image_width and image_height must be numbers")
    assert error.value.lines[2].startswith(f"{csv_path}:3: [mscxr-00002] unknown category 'Fracture'")
    assert not (tmp_path / "out").exists()


def test_missing_root_and_columns(tmp_path: Path) -> None:
    _, problems, _ = read_mscxr(tmp_path / "nowhere")
    assert [p.message for p in problems] == ["not a directory; expected an MS-CXR root with the annotation CSV"]
    (tmp_path / "MS_CXR_Local_Alignment_v1.0.0.csv").write_text("dicom_id,path\n")
    _, problems, _ = read_mscxr(tmp_path)
    assert "missing column(s) category_name, label_text, x, y" in problems[0].message
