"""MemoryQueue ring buffer, checkpointing, and the MoCo-style queue losses vs a MoCo reference."""

from __future__ import annotations

import io
import math

import numpy as np
import pytest
import torch

from accord.losses.infonce import InfoNCELoss, NTXentLoss
from accord.losses.memory import MemoryQueue


def _rows(start: int, n: int, dim: int = 2) -> torch.Tensor:
    return torch.arange(start, start + n, dtype=torch.float32)[:, None].repeat(1, dim)


def test_queue_starts_empty_and_fills_as_a_ring() -> None:
    queue = MemoryQueue(size=5, dim=2)
    assert queue.negatives().shape == (0, 2)
    queue.enqueue(_rows(0, 3))
    assert queue.negatives()[:, 0].tolist() == [0, 1, 2]
    queue.enqueue(_rows(3, 4))  # wraps: slots 3, 4, 0, 1
    assert queue.negatives()[:, 0].tolist() == [5, 6, 2, 3, 4]
    assert int(queue.pointer) == 2 and int(queue.count) == 5
    queue.enqueue(_rows(10, 7))  # more rows than the queue: only the last 5 stay
    assert sorted(queue.negatives()[:, 0].tolist()) == [12, 13, 14, 15, 16]


def test_negatives_are_detached_copies() -> None:
    queue = MemoryQueue(size=4, dim=2)
    queue.enqueue(_rows(0, 2).requires_grad_())
    negatives = queue.negatives()
    assert not negatives.requires_grad
    queue.enqueue(_rows(5, 4))
    assert negatives[:, 0].tolist() == [0, 1]


def test_queue_is_saved_in_checkpoints() -> None:
    queue = MemoryQueue(size=4, dim=3)
    queue.enqueue(torch.randn(3, 3))
    assert {"features", "pointer", "count"} <= set(queue.state_dict())
    buffer = io.BytesIO()
    torch.save(queue.state_dict(), buffer)
    buffer.seek(0)
    restored = MemoryQueue(size=4, dim=3)
    restored.load_state_dict(torch.load(buffer))
    assert torch.equal(restored.negatives(), queue.negatives())
    assert int(restored.pointer) == 3


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: MemoryQueue(0, 4), "size: expected a positive int"),
        (lambda: MemoryQueue(4, 0), "dim: expected a positive int"),
        (lambda: MemoryQueue(4.0, 2), "size"),
        (lambda: MemoryQueue(4, 2).enqueue(torch.randn(3, 5)), r"keys: expected shape \('\*', 2\)"),
        (lambda: MemoryQueue(4, 2).enqueue(torch.randn(3)), "keys: expected a 2-D"),
        (lambda: MemoryQueue(4, 2).enqueue(torch.full((1, 2), float("nan"))), "keys: contains"),
    ],
)
def test_queue_bad_input(call, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        call()


def moco_reference(query: torch.Tensor, key: torch.Tensor, queue: np.ndarray, temperature: float) -> float:
    """MoCo (He et al. 2020, Algorithm 1): logits [q.k+, q.queue] / T, cross entropy with label 0."""
    q = query.double().numpy()
    k = key.double().numpy()
    q = q / np.linalg.norm(q, axis=1, keepdims=True)
    k = k / np.linalg.norm(k, axis=1, keepdims=True)
    total = 0.0
    for i in range(len(q)):
        logits = [float(q[i] @ k[i]) / temperature] + [float(q[i] @ v) / temperature for v in queue]
        peak = max(logits)
        total += -(logits[0] - peak - math.log(sum(math.exp(v - peak) for v in logits)))
    return total / len(q)


@pytest.mark.parametrize("loss_cls", [NTXentLoss, InfoNCELoss])
@pytest.mark.parametrize("tiled", [False, True])
def test_moco_queue_loss_matches_reference_over_steps(loss_cls, tiled: bool) -> None:
    gen = torch.Generator().manual_seed(0)
    extra = {} if loss_cls is NTXentLoss else {"in_batch_negatives": False}
    loss_fn = loss_cls(temperature=0.2, memory_size=7, memory_dim=4, tiled=tiled, tile_size=3, **extra)
    queue: list[np.ndarray] = []
    for _ in range(4):
        query, key = torch.randn(3, 4, generator=gen), torch.randn(3, 4, generator=gen)
        expected = moco_reference(query, key, np.array(queue[-7:]).reshape(-1, 4), 0.2)
        assert loss_fn(query, key).item() == pytest.approx(expected, rel=1e-5)
        queue.extend(key.double().numpy() / np.linalg.norm(key.double().numpy(), axis=1, keepdims=True))


def test_queue_with_equal_similarities_is_log_of_queue_plus_one() -> None:
    loss_fn = NTXentLoss(memory_size=6, memory_dim=3)
    same = torch.ones(6, 3)
    loss_fn(same, same)  # fills the queue
    assert loss_fn(same, same).item() == pytest.approx(math.log(6 + 1), abs=1e-6)


def test_in_batch_and_queue_negatives_together() -> None:
    gen = torch.Generator().manual_seed(1)
    loss_fn = InfoNCELoss(temperature=0.5, memory_size=4, memory_dim=2)
    first = torch.randn(4, 2, generator=gen)
    loss_fn(first, first)
    query, key = torch.randn(3, 2, generator=gen), torch.randn(3, 2, generator=gen)
    q = torch.nn.functional.normalize(query, dim=1)
    candidates = torch.cat([torch.nn.functional.normalize(key, dim=1), torch.nn.functional.normalize(first, dim=1)])
    expected = torch.nn.functional.cross_entropy(q @ candidates.T / 0.5, torch.arange(3))
    assert loss_fn(query, key).item() == pytest.approx(expected.item(), rel=1e-6)


def test_eval_mode_leaves_the_queue_unchanged() -> None:
    loss_fn = InfoNCELoss(memory_size=8, memory_dim=3)
    loss_fn(torch.randn(2, 3), torch.randn(2, 3))
    loss_fn.eval()
    loss_fn(torch.randn(2, 3), torch.randn(2, 3))
    assert int(loss_fn.memory.count) == 2
    assert "memory.features" in loss_fn.state_dict()


def test_queue_negatives_get_no_gradient_but_queries_do() -> None:
    loss_fn = NTXentLoss(memory_size=4, memory_dim=3)
    loss_fn(torch.randn(4, 3), torch.randn(4, 3))
    query = torch.randn(2, 3, requires_grad=True)
    loss_fn(query, torch.randn(2, 3)).backward()
    assert query.grad is not None and torch.isfinite(query.grad).all()
    assert not loss_fn.memory.features.requires_grad
