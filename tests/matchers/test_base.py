"""MatchResult structure helpers and the Matcher call contract."""

from __future__ import annotations

import pytest
import torch
from accord.matchers import Matcher, MatchResult


def _result(batch: list[int] | None = None) -> MatchResult:
    return MatchResult(
        torch.tensor([0, 2, 2]),
        torch.tensor([1, 0, 0]),
        torch.tensor([0.5, 1.0, 2.0]),
        None if batch is None else torch.tensor(batch),
    )


@pytest.mark.parametrize(
    "fields, message",
    [
        ((torch.tensor([0, 1]), torch.tensor([0]), torch.ones(2)), "index_b"),
        ((torch.tensor([0.0]), torch.tensor([0]), torch.ones(1)), "index_a"),
        ((torch.tensor([0]), torch.tensor([0]), torch.ones(1, 1)), "weight"),
        ((torch.tensor([0]), torch.tensor([0]), torch.ones(1, dtype=torch.long)), "weight"),
        ((torch.tensor([0]), torch.tensor([0]), torch.ones(1), torch.tensor([0, 0])), "batch"),
    ],
)
def test_match_result_rejects_malformed_fields(fields: tuple, message: str) -> None:
    with pytest.raises(ValueError, match=f"MatchResult.{message}"):
        MatchResult(*fields)


def test_select_concat_coalesce() -> None:
    result = _result()
    assert len(result) == 3
    picked = result.select(torch.tensor([True, False, True]))
    assert picked.index_a.tolist() == [0, 2] and picked.weight.tolist() == [0.5, 2.0]

    stacked = MatchResult.concat([result, picked])
    assert stacked.batch is not None and stacked.batch.tolist() == [0, 0, 0, 1, 1]
    with pytest.raises(ValueError, match="unbatched"):
        MatchResult.concat([stacked])
    with pytest.raises(ValueError, match="results"):
        MatchResult.concat([])

    merged = result.coalesce()
    assert list(zip(merged.index_a.tolist(), merged.index_b.tolist())) == [(0, 1), (2, 0)]
    assert merged.weight.tolist() == [0.5, 3.0] and merged.batch is None
    merged_batched = _result(batch=[1, 0, 1]).coalesce()
    assert merged_batched.batch is not None
    assert list(zip(merged_batched.batch.tolist(), merged_batched.index_a.tolist())) == [
        (0, 2),
        (1, 0),
        (1, 2),
    ]
    assert merged_batched.weight.tolist() == [1.0, 0.5, 2.0]


def test_gather_indexes_batched_and_shared_sides() -> None:
    result = _result(batch=[1, 0, 1])
    batched = torch.arange(2 * 3 * 4, dtype=torch.float32).reshape(2, 3, 4)
    shared = torch.arange(3 * 5, dtype=torch.float32).reshape(3, 5)
    assert torch.equal(result.gather_a(batched), batched[[1, 0, 1], [0, 2, 2]])
    assert torch.equal(result.gather_b(shared), shared[[1, 0, 0]])
    with pytest.raises(ValueError, match="features_a"):
        _result().gather_a(batched)  # batched features need batch ids
    with pytest.raises(ValueError, match="index_a"):
        result.gather_a(torch.zeros(2, 2, 4))
    with pytest.raises(ValueError, match="batch"):
        _result(batch=[0, 0, 3]).gather_b(batched)
    with pytest.raises(ValueError, match="features_b"):
        result.gather_b(torch.zeros(3))


def test_matcher_runs_without_grad_and_is_abstract() -> None:
    class Echo(Matcher):
        def match(self, features_a: torch.Tensor) -> MatchResult:
            index = torch.arange(features_a.shape[0])
            return MatchResult(index, index, features_a.sum(dim=1))

    features = torch.ones(3, 2, requires_grad=True)
    assert not Echo()(features_a=features).weight.requires_grad
    assert repr(Echo()) == "Echo()"
    with pytest.raises(TypeError):
        Matcher()  # type: ignore[abstract]
