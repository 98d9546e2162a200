"""Benchmarks of the medssl pipeline: data-loader throughput (uncached vs MONAI's disk cache),
pretraining steps per second with peak memory, and how well anatomy embeddings match anatomy."""

from __future__ import annotations

import math
import resource
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch.utils.data import DataLoader, Dataset

from accord_medssl.anatomy import AnatomyEmbeddingModel, AnatomyPretrainingOptions, AnatomySearchIndex
from accord_medssl.anatomy.evaluation import (
    ACCEPTANCE_CRITERIA,
    MatchOutcomes,
    match_labelled_points,
    random_deformed_copy,
    sample_labelled_points,
)
from accord_medssl.data.layout import decathlon_items
from accord_medssl.data.phantom import DEFAULT_SHAPE, synth
from accord_medssl.data.pipeline import build_dataset

__all__ = ["anatomy_matching", "loader_throughput", "pretraining_speed"]


def _epoch_seconds(dataset: Dataset, num_workers: int) -> float:
    """Wall time of one full pass over ``dataset`` (batch 1, as the medssl methods train)."""
    loader = DataLoader(dataset, batch_size=1, num_workers=num_workers)
    start = time.perf_counter()
    for _ in loader:
        pass
    return time.perf_counter() - start


def loader_throughput(
    root: str | Path | None = None,
    *,
    spacing: Sequence[float] | None = None,
    num_workers: int = 0,
    num_cases: int = 8,
    shape: tuple[int, int, int] = DEFAULT_SHAPE,
) -> dict[str, float]:
    """Volumes per second through the preprocessing pipeline: uncached, disk-cache cold and warm.

    Three passes over the training split: plain decoding (what every epoch costs without a cache),
    the first pass of a fresh disk cache (decode + preprocess + write), and its second pass (read
    the preprocessed tensors back).

    Args:
        root: an MSD dataset; ``None`` synthesises ``num_cases`` phantoms of ``shape`` in a
            temporary directory.
        spacing: target spacing handed to the pipeline (``None``: native grid).
        num_workers: DataLoader worker processes.
        num_cases: phantoms to synthesise when ``root`` is None.
        shape: phantom shape when ``root`` is None.

    Returns:
        ``volumes``, ``uncached_volumes_per_s``, ``cold_volumes_per_s``,
        ``cached_volumes_per_s``, ``cache_speedup`` (cached over uncached) and ``cache_mb``.
    """
    with tempfile.TemporaryDirectory(prefix="medssl-bench-") as scratch:
        scratch_dir = Path(scratch)
        if root is None:
            root = synth(scratch_dir / "data", num_train=num_cases, num_test=0, shape=shape)
        items = decathlon_items(root)
        cache_dir = scratch_dir / "cache"
        uncached_dataset = build_dataset(items, cache="none", spacing=spacing)
        # One untimed read, so lazy imports and first-call set-up do not count against a pass.
        uncached_dataset[0]
        uncached = _epoch_seconds(uncached_dataset, num_workers)
        disk = build_dataset(items, cache="disk", cache_dir=cache_dir, spacing=spacing)
        cold = _epoch_seconds(disk, num_workers)
        cached = _epoch_seconds(disk, num_workers)
        cache_bytes = sum(path.stat().st_size for path in cache_dir.iterdir())
    volumes = len(items)
    return {
        "volumes": volumes,
        "uncached_volumes_per_s": volumes / uncached,
        "cold_volumes_per_s": volumes / cold,
        "cached_volumes_per_s": volumes / cached,
        "cache_speedup": uncached / cached,
        "cache_mb": cache_bytes / 2**20,
    }


def pretraining_speed(
    method: Literal["alice", "anatomy_embedding"] = "alice",
    *,
    crop_size: int = 64,
    batch_size: int = 2,
    steps: int = 6,
    warmup_steps: int = 2,
    options: dict[str, Any] | None = None,
    num_cases: int = 4,
    device: Literal["auto", "cpu", "cuda"] = "auto",
) -> dict[str, float]:
    """Optimizer steps per second and peak memory of ``pretrain`` on synthesised phantoms.

    Each step is a full trainer step: view cutting (and, for Alice, anatomy matching against cached
    embeddings), forward, backward, optimizer and EMA update. The first ``warmup_steps`` are not
    timed (one-off kernel selection, and the first embedding of each volume for Alice). Alice mines
    with an anatomy-embedding network trained for one step first (untimed).

    Args:
        method: the pretraining stage to time.
        crop_size: edge of the cubic views (Alice: a multiple of 32).
        batch_size: view pairs per step.
        steps: steps to run, timed ones included.
        warmup_steps: leading steps left out of the rate.
        options: the method's options section (``alice`` / ``anatomy_embedding``); None: the
            defaults, i.e. the reference sizes (SwinUNETR feature size 48, 512 prototypes).
        num_cases: phantoms of 96 x 96 x 64 voxels to cut the views from.
        device: the trainer's device.

    Returns:
        ``steps_per_s`` and ``seconds_per_step`` (timed steps), ``peak_memory_mb``: on CUDA the
        peak allocated by torch, on the CPU the peak resident size of the whole process (run it in
        a fresh process), ``device``.
    """
    from accord.config import TrainerConfig
    from accord.training.progress import read_metrics
    from accord_medssl.tasks import PretrainConfig, pretrain

    if steps <= warmup_steps:
        raise ValueError(f"steps ({steps}) must exceed warmup_steps ({warmup_steps})")
    crop = (crop_size,) * 3
    trainer = TrainerConfig(max_steps=steps, batch_size=batch_size, checkpoint_every=steps, log_every=1, device=device)
    with tempfile.TemporaryDirectory(prefix="medssl-speed-") as scratch:
        scratch_dir = Path(scratch)
        data = synth(scratch_dir / "data", num_train=num_cases, num_test=0)
        shared = {"plugin": "medssl", "task": "pretrain", "data": data, "cache_dir": scratch_dir / "cache", "crop_size": crop}
        timed = {"method": method, "run_dir": scratch_dir / method, "trainer": trainer, method: options or {}}
        if method == "alice":
            anatomy = pretrain(PretrainConfig(**shared, method="anatomy_embedding", run_dir=scratch_dir / "anatomy",
                                              trainer=trainer.model_copy(update={"max_steps": 1, "checkpoint_every": 1})))
            timed["mining"] = {"anatomy_checkpoint": anatomy["checkpoint"]}
        cuda = torch.cuda.is_available() and device != "cpu"
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        pretrain(PretrainConfig(**shared, **timed))
        records = read_metrics(scratch_dir / method / "metrics.jsonl")[warmup_steps:]
    seconds = sum(batch_size / record["samples_per_s"] for record in records)
    if cuda:
        peak_mb = torch.cuda.max_memory_allocated() / 2**20
    else:
        # ru_maxrss is in KiB on Linux.
        peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {
        "steps_per_s": len(records) / seconds,
        "seconds_per_step": seconds / len(records),
        "peak_memory_mb": peak_mb,
        "device": "cuda" if cuda else "cpu",
    }


# --- anatomy matching --------------------------------------------------------------------------

#: Random transforms of the "deformed copy" pairs (:func:`random_deformed_copy` arguments): about a
#: tenth of the field of view in shift, with rotation, scale and a smooth elastic part on top.
PHANTOM_DEFORMATION = {"max_rotation_deg": 10.0, "max_scale": 0.1, "max_translation_mm": 5.0, "max_elastic_mm": 3.0}
MNI_DEFORMATION = {"max_rotation_deg": 10.0, "max_scale": 0.1, "max_translation_mm": 10.0, "max_elastic_mm": 4.0}


@dataclass(frozen=True)
class _MatchingPair:
    """Query and target volumes with labels; ``source_points`` are the query voxels' true target positions."""

    query: torch.Tensor
    query_labels: torch.Tensor
    target: torch.Tensor
    target_labels: torch.Tensor
    spacing: tuple[float, float, float]
    source_points: torch.Tensor | None = None


@dataclass(frozen=True)
class _MatchingSet:
    """Volumes an embedding trains on, and the labelled pairs it is then scored on, by pair kind."""

    name: str
    train_volumes: list[torch.Tensor]
    pairs: dict[str, list[_MatchingPair]]


def _deformed_pair(
    volume: torch.Tensor, labels: torch.Tensor, spacing: tuple[float, float, float], seed: int, deformation: dict
) -> _MatchingPair:
    """The original as target and a seeded random deformed copy of it as query."""
    copy = random_deformed_copy(volume, labels, spacing, generator=torch.Generator().manual_seed(seed), **deformation)
    return _MatchingPair(copy.volume, copy.labels, volume, labels, spacing, copy.source_points)


def _phantom_set(root: Path, num_cases: int, shape: tuple[int, int, int], seed: int, copies: int) -> _MatchingSet:
    """Quick-benchmark phantoms: train on all cases, match each case into the next, and copies into originals."""
    items = decathlon_items(synth(root, num_train=num_cases, num_test=0, shape=shape, seed=seed))
    cases = [build_dataset([item], cache="none")[0] for item in items]
    volumes = [case["image"].as_subclass(torch.Tensor) for case in cases]
    labels = [case["label"].as_subclass(torch.Tensor)[0].long() for case in cases]
    spacing = tuple(float(size) for size in cases[0]["image"].affine[:3, :3].norm(dim=0))
    cross = [
        _MatchingPair(volumes[index], labels[index], volumes[(index + 1) % num_cases], labels[(index + 1) % num_cases], spacing)
        for index in range(num_cases)
    ]
    deformed = [
        _deformed_pair(volumes[index], labels[index], spacing, seed + 1000 + index, PHANTOM_DEFORMATION)
        for index in range(min(copies, num_cases))
    ]
    return _MatchingSet("phantoms", volumes, {"cross-case": cross, "deformed copy": deformed})


def _mni152_set(seed: int, train_copies: int, copies: int) -> _MatchingSet:
    """nilearn's MNI152 T1 template (2 mm, shipped with nilearn) with tissue labels.

    Labels: 1 other brain (mostly CSF), 2 grey matter, 3 white matter, from nilearn's masks. The
    embedding trains on the template and ``train_copies`` deformed copies; the scored pairs are
    ``copies`` other deformed copies matched into the template.

    Raises:
        ImportError: nilearn is not installed.
    """
    try:
        from nilearn import datasets
    except ImportError as error:
        raise ImportError("the MNI152 matching set needs nilearn: pip install 'accord-medssl[test]'") from error

    def array(image) -> torch.Tensor:
        return torch.from_numpy(image.get_fdata(dtype="float32"))

    template = datasets.load_mni152_template(resolution=2)
    brain = array(datasets.load_mni152_brain_mask(resolution=2)) > 0
    grey = array(datasets.load_mni152_gm_mask(resolution=2)) > 0
    white = array(datasets.load_mni152_wm_mask(resolution=2)) > 0
    labels = torch.where(white, 3, torch.where(grey, 2, torch.where(brain, 1, 0)))
    volume = array(template)[None]
    spacing = tuple(float(size) for size in template.header.get_zooms()[:3])
    train = [volume] + [
        _deformed_pair(volume, labels, spacing, seed + index, MNI_DEFORMATION).query for index in range(train_copies)
    ]
    pairs = [_deformed_pair(volume, labels, spacing, seed + 1000 + index, MNI_DEFORMATION) for index in range(copies)]
    return _MatchingSet("mni152", train, {"deformed copy": pairs})


def _train_embedding(
    volumes: list[torch.Tensor], options: AnatomyPretrainingOptions, steps: int, seed: int, run_dir: Path
) -> AnatomyEmbeddingModel:
    """The quick benchmark's anatomy stage (its crops, augmentation and trainer) for ``steps`` steps."""
    from accord.training import Trainer
    from accord_medssl.anatomy import AnatomyEmbeddingPretraining
    from accord_medssl.tasks import QUICK
    from accord_medssl.views import AnatomyViewOptions, AnatomyViewPairs

    trainer = QUICK.anatomy_trainer.model_copy(
        update={"max_steps": steps, "checkpoint_every": steps, "log_every": steps, "seed": seed,
                "warmup_steps": min(QUICK.anatomy_trainer.warmup_steps, steps - 1)}
    )
    torch.manual_seed(seed)
    module = AnatomyEmbeddingPretraining(options)
    dataset = AnatomyViewPairs([{"image": volume} for volume in volumes], QUICK.crop_size, AnatomyViewOptions())
    Trainer(trainer, run_dir).fit(module, dataset)
    return module.model


def _score_pairs(model: AnatomyEmbeddingModel, pairs: list[_MatchingPair], num_points: int, seed: int) -> MatchOutcomes:
    """Match ``num_points`` label-balanced query points per pair with ``model``'s embeddings."""
    generator = torch.Generator().manual_seed(seed)
    outcomes = []
    for pair in pairs:
        points = sample_labelled_points(pair.query_labels, num_points, generator)
        true_points = None if pair.source_points is None else pair.source_points[tuple(points.T)]
        outcomes.append(
            match_labelled_points(
                points,
                AnatomySearchIndex.from_embedding(model.embed_volume(pair.query)),
                AnatomySearchIndex.from_embedding(model.embed_volume(pair.target)),
                pair.query_labels,
                pair.target_labels,
                true_points=true_points,
                spacing=pair.spacing,
            )
        )
    return MatchOutcomes.concatenate(outcomes)


def _percent(value: float) -> str:
    return "n/a" if math.isnan(value) else f"{100 * value:.1f}"


def anatomy_matching(
    variants: Mapping[str, AnatomyPretrainingOptions | None] | None = None,
    *,
    datasets: Sequence[Literal["phantoms", "mni152"]] = ("phantoms", "mni152"),
    steps: int | None = None,
    num_points: int = 256,
    threshold: float = 0.7,
    seed: int = 0,
    verbose: bool = True,
) -> dict[str, Any]:
    """How well anatomy embeddings find corresponding points, trained at the quick benchmark's scale.

    Each variant's embedding network is trained like the quick benchmark's anatomy stage (32^3 crops,
    batch 2, its learning rate, ``steps`` steps) on each dataset, then scored with
    :mod:`accord_medssl.anatomy.evaluation` (the miner's own similarity search):

    - ``phantoms``: the quick benchmark's 10 phantoms of 48 x 48 x 32 voxels; *cross-case* pairs
      match every case into the next (organ hit rate), *deformed copy* pairs match a randomly
      affine + elastically deformed copy of a case into the case (hit rate and error in mm);
    - ``mni152``: nilearn's MNI152 T1 template at 2 mm with tissue labels (grey matter, white
      matter, other brain); trained on the template and 7 deformed copies, scored on 3 other
      copies matched into the template.

    Args:
        variants: name -> pretraining options; ``None`` options give the untrained network
            (initialised from ``seed``). Default: untrained and the quick benchmark's options.
        datasets: which sets to run.
        steps: training steps; ``None``: the quick benchmark's anatomy steps.
        num_points: query points per pair, balanced over labels.
        threshold: the miner's acceptance threshold.
        seed: seed of the data, the networks and the query points.
        verbose: print the table.

    Returns:
        ``rows`` (one dict per dataset, pair kind and variant: :meth:`MatchOutcomes.summary` plus
        ``dataset``, ``pairs``, ``variant`` and ``train_seconds``), ``markdown`` (the table) and
        ``criteria_markdown`` (a second table: per acceptance criterion of
        :data:`~accord_medssl.anatomy.evaluation.ACCEPTANCE_CRITERIA`, its hit-vs-miss AUC and the
        hit rate and error among the most confident half and quarter of the points).
    """
    from accord.report import markdown_table
    from accord_medssl.tasks import QUICK

    if variants is None:
        variants = {"untrained": None, "trained": QUICK.anatomy_embedding}
    steps = QUICK.anatomy_trainer.max_steps if steps is None else steps
    rows = []
    with tempfile.TemporaryDirectory(prefix="medssl-matching-") as scratch:
        scratch_dir = Path(scratch)
        for dataset in datasets:
            if dataset == "phantoms":
                shape = QUICK.phantoms["shape"]
                matching_set = _phantom_set(scratch_dir / "phantoms", QUICK.phantoms["num_train"], shape, seed, copies=3)
            elif dataset == "mni152":
                matching_set = _mni152_set(seed, train_copies=7, copies=3)
            else:
                raise ValueError(f"datasets: expected 'phantoms' or 'mni152', got {dataset!r}")
            for variant, options in variants.items():
                start = time.perf_counter()
                if options is None:
                    torch.manual_seed(seed)
                    model = AnatomyEmbeddingModel(QUICK.anatomy_embedding.model)
                else:
                    run_dir = scratch_dir / "runs" / f"{dataset}_{variant}"
                    model = _train_embedding(matching_set.train_volumes, options, steps, seed, run_dir)
                train_seconds = time.perf_counter() - start
                for kind, pairs in matching_set.pairs.items():
                    summary = _score_pairs(model, pairs, num_points, seed).summary(threshold)
                    rows.append({"dataset": dataset, "pairs": kind, "variant": variant,
                                 "train_seconds": train_seconds, **summary})
    header = ["dataset", "pairs", "variant", "hit % (chance)", "best score mean [p05, p95]", "mean score",
              f"accepted % (> {threshold})", "hit % if accepted", "hit-vs-miss score AUC", "error mm mean (p50)"]
    lines = [
        [row["dataset"], row["pairs"], row["variant"],
         f"{_percent(row['hit_rate'])} ({_percent(row['chance_hit_rate'])})",
         f"{row['score_mean']:.3f} [{row['score_p05']:.3f}, {row['score_p95']:.3f}]",
         f"{row['similarity_mean']:.3f}", _percent(row["accepted"]), _percent(row["accepted_hit_rate"]),
         "n/a" if math.isnan(row["hit_score_auc"]) else f"{row['hit_score_auc']:.2f}",
         f"{row['error_mm_mean']:.1f} ({row['error_mm_p50']:.1f})" if "error_mm_mean" in row else "-"]
        for row in rows
    ]
    markdown = markdown_table(header, lines)
    criteria_header = ["dataset", "pairs", "variant", "criterion", "hit-vs-miss AUC",
                       "hit % (error mm) in top half", "hit % (error mm) in top quarter"]

    def kept(row: dict[str, Any], criterion: str, share: str) -> str:
        error = row.get(f"{criterion}_{share}_error_mm_mean")
        return _percent(row[f"{criterion}_{share}_hit_rate"]) + ("" if error is None else f" ({error:.1f})")

    criteria_lines = [
        [row["dataset"], row["pairs"], row["variant"], criterion,
         "n/a" if math.isnan(row[f"hit_{criterion}_auc"]) else f"{row[f'hit_{criterion}_auc']:.2f}",
         kept(row, criterion, "top_half"), kept(row, criterion, "top_quarter")]
        for row in rows
        for criterion in ACCEPTANCE_CRITERIA
    ]
    criteria_markdown = markdown_table(criteria_header, criteria_lines)
    if verbose:
        print(markdown, criteria_markdown, sep="\n\n")
    return {"rows": rows, "markdown": markdown, "criteria_markdown": criteria_markdown}
