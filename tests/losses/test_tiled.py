"""The tiled (linear-memory) path equals the dense path in value and gradient."""

from __future__ import annotations

import pytest
import torch

import accord.losses.infonce as infonce_module
from accord.losses.infonce import info_nce
from accord.losses.tiled import TeacherTargets, TiledRowStats, streamed_logsumexp, tiled_row_stats


def _assert_close(actual: torch.Tensor, expected: torch.Tensor, rel: float = 1e-5) -> None:
    """Max error within ``rel`` of the largest magnitude (element-wise relative error is meaningless near 0)."""
    scale = expected.abs().max().clamp_min(1e-12)
    assert ((actual - expected).abs().max() / scale).item() <= rel


def _inputs(n: int, m: int, dim: int = 6, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, dim, generator=gen), torch.randn(m, dim, generator=gen)


def _loss_and_grads(query: torch.Tensor, key: torch.Tensor, same: bool, **options) -> list[torch.Tensor]:
    q = query.clone().requires_grad_()
    k = q if same else key.clone().requires_grad_()
    loss = info_nce(q, k, temperature=0.2, **options)
    loss.backward()
    return [loss.detach(), q.grad] + ([] if same else [k.grad])


CASES = {
    "pairs": dict(n=37, m=37, same=False, options={}),
    "multi-positive": dict(n=29, m=41, same=False, options={"positive_index": "multi"}),
    "labels-self": dict(n=45, m=45, same=True, options={"query_labels": "labels", "exclude_self": True}),
    "labels-cross": dict(n=23, m=50, same=False, options={"query_labels": "labels", "key_labels": "key_labels"}),
    "soft-self": dict(n=33, m=33, same=True, options={"teacher": True, "exclude_self": True}),
    "soft-cross": dict(n=19, m=44, same=False, options={"teacher": True}),
    "negatives": dict(n=21, m=21, same=False, options={"negatives": 35}),
    "moco": dict(n=21, m=21, same=False, options={"negatives": 35, "in_batch_negatives": False}),
}


def _resolve(case: dict) -> dict:
    gen = torch.Generator().manual_seed(1)
    n, m = case["n"], case["m"]
    options = {}
    for name, value in case["options"].items():
        if value == "multi":
            options[name] = torch.randint(0, m, (n, 3), generator=gen)
        elif value == "labels":
            options[name] = torch.randint(0, 4, (n,), generator=gen)
        elif value == "key_labels":
            options[name] = torch.randint(0, 4, (m,), generator=gen)
        elif name == "teacher":
            options["teacher_query"] = torch.randn(n, 5, generator=gen)
            options["teacher_key"] = options["teacher_query"] if case["same"] else torch.randn(m, 5, generator=gen)
            options["teacher_temperature"] = 0.3
        elif name == "negatives":
            options[name] = torch.randn(value, 6, generator=gen)
        else:
            options[name] = value
    return options


@pytest.mark.parametrize("case", CASES, ids=list(CASES))
@pytest.mark.parametrize("tile_size", [1, 4, 7, 16, 64])
def test_tiled_equals_dense_in_loss_and_gradients(case: str, tile_size: int) -> None:
    spec = CASES[case]
    query, key = _inputs(spec["n"], spec["m"])
    options = _resolve(spec)
    dense = _loss_and_grads(query, key, spec["same"], tiled=False, **options)
    tiled = _loss_and_grads(query, key, spec["same"], tiled=True, tile_size=tile_size, **options)
    for got, want in zip(tiled, dense):
        _assert_close(got, want)


def test_tiled_row_stats_gradcheck_float64() -> None:
    gen = torch.Generator().manual_seed(2)
    query = torch.randn(7, 4, dtype=torch.float64, generator=gen, requires_grad=True)
    keys = torch.randn(7, 4, dtype=torch.float64, generator=gen, requires_grad=True)
    teacher = TeacherTargets(
        torch.nn.functional.normalize(torch.randn(7, 3, dtype=torch.float64, generator=gen), dim=1),
        torch.nn.functional.normalize(torch.randn(7, 3, dtype=torch.float64, generator=gen), dim=1),
        2.0,
    )
    self_index = torch.arange(7)

    def both_outputs(q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return TiledRowStats.apply(q, k, 1.7, self_index, teacher, 3)

    assert torch.autograd.gradcheck(both_outputs, (query, keys))

    rectangular = torch.randn(5, 4, dtype=torch.float64, generator=gen, requires_grad=True)
    assert torch.autograd.gradcheck(lambda q, k: tiled_row_stats(q, k, 0.9, tile_size=2)[0], (rectangular, keys))


def test_tiled_row_stats_match_logsumexp_and_softmax_weights() -> None:
    query, keys = _inputs(11, 13, seed=3)
    self_index = torch.tensor([0, 12, 3, 5, 5, 1, 7, 2, 11, 10, 4])
    logits = 1.5 * query @ keys.T
    masked = logits.clone()
    masked[torch.arange(11), self_index] = float("-inf")
    lse, target = tiled_row_stats(query, keys, 1.5, self_index, tile_size=4)
    _assert_close(lse, torch.logsumexp(masked, dim=1))
    assert torch.equal(target, torch.zeros(11))
    _assert_close(streamed_logsumexp(query, keys, 1.5, self_index, tile_size=5), torch.logsumexp(masked, dim=1))

    teacher = TeacherTargets(torch.eye(11, 13), torch.eye(13), 4.0)
    teacher_logits = 4.0 * torch.eye(11, 13)
    teacher_logits[torch.arange(11), self_index] = float("-inf")
    _, soft_target = tiled_row_stats(query, keys, 1.5, self_index, teacher, tile_size=3)
    _assert_close(soft_target, (teacher_logits.softmax(dim=1) * logits).sum(dim=1))


def test_tiled_path_saves_no_logits_for_backward(saved_tensor_sizes: list[int]) -> None:
    n, m, tile = 512, 384, 32
    query, key = _inputs(n, m, dim=8, seed=4)
    query.requires_grad_()
    info_nce(query, key, positive_index=torch.arange(n) % m, tiled=True, tile_size=tile).backward()
    # Inputs, normalised features and per-row vectors only: nothing near the n x m logits.
    assert max(saved_tensor_sizes) <= max(n, m) * 8 < n * m // 16


def test_auto_mode_tiles_only_above_one_tile(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[int, int]] = []
    real = infonce_module.tiled_row_stats

    def spy(query: torch.Tensor, keys: torch.Tensor, *args, **kwargs):
        calls.append((query.shape[0], keys.shape[0]))
        return real(query, keys, *args, **kwargs)

    monkeypatch.setattr(infonce_module, "tiled_row_stats", spy)
    query, key = _inputs(8, 8)
    info_nce(query, key, tile_size=8)
    assert calls == []
    info_nce(query, torch.cat([key, key[:1]]), positive_index=torch.arange(8), tile_size=8)
    assert calls == [(8, 9)]
    info_nce(query, key, tile_size=8, tiled=True)
    assert calls[-1] == (8, 8)
    info_nce(query, torch.cat([key, key]), positive_index=torch.arange(8), tile_size=2, tiled=False)
    assert len(calls) == 2


def test_tiled_handles_one_row_and_a_tile_bigger_than_the_batch() -> None:
    query, key = _inputs(1, 9, seed=5)
    dense = _loss_and_grads(query, key, False, positive_index=torch.tensor([4]), tiled=False)
    for tile_size in (1, 2, 1000):
        tiled = _loss_and_grads(query, key, False, positive_index=torch.tensor([4]), tiled=True, tile_size=tile_size)
        for got, want in zip(tiled, dense):
            _assert_close(got, want)
