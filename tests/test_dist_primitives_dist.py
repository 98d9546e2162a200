"""Real 2-process gloo checks of the gradient semantics of accord.dist."""

from __future__ import annotations

import pytest
import torch

from accord import dist as adist
from accord.testing.dist import run_distributed

pytestmark = pytest.mark.dist


def _gather_body(rank: int, world_size: int) -> list[list[float]]:
    x = torch.tensor([[float(rank + 1), 2.0 * (rank + 1)]], requires_grad=True)
    full = adist.gather_with_grad(x)
    # Loss depends on every rank's rows; weights differ per rank so the sum over ranks matters.
    weights = torch.arange(full.numel(), dtype=torch.float32).view_as(full) + rank
    (full * weights).sum().backward()
    return x.grad.tolist()


def test_gather_with_grad_sums_gradients_from_all_ranks() -> None:
    grads = run_distributed(_gather_body, world_size=2)
    # Row r of the gathered tensor gets weight rows from rank 0 (offset 0) and rank 1 (offset 1).
    base = torch.arange(4, dtype=torch.float32).view(2, 2)
    for r in range(2):
        expected = (base[r] + 0) + (base[r] + 1)
        assert grads[r] == [expected.tolist()]


def _gather_rows_body(rank: int, world_size: int) -> tuple[list[list[float]], list[int], list[list[float]]]:
    # Rank 0 holds one row, rank 1 three: the padding must not reach the result or the gradients.
    x = (torch.arange(2 * (1 + 2 * rank), dtype=torch.float32).view(-1, 2) + 10 * rank).requires_grad_()
    rows, counts = adist.gather_rows(x, with_grad=True)
    weights = torch.arange(rows.numel(), dtype=torch.float32).view_as(rows)
    (rows * weights).sum().backward()
    detached, _ = adist.gather_rows(x, counts=counts)
    assert not detached.requires_grad and torch.equal(detached, rows.detach())
    return rows.tolist(), counts, x.grad.tolist()


def test_gather_rows_concatenates_uneven_ranks_with_gradients() -> None:
    out = run_distributed(_gather_rows_body, world_size=2)
    expected = [[0.0, 1.0], [10.0, 11.0], [12.0, 13.0], [14.0, 15.0]]
    weights = torch.arange(8, dtype=torch.float32).view(4, 2)
    for rank, (rows, counts, grad) in enumerate(out):
        assert rows == expected and counts == [1, 3]
        # Both ranks' losses use every row, so each row's gradient is its weight, summed over 2 ranks.
        own = weights[:1] if rank == 0 else weights[1:]
        assert grad == (2 * own).tolist()


def _all_reduce_body(rank: int, world_size: int) -> tuple[float, float]:
    x = torch.tensor(float(rank + 1), requires_grad=True)
    mean = adist.all_reduce_with_grad(x * x, op="mean")
    (mean * (rank + 1)).backward()
    return mean.item(), x.grad.item()


def test_all_reduce_with_grad_matches_single_process_gradient() -> None:
    out = run_distributed(_all_reduce_body, world_size=2)
    # mean = (x0^2 + x1^2)/2 ; total objective = sum_r (r+1)*mean = 3*mean ; d/dx_r = 3*x_r.
    assert out[0] == (2.5, 3.0)
    assert out[1] == (2.5, 6.0)


def test_single_process_is_identity() -> None:
    x = torch.randn(3, 2)
    assert adist.gather_with_grad(x) is x
    rows, counts = adist.gather_rows(x)
    assert torch.equal(rows, x) and counts == [3]
    assert torch.equal(adist.eye_rank(3), torch.eye(3, dtype=torch.bool))
    with pytest.raises(ValueError, match="op must be"):
        adist.all_reduce_with_grad(x, op="max")
