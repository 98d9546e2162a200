"""Real 2-process gloo evaluation: uneven, overlapping shards give the single-process scores."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader
from torch.utils.data.distributed import DistributedSampler

from accord.testing.dist import run_distributed

from accord_medrpg.data import GroundingDataset, collate_grounding
from accord_medrpg.evaluation import evaluate_grounding, gather_samples, grounding_scores

pytestmark = pytest.mark.dist

CATEGORIES = ["Cardiomegaly", "Pneumothorax", "Edema", "Pneumothorax", "Atelectasis", "Cardiomegaly", "Edema"]
IOUS = [0.9, 0.4, 0.55, 0.1, 0.7, 0.5, 0.0]
# Rank 0 holds 4 samples, rank 1 holds 4 where sample 0 repeats (a DistributedSampler's padding), and
# the shards interleave as a DistributedSampler's do.
SHARDS = {0: [0, 2, 4, 6], 1: [1, 3, 5, 0]}
UNEVEN = {0: [0, 1, 2, 3, 4], 1: [5, 6]}


def _gather_and_score(rank: int, shards: dict[int, list[int]]) -> tuple[list[int], dict]:
    index = torch.tensor(shards[rank])
    values = torch.tensor([[IOUS[i], float(i)] for i in shards[rank]], dtype=torch.float64)
    gathered_index, gathered = gather_samples(index, values)
    scores = grounding_scores(gathered[:, 0], [CATEGORIES[int(i)] for i in gathered[:, 1].tolist()])
    return gathered_index.tolist(), scores.as_dict()


class _BrightnessBox(nn.Module):
    """A deterministic stand-in model: a central box whose width follows the image's brightness."""

    def __init__(self):
        super().__init__()
        self.gain = nn.Parameter(torch.tensor(0.2))

    def forward(self, image, image_mask, phrases):
        brightness = image[:, 0].flatten(1).mean(1).sigmoid()
        width = 0.2 + self.gain * brightness * 2
        box = torch.stack([torch.full_like(width, 0.5), torch.full_like(width, 0.55), width, width * 0.8], dim=1)
        return {"pred_box": box}


def _scores(dataset: GroundingDataset, sampler=None) -> dict:
    loader = DataLoader(dataset, batch_size=3, sampler=sampler, collate_fn=collate_grounding)
    scores = evaluate_grounding(_BrightnessBox(), loader)
    return {**scores.as_dict(), "samples": scores.samples}


def _body(rank: int, world_size: int, jsonl: str) -> tuple[list, dict]:
    dataset = GroundingDataset(jsonl, image_size=64, train=False, num_negatives=0)
    # DistributedSampler repeats samples to even out the ranks when the size is odd.
    evaluated = _scores(dataset, DistributedSampler(dataset, world_size, rank, shuffle=False))
    return [_gather_and_score(rank, shards) for shards in (SHARDS, UNEVEN)], evaluated


def test_distributed_scores_equal_single_process(grounding_dir: Path) -> None:
    jsonl = grounding_dir / "train.jsonl"
    single = grounding_scores(torch.tensor(IOUS), CATEGORIES).as_dict()
    single_model = _scores(GroundingDataset(jsonl, image_size=64, train=False, num_negatives=0))
    assert 0 < single_model["miou"] and len(single_model["samples"]) == len(jsonl.read_text().splitlines())
    for per_rank, evaluated in run_distributed(_body, world_size=2, args=(str(jsonl),)):
        for index, scores in per_rank:
            assert index == list(range(len(IOUS)))
            assert scores == pytest.approx(single)
        samples, expected = evaluated.pop("samples"), dict(single_model)
        expected_samples = expected.pop("samples")
        assert evaluated == pytest.approx(expected)
        assert [(s["index"], s["category"]) for s in samples] == [(s["index"], s["category"]) for s in expected_samples]
        assert [s["iou"] for s in samples] == pytest.approx([s["iou"] for s in expected_samples])
    # The reference's element-wise all_reduce would have summed the ranks' IoUs instead.
    assert single["acc"] == pytest.approx(4 / 7) and single["miou"] == pytest.approx(sum(IOUS) / 7)
