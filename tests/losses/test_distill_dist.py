"""Real 2-process gloo runs: distributed DINO and grouped contrast equal the single-process run.

Each rank holds its slice of one global batch. The checks are the DDP-equivalence of engine spec
§A9.8: the mean over ranks of the loss equals the single-process loss on the concatenated batch,
and each rank's input gradient divided by ``world_size`` (what DDP's averaging does to parameter
gradients) equals the single-process gradient of that slice. The DINO centre must agree too.
"""

from __future__ import annotations

import pytest
import torch

from accord.losses.distill import DINOLoss
from accord.losses.grouped import GroupedContrastLoss
from accord.testing.dist import run_distributed

pytestmark = pytest.mark.dist

WORLD_SIZE = 2
DINO_STEPS = 2


def _dino_batches(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(100 + step)
    teacher = torch.randn(2, 6, 5, dtype=torch.float64, generator=generator) * 2  # (V_t, B_global, K)
    student = torch.randn(3, 6, 5, dtype=torch.float64, generator=generator) * 2  # (V_s, B_global, K)
    return teacher, student


def _dino_run(loss_fn: DINOLoss, rows: slice) -> list[tuple[float, torch.Tensor, torch.Tensor]]:
    results = []
    for step in range(DINO_STEPS):
        teacher, student = _dino_batches(step)
        local_student = student[:, rows].clone().requires_grad_(True)
        loss = loss_fn(teacher[:, rows], local_student)
        loss.backward()
        results.append((loss.item(), local_student.grad, loss_fn.center.clone()))
    return results


def _dino_body(rank: int, world_size: int) -> list[tuple[float, torch.Tensor, torch.Tensor]]:
    rows_per_rank = 6 // world_size
    loss_fn = DINOLoss(5, teacher_temperature=0.1, gather_distributed=True)
    return _dino_run(loss_fn, slice(rank * rows_per_rank, (rank + 1) * rows_per_rank))


def _both_bodies(rank: int, world_size: int) -> dict[str, object]:
    return {"dino": _dino_body(rank, world_size), "grouped": _grouped_body(rank, world_size)}


@pytest.fixture(scope="module")
def dist_results() -> list[dict[str, object]]:
    """One process group for both checks: spawning workers dominates these tests' run time."""
    return run_distributed(_both_bodies, world_size=WORLD_SIZE)


def test_distributed_dino_matches_single_process_on_the_concatenated_batch(dist_results):
    per_rank = [results["dino"] for results in dist_results]
    single = _dino_run(DINOLoss(5, teacher_temperature=0.1), slice(None))
    for step, (loss, grad, center) in enumerate(single):
        rank_losses = [per_rank[r][step][0] for r in range(WORLD_SIZE)]
        assert sum(rank_losses) / WORLD_SIZE == pytest.approx(loss, rel=1e-12)
        rank_grads = torch.cat([per_rank[r][step][1] for r in range(WORLD_SIZE)], dim=1)
        torch.testing.assert_close(rank_grads / WORLD_SIZE, grad, rtol=1e-12, atol=1e-14)
        for r in range(WORLD_SIZE):
            torch.testing.assert_close(per_rank[r][step][2], center)


def _grouped_data() -> dict[str, torch.Tensor]:
    """Three samples; rank 0 holds samples 0-1, rank 1 holds sample 2 (uneven group tables)."""
    generator = torch.Generator().manual_seed(7)
    batch_a = torch.tensor([0] * 8 + [1] * 8 + [2] * 8)
    batch_b = torch.tensor([0] * 10 + [1] * 10 + [2] * 10)
    return {
        "features_a": torch.randn(24, 4, dtype=torch.float64, generator=generator),
        "group_ids_a": torch.randint(-1, 4, (24,), generator=generator),
        "batch_a": batch_a,
        "features_b": torch.randn(30, 4, dtype=torch.float64, generator=generator),
        "group_ids_b": torch.randint(-1, 4, (30,), generator=generator),
        "batch_b": batch_b,
    }


def _grouped_run(loss_fn: GroupedContrastLoss, samples: list[int], renumber: bool):
    data = _grouped_data()
    rows_a = torch.isin(data["batch_a"], torch.tensor(samples))
    rows_b = torch.isin(data["batch_b"], torch.tensor(samples))
    features_a = data["features_a"][rows_a].clone().requires_grad_(True)
    features_b = data["features_b"][rows_b].clone().requires_grad_(True)
    # A rank numbers its own samples from 0, as a data loader would.
    offset = min(samples) if renumber else 0
    loss = loss_fn(
        features_a,
        data["group_ids_a"][rows_a],
        features_b,
        data["group_ids_b"][rows_b],
        data["batch_a"][rows_a] - offset,
        data["batch_b"][rows_b] - offset,
    )
    loss.backward()
    return loss.item(), features_a.grad, features_b.grad


def _grouped_body(rank: int, world_size: int):
    samples = [0, 1] if rank == 0 else [2]
    return _grouped_run(GroupedContrastLoss(temperature=0.2, gather_distributed=True), samples, renumber=True)


def test_distributed_grouped_contrast_matches_single_process_on_the_concatenated_batch(dist_results):
    per_rank = [results["grouped"] for results in dist_results]
    loss, grad_a, grad_b = _grouped_run(GroupedContrastLoss(temperature=0.2), [0, 1, 2], renumber=False)
    for rank_loss, _, _ in per_rank:
        assert rank_loss == pytest.approx(loss, rel=1e-12)
    torch.testing.assert_close(torch.cat([r[1] for r in per_rank]) / WORLD_SIZE, grad_a, rtol=1e-10, atol=1e-14)
    torch.testing.assert_close(torch.cat([r[2] for r in per_rank]) / WORLD_SIZE, grad_b, rtol=1e-10, atol=1e-14)
