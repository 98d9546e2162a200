"""Distributed helpers with correct gradient semantics.

The rule every distributed loss in accord follows (engine spec §A7, "pattern G"): each rank computes
its *local rows x global columns*, the gather carries gradients back to the rank that owns each
embedding (the backward all-reduces and keeps this rank's slice), labels are offset by
``rank * n_local``, and DDP's gradient averaging then yields exactly the gradient of the global mean
loss. Statistics reduced across ranks (DINO centre, variance terms) go through
:func:`all_reduce_with_grad`; a plain ``dist.all_reduce`` would silently scale gradients by
``1 / world_size`` (lightly #1977). Keys that carry no gradient by design (queues, momentum
keys) use :func:`gather_no_grad`.

All functions are identity operations when ``torch.distributed`` is not initialised.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

__all__ = [
    "is_distributed",
    "rank",
    "world_size",
    "gather_with_grad",
    "gather_no_grad",
    "gather_rows",
    "all_reduce_with_grad",
    "eye_rank",
    "rank_offset",
]


def is_distributed() -> bool:
    """True when a default process group exists."""
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


class _GatherWithGrad(torch.autograd.Function):
    """All-gather whose backward sums every rank's gradient into the owning rank's slice."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor) -> tuple[torch.Tensor, ...]:  # type: ignore[override]
        ctx.rank = dist.get_rank()
        out = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
        dist.all_gather(out, tensor.contiguous())
        return tuple(out)

    @staticmethod
    def backward(ctx, *grads: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        stacked = torch.stack([g.contiguous() for g in grads])
        dist.all_reduce(stacked, op=dist.ReduceOp.SUM)
        return stacked[ctx.rank]


def _check_same_shape(tensor: torch.Tensor, name: str) -> None:
    shapes = [None] * world_size()
    dist.all_gather_object(shapes, tuple(tensor.shape))
    if len(set(shapes)) != 1:
        raise ValueError(
            f"{name}: all ranks must pass the same shape to an all-gather, got {shapes} by rank"
        )


def gather_with_grad(tensor: torch.Tensor, check_shapes: bool = False) -> torch.Tensor:
    """Concatenate ``tensor`` from all ranks along dim 0, keeping gradients.

    Args:
        tensor: ``(n, *)`` local rows; every rank must pass the same shape.
        check_shapes: verify equal shapes first (one extra collective); meant for debugging.

    Returns:
        ``(world_size * n, *)``; rows ``rank * n : (rank + 1) * n`` are this rank's ``tensor``.
    """
    if not is_distributed():
        return tensor
    if check_shapes:
        _check_same_shape(tensor, "gather_with_grad")
    return torch.cat(_GatherWithGrad.apply(tensor), dim=0)


@torch.no_grad()
def gather_no_grad(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate ``tensor`` from all ranks along dim 0 without gradient (queues, momentum keys).

    Args:
        tensor: ``(n, *)``, same shape on every rank.

    Returns:
        ``(world_size * n, *)`` detached.
    """
    if not is_distributed():
        return tensor.detach()
    out = [torch.empty_like(tensor) for _ in range(world_size())]
    dist.all_gather(out, tensor.contiguous())
    return torch.cat(out, dim=0)


def gather_rows(
    tensor: torch.Tensor, with_grad: bool = False, counts: list[int] | None = None
) -> tuple[torch.Tensor, list[int]]:
    """Concatenate ``tensor`` from all ranks along dim 0 when ranks hold different numbers of rows.

    The rows are padded to the largest count, gathered (:func:`gather_with_grad` or
    :func:`gather_no_grad`) and the padding is cut off again: matched pairs of a detector, per-sample
    results of an evaluation.

    Args:
        tensor: ``(n_r, *)`` this rank's rows; the trailing shape and dtype must agree across ranks.
        with_grad: keep gradients to every rank's rows (as :func:`gather_with_grad`); else detached.
        counts: every rank's ``n_r`` if already known (skips one collective).

    Returns:
        ``(sum(counts), *)`` rows in rank order, and ``counts``. Without a process group:
        ``tensor`` (detached unless ``with_grad``) and ``[n]``.
    """
    if not is_distributed():
        return (tensor if with_grad else tensor.detach()), [tensor.shape[0]]
    if counts is None:
        local = torch.tensor([tensor.shape[0]], dtype=torch.long, device=tensor.device)
        counts = [int(n) for n in gather_no_grad(local).tolist()]
    most = max(counts)
    padded = torch.cat([tensor, tensor.new_zeros(most - tensor.shape[0], *tensor.shape[1:])])
    gathered = gather_with_grad(padded) if with_grad else gather_no_grad(padded)
    return torch.cat([gathered[r * most: r * most + n] for r, n in enumerate(counts)]), counts


class _AllReduceSumWithGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, tensor: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        out = tensor.clone()
        dist.all_reduce(out, op=dist.ReduceOp.SUM)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        # d(sum_r x_r)/dx_r = 1 for the sum every rank consumed, so the gradient for this rank's
        # input is the sum of all ranks' upstream gradients.
        out = grad.clone()
        dist.all_reduce(out, op=dist.ReduceOp.SUM)
        return out


def all_reduce_with_grad(tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """All-reduce (``"sum"`` or ``"mean"``) that back-propagates to every rank's input.

    Args:
        tensor: any shape, the same on every rank.
        op: ``"sum"`` or ``"mean"``.
    """
    if op not in ("sum", "mean"):
        raise ValueError(f"all_reduce_with_grad: op must be 'sum' or 'mean', got {op!r}")
    if not is_distributed():
        return tensor
    out = _AllReduceSumWithGrad.apply(tensor)
    return out / world_size() if op == "mean" else out


def rank_offset(n_local: int) -> int:
    """Index of this rank's first row in a :func:`gather_with_grad` result."""
    return rank() * n_local


def eye_rank(n_local: int, device: torch.device | None = None) -> torch.Tensor:
    """Boolean ``(n_local, world_size * n_local)`` mask that is True at each local row's own column.

    Used to remove self-similarities from local-rows x global-columns logits.
    """
    cols = torch.arange(n_local, device=device) + rank_offset(n_local)
    mask = torch.zeros(n_local, world_size() * n_local, dtype=torch.bool, device=device)
    mask[torch.arange(n_local, device=device), cols] = True
    return mask
