"""The pretrain task: its views, its config and its refusal of invalid data."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import default_collate

from accord.config import ConfigError, validate_config
from accord_medssl.anatomy import AnatomyEmbeddingModel, AnatomyEmbeddingOptions, crop_with_zero_padding
from accord_medssl.alice import AliceOptions
from accord_medssl.tasks import (
    ALICE_EMA_MOMENTUM,
    ALICE_PROTOTYPES,
    ALICE_TRAINER_DEFAULTS,
    AlicePretraining,
    PretrainConfig,
    build_pretraining,
)
from accord_medssl.views import pretraining_items, volume_key

REPO = Path(__file__).resolve().parents[3]


def _config(data: Path, **fields: object) -> PretrainConfig:
    return PretrainConfig(plugin="medssl", task="pretrain", data=data, cache="memory", **fields)


def test_anatomy_views_are_crops_at_their_recorded_geometry(msd_root: Path) -> None:
    cfg = _config(msd_root, method="anatomy_embedding", crop_size=(16, 16, 16),
                  views={"scale_range": (1.0, 1.0), "intensity_jitter": 0.0})
    model, dataset = build_pretraining(cfg)
    assert len(dataset) == len(pretraining_items(msd_root)) == 5  # 4 training + 1 test image
    torch.manual_seed(0)
    sample = dataset[2]
    volume = dataset.volumes[2]["image"].as_subclass(torch.Tensor)
    for view in ("a", "b"):
        affine = sample[f"affine_{view}"]
        assert sample[f"view_{view}"].shape == (1, 16, 16, 16) and affine.shape == (4, 4)
        # Unit scale: the crop is the volume box starting at the affine's translation.
        torch.testing.assert_close(affine[:3, :3], torch.eye(3, dtype=torch.float64))
        start = affine[:3, 3].round().long().tolist()
        torch.testing.assert_close(sample[f"view_{view}"], crop_with_zero_padding(volume, start, (16, 16, 16)))
    terms = model(default_collate([dataset[0], dataset[1]]))
    assert set(terms) == {"loss", "global", "local"} and all(torch.isfinite(v) for v in terms.values())


def _write_embeddings(root: Path, out: Path) -> None:
    """Precomputed maps of every volume from an untrained embedding network (the file format)."""
    torch.manual_seed(0)
    network = AnatomyEmbeddingModel(AnatomyEmbeddingOptions(widths=(4, 8, 8), fpn_dim=8, global_dim=8, local_dim=8))
    _, dataset = build_pretraining(_config(root, method="anatomy_embedding"))
    for index, item in enumerate(pretraining_items(root)):
        embedding = network.embed_volume(dataset.volumes[index]["image"].as_subclass(torch.Tensor))
        key = out / volume_key(item["image"], root)
        key.parent.mkdir(parents=True, exist_ok=True)
        np.save(f"{key}_global.npy", embedding.global_map.numpy())
        np.save(f"{key}_local.npy", embedding.local_map.numpy())


def test_alice_views_pair_two_volumes_and_follow_the_global_rng(msd_root: Path, tmp_path: Path, tiny_alice: dict) -> None:
    _write_embeddings(msd_root, tmp_path / "embeddings")
    cfg = _config(msd_root, method="alice", crop_size=(32, 32, 32), alice=tiny_alice,
                  mining={"embeddings": tmp_path / "embeddings", "similarity_threshold": 0.5})
    model, dataset = build_pretraining(cfg)
    assert isinstance(model, AlicePretraining)
    volumes = [dataset.volumes[i]["image"].as_subclass(torch.Tensor) for i in range(len(dataset))]
    for index in range(len(dataset)):
        sample = dataset[index]
        assert sample["query"].shape == sample["anchor"].shape == (1, 32, 32, 32)
        assert bool(sample["accepted"]) == bool(sample["scores"] > 0.5)
        query_start, anchor_start = sample["query_boxes"][0].tolist(), sample["anchor_boxes"][0].tolist()
        torch.testing.assert_close(sample["query"], crop_with_zero_padding(volumes[index], query_start, (32, 32, 32)))
        sources = [j for j, v in enumerate(volumes) if torch.equal(sample["anchor"], crop_with_zero_padding(v, anchor_start, (32, 32, 32)))]
        assert sources and index not in sources, f"anchor of sample {index} cut from volumes {sources}"
    torch.manual_seed(7)
    first = dataset[1]
    torch.manual_seed(7)
    again = dataset[1]
    assert all(torch.equal(first[key], again[key]) for key in first)
    terms = model(default_collate([dataset[0], dataset[1]]))
    assert {"loss", "dino", "token", "reconstruction", "pair_similarity", "pair_accepted"} <= set(terms)


def test_alice_config_defaults_and_limits(msd_root: Path, tmp_path: Path) -> None:
    alice = _config(msd_root, method="alice", mining={"embeddings": tmp_path})
    assert alice.trainer.ema_momentum == ALICE_EMA_MOMENTUM and alice.trainer.ema_momentum_end == 1.0
    assert _config(msd_root, method="alice", trainer={"ema_momentum": 0.99}).trainer.ema_momentum == 0.99
    assert _config(msd_root, method="anatomy_embedding").trainer.ema_momentum is None
    with pytest.raises(ValueError, match=r"crop_size \(48, 48, 48\) must be multiples of 32 for method alice"):
        _config(msd_root, method="alice", crop_size=(48, 48, 48))
    raw = {"plugin": "medssl", "task": "pretrain", "data": str(msd_root), "mining": {"embedings": "x"}}
    with pytest.raises(ConfigError, match=r"unknown key 'mining.embedings' \(did you mean 'mining.embeddings'\?\)"):
        validate_config(PretrainConfig, raw, "cfg.yaml")
    with pytest.raises(ValueError, match="mining: set exactly one of anatomy_checkpoint and embeddings"):
        build_pretraining(_config(msd_root, method="alice"))
    with pytest.raises(ValueError, match="mining.anatomy_checkpoint: path does not exist"):
        build_pretraining(_config(msd_root, method="alice", mining={"anatomy_checkpoint": tmp_path / "nope.pt"}))



def test_alice_gets_the_reference_optimisation_unless_the_config_sets_it(msd_root: Path, tmp_path: Path) -> None:
    mining = {"embeddings": tmp_path}
    trainer = _config(msd_root, method="alice", mining=mining).trainer
    for name, value in ALICE_TRAINER_DEFAULTS.items():
        assert getattr(trainer, name) == value, name
    explicit = _config(msd_root, method="alice", mining=mining,
                       trainer={"weight_decay_end": None, "grad_clip_mode": "global"}).trainer
    assert explicit.weight_decay_end is None and explicit.grad_clip_mode == "global"
    assert explicit.weight_decay_exempt_1d  # the fields left unset still get the defaults
    anatomy = _config(msd_root, method="anatomy_embedding").trainer
    assert anatomy.freeze_parameters is None and anatomy.grad_clip_mode == "global"


def test_alice_prototype_pattern_matches_exactly_the_student_prototype_layers(tiny_alice: dict) -> None:
    import re

    names = [name for name, _ in AlicePretraining(AliceOptions(**tiny_alice)).named_parameters()]
    frozen = {name for name in names if re.search(ALICE_PROTOTYPES, name)}
    assert frozen and all(".last_layer." in name and name.startswith("student.") for name in frozen)
    assert {name.split(".")[1] for name in frozen} == {"pooled_head", "token_head"}


def test_pretraining_refuses_an_invalid_dataset_with_the_check_messages(only_medssl, msd_root: Path, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from accord.cli import app

    broken = shutil.copytree(msd_root, tmp_path / "broken")
    (broken / "labelsTr" / "phantom_001.nii.gz").unlink()
    run_dir = tmp_path / "run"
    result = CliRunner().invoke(app, ["run", str(REPO / "configs/medssl/anatomy_embedding.yaml"),
                                      f"data={broken}", f"run_dir={run_dir}", f"cache_dir={tmp_path / 'cache'}"])
    assert result.exit_code == 2, result.output
    assert "failed 1 check(s)" in result.output
    assert f"{broken / 'labelsTr' / 'phantom_001.nii.gz'}: missing" in result.output
    assert not (run_dir / "checkpoints").exists()
