"""Feature-argmax (DenseCL) matching."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from accord.matchers import FeatureArgmaxMatcher, MatchResult


def _pairs(result: MatchResult) -> set[tuple[int, ...]]:
    columns = (
        [result.index_a, result.index_b]
        if result.batch is None
        else [result.batch, result.index_a, result.index_b]
    )
    return set(zip(*(column.tolist() for column in columns)))


@pytest.mark.parametrize("mutual", [False, True])
@pytest.mark.parametrize("chunk_size", [1, 7, 4096])
def test_recovers_a_known_permutation(mutual: bool, chunk_size: int) -> None:
    generator = torch.Generator().manual_seed(0)
    features_a = torch.randn(2, 20, 16, generator=generator)
    perms = [torch.randperm(20, generator=generator) for _ in range(2)]
    # b's location j holds a's location perm[j] (rescaled: cosine ignores the norm).
    features_b = torch.stack([3.0 * features_a[s, perms[s]] for s in range(2)])
    result = FeatureArgmaxMatcher(mutual=mutual, chunk_size=chunk_size)(
        features_a=features_a, features_b=features_b
    )
    expected = {(s, int(perms[s][j]), j) for s in range(2) for j in range(20)}
    assert _pairs(result) == expected
    assert torch.equal(result.weight, torch.ones(40))
    unbatched = FeatureArgmaxMatcher(mutual=mutual)(
        features_a=features_a[1], features_b=features_b[1]
    )
    assert unbatched.batch is None and _pairs(unbatched) == {
        (a, b) for s, a, b in expected if s == 1
    }


@pytest.mark.parametrize("top_k", [1, 3])
@pytest.mark.parametrize("mutual", [False, True])
def test_top_k_and_mutual_match_a_dense_reference(top_k: int, mutual: bool) -> None:
    generator = torch.Generator().manual_seed(1)
    features_a, features_b = (
        torch.randn(2, 15, 8, generator=generator),
        torch.randn(2, 11, 8, generator=generator),
    )
    result = FeatureArgmaxMatcher(top_k=top_k, mutual=mutual, chunk_size=4)(
        features_a=features_a, features_b=features_b
    )

    similarity = F.normalize(features_a, dim=-1) @ F.normalize(features_b, dim=-1).transpose(1, 2)
    top_b = similarity.topk(top_k, dim=2).indices  # (B, Na, k)
    top_a = similarity.topk(top_k, dim=1).indices  # (B, k, Nb)
    expected = set()
    for s in range(2):
        for i in range(15):
            for j in top_b[s, i].tolist():
                if not mutual or i in top_a[s, :, j].tolist():
                    expected.add((s, i, j))
    assert _pairs(result) == expected and len(result) == len(expected)
    assert torch.allclose(result.weight, torch.full((len(result),), 1.0 / top_k))


@pytest.mark.parametrize(
    "features_a, features_b, matcher, name",
    [
        (torch.randn(2, 5, 4), torch.randn(2, 5, 3), FeatureArgmaxMatcher(), "features_b"),
        (torch.randn(2, 5, 4), torch.randn(3, 5, 4), FeatureArgmaxMatcher(), "features_b"),
        (torch.randn(5, 4), torch.randn(1, 5, 4), FeatureArgmaxMatcher(), "features_b"),
        (torch.randn(5, 4, 1, 1), torch.randn(5, 4, 1, 1), FeatureArgmaxMatcher(), "features_a"),
        (torch.randn(2, 0, 4), torch.randn(2, 5, 4), FeatureArgmaxMatcher(), "features_a"),
        (torch.randn(2, 5, 4), torch.randn(2, 0, 4), FeatureArgmaxMatcher(), "features_b"),
        (torch.randn(2, 5, 4), torch.randn(2, 2, 4), FeatureArgmaxMatcher(top_k=3), "features_b"),
        (
            torch.randn(2, 2, 4),
            torch.randn(2, 5, 4),
            FeatureArgmaxMatcher(top_k=3, mutual=True),
            "features_a",
        ),
        (torch.full((5, 4), float("nan")), torch.randn(5, 4), FeatureArgmaxMatcher(), "features_a"),
        (
            torch.ones(5, 4, dtype=torch.long),
            torch.ones(5, 4, dtype=torch.long),
            FeatureArgmaxMatcher(),
            "features_a",
        ),
    ],
)
def test_bad_input(
    features_a: torch.Tensor, features_b: torch.Tensor, matcher: FeatureArgmaxMatcher, name: str
) -> None:
    with pytest.raises(ValueError, match=name):
        matcher(features_a=features_a, features_b=features_b)


def test_bad_options() -> None:
    with pytest.raises(ValueError, match="top_k"):
        FeatureArgmaxMatcher(top_k=0)
    with pytest.raises(ValueError, match="chunk_size"):
        FeatureArgmaxMatcher(chunk_size=-1)
