"""Real 2-process gloo runs: every distributed InfoNCE-family loss, dense and tiled, equals the
single-process loss on the concatenated batch (value, input gradients, and DDP training).

Rank ``r`` holds rows ``r * N_LOCAL : (r + 1) * N_LOCAL`` of every input. With local-rows x
global-columns and the gather's all-reduce backward, ``x.grad`` on rank ``r`` is ``world_size``
times the single-process gradient of those rows (each rank's loss is a local mean), and DDP's
gradient averaging turns that into exactly the single-process parameter update.
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np
import pytest
import torch
from torch import nn

from accord.losses.infonce import InfoNCELoss, NTXentLoss, SoftTargetContrastiveLoss, SupConLoss
from accord.testing.dist import run_distributed

pytestmark = pytest.mark.dist

WORLD = 2
N_LOCAL = 6
DIM = 5
STEPS = 3
LR = 0.5


def _full_inputs(dtype: torch.dtype) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    n = WORLD * N_LOCAL
    return {
        "a": torch.randn(n, DIM, generator=gen, dtype=dtype),
        "b": torch.randn(n, DIM, generator=gen, dtype=dtype),
        "ta": torch.randn(n, 4, generator=gen, dtype=dtype),
        "tb": torch.randn(n, 4, generator=gen, dtype=dtype),
        "labels": torch.randint(0, 3, (n,), generator=gen),
        "key_labels": torch.randint(0, 3, (n,), generator=gen),
        # Labels 0, 1, 2 appear once on each rank, 9 twice on rank 0, 3, 6, 7, 8 once: rank 0 has
        # 5 rows with a positive and rank 1 has 3, so the mean must use the global count.
        "sparse_labels": torch.tensor([0, 1, 2, 9, 9, 6, 0, 1, 7, 2, 8, 3]),
        # Local key indices; the single-process run offsets them by the owning rank's first row.
        "index": torch.randint(0, N_LOCAL, (n, 2), generator=gen),
        # Per-row candidates index the keys of all ranks, so they are the same in both runs.
        "candidates": torch.randint(0, n, (n, 4), generator=gen),
        "candidate_mask": torch.rand(n, 4, generator=gen) < 0.7,
    }


def _rank_slice(inputs: dict[str, torch.Tensor], rank: int) -> dict[str, torch.Tensor]:
    rows = slice(rank * N_LOCAL, (rank + 1) * N_LOCAL)
    return {name: value[rows] for name, value in inputs.items()}


def _as_full_batch(inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    owner = torch.arange(WORLD * N_LOCAL) // N_LOCAL
    return {**inputs, "index": inputs["index"] + owner[:, None] * N_LOCAL}


def _moco_step(loss_fn: nn.Module, x: dict[str, torch.Tensor]) -> torch.Tensor:
    # Fill the queue from a first call so the measured loss sees queued negatives of every rank.
    loss_fn(x["b"].detach(), x["a"].detach())
    return loss_fn(x["a"], x["b"])


# name -> (make(gather, tiled) -> loss module, call(loss module, inputs) -> loss)
CONFIGS: dict[str, tuple[Callable[[bool, bool], nn.Module], Callable[[nn.Module, dict], torch.Tensor]]] = {
    "infonce_pairs": (
        lambda g, t: InfoNCELoss(0.3, gather_distributed=g, tiled=t, tile_size=4),
        lambda f, x: f(x["a"], x["b"]),
    ),
    "infonce_symmetric": (
        lambda g, t: InfoNCELoss(0.3, symmetric=True, gather_distributed=g, tiled=t, tile_size=5),
        lambda f, x: f(x["a"], x["b"]),
    ),
    "infonce_multi_positive": (
        lambda g, t: InfoNCELoss(0.4, gather_distributed=g, tiled=t, tile_size=4),
        lambda f, x: f(x["a"], x["b"], positive_index=x["index"]),
    ),
    "infonce_candidates": (
        lambda g, t: InfoNCELoss(0.4, gather_distributed=g, tiled=t, tile_size=4),
        lambda f, x: f(x["a"], x["b"], positive_index=x["index"][:, 0], candidates=x["candidates"],
                       candidate_mask=x["candidate_mask"]),
    ),
    "infonce_labels": (
        lambda g, t: InfoNCELoss(0.4, symmetric=True, gather_distributed=g, tiled=t, tile_size=7),
        lambda f, x: f(x["a"], x["b"], query_labels=x["labels"], key_labels=x["key_labels"]),
    ),
    "ntxent": (
        lambda g, t: NTXentLoss(0.5, gather_distributed=g, tiled=t, tile_size=5),
        lambda f, x: f(x["a"], x["b"]),
    ),
    "ntxent_queue": (
        lambda g, t: NTXentLoss(0.5, memory_size=16, memory_dim=DIM, gather_distributed=g, tiled=t, tile_size=3),
        _moco_step,
    ),
    "supcon": (
        lambda g, t: SupConLoss(0.2, gather_distributed=g, tiled=t, tile_size=5),
        lambda f, x: f(torch.stack([x["a"], x["b"]], dim=1), x["labels"]),
    ),
    "supcon_exclude": (
        lambda g, t: SupConLoss(0.2, no_positive="exclude", gather_distributed=g, tiled=t, tile_size=4),
        lambda f, x: f(x["a"], x["sparse_labels"]),
    ),
    "soft_symmetric": (
        lambda g, t: SoftTargetContrastiveLoss(0.3, 0.2, symmetric=True, gather_distributed=g, tiled=t, tile_size=5),
        lambda f, x: f(x["a"], x["b"], x["ta"], x["tb"]),
    ),
    "soft_self": (
        lambda g, t: SoftTargetContrastiveLoss(0.3, 0.2, exclude_self=True, gather_distributed=g, tiled=t, tile_size=4),
        lambda f, x: f(x["a"], x["a"], x["ta"], x["ta"]),
    ),
}
CASES = [(name, tiled) for name in CONFIGS for tiled in (False, True)]


def _loss_and_grads(name: str, tiled: bool, inputs: dict[str, torch.Tensor], gather: bool) -> dict[str, Any]:
    make, call = CONFIGS[name]
    a = inputs["a"].clone().requires_grad_()
    b = inputs["b"].clone().requires_grad_()
    loss = call(make(gather, tiled), {**inputs, "a": a, "b": b})
    loss.backward()
    zeros = np.zeros(tuple(a.shape))
    return {
        "loss": loss.item(),
        "grad_a": a.grad.numpy() if a.grad is not None else zeros,
        "grad_b": b.grad.numpy() if b.grad is not None else zeros,
    }


def _train(name: str, tiled: bool, inputs: dict[str, torch.Tensor], distributed: bool) -> np.ndarray:
    torch.manual_seed(0)
    encoder = nn.Linear(DIM, DIM).double()
    model = nn.parallel.DistributedDataParallel(encoder) if distributed else encoder
    make, call = CONFIGS[name]
    loss_fn = make(distributed, tiled)
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    n = inputs["a"].shape[0]
    for _ in range(STEPS):
        optimizer.zero_grad()
        # One forward for both views: DDP expects each parameter to be used once per backward.
        features = model(torch.cat([inputs["a"], inputs["b"]]))
        call(loss_fn, {**inputs, "a": features[:n], "b": features[n:]}).backward()
        optimizer.step()
    return torch.cat([p.detach().flatten() for p in encoder.parameters()]).numpy()


def _worker(rank: int, world_size: int) -> dict[str, Any]:
    local32 = _rank_slice(_full_inputs(torch.float32), rank)
    local64 = _rank_slice(_full_inputs(torch.float64), rank)
    return {
        "grads": {case: _loss_and_grads(*case, local32, gather=True) for case in CASES},
        "params": {case: _train(*case, local64, distributed=True) for case in CASES},
    }


@pytest.fixture(scope="module")
def distributed_results() -> list[dict[str, Any]]:
    return run_distributed(_worker, world_size=WORLD)


@pytest.mark.parametrize("name, tiled", CASES, ids=[f"{n}-{'tiled' if t else 'dense'}" for n, t in CASES])
def test_loss_and_input_gradients_equal_single_process(distributed_results, name: str, tiled: bool) -> None:
    reference = _loss_and_grads(name, tiled, _as_full_batch(_full_inputs(torch.float32)), gather=False)
    per_rank = [result["grads"][(name, tiled)] for result in distributed_results]
    assert np.mean([r["loss"] for r in per_rank]) == pytest.approx(reference["loss"], rel=1e-5)
    for grad in ("grad_a", "grad_b"):
        distributed = np.concatenate([r[grad] for r in per_rank]) / WORLD
        scale = max(np.abs(reference[grad]).max(), 1e-12)
        assert np.abs(distributed - reference[grad]).max() <= 1e-5 * scale


@pytest.mark.parametrize("name, tiled", CASES, ids=[f"{n}-{'tiled' if t else 'dense'}" for n, t in CASES])
def test_ddp_training_equals_single_process_training(distributed_results, name: str, tiled: bool) -> None:
    reference = _train(name, tiled, _as_full_batch(_full_inputs(torch.float64)), distributed=False)
    initial = _initial_parameters()
    for result in distributed_results:
        trained = result["params"][(name, tiled)]
        assert np.abs(trained - initial).max() > 1e-3  # the steps did move the encoder
        np.testing.assert_allclose(trained, reference, rtol=0, atol=1e-10)


def _initial_parameters() -> np.ndarray:
    torch.manual_seed(0)
    return torch.cat([p.detach().flatten() for p in nn.Linear(DIM, DIM).double().parameters()]).numpy()
