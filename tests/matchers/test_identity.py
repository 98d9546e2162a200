"""Same-grid identity matching."""

from __future__ import annotations

import pytest
import torch
from accord.matchers import IdentityMatcher


def test_pairs_every_location_with_itself() -> None:
    result = IdentityMatcher()(features_a=torch.randn(5, 3), features_b=torch.randn(5, 7))
    assert result.index_a.tolist() == list(range(5)) == result.index_b.tolist()
    assert result.batch is None and torch.equal(result.weight, torch.ones(5))


def test_mask_drops_invalid_locations_per_sample() -> None:
    mask = torch.tensor([[True, False, True], [False, False, True]])
    result = IdentityMatcher()(
        features_a=torch.randn(2, 3, 4), features_b=torch.randn(2, 3, 4), mask=mask
    )
    assert result.batch is not None
    assert list(zip(result.batch.tolist(), result.index_a.tolist())) == [(0, 0), (0, 2), (1, 2)]
    assert torch.equal(result.index_a, result.index_b)


@pytest.mark.parametrize(
    "features_a, features_b, mask, name",
    [
        (torch.randn(2, 3, 4), torch.randn(2, 4, 4), None, "features_b"),
        (torch.randn(3, 4), torch.randn(1, 3, 4), None, "features_b"),
        (torch.randn(0, 4), torch.randn(0, 4), None, "features_a"),
        (torch.randn(2, 0, 4), torch.randn(2, 0, 4), None, "features_a"),
        (torch.randn(4), torch.randn(4), None, "features_a"),
        (torch.randn(2, 3, 4), torch.randn(2, 3, 4), torch.ones(2, 4, dtype=torch.bool), "mask"),
        (torch.randn(2, 3, 4), torch.randn(2, 3, 4), torch.ones(2, 3), "mask"),
    ],
)
def test_bad_input(
    features_a: torch.Tensor, features_b: torch.Tensor, mask: torch.Tensor | None, name: str
) -> None:
    with pytest.raises(ValueError, match=name):
        IdentityMatcher()(features_a=features_a, features_b=features_b, mask=mask)
