"""Where a training process runs: torchrun's process group, its rank and device, and the batch split.

:func:`setup_distributed` reads torchrun's ``RANK`` / ``WORLD_SIZE`` / ``LOCAL_RANK``; with
``WORLD_SIZE`` unset or 1 it is a single process. See docs/training.md ("Distributed training").
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from accord import dist as adist

__all__ = [
    "DistributedContext",
    "setup_distributed",
    "teardown_distributed",
    "micro_batch_size",
    "broadcast_from_main",
]


@dataclass(frozen=True)
class DistributedContext:
    """Where this process trains: its rank, the world size and its device."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    owns_process_group: bool

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup_distributed(backend: str = "auto", device: str = "auto") -> DistributedContext:
    """Join the process group described by torchrun's ``RANK``/``WORLD_SIZE``/``LOCAL_RANK``.

    With ``WORLD_SIZE`` unset or 1 this is a single process and no group is created. A group that
    already exists (created by the caller) is used as is and left for the caller to destroy.

    Args:
        backend: ``"auto"`` (nccl on CUDA, gloo on CPU), ``"gloo"`` or ``"nccl"``.
        device: ``"auto"`` (``cuda:LOCAL_RANK`` when CUDA is available), ``"cpu"`` or ``"cuda"``.

    Raises:
        RuntimeError: ``device="cuda"`` without CUDA, or ``backend="nccl"`` on the CPU.
    """
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("trainer.device is 'cuda' but torch sees no CUDA device")
    use_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    if use_cuda:
        torch.cuda.set_device(local_rank)
    owns_group = False
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not adist.is_distributed():
        chosen = ("nccl" if use_cuda else "gloo") if backend == "auto" else backend
        if chosen == "nccl" and not use_cuda:
            raise RuntimeError("trainer.backend 'nccl' needs CUDA devices; use 'gloo' or 'auto' on the CPU")
        dist.init_process_group(backend=chosen)
        owns_group = True
    return DistributedContext(
        rank=adist.rank(),
        world_size=adist.world_size(),
        local_rank=local_rank,
        device=torch.device("cuda", local_rank) if use_cuda else torch.device("cpu"),
        owns_process_group=owns_group,
    )


def teardown_distributed(context: DistributedContext, completed: bool = True) -> None:
    """Destroy the process group if :func:`setup_distributed` created it.

    Args:
        context: what :func:`setup_distributed` returned.
        completed: every rank got here normally, so they wait for each other first (tearing gloo
            down while another rank still talks to it can abort that rank at exit: "terminate
            called without an active exception"); after an error a rank leaves at once, since
            the others may never arrive.
    """
    if context.owns_process_group and adist.is_distributed():
        if completed:
            dist.barrier()
        dist.destroy_process_group()


def micro_batch_size(batch_size: int, world_size: int, grad_accum_steps: int) -> int:
    """Samples per rank per micro-batch; the global batch must split evenly.

    Raises:
        ValueError: naming the three numbers when ``batch_size`` is not divisible.
    """
    parts = world_size * grad_accum_steps
    if batch_size % parts:
        raise ValueError(
            f"trainer.batch_size {batch_size} is not divisible by world_size {world_size} x "
            f"grad_accum_steps {grad_accum_steps} = {parts}"
        )
    return batch_size // parts


def broadcast_from_main(value: Any, context: DistributedContext) -> Any:
    """Rank 0's ``value`` on every rank (a picklable object; returned as is in a single process).

    Every rank must call it, in the same order relative to the other collectives.
    """
    if context.world_size == 1:
        return value
    holder = [value]
    dist.broadcast_object_list(holder, src=0)
    return holder[0]
