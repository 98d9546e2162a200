"""Run a function on a real multi-process gloo group, for distributed tests.

Example:
    >>> def body(rank, world_size, scale):
    ...     import torch, torch.distributed as dist
    ...     t = torch.ones(1) * scale
    ...     dist.all_reduce(t)
    ...     return t.item()
    >>> run_distributed(body, world_size=2, args=(3.0,))
    [6.0, 6.0]

The function must be importable (module level) because workers are started with ``spawn``.
Each worker runs with one intra-op thread so two workers do not oversubscribe a 2-core machine.
"""

from __future__ import annotations

import os
import socket
import tempfile
import traceback
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

__all__ = ["run_distributed", "free_port"]


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _worker(
    rank: int,
    world_size: int,
    init_file: str,
    fn: Callable[..., Any],
    args: tuple[Any, ...],
    results: Any,
) -> None:
    torch.set_num_threads(1)
    os.environ["RANK"] = str(rank)
    os.environ["WORLD_SIZE"] = str(world_size)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        results[rank] = ("ok", fn(rank, world_size, *args))
    except BaseException:  # report the worker's traceback to the parent
        results[rank] = ("error", traceback.format_exc())
    finally:
        dist.destroy_process_group()


def run_distributed(
    fn: Callable[..., Any], world_size: int = 2, args: tuple[Any, ...] = (), timeout: float = 300.0
) -> list[Any]:
    """Run ``fn(rank, world_size, *args)`` on ``world_size`` spawned gloo processes.

    Args:
        fn: a picklable (module-level) function; its return value must be picklable.
        world_size: number of processes.
        args: extra positional arguments for ``fn``.
        timeout: seconds before the workers are considered hung.

    Returns:
        The return values, indexed by rank.

    Raises:
        RuntimeError: a worker raised; the message carries its traceback.
    """
    ctx = mp.get_context("spawn")
    with ctx.Manager() as manager, tempfile.TemporaryDirectory() as tmp:
        results = manager.dict()
        init_file = os.path.join(tmp, "pg_init")
        procs = [
            ctx.Process(target=_worker, args=(r, world_size, init_file, fn, args, results))
            for r in range(world_size)
        ]
        for p in procs:
            p.start()
        for p in procs:
            p.join(timeout)
        for p in procs:
            if p.is_alive():
                p.kill()
                raise RuntimeError(f"distributed worker pid {p.pid} hung for more than {timeout}s")
        out = []
        for r in range(world_size):
            if r not in results:
                raise RuntimeError(f"distributed worker rank {r} died without a result")
            status, value = results[r]
            if status != "ok":
                raise RuntimeError(f"distributed worker rank {r} failed:\n{value}")
            out.append(value)
        return out
