"""A MoCo-style ring-buffer queue of negative features."""

from __future__ import annotations

import torch
from torch import nn

from accord import dist as adist
from accord.utils.checks import check_finite, check_tensor

__all__ = ["MemoryQueue"]


class MemoryQueue(nn.Module):
    """Fixed-size FIFO of past key features, used as extra negatives (MoCo, arXiv:1911.05722).

    The queue starts empty and only ever returns the rows written so far, so no random
    placeholder vectors act as negatives during the first steps. Its contents, write pointer and
    fill count are persistent buffers: they are saved in checkpoints, so resuming a run resumes
    with the same negatives.

    Args:
        size: number of rows the queue holds.
        dim: feature dimension of each row.
        gather_distributed: enqueue the keys of every rank (all-gathered without gradient, in rank
            order) so that all ranks hold the same queue under DDP.

    Raises:
        ValueError: ``size`` or ``dim`` is not a positive integer.

    Shape:
        - :meth:`negatives` returns :math:`(K, D)` with :math:`K \\le` ``size``.
        - :meth:`enqueue` takes :math:`(n, D)`.

    Example:
        >>> queue = MemoryQueue(size=4, dim=2)
        >>> queue.enqueue(torch.eye(2))
        >>> queue.negatives().shape
        torch.Size([2, 2])
    """

    features: torch.Tensor
    pointer: torch.Tensor
    count: torch.Tensor

    def __init__(self, size: int, dim: int, gather_distributed: bool = False) -> None:
        super().__init__()
        for name, value in (("size", size), ("dim", dim)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}: expected a positive int, got {value!r}")
        self.size = size
        self.dim = dim
        self.gather_distributed = gather_distributed
        self.register_buffer("features", torch.zeros(size, dim))
        self.register_buffer("pointer", torch.zeros((), dtype=torch.long))
        self.register_buffer("count", torch.zeros((), dtype=torch.long))

    def negatives(self) -> torch.Tensor:
        """The filled rows, detached and copied.

        A copy rather than a view: the caller's autograd graph keeps these rows for the backward
        pass, and a later :meth:`enqueue` overwrites the buffer in place.

        Returns:
            ``(K, dim)`` with ``K = min(number enqueued so far, size)``.
        """
        return self.features[: int(self.count)].detach().clone()

    @torch.no_grad()
    def enqueue(self, keys: torch.Tensor) -> None:
        """Write ``keys`` after the newest rows, overwriting the oldest once the queue is full.

        Args:
            keys: ``(n, dim)`` features of this rank (gathered across ranks first when
                ``gather_distributed``). With more rows than ``size``, only the last ``size`` stay.

        Raises:
            ValueError: ``keys`` is not ``(n, dim)`` floating point, or holds NaN/Inf.
        """
        check_tensor(keys, "keys", shape=(None, self.dim), floating=True, min_rows=0)
        check_finite(keys, "keys")
        if self.gather_distributed:
            keys = adist.gather_no_grad(keys)
        keys = keys.detach().to(self.features.dtype)[-self.size :]
        n = keys.shape[0]
        slots = (self.pointer + torch.arange(n, device=self.features.device)) % self.size
        self.features[slots] = keys
        self.pointer.copy_((self.pointer + n) % self.size)
        self.count.clamp_(max=self.size - n).add_(n)

    def extra_repr(self) -> str:
        return f"size={self.size}, dim={self.dim}, gather_distributed={self.gather_distributed}"
