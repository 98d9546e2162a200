"""Engine benchmark: dense vs tiled InfoNCE, forward + backward time and peak memory per batch size.

Registered as the ``engine`` plugin's speed benchmark ``tiled_infonce`` (:func:`tiled_infonce`).
For each batch size ``N`` (``N`` query/key pairs of dimension ``d``, fp32, paired targets, one
direction) three fresh child processes run ``python -m accord.benchmarks.engine --child ...``:

* ``baseline`` imports torch and accord and allocates the inputs, nothing else;
* ``dense`` runs :func:`~accord.losses.infonce.info_nce` with ``tiled=False`` (full ``N x N`` logits);
* ``tiled`` runs it with ``tiled=True`` (linear memory, :mod:`accord.losses.tiled`).

Each child reports its own peak resident set size (``getrusage(RUSAGE_SELF).ru_maxrss``), so every
number is a whole-process peak from a process that measured nothing else. Time is the best of
``repeats`` wall-clock runs (the least disturbed by other load on a shared machine); every run's
wall and CPU time is kept in the JSON. ``net`` is the peak minus
the baseline's peak: the memory the loss itself needed. Dense runs whose predicted footprint
(``4 * N^2 * 4`` bytes, as measured) exceeds the cap are reported as skipped,
not run; a child that fails (error, signal, timeout) is reported with its reason.

Example:
    accord benchmark engine --speed tiled_infonce --out runs/engine      # all sizes (slow)
    accord benchmark engine --speed tiled_infonce --quick                # N = 4096, 8192
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Sequence

from pydantic import Field
from rich.console import Console

from accord.benchmarking import BenchmarkResult, ResultTable
from accord.config import BenchmarkConfig

__all__ = ["DEFAULT_SIZES", "QUICK_SIZES", "EngineBenchmarkConfig", "predicted_dense_bytes", "run_engine_benchmark",
           "table", "tiled_infonce"]

DEFAULT_SIZES = (4096, 8192, 16384, 32768, 65536, 131072, 262144)
QUICK_SIZES = (4096, 8192)
#: Dense runs predicted to need more than this are skipped rather than run.
DENSE_MEMORY_CAP_BYTES = 16 * 2**30
#: Sizes up to this are timed over several runs (best of); larger ones once.
REPEAT_UP_TO = 16384
GIB = 2**30
MIB = 2**20


def predicted_dense_bytes(n: int) -> int:
    """Predicted working set of the dense path: three fp32 ``N x N`` matrices.

    The measured net peak is about four ``N x N`` fp32 matrices (the logits kept for backward, the
    log-sum-exp temporary, the softmax and the logit gradient briefly coexist).
    """
    return 4 * n * n * 4


def _child(mode: str, n: int, dim: int, tile_size: int, repeats: int) -> dict[str, Any]:
    """Body of a child process: build the inputs, optionally run the loss, report the peak RSS."""
    import resource

    import torch

    from accord.losses.infonce import info_nce

    torch.manual_seed(0)
    query = torch.randn(n, dim, requires_grad=True)
    key = torch.randn(n, dim, requires_grad=True)
    result: dict[str, Any] = {"mode": mode, "threads": torch.get_num_threads()}
    if mode != "baseline":
        wall_times, cpu_times = [], []
        for _ in range(repeats):
            query.grad = key.grad = None
            start, start_cpu = time.perf_counter(), time.process_time()
            loss = info_nce(query, key, temperature=0.1, tiled=mode == "tiled", tile_size=tile_size)
            loss.backward()
            wall_times.append(time.perf_counter() - start)
            cpu_times.append(time.process_time() - start_cpu)
        result.update(time_s=min(wall_times), times_s=wall_times, cpu_times_s=cpu_times, loss=loss.item())
    # Linux reports ru_maxrss in KiB, macOS in bytes.
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    result["peak_rss_bytes"] = peak if sys.platform == "darwin" else peak * 1024
    return result


def _run_child(
    mode: str, n: int, dim: int, tile_size: int, repeats: int, timeout_s: float | None
) -> dict[str, Any]:
    command = [
        sys.executable, "-m", "accord.benchmarks.engine", "--child", mode,
        "--sizes", str(n), "--dim", str(dim), "--tile-size", str(tile_size), "--repeats", str(repeats),
    ]  # fmt: skip
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return {"status": "failed", "reason": f"timed out after {timeout_s:g} s"}
    if done.returncode != 0:
        if done.returncode < 0:
            reason = f"killed by signal {-done.returncode}" + (" (out of memory?)" if done.returncode == -9 else "")
        else:
            lines = done.stderr.strip().splitlines()
            reason = lines[-1] if lines else f"exit status {done.returncode}"
        return {"status": "failed", "reason": reason}
    return {"status": "ok", **json.loads(done.stdout.strip().splitlines()[-1])}


def run_engine_benchmark(
    sizes: Sequence[int] | None = None,
    dim: int = 128,
    tile_size: int | None = None,
    quick: bool = False,
    dense_memory_cap_bytes: int = DENSE_MEMORY_CAP_BYTES,
    timeout_s: float | None = None,
    console: Console | None = None,
) -> list[dict[str, Any]]:
    """Measure dense vs tiled InfoNCE forward + backward for each batch size, each in its own process.

    Args:
        sizes: batch sizes ``N`` (pairs); default :data:`DEFAULT_SIZES`.
        dim: feature dimension.
        tile_size: tile edge of the tiled path; default
            :data:`accord.losses.tiled.DEFAULT_TILE_SIZE`.
        quick: only ``N`` in :data:`QUICK_SIZES` (overrides ``sizes``), for demos.
        dense_memory_cap_bytes: skip dense runs predicted (:func:`predicted_dense_bytes`) above this.
        timeout_s: per-child time limit; ``None`` waits.
        console: where to print progress; a new :class:`rich.console.Console` if ``None``.

    Returns:
        One dict per (``n``, ``path``) with ``status`` (``"ok"``, ``"skipped"``, ``"failed"``),
        ``reason`` (when not ok), ``time_s`` (best wall time), ``times_s`` / ``cpu_times_s`` (every
        run), ``peak_rss_mib``, ``net_rss_mib``, ``baseline_rss_mib``, ``loss``, ``threads``,
        ``tile_size``, ``dim`` and ``repeats``.
    """
    from accord.losses.tiled import DEFAULT_TILE_SIZE

    console = console or Console()
    tile_size = tile_size or DEFAULT_TILE_SIZE
    sizes = QUICK_SIZES if quick else tuple(sizes or DEFAULT_SIZES)
    rows: list[dict[str, Any]] = []
    for n in sizes:
        repeats = 3 if n <= REPEAT_UP_TO else 1
        baseline = _run_child("baseline", n, dim, tile_size, 1, timeout_s)
        baseline_mib = baseline["peak_rss_bytes"] / MIB if baseline["status"] == "ok" else None
        for path in ("dense", "tiled"):
            row: dict[str, Any] = {"n": n, "path": path, "dim": dim, "tile_size": tile_size, "repeats": repeats}
            if path == "dense" and predicted_dense_bytes(n) > dense_memory_cap_bytes:
                row.update(
                    status="skipped",
                    reason=f"would need {predicted_dense_bytes(n) / GIB:.1f} GiB "
                    f"(cap {dense_memory_cap_bytes / GIB:.1f} GiB)",
                )
            else:
                console.print(f"[dim]N={n} {path}: running ({repeats} run(s))...[/dim]")
                result = _run_child(path, n, dim, tile_size, repeats, timeout_s)
                row["status"] = result["status"]
                if result["status"] == "ok":
                    peak_mib = result["peak_rss_bytes"] / MIB
                    row.update(
                        time_s=result["time_s"],
                        times_s=result["times_s"],
                        cpu_times_s=result["cpu_times_s"],
                        loss=result["loss"],
                        threads=result["threads"],
                        peak_rss_mib=peak_mib,
                        baseline_rss_mib=baseline_mib,
                        net_rss_mib=peak_mib - baseline_mib if baseline_mib is not None else None,
                    )
                else:
                    row["reason"] = result["reason"]
            rows.append(row)
    return rows


def _ratios(rows: list[dict[str, Any]]) -> dict[int, tuple[str, str]]:
    """Per N: tiled/dense time and tiled/dense net memory, as display strings."""
    by_key = {(r["n"], r["path"]): r for r in rows}
    ratios = {}
    for n in sorted({r["n"] for r in rows}):
        dense, tiled = by_key.get((n, "dense"), {}), by_key.get((n, "tiled"), {})
        if dense.get("status") == "ok" and tiled.get("status") == "ok":
            memory = (
                f"{tiled['net_rss_mib'] / dense['net_rss_mib']:.3f}"
                if tiled.get("net_rss_mib") is not None and dense.get("net_rss_mib")
                else "-"
            )
            ratios[n] = (f"{tiled['time_s'] / dense['time_s']:.2f}", memory)
    return ratios


def _cells(row: dict[str, Any]) -> list[str]:
    if row["status"] != "ok":
        return [f"{row['status']} ({row['reason']})", "", "", "", ""]
    net = row.get("net_rss_mib")
    # CPU time of the best run: about threads x wall when the process had the cores to itself,
    # so a lower ratio shows time lost to other load.
    cpu = row["cpu_times_s"][row["times_s"].index(row["time_s"])]
    return [
        "ok",
        f"{row['time_s']:.2f}",
        f"{cpu:.2f}",
        f"{row['peak_rss_mib']:.0f}",
        f"{net:.0f}" if net is not None else "-",
    ]


HEADER = [
    "N", "path", "status", "fwd+bwd wall, best (s)", "CPU of that run (s)", "peak RSS (MiB)", "net (MiB)",
    "tiled/dense time", "tiled/dense net mem",
]  # fmt: skip


def table(rows: list[dict[str, Any]]) -> ResultTable:
    """The result rows as one table: per N and path its status, times and memory, and the tiled/dense ratios."""
    ratios = _ratios(rows)
    lines = []
    for row in rows:
        ratio = ratios.get(row["n"], ("", "")) if row["path"] == "tiled" else ("", "")
        lines.append([str(row["n"]), row["path"], *_cells(row), *ratio])
    dim = rows[0]["dim"] if rows else "-"
    return ResultTable(f"InfoNCE forward + backward, dense vs tiled (d={dim}, fp32, CPU)", HEADER, lines)


def _plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (memory_ax, time_ax) = plt.subplots(1, 2, figsize=(11, 4.2))
    for name, marker in (("dense", "o"), ("tiled", "s")):
        ok = [r for r in rows if r["path"] == name and r["status"] == "ok"]
        sizes = [r["n"] for r in ok]
        memory_ax.loglog(sizes, [max(r["net_rss_mib"] or 0.0, 1.0) for r in ok], marker=marker, label=name)
        time_ax.loglog(sizes, [r["time_s"] for r in ok], marker=marker, label=name)
    for ax, label in ((memory_ax, "net peak RSS (MiB)"), (time_ax, "forward + backward (s)")):
        ax.set_xlabel("N (pairs)")
        ax.set_ylabel(label)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    fig.suptitle(f"InfoNCE, d={rows[0]['dim']}, fp32, CPU; tile {rows[0]['tile_size']}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


class EngineBenchmarkConfig(BenchmarkConfig):
    """``accord benchmark engine --speed tiled_infonce``: forward+backward time and peak memory, dense vs tiled."""

    sizes: list[int] = Field(list(DEFAULT_SIZES), min_length=1, description="numbers of pairs N (quick: 4096, 8192)")
    dim: int = Field(128, ge=1, description="feature dimension d")


def tiled_infonce(cfg: EngineBenchmarkConfig) -> BenchmarkResult:
    """The registered speed benchmark: :func:`run_engine_benchmark`, its table and ``results.png``."""
    rows = run_engine_benchmark(cfg.sizes, dim=cfg.dim, quick=cfg.quick)
    plot = cfg.run_dir / "results.png"
    _plot(rows, plot)
    result_table = table(rows)
    return BenchmarkResult(result_table.title, [result_table], rows=rows, plots=[plot])


def main(argv: Sequence[str] | None = None) -> None:
    """One child measurement (``--child MODE``), printed as a JSON line for :func:`_run_child`."""
    parser = argparse.ArgumentParser(prog="python -m accord.benchmarks.engine", description=main.__doc__)
    parser.add_argument("--child", choices=("baseline", "dense", "tiled"), required=True)
    parser.add_argument("--sizes", type=int, nargs=1, required=True, help="batch size N (pairs)")
    parser.add_argument("--dim", type=int, required=True)
    parser.add_argument("--tile-size", type=int, required=True)
    parser.add_argument("--repeats", type=int, default=1)
    args = parser.parse_args(argv)
    print(json.dumps(_child(args.child, args.sizes[0], args.dim, args.tile_size, args.repeats)))


if __name__ == "__main__":
    main()
