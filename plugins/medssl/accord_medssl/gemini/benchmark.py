"""GEMINI's benchmarks: ``gemini_registration`` (quality) and ``--speed gemini_speed`` (cost).

``accord benchmark medssl gemini_registration [--quick]``: :func:`run_gemini_registration`
(a quality benchmark, listed with the speed ones so that ``accord benchmark medssl`` keeps running
the ``segmentation`` pipeline without a name).

``accord benchmark medssl --speed gemini_speed``:

- ``ncc``: the local NCC loss (forward + backward) with separable box sums against the reference's
  dense ``window^d`` grouped convolution, alternated in one run, same inputs; prints the median and
  min/max seconds of each, the speed-up and the largest difference of the two loss values.
- ``iteration``: one full GEMINI iteration (correspondence step + restoration step, both backward)
  at the reference widths: seconds per iteration (median, min/max) and peak memory (CUDA: the
  allocator's peak; CPU: the growth of the process's peak resident set).
"""

from __future__ import annotations

import itertools
import resource
import statistics
import time
from collections.abc import Callable
from typing import Any, Literal

import torch
from pydantic import Field

from accord.benchmarking import BenchmarkResult, ResultTable, preset
from accord.config import BenchmarkConfig
from accord_medssl.gemini.losses import local_ncc_loss
from accord_medssl.gemini.model import GeminiModel, GeminiOptions

__all__ = [
    "GeminiRegistrationConfig",
    "GeminiSpeedConfig",
    "iteration_speed",
    "ncc_speed",
    "run_gemini_registration",
    "run_gemini_speed",
]


def _device(name: str) -> torch.device:
    return torch.device("cuda" if name == "auto" and torch.cuda.is_available() else ("cpu" if name == "auto" else name))


def _seconds(fn: Callable[[], Any], device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def _summary(times: list[float]) -> dict[str, float]:
    return {"median_s": statistics.median(times), "min_s": min(times), "max_s": max(times)}


def ncc_speed(size: int = 96, window: int = 9, repeats: int = 5, device: str = "auto") -> dict[str, Any]:
    """Local NCC, separable vs grouped conv, at ``size^3``, forward + backward, alternated ``repeats`` times."""
    target_device = _device(device)
    generator = torch.Generator().manual_seed(0)
    image = torch.rand(1, 1, size, size, size, generator=generator).to(target_device)
    target = torch.rand(1, 1, size, size, size, generator=generator).to(target_device)
    mask = torch.ones_like(image)
    values: dict[str, float] = {}
    times: dict[str, list[float]] = {"separable": [], "conv": []}

    def run(method: str) -> None:
        leaf = image.clone().requires_grad_(True)
        loss = local_ncc_loss(leaf, target, mask, window, method=method)
        loss.backward()
        values[method] = float(loss.detach())

    for method in times:  # warm-up
        run(method)
    for _ in range(repeats):
        for method in times:
            times[method].append(_seconds(lambda: run(method), target_device))
    separable, conv = _summary(times["separable"]), _summary(times["conv"])
    return {
        "size": f"{size}^3", "window": window, "device": str(target_device),
        "separable": separable, "grouped_conv": conv,
        "speedup_median": conv["median_s"] / separable["median_s"],
        "loss_difference": abs(values["separable"] - values["conv"]),
    }


def iteration_speed(spatial_dims: int = 3, size: int = 96, batch_size: int = 1, steps: int = 3,
                    options: GeminiOptions | None = None, device: str = "auto") -> dict[str, Any]:
    """Seconds and peak memory of one GEMINI iteration (both steps, one Adam) after one warm-up iteration."""
    target_device = _device(device)
    options = options or GeminiOptions(network={"spatial_dims": spatial_dims})
    torch.manual_seed(0)
    model = GeminiModel(options).to(target_device)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    shape = (batch_size, 1, *([size] * spatial_dims))
    batch = {key: torch.rand(shape, device=target_device) for key in ("image_a", "image_b", "corrupted_a")}

    def iteration() -> None:
        for _ in range(2):  # correspondence, then restoration (the model alternates)
            optimizer.zero_grad(set_to_none=True)
            model(batch)["loss"].backward()
            optimizer.step()

    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if target_device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(target_device)
    iteration()
    times = [_seconds(iteration, target_device) for _ in range(steps)]
    if target_device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(target_device) / 2**20
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - rss_before
    return {"shape": "x".join(map(str, shape)), "device": str(target_device), "iteration": _summary(times),
            "peak_memory_mib": peak, "parameters_m": sum(p.numel() for p in model.parameters()) / 1e6}


class GeminiSpeedConfig(BenchmarkConfig):
    """``accord benchmark medssl --speed gemini_speed [--quick]``."""

    measure: list[Literal["ncc", "iteration_3d", "iteration_2d"]] = Field(
        ["ncc", "iteration_3d", "iteration_2d"], min_length=1, description="what to time")
    ncc_size: int = Field(96, ge=9, description="cube edge of the NCC comparison (quick: 64)")
    window: int = Field(9, ge=1, description="NCC window")
    repeats: int = Field(5, ge=1, description="alternated NCC repeats / timed iterations (quick: 3 / 1)")
    size_3d: int = Field(96, ge=16, description="3D iteration: cube edge, batch 1 (quick: 32)")
    size_2d: int = Field(512, ge=16, description="2D iteration: image side, batch 5 (quick: 128)")
    device: Literal["auto", "cpu", "cuda"] = "auto"
    threads: int | None = Field(None, ge=1, description="torch threads; None: torch's default")


def run_gemini_speed(cfg: GeminiSpeedConfig) -> BenchmarkResult:
    """The reference sizes (3D 96^3 batch 1, 2D 512^2 batch 5, reference widths); quick: smaller images."""
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    values: dict[str, Any] = {}
    repeats = preset(cfg, "repeats", 3)
    if "ncc" in cfg.measure:
        values["ncc"] = ncc_speed(preset(cfg, "ncc_size", 64), cfg.window, repeats, cfg.device)
    if "iteration_3d" in cfg.measure:
        values["iteration_3d"] = iteration_speed(3, preset(cfg, "size_3d", 32), 1, 1 if cfg.quick else repeats,
                                                 device=cfg.device)
    if "iteration_2d" in cfg.measure:
        values["iteration_2d"] = iteration_speed(2, preset(cfg, "size_2d", 128), 5, 1 if cfg.quick else repeats,
                                                 device=cfg.device)
    return BenchmarkResult.measured("medssl: GEMINI speed (NCC box sums, full iterations)", values)


class GeminiRegistrationConfig(BenchmarkConfig):
    """``accord benchmark medssl gemini_registration [--quick] [--data MSD_DIR]``: :func:`run_gemini_registration`."""

    num_cases: int = Field(6, ge=2, description="generated registration phantoms without --data (quick: 3)")
    shape: tuple[int, int, int] = Field((64, 64, 48), description="generated phantom size and training size (quick: 24x24x16)")
    iterations: int = Field(300, ge=1, description="GEMINI iterations per run (quick: 30)")
    window: int = Field(9, ge=1, description="local NCC window (quick: 5, for the small images)")
    augment: bool = Field(False, description="GEMINI's shared random affine (off: the phantoms differ only by their deformation)")
    lr: float = Field(1e-4, gt=0, description="Adam learning rate (the reference's; quick: 3e-3)")
    channels: tuple[int, int, int, int, int] = Field(
        (32, 64, 128, 256, 512), description="backbone widths (quick: 8, 8, 16, 16, 16)")
    deformer_channels: tuple[int, int, int, int, int] = Field(
        (32, 64, 64, 64, 32), description="deformer widths (quick: 8 each)")


def _pair_scores(network: torch.nn.Module, images: list[torch.Tensor], labels: list[torch.Tensor],
                 convention: str) -> dict[str, float]:
    """Mean over ordered pairs of: foreground Dice of the warped label before / after, folding, inverse consistency."""
    from accord_medssl.gemini.tasks import label_dice
    from accord_medssl.gemini.warp import folding_stats, inverse_consistency_error, warp

    scores: dict[str, list[float]] = {name: [] for name in ("dice_before", "dice_after", "folding_percent",
                                                            "min_jacobian", "inverse_consistency")}
    with torch.no_grad():
        for i, j in itertools.permutations(range(len(images)), 2):
            flow = network.register(images[i][None], images[j][None])
            back = network.register(images[j][None], images[i][None])
            warped = warp(labels[i][None], flow, "nearest", convention)[0, 0]
            scores["dice_before"].append(statistics.fmean(label_dice(labels[i][0], labels[j][0]).values()))
            scores["dice_after"].append(statistics.fmean(label_dice(warped, labels[j][0]).values()))
            folds = folding_stats(flow)
            scores["folding_percent"].append(folds["folding_percent"])
            scores["min_jacobian"].append(folds["min_jacobian"])
            scores["inverse_consistency"].append(float(inverse_consistency_error(flow, back, convention)))
    return {name: (min(values) if name == "min_jacobian" else statistics.fmean(values)) for name, values in scores.items()}


def run_gemini_registration(cfg: GeminiRegistrationConfig) -> BenchmarkResult:
    """Train GEMINI-MIP (``gemini_pretrain``) with a direct displacement field (the reference) and
    with the diffeomorphic extension, per seed, and score the deformer on every ordered pair of
    labelled cases: Dice of the warped label before / after, % folding voxels, smallest Jacobian
    determinant and inverse-consistency error (voxels)."""
    from accord.runs import load_run, run_task
    from accord_medssl.data.pairs import synth_pairs
    from accord_medssl.finetune import labelled_items
    from accord_medssl.gemini.data import fixed_size, normalise_intensity
    from accord_medssl.gemini.tasks import GEMINI_TRAINER_DEFAULTS, GeminiPretrainConfig, read_nifti

    shape = tuple(preset(cfg, "shape", (24, 24, 16)))
    iterations = preset(cfg, "iterations", 30)
    root = cfg.data if cfg.data is not None else synth_pairs(cfg.run_dir / "data", preset(cfg, "num_cases", 3), shape)
    items, _ = labelled_items(root)
    resize = fixed_size(shape)
    images = [resize(normalise_intensity(read_nifti(item["image"])[0], "ct_clip")).as_subclass(torch.Tensor)
              for item in items]
    labels = [resize(read_nifti(item["label"])[0]).as_subclass(torch.Tensor) for item in items]
    network = {"channels": preset(cfg, "channels", (8, 8, 16, 16, 16)),
               "deformer_channels": preset(cfg, "deformer_channels", (8,) * 5)}
    rows = []
    for seed in cfg.run_seeds():
        for variant in ("ddf", "diffeomorphic"):
            run_cfg = GeminiPretrainConfig(
                plugin=cfg.plugin, task="gemini_pretrain", run_dir=cfg.run_dir / f"{variant}_seed{seed}", seed=seed,
                data=root, size=shape, cache_dir=cfg.run_dir / "cache",
                gemini={"normalisation": "ct_clip", "augment": cfg.augment, "loss": {"window": preset(cfg, "window", 5)},
                        "network": {**network, "diffeomorphic": variant == "diffeomorphic"}},
                trainer={**GEMINI_TRAINER_DEFAULTS, "max_steps": 2 * iterations, "checkpoint_every": 2 * iterations,
                         "lr": preset(cfg, "lr", 3e-3)},
            )
            trained = load_run(run_task(run_cfg)["checkpoint"]).model.network.eval()
            rows.append({"variant": variant, "seed": seed, **_pair_scores(trained, images, labels, "correct")})
    header = ["variant", "Dice before", "Dice after", "folding %", "min det J", "inverse consistency (vox)"]
    table = []
    for variant in ("ddf", "diffeomorphic"):
        mine = [row for row in rows if row["variant"] == variant]

        def cell(name: str) -> str:
            values = [row[name] for row in mine]
            spread = f" ± {statistics.stdev(values):.3f}" if len(values) > 1 else ""
            return f"{statistics.fmean(values):.3f}{spread}"

        table.append([variant, *(cell(name) for name in ("dice_before", "dice_after", "folding_percent", "min_jacobian",
                                                         "inverse_consistency"))])
    notes = [f"{len(items)} cases ({len(items) * (len(items) - 1)} ordered pairs) of size {shape}, {iterations} "
             f"GEMINI iterations per run (lr {preset(cfg, 'lr', 3e-3):g}, NCC window {preset(cfg, 'window', 5)}, "
             f"augmentation {'on' if cfg.augment else 'off'}), "
             f"seeds {cfg.run_seeds()}; mean ± std over seeds of the per-run means "
             "(min det J: smallest over pairs)."]
    return BenchmarkResult("medssl: GEMINI registration, direct displacement vs diffeomorphic",
                           [ResultTable("Registration of labelled cases (Dice over foreground labels)", header, table)],
                           rows=rows, notes=notes)
