"""``accord detect``: detections mapped back to original pixels and drawn as rotated boxes."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
from torch import nn
from typer.testing import CliRunner

from accord_mutdet import plugin
from accord_mutdet.data import load_dota, read_rgb
from accord_mutdet.detect import detect_image, draw_detections


def _cli():
    """A fresh command line with what the plugin's register_commands hook adds (as accord's main() does)."""
    import typer

    cli = typer.Typer()
    cli.command("noop")(lambda: None)  # typer runs a lone command without its name
    plugin.register_commands(cli)
    return cli


class FixedDetector(nn.Module):
    """Follows the detector's predict contract; returns one box per ground truth of the record it is given."""

    def __init__(self, boxes: np.ndarray, labels: list[int]) -> None:
        super().__init__()
        self.scale_param = nn.Parameter(torch.ones(()))
        self.boxes, self.labels = torch.from_numpy(boxes), torch.tensor(labels)
        self.class_names = ["plane", "ship", "small-vehicle", "storage-tank", "tennis-court"]
        self.seen: list[tuple[int, ...]] = []

    def predict(self, images: torch.Tensor) -> list[dict[str, torch.Tensor]]:
        self.seen.append(tuple(images.shape))
        scale = images.shape[-1] / 160  # the sample images are 160 px
        boxes = self.boxes.clone()
        boxes[:, :4] *= scale
        scores = torch.linspace(0.9, 0.5, len(boxes))
        return [{"boxes": torch.cat([boxes, boxes[:1]]), "scores": torch.cat([scores, torch.tensor([0.1])]),
                 "labels": torch.cat([self.labels, self.labels[:1]])}]


def _model(record) -> FixedDetector:
    names = ["plane", "ship", "small-vehicle", "storage-tank", "tennis-court"]
    return FixedDetector(record.boxes, [names.index(n) for n in record.labels])


def test_detect_image_maps_back_and_thresholds(synth_root: Path):
    record = load_dota(synth_root / "DOTA", "train")[0]
    model = _model(record)
    found = detect_image(model, read_rgb(record.image), image_size=96, score_threshold=0.3)
    assert model.seen == [(1, 3, 96, 96)]
    assert len(found["boxes"]) == len(record.boxes)  # the 0.1 duplicate is below the threshold
    np.testing.assert_allclose(found["boxes"], record.boxes, rtol=1e-5, atol=1e-4)
    overlay = draw_detections(read_rgb(record.image), found, model.class_names)
    assert overlay.shape == (160, 160, 3) and (overlay != read_rgb(record.image)).any(axis=2).sum() > 100


def test_detect_cli_writes_overlays(synth_root: Path, tmp_path: Path, monkeypatch):
    record = load_dota(synth_root / "DOTA", "train")[0]
    model = _model(record)
    monkeypatch.setattr("accord.runs.load_run", lambda ckpt: SimpleNamespace(
        model=model, config=SimpleNamespace(image_size=128, class_names=None)))
    result = CliRunner().invoke(_cli(), ["detect", "run.pt", str(record.image), "--overlay", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    assert f"{record.image}: {len(record.boxes)} detection(s)" in result.output
    assert model.seen == [(1, 3, 128, 128)]
    assert (tmp_path / "out" / f"{record.id}.png").is_file()
    lines = (tmp_path / "out" / f"{record.id}.txt").read_text().splitlines()
    assert len(lines) == len(record.boxes) and lines[0].split()[8] in model.class_names

    missing = CliRunner().invoke(_cli(), ["detect", "run.pt", str(tmp_path / "nope.png")])
    assert missing.exit_code == 2 and "image(s) not found" in missing.output


def test_detect_with_a_fine_tuned_checkpoint(synth_root: Path, tmp_path: Path):
    """The real path: a (1-step, tiny) fine-tuned detector rebuilt by load_run, boxes drawn."""
    from accord.config import TrainerConfig
    from accord.runs import run_task
    from accord_mutdet.models import DetectorOptions
    from accord_mutdet.tasks import FinetuneConfig

    tiny = DetectorOptions(backbone="tiny", embed_dim=32, num_heads=4, ffn_dim=64, num_queries=12, num_dn_queries=8,
                           dropout=0.0, encoder_layers=1, decoder_layers=1)
    result = run_task(FinetuneConfig(plugin="mutdet", task="finetune", run_dir=tmp_path / "ft", data=synth_root / "DIOR-R",
                                     split="train", image_size=64, model=tiny,
                                     trainer=TrainerConfig(max_steps=1, batch_size=2, checkpoint_every=1, warmup_steps=0)))
    image = next((synth_root / "DIOR-R" / "JPEGImages-test").glob("*.jpg"))
    out = CliRunner().invoke(_cli(), ["detect", str(result["checkpoint"]), str(image), "--overlay", str(tmp_path / "ov"),
                                      "--score-threshold", "0"])
    assert out.exit_code == 0, out.output
    count = int(out.output.split(f"{image}: ")[1].split(" detection")[0])
    lines = (tmp_path / "ov" / f"{image.stem}.txt").read_text().splitlines()
    assert count > 0 and len(lines) == count and all(len(line.split()) == 10 for line in lines)
    assert (tmp_path / "ov" / f"{image.stem}.png").is_file()
