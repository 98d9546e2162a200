"""2D chest X-rays listed in a CSV (NIH ChestX-ray14's Data_Entry_2017.csv): groups from columns, checks, training."""

from __future__ import annotations

import csv

import cv2
import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from accord.cli import app
from accord_medssl.data.cxr import NIH_TABLE, CxrTableOptions, check_cxr, cxr_items, synth_cxr
from accord_medssl.gemini.data import GeminiPairs

pytestmark = pytest.mark.usefixtures("one_torch_thread")

NIH = CxrTableOptions(path_column="Image Index", group_columns=["View Position", "Patient Gender"],
                      image_folder="images")
NIH_OPTIONS = ["path_column=Image Index", "group_columns=[View Position, Patient Gender]", "image_folder=images"]


@pytest.fixture
def nih_root(tmp_path):
    """Six phantoms in NIH ChestX-ray14's layout: flat images/ and Data_Entry_2017.csv, three view x sex groups."""
    return synth_cxr(tmp_path / "nih", num_images=6, size=24, groups=("AP_F", "PA_M", "AP_M"), layout="nih")


def test_groups_come_from_the_columns_and_pairs_stay_inside_a_group(nih_root):
    header = (nih_root / NIH_TABLE).read_text().splitlines()[0]
    assert header.startswith("Image Index,Finding Labels,") and header.endswith("OriginalImagePixelSpacing[x,y],")
    items = cxr_items(nih_root / NIH_TABLE, NIH)
    assert [item["group"] for item in items] == ["AP_F", "PA_M", "AP_M"] * 2
    assert all(len(item["masks"]) == 5 for item in items)
    # Without group columns the table is one group; a folder read with table options is refused.
    assert {item["group"] for item in cxr_items(nih_root / NIH_TABLE, NIH.model_copy(update={"group_columns": []}))} \
        == {"all"}
    with pytest.raises(ValueError, match="apply to a CSV data file"):
        cxr_items(nih_root, NIH)
    with pytest.raises(TypeError, match=r"options \['group_columns'\] apply to a chest X-ray CSV file, not to "):
        check_cxr(nih_root, group_columns=["sex"])

    groups = [item["group"] for item in items]
    pairs = GeminiPairs(lambda index: torch.full((1, 4, 4), float(index)), len(items), groups=groups, spatial_dims=2,
                        augment=False)
    torch.manual_seed(0)
    for index in range(len(items)):
        for _ in range(4):
            partner = int(pairs[index]["image_b"][0, 0, 0])
            assert partner != index and groups[partner] == groups[index]


def test_the_nih_table_checks_clean_from_the_cli(nih_root, only_medssl):
    runner = CliRunner()
    result = runner.invoke(app, ["data", "check", "medssl", str(nih_root / NIH_TABLE), *NIH_OPTIONS])
    assert result.exit_code == 0, result.output
    # Read with the default path column, the table names what is missing.
    result = runner.invoke(app, ["data", "check", "medssl", str(nih_root / NIH_TABLE)])
    assert result.exit_code == 1 and "no column 'image' (columns: ['Image Index', 'Finding Labels'" in result.output
    # Table options make no sense for an MSD / NIfTI folder: one line, not a traceback.
    (nih_root / "volumes").mkdir()
    result = runner.invoke(app, ["data", "check", "medssl", str(nih_root / "volumes"), "group_columns=[sex]"])
    assert result.exit_code == 2 and "apply to a chest X-ray CSV file" in result.output


def _write_table(path, header, rows):
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def test_each_table_defect_is_one_problem_naming_its_line(tmp_path, only_medssl):
    root = synth_cxr(tmp_path / "cxr", num_images=6, size=24, groups=("AP_F", "PA_M"), dicom_every=0)
    rows = [
        ["images/AP_F/cxr_000.png", "AP", "F"],  # line 2 ... 4: the AP_F group, fine
        ["images/AP_F/cxr_002.png", "AP", "F"],
        ["images/AP_F/cxr_004.png", "AP", "F"],
        ["images/PA_M/cxr_001.png", "PA", ""],  # line 5: empty group cell
        ["images/PA_M/missing.png", "PA", "M"],  # line 6: no such file
        ["", "PA", "M"],  # line 7: empty path
        ["images/PA_M/notes.txt", "PA", "M"],  # line 8: not an image path
        ["images/AP_F/cxr_000.png", "AP", "F"],  # line 9: listed again
        ["images/PA_M/cxr_003.png", "PA", "M"],  # line 10: alone in PA_M
    ]
    table = _write_table(root / "list.csv", ["image", "view", "sex"], rows)
    messages = [str(problem) for problem in check_cxr(table, group_columns=["view", "sex"])]
    assert messages == [
        f"{table}:5: empty 'sex' cell; every image needs its group",
        f"{table}:6: 'images/PA_M/missing.png' not found (looked for {root / 'images/PA_M/missing.png'})",
        f"{table}:7: empty 'image' cell; expected an image path",
        f"{table}:8: 'images/PA_M/notes.txt' is not an image path (.png/.jpg/.jpeg/.dcm expected)",
        f"{table}:9: 'images/AP_F/cxr_000.png' is listed again (first on line 2); GEMINI pairs two different images",
        f"{table}: group 'PA_M' (view x sex) has 1 image; GEMINI pairs two different images of one group",
    ]
    # A listed image that is bad in itself is reported as in a folder.
    colour = np.zeros((24, 24, 3), np.uint8)
    colour[..., 0] = 255
    cv2.imwrite(str(root / "images" / "PA_M" / "cxr_003.png"), colour)
    problems = check_cxr(table, group_columns=["view", "sex"])
    assert any("cxr_003.png: colour image" in str(problem) for problem in problems)
    # Training refuses the table with its problems; the CLI prints one line each and exits 1.
    with pytest.raises(ValueError, match=r"list.csv: 5 problem\(s\) in the table, e\.g\. .*list.csv:5: empty 'sex'"):
        cxr_items(table, CxrTableOptions(group_columns=["view", "sex"]))
    result = CliRunner().invoke(app, ["data", "check", "medssl", str(table), "group_columns=[view, sex]"])
    assert result.exit_code == 1 and result.output.count(f"{table}:") == 6


@pytest.mark.parametrize(("content", "message"), [
    (b"", "empty; expected a header row naming the columns ['image']"),
    (b"image\n", "lists no image (a header row only)"),
    (b"image\n\xff\xfe\xfa\n", "not a readable CSV (UnicodeDecodeError"),
], ids=["empty file", "header only", "not UTF-8"])
def test_an_unusable_table_is_one_problem(tmp_path, content, message):
    table = tmp_path / "t.csv"
    table.write_bytes(content)
    problems = check_cxr(table)
    assert len(problems) == 1 and str(problems[0]).startswith(f"{table}: {message}")


def test_pretrain_2d_on_a_csv(nih_root):
    from accord.runs import run_task
    from accord_medssl.gemini.tasks import GEMINI_TRAINER_DEFAULTS, GeminiPretrainConfig

    cfg = GeminiPretrainConfig(
        plugin="medssl", task="gemini_pretrain", run_dir=nih_root.parent / "run", data=nih_root / NIH_TABLE,
        size=(16, 16), cxr=NIH,
        gemini={"network": {"spatial_dims": 2, "channels": [8, 8, 8, 8, 8], "deformer_channels": [8] * 5},
                "loss": {"window": 5}, "corruption": {"shuffle_blocks": 5}},
        trainer={**GEMINI_TRAINER_DEFAULTS, "max_steps": 2, "checkpoint_every": 2, "batch_size": 2})
    result = run_task(cfg)
    assert result["task"] > 0 and (nih_root.parent / "run" / "checkpoints" / "step_00000002.pt").is_file()
    # A group of one image stops the run before training, naming the group and its columns.
    table = nih_root / NIH_TABLE
    lines = table.read_text().splitlines()
    table.write_text("\n".join(lines[:-1]) + "\n")  # drop one of the two AP_M images
    with pytest.raises(ValueError, match=r"group 'AP_M' \(View Position x Patient Gender\) has 1 image"):
        run_task(cfg.model_copy(update={"run_dir": nih_root.parent / "run2"}))
