"""``accord ground``: boxes in original pixels, CSV queries, overlays; the CLI on a real trained checkpoint."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn
from typer.testing import CliRunner

from accord.cli import app
from accord.errors import UserError
from accord.plugins import get_host

from accord_medrpg.data import write_dicom, write_image
from accord_medrpg.ground import GroundingQuery, ground_queries, read_queries


class _FixedBox(nn.Module):
    """The model interface with a known answer: the canvas box (0.5, 0.5, 0.5, 0.25), attention on cell 0."""

    def __init__(self, size: int = 64, grid: int = 2):
        super().__init__()
        self.size, self.grid = size, grid
        self.anchor = nn.Parameter(torch.zeros(()))

    def forward(self, image, image_mask, phrases):
        assert image.shape == (len(phrases), 3, self.size, self.size) and image_mask.dtype == torch.bool
        attention = torch.zeros(len(phrases), self.grid * self.grid)
        attention[:, 0] = 1.0
        box = torch.tensor([[0.5, 0.5, 0.5, 0.25]]).expand(len(phrases), -1)
        return {"pred_box": box + self.anchor, "reg_attention": attention}


def test_box_is_in_original_pixels_for_png_and_dicom(tmp_path: Path) -> None:
    image = np.random.default_rng(0).random((200, 100)).astype(np.float32)  # portrait: padded left and right
    png = write_image(tmp_path / "x.png", image)
    dcm = write_dicom(tmp_path / "x.dcm", image, monochrome1=True)
    results = ground_queries(_FixedBox(), [GroundingQuery(png, "left effusion"),
                                           GroundingQuery(dcm, "left effusion", [25, 75, 50, 50])], image_size=64)
    # Canvas 64: the 200 x 100 image becomes 64 x 32 at x offset 16; the canvas box [16, 24, 48, 40]
    # is [0, 75, 100, 125] in the original, i.e. [x, y, w, h] = [0, 75, 100, 50].
    for result in results:
        assert result["box"] == pytest.approx([0, 75, 100, 50], abs=0.2)
        assert result["box_xyxy"] == pytest.approx([0, 75, 100, 125], abs=0.2)
    assert "iou" not in results[0] and results[1]["iou"] == pytest.approx(0.5, abs=0.01)


def test_overlay_png_has_the_image_size(tmp_path: Path) -> None:
    image = np.full((120, 90), 0.5, dtype=np.float32)
    path = write_image(tmp_path / "cxr.jpg", image)
    (result,) = ground_queries(_FixedBox(), [GroundingQuery(path, "cardiomegaly", [10, 10, 30, 30])],
                               overlay_dir=tmp_path / "overlays", image_size=64)
    overlay = Image.open(result["overlay"])
    assert Path(result["overlay"]).name == "0000_cxr.png" and overlay.size == (90, 120)
    pixels = np.asarray(overlay.convert("RGB")).astype(int)
    red = (pixels[..., 0] > 200) & (pixels[..., 1] < 60)
    green = (pixels[..., 1] > 150) & (pixels[..., 0] < 60)
    assert red.any() and green.any()  # prediction and GT drawn
    # The attention on the top-left cell makes the heat map's top-left warmer than its bottom-right.
    assert pixels[5, 5, 0] - pixels[5, 5, 2] < pixels[115, 85, 0] - pixels[115, 85, 2] or pixels[5, 5, 2] < 200


def test_overlay_needs_attention(tmp_path: Path) -> None:
    class NoAttention(_FixedBox):
        def forward(self, image, image_mask, phrases):
            return {"pred_box": super().forward(image, image_mask, phrases)["pred_box"]}

    path = write_image(tmp_path / "x.png", np.zeros((64, 64), np.float32))
    with pytest.raises(ValueError, match="reg_attention"):
        ground_queries(NoAttention(), [GroundingQuery(path, "edema")], overlay_dir=tmp_path, image_size=64)


def test_query_csv(tmp_path: Path) -> None:
    (tmp_path / "q.csv").write_text("image,phrase,x,y,w,h\na.png,left effusion,1,2,3,4\n/abs/b.dcm,edema,0,0,5,5\n")
    queries = read_queries(tmp_path / "q.csv")
    assert queries[0] == GroundingQuery(tmp_path / "a.png", "left effusion", [1.0, 2.0, 3.0, 4.0])
    assert queries[1].image == Path("/abs/b.dcm")
    (tmp_path / "ms.csv").write_text("dicom_id,label_text,path\nd,cardiomegaly,files/d.jpg\n")  # MS-CXR columns
    assert read_queries(tmp_path / "ms.csv", tmp_path / "root")[0] == GroundingQuery(
        tmp_path / "root" / "files/d.jpg", "cardiomegaly")
    for text, message in [("image\na.png\n", "needs columns image"),
                          ("image,phrase\na.png, \n", "q.csv:2: empty phrase"),
                          ("image,phrase,x,y,w,h\na.png,p,1,2,x,4\n", "q.csv:2: x, y, w, h must be numbers"),
                          ("image,phrase\n", "no query rows")]:
        (tmp_path / "q.csv").write_text(text)
        with pytest.raises(UserError, match=message):
            read_queries(tmp_path / "q.csv")


@pytest.fixture(scope="module")
def trained_checkpoint(grounding_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real medrpg train checkpoint: the quick TransVG at 64 pixels, one epoch of one step."""
    from accord.runs import run_task
    from accord_medrpg.models.transvg import quick_options
    from accord_medrpg.tasks import TrainConfig

    run_dir = tmp_path_factory.mktemp("run")
    options = quick_options(image_size=64).model_dump()
    train_size = len((grounding_dir / "train.jsonl").read_text().splitlines())
    cfg = TrainConfig(plugin="medrpg", run_dir=run_dir, data=grounding_dir, model=options, epochs=1, eval_batch_size=32,
                      trainer={"batch_size": train_size, "lr": 1e-4, "schedule": "constant", "log_every": 1})
    return Path(run_task(cfg)["best_checkpoint"])


@pytest.fixture(autouse=True)
def _restore_cli_commands():
    """Tests add the plugin's commands to accord's app, as its main() does; take them away afterwards."""
    groups = {group.name: list(group.typer_instance.registered_commands) for group in app.registered_groups}
    commands = list(app.registered_commands)
    yield
    app.registered_commands[:] = commands
    for group in app.registered_groups:
        group.typer_instance.registered_commands[:] = groups[group.name]


def _cli(*args: str) -> object:
    get_host().add_commands(app)  # plugin commands, as accord's main() adds them
    return CliRunner().invoke(app, list(args))


def test_cli_grounds_with_a_trained_checkpoint(trained_checkpoint: Path, mscxr_root: Path, tmp_path: Path,
                                               monkeypatch) -> None:
    monkeypatch.setenv("ACCORD_LOAD_PLUGINS", "medrpg")
    csv_path = mscxr_root / "MS_CXR_Local_Alignment_v1.0.0.csv"
    dicom = next(mscxr_root.rglob("*.dcm"))
    single = _cli("ground", str(trained_checkpoint), "--image", str(dicom), "--phrase", "left pleural effusion")
    assert single.exit_code == 0, single.output
    (line,) = [json.loads(x) for x in single.stdout.splitlines()]
    assert line["phrase"] == "left pleural effusion" and len(line["box"]) == 4
    many = _cli("ground", str(trained_checkpoint), "--csv", str(csv_path), "--overlay", str(tmp_path / "ov"))
    assert many.exit_code == 0, many.output
    rows = [json.loads(x) for x in many.stdout.splitlines() if x.startswith("{")]
    assert len(rows) == len(csv_path.read_text().splitlines()) - 1
    assert all(0 <= r["iou"] <= 1 and Path(r["overlay"]).is_file() for r in rows)
    assert "with GT: Acc@0.5" in many.output


def test_cli_errors_are_one_line(trained_checkpoint: Path, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("ACCORD_LOAD_PLUGINS", "medrpg")
    missing = _cli("ground", str(trained_checkpoint), "--image", str(tmp_path / "no.png"), "--phrase", "edema")
    assert missing.exit_code == 2 and missing.output.strip() == f"error: {tmp_path / 'no.png'}: image file not found"
    both = _cli("ground", str(trained_checkpoint), "--image", "x.png", "--csv", "q.csv")
    assert both.exit_code == 2 and "either --image with --phrase, or --csv" in both.output
    stray = _cli("ground", str(trained_checkpoint), "--csv", "q.csv", "--phrase", "edema")
    assert stray.exit_code == 2 and "--phrase goes with --image" in stray.output
    (tmp_path / "junk.pt").write_bytes(b"junk")
    junk = _cli("ground", str(tmp_path / "junk.pt"), "--image", "x.png", "--phrase", "edema")
    assert junk.exit_code == 2 and "junk.pt" in junk.output and "Traceback" not in junk.output


def test_cli_convert(mscxr_root: Path, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("ACCORD_LOAD_PLUGINS", "medrpg")
    result = _cli("data", "convert", "medrpg", str(mscxr_root), str(tmp_path / "out"))
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith(f"wrote {tmp_path / 'out'}: train ")
    assert {p.name for p in (tmp_path / "out").iterdir()} == {"train.jsonl", "val.jsonl", "test.jsonl"}
    root = shutil.copytree(mscxr_root, tmp_path / "bad")
    (root / "MS_CXR_Local_Alignment_v1.0.0.csv").write_text("dicom_id\n")
    bad = _cli("data", "convert", "medrpg", str(root), str(tmp_path / "out2"))
    assert bad.exit_code == 2 and "missing column(s)" in bad.output
    other = _cli("data", "convert", "core", str(root), str(tmp_path / "out3"))
    assert other.exit_code == 2 and "has no converter" in other.output


def test_cli_synth_convert_check(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("ACCORD_LOAD_PLUGINS", "medrpg")
    assert _cli("data", "synth", "medrpg", str(tmp_path / "synth")).exit_code == 0
    assert len((tmp_path / "synth" / "MS_CXR_Local_Alignment_v1.0.0.csv").read_text().splitlines()) > 48
    assert _cli("data", "convert", "medrpg", str(tmp_path / "synth"), str(tmp_path / "jsonl")).exit_code == 0
    for directory in ("synth", "jsonl"):
        checked = _cli("data", "check", "medrpg", str(tmp_path / directory))
        assert checked.exit_code == 0 and checked.stdout.strip().endswith("OK (medrpg.mscxr)")
