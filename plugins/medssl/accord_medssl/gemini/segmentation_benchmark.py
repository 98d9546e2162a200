"""GEMINI's segmentation benchmark: ``accord benchmark medssl --method gemini [--quick] [--data MSD_DIR]``.

The ``segmentation`` pipeline benchmark (:func:`accord_medssl.benchmarks.segmentation`) hands
``method: gemini`` to :func:`gemini_segmentation`; ``accord benchmark medssl gemini_segmentation``
is the same run registered as a benchmark of its own, so that ``accord demo`` (which runs every
pipeline benchmark with its defaults) includes it. Two comparisons, over seeds, on the test cases
of one split, Dice per structure:

1. few-shot semi-supervised segmentation (``semi-supervised, N labelled``): GEMINI-Semi
   (the ``semisup`` task) against the same labelled cases trained supervised only: the same
   network, data, augmentation and number of CE + Dice steps, without the correspondence step
   (``gemini.loss.{smooth,gss,ncc}_weight: 0``, ``optimizer_steps: combined``, so Adam takes
   exactly one step per CE + Dice step);
2. GEMINI-MIP pretraining (``gemini_pretrain``, once per seed) then ``finetune`` with
   ``network: gemini_unet`` (GVSL's downstream network, medssl §3.3) and ``evaluate``, against the
   same fine-tuning from random init, at each of ``label_fractions``.

Without ``--data`` it runs on generated MSD abdomen phantoms (``accord data synth medssl``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import Field

from accord.benchmarking import BenchmarkResult, DownstreamRun, Group, PipelineSpec, preset, run_pipeline
from accord.config import StrictModel, TrainerConfig
from accord.runs import run_task
from accord_medssl.finetune import EvaluateConfig, FinetuneConfig, GeminiUNetOptions, SplitOptions
from accord_medssl.gemini.tasks import GEMINI_TRAINER_DEFAULTS, GeminiPretrainConfig, GeminiSemisupConfig

if TYPE_CHECKING:
    from accord_medssl.benchmarks import MedsslBenchmarkConfig

__all__ = ["FULL", "QUICK", "GeminiSegmentationOptions", "gemini_segmentation"]


class GeminiSegmentationOptions(StrictModel):
    """Settings of ``accord benchmark medssl --method gemini`` (None: the variant's, quick or full)."""

    labelled_cases: list[int] | None = Field(
        None, min_length=1, description="labelled train cases of the semi-supervised comparison, one group each "
        "(quick: [1]; full: [1, 4])")
    semisup_iterations: int | None = Field(
        None, ge=1, description="GEMINI-Semi iterations (= CE + Dice steps of both arms; quick: 15, full: 2000)")
    pretrain_iterations: int | None = Field(None, ge=1, description="GEMINI-MIP iterations (quick: 15, full: 2000)")
    finetune_steps: int | None = Field(
        None, ge=1, description="fine-tuning steps, validated every quarter (quick: 30, full: 2000)")
    channels: tuple[int, int, int, int, int] | None = Field(
        None, description="backbone widths (quick: 8-8-16-16-16; full: the reference's 32-64-128-256-512)")


@dataclass(frozen=True)
class _Scale:
    """Sizes of one variant."""

    phantoms: dict[str, Any]
    size: tuple[int, int, int]
    channels: tuple[int, int, int, int, int]
    deformer_channels: tuple[int, int, int, int, int]
    window: int
    shuffle_blocks: int
    labelled_cases: list[int]
    semisup_iterations: int
    pretrain_iterations: int
    gemini_lr: float
    finetune_steps: int
    #: FinetuneConfig fields besides the network, data, split and trainer.
    finetune: dict[str, Any]
    finetune_trainer: TrainerConfig
    split: SplitOptions


#: About three minutes on one CPU thread: 32 x 32 x 24 phantoms (the whole abdomen at a coarse
#: grid), tiny widths, 15 iterations at a high lr; fine-tuning at the smallest label fraction only.
#: It checks the chain, not the method: too few steps for the small organs.
QUICK = _Scale(
    phantoms={"num_train": 10, "num_test": 0, "shape": (32, 32, 24), "spacing": (4.5, 4.5, 5.0)},
    size=(32, 32, 24),
    channels=(8, 8, 16, 16, 16),
    deformer_channels=(8, 8, 8, 8, 8),
    window=5,
    shuffle_blocks=50,
    labelled_cases=[1],
    semisup_iterations=15,
    pretrain_iterations=15,
    gemini_lr=3e-3,
    finetune_steps=30,
    # Whole phantoms as one crop; class weights, so that the small organs count at all.
    finetune={"crop_size": (32, 32, 24), "samples_per_volume": 1, "loss": "dice_ce",
              "class_weights": "inverse_sqrt_frequency"},
    finetune_trainer=TrainerConfig(max_steps=30, batch_size=1, lr=3e-3, weight_decay=0.0, warmup_steps=0,
                                   schedule="constant", validate_every=10, checkpoint_every=30, keep_last=1,
                                   log_every=10),
    split=SplitOptions(validation_fraction=0.2, test_fraction=0.3),
)
#: The reference widths and optimisation (Adam 1e-4, batch 1; GVSL's Dice-loss fine-tuning) on
#: full-size phantoms: a GPU run.
FULL = _Scale(
    phantoms={"num_train": 20, "num_test": 0},
    size=(96, 96, 64),
    channels=(32, 64, 128, 256, 512),
    deformer_channels=(32, 64, 64, 64, 32),
    window=9,
    shuffle_blocks=5000,
    labelled_cases=[1, 4],
    semisup_iterations=2000,
    pretrain_iterations=2000,
    gemini_lr=1e-4,
    finetune_steps=2000,
    finetune={"crop_size": (96, 96, 64), "samples_per_volume": 1, "loss": "dice", "foreground_probability": 0.0},
    finetune_trainer=TrainerConfig(max_steps=2000, batch_size=1, lr=1e-4, weight_decay=0.0, warmup_steps=0,
                                   schedule="constant", validate_every=200, checkpoint_every=2000, keep_last=1),
    split=SplitOptions(),
)

#: How rows name the two arms of each comparison (the runner's init "gemini" gets the checkpoint).
ARMS = {"semisup": {"random": "supervised only", "gemini": "GEMINI-Semi"},
        "finetune": {"random": "random init", "gemini": "GEMINI-MIP"}}


def gemini_segmentation(cfg: MedsslBenchmarkConfig) -> BenchmarkResult:
    """Run both comparisons of the module docstring on ``cfg.data`` (or phantoms) over ``cfg.run_seeds()``.

    Rows: ``comparison`` (the group), ``protocol`` (``semisup`` / ``finetune``), ``init`` (the arm: ``supervised only``,
    ``GEMINI-Semi``, ``random init``, ``GEMINI-MIP``), ``dice`` (mean over structures),
    ``dice_per_class`` and the run's size (``labelled_cases``; fine-tuning also ``label_fraction``
    and ``best_step``). Runs go to ``pretrain/seed<s>/`` and ``downstream/<group>/<init>_seed<s>/``.
    """
    scale = QUICK if cfg.quick else FULL
    options = cfg.gemini

    def chosen(name: str) -> Any:
        value = getattr(options, name)
        return getattr(scale, name) if value is None else value

    semisup_iterations, pretrain_iterations = chosen("semisup_iterations"), chosen("pretrain_iterations")
    finetune_steps = chosen("finetune_steps")
    channels = tuple(chosen("channels"))
    cache_dir = cfg.run_dir / "cache"
    network = {"channels": channels, "deformer_channels": scale.deformer_channels}
    finetune_trainer = scale.finetune_trainer.model_copy(update={
        "max_steps": finetune_steps, "validate_every": max(finetune_steps // 4, 1), "checkpoint_every": finetune_steps,
        "log_every": min(scale.finetune_trainer.log_every, max(finetune_steps // 4, 1))})

    def gemini_trainer(steps: int) -> dict[str, Any]:
        return {**GEMINI_TRAINER_DEFAULTS, "max_steps": steps, "checkpoint_every": steps, "lr": scale.gemini_lr,
                "log_every": min(50, steps)}

    def gemini_options(corruption: dict[str, Any] | None, **loss: Any) -> dict[str, Any]:
        return {"normalisation": "ct_clip", "network": network, "corruption": corruption,
                "loss": {"window": scale.window, **loss}}

    def pretrain(data: Path, run_dir: Path, seed: int) -> Path:
        result = run_task(GeminiPretrainConfig(
            plugin=cfg.plugin, task="gemini_pretrain", run_dir=run_dir, data=data, cache_dir=cache_dir, seed=seed,
            size=scale.size, gemini=gemini_options({"shuffle_blocks": scale.shuffle_blocks}),
            trainer=gemini_trainer(2 * pretrain_iterations)))
        return Path(result["checkpoint"])

    def downstream(run: DownstreamRun) -> dict[str, Any]:
        comparison, amount = run.group.options
        shared = {"plugin": cfg.plugin, "data": run.data, "cache_dir": cache_dir, "seed": run.seed, "split": scale.split}
        arm = ARMS[comparison][run.init]
        if comparison == "semisup":
            if run.init == "gemini":
                gemini, steps = gemini_options(None), 2 * semisup_iterations
            else:  # the CE + Dice steps alone: one Adam step each, no correspondence gradient
                gemini = gemini_options(None, smooth_weight=0.0, gss_weight=0.0, ncc_weight=0.0,
                                        optimizer_steps="combined")
                steps = semisup_iterations
            scores = run_task(GeminiSemisupConfig(**shared, task="semisup", run_dir=run.run_dir, size=scale.size,
                                                  labelled_cases=amount, gemini=gemini, trainer=gemini_trainer(steps)))
            return {"protocol": comparison, "init": arm, "dice": scores["dice"],
                    "dice_per_class": scores["dice_per_class"], "labelled_cases": amount}
        tuned = run_task(FinetuneConfig(
            **shared, task="finetune", run_dir=run.run_dir, network="gemini_unet", checkpoint=run.checkpoint,
            gemini_unet=GeminiUNetOptions(channels=channels), intensity="ct_clip", label_fraction=amount,
            trainer=finetune_trainer, **scale.finetune))
        scores = run_task(EvaluateConfig(**{key: shared[key] for key in ("plugin", "data", "cache_dir", "seed")},
                                         task="evaluate", run_dir=run.run_dir / "evaluate", checkpoint=tuned["weights"]))
        return {"protocol": comparison, "init": arm, "dice": scores["dice"], "dice_per_class": scores["dice_per_class"],
                "label_fraction": amount, "labelled_cases": tuned["labelled_cases"], "best_step": tuned["best_step"]}

    # One fine-tuning run costs about as much as the whole semi-supervised pair: quick fine-tunes at the
    # smallest label fraction (where pretraining should matter most) unless label_fractions is given.
    fractions = preset(cfg, "label_fractions", [min(cfg.label_fractions)])

    def groups(data: Path) -> list[Group]:
        semisup = [Group(f"semi-supervised, {count} labelled", ("semisup", count)) for count in chosen("labelled_cases")]
        return semisup + [Group(f"fine-tune, {100 * fraction:g}% labels", ("finetune", fraction)) for fraction in fractions]

    width = "-".join(map(str, channels))
    notes = [
        f"semi-supervised: GEMINI-Semi ({semisup_iterations} iterations: correspondence step + 100 x (CE + Dice) step, "
        f"two Adam steps, lr {scale.gemini_lr:g}) against the same labelled cases, network, augmentation and "
        f"{semisup_iterations} CE + Dice steps without the correspondence step; both scored at the last step on the "
        f"test cases at size {scale.size}.",
        f"fine-tune: GEMINI-MIP pretraining ({pretrain_iterations} iterations, lr {scale.gemini_lr:g}, per seed) then "
        f"GVSL's downstream network (the backbone U-Net {width}, loaded strictly, + a new conv3 head), every weight "
        f"trained {finetune_steps} steps at lr {finetune_trainer.lr:g} ({scale.finetune['loss']}), against the "
        "same from random init; best validation Dice kept, scored on the test cases by evaluate.",
    ]
    if cfg.quick and semisup_iterations == QUICK.semisup_iterations:
        notes.append(f"Quick: a smoke run of every stage; {semisup_iterations} iterations segment nothing yet (both semi-supervised arms "
                     "are at noise level) and compare nothing (docs/medssl.md has longer CPU runs, where GEMINI does "
                     "not help at this scale either, and the reference-size settings).")
    return run_pipeline(cfg, PipelineSpec(
        title="medssl: GEMINI, semi-supervised and pretrained segmentation vs supervised / random init",
        dataset="medssl.msd", synth_options={"seed": cfg.seed, **scale.phantoms},
        pretrain=pretrain, downstream=downstream, groups=groups, group="comparison",
        metric="dice", metric_title="mean test Dice (%)", inits=("random", "gemini"), pretrained_init="gemini",
        per_class_key="dice_per_class", per_class_title="Per-class test Dice (%), mean ± std over seeds",
        notes=tuple(notes),
    ))
