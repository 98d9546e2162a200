"""Tasks of the built-in ``core`` plugin: SimCLR pretraining, fine-tuning, linear-probe evaluation,
and its pipeline benchmark (:func:`benchmark`), which shows pretraining beats random
initialisation on the toy shapes."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from accord.benchmarking import BenchmarkResult, DownstreamRun, Group, PipelineSpec, run_pipeline
from accord.config import BenchmarkConfig, ExistingPath, RunConfig, StrictModel, TrainerConfig
from accord.runs import run_task
from accord.toy.data import TwoViews, load_shapes, split_indices
from accord.toy.model import ConvEncoder, EncoderConfig, SimCLR
from accord.training import Trainer, load_checkpoint
from accord.utils.files import write_text_atomically

__all__ = ["PretrainConfig", "FinetuneConfig", "EvaluateConfig", "ToyBenchmarkConfig", "pretrain", "finetune", "evaluate", "benchmark"]


class PretrainConfig(RunConfig):
    data: ExistingPath
    model: EncoderConfig = EncoderConfig()
    temperature: float = Field(0.2, gt=0)
    trainer: TrainerConfig = TrainerConfig(max_steps=200, batch_size=64, lr=2e-3, warmup_steps=10)


class ProbeOptions(StrictModel):
    label_fraction: float = Field(1.0, gt=0, le=1, description="fraction of the train split with labels")
    test_fraction: float = Field(0.3, gt=0, lt=1)
    steps: int = Field(300, ge=1, description="optimizer steps of the linear classifier")


class EvaluateConfig(RunConfig):
    data: ExistingPath
    checkpoint: ExistingPath | None = Field(None, description="pretraining checkpoint; None: random init")
    model: EncoderConfig = EncoderConfig()
    probe: ProbeOptions = ProbeOptions()


class FinetuneConfig(RunConfig):
    data: ExistingPath
    checkpoint: ExistingPath | None = None
    model: EncoderConfig = EncoderConfig()
    probe: ProbeOptions = ProbeOptions()
    trainer: TrainerConfig = TrainerConfig(max_steps=100, batch_size=32, lr=1e-3)


class ToyBenchmarkConfig(BenchmarkConfig):
    label_fractions: list[float] = [0.1, 1.0]
    pretrain_steps: int = Field(1000, ge=1)


def _encoder(cfg: EncoderConfig, checkpoint: Path | None, seed: int) -> ConvEncoder:
    torch.manual_seed(seed)
    encoder = ConvEncoder(cfg.width, cfg.feature_dim)
    if checkpoint is not None:
        state = load_checkpoint(checkpoint)["model"]
        prefix = "encoder."
        weights = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
        if not weights:
            raise ValueError(f"{checkpoint}: no '{prefix}*' weights in the checkpoint's model state")
        encoder.load_state_dict(weights)
    return encoder


def simclr_model(cfg: PretrainConfig) -> SimCLR:
    """Model factory ``core.simclr``: the SimCLR model a ``pretrain`` run trains."""
    return SimCLR(ConvEncoder(cfg.model.width, cfg.model.feature_dim), cfg.model.projection_dim, cfg.temperature)


def pretrain(cfg: PretrainConfig) -> dict[str, Any]:
    """SimCLR pretraining of :class:`ConvEncoder` on the images of ``cfg.data`` (labels unused)."""
    images, _, _ = load_shapes(cfg.data)
    trainer = Trainer.for_run(cfg, model_factory="core.simclr")
    return trainer.fit(simclr_model(cfg), TwoViews(images))


@torch.no_grad()
def _features(encoder: nn.Module, images: torch.Tensor) -> torch.Tensor:
    encoder.eval()
    return torch.cat([encoder(chunk) for chunk in images.split(256)])


def _labelled_subset(train: torch.Tensor, fraction: float, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    keep = max(1, int(round(len(train) * fraction)))
    return train[torch.randperm(len(train), generator=generator)[:keep]]


def linear_probe(encoder: nn.Module, data: Path, probe: ProbeOptions, seed: int) -> float:
    """Test accuracy of a logistic-regression classifier on frozen, standardised features."""
    images, labels, classes = load_shapes(data)
    train, test = split_indices(len(images), probe.test_fraction)
    train = _labelled_subset(train, probe.label_fraction, seed)
    feats = _features(encoder, images)
    mean, std = feats[train].mean(0), feats[train].std(0).clamp_min(1e-6)
    feats = (feats - mean) / std
    torch.manual_seed(seed)
    classifier = nn.Linear(feats.shape[1], len(classes))
    optimizer = torch.optim.Adam(classifier.parameters(), lr=1e-2, weight_decay=1e-3)
    for _ in range(probe.steps):
        optimizer.zero_grad()
        F.cross_entropy(classifier(feats[train]), labels[train]).backward()
        optimizer.step()
    with torch.no_grad():
        return float((classifier(feats[test]).argmax(1) == labels[test]).float().mean())


def evaluate(cfg: EvaluateConfig) -> dict[str, Any]:
    """Linear-probe accuracy of a pretrained (or randomly initialised) encoder."""
    encoder = _encoder(cfg.model, cfg.checkpoint, cfg.seed)
    accuracy = linear_probe(encoder, cfg.data, cfg.probe, cfg.seed)
    result = {"linear_probe_accuracy": accuracy, "checkpoint": str(cfg.checkpoint)}
    cfg.run_dir.mkdir(parents=True, exist_ok=True)
    write_text_atomically(cfg.run_dir / "results.json", json.dumps(result, indent=2))
    return result


class _Classifier(nn.Module):
    def __init__(self, encoder: ConvEncoder, num_classes: int) -> None:
        super().__init__()
        self.encoder = encoder
        self.head = nn.Linear(encoder.feature_dim, num_classes)

    def forward(self, batch: tuple[torch.Tensor, torch.Tensor]) -> dict[str, torch.Tensor]:
        images, labels = batch
        return {"loss": F.cross_entropy(self.head(self.encoder(images)), labels)}


def classifier_model(cfg: FinetuneConfig, num_classes: int) -> _Classifier:
    """Model factory ``core.classifier``: the encoder + linear head a ``finetune`` run trains."""
    return _Classifier(ConvEncoder(cfg.model.width, cfg.model.feature_dim), num_classes)


def finetune(cfg: FinetuneConfig) -> dict[str, Any]:
    """End-to-end supervised fine-tuning on a labelled fraction; reports test accuracy."""
    images, labels, classes = load_shapes(cfg.data)
    train, test = split_indices(len(images), cfg.probe.test_fraction)
    train = _labelled_subset(train, cfg.probe.label_fraction, cfg.seed)
    model = _Classifier(_encoder(cfg.model, cfg.checkpoint, cfg.seed), len(classes))
    trainer = Trainer.for_run(cfg, model_factory="core.classifier", model_options={"num_classes": len(classes)})
    result = trainer.fit(
        model, torch.utils.data.TensorDataset(images[train], labels[train])
    )
    model.eval()
    with torch.no_grad():
        accuracy = float((model.head(model.encoder(images[test])).argmax(1) == labels[test]).float().mean())
    return {**result, "test_accuracy": accuracy}


def benchmark(cfg: ToyBenchmarkConfig) -> BenchmarkResult:
    """``accord benchmark core``: SimCLR pretraining vs random init, linear probe per label fraction and seed.

    Pretraining runs once per seed, so the spread over seeds includes the pretraining's: the quick
    run's 500 steps take about 11 s on two idle cores (3,000 samples/s).
    """
    steps = min(cfg.pretrain_steps, 500) if cfg.quick else cfg.pretrain_steps
    trainer = TrainerConfig(max_steps=steps, batch_size=64, lr=2e-3, warmup_steps=10, checkpoint_every=steps, log_every=25)

    def simclr(data: Path, run_dir: Path, seed: int) -> Path:
        run = PretrainConfig(plugin="core", task="pretrain", run_dir=run_dir, data=data, trainer=trainer, seed=seed)
        return Path(run_task(run)["checkpoint"])

    def probe(run: DownstreamRun) -> dict[str, Any]:
        result = run_task(EvaluateConfig(plugin="core", task="evaluate", run_dir=run.run_dir, data=run.data,
                                         checkpoint=run.checkpoint, probe=ProbeOptions(label_fraction=run.group.label),
                                         seed=run.seed))
        return {"accuracy": result["linear_probe_accuracy"]}

    return run_pipeline(cfg, PipelineSpec(
        title="Toy shapes: SimCLR pretraining vs random initialisation",
        dataset="core.shapes", synth_options={"per_class": 64 if cfg.quick else 96},
        pretrain=simclr, downstream=probe, groups=lambda data: [Group(f) for f in cfg.label_fractions],
        metric="accuracy", metric_title="linear-probe test accuracy (%)",
    ))
