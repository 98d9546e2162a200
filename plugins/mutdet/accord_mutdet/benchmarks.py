"""mutdet benchmarks: the detection pipeline (none vs DETReg-style vs MutDet) and pretraining speed.

``accord benchmark mutdet [--quick] [--data DIR]``: pseudo-labels (the ``pseudolabel`` task) on the
DIOR-R training images, then per seed a DETReg-style and a MutDet pretraining run on them, then for
every label fraction and seed three fine-tunings (no detection pretraining, DETReg-style, MutDet)
and a VOC07 AP50 / AP75 evaluation on the test split. ``--data`` is a folder holding a ``DIOR-R``
root (as ``accord data synth mutdet`` writes it) or a DIOR-R root itself.

``accord benchmark mutdet --speed pretrain_speed``: seconds per MutDet pretraining step (forward,
backward, AdamW step) and peak memory at the reference sizes.
"""

from __future__ import annotations

import dataclasses
import resource
import statistics
from pathlib import Path
from typing import Any

import torch
from pydantic import Field

from accord.benchmarking import (
    BenchmarkResult,
    DownstreamRun,
    Group,
    PipelineSpec,
    ResultTable,
    preset,
    run_pipeline,
)
from accord.config import BenchmarkConfig, TrainerConfig
from accord.runs import run_task
from accord.utils.timing import machine_state, time_repeats, torch_threads

from accord_mutdet.models import DetectorOptions, MutDetOptions, RotatedDETR

__all__ = ["DetectionBenchmarkConfig", "PretrainSpeedConfig", "run_detection_benchmark", "run_pretrain_speed",
           "PAPER_DIOR_R", "PAPER_DOTA"]

PAPER_DIOR_R = ResultTable(
    "Paper, Table 2: DIOR-R test, ARS-DETR R50, trainval (100%) -> test, AP50 / AP75 (%)",
    ["method", "APL", "APO", "BF", "BC", "BR", "CH", "DAM", "ESA", "ETS", "GF", "GTF", "HA", "OP", "SH", "STA",
     "STO", "TC", "TS", "VE", "WM", "AP50", "AP75"],
    [["none", 67.3, 52.0, 75.7, 81.7, 41.6, 77.1, 36.2, 80.8, 71.7, 73.8, 78.2, 35.5, 56.7, 84.5, 66.0, 72.9, 81.3,
      59.0, 50.2, 71.8, 65.7, 45.7],
     ["DETReg", 69.0, 55.5, 75.7, 82.4, 45.4, 78.6, 35.6, 81.7, 72.4, 78.8, 78.2, 46.1, 57.7, 87.6, 71.5, 76.0, 81.3,
      60.6, 52.9, 72.1, 67.9, 49.1],
     ["MutDet", 75.1, 60.5, 78.8, 84.7, 45.4, 81.2, 39.6, 85.7, 77.0, 78.0, 81.9, 52.1, 57.8, 88.2, 78.8, 77.4, 84.7,
      60.2, 54.2, 72.4, 70.7, 51.2]])
PAPER_DOTA = ResultTable(
    "Paper, Table 3: DOTA-v1.0 test, ARS-DETR R50, AP50 / AP75 (%)",
    ["method", "PL", "BD", "BR", "GTF", "SV", "LV", "SH", "TC", "BC", "ST", "SBF", "RA", "HA", "SP", "HC", "AP50",
     "AP75"],
    [["none", 87.1, 71.9, 47.0, 68.3, 72.9, 75.5, 87.2, 90.4, 83.8, 82.6, 52.2, 60.5, 74.9, 71.7, 67.5, 72.9, 49.6],
     ["DETReg", 87.7, 75.9, 46.7, 66.8, 74.3, 76.9, 87.6, 90.5, 78.2, 82.2, 49.2, 66.0, 75.4, 71.7, 59.3, 72.6, 49.4],
     ["MutDet", 87.3, 78.7, 51.3, 68.5, 78.9, 81.6, 88.1, 90.7, 79.9, 83.7, 58.0, 61.8, 76.5, 72.1, 60.8, 74.5,
      51.6]])
INITS = ("none", "detreg", "mutdet")


class DetectionBenchmarkConfig(BenchmarkConfig):
    label_fractions: list[float] = Field([0.1, 1.0], min_length=1, description="fine-tuning label fractions")
    pretrain_steps: int = Field(2000, ge=1, description="pretraining steps per method and seed (quick: 30)")
    finetune_steps: int = Field(2000, ge=1, description="fine-tuning steps per run (quick: 40)")
    image_size: int = Field(800, ge=32, description="square input side (quick: 128)")
    batch_size: int = Field(2, ge=1)
    lr: float = Field(1e-4, gt=0, description="AdamW learning rate (quick: 5e-4)")
    size: str = Field("reference", pattern="^(reference|tiny)$",
                      description="reference: R50, 256-d, pretrain 2+2 / fine-tune 6+6; tiny: CPU smoke model "
                      "(quick default)")
    backbone_weights: Path | None = Field(None, description="local ImageNet ResNet-50 state dict for the backbone")
    pseudo_dir: Path | None = Field(None, description="existing pseudo-labels of the training images; "
                                    "None: run the pseudolabel task")
    threads: int | None = Field(None, ge=1, description="torch intra-op threads (quick: 1, several times faster "
                                "for the tiny model on a shared 2-core machine); None: torch's default")


def _models(size: str, pseudo_classes: int, object_dim: int, backbone_weights: Path | None
            ) -> tuple[DetectorOptions, DetectorOptions, MutDetOptions]:
    """(pretraining detector, fine-tuning detector, MutDet options) for a benchmark size."""
    if size == "tiny":
        if backbone_weights is not None:
            raise ValueError("backbone_weights: a ResNet-50 file needs size=reference; the tiny model has its own "
                             "small ResNet")
        common = dict(backbone="tiny", embed_dim=32, num_heads=4, ffn_dim=64, num_queries=30, num_dn_queries=20,
                      dropout=0.0, encoder_layers=1, decoder_layers=2)
        mutdet = MutDetOptions(depth=1, mlp_dim=64, object_dim=object_dim, encoder_embed_dim=64)
        return DetectorOptions(**common), DetectorOptions(**common), mutdet
    pre = DetectorOptions(encoder_layers=2, decoder_layers=2, backbone_weights=backbone_weights)
    fine = DetectorOptions(encoder_layers=6, decoder_layers=6, backbone_weights=backbone_weights)
    return pre, fine, MutDetOptions(object_dim=object_dim)


def _dior_root(data: Path) -> Path:
    return data / "DIOR-R" if (data / "DIOR-R").is_dir() else data


def _pseudo_labels(cfg: DetectionBenchmarkConfig, dior: Path) -> Path:
    """The pseudo-label folder: ``cfg.pseudo_dir``, or the ``pseudolabel`` task run on the trainval images.

    Quick: a ResNet-18 on 64 px crops, PCA to 16 and 8 clusters (the sample data has ~200 proposals).
    """
    from accord_mutdet.pseudo.pipeline import PseudoLabelConfig

    if cfg.pseudo_dir is not None:
        return cfg.pseudo_dir
    quick = dict(backbone="resnet18", crop_size=64, embed_dim=16, clusters=8, max_proposals=60) if cfg.quick else {}
    run = PseudoLabelConfig(run_dir=cfg.run_dir / "pseudolabel", data=dior, split="trainval", seed=cfg.seed,
                            backbone_weights=None if cfg.quick else cfg.backbone_weights, **quick)
    return Path(run_task(run)["labels_dir"])


def run_detection_benchmark(cfg: DetectionBenchmarkConfig) -> BenchmarkResult:
    """The pipeline benchmark (module docstring)."""
    pretrain_steps = preset(cfg, "pretrain_steps", 30)
    finetune_steps = preset(cfg, "finetune_steps", 40)
    image_size = preset(cfg, "image_size", 128)
    size = preset(cfg, "size", "tiny")
    lr = preset(cfg, "lr", 5e-4)
    state: dict[str, Any] = {}
    detreg_checkpoints: dict[int, Path] = {}

    def trainer(steps: int, backbone_lr: bool) -> TrainerConfig:
        multipliers = {"sampling_offsets": 0.1, **({r"^backbone\.": 0.1} if backbone_lr else {})}
        return TrainerConfig(max_steps=steps, batch_size=cfg.batch_size, lr=lr, weight_decay=1e-5,
                             grad_clip_norm=35.0, warmup_steps=min(100, steps // 10), checkpoint_every=steps,
                             lr_multipliers=multipliers, log_every=max(1, steps // 5))

    def models(dior: Path) -> tuple[DetectorOptions, DetectorOptions, MutDetOptions, int]:
        if "models" not in state:
            from accord_mutdet.data import load_dior_r
            from accord_mutdet.pseudo.store import read_pseudo_labels

            pseudo = _pseudo_labels(cfg, dior)
            first = read_pseudo_labels(pseudo / f"{load_dior_r(dior, 'trainval')[0].id}.npz")
            clusters = max(int(read_pseudo_labels(p)["pseudo_class"].max(initial=0)) for p in pseudo.glob("*.npz")) + 1
            state["pseudo"] = pseudo
            state["models"] = (*_models(size, clusters, first["embeddings"].shape[1], cfg.backbone_weights), clusters)
        return state["models"]

    def pretrain(data: Path, run_dir: Path, seed: int) -> Path:
        from accord_mutdet.tasks import PretrainConfig

        dior = _dior_root(data)
        pre, _, mutdet, clusters = models(dior)
        checkpoints = {}
        for method in ("detreg", "mutdet"):
            run = PretrainConfig(plugin="mutdet", task="pretrain", run_dir=run_dir / method, data=dior,
                                 split="trainval", pseudo_dir=state["pseudo"], image_size=image_size,
                                 num_pseudo_classes=clusters, model=pre,
                                 mutdet=mutdet.model_copy(update={"enhancement": method == "mutdet"}),
                                 trainer=trainer(pretrain_steps, backbone_lr=False), seed=seed)
            checkpoints[method] = Path(run_task(run)["checkpoint"])
        detreg_checkpoints[seed] = checkpoints["detreg"]
        return checkpoints["mutdet"]

    def downstream(run: DownstreamRun) -> dict[str, Any]:
        from accord_mutdet.tasks import EvaluateConfig, FinetuneConfig

        dior = _dior_root(run.data)
        _, fine, _, _ = models(dior)
        checkpoint = {"none": None, "detreg": detreg_checkpoints.get(run.seed), "mutdet": run.checkpoint}[run.init]
        tuned = run_task(FinetuneConfig(plugin="mutdet", task="finetune", run_dir=run.run_dir / "finetune", data=dior,
                                        split="trainval", label_fraction=float(run.group.label), image_size=image_size,
                                        checkpoint=checkpoint, model=fine, seed=run.seed,
                                        trainer=trainer(finetune_steps, backbone_lr=True)))
        scores = run_task(EvaluateConfig(plugin="mutdet", task="evaluate", run_dir=run.run_dir / "evaluate",
                                         data=dior, split="test", checkpoint=Path(tuned["checkpoint"]),
                                         seed=run.seed))
        return {key: scores[key] for key in ("AP50", "AP75", "AP50_per_class", "AP75_per_class")}

    spec = PipelineSpec(
        title="mutdet: none vs DETReg-style vs MutDet detection pretraining, fine-tuned on DIOR-R",
        dataset="mutdet.dior_dota",
        synth_options={"num_train": 12, "num_val": 4, "num_test": 6, "size": 256} if cfg.quick else {},
        pretrain=pretrain, downstream=downstream,
        groups=lambda data: [Group(fraction) for fraction in cfg.label_fractions],
        metric="AP50", metric_title="VOC07 AP50 on DIOR-R test (%)", inits=INITS, pretrained_init="mutdet",
        per_class_key="AP50_per_class", per_class_title="Per-class AP50 (%), mean ± std over seeds",
        paper=PAPER_DIOR_R,
        notes=(
            "none: the detector from random weights (backbone from backbone_weights when given); detreg: pretrained "
            "on the same pseudo-boxes and pseudo-classes without enhancement or alignment; mutdet: the full method. "
            "Both pretrainings run per seed; the fine-tuning subset of each label fraction is fixed (split_seed 0).",
            "AP is VOC07 11-point rotated AP (rule 'voc'); the paper's 10%-label result is +6.1 AP50 for MutDet "
            "over DETReg (abstract).",
            f"Settings: size={size}, image_size={image_size}, pretrain_steps={pretrain_steps}, "
            f"finetune_steps={finetune_steps}, lr={lr}."
            + (" Quick: a smoke run of every stage; tens of steps do not train a DETR, so these APs compare "
               "nothing (docs/mutdet.md has longer runs)." if cfg.quick else ""),
            PAPER_DOTA.markdown(),
        ),
    )
    with torch_threads(preset(cfg, "threads", 1)):
        result = run_pipeline(cfg, spec)
    return dataclasses.replace(result, tables=[*result.tables, _ap75_table(result.rows)])


def _ap75_table(rows: list[dict[str, Any]]) -> ResultTable:
    bars: dict[tuple[Any, str], list[float]] = {}
    for row in rows:
        bars.setdefault((row["label_fraction"], row["init"]), []).append(100 * row["AP75"])
    lines = []
    for (fraction, init), values in bars.items():
        spread = statistics.stdev(values) if len(values) > 1 else 0.0
        lines.append([fraction, init, f"{statistics.mean(values):.2f} ± {spread:.2f}", len(values)])
    return ResultTable("VOC07 AP75 on DIOR-R test (%), mean ± std over seeds",
                       ["label_fraction", "init", "AP75 (mean ± std)", "seeds"], lines)


# --- speed --------------------------------------------------------------------------------------------

class PretrainSpeedConfig(BenchmarkConfig):
    image_size: int = Field(1024, ge=64, description="square input side (quick: 512)")
    batch_size: int = Field(2, ge=1)
    layers: list[list[int]] = Field([[2, 2], [6, 6]], description="(encoder, decoder) layer counts measured")
    objects: int = Field(50, ge=1, description="pseudo-boxes per image")
    repeats: int = Field(3, ge=1, description="timed steps after one warm-up step (quick: 1)")
    device: str = Field("cpu", pattern="^(cpu|cuda)$")
    threads: int | None = Field(1, ge=1, description="torch intra-op threads on CPU (None: torch's default)")


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kB on Linux


def _speed_batch(size: int, batch: int, objects: int, device: torch.device) -> dict[str, Any]:
    generator = torch.Generator().manual_seed(0)
    boxes = []
    for _ in range(batch):
        centre = torch.rand(objects, 2, generator=generator) * size * 0.8 + size * 0.1
        sides = torch.rand(objects, 2, generator=generator) * size * 0.08 + 8
        angle = (torch.rand(objects, 1, generator=generator) - 0.5) * 3.14
        boxes.append(torch.cat([centre, sides.sort(dim=1, descending=True).values, angle], 1).to(device))
    return {"images": torch.randn(batch, 3, size, size, generator=generator).to(device), "boxes": boxes,
            "labels": [torch.randint(0, 256, (objects,), generator=generator).to(device) for _ in range(batch)],
            "embeddings": [torch.nn.functional.normalize(torch.randn(objects, 256, generator=generator), dim=1)
                           .to(device) for _ in range(batch)]}


def pretrain_step_speed(encoder_layers: int, decoder_layers: int, image_size: int, batch_size: int, objects: int,
                        repeats: int, device: torch.device) -> dict[str, Any]:
    """Seconds per MutDet pretraining step (R50 frozen, 256-d, 300 queries) and peak memory.

    :func:`accord.utils.timing.time_repeats` over ``repeats`` steps after one warm-up step (allocators,
    kernels); the machine state (threads, load) is recorded before and after.
    """
    options = DetectorOptions(encoder_layers=encoder_layers, decoder_layers=decoder_layers)
    model = RotatedDETR(options, 256, mutdet=MutDetOptions(), frozen_backbone=True).to(device).train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, weight_decay=1e-5)
    batch = _speed_batch(image_size, batch_size, objects, device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        model(batch)["loss"].backward()
        optimizer.step()

    before = machine_state()
    timing = time_repeats(step, repeats=repeats, warmup=1,
                          synchronize=(lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else None)
    after = machine_state()
    result = {"s_per_step_median": timing.median, "s_per_step_min": timing.minimum,
              "s_per_step_max": timing.maximum, "repeats": repeats, "torch_threads": before["torch_threads"],
              "load_1min_before": before["load_1min"], "load_1min_after": after["load_1min"]}
    if device.type == "cuda":
        result["peak_gpu_memory_mib"] = torch.cuda.max_memory_allocated(device) / 2**20
    else:
        result["peak_process_rss_mib"] = _peak_rss_mib()
    return result


def run_pretrain_speed(cfg: PretrainSpeedConfig) -> BenchmarkResult:
    """The speed benchmark (module docstring)."""
    image_size = preset(cfg, "image_size", 512)
    repeats = preset(cfg, "repeats", 1)
    device = torch.device(cfg.device)
    values = {}
    with torch_threads(cfg.threads if device.type == "cpu" else None):
        for encoder_layers, decoder_layers in cfg.layers:
            values[f"{encoder_layers}+{decoder_layers} layers"] = pretrain_step_speed(
                encoder_layers, decoder_layers, image_size, cfg.batch_size, cfg.objects, repeats, device)
    state = machine_state()
    notes = [f"MutDet pretraining step (both branches, forward + backward + AdamW) on {device.type}, ResNet-50 "
             f"frozen, 256-d, 300 queries, 100 DN queries, {cfg.objects} pseudo-boxes per image, input "
             f"{image_size}^2, batch {cfg.batch_size}; median (min-max) of {repeats} timed step(s) after one "
             f"warm-up step; torch threads {cfg.threads if device.type == 'cpu' else 'default'}, "
             f"{state['cpus']} CPUs, load average before / after each configuration in its row.",
             "CPU memory is the process's peak resident set (ru_maxrss), cumulative over the configurations "
             "in the order measured; GPU memory is torch's peak allocation per configuration."]
    return BenchmarkResult.measured(f"mutdet: pretraining speed ({image_size}^2, batch {cfg.batch_size})", values,
                                    notes=notes)
