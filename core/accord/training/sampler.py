"""Resumable, rank-sharded batches: a resumed run reads exactly the batches of an uninterrupted one.

The unit of data position is the *global micro-batch*: ``world_size * per_rank_batch`` samples, one
slice per rank. An epoch is a permutation of the dataset drawn from ``(seed, epoch)`` alone; the
tail that does not fill a whole global micro-batch is dropped (``drop_last``). Rank ``r`` takes
every ``world_size``-th index of the kept permutation, as ``DistributedSampler`` does, so the ranks'
slices of global micro-batch ``b`` are together exactly ``perm[b * G : (b + 1) * G]`` with ``G`` the
global micro-batch size. Because ``G = batch_size / grad_accum_steps`` does not depend on the number
of ranks, the same samples form each optimizer step on one process or on many, and a run may even
resume on a different number of ranks.
"""

from __future__ import annotations

from typing import Any, Callable, Iterator

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from accord.training.checkpoint import derive_seed

__all__ = ["ResumableBatchSampler", "BatchStream"]


class ResumableBatchSampler(Sampler[list[int]]):
    """Yields this rank's index lists of one epoch, starting at any global micro-batch.

    Args:
        dataset_size: number of samples.
        batch_size: samples per rank per micro-batch.
        rank: this process's rank.
        world_size: number of ranks.
        seed: permutation seed; epoch ``e`` uses ``seed + e`` (like ``DistributedSampler``).

    Raises:
        ValueError: the dataset cannot fill one global micro-batch.
    """

    def __init__(
        self, dataset_size: int, batch_size: int, *, rank: int = 0, world_size: int = 1, seed: int = 0
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size: expected >= 1, got {batch_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank: expected 0 <= rank < world_size={world_size}, got {rank}")
        self.dataset_size = dataset_size
        self.batch_size = batch_size
        self.rank = rank
        self.world_size = world_size
        self.seed = seed
        self.batches_per_epoch = dataset_size // (batch_size * world_size)
        if self.batches_per_epoch == 0:
            raise ValueError(
                f"dataset has {dataset_size} samples, fewer than one global micro-batch of "
                f"{batch_size * world_size} ({batch_size} per rank x {world_size} ranks)"
            )
        self.epoch = 0
        self.start_batch = 0

    def set_position(self, epoch: int, start_batch: int = 0) -> None:
        """Make the next iteration cover ``epoch`` from global micro-batch ``start_batch`` on."""
        if not 0 <= start_batch < self.batches_per_epoch:
            raise ValueError(
                f"start_batch: expected 0 <= start_batch < {self.batches_per_epoch} batches per epoch, "
                f"got {start_batch}"
            )
        self.epoch = epoch
        self.start_batch = start_batch

    def __iter__(self) -> Iterator[list[int]]:
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        order = torch.randperm(self.dataset_size, generator=generator)
        kept = order[: self.batches_per_epoch * self.batch_size * self.world_size]
        mine = kept[self.rank :: self.world_size]
        for batch in range(self.start_batch, self.batches_per_epoch):
            yield mine[batch * self.batch_size : (batch + 1) * self.batch_size].tolist()

    def __len__(self) -> int:
        return self.batches_per_epoch - self.start_batch


class BatchStream:
    """An endless stream of this rank's micro-batches that knows its ``(epoch, batch)`` position.

    After each micro-batch the position names the *next* one to read, rolling over to
    ``(epoch + 1, 0)`` at the end of an epoch, so a checkpoint taken between steps resumes at the
    right place. The ``DataLoader`` draws its worker base seed from a private generator seeded with
    ``(seed, rank, epoch)``, never from the global torch RNG, so starting an iterator mid-epoch on
    resume does not shift the random stream the model and dataset see.

    Args:
        dataset: a map-style dataset.
        batch_size: samples per rank per micro-batch.
        rank: this process's rank.
        world_size: number of ranks.
        seed: the run seed.
        num_workers: ``DataLoader`` worker processes.
        collate_fn: ``DataLoader`` collate function (``None``: the default).
        pin_memory: pin batches for faster host-to-GPU copies.
    """

    def __init__(
        self,
        dataset: Dataset,
        batch_size: int,
        *,
        rank: int,
        world_size: int,
        seed: int,
        num_workers: int = 0,
        collate_fn: Callable[[list[Any]], Any] | None = None,
        pin_memory: bool = False,
    ) -> None:
        self.sampler = ResumableBatchSampler(len(dataset), batch_size, rank=rank, world_size=world_size, seed=seed)
        self._seed = seed
        self._rank = rank
        self._generator = torch.Generator()
        self._loader = DataLoader(
            dataset,
            batch_sampler=self.sampler,
            num_workers=num_workers,
            collate_fn=collate_fn,
            pin_memory=pin_memory,
            generator=self._generator,
        )
        self._iterator: Iterator[Any] | None = None
        self.epoch = 0
        self.batch = 0

    def seek(self, epoch: int, batch: int) -> None:
        """Continue from global micro-batch ``batch`` of ``epoch`` (a checkpoint's ``data_position``)."""
        self.sampler.set_position(epoch, batch)
        self.epoch, self.batch = epoch, batch
        self._iterator = None

    def position(self) -> dict[str, int]:
        """``{"epoch", "batch"}`` of the next micro-batch."""
        return {"epoch": self.epoch, "batch": self.batch}

    def next_batch(self) -> Any:
        """The next micro-batch (collated), advancing the position."""
        if self._iterator is None:
            self.sampler.set_position(self.epoch, self.batch)
            self._generator.manual_seed(derive_seed(self._seed, self._rank, self.epoch))
            self._iterator = iter(self._loader)
        batch = next(self._iterator)
        self.batch += 1
        if self.batch == self.sampler.batches_per_epoch:
            self.epoch, self.batch = self.epoch + 1, 0
            self._iterator = None
        return batch
