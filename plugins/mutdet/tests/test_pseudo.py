"""Pseudo-labels: mask -> le90 box, proposal sources, RoIAlignRotated convention, spherical k-means, the task."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from accord.boxes import box_iou_rotated
from accord_mutdet.data import DetectionDataset, load_dota, read_rgb
from accord_mutdet.pseudo import (
    CocoRleSource,
    DotaBoxSource,
    FelzenszwalbSource,
    PngMaskSource,
    fit_pseudo_classes,
    mask_to_le90,
    read_pseudo_labels,
    rotated_crops,
    spherical_kmeans,
)


def _filled(box: list[float], size: int = 100) -> np.ndarray:
    """The pixels whose centre lies inside the rotated box (exact rasterisation)."""
    cx, cy, w, h, theta = box
    ys, xs = np.mgrid[0:size, 0:size] + 0.5
    u = (xs - cx) * math.cos(theta) + (ys - cy) * math.sin(theta)
    v = -(xs - cx) * math.sin(theta) + (ys - cy) * math.cos(theta)
    return ((np.abs(u) <= w / 2) & (np.abs(v) <= h / 2)).astype(np.uint8)


def test_mask_to_le90_hand_made():
    mask = np.zeros((60, 60), np.uint8)
    mask[10:20, 30:50] = 1
    np.testing.assert_allclose(mask_to_le90(mask), [40, 15, 20, 10, 0], atol=1e-5)
    mask[30:50, 5:9] = 1  # a second, smaller blob: the largest contour wins
    np.testing.assert_allclose(mask_to_le90(mask), [40, 15, 20, 10, 0], atol=1e-5)
    tall = np.zeros((60, 60), np.uint8)
    tall[5:45, 20:30] = 1  # 10 wide, 40 tall -> w = 40 along y: theta = -pi/2 in le90
    np.testing.assert_allclose(mask_to_le90(tall), [25, 25, 40, 10, -math.pi / 2], atol=1e-5)
    assert mask_to_le90(np.zeros((5, 5))) is None
    for box in ([50, 50, 40, 16, 0.5], [40, 60, 30, 12, -1.1]):
        found = torch.from_numpy(mask_to_le90(_filled(box)))[None]
        assert box_iou_rotated(found, torch.tensor([box])).item() > 0.9
        assert abs(found[0, 4].item() - box[4]) < 0.05


def test_mask_sources_png_and_coco_rle_agree(synth_root: Path, tmp_path: Path):
    from pycocotools import mask as mask_utils

    record = load_dota(synth_root / "DOTA", "train")[0]
    image = read_rgb(record.image)
    png = PngMaskSource(synth_root / "DOTA" / "train" / "masks")(record, image)
    assert len(png.boxes) == len(record.boxes)
    iou = box_iou_rotated(torch.from_numpy(record.boxes), torch.from_numpy(png.boxes))
    assert torch.all(iou.diagonal() > 0.6)  # instance k is the k-th label line
    import cv2

    instances = cv2.imread(str(synth_root / "DOTA" / "train" / "masks" / f"{record.id}.png"), cv2.IMREAD_UNCHANGED)
    entries = []
    for k in range(1, instances.max() + 1):
        rle = mask_utils.encode(np.asfortranarray((instances == k).astype(np.uint8)))
        entries.append({"segmentation": {"size": rle["size"], "counts": rle["counts"].decode()}, "predicted_iou": 0.9})
    (tmp_path / f"{record.id}.json").write_text(json.dumps(entries))
    rle = CocoRleSource(tmp_path)(record, image)
    np.testing.assert_allclose(rle.boxes, png.boxes, atol=1e-5)
    assert np.allclose(rle.scores, 0.9)
    entries[0]["segmentation"]["size"] = [1, 1]
    (tmp_path / f"{record.id}.json").write_text(json.dumps(entries))
    with pytest.raises(ValueError, match="entry 0 mask size"):
        CocoRleSource(tmp_path)(record, image)


def test_dota_box_source_and_felzenszwalb(synth_root: Path):
    record = load_dota(synth_root / "DOTA", "train")[0]
    image = read_rgb(record.image)
    boxes = DotaBoxSource(synth_root / "DOTA" / "train" / "labelTxt")(record, image)
    np.testing.assert_allclose(boxes.boxes, record.boxes, atol=1e-4)
    found = FelzenszwalbSource()(record, image)
    assert found.boxes.shape[1] == 5 and len(found.boxes) >= len(record.boxes) // 2
    recall = (box_iou_rotated(torch.from_numpy(record.boxes), torch.from_numpy(found.boxes)).max(1).values > 0.5)
    assert recall.float().mean() >= 0.5  # the built-in segmenter finds most of the drawn objects


@pytest.mark.parametrize("theta", [0.0, 0.4, -1.0, 1.4])
def test_roi_align_rotated_follows_the_le90_convention(theta: float):
    ys, xs = torch.meshgrid(torch.arange(64.0), torch.arange(64.0), indexing="ij")
    ramp = (xs + 0.5) + 10 * (ys + 0.5)  # value at pixel centres
    image = ramp.expand(3, 64, 64).contiguous()
    crops = rotated_crops(image, torch.tensor([[32.0, 32.0, 16.0, 8.0, theta]]), crop_size=8, enlarge=1.0)
    crop = crops[0, 0]
    # columns step 2 px along (cos, sin) [the w side], rows step 1 px along (-sin, cos) [the h side]
    along_w = (crop[:, 1:] - crop[:, :-1]).mean().item()
    along_h = (crop[1:, :] - crop[:-1, :]).mean().item()
    assert along_w == pytest.approx(2 * (math.cos(theta) + 10 * math.sin(theta)), abs=1e-3)
    assert along_h == pytest.approx(-math.sin(theta) + 10 * math.cos(theta), abs=1e-3)
    assert crop.mean().item() == pytest.approx(32 + 10 * 32, abs=1e-3)


def test_spherical_kmeans_recovers_directions():
    rng = np.random.default_rng(0)
    directions = np.eye(6)[:3]
    points = np.concatenate([d + 0.05 * rng.normal(size=(30, 6)) for d in directions])
    points /= np.linalg.norm(points, axis=1, keepdims=True)
    centroids = spherical_kmeans(points, 3, seed=1)
    np.testing.assert_allclose(np.linalg.norm(centroids, axis=1), 1.0)
    assignment = (points @ centroids.T).argmax(1).reshape(3, 30)
    assert all(len(set(row)) == 1 for row in assignment) and len({row[0] for row in assignment}) == 3
    with pytest.raises(ValueError, match="cannot make 100 clusters"):
        spherical_kmeans(points, 100)


def test_fit_pseudo_classes_shapes_and_errors():
    features = np.random.default_rng(0).normal(size=(40, 12))
    model = fit_pseudo_classes(features, dim=4, clusters=5)
    embeddings = model.embed(features)
    assert embeddings.shape == (40, 4) and np.allclose(np.linalg.norm(embeddings, axis=1), 1, atol=1e-5)
    assert set(model.assign(embeddings)) <= set(range(5))
    with pytest.raises(ValueError, match="PCA to 20 dimensions"):
        fit_pseudo_classes(features, dim=20, clusters=5)


def test_pseudolabel_task_end_to_end_and_resume(synth_root: Path, tmp_path: Path):
    from typer.testing import CliRunner

    from accord.cli import app

    config = {"plugin": "mutdet", "task": "pseudolabel", "run_dir": str(tmp_path / "pseudo"), "seed": 0,
              "data": str(synth_root / "DOTA"), "split": "train", "proposals": "png_masks",
              "proposal_dir": str(synth_root / "DOTA" / "train" / "masks"), "backbone": "resnet18",
              "crop_size": 32, "embed_dim": 4, "clusters": 3, "fit_samples": 8, "device": "cpu"}
    path = tmp_path / "pseudo.yaml"
    path.write_text(yaml.safe_dump(config))
    runner = CliRunner()
    first = runner.invoke(app, ["run", str(path)])
    assert first.exit_code == 0, first.output
    assert "pseudolabel labels: 3/3 images" in first.output
    summary = json.loads((tmp_path / "pseudo" / "pseudolabel.json").read_text())
    assert summary["images"] == 3 and summary["features_computed"] == 3 and summary["labels_written"] == 3
    records = load_dota(synth_root / "DOTA", "train")
    labels = read_pseudo_labels(tmp_path / "pseudo" / "labels" / f"{records[0].id}.npz")
    assert labels["embeddings"].shape == (len(records[0].boxes), 4) and labels["pseudo_class"].max() < 3
    item = DetectionDataset(records, image_size=64, train=True, pseudo_dir=tmp_path / "pseudo" / "labels")[0]
    assert item["embeddings"].shape[1] == 4

    again = runner.invoke(app, ["run", str(path)])  # resumes: nothing left to do
    assert again.exit_code == 0, again.output
    summary = json.loads((tmp_path / "pseudo" / "pseudolabel.json").read_text())
    assert summary["features_computed"] == 0 and summary["labels_written"] == 0

    config.update(clusters=50, run_dir=str(tmp_path / "other"))
    path.write_text(yaml.safe_dump(config))
    failed = runner.invoke(app, ["run", str(path)])
    assert failed.exit_code == 2 and "cannot make clusters=50" in failed.output


def test_backbone_weights_from_a_local_file(tmp_path: Path):
    from accord_mutdet.pseudo import build_backbone

    with pytest.warns(UserWarning, match="the resnet18 is random"):
        random = build_backbone("resnet18")
    state = {**random.state_dict(), "fc.weight": torch.zeros(1000, 512), "fc.bias": torch.zeros(1000)}
    torch.save(state, tmp_path / "resnet18.pth")  # torchvision layout, classifier included
    loaded = build_backbone("resnet18", tmp_path / "resnet18.pth")
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), random.state_dict().values()))
    assert not any(p.requires_grad for p in loaded.parameters()) and not loaded.training
    with pytest.raises(ValueError, match="not resnet34 weights in torchvision layout"):
        build_backbone("resnet34", tmp_path / "resnet18.pth")


def test_mask_file_errors_name_the_file(synth_root: Path, tmp_path: Path):
    record = load_dota(synth_root / "DOTA", "train")[0]
    image = read_rgb(record.image)
    with pytest.raises(FileNotFoundError, match=f"{record.id}.png: instance mask PNG missing"):
        PngMaskSource(tmp_path)(record, image)
    import cv2

    cv2.imwrite(str(tmp_path / f"{record.id}.png"), np.zeros((5, 5), np.uint8))
    with pytest.raises(ValueError, match="expected a single-channel 160x160 instance-id image"):
        PngMaskSource(tmp_path)(record, image)
