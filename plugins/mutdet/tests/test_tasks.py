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


@pytest.mark.parametrize("name, model", [("pretrain", PretrainConfig), ("finetune", FinetuneConfig)])
def test_shipped_configs_give_the_reference_step_schedule(name, model):
    """36 epochs, lr x0.1 after epoch 32 (spec §8), in optimizer steps of the documented dataset size."""
    from accord.config import read_yaml, validate_config
    from accord.training.optim import learning_rate_at

    from accord_mutdet.tasks import resolved_trainer

    path = Path(__file__).parents[3] / "configs" / "mutdet" / f"{name}.yaml"
    cfg = validate_config(model, read_yaml(path), source=str(path), check_paths=False)
    trainer = resolved_trainer(cfg, 11725)  # DIOR-R trainval, the count finetune.yaml documents
    assert (trainer.max_steps, trainer.lr_drop_steps) == (211032, [187584])
    assert learning_rate_at(499, trainer) < learning_rate_at(500, trainer) == pytest.approx(1e-4)
    assert learning_rate_at(187583, trainer) == pytest.approx(1e-4)
    assert learning_rate_at(187584, trainer) == pytest.approx(1e-5)
    assert learning_rate_at(211031, trainer) == pytest.approx(1e-5)


def test_epochs_resolve_into_steps_and_contradictions_are_refused(data, tmp_path):
    from accord_mutdet.tasks import resolved_trainer

    base = dict(plugin="mutdet", task="finetune", run_dir=tmp_path, data=data / "DIOR-R", split="trainval",
                image_size=64, model=DetectorOptions(**TINY, encoder_layers=1, decoder_layers=1))
    step = TrainerConfig(batch_size=2, schedule="step", checkpoint_every=6, warmup_steps=0, log_every=1)
    cfg = FinetuneConfig(**base, epochs=3, lr_drop_epochs=[2], trainer=step)
    assert (resolved_trainer(cfg, 5).max_steps, resolved_trainer(cfg, 5).lr_drop_steps) == (6, [4])
    result = run_task(cfg)  # 4 trainval images at batch 2: 2 steps per epoch
    assert result["step"] == 6 and result["schedule"]["lr_drop_steps"] == [4]
    assert json.loads((tmp_path / "schedule.json").read_text())["steps_per_epoch"] == 2
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    lrs = {record["step"]: record["lr"] for record in records if "lr" in record}
    assert [lrs[s] for s in range(1, 7)] == pytest.approx([1e-3] * 4 + [1e-4] * 2)  # dropped after step 4
    with pytest.raises(ValueError, match="not both"):
        resolved_trainer(FinetuneConfig(**base, epochs=3, lr_drop_epochs=[2],
                                        trainer=step.model_copy(update={"lr_drop_steps": [3]})), 5)
    with pytest.raises(ValueError, match="do not fill one batch"):
        resolved_trainer(FinetuneConfig(**base, epochs=3, trainer=step), 1)
    with pytest.raises(ValueError, match="use schedule: step"):
        FinetuneConfig(**base, epochs=3, lr_drop_epochs=[2])
    with pytest.raises(ValueError, match="needs epochs"):
        FinetuneConfig(**base, lr_drop_epochs=[2], trainer=step)
    with pytest.raises(ValueError, match="increasing epochs"):
        FinetuneConfig(**base, epochs=3, lr_drop_epochs=[3], trainer=step)


@pytest.fixture(scope="module")
def dota_checkpoint(data, tmp_path_factory) -> Path:
    """A 2-step fine-tuned detector for DOTA's 15 classes (its APs do not matter)."""
    cfg = FinetuneConfig(plugin="mutdet", task="finetune", run_dir=tmp_path_factory.mktemp("dota_finetune"),
                         data=data / "DOTA", split="train", image_size=64,
                         model=DetectorOptions(**TINY, encoder_layers=1, decoder_layers=1), trainer=TRAINER)
    return Path(run_task(cfg)["checkpoint"])


def test_dota_evaluation_detects_on_patches_and_scores_merged_full_images(data, dota_checkpoint, tmp_path,
                                                                          monkeypatch):
    """split -> detect -> merge -> AP inside the evaluate task, with an oracle detector: the patches'
    boxes from the full-image truth (cut at no border, so overlapping windows repeat objects) must
    merge back into exactly the truth, AP50 = AP75 = 1, with Task1 lines in full-image pixels."""
    import accord_mutdet.tasks as tasks
    from accord_mutdet.data import load_dota, parse_patch_name

    checkpoint = dota_checkpoint
    truth = {r.id: r for r in load_dota(data / "DOTA", "val")}
    seen = []

    def oracle(model, records, image_size, batch_size):
        out = {}
        for patch in records:
            seen.append(patch.id)
            source, x, y = parse_patch_name(patch.id)
            full = truth[source]
            inside = ((full.boxes[:, 0] >= x) & (full.boxes[:, 0] < x + patch.width)
                      & (full.boxes[:, 1] >= y) & (full.boxes[:, 1] < y + patch.height))
            boxes = full.boxes[inside].copy()
            boxes[:, :2] -= (x, y)
            out[patch.id] = {"boxes": boxes, "scores": np.linspace(0.9, 0.5, len(boxes)),
                             "labels": np.array([model.class_names.index(n) for n, keep in zip(full.labels, inside)
                                                 if keep], np.int64)}
        return out

    monkeypatch.setattr(tasks, "predict_records", oracle)
    cfg = EvaluateConfig(plugin="mutdet", task="evaluate", run_dir=tmp_path / "evaluate", data=data / "DOTA",
                         split="val", checkpoint=checkpoint, patch_size=80, patch_gap=32, dota_task1=True)
    result = run_task(cfg)
    assert result["images"] == len(truth) and result["patches"] == 4 * len(truth) == len(seen)
    assert result["AP50"] == pytest.approx(1.0) and result["AP75"] == pytest.approx(1.0)
    assert sorted(seen) == sorted(p.stem for p in (tmp_path / "evaluate" / "patches" / "images").glob("*.png"))
    lines = [line.split() for path in (tmp_path / "evaluate" / "task1").glob("Task1_*.txt")
             for line in path.read_text().splitlines()]
    assert len(lines) == sum(len(r.boxes) for r in truth.values())
    assert {line[0] for line in lines} == set(truth)  # full-image ids, not patch names
    assert max(float(v) for line in lines for v in line[2:]) > 80  # corners in full-image pixels


def test_dota_evaluation_with_the_trained_detector(data, dota_checkpoint, tmp_path):
    checkpoint = dota_checkpoint
    result = run_task(EvaluateConfig(plugin="mutdet", task="evaluate", run_dir=tmp_path / "evaluate",
                                     data=data / "DOTA", split="val", checkpoint=checkpoint, patch_size=80,
                                     patch_gap=32, merge_score_thr=0.0, dota_task1=True))
    assert result["patches"] == 4 and 0 <= result["AP50"] <= 1
    assert len(list((tmp_path / "evaluate" / "task1").glob("Task1_*.txt"))) == 15  # DOTA-v1.0 classes
    with pytest.raises(ValueError, match=r"classes \['airplane'.* are not among the checkpoint's 15 classes"):
        run_task(EvaluateConfig(plugin="mutdet", task="evaluate", run_dir=tmp_path / "dior", data=data / "DIOR-R",
                                split="test", checkpoint=checkpoint))
    with pytest.raises(ValueError, match="patch_gap"):
        EvaluateConfig(plugin="mutdet", task="evaluate", run_dir=tmp_path, data=data / "DOTA", checkpoint=checkpoint,
                       patch_size=64, patch_gap=64)
