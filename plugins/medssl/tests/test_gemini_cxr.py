"""2D chest X-rays: the reader (PNG, DICOM MONOCHROME1 + window), the data check's messages, 2D pretraining."""

from __future__ import annotations

import json

import cv2
import numpy as np
import pydicom
import pytest
import torch
from typer.testing import CliRunner

from accord.cli import app
from accord_medssl.data.cxr import _write_dicom, check_cxr, cxr_items, read_cxr, synth_cxr


# Small convolutions on a loaded machine run many times faster without OpenMP spinning.
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_dicom_monochrome1_reads_like_the_png(tmp_path):
    pixels = np.tile(np.arange(256, dtype=np.uint8), (4, 1))
    cv2.imwrite(str(tmp_path / "a.png"), pixels)
    _write_dicom(tmp_path / "a.dcm", pixels)  # stored inverted, MONOCHROME1
    assert pydicom.dcmread(tmp_path / "a.dcm").PhotometricInterpretation == "MONOCHROME1"
    png, dicom = read_cxr(tmp_path / "a.png", size=None), read_cxr(tmp_path / "a.dcm", size=None)
    # Equal up to the DICOM linear window formula ((x - (c - 0.5)) / (w - 1)): under half a grey level.
    torch.testing.assert_close(dicom, png, atol=0.5 / 255, rtol=0)
    assert read_cxr(tmp_path / "a.png", size=(8, 16)).shape == (1, 8, 16)


def test_check_reports_each_bad_input(tmp_path):
    root = synth_cxr(tmp_path / "cxr", num_images=4, size=32, groups=("AP", "PA"))
    assert check_cxr(root) == []
    images = root / "images"
    (images / "AP" / "notes.txt").write_text("not an image")
    (images / "AP" / "broken.png").write_bytes(b"\x89PNG garbage")
    colour = np.zeros((32, 32, 3), np.uint8)
    colour[..., 2] = 200
    cv2.imwrite(str(images / "PA" / "colour.png"), colour)
    cv2.imwrite(str(root / "masks" / "heart" / "cxr_000.png"), np.full((32, 32), 7, np.uint8))
    cv2.imwrite(str(root / "masks" / "left_lung" / "cxr_000.png"), np.zeros((16, 32), np.uint8))
    (images / "LONE").mkdir()
    cv2.imwrite(str(images / "LONE" / "only.png"), np.zeros((32, 32), np.uint8))
    dicom = pydicom.dcmread(images / "PA" / "cxr_003.dcm")
    del dicom.PixelData
    dicom.save_as(images / "PA" / "empty.dcm")
    messages = "\n".join(str(problem) for problem in check_cxr(root))
    assert "notes.txt: not an image" in messages
    assert "broken.png: not a readable image" in messages
    assert "colour.png: colour image" in messages
    assert "heart mask is not binary: values [7]" in messages
    assert "mask size (16, 32) differs from its image cxr_000.png (32, 32)" in messages
    assert "group 'LONE' has 1 image" in messages
    assert "empty.dcm: DICOM without pixel data" in messages


def test_pretrain_2d_from_the_cli(tmp_path, only_medssl):
    root = synth_cxr(tmp_path / "cxr", num_images=4, size=48, groups=("AP", "PA"))
    assert {item["group"] for item in cxr_items(root)} == {"AP", "PA"}
    config = tmp_path / "gemini2d.yaml"
    config.write_text(
        f"plugin: medssl\ntask: gemini_pretrain\nrun_dir: {tmp_path / 'run'}\ndata: {root}\nsize: [32, 32]\n"
        "gemini:\n  network: {spatial_dims: 2, channels: [8, 8, 16, 16, 16], deformer_channels: [8, 8, 8, 8, 8]}\n"
        "  loss: {window: 5, mask_mode: bilinear}\n  corruption: {shuffle_blocks: 20}\n"
        "trainer: {max_steps: 4, checkpoint_every: 4, batch_size: 2}\n"
    )
    result = CliRunner().invoke(app, ["run", str(config)])
    assert result.exit_code == 0, result.output
    last = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()][-1]
    assert last["step"] == 4 and last["task"] > 0 and 0 <= last["folding_percent"] <= 100
    check = CliRunner().invoke(app, ["data", "check", "medssl", str(root)])
    assert check.exit_code == 0, check.output
    # Registration with the 2D model: PNG outputs and a 2-channel flow.
    from accord.runs import run_task
    from accord_medssl.gemini.tasks import GeminiRegisterConfig

    items = cxr_items(root)
    outcome = run_task(GeminiRegisterConfig(
        plugin="medssl", task="register", run_dir=tmp_path / "reg",
        checkpoint=tmp_path / "run" / "checkpoints" / "step_00000004.pt", fixed=items[0]["image"],
        moving=items[1]["image"], moving_label=items[1]["masks"]["heart"], fixed_label=items[0]["masks"]["heart"]))
    assert cv2.imread(outcome["warped"], cv2.IMREAD_UNCHANGED).shape == (32, 32)
    assert set(np.unique(cv2.imread(outcome["warped_label"], cv2.IMREAD_UNCHANGED)).tolist()) <= {0, 255}
    import nibabel as nib

    assert nib.load(outcome["flow"]).shape == (32, 32, 2) and set(outcome["dice_after"]) == {"1"}


def test_semisup_2d_with_sigmoid_masks(tmp_path):
    from accord.runs import run_task
    from accord_medssl.gemini.tasks import GEMINI_TRAINER_DEFAULTS, GeminiSemisupConfig

    root = synth_cxr(tmp_path / "cxr", num_images=6, size=48, groups=("AP", "PA"))
    cfg = GeminiSemisupConfig(
        plugin="medssl", task="semisup", run_dir=tmp_path / "semi", data=root, size=(32, 32), labelled_cases=1,
        gemini={"network": {"spatial_dims": 2, "channels": [8, 8, 16, 16, 16], "deformer_channels": [8] * 5},
                "corruption": None, "loss": {"window": 5, "mask_mode": "bilinear"}},
        trainer={**GEMINI_TRAINER_DEFAULTS, "max_steps": 4, "checkpoint_every": 4, "batch_size": 2})
    result = run_task(cfg)
    assert set(result["dice_per_class"]) == {"heart", "left_clavicle", "left_lung", "right_clavicle", "right_lung"}
    assert result["test_cases"] == 1 and result["task"] > 0


def test_cli_synth_kinds_then_check(tmp_path, only_medssl):
    runner = CliRunner()
    for kind, options in (("cxr", ["num_images=4", "size=32"]), ("pairs", ["num_cases=2", "shape=[16,16,12]"]),
                          ("mni152", ["num_cases=2", "shape=[12,14,12]"])):
        out = tmp_path / kind
        result = runner.invoke(app, ["data", "synth", "medssl", str(out), f"kind={kind}", *options])
        assert result.exit_code == 0, result.output
        check = runner.invoke(app, ["data", "check", "medssl", str(out)])
        assert check.exit_code == 0, check.output
    assert len(list((tmp_path / "pairs" / "flows").glob("*.nii.gz"))) == 2
    assert len(list((tmp_path / "mni152" / "flows").glob("*.nii.gz"))) == 2
    bad = runner.invoke(app, ["data", "synth", "medssl", str(tmp_path / "x"), "kind=movie"])
    assert bad.exit_code != 0 and "kind: expected 'msd', 'pairs', 'mni152' or 'cxr'" in bad.output
