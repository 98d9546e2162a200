"""Alice's block masks: exact ratio, block alignment, tubes through depth, one mask per sample."""

from __future__ import annotations

import pytest
import torch

from accord_medssl.alice import random_block_mask, token_mask


def _blocks(mask: torch.Tensor, block: int) -> torch.Tensor:
    """``(B, 1, P0, P1, D)`` -> ``(B, P0/block, block, P1/block, block, D)``."""
    batch, _, size0, size1, depth = mask.shape
    return mask.view(batch, size0 // block, block, size1 // block, block, depth)


def test_ratio_alignment_and_depth() -> None:
    generator = torch.Generator().manual_seed(1)
    mask = random_block_mask(6, (64, 64, 24), block_size=16, mask_ratio=0.75, generator=generator)
    assert mask.shape == (6, 1, 64, 64, 24) and mask.dtype == torch.bool
    blocks = _blocks(mask, 16)
    # Every block is all-masked or all-visible, on every slice.
    assert torch.equal(blocks.amax(dim=(2, 4)), blocks.amin(dim=(2, 4)))
    # Tubes: the same pattern on every slice along depth (the last axis).
    assert torch.equal(mask, mask[..., :1].expand_as(mask))
    # Exactly ceil(16 * 0.75) = 12 of the 16 blocks per sample and slice.
    assert torch.equal(blocks.amax(dim=(2, 4)).sum(dim=(1, 2)), torch.full((6, 24), 12))


def test_each_sample_gets_its_own_mask() -> None:
    mask = random_block_mask(8, (64, 64, 16), generator=torch.Generator().manual_seed(0))
    assert len({tuple(sample.flatten().tolist()) for sample in mask[:, 0, :, :, 0]}) > 1


def test_generator_makes_masks_reproducible_and_ratio_rounds_up() -> None:
    first = random_block_mask(2, (32, 48, 8), block_size=8, mask_ratio=0.7, generator=torch.Generator().manual_seed(3))
    second = random_block_mask(2, (32, 48, 8), block_size=8, mask_ratio=0.7, generator=torch.Generator().manual_seed(3))
    assert torch.equal(first, second)
    # 4 x 6 = 24 blocks, ceil(24 * 0.7) = ceil(16.8) = 17.
    assert (first[:, 0, :, :, 0].float().mean(dim=(1, 2)) * 24).round().tolist() == [17.0, 17.0]


def test_depth_axis_can_be_the_first_axis() -> None:
    mask = random_block_mask(2, (8, 32, 32), block_size=16, depth_axis=0)
    assert torch.equal(mask, mask[:, :, :1].expand_as(mask))
    assert mask[:, 0, 0].float().mean().item() == pytest.approx(0.75)


def test_token_mask_from_voxel_mask() -> None:
    mask = random_block_mask(3, (32, 32, 32), block_size=16, mask_ratio=0.75)
    # A (2, 2, 1) token grid with 16-voxel in-plane strides: tokens coincide with the blocks.
    tokens = token_mask(mask, (2, 2, 1))
    assert torch.equal(tokens, mask[:, 0, ::16, ::16, 0].flatten(1))
    # One token over the whole crop is 75 % masked.
    assert token_mask(mask, (1, 1, 1)).all()
    assert not token_mask(mask, (1, 1, 1), min_fraction=0.8).any()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"spatial_shape": (40, 32, 8)}, "spatial_shape"),
        ({"spatial_shape": (32, 32)}, "spatial_shape"),
        ({"mask_ratio": 1.0}, "mask_ratio"),
        ({"block_size": 0}, "block_size"),
        ({"depth_axis": 3}, "depth_axis"),
        ({"batch_size": 0}, "batch_size"),
    ],
)
def test_bad_mask_arguments_raise(kwargs: dict, message: str) -> None:
    arguments = {"batch_size": 2, "spatial_shape": (32, 32, 8), **kwargs}
    with pytest.raises(ValueError, match=message):
        random_block_mask(**arguments)


def test_bad_token_mask_arguments_raise() -> None:
    mask = random_block_mask(1, (32, 32, 32))
    with pytest.raises(ValueError, match="token_grid"):
        token_mask(mask, (3, 1, 1))
    with pytest.raises(ValueError, match="voxel_mask"):
        token_mask(mask.float(), (1, 1, 1))
    with pytest.raises(ValueError, match="voxel_mask"):
        token_mask(mask[0], (1, 1, 1))
