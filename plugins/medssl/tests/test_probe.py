"""The online probe of medssl pretraining (its labelled voxels, the features it reads, a run that logs it) and the
benchmark's frozen probe."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from accord_medssl.probe import FrozenProbeConfig, VoxelProbeSet, alice_voxel_features, frozen_probe, voxel_probe
from accord_medssl.tasks import PretrainConfig, pretrain, pretraining_model

TINY_ANATOMY = {"model": {"widths": (4, 8, 8), "fpn_dim": 8, "global_dim": 8, "local_dim": 8}}
TINY_BACKBONE = {"feature_size": 12, "depths": (1, 1, 1, 1), "num_heads": (1, 2, 4, 8), "window_size": 4, "norm_name": "batch"}


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


def test_the_frozen_probe_fits_on_the_labelled_cases_and_scores_the_test_case(msd_root: Path, tmp_path: Path) -> None:
    def probe(seed: int, label_fraction: float = 1.0) -> dict:
        cfg = FrozenProbeConfig(plugin="medssl", data=msd_root, run_dir=tmp_path / f"{seed}_{label_fraction}",
                                cache="memory", backbone=TINY_BACKBONE, crop_size=(32, 32, 32), seed=seed,
                                label_fraction=label_fraction,
                                probe={"voxels_per_class": 30, "test_voxels": 2000, "fit_steps": 20})
        result = frozen_probe(cfg)
        assert json.loads((cfg.run_dir / "results.json").read_text()) == result
        return result

    result = probe(seed=0)
    # 4 cases: 1 test, 1 validation, 2 train; label_fraction 0.5 keeps 1 of them.
    assert (result["labelled_cases"], result["test_cases"]) == (2, 1)
    assert probe(seed=0, label_fraction=0.5)["labelled_cases"] == 1
    assert list(result["dice_per_class"]) == ["liver", "spleen", "kidney_right", "kidney_left", "spine", "aorta"]
    assert all(value is None or 0.0 <= value <= 1.0 for value in result["dice_per_class"].values())
    assert 0.0 < result["dice"] <= 1.0 and result["initialisation"] == {"checkpoint": None}
    # The random network and the voxels come from the seed.
    assert probe(seed=0) == result and probe(seed=1) != result
