"""The train and evaluate tasks end to end on tiny generated data, and their rules."""

from pathlib import Path

import pytest
import torch

from accord.config import TrainerConfig
from accord.runs import load_run, run_task
from accord.training import TrainingState
from accord_medrpg.models import TacoOptions
from accord_medrpg.models.transvg import quick_options
from accord_medrpg.tasks import REFERENCE_LR_MULTIPLIERS, EpochSchedule, EvaluateConfig, TrainConfig, build_model

TINY_MODEL = dict(image_size=64, dim=16, max_query_len=8, resnet_widths=[4, 4, 8, 8], ffn_dim=32, vocab_size=120,
                  bert_config=dict(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32))


def train_config(data: Path, run_dir: Path, taco_mode="max_image_lcpTriple", **overrides) -> TrainConfig:
    values = dict(plugin="medrpg", task="train", run_dir=run_dir, seed=3, data=data,
                  model=quick_options(**TINY_MODEL), taco=TacoOptions(mode=taco_mode), epochs=2, eval_batch_size=8,
                  trainer=TrainerConfig(batch_size=4, lr=1e-3, schedule="constant", log_every=1,
                                        lr_multipliers=REFERENCE_LR_MULTIPLIERS))
    return TrainConfig(**{**values, **overrides})


@pytest.fixture(scope="module")
def trained(grounding_dir, tmp_path_factory):
    """One tiny 2-epoch MedRPG run: (train result, data directory)."""
    return run_task(train_config(grounding_dir, tmp_path_factory.mktemp("medrpg-run"))), grounding_dir


def test_train_validates_each_epoch_and_keeps_a_reloadable_best_checkpoint(trained):
    result, data = trained
    steps_per_epoch = sum(1 for _ in open(data / "train.jsonl")) // 4
    assert result["step"] == 2 * steps_per_epoch
    assert {"loss", "l1", "giou", "taco"} <= set(result)
    assert 0 <= result["test"]["acc"] <= 1 and 0 <= result["test"]["miou"] <= 1
    assert result["best_step"] in (steps_per_epoch, 2 * steps_per_epoch)  # validated once per epoch
    # The best-mIoU checkpoint rebuilds the model, tokenizer included, from the file alone.
    best = load_run(result["best_checkpoint"])
    assert best.step == result["best_step"]
    assert best.model.text.tokenizer(["cardiomegaly"])[0].shape == (1, 8)


def evaluate_config(result, data, run_dir) -> EvaluateConfig:
    return EvaluateConfig(plugin="medrpg", task="evaluate", run_dir=run_dir, checkpoint=result["best_checkpoint"],
                          data=data, batch_size=3, device="cpu")


def test_evaluate_scores_the_best_checkpoint_as_training_did(trained, tmp_path):
    result, data = trained
    evaluated = run_task(evaluate_config(result, data, tmp_path))
    assert evaluated["acc"] == pytest.approx(result["test"]["acc"])
    assert evaluated["miou"] == pytest.approx(result["test"]["miou"])
    for category, row in result["test"]["per_category"].items():
        assert evaluated["per_category"][category] == pytest.approx(row)


def _evaluate_on_rank(rank, world_size, config):
    from accord_medrpg.tasks import evaluate

    return evaluate(config)


@pytest.mark.dist
@pytest.mark.slow
def test_two_process_evaluate_equals_single_process(trained, tmp_path):
    from accord.testing.dist import run_distributed

    result, data = trained
    config = evaluate_config(result, data, tmp_path)
    single = run_task(config)
    for per_rank in run_distributed(_evaluate_on_rank, world_size=2, args=(config,)):
        assert per_rank["count"] == single["count"]
        assert per_rank["miou"] == pytest.approx(single["miou"])
        for category, row in single["per_category"].items():
            assert per_rank["per_category"][category] == pytest.approx(row)


def test_transvg_and_medrpg_start_from_identical_weights(grounding_dir, tmp_path):
    phrases = ["left effusion", "cardiomegaly"]
    models = []
    for mode in ("none", "max_image_lcpTriple"):
        torch.manual_seed(7)
        models.append(build_model(train_config(grounding_dir, tmp_path, taco_mode=mode), phrases)[0])
    for (name, a), (_, b) in zip(models[0].state_dict().items(), models[1].state_dict().items()):
        assert torch.equal(a, b), name


def test_epoch_schedule_ramps_taco_and_sets_the_dataset_epoch():
    class Dataset:
        epoch = None

        def set_epoch(self, epoch):
            self.epoch = epoch

    model, dataset = torch.nn.Module(), Dataset()
    schedule = EpochSchedule(TacoOptions(), steps_per_epoch=10, epochs=4, dataset=dataset)
    for step, epoch in ((0, 0), (9, 0), (10, 1), (35, 3), (40, 3)):
        schedule.on_step(TrainingState(step=step, max_steps=40, model=model, run_dir=Path("."), is_main=True,
                                       resumed=None, reporter=None))
        assert dataset.epoch == epoch
        assert model.taco_scale == pytest.approx(0.05 * (epoch / 4) ** 0.9)


def test_max_steps_follow_epochs_and_a_contradiction_is_refused(grounding_dir, tmp_path):
    cfg = train_config(grounding_dir, tmp_path / "run",
                       trainer=TrainerConfig(batch_size=4, max_steps=999, schedule="constant"))
    with pytest.raises(ValueError, match="trainer.max_steps=999 contradicts epochs=2"):
        run_task(cfg)
    cfg = train_config(grounding_dir, tmp_path / "run2", trainer=TrainerConfig(batch_size=4000, schedule="constant"))
    with pytest.raises(ValueError, match="do not fill one batch"):
        run_task(cfg)


def test_marker_pooling_refuses_unmarked_training_phrases_before_training(grounding_dir, tmp_path):
    cfg = train_config(grounding_dir, tmp_path / "run", taco=TacoOptions(mode="batch", text_pool="marker"))
    with pytest.raises(ValueError, match="the vocabulary has no '\\*' token"):
        build_model(cfg, ["cardiomegaly", "left effusion"])
    with pytest.raises(ValueError, match="phrase 'left effusion': has fewer than two"):
        build_model(cfg, ["*cardiomegaly*", "left effusion"])
    model, _ = build_model(cfg, ["*cardiomegaly*", "a *left effusion*"])
    assert model.taco.text_pool == "marker"
    assert not (tmp_path / "run").exists()


def test_the_reference_steplr_drop_is_placed_after_lr_drop_epoch():
    from accord_medrpg.tasks import _resolved_trainer

    cfg = train_config(Path("."), Path("run"), epochs=5, lr_drop_epoch=3,
                       trainer=TrainerConfig(batch_size=4, schedule="step"))
    trainer, steps_per_epoch = _resolved_trainer(cfg, train_size=10)
    assert steps_per_epoch == 2 and trainer.lr_drop_steps == [6] and trainer.max_steps == 10
    assert TrainConfig.model_fields["trainer"].default_factory().schedule == "step"
    late = train_config(Path("."), Path("run"), epochs=5, lr_drop_epoch=60, trainer=TrainerConfig(batch_size=4, schedule="step"))
    assert _resolved_trainer(late, train_size=10)[0].lr_drop_steps == []


def test_train_reruns_and_resumes_bit_exact(grounding_dir, tmp_path):
    from accord.testing.reruns import assert_reruns_are_bit_exact

    assert_reruns_are_bit_exact(lambda run_dir: train_config(grounding_dir, run_dir), tmp_path)
