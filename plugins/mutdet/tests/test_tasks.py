"""pretrain -> finetune -> evaluate on tiny generated data, weights mapping, label subsets."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from accord.config import TrainerConfig
from accord.runs import load_run, run_task

from accord_mutdet.data import load_dior_r, synth_mutdet
from accord_mutdet.models import DetectorOptions, MutDetOptions
from accord_mutdet.pseudo.store import write_pseudo_labels
from accord_mutdet.tasks import BoxProbeOptions, EvaluateConfig, FinetuneConfig, PretrainConfig, label_subset

TINY = dict(backbone="tiny", embed_dim=32, num_heads=4, ffn_dim=64, num_queries=12, num_dn_queries=8, dropout=0.0)
TRAINER = TrainerConfig(max_steps=2, batch_size=2, lr=1e-4, checkpoint_every=2, warmup_steps=0,
                        lr_multipliers={"sampling_offsets": 0.1})


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    root = synth_mutdet(tmp_path_factory.mktemp("synth"), num_train=3, num_val=1, num_test=2, size=128,
                        max_objects=4, object_scale=0.6)
    # pseudo-labels in the real per-image format: the generated boxes, random unit embeddings, 4 clusters
    pseudo = root / "pseudo"
    rng = np.random.default_rng(0)
    for record in load_dior_r(root / "DIOR-R", "train"):
        n = len(record.boxes)
        embeddings = rng.normal(size=(n, 16)).astype(np.float32)
        embeddings /= np.linalg.norm(embeddings, axis=1, keepdims=True)
        write_pseudo_labels(pseudo / f"{record.id}.npz", record.boxes, embeddings, rng.integers(0, 4, n), np.ones(n))
    return root


def _pretrain(data: Path, run_dir: Path, enhancement: bool) -> Path:
    probe = BoxProbeOptions(every=2, split="test", fit_steps=5) if enhancement else None
    cfg = PretrainConfig(plugin="mutdet", task="pretrain", run_dir=run_dir, data=data / "DIOR-R", split="train",
                         pseudo_dir=data / "pseudo", image_size=64, num_pseudo_classes=4,
                         model=DetectorOptions(**TINY, encoder_layers=1, decoder_layers=2),
                         mutdet=MutDetOptions(enhancement=enhancement, depth=1, mlp_dim=32, object_dim=16,
                                              encoder_embed_dim=32),
                         trainer=TRAINER, probe=probe)
    result = run_task(cfg)
    if probe is not None:  # the online probe logged before the first and after the last step
        records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        assert sum("probe/miou" in record for record in records) == 2
    assert result["method"] == ("mutdet" if enhancement else "detreg")
    assert np.isfinite(result["loss"])
    return Path(result["checkpoint"])


def test_pretrain_finetune_evaluate(data, tmp_path):
    checkpoint = _pretrain(data, tmp_path / "pretrain", enhancement=True)
    pretrained = load_run(checkpoint).model
    assert hasattr(pretrained, "mutdet") and pretrained.num_classes == 4

    finetune = FinetuneConfig(plugin="mutdet", task="finetune", run_dir=tmp_path / "finetune", data=data / "DIOR-R",
                              split="trainval", label_fraction=0.5, image_size=64, checkpoint=checkpoint,
                              model=DetectorOptions(**TINY, encoder_layers=1, decoder_layers=3),
                              trainer=TrainerConfig(**{**TRAINER.model_dump(), "lr_multipliers": {
                                  "sampling_offsets": 0.1, r"^backbone\.": 0.1}}))
    result = run_task(finetune)
    weights = result["weights"]
    assert weights["init"] == "pretrained" and weights["loaded"] > 0
    assert weights["fresh_layers"] == ["decoder.2", "reg_heads.2", "angle_heads.2"]
    assert "cls_heads.0-2" in weights["reinitialised"] and "mutdet.enhancement" in weights["dropped"]
    assert result["labelled_images"] == 2  # half of the 4 trainval images
    assert (tmp_path / "finetune" / "label_split.txt").read_text().count("\n") == 2

    model = load_run(result["checkpoint"]).model
    assert model.class_names[0] == "airplane" and len(model.class_names) == 20
    found = model.predict(torch.randn(1, 3, 64, 64))[0]
    assert found["boxes"].shape[1] == 5

    scores = run_task(EvaluateConfig(plugin="mutdet", task="evaluate", run_dir=tmp_path / "evaluate",
                                     data=data / "DIOR-R", checkpoint=result["checkpoint"], split="test"))
    assert 0 <= scores["AP50"] <= 1 and 0 <= scores["AP75"] <= 1
    assert scores["AP50_per_class"]["windmill"] is None or "windmill" in scores["AP50_per_class"]
    assert (tmp_path / "evaluate" / "evaluation.json").is_file()

    strict = finetune.model_copy(update={"run_dir": tmp_path / "strict", "layer_mapping": "strict"})
    with pytest.raises(ValueError, match="layer counts differ"):
        run_task(strict)
    wrong = finetune.model_copy(update={"run_dir": tmp_path / "wrong",
                                        "model": DetectorOptions(**{**TINY, "embed_dim": 16}, encoder_layers=1,
                                                                 decoder_layers=2)})
    with pytest.raises(ValueError, match="do not map"):
        run_task(wrong)
    with pytest.raises(ValueError, match="finetune checkpoint"):
        run_task(EvaluateConfig(plugin="mutdet", task="evaluate", run_dir=tmp_path / "e2", data=data / "DIOR-R",
                                checkpoint=checkpoint))


def test_detreg_style_pretraining_has_no_mutdet_modules(data, tmp_path):
    checkpoint = _pretrain(data, tmp_path / "detreg", enhancement=False)
    state = torch.load(checkpoint, map_location="cpu", weights_only=True)["model"]
    assert not any(key.startswith("mutdet.") for key in state)


def test_pretrain_refuses_mismatched_pseudo_labels(data, tmp_path):
    cfg = PretrainConfig(plugin="mutdet", task="pretrain", run_dir=tmp_path, data=data / "DIOR-R", split="train",
                         pseudo_dir=data / "pseudo", image_size=64, num_pseudo_classes=2,
                         model=DetectorOptions(**TINY, encoder_layers=1, decoder_layers=1), trainer=TRAINER)
    with pytest.raises(ValueError, match="num_pseudo_classes"):
        run_task(cfg)
    cfg = cfg.model_copy(update={"num_pseudo_classes": 4})  # object_dim 256 vs the files' 16
    with pytest.raises(ValueError, match="object_dim"):
        run_task(cfg)


def test_label_subset_is_fixed_by_its_seed():
    records = list(range(50))
    first = label_subset(records, 0.1, seed=0)
    assert first == label_subset(records, 0.1, seed=0) and len(first) == 5 and first == sorted(first)
    assert first != label_subset(records, 0.1, seed=1)
    assert len(label_subset(records[:3], 0.1, seed=0)) == 1


@pytest.mark.parametrize("name, model", [("pretrain", PretrainConfig), ("finetune", FinetuneConfig),
                                         ("evaluate", EvaluateConfig)])
def test_shipped_configs_validate(name, model):
    from accord.config import read_yaml, validate_config

    path = Path(__file__).parents[3] / "configs" / "mutdet" / f"{name}.yaml"
    cfg = validate_config(model, read_yaml(path), source=str(path), check_paths=False)
    assert cfg.task == name
    if name == "pretrain":
        assert (cfg.model.encoder_layers, cfg.model.decoder_layers) == (2, 2) and cfg.mutdet.tau == 0.2
    if name == "finetune":
        assert (cfg.model.encoder_layers, cfg.model.decoder_layers) == (6, 6)


@pytest.mark.parametrize("task", ["pretrain", "finetune"])
def test_tasks_rerun_and_resume_bit_exact(data, tmp_path, task):
    from accord.testing.reruns import assert_reruns_are_bit_exact

    trainer = TrainerConfig(**{**TRAINER.model_dump(), "max_steps": 4, "checkpoint_every": 2})
    model = DetectorOptions(**TINY, encoder_layers=1, decoder_layers=2)

    def config(run_dir: Path):
        if task == "pretrain":
            return PretrainConfig(plugin="mutdet", task="pretrain", run_dir=run_dir, data=data / "DIOR-R",
                                  split="train", pseudo_dir=data / "pseudo", image_size=64, num_pseudo_classes=4,
                                  model=model, mutdet=MutDetOptions(depth=1, mlp_dim=32, object_dim=16,
                                                                    encoder_embed_dim=32), trainer=trainer)
        return FinetuneConfig(plugin="mutdet", task="finetune", run_dir=run_dir, data=data / "DIOR-R",
                              split="trainval", label_fraction=0.5, image_size=64, model=model, trainer=trainer)

    assert_reruns_are_bit_exact(config, tmp_path)
