"""Benchmarks of the medrpg plugin (registered in :mod:`accord_medrpg.plugin`).

* ``grounding`` (pipeline): TransVG (no TaCo) vs MedRPG (TaCo) trained from the same initialisation
  (same seed: same initial weights, data order, negatives and augmentation; TaCo adds no parameters)
  over seeds; test Acc@0.5 and mIoU of the best-validation-mIoU weights, overall and per category,
  beside the paper's MS-CXR table.
* ``speed`` (speed): training seconds per step and peak memory at the reference size, inference
  latency per image, and TaCo's share of a training step.
"""

from __future__ import annotations

import resource
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import Field

from accord.benchmarking import BenchmarkResult, ResultTable, preset
from accord.config import BenchmarkConfig, ExistingPath, TrainerConfig
from accord.report import bar_chart, format_mean_std, mean_std

__all__ = ["PAPER", "METHODS", "GroundingBenchmarkConfig", "SpeedBenchmarkConfig", "run_grounding", "run_speed",
           "grounding_data"]

#: The paper's main table (``figures/SOTA.png`` of the reference repository), MS-CXR columns, in %.
PAPER = ResultTable(
    "Paper (MedRPG, MICCAI 2023), MS-CXR test, ResNet-50 + BERT, Acc@0.5 / mIoU (%)",
    ["method", "Acc@0.5", "mIoU"],
    [["RefTR", 53.69, 50.11], ["VGTR", 60.27, 53.58], ["SeqTR", 63.20, 56.63],
     ["TransVG", 65.87, 58.91], ["MedRPG (TransVG + TaCo)", 69.86, 59.37]],
)
#: The compared methods: name -> TaCo mode.
METHODS = {"TransVG": "none", "MedRPG": "max_image_lcpTriple"}


class GroundingBenchmarkConfig(BenchmarkConfig):
    """``accord benchmark medrpg [--quick] [--data DIR]``."""

    model_size: Literal["reference", "quick"] = Field(
        "reference", description="reference: the paper's TransVG (640 px, ResNet-50, BERT-base sized); "
        "quick: the CPU-sized one of configs/medrpg/quick.yaml (quick preset)")
    epochs: int = Field(90, ge=1, description="training epochs per run (quick: 14)")
    lr: float = Field(5e-5, gt=0, description="base learning rate (quick: 1e-3, one rate for every module)")
    num_images: int = Field(160, ge=8, description="synthetic radiographs without --data (quick: 384)")
    bert_path: ExistingPath | None = Field(None, description="local bert-base-uncased folder")
    transvg: ExistingPath | None = Field(None, description="TransVG checkpoint both methods start from")


def grounding_data(data: Path | None, work_dir: Path, num_images: int, seed: int) -> Path:
    """A converted grounding directory (train/val/test.jsonl) for the benchmark.

    ``data`` may already be one (it is used as is), or an MS-CXR-layout root (checked, then converted
    under ``work_dir``); ``None`` generates ``num_images`` synthetic radiographs first.

    Raises:
        ValueError: the data check found problems (every one listed).
    """
    from accord_medrpg.data import check, convert, synth

    if data is not None and (Path(data) / "train.jsonl").is_file():
        root = Path(data)
    else:
        root = Path(data) if data is not None else synth(work_dir / "raw", num_images=num_images, seed=seed)
        problems = check(root)
        if problems:
            raise ValueError(f"{root}: not a valid MS-CXR dataset ({len(problems)} problem(s)):\n"
                             + "\n".join(map(str, problems)))
        convert(root, work_dir / "jsonl", seed=seed)
        root = work_dir / "jsonl"
    problems = check(root)
    if problems:
        raise ValueError(f"{root}: not a valid converted grounding directory:\n" + "\n".join(map(str, problems)))
    return root


def _train_config(cfg: GroundingBenchmarkConfig, data: Path, run_dir: Path, seed: int, taco_mode: str):
    from accord_medrpg.models import TacoOptions, TransVGOptions
    from accord_medrpg.models.transvg import quick_options
    from accord_medrpg.tasks import REFERENCE_LR_MULTIPLIERS, TrainConfig

    quick = preset(cfg, "model_size", "quick") == "quick"
    # The reference's fixed ResNet stem + layer1 and its 0.2x rates for BERT / ResNet / visual encoder
    # (and dropout) suit pretrained weights; the quick model starts from random weights and trains
    # for a few hundred steps, where they left it predicting one box for every query (the ResNet
    # stem stayed random and frozen). Quick: every module trains at one rate, without dropout.
    model = quick_options(resnet_train_from="conv1", dropout=0.0) if quick else TransVGOptions()
    if cfg.bert_path is not None:
        model = model.model_copy(update={"bert_path": str(cfg.bert_path)})
    # The reference's StepLR (x0.1 after epoch 60; no drop when epochs <= 60) at the reference size.
    trainer = TrainerConfig(batch_size=8, lr=preset(cfg, "lr", 1e-3), weight_decay=1e-4,
                            schedule="constant" if quick else "step",
                            lr_multipliers={} if quick else REFERENCE_LR_MULTIPLIERS, log_every=50, keep_last=1)
    return TrainConfig(plugin="medrpg", task="train", run_dir=run_dir, seed=seed, data=data, model=model,
                       taco=TacoOptions(mode=taco_mode), init={"transvg": cfg.transvg},
                       epochs=preset(cfg, "epochs", 14), eval_batch_size=32, trainer=trainer)


def run_grounding(cfg: GroundingBenchmarkConfig) -> BenchmarkResult:
    """TransVG vs MedRPG over seeds: test Acc@0.5 / mIoU of the best-val-mIoU weights, per category."""
    from accord.runs import run_task

    data = grounding_data(cfg.data, cfg.run_dir / "data", preset(cfg, "num_images", 384), cfg.seed)
    rows: list[dict[str, Any]] = []
    for seed in cfg.run_seeds():
        for method, mode in METHODS.items():
            result = run_task(_train_config(cfg, data, cfg.run_dir / "runs" / f"{method}_seed{seed}", seed, mode))
            if result["test"] is None:
                raise ValueError(f"{data}: test.jsonl is missing; the benchmark scores the test split")
            rows.append({"method": method, "seed": seed, "acc": result["test"]["acc"], "miou": result["test"]["miou"],
                         "count": result["test"]["count"], "per_category": result["test"]["per_category"],
                         "best_step": result["best_step"], "best_checkpoint": result["best_checkpoint"]})
    where = "generated sample data" if cfg.data is None else str(cfg.data)
    title = f"medrpg: TransVG vs MedRPG (TaCo), same initialisation ({where}{', quick' if cfg.quick else ''})"
    headline = ResultTable("Test Acc@0.5 and mIoU (%), best-validation-mIoU weights, mean ± std over seeds",
                           ["method", "Acc@0.5", "mIoU", "seeds"],
                           [[m, format_mean_std([r["acc"] for r in rows if r["method"] == m]),
                             format_mean_std([r["miou"] for r in rows if r["method"] == m]),
                             sum(r["method"] == m for r in rows)] for m in METHODS])
    categories = list(dict.fromkeys(c for r in rows for c in r["per_category"]))
    per_category = ResultTable(
        "Per-category test scores (%), mean ± std over seeds",
        ["method", "metric", *categories],
        [[m, name, *[format_mean_std([r["per_category"][c][key] for r in rows
                                      if r["method"] == m and c in r["per_category"]]) for c in categories]]
         for m in METHODS for key, name in (("acc", "Acc@0.5"), ("miou", "mIoU"))])
    summary = []
    for key, name in (("acc", "Acc@0.5"), ("miou", "mIoU")):
        for m in METHODS:
            mean, std = mean_std([100 * r[key] for r in rows if r["method"] == m])
            summary.append({"metric": name, "method": m, "mean": mean, "std": std})
    plot = bar_chart(summary, cfg.run_dir / "results.png", group="metric", series="method", ylabel="test score (%)",
                     title=title)
    rates = ("one rate for every module, ResNet stem trained, no dropout: the model starts from random weights"
             if preset(cfg, "model_size", "quick") == "quick" else "1e-5 for BERT / ResNet / visual transformer")
    notes = [f"Each run: {preset(cfg, 'epochs', 14)} epochs, batch 8, AdamW (the reference: 5e-5 base, 1e-5 for BERT / "
             f"ResNet / visual transformer; here {preset(cfg, 'lr', 1e-3):g}, {rates}), "
             "TaCo weight 0.05 (epoch / epochs)^0.9, tau 0.1, 5 negatives.",
             "Both methods of a seed start from identical weights and see identical batches; only TaCo differs.",
             "The reference drops every rate 10x after epoch 60 (StepLR): so does the reference-size run; the "
             "quick run keeps one constant rate.",
             "The paper's numbers are for MS-CXR with TransVG's RefCOCO weights as the start; generated data and a "
             "random start are not comparable to them."]
    return BenchmarkResult(title=title, tables=[headline, per_category], rows=rows, plots=[plot], paper=PAPER,
                           notes=notes)


# --- speed ---------------------------------------------------------------------------------------


class SpeedBenchmarkConfig(BenchmarkConfig):
    """``accord benchmark medrpg --speed speed``."""

    model_size: Literal["reference", "quick"] = Field(
        "reference", description="reference: the paper's TransVG with a BERT-base-sized text encoder; quick: the "
        "CPU-sized one of configs/medrpg/quick.yaml")
    batch_size: int = Field(8, ge=1, description="training batch (the reference's 8)")
    image_size: int = Field(640, ge=32, description="canvas side (the reference's 640), a multiple of 32")
    steps: int = Field(5, ge=1, description="timed training steps after one warm-up step (quick: 2)")
    repeats: int = Field(20, ge=1, description="timed repeats of inference and of TaCo alone (quick: 5)")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto: cuda when available")


def _timed(run: Callable[[], Any], repeats: int, sync: Callable[[], None]) -> list[float]:
    times = []
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        run()
        sync()
        times.append(time.perf_counter() - start)
    return times


def _stats(times: list[float]) -> dict[str, float]:
    return {"median": statistics.median(times), "min": min(times), "max": max(times)}


def _peak_rss_gib() -> float:
    # ru_maxrss is in KiB on Linux: the process's peak resident memory so far.
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def run_speed(cfg: SpeedBenchmarkConfig) -> BenchmarkResult:
    """Training s/step and peak memory, inference latency per image, TaCo's share of a step."""
    from accord_medrpg.models import SPECIAL_TOKENS, TacoOptions, TransVG, TransVGOptions
    from accord_medrpg.models.transvg import quick_options
    from accord_medrpg.taco import taco_loss

    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("device=cuda: torch sees no CUDA device (this torch build or machine has none); "
                         "use device=cpu or device=auto")
    device = torch.device("cuda" if cfg.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if cfg.device == "auto" else cfg.device))
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    steps, repeats = preset(cfg, "steps", 2), preset(cfg, "repeats", 5)
    reference = cfg.model_size == "reference"
    options = (TransVGOptions if reference else quick_options)(image_size=cfg.image_size)
    # bert-base-uncased's vocabulary size (30522), so that the embedding costs what the real one does.
    vocabulary = SPECIAL_TOKENS + [f"token{i}" for i in range((30522 if reference else 300) - len(SPECIAL_TOKENS))]
    model = TransVG(options, TacoOptions(), vocabulary, options.bert_config).to(device)
    model.taco_scale = 0.05
    size, batch = cfg.image_size, cfg.batch_size
    generator = torch.Generator().manual_seed(cfg.seed)
    centres = torch.rand(batch, 6, 2, generator=generator) * 0.5 + 0.25
    data = {"image": torch.randn(batch, 3, size, size, generator=generator).to(device),
            "image_mask": torch.zeros(batch, size, size, dtype=torch.bool, device=device),
            "phrase": ["large right-sided pneumothorax"] * batch,
            "box": torch.cat((centres[:, 0], torch.full((batch, 2), 0.2)), 1).to(device),
            "negatives": torch.cat((centres[:, 1:], torch.full((batch, 5, 2), 0.2)), 2).to(device)}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-5, weight_decay=1e-4)

    def train_step() -> None:
        optimizer.zero_grad(set_to_none=True)
        model(data)["loss"].backward()
        optimizer.step()

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    train_step()  # warm-up
    step_times = _timed(train_step, steps, sync)
    peak = (torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else _peak_rss_gib())

    # TaCo alone, forward + backward, on outputs of the model's shape (B, 1 + L + G*G, d).
    tokens_count = 1 + options.max_query_len + options.grid ** 2
    tokens = torch.randn(batch, tokens_count, options.dim, device=device, requires_grad=True)
    attention = torch.randn(batch, tokens_count, tokens_count, device=device).softmax(-1).requires_grad_()
    boxes = torch.cat((data["box"][:, None], data["negatives"]), 1)
    taco_times = _timed(lambda: taco_loss(tokens, attention, boxes, num_text=options.max_query_len).loss.backward(),
                        repeats, sync)

    model.eval()
    single = {"image": data["image"][:1], "mask": data["image_mask"][:1]}
    with torch.no_grad():
        model(single["image"], single["mask"], data["phrase"][:1])  # warm-up
        latency = _timed(lambda: model(single["image"], single["mask"], data["phrase"][:1]), repeats, sync)
    step, taco = _stats(step_times), _stats(taco_times)
    values = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "parameters_M": sum(p.numel() for p in model.parameters()) / 1e6,
        f"train_s_per_step (batch {batch}, {size}^2)": step,
        "peak_memory_GiB": peak,
        "inference_s_per_image": _stats(latency),
        "taco_s_per_step (forward + backward)": taco,
        "taco_share_of_step_percent": 100 * taco["median"] / step["median"],
    }
    memory = ("torch.cuda.max_memory_allocated" if device.type == "cuda"
              else "the process's peak resident set size (ru_maxrss), model and optimizer included")
    notes = [f"{steps} timed training steps after one warm-up, {repeats} repeats of inference and TaCo; "
             "median, min, max.",
             f"Peak memory: {memory}.",
             f"torch threads: {torch.get_num_threads()}." if device.type == "cpu" else
             "GPU times are synchronised (torch.cuda.synchronize) around every timed call.",
             "The TaCo share is the median of TaCo alone over the median training step."]
    return BenchmarkResult.measured(f"medrpg: TransVG + TaCo speed ({cfg.model_size} model) at {size}^2, batch {batch} "
                                    f"({device})", values,
                                    notes=notes)
