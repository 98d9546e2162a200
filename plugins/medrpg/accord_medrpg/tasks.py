"""MedRPG's tasks: ``train`` (supervised grounding, TaCo as the auxiliary loss) and ``evaluate``.

``train`` follows the reference protocol: AdamW (weight decay 1e-4) with per-module learning rates
(5e-5, BERT / ResNet / DETR encoder 1e-5, through ``trainer.lr_multipliers``), batch 8, validation
on the ``val`` split every epoch, the weights of the best validation mIoU kept and scored on
``test``. TaCo's weight ramps as ``0.05 (epoch / epochs)^0.9`` (:class:`EpochSchedule`).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch
from pydantic import Field

from accord.config import ExistingPath, RunConfig, StrictModel, TrainerConfig
from accord.training import BestCheckpoint, Callback, Trainer, TrainingState, trainer_for_epochs
from accord_medrpg.models import TacoOptions, TransVG, TransVGOptions

if TYPE_CHECKING:
    from accord_medrpg.evaluation import GroundingScores

__all__ = ["REFERENCE_LR_MULTIPLIERS", "InitOptions", "TrainConfig", "EvaluateConfig", "EpochSchedule",
           "transvg_model", "build_model", "score", "train", "evaluate", "BEST_CHECKPOINT"]

#: The reference's per-module learning rates relative to ``trainer.lr`` = 5e-5: BERT, the ResNet and
#: the visual transformer (with its input projection) at 1e-5.
REFERENCE_LR_MULTIPLIERS = {r"^text\.bert\.": 0.2, r"^visual\.backbone\.": 0.2, r"^visual\.(input_proj|encoder)\.": 0.2}
#: The best-validation-mIoU weights as a self-describing checkpoint (``accord.runs.load_run``).
BEST_CHECKPOINT = "best_miou.pt"


class InitOptions(StrictModel):
    """Initial weights from local files (none: random initialisation; BERT from ``model.bert_path``)."""

    transvg: ExistingPath | None = Field(
        None, description="TransVG / MedRPG checkpoint (e.g. TransVG_R50_unc.pth): the whole model, strictly")
    detr: ExistingPath | None = Field(None, description="DETR checkpoint (detr-r50.pth): ResNet + visual encoder")


def _reference_trainer() -> TrainerConfig:
    return TrainerConfig(batch_size=8, lr=5e-5, weight_decay=1e-4, schedule="step",
                         lr_multipliers=REFERENCE_LR_MULTIPLIERS, checkpoint_every=79, log_every=10)


class TrainConfig(RunConfig):
    """``accord run configs/medrpg/train.yaml``: TransVG (+ TaCo) on a converted grounding directory."""

    task: str = "train"
    data: ExistingPath = Field(description="converted directory with train.jsonl and val.jsonl (test.jsonl scored "
                                           "at the end); see accord data convert medrpg")
    model: TransVGOptions = TransVGOptions()
    taco: TacoOptions = TacoOptions()
    init: InitOptions = InitOptions()
    epochs: int = Field(90, ge=1, description="epochs; trainer.max_steps = epochs x (train size // batch size)")
    lr_drop_epoch: int = Field(60, ge=1, description="with trainer.schedule step: every rate x trainer.lr_drop_factor "
                                                     "after this many epochs (the reference's StepLR --lr_drop)")
    num_negatives: int = Field(5, ge=1, description="random same-image negative boxes per sample (TaCo)")
    augment: bool = Field(True, description="the reference's resize / crop / colour / translate policy (no flip)")
    eval_batch_size: int = Field(32, ge=1)
    trainer: TrainerConfig = Field(default_factory=_reference_trainer)


class EvaluateConfig(RunConfig):
    """``accord run``: Acc@0.5, mIoU and per-category scores of a checkpoint on one split."""

    task: str = "evaluate"
    checkpoint: ExistingPath = Field(description="a train run's checkpoint (best_miou.pt or checkpoints/step_*.pt)")
    data: ExistingPath = Field(description="converted directory holding <split>.jsonl")
    split: str = "test"
    batch_size: int = Field(32, ge=1)
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto: cuda:LOCAL_RANK when available")


class EpochSchedule(Callback):
    """Before every step: TaCo's weight ``weight * (epoch / epochs) ** power`` on the model
    (``model.taco_scale``) and the epoch of the dataset's negatives and augmentation (epoch 0-based).

    Args:
        taco: TaCo's options.
        steps_per_epoch: optimizer steps per epoch.
        epochs: the run's epochs ``E``.
        dataset: the training dataset (its ``set_epoch``).
    """

    def __init__(self, taco: TacoOptions, steps_per_epoch: int, epochs: int, dataset: Any) -> None:
        self.taco, self.steps_per_epoch, self.epochs, self.dataset = taco, steps_per_epoch, epochs, dataset

    def _set(self, state: TrainingState) -> None:
        from accord_medrpg.taco import taco_weight

        epoch = min(state.step // self.steps_per_epoch, self.epochs - 1)
        state.model.taco_scale = taco_weight(epoch, self.epochs, self.taco.weight, self.taco.power)
        self.dataset.set_epoch(epoch)

    def on_train_start(self, state: TrainingState) -> None:
        self._set(state)

    def on_step(self, state: TrainingState) -> None:
        self._set(state)


def transvg_model(cfg: TrainConfig, vocabulary: list[str], bert_config: dict[str, Any]) -> TransVG:
    """Model factory ``medrpg.transvg``: the architecture of a train run (no weights)."""
    return TransVG(cfg.model, cfg.taco, vocabulary, bert_config)


def build_model(cfg: TrainConfig, train_phrases: list[str]) -> tuple[TransVG, dict[str, Any]]:
    """The initialised model of a train run and the ``model_options`` that rebuild it.

    BERT comes from ``model.bert_path`` (vocabulary, config and weights), else from
    ``model.bert_config`` with a WordPiece vocabulary trained on ``train_phrases``; then the DETR and
    TransVG checkpoints of ``init``, in that order, overwrite what they hold. With TaCo's ``marker``
    pooling every training phrase must mark its span (ValueError naming the first that does not).
    """
    from accord_medrpg.models import read_bert_folder, train_vocabulary
    from accord_medrpg.weights import load_bert, load_detr, load_transvg

    if cfg.model.bert_path is not None:
        vocabulary, bert_config = read_bert_folder(cfg.model.bert_path)
    else:
        vocabulary, bert_config = train_vocabulary(train_phrases, cfg.model.vocab_size), dict(cfg.model.bert_config)
    model = transvg_model(cfg, vocabulary, bert_config)
    if cfg.taco.mode != "none" and cfg.taco.text_pool == "marker":
        model.text.tokenizer.marker_span(train_phrases)  # refuse an unmarked phrase now, not mid-epoch
    if cfg.model.bert_path is not None:
        load_bert(model, cfg.model.bert_path)
    if cfg.init.detr is not None:
        load_detr(model, cfg.init.detr)
    if cfg.init.transvg is not None:
        load_transvg(model, cfg.init.transvg)
    return model, {"vocabulary": vocabulary, "bert_config": bert_config}


def score(model: TransVG, dataset: torch.utils.data.Dataset, batch_size: int) -> GroundingScores:
    """Acc@0.5, mIoU and per-category scores of ``model`` on the whole ``dataset``, in this process.

    Validation runs on rank 0 alone (the trainer's contract), so no collective may run here, which
    :func:`accord_medrpg.evaluation.evaluate_grounding` would under DDP; the IoUs and the table come
    from the same functions.
    """
    from accord_medrpg.data import canvas_to_original, collate_grounding
    from accord_medrpg.evaluation import grounding_scores, sample_ious

    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=collate_grounding)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    ious, categories = [], []
    try:
        with torch.no_grad():
            for batch in loader:
                out = model(batch["image"].to(device), batch["image_mask"].to(device), batch["phrase"])
                pred = canvas_to_original(out["pred_box"].cpu(), batch["meta"])
                ious.append(sample_ious(pred, canvas_to_original(batch["box"], batch["meta"])))
                categories += batch["category"]
    finally:
        model.train(was_training)
    return grounding_scores(torch.cat(ious), categories)


def _scores_record(scores: GroundingScores) -> dict[str, Any]:
    return {"acc": scores.acc, "miou": scores.miou, "count": scores.count, "per_category": scores.per_category}


def _dataset(cfg: TrainConfig, split: str, train: bool) -> torch.utils.data.Dataset:
    from accord_medrpg.data import GroundingDataset

    return GroundingDataset(Path(cfg.data) / f"{split}.jsonl", image_size=cfg.model.image_size, train=train,
                            num_negatives=cfg.num_negatives, augment=cfg.augment and train, seed=cfg.seed)


def _resolved_trainer(cfg: TrainConfig, train_size: int) -> tuple[TrainerConfig, int]:
    if cfg.trainer.schedule == "step" and cfg.trainer.lr_drop_steps:
        raise ValueError("trainer.lr_drop_steps is derived from lr_drop_epoch; set lr_drop_epoch instead")
    drops = [cfg.lr_drop_epoch] if cfg.trainer.schedule == "step" and cfg.lr_drop_epoch < cfg.epochs else []
    trainer, steps_per_epoch = trainer_for_epochs(cfg.trainer, cfg.epochs, train_size, drops,
                                                  source=f"{cfg.data}/train.jsonl")
    if "max_steps" in cfg.trainer.model_fields_set and cfg.trainer.max_steps != trainer.max_steps:
        raise ValueError(f"trainer.max_steps={cfg.trainer.max_steps} contradicts epochs={cfg.epochs} x "
                         f"{steps_per_epoch} steps per epoch; set epochs only (max_steps is derived from it)")
    updates: dict[str, Any] = {"validate_every": steps_per_epoch}
    if "checkpoint_every" not in cfg.trainer.model_fields_set:
        updates["checkpoint_every"] = steps_per_epoch
    return TrainerConfig.model_validate({**trainer.model_dump(), **updates}), steps_per_epoch


def write_best_checkpoint(run_dir: Path, best_weights: Path, last_checkpoint: Path) -> Path:
    """``run_dir/best_miou.pt``: the last checkpoint with the best-validation weights and step swapped in.

    It carries the run record, so ``accord.runs.load_run`` (and ``accord ground``) rebuild the model
    from it alone; it is not meant for resuming (its optimizer state is the last step's).
    """
    from accord.training.checkpoint import load_checkpoint, save_checkpoint

    state = load_checkpoint(last_checkpoint)
    best = torch.load(best_weights, map_location="cpu", weights_only=True)
    state.pop("digest", None)
    state.update(model=best["state_dict"], step=int(best["record"]["step"]))
    return save_checkpoint(state, run_dir / BEST_CHECKPOINT)


def train(cfg: TrainConfig) -> dict[str, Any]:
    """Train TransVG (+ TaCo) and score the best-validation-mIoU weights on ``test`` when present.

    Returns:
        The trainer's last record plus ``checkpoint``, ``best_checkpoint``, ``best_step``,
        ``val`` (the best validation scores) and ``test`` (scores, or ``None`` without test.jsonl);
        under torchrun the other ranks return the trainer's record only.
    """
    from accord_medrpg.data import collate_grounding, require_valid

    splits = require_valid(cfg.data)
    for split in ("train", "val"):
        if split not in splits:
            raise ValueError(f"{cfg.data}: {split}.jsonl is missing; train needs train.jsonl and val.jsonl")
    train_set, val_set = _dataset(cfg, "train", True), _dataset(cfg, "val", False)
    trainer_config, steps_per_epoch = _resolved_trainer(cfg, len(train_set))
    resolved = cfg.model_copy(update={"trainer": trainer_config})
    model, model_options = build_model(resolved, [item.record["phrase"] for item in splits["train"]])

    def validate(trained: TransVG, step: int) -> dict[str, float]:
        return score(trained, val_set, cfg.eval_batch_size).as_dict()

    best_weights = cfg.run_dir / "best_miou.weights.pt"
    callbacks = [EpochSchedule(cfg.taco, steps_per_epoch, cfg.epochs, train_set), BestCheckpoint("miou", best_weights)]
    trainer = Trainer.for_run(resolved, model_factory="medrpg.transvg", model_options=model_options,
                              trainer=trainer_config, validate=validate, callbacks=callbacks)
    result = trainer.fit(model, train_set, collate_fn=collate_grounding)
    if int(os.environ.get("RANK", "0")) != 0:  # rank 0 validated, so it alone holds the best weights
        return result
    best_path = write_best_checkpoint(cfg.run_dir, best_weights, Path(result["checkpoint"]))
    kept = torch.load(best_weights, map_location="cpu", weights_only=True)
    test = None
    if "test" in splits:
        model.load_state_dict(kept["state_dict"])
        test = _scores_record(score(model, _dataset(cfg, "test", False), cfg.eval_batch_size))
    return {**result, "best_checkpoint": str(best_path), "best_step": int(kept["record"]["step"]),
            "val": kept["record"]["metrics"], "test": test}


def evaluate(cfg: EvaluateConfig) -> dict[str, Any]:
    """Acc@0.5, mIoU and per-category scores of a train checkpoint on ``<data>/<split>.jsonl``.

    Under ``torchrun`` every rank scores its shard (``DistributedSampler``) and the per-sample
    results are gathered (:func:`accord_medrpg.evaluation.evaluate_grounding`): the scores equal a
    single process's.
    """
    from accord.runs import load_run
    from accord.training import setup_distributed, teardown_distributed
    from accord_medrpg.data import GroundingDataset, collate_grounding
    from accord_medrpg.evaluation import evaluate_grounding

    run = load_run(cfg.checkpoint)
    if not isinstance(run.model, TransVG):
        raise ValueError(f"{cfg.checkpoint}: not a medrpg train checkpoint (its model is {type(run.model).__name__})")
    dataset = GroundingDataset(Path(cfg.data) / f"{cfg.split}.jsonl", image_size=run.model.options.image_size,
                               train=False, num_negatives=run.config.num_negatives, augment=False, seed=cfg.seed)
    context = setup_distributed("auto", cfg.device)
    completed = False
    try:
        sampler = (torch.utils.data.DistributedSampler(dataset, shuffle=False) if context.world_size > 1 else None)
        loader = torch.utils.data.DataLoader(dataset, batch_size=cfg.batch_size, sampler=sampler,
                                             collate_fn=collate_grounding)
        scores = evaluate_grounding(run.model.to(context.device), loader)
        completed = True
    finally:
        teardown_distributed(context, completed)
    return {**_scores_record(scores), "checkpoint": str(cfg.checkpoint), "split": cfg.split, "step": run.step}
