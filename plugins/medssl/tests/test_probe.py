"""The online probe of medssl pretraining: its labelled voxels, the features it reads, a run that logs it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from accord_medssl.probe import VoxelProbeSet, alice_voxel_features, voxel_probe
from accord_medssl.tasks import PretrainConfig, pretrain, pretraining_model

TINY_ANATOMY = {"model": {"widths": (4, 8, 8), "fpn_dim": 8, "global_dim": 8, "local_dim": 8}}


def _config(msd_root: Path, tmp_path: Path, method: str, tiny_alice: dict, **changes) -> PretrainConfig:
    options = {"alice": tiny_alice, "mining": {"embeddings": str(tmp_path)}} if method == "alice" else {
        "anatomy_embedding": TINY_ANATOMY}
    return PretrainConfig(plugin="medssl", task="pretrain", data=msd_root, run_dir=tmp_path / "run", cache="memory",
                          method=method, crop_size=(32, 32, 32), probe={"every": 1, "train_voxels_per_class": 20,
                                                                         "test_voxels": 300}, **options, **changes)


def test_the_probe_set_splits_cases_and_draws_its_voxels_once(msd_root: Path, tmp_path: Path, tiny_alice: dict) -> None:
    cfg = _config(msd_root, tmp_path, "anatomy_embedding", tiny_alice)
    probe_set = VoxelProbeSet(cfg)
    # 4 cases: 2 fit, 2 score; 2 crops each.
    assert [len(probe_set.crops[part]) for part in ("train", "test")] == [4, 4]
    for image, labels, voxels in probe_set.crops["train"]:
        assert image.shape == (1, 32, 32, 32) and labels.shape == voxels.shape
        # Class-balanced: at most 20 voxels of each class of the crop, and every class of the crop is there.
        assert torch.bincount(labels).max() <= 20 and len(labels.unique()) > 1
    assert all(len(voxels) == 300 for _, _, voxels in probe_set.crops["test"])
    again = VoxelProbeSet(cfg)
    assert all(torch.equal(a[2], b[2]) for a, b in zip(probe_set.crops["train"], again.crops["train"]))
    with pytest.raises(ValueError, match="probe.cases is 6 but .* has 4 labelled cases"):
        VoxelProbeSet(cfg.model_copy(update={"probe": cfg.probe.model_copy(update={"cases": 6})}))
    with pytest.raises(ValueError, match="probe: needs labelled cases: .* segmentation needs an MSD dataset"):
        VoxelProbeSet(cfg.model_copy(update={"data": tmp_path}))


def test_alice_features_are_the_last_decoder_block_and_the_upsampled_decoder_tokens(
    msd_root: Path, tmp_path: Path, tiny_alice: dict
) -> None:
    model = pretraining_model(_config(msd_root, tmp_path, "alice", tiny_alice)).eval()
    images = torch.rand(1, 1, 32, 32, 32)
    features = alice_voxel_features(model, images)
    backbone = model.backbone.swin_unetr
    output = model.backbone(images)
    feature_size = tiny_alice["backbone"]["feature_size"]
    assert features.shape == (1, 9 * feature_size, 32, 32, 32)
    # The decoder1 part is what SwinUNETR's 1x1x1 output layer reads: applying it gives the reconstruction.
    torch.testing.assert_close(backbone.out(features[:, :feature_size]), output.reconstruction)
    tokens = output.decoder_tokens.transpose(1, 2).reshape(1, -1, *output.decoder_grid)
    torch.testing.assert_close(features[:, feature_size:], F.interpolate(tokens, size=(32, 32, 32), mode="trilinear"))


@pytest.mark.parametrize("method", ["anatomy_embedding", "alice"])
def test_extract_gives_the_features_of_the_sampled_voxels(msd_root: Path, tmp_path: Path, tiny_alice: dict,
                                                          method: str) -> None:
    cfg = _config(msd_root, tmp_path, method, tiny_alice)
    model = pretraining_model(cfg)
    probe = voxel_probe(cfg)
    data = probe.extract(model.eval())
    channels = 9 * tiny_alice["backbone"]["feature_size"] if method == "alice" else 8
    assert data.train_features.shape[1] == data.test_features.shape[1] == channels
    assert len(data.test_labels) == 4 * 300 and int(data.train_labels.max()) <= 6
    metrics = probe.probe(model)
    assert {"probe/dice", "probe/miou", "probe/dice/liver"} <= metrics.keys() and "probe/dice/background" not in metrics


def test_pretraining_with_a_probe_logs_its_curve(only_medssl, msd_root: Path, tmp_path: Path, tiny_alice: dict) -> None:
    cfg = _config(msd_root, tmp_path, "anatomy_embedding", tiny_alice,
                  trainer={"max_steps": 3, "batch_size": 2, "warmup_steps": 0, "checkpoint_every": 3})
    cfg = cfg.model_copy(update={"probe": cfg.probe.model_copy(update={"every": 2})})
    pretrain(cfg)
    records = [json.loads(line) for line in (cfg.run_dir / "metrics.jsonl").read_text().splitlines()]
    probes = [record for record in records if "probe/dice" in record]
    assert [record["step"] for record in probes] == [0, 2, 3]
    assert all(0 <= record["probe/dice"] <= 1 for record in probes)
