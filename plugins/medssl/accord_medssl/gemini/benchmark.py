"""GEMINI's benchmarks: ``gemini_registration`` (quality) and ``--speed gemini_speed`` (cost).

``accord benchmark medssl gemini_registration [--quick]``: :func:`run_gemini_registration`, DDF vs
diffeomorphic GEMINI on generated 3D phantom pairs, 2D chest X-ray phantoms and deformed copies of
the MNI152 T1 template (real anatomy), or on ``--data``: Dice of warped labels before / after,
folding and inverse consistency, a table and ``registration.png`` (a quality benchmark, not the
default, so that ``accord benchmark medssl`` keeps running the ``segmentation`` pipeline without a
name).

``accord benchmark medssl --speed gemini_speed``:

- ``ncc``: the local NCC loss (forward + backward) with separable box sums against the reference's
  dense ``window^d`` grouped convolution, alternated in one run, same inputs; prints the median and
  min/max seconds of each, the speed-up and the largest difference of the two loss values.
- ``iteration``: one full GEMINI iteration (correspondence step + restoration step, both backward)
  at the reference widths: seconds per iteration (median, min/max) and peak memory (CUDA: the
  allocator's peak; CPU: the growth of the process's peak resident set).
"""

from __future__ import annotations

import dataclasses
import itertools
import resource
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import Field

from accord.benchmarking import BenchmarkResult, ResultTable, preset
from accord.config import BenchmarkConfig
from accord_medssl.data.cxr import CxrTableOptions
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


def run_gemini_speed(cfg: GeminiSpeedConfig) -> BenchmarkResult:
    """The reference sizes (3D 96^3 batch 1, 2D 512^2 batch 5, reference widths); quick: smaller images."""
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


RegistrationSet = Literal["pairs", "cxr", "mni152"]


class GeminiRegistrationConfig(BenchmarkConfig):
    """``accord benchmark medssl gemini_registration [--quick] [--data DIR|CSV]``: :func:`run_gemini_registration`."""

    datasets: list[RegistrationSet] = Field(
        ["pairs", "cxr", "mni152"], min_length=1,
        description="generated sets scored without --data: pairs (3D abdomen CT phantoms), cxr (2D chest X-ray "
        "phantoms), mni152 (nilearn's MNI152 T1 template with grey / white-matter labels: real anatomy)")
    num_cases: int = Field(6, ge=2, description="generated cases per set (quick: 3)")
    shape: tuple[int, int, int] = Field(
        (64, 64, 48), description="pairs phantom size, and the training size of a 3D --data set (quick: 24x24x16)")
    cxr_size: int = Field(128, ge=16,
                          description="side of the chest X-ray phantoms and their training size (quick: 32)")
    mni_shape: tuple[int, int, int] = Field(
        (48, 56, 48), description="grid the MNI152 template is resampled to (2 mm: 99x117x95; quick: 16x20x16)")
    max_displacement: float = Field(
        0.1, gt=0, le=0.25, description="largest generated displacement, fraction of the smallest side (0.1: the synth "
        "default; 20 random fields of 0.15 had min det J 0.21, of 0.25 folded)")
    iterations: int = Field(300, ge=1, description="GEMINI iterations per run (quick: 10)")
    window: int = Field(9, ge=1, description="local NCC window (quick: 5, for the small images)")
    augment: bool = Field(
        False, description="GEMINI's shared random affine (off: the cases differ only by their deformation)")
    lr: float = Field(1e-4, gt=0, description="Adam learning rate (the reference's; quick: 3e-3)")
    flow_init: Literal["kaiming", "zero"] = Field(
        "kaiming", description="deformer output conv init: kaiming (the reference's) or zero (VoxelMorph's)")
    shuffle_blocks: int = Field(
        5000, ge=0,
        description="Models-Genesis pixel-shuffle blocks per restoration sample (the reference's; quick: 50)")
    normalisation: Literal["minmax", "ct_clip"] = Field(
        "ct_clip", description="intensity normalisation of a 3D --data set (pairs: ct_clip, mni152: minmax)")
    cxr: CxrTableOptions = Field(CxrTableOptions(), description="--data a chest X-ray CSV file: its columns")
    channels: tuple[int, int, int, int, int] = Field(
        (32, 64, 128, 256, 512), description="backbone widths (quick: 8, 8, 16, 16, 16)")
    deformer_channels: tuple[int, int, int, int, int] = Field(
        (32, 64, 64, 64, 32), description="deformer widths (quick: 8 each)")


@dataclasses.dataclass
class _Cases:
    """Images and labels of one set at its training size, as the training run reads them.

    Attributes:
        name: set name in the tables.
        root: the dataset folder the training runs read.
        size: training size (2 or 3 values).
        normalisation: GEMINI's intensity normalisation of a 3D set.
        images: ``(1, *size)`` per case, in [0, 1].
        labels: ``(K, *size)`` binary structure masks per case.
    """

    name: str
    root: Path
    size: tuple[int, ...]
    normalisation: Literal["minmax", "ct_clip"]
    images: list[torch.Tensor]
    labels: list[torch.Tensor]


def _volume_cases(name: str, root: Path, size: tuple[int, ...], normalisation: Literal["minmax", "ct_clip"]) -> _Cases:
    """The labelled cases of an MSD dataset, cropped / padded to ``size``; labels one-hot without background."""
    from accord_medssl.finetune import labelled_items
    from accord_medssl.gemini.data import fixed_size, normalise_intensity
    from accord_medssl.gemini.tasks import read_nifti

    items, label_names = labelled_items(root)
    resize = fixed_size(size)
    images = [resize(normalise_intensity(read_nifti(item["image"])[0], normalisation)).as_subclass(torch.Tensor)
              for item in items]
    maps = [resize(read_nifti(item["label"])[0]).as_subclass(torch.Tensor)[0] for item in items]
    labels = [torch.stack([label == k for k in sorted(label_names) if k]).float() for label in maps]
    return _Cases(name, root, size, normalisation, images, labels)


def _cxr_cases(root: Path, side: int, table: CxrTableOptions | None = None) -> _Cases:
    """The chest X-rays of a folder (or CSV file) that have a mask for every structure, resized to ``side``."""
    from accord_medssl.data.cxr import cxr_items, read_cxr, read_mask

    items = cxr_items(root, table)
    names = sorted({name for item in items for name in item["masks"]})
    annotated = [item for item in items if names and sorted(item["masks"]) == names]
    if len(annotated) < 2:
        raise ValueError(f"{root}: registration is scored on images with a mask for every structure under masks/; "
                         f"{len(annotated)} found, at least 2 needed")
    size = (side, side)
    images = [read_cxr(item["image"], size) for item in annotated]
    labels = [torch.cat([read_mask(item["masks"][name], size) for name in names]) for item in annotated]
    return _Cases("cxr", root, size, "minmax", images, labels)


def _registration_sets(cfg: GeminiRegistrationConfig) -> list[_Cases]:
    """``--data`` (a chest X-ray folder or CSV file, or an MSD dataset) or the generated ``datasets``."""
    from accord_medssl.data.cxr import is_cxr_root, synth_cxr
    from accord_medssl.data.pairs import synth_mni152, synth_pairs

    if cfg.data is not None:
        if is_cxr_root(cfg.data):
            return [_cxr_cases(cfg.data, cfg.cxr_size, cfg.cxr)]
        return [_volume_cases(cfg.data.name, cfg.data, tuple(cfg.shape), cfg.normalisation)]
    num_cases, data = preset(cfg, "num_cases", 3), cfg.run_dir / "data"
    shape = tuple(preset(cfg, "shape", (24, 24, 16)))
    sets = []
    for name in cfg.datasets:
        if name == "pairs":
            root = synth_pairs(data / name, num_cases, shape, max_displacement=cfg.max_displacement)
            sets.append(_volume_cases(name, root, shape, "ct_clip"))
        elif name == "mni152":
            mni_shape = tuple(preset(cfg, "mni_shape", (16, 20, 16)))
            root = synth_mni152(data / name, num_cases, mni_shape, max_displacement=cfg.max_displacement)
            sets.append(_volume_cases(name, root, mni_shape, "minmax"))
        else:
            side = preset(cfg, "cxr_size", 32)
            root = synth_cxr(data / name, num_cases, side, groups=("all",), max_displacement=cfg.max_displacement)
            sets.append(_cxr_cases(root, side))
    return sets


def _mean_dice(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean over structures (present in either) of the Dice of two ``(K, *spatial)`` binary mask stacks."""
    a, b = a.flatten(1) > 0.5, b.flatten(1) > 0.5
    overlap, total = (a & b).sum(1).float(), (a.sum(1) + b.sum(1)).float()
    present = total > 0
    return float((2 * overlap[present] / total[present]).mean())


def _pair_scores(network: torch.nn.Module, images: list[torch.Tensor], labels: list[torch.Tensor],
                 convention: str) -> dict[str, float]:
    """Mean over ordered pairs of: mean structure Dice of the warped label before / after, folding and
    inverse consistency (min det J: the smallest)."""
    from accord_medssl.gemini.warp import folding_stats, inverse_consistency_error, warp

    scores: dict[str, list[float]] = {name: [] for name in ("dice_before", "dice_after", "folding_percent",
                                                            "min_jacobian", "inverse_consistency")}
    with torch.no_grad():
        for i, j in itertools.permutations(range(len(images)), 2):
            flow = network.register(images[i][None], images[j][None])
            back = network.register(images[j][None], images[i][None])
            warped = warp(labels[i][None], flow, "nearest", convention)[0]
            scores["dice_before"].append(_mean_dice(labels[i], labels[j]))
            scores["dice_after"].append(_mean_dice(warped, labels[j]))
            folds = folding_stats(flow)
            scores["folding_percent"].append(folds["folding_percent"])
            scores["min_jacobian"].append(folds["min_jacobian"])
            scores["inverse_consistency"].append(float(inverse_consistency_error(flow, back, convention)))
    return {name: (min(values) if name == "min_jacobian" else statistics.fmean(values))
            for name, values in scores.items()}


METRICS = ("dice_before", "dice_after", "folding_percent", "min_jacobian", "inverse_consistency")
VARIANTS = ("ddf", "diffeomorphic")


def _plot(rows: list[dict[str, Any]], path: Path) -> Path:
    """Dice before / after per set and variant (mean, min-max over seeds as error bars)."""
    from matplotlib.figure import Figure

    from accord.utils.files import write_figure_atomically

    sets = list(dict.fromkeys(row["dataset"] for row in rows))
    figure = Figure(figsize=(3.6 * len(sets), 3.4), layout="constrained")
    axes = figure.subplots(1, len(sets), squeeze=False)[0]
    for ax, name in zip(axes, sets):
        for offset, variant in ((-0.2, "ddf"), (0.2, "diffeomorphic")):
            mine = [row for row in rows if row["dataset"] == name and row["variant"] == variant]
            for position, metric in enumerate(("dice_before", "dice_after")):
                values = [row[metric] for row in mine]
                mean = statistics.fmean(values)
                ax.bar(position + offset, mean, width=0.38, color=f"C{VARIANTS.index(variant)}",
                       alpha=0.45 if metric == "dice_before" else 0.9,
                       yerr=[[mean - min(values)], [max(values) - mean]], capsize=3,
                       label=variant if metric == "dice_after" else None)
        ax.set_xticks([0, 1], ["before", "after"])
        ax.set_title(name)
        ax.set_ylabel("mean structure Dice")
        low = min(min(row["dice_before"], row["dice_after"]) for row in rows if row["dataset"] == name)
        ax.set_ylim(max(0.0, low - 0.1), 1.0)
        ax.grid(axis="y", alpha=0.3)
        ax.legend(fontsize="small")
    return write_figure_atomically(figure, path, dpi=110)


def run_gemini_registration(cfg: GeminiRegistrationConfig) -> BenchmarkResult:
    """Train GEMINI-MIP (``gemini_pretrain``) with a direct displacement field (the reference) and
    with the diffeomorphic extension, per set and seed, and score the deformer on every ordered pair
    of labelled cases: mean structure Dice of the warped label before / after, % folding voxels,
    smallest Jacobian determinant and inverse-consistency error (voxels).

    The sets: generated 3D phantom pairs, 2D chest X-ray phantoms and deformed copies of the MNI152
    T1 template (real anatomy, grey / white matter), or ``--data`` (an MSD dataset, or a chest X-ray
    folder or CSV file (``cxr``) with masks). Writes ``registration.png``.
    """
    from accord.runs import load_run, run_task
    from accord_medssl.gemini.tasks import GEMINI_TRAINER_DEFAULTS, GeminiPretrainConfig

    iterations, lr, window = preset(cfg, "iterations", 10), preset(cfg, "lr", 3e-3), preset(cfg, "window", 5)
    network = {"channels": preset(cfg, "channels", (8, 8, 16, 16, 16)),
               "deformer_channels": preset(cfg, "deformer_channels", (8,) * 5), "flow_init": cfg.flow_init}
    sets = _registration_sets(cfg)
    rows = []
    for cases in sets:
        for seed in cfg.run_seeds():
            for variant in VARIANTS:
                run_cfg = GeminiPretrainConfig(
                    plugin=cfg.plugin, task="gemini_pretrain", seed=seed,
                    run_dir=cfg.run_dir / cases.name / f"{variant}_seed{seed}", data=cases.root, size=cases.size, cache_dir=cfg.run_dir / "cache" / cases.name,
                    cxr=cfg.cxr if cases.root.is_file() else CxrTableOptions(),
                    gemini={"normalisation": cases.normalisation, "augment": cfg.augment, "loss": {"window": window},
                            "corruption": {"shuffle_blocks": preset(cfg, "shuffle_blocks", 50)},
                            "network": {**network, "spatial_dims": len(cases.size),
                                        "diffeomorphic": variant == "diffeomorphic"}},
                    trainer={**GEMINI_TRAINER_DEFAULTS, "max_steps": 2 * iterations,
                             "checkpoint_every": 2 * iterations, "log_every": 2 * iterations, "lr": lr},
                )
                trained = load_run(run_task(run_cfg)["checkpoint"]).model.network.eval()
                rows.append({"dataset": cases.name, "variant": variant, "seed": seed,
                             **_pair_scores(trained, cases.images, cases.labels, "correct")})
    header = ["set", "variant", "Dice before", "Dice after", "folding %", "min det J", "inverse consistency (vox)"]
    table = []
    for cases in sets:
        for variant in VARIANTS:
            mine = [row for row in rows if row["dataset"] == cases.name and row["variant"] == variant]

            def cell(name: str) -> str:
                values = [row[name] for row in mine]
                spread = f" ± {statistics.stdev(values):.3f}" if len(values) > 1 else ""
                return f"{statistics.fmean(values):.3f}{spread}"

            table.append([cases.name, variant, *(cell(name) for name in METRICS)])
    described = "; ".join(f"{cases.name}: {len(cases.images)} cases of {'x'.join(map(str, cases.size))}"
                          for cases in sets)
    notes = [f"{described}; every ordered pair scored. {iterations} GEMINI-MIP iterations per run (lr {lr:g}, NCC "
             f"window {window}, flow init {cfg.flow_init}, augmentation {'on' if cfg.augment else 'off'}"
             + ("" if cfg.data is not None else f", generated displacements up to {cfg.max_displacement:g} of the "
                "smallest side") + f"), seeds {cfg.run_seeds()}; mean ± std over seeds of the per-run means of the "
             "mean structure Dice (min det J: smallest over pairs)."]
    if cfg.quick and "iterations" not in cfg.model_fields_set:
        notes.append("Quick: a smoke run of every set; in 10 iterations at these sizes the flows stay under half a voxel, "
                     "so the nearest-warped labels, and Dice, do not change (docs/medssl.md has a 100-iteration run "
                     "where every set aligns, e.g. chest X-rays 0.46 -> 0.58).")
    plot = _plot(rows, cfg.run_dir / "registration.png")
    return BenchmarkResult("medssl: GEMINI registration, direct displacement vs diffeomorphic",
                           [ResultTable("Registration of labelled cases (mean Dice over structures)", header, table)],
                           rows=rows, plots=[plot], notes=notes)
