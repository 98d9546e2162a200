"""Resumable sharded batch order: ranks partition global batches, offsets and epochs resume exactly."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import TensorDataset

from accord.training import BatchStream, ResumableBatchSampler


def _epoch(sampler: ResumableBatchSampler, epoch: int, start: int = 0) -> list[list[int]]:
    sampler.set_position(epoch, start)
    return list(sampler)


def test_ranks_partition_each_global_batch_of_the_single_process_order() -> None:
    single = _epoch(ResumableBatchSampler(21, 8, seed=3), epoch=1)
    shards = [_epoch(ResumableBatchSampler(21, 4, rank=r, world_size=2, seed=3), epoch=1) for r in range(2)]
    assert len(single) == 2  # 21 // 8, the 5-sample tail is dropped
    for index, global_batch in enumerate(single):
        per_rank = [set(shards[r][index]) for r in range(2)]
        assert per_rank[0].isdisjoint(per_rank[1])
        assert per_rank[0] | per_rank[1] == set(global_batch)


def test_start_offset_continues_the_same_epoch_order() -> None:
    sampler = ResumableBatchSampler(50, 5, seed=0)
    full = _epoch(sampler, epoch=2)
    assert _epoch(sampler, epoch=2, start=3) == full[3:]
    assert len(sampler) == len(full) - 3


def test_order_depends_only_on_seed_and_epoch() -> None:
    a, b = ResumableBatchSampler(30, 3, seed=1), ResumableBatchSampler(30, 3, seed=1)
    assert _epoch(a, 0) == _epoch(b, 0)
    assert _epoch(a, 0) != _epoch(a, 1)
    assert sorted(i for batch in _epoch(a, 4) for i in batch) == list(range(30))


def test_dataset_smaller_than_a_global_batch_is_an_error() -> None:
    with pytest.raises(ValueError, match="7 samples, fewer than one global micro-batch of 8"):
        ResumableBatchSampler(7, 4, world_size=2)
    with pytest.raises(ValueError, match="start_batch"):
        ResumableBatchSampler(10, 2).set_position(0, 5)


def test_batch_stream_rolls_over_epochs_and_seek_replays_the_rest() -> None:
    dataset = TensorDataset(torch.arange(10))
    stream = BatchStream(dataset, 3, rank=0, world_size=1, seed=0)
    batches = [stream.next_batch()[0].tolist() for _ in range(7)]  # 3 batches per epoch
    assert stream.position() == {"epoch": 2, "batch": 1}
    replay = BatchStream(dataset, 3, rank=0, world_size=1, seed=0)
    replay.seek(epoch=1, batch=2)
    assert [replay.next_batch()[0].tolist() for _ in range(2)] == batches[5:7]
