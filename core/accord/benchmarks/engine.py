"""Engine benchmark: dense vs tiled InfoNCE, forward + backward time and peak memory per batch size.

Registered as the ``engine`` plugin's speed benchmark ``tiled_infonce`` (:func:`tiled_infonce`).
For each batch size ``N`` (``N`` query/key pairs of dimension ``d``, fp32, paired targets, one
direction) three fresh child processes run ``python -m accord.benchmarks.engine --child ...``:

* ``baseline`` imports torch and accord and allocates the inputs, nothing else;
* ``dense`` runs :func:`~accord.losses.infonce.info_nce` with ``tiled=False`` (full ``N x N`` logits);
* ``tiled`` runs it with ``tiled=True`` (linear memory, :mod:`accord.losses.tiled`).

Each child reports its own peak resident set size (``VmHWM``, reset after the imports and the
inputs through ``/proc/self/clear_refs`` so the imports' transient memory does not mask the loss's;
``ru_maxrss`` of the whole process where that is unavailable), from a process that measured
nothing else; those children run the loss once. Time comes from a fourth child, ``paired``, that
runs dense and tiled alternately in one process (:func:`accord.utils.timing.time_alternating`, one
untimed round first) and reports the median, min and max of ``repeats`` runs of each, with its
torch thread count and the machine's load average; where dense is skipped the ``tiled`` child times itself the same way. ``threads`` sets the
children's torch threads (1: stable ratios on a shared machine). ``net`` is the peak minus the
baseline's peak: the memory the loss itself needed. Dense runs whose predicted footprint
(``4 * N^2 * 4`` bytes, as measured) exceeds the cap are reported as skipped,
not run; a child that fails (error, signal, timeout) is reported with its reason.

Example:
    accord benchmark engine --speed tiled_infonce --out runs/engine      # all sizes (slow)
    accord benchmark engine --speed tiled_infonce --quick                # N = 4096, 8192
    accord benchmark engine --speed tiled_infonce --quick threads=1      # stable ratios
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any, Sequence

from pydantic import Field
from rich.console import Console

from accord.benchmarking import BenchmarkResult, ResultTable
from accord.config import BenchmarkConfig
from accord.utils.files import write_figure_atomically

__all__ = ["DEFAULT_SIZES", "QUICK_SIZES", "EngineBenchmarkConfig", "predicted_dense_bytes", "run_engine_benchmark",
           "table", "tiled_infonce"]

DEFAULT_SIZES = (4096, 8192, 16384, 32768, 65536, 131072, 262144)
QUICK_SIZES = (4096, 8192)
#: Dense runs predicted to need more than this are skipped rather than run.
DENSE_MEMORY_CAP_BYTES = 16 * 2**30
#: Sizes up to this are timed over several runs (median, min, max); larger ones once.
REPEAT_UP_TO = 16384
#: Timed runs of each path per size up to :data:`REPEAT_UP_TO`.
REPEATS = 5
GIB = 2**30
MIB = 2**20


def predicted_dense_bytes(n: int) -> int:
    """Predicted working set of the dense path: three fp32 ``N x N`` matrices.

    The measured net peak is about four ``N x N`` fp32 matrices (the logits kept for backward, the
    log-sum-exp temporary, the softmax and the logit gradient briefly coexist).
    """
    return 4 * n * n * 4


def _reset_peak_rss() -> None:
    """Start the peak RSS afresh (Linux: ``/proc/self/clear_refs``), so the transient memory of the
    imports does not hide the loss's own peak; elsewhere the peak covers the whole process."""
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
    except OSError:
        pass


def _peak_rss_bytes() -> int:
    """Peak resident set size since :func:`_reset_peak_rss` (``VmHWM``), else of the whole process."""
    try:
        with open("/proc/self/status") as handle:
            for line in handle:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource

    # Linux reports ru_maxrss in KiB, macOS in bytes.
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def _child(mode: str, n: int, dim: int, tile_size: int, repeats: int, threads: int | None) -> dict[str, Any]:
    """Body of a child process: build the inputs, run the loss (``paired``: both paths alternately,
    timed), report the timings, the peak RSS, the thread count and the load average."""
    import torch

    from accord.losses.infonce import info_nce
    from accord.utils.timing import machine_state, time_alternating

    if threads is not None:
        torch.set_num_threads(threads)
    torch.manual_seed(0)
    query = torch.randn(n, dim, requires_grad=True)
    key = torch.randn(n, dim, requires_grad=True)
    result: dict[str, Any] = {"mode": mode}
    losses: dict[str, float] = {}
    _reset_peak_rss()

    def run(path: str) -> None:
        query.grad = key.grad = None
        loss = info_nce(query, key, temperature=0.1, tiled=path == "tiled", tile_size=tile_size)
        loss.backward()
        losses[path] = loss.item()

    if mode != "baseline":
        paths = ("dense", "tiled") if mode == "paired" else (mode,)
        timings = time_alternating({path: lambda path=path: run(path) for path in paths}, repeats=repeats,
                                   warmup=1 if mode == "paired" or repeats > 1 else 0)
        result["timings"] = {path: list(timing.seconds) for path, timing in timings.items()}
        result["losses"] = losses
    result.update(machine_state(), peak_rss_bytes=_peak_rss_bytes())
    return result


def _run_child(
    mode: str, n: int, dim: int, tile_size: int, repeats: int, threads: int | None, timeout_s: float | None
) -> dict[str, Any]:
    command = [
        sys.executable, "-m", "accord.benchmarks.engine", "--child", mode,
        "--sizes", str(n), "--dim", str(dim), "--tile-size", str(tile_size), "--repeats", str(repeats),
    ]  # fmt: skip
    if threads is not None:
        command += ["--threads", str(threads)]
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
    threads: int | None = None,
) -> list[dict[str, Any]]:
    """Measure dense vs tiled InfoNCE forward + backward for each batch size in child processes.

    Args:
        sizes: batch sizes ``N`` (pairs); default :data:`DEFAULT_SIZES`.
        dim: feature dimension.
        tile_size: tile edge of the tiled path; default
            :data:`accord.losses.tiled.DEFAULT_TILE_SIZE`.
        quick: only ``N`` in :data:`QUICK_SIZES` (overrides ``sizes``), for demos.
        dense_memory_cap_bytes: skip dense runs predicted (:func:`predicted_dense_bytes`) above this.
        timeout_s: per-child time limit; ``None`` waits.
        console: where to print progress; a new :class:`rich.console.Console` if ``None``.
        threads: torch threads of every child; ``None``: torch's default.

    Returns:
        One dict per (``n``, ``path``) with ``status`` (``"ok"``, ``"skipped"``, ``"failed"``),
        ``reason`` (when not ok), ``time_s`` (median wall time), ``min_s``, ``max_s``, ``times_s``
        (every timed run), ``timed_with`` (``"paired"``: alternated with the other path in one
        process), ``peak_rss_mib``, ``net_rss_mib``, ``baseline_rss_mib``, ``loss``, ``threads``,
        ``load_1min`` (during the timing), ``tile_size``, ``dim`` and ``repeats``.
    """
    from accord.losses.tiled import DEFAULT_TILE_SIZE

    console = console or Console()
    tile_size = tile_size or DEFAULT_TILE_SIZE
    sizes = QUICK_SIZES if quick else tuple(sizes or DEFAULT_SIZES)
    rows: list[dict[str, Any]] = []
    for n in sizes:
        repeats = REPEATS if n <= REPEAT_UP_TO else 1
        baseline = _run_child("baseline", n, dim, tile_size, 1, threads, timeout_s)
        baseline_mib = baseline["peak_rss_bytes"] / MIB if baseline["status"] == "ok" else None
        dense_runs = predicted_dense_bytes(n) <= dense_memory_cap_bytes
        by_path: dict[str, dict[str, Any]] = {}
        for path in ("dense", "tiled"):
            row: dict[str, Any] = {"n": n, "path": path, "dim": dim, "tile_size": tile_size, "repeats": repeats}
            by_path[path] = row
            rows.append(row)
            if path == "dense" and not dense_runs:
                row.update(status="skipped", reason=f"would need {predicted_dense_bytes(n) / GIB:.1f} GiB "
                                                    f"(cap {dense_memory_cap_bytes / GIB:.1f} GiB)")
                continue
            # Alone, the tiled child also times itself; with dense, the paired child times both.
            own_repeats = 1 if dense_runs else repeats
            console.print(f"[dim]N={n} {path}: peak memory ({own_repeats} run(s))...[/dim]")
            result = _run_child(path, n, dim, tile_size, own_repeats, threads, timeout_s)
            row["status"] = result["status"]
            if result["status"] != "ok":
                row["reason"] = result["reason"]
                continue
            peak_mib = result["peak_rss_bytes"] / MIB
            row.update(peak_rss_mib=peak_mib, baseline_rss_mib=baseline_mib, loss=result["losses"][path],
                       net_rss_mib=peak_mib - baseline_mib if baseline_mib is not None else None)
            if not dense_runs:
                _add_times(row, result, path, "alone")
        if dense_runs and all(row["status"] == "ok" for row in by_path.values()):
            console.print(f"[dim]N={n}: dense and tiled alternated ({repeats} run(s) each)...[/dim]")
            paired = _run_child("paired", n, dim, tile_size, repeats, threads, timeout_s)
            for path, row in by_path.items():
                if paired["status"] == "ok":
                    _add_times(row, paired, path, "paired")
                else:
                    row.update(status="failed", reason=f"timing: {paired['reason']}")
    return rows


def _add_times(row: dict[str, Any], result: dict[str, Any], path: str, timed_with: str) -> None:
    times = result["timings"][path]
    row.update(time_s=statistics.median(times), min_s=min(times), max_s=max(times), times_s=times,
               timed_with=timed_with, threads=result["torch_threads"], load_1min=result["load_1min"])


def _ratios(rows: list[dict[str, Any]]) -> dict[int, tuple[str, str]]:
    """Per N: tiled/dense median time (range of the per-run ratios) and net memory, as display strings."""
    by_key = {(r["n"], r["path"]): r for r in rows}
    ratios = {}
    for n in sorted({r["n"] for r in rows}):
        dense, tiled = by_key.get((n, "dense"), {}), by_key.get((n, "tiled"), {})
        if dense.get("status") == "ok" and tiled.get("status") == "ok" and "time_s" in tiled:
            memory = (
                f"{tiled['net_rss_mib'] / dense['net_rss_mib']:.3f}"
                if tiled.get("net_rss_mib") is not None and dense.get("net_rss_mib")
                else "-"
            )
            per_run = [t / d for t, d in zip(tiled["times_s"], dense["times_s"])]
            ratios[n] = (f"{tiled['time_s'] / dense['time_s']:.2f} ({min(per_run):.2f}-{max(per_run):.2f})", memory)
    return ratios


def _cells(row: dict[str, Any]) -> list[str]:
    if row["status"] != "ok":
        return [f"{row['status']} ({row['reason']})", "", "", "", "", ""]
    net = row.get("net_rss_mib")
    return [
        "ok",
        f"{row['time_s']:.3g} ({row['min_s']:.3g}-{row['max_s']:.3g})",
        f"{row['threads']}, {row['load_1min']:.1f}",
        row["timed_with"],
        f"{row['peak_rss_mib']:.0f}",
        f"{net:.0f}" if net is not None else "-",
    ]


HEADER = [
    "N", "path", "status", "fwd+bwd wall, median (min-max) (s)", "threads, load", "timed", "peak RSS (MiB)",
    "net (MiB)", "tiled/dense time (per-run range)", "tiled/dense net mem",
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
        ok = [r for r in rows if r["path"] == name and r["status"] == "ok" and "time_s" in r]
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
    write_figure_atomically(fig, path, dpi=120)
    plt.close(fig)


class EngineBenchmarkConfig(BenchmarkConfig):
    """``accord benchmark engine --speed tiled_infonce``: forward+backward time and peak memory, dense vs tiled."""

    sizes: list[int] = Field(list(DEFAULT_SIZES), min_length=1, description="numbers of pairs N (quick: 4096, 8192)")
    dim: int = Field(128, ge=1, description="feature dimension d")
    threads: int | None = Field(None, ge=1, description="torch threads of the children; 1 gives stable ratios on a "
                                                        "shared machine; None: torch's default")


def tiled_infonce(cfg: EngineBenchmarkConfig) -> BenchmarkResult:
    """The registered speed benchmark: :func:`run_engine_benchmark`, its table and ``results.png``."""
    rows = run_engine_benchmark(cfg.sizes, dim=cfg.dim, quick=cfg.quick, threads=cfg.threads)
    plot = cfg.run_dir / "results.png"
    _plot(rows, plot)
    result_table = table(rows)
    return BenchmarkResult(result_table.title, [result_table], rows=rows, plots=[plot])


def main(argv: Sequence[str] | None = None) -> None:
    """One child measurement (``--child MODE``), printed as a JSON line for :func:`_run_child`."""
    parser = argparse.ArgumentParser(prog="python -m accord.benchmarks.engine", description=main.__doc__)
    parser.add_argument("--child", choices=("baseline", "dense", "tiled", "paired"), required=True)
    parser.add_argument("--sizes", type=int, nargs=1, required=True, help="batch size N (pairs)")
    parser.add_argument("--dim", type=int, required=True)
    parser.add_argument("--tile-size", type=int, required=True)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args(argv)
    print(json.dumps(_child(args.child, args.sizes[0], args.dim, args.tile_size, args.repeats, args.threads)))


if __name__ == "__main__":
    main()
