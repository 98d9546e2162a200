"""Training progress: console bar or log lines, ``metrics.jsonl``, TensorBoard, loss-curve PNG.

Only the main rank (rank 0) prints or writes files. Each logged step appends one JSON line to
``<run_dir>/metrics.jsonl`` with ``step``, ``lr``, ``weight_decay`` (only when it is scheduled),
every loss term, ``samples_per_s`` (global samples per second since the previous logged step) and
``time`` (Unix seconds), flushed at once so a killed run keeps every line it logged. Validation and
callbacks add records of namespaced metrics (``{"step", "val/dice", ..., "time"}``,
:meth:`ProgressReporter.log_metrics`), which the loss-curve plot draws in one panel per namespace.
"""

from __future__ import annotations

import importlib.util
import json
import math
import sys
import time
from pathlib import Path
from typing import Any, Mapping

from accord.utils.files import write_atomically, write_figure_atomically

__all__ = [
    "METRICS_FILE",
    "LOSS_CURVES_FILE",
    "RESERVED_METRIC_KEYS",
    "ProgressReporter",
    "read_metrics",
    "last_training_record",
    "truncate_metrics",
    "plot_loss_curves",
]

METRICS_FILE = "metrics.jsonl"
LOSS_CURVES_FILE = "loss_curves.png"
#: Keys of a metrics record that are not loss terms (a model may not use them as term names).
RESERVED_METRIC_KEYS = ("step", "lr", "weight_decay", "samples_per_s", "time")


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """The records of a ``metrics.jsonl``; a torn last line from a killed writer is ignored."""
    if not Path(path).is_file():
        return []
    records = []
    for line in Path(path).read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict) and isinstance(record.get("step"), int):
            records.append(record)
    return records


def last_training_record(path: Path) -> dict[str, Any] | None:
    """The newest record of a ``metrics.jsonl`` that holds the loss (not a validation or probe record)."""
    return next((record for record in reversed(read_metrics(path)) if "loss" in record), None)


def truncate_metrics(path: Path, last_step: int) -> None:
    """Drop records after ``last_step`` (and torn lines) so a resumed run logs no step twice."""
    path = Path(path)
    if not path.is_file():
        return
    kept = "".join(json.dumps(r) + "\n" for r in read_metrics(path) if r["step"] <= last_step)
    write_atomically(path, lambda handle: handle.write(kept.encode()))


def _namespace_summary(key: str) -> bool:
    """``probe/miou`` is a namespace's summary metric; ``probe/iou/car`` (per class) is a detail."""
    return key.count("/") == 1


def plot_loss_curves(metrics_path: Path, out_path: Path) -> Path | None:
    """Plot ``metrics.jsonl`` against the step: one panel per loss term, one per metric namespace.

    A namespace's panel (``val``, ``probe``, ...) draws its summary metrics (keys with one ``/``,
    e.g. ``probe/miou`` and ``probe/dice``) with markers, since they are logged only every few
    steps. Uses a bare :class:`matplotlib.figure.Figure` (Agg canvas), so the global pyplot
    backend is left alone.

    Returns:
        ``out_path``, or ``None`` when there is nothing to plot.
    """
    from matplotlib.figure import Figure

    records = read_metrics(metrics_path)
    keys = list(dict.fromkeys(k for r in records for k in r if k not in RESERVED_METRIC_KEYS))
    panels = [[term] for term in keys if "/" not in term]
    namespaces: dict[str, list[str]] = {}
    for key in filter(_namespace_summary, keys):
        namespaces.setdefault(key.split("/")[0], []).append(key)
    panels += namespaces.values()
    if not panels:
        return None
    figure = Figure(figsize=(7, 2.2 * len(panels)), layout="constrained")
    axes = figure.subplots(len(panels), 1, sharex=True, squeeze=False)[:, 0]
    for ax, panel in zip(axes, panels):
        for key in panel:
            points = [(r["step"], r[key]) for r in records if key in r]
            sparse = "/" in key
            ax.plot([s for s, _ in points], [v for _, v in points], linewidth=1.2, marker="o" if sparse else None,
                    markersize=3, label=key.split("/", 1)[-1])
        ax.set_ylabel(panel[0].split("/")[0])
        if "/" in panel[0]:
            ax.legend(fontsize="small")
        ax.grid(alpha=0.3)
    axes[-1].set_xlabel("step")
    return write_figure_atomically(figure, out_path, dpi=100)


def _require_tensorboard() -> None:
    if importlib.util.find_spec("tensorboard") is None:
        raise RuntimeError(
            "trainer.tensorboard is true but the 'tensorboard' package is not installed; "
            "install it with: pip install 'accord[tensorboard]' (or set trainer.tensorboard: false)"
        )


def _format_duration(seconds: float) -> str:
    seconds = int(max(0.0, seconds))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


class ProgressReporter:
    """Reports each optimizer step; logs every ``log_every`` steps and at the last step.

    Args:
        run_dir: the run directory (``metrics.jsonl``, ``tensorboard/``, ``loss_curves.png``).
        max_steps: the run's last step.
        start_step: steps already done (a resumed run); later records are dropped from
            ``metrics.jsonl`` and purged from TensorBoard.
        global_batch_size: samples per optimizer step over all ranks.
        log_every: steps between records.
        is_main: whether this process prints and writes (rank 0).
        tensorboard: also write TensorBoard scalars to ``run_dir/tensorboard``.

    Raises:
        RuntimeError: ``tensorboard`` is requested but not installed (raised on every rank).
    """

    def __init__(
        self,
        run_dir: Path,
        *,
        max_steps: int,
        start_step: int,
        global_batch_size: int,
        log_every: int,
        is_main: bool,
        tensorboard: bool = False,
    ) -> None:
        if tensorboard:
            _require_tensorboard()
        self.run_dir = Path(run_dir)
        self.metrics_path = self.run_dir / METRICS_FILE
        self.max_steps = max_steps
        self.start_step = start_step
        self.global_batch_size = global_batch_size
        self.log_every = log_every
        self.is_main = is_main
        self.last_record: dict[str, Any] | None = None
        self._session_start = self._window_start = time.perf_counter()
        self._window_start_step = start_step
        self._metrics_file = None
        self._tensorboard = None
        self._bar = None
        if not is_main:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        # A fresh run keeps no record, not even an earlier attempt's step-0 probe.
        truncate_metrics(self.metrics_path, start_step if start_step > 0 else -1)
        self._metrics_file = open(self.metrics_path, "a", encoding="utf-8")
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._tensorboard = SummaryWriter(self.run_dir / "tensorboard", purge_step=start_step + 1)
        if sys.stdout.isatty():
            self._bar = _RichBar(max_steps, start_step)

    def update(
        self, step: int, lr: float, terms: Mapping[str, float], weight_decay: float | None = None
    ) -> dict[str, Any] | None:
        """Report that optimizer step ``step`` finished with these loss terms and learning rate.

        Args:
            step: optimizer steps completed.
            lr: the learning rate the step used.
            terms: the step's loss terms.
            weight_decay: the scheduled weight decay the step used; ``None`` leaves it out of the
                record (a constant one is not logged).

        Returns:
            The metrics record when this step is logged, else ``None``.
        """
        now = time.perf_counter()
        if self._bar is not None:
            session_rate = self.global_batch_size * (step - self.start_step) / max(now - self._session_start, 1e-9)
            self._bar.update(step, terms["loss"], session_rate)
        if step % self.log_every and step != self.max_steps:
            return None
        window = max(now - self._window_start, 1e-9)
        record = {
            "step": step,
            "lr": lr,
            **({"weight_decay": weight_decay} if weight_decay is not None else {}),
            **terms,
            "samples_per_s": self.global_batch_size * (step - self._window_start_step) / window,
            "time": time.time(),
        }
        self._window_start, self._window_start_step = now, step
        self.last_record = record
        if self.is_main:
            seconds_per_step = (now - self._session_start) / (step - self.start_step)
            self._write(record, eta=seconds_per_step * (self.max_steps - step))
        return record

    def log_metrics(self, step: int, metrics: Mapping[str, float]) -> dict[str, Any] | None:
        """Write namespaced metrics of ``step`` (validation, probes) as their own record.

        Args:
            step: the step they describe (optimizer steps completed).
            metrics: ``{"<namespace>/<name>": value}``; non-finite values are left out (e.g. the
                score of a class that a probe's test set does not hold).

        Returns:
            The record written (on rank 0), else ``None``.

        Raises:
            ValueError: a key without a namespace (on every rank).
        """
        bare = [key for key in metrics if not all(key.partition("/")[::2])]
        if bare:
            raise ValueError(f"metrics {bare} need a namespace, e.g. 'probe/{bare[0]}' (loss terms are the only "
                             "bare names in metrics.jsonl)")
        if not self.is_main:
            return None
        values = {key: float(value) for key, value in metrics.items() if math.isfinite(value)}
        record = {"step": step, **values, "time": time.time()}
        self._metrics_file.write(json.dumps(record) + "\n")
        self._metrics_file.flush()
        if self._tensorboard is not None:
            for key, value in values.items():
                self._tensorboard.add_scalar(key, value, step)
        summary = " ".join(f"{k}={_format_value(v)}" for k, v in values.items() if _namespace_summary(k))
        print(f"step {step}/{self.max_steps} {summary}", flush=True)
        return record

    def _write(self, record: dict[str, Any], eta: float) -> None:
        self._metrics_file.write(json.dumps(record) + "\n")
        self._metrics_file.flush()
        if self._tensorboard is not None:
            for key, value in record.items():
                if key not in ("step", "time"):
                    self._tensorboard.add_scalar(key, value, record["step"])
        if self._bar is None:
            terms = " ".join(
                f"{k}={_format_value(v)}" for k, v in record.items() if k not in RESERVED_METRIC_KEYS
            )
            weight_decay = f" wd={record['weight_decay']:.3e}" if "weight_decay" in record else ""
            print(
                f"step {record['step']}/{self.max_steps} {terms} lr={record['lr']:.3e}{weight_decay} "
                f"{record['samples_per_s']:.1f} samples/s eta {_format_duration(eta)}",
                flush=True,
            )

    def close(self, plot: bool = True) -> None:
        """Stop the bar, close the files and (``plot``) write ``loss_curves.png``."""
        if not self.is_main:
            return
        if self._bar is not None:
            self._bar.stop()
        if self._tensorboard is not None:
            self._tensorboard.close()
        if self._metrics_file is not None:
            self._metrics_file.close()
        if plot:
            plot_loss_curves(self.metrics_path, self.run_dir / LOSS_CURVES_FILE)


def _format_value(value: float) -> str:
    return f"{value:.4f}" if math.isfinite(value) and abs(value) >= 1e-3 else f"{value:.3e}"


class _RichBar:
    """A rich progress bar: step, loss, samples/s and ETA."""

    def __init__(self, max_steps: int, start_step: int) -> None:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self._progress = Progress(
            TextColumn("step"),
            MofNCompleteColumn(),
            BarColumn(),
            TextColumn("loss {task.fields[loss]}"),
            TextColumn("{task.fields[rate]} samples/s"),
            TextColumn("eta"),
            TimeRemainingColumn(),
        )
        self._task = self._progress.add_task("train", total=max_steps, completed=start_step, loss="-", rate="-")
        self._progress.start()

    def update(self, step: int, loss: float, samples_per_s: float) -> None:
        self._progress.update(self._task, completed=step, loss=_format_value(loss), rate=f"{samples_per_s:.1f}")

    def stop(self) -> None:
        self._progress.stop()
