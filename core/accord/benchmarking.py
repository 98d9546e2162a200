"""Benchmarks: the typed result, the one place results are written, and the pipeline protocol.

A plugin registers benchmarks with the ``register_benchmarks`` hook (:mod:`accord.hookspecs`):
``register(name, run, *, config, kind="pipeline", description="")`` where ``run(config)`` returns a
:class:`BenchmarkResult` and ``config`` subclasses :class:`accord.config.BenchmarkConfig`.

* ``kind="pipeline"``: the plugin's end-to-end comparison, ``accord benchmark PLUGIN`` (and, with
  ``--quick``, ``accord demo``). Its ``run`` is usually :func:`run_pipeline` on a
  :class:`PipelineSpec`: the plugin declares its data, pretraining, downstream runs, initialisations,
  groups and metric, and the runner does the rest (presets, sample data, data check, loops, tables,
  plot).
* ``kind="speed"``: a throughput / memory / quality measurement, ``accord benchmark PLUGIN --speed
  NAME``; its ``run`` usually returns :meth:`BenchmarkResult.measured`.

:func:`run_benchmark` runs either kind: it times ``run``, records the command line that reproduces
the result and writes ``results.md`` and ``results.json`` to the config's ``run_dir``, once.
"""

from __future__ import annotations

import dataclasses
import json
import re
import shlex
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from accord.config import BenchmarkConfig, apply_overrides, save_resolved, validate_config
from accord.registry import Component, ComponentNotFoundError
from accord.report import bar_chart, format_mean_std, markdown_table, mean_std
from accord.utils.files import write_text_atomically

__all__ = [
    "KINDS",
    "BenchmarkResult",
    "DownstreamRun",
    "Group",
    "PipelineSpec",
    "ResultTable",
    "benchmark_config",
    "benchmark_kind",
    "benchmarks_of",
    "find_benchmark",
    "preset",
    "run_benchmark",
    "run_pipeline",
]

Kind = Literal["pipeline", "speed"]
#: The benchmark kinds ``register(..., kind=...)`` accepts.
KINDS: tuple[str, ...] = ("pipeline", "speed")
#: Keys of :class:`~accord.config.BenchmarkConfig` the command line sets through its own flags.
_FLAG_FIELDS = frozenset({"plugin", "task", "run_dir", "quick", "data"})


# --- the result ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class ResultTable:
    """One table of a result.

    Attributes:
        title: one line above the table.
        header: column names.
        rows: one list of cells per line (already formatted, or plain numbers).
    """

    title: str
    header: list[str]
    rows: list[list[Any]]

    def markdown(self) -> str:
        """The bold title and a GitHub markdown table."""
        return f"**{self.title}**\n\n{markdown_table(self.header, self.rows)}"

    @classmethod
    def measurements(cls, title: str, values: Mapping[str, Any]) -> ResultTable:
        """A two-column ``measurement | value`` table; nested mappings become dotted names.

        Floats keep four significant digits.
        """
        return cls(title, ["measurement", "value"], [[name, _cell(value)] for name, value in _flatten(values)])


def _flatten(values: Mapping[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    items: list[tuple[str, Any]] = []
    for name, value in values.items():
        if isinstance(value, Mapping):
            items += _flatten(value, f"{prefix}{name}.")
        else:
            items.append((f"{prefix}{name}", value))
    return items


def _cell(value: Any) -> Any:
    return f"{value:.4g}" if isinstance(value, float) else value


@dataclass(frozen=True)
class BenchmarkResult:
    """What every benchmark returns; :func:`run_benchmark` fills ``command`` and ``wall_time_s``.

    Attributes:
        title: what was compared or measured, on what data.
        tables: the result tables, the headline first.
        rows: the raw per-run records (JSON-serialisable), for anyone who wants other statistics.
        plots: image files written by the benchmark, inside its ``run_dir``.
        paper: the published numbers to compare with, if any.
        notes: sentences a reader needs to read the tables (settings, caveats).
        command: the command line that reproduces this result.
        wall_time_s: seconds the benchmark ran.
        conditions: torch threads, CPUs and load averages when it finished
            (:func:`accord.utils.timing.machine_state`): a load above the CPU count means other jobs
            shared the cores and the wall time is not the benchmark's alone.
    """

    title: str
    tables: list[ResultTable]
    rows: list[dict[str, Any]] = field(default_factory=list)
    plots: list[Path] = field(default_factory=list)
    paper: ResultTable | None = None
    notes: list[str] = field(default_factory=list)
    command: str = ""
    wall_time_s: float | None = None
    conditions: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def measured(cls, title: str, values: Mapping[str, Any], notes: Sequence[str] = ()) -> BenchmarkResult:
        """The result of a speed benchmark that returns one mapping of numbers (nested allowed)."""
        return cls(title, [ResultTable.measurements("Measurements", values)], rows=[dict(values)], notes=list(notes))

    def markdown(self, level: int = 1) -> str:
        """Title (a heading of ``level``), tables, notes, paper numbers, command line and wall time."""
        parts = [f"{'#' * level} {self.title}", *(table.markdown() for table in self.tables), *self.notes]
        if self.paper is not None:
            parts.append(self.paper.markdown())
        if self.command:
            ran = [] if self.wall_time_s is None else [f"{self.wall_time_s / 60:.1f} min"]
            if self.conditions:
                ran.append(f"{self.conditions['torch_threads']} torch threads on {self.conditions['cpus']} CPUs, "
                           f"load {self.conditions['load_5min']:.1f}")
            when = f" ({'; '.join(ran)})" if ran else ""
            parts.append(f"Reproduce{when}: `{self.command}`")
        return "\n\n".join(parts) + "\n"

    def to_json(self) -> dict[str, Any]:
        """A JSON-serialisable dict of every field (paths as strings)."""
        return json.loads(json.dumps(dataclasses.asdict(self), default=str))


def _write(result: BenchmarkResult, run_dir: Path) -> None:
    write_text_atomically(run_dir / "results.md", result.markdown())
    write_text_atomically(run_dir / "results.json", json.dumps(result.to_json(), indent=2))


# --- finding and running registered benchmarks ---------------------------------------------------


def benchmark_kind(component: Component[Any]) -> str:
    """``"pipeline"`` or ``"speed"``: the ``kind`` a benchmark was registered with.

    Raises:
        TypeError: an unknown kind, or a ``config`` that is not a :class:`BenchmarkConfig` subclass.
    """
    kind = component.extra.get("kind", "pipeline")
    if kind not in KINDS:
        raise TypeError(f"plugin {component.plugin!r}: benchmark {component.name!r} has kind {kind!r}; "
                        f"expected one of {', '.join(KINDS)}")
    config = component.extra.get("config")
    if not (isinstance(config, type) and issubclass(config, BenchmarkConfig)):
        raise TypeError(f"plugin {component.plugin!r}: benchmark {component.name!r} needs "
                        "config=<a subclass of accord.config.BenchmarkConfig>")
    return kind


def benchmarks_of(plugin: str, kind: Kind) -> list[Component[Any]]:
    """The benchmarks of ``kind`` that ``plugin`` registers, in registration order.

    Raises:
        PluginNotInstalledError: ``plugin`` is not loaded.
    """
    from accord.plugins import get_host

    host = get_host()
    host.require_plugin(plugin)
    return [c for c in host.benchmarks.by_plugin(plugin) if benchmark_kind(c) == kind]


def find_benchmark(plugin: str, name: str | None = None, kind: Kind = "pipeline") -> Component[Any]:
    """The benchmark ``plugin.name`` of ``kind``; without ``name``, the plugin's only one of that kind, or
    the one of several registered with ``default=True``.

    Raises:
        PluginNotInstalledError: ``plugin`` is not loaded.
        ComponentNotFoundError: no such benchmark, one of the other kind, or several to choose from.
    """
    candidates = benchmarks_of(plugin, kind)
    other: Kind = "speed" if kind == "pipeline" else "pipeline"
    others = [c.name for c in benchmarks_of(plugin, other)]

    def listing(of: Kind, names: list[str]) -> str:
        flag = " --speed" if of == "speed" else ""
        return f"its {of} benchmarks: {', '.join(names)} (accord benchmark {plugin}{flag} NAME)"

    if name is None:
        defaults = [c for c in candidates if c.extra.get("default")]
        if len(candidates) == 1 or len(defaults) == 1:
            return candidates[0] if len(candidates) == 1 else defaults[0]
        if candidates:
            raise ComponentNotFoundError(f"plugin {plugin!r} has several {kind} benchmarks; name one: "
                                         + listing(kind, [c.name for c in candidates]))
        raise ComponentNotFoundError(f"plugin {plugin!r} has no {kind} benchmark"
                                     + (f"; {listing(other, others)}" if others else ""))
    match = next((c for c in candidates if c.name == name), None)
    if match is None:
        hint = f"; it is a {other} benchmark" if name in others else ""
        names = ", ".join(c.name for c in candidates) or "(none)"
        raise ComponentNotFoundError(f"plugin {plugin!r} has no {kind} benchmark {name!r}{hint}; "
                                     f"its {kind} benchmarks: {names}")
    return match


def benchmark_config(
    component: Component[Any],
    *,
    data: Path | None = None,
    quick: bool = False,
    out: Path | None = None,
    options: Sequence[str] = (),
) -> BenchmarkConfig:
    """Validate the config of a benchmark from command-line style settings.

    Args:
        component: a registered benchmark.
        data: dataset root (None: the benchmark generates sample data, if it reads any).
        quick: the benchmark's minutes-long preset.
        out: ``run_dir``; default ``runs/benchmark-PLUGIN`` (pipeline) or
            ``runs/benchmark-PLUGIN-NAME`` (speed).
        options: dotted ``key=value`` overrides of the benchmark's config fields.

    Raises:
        ConfigError: one line per invalid or unknown option.
    """
    default_out = f"benchmark-{component.plugin}"
    if benchmark_kind(component) == "speed":
        default_out += f"-{component.name}"
    raw: dict[str, Any] = {"plugin": component.plugin, "run_dir": str(out or Path("runs") / default_out),
                           "quick": quick}
    if data is not None:
        raw["data"] = str(data)
    return validate_config(component.extra["config"], apply_overrides(raw, list(options)), source="accord benchmark")


def preset(cfg: BenchmarkConfig, name: str, quick: Any) -> Any:
    """Option ``name`` of ``cfg``: as given; else ``quick`` under ``--quick``; else its default.

    Benchmarks use it for their quick presets, as :meth:`BenchmarkConfig.run_seeds` does for seeds,
    so that ``--quick steps=50`` keeps the 50.
    """
    return getattr(cfg, name) if name in cfg.model_fields_set or not cfg.quick else quick


def _command(component: Component[Any], cfg: BenchmarkConfig) -> str:
    """The ``accord benchmark`` command line that runs ``component`` with ``cfg`` again."""
    words = ["accord", "benchmark", cfg.plugin]
    words += ["--speed", component.name] if benchmark_kind(component) == "speed" else [component.name]
    if cfg.quick:
        words.append("--quick")
    if cfg.data is not None:
        words += ["--data", str(cfg.data)]
    words += ["--out", str(cfg.run_dir)]
    for name in sorted(cfg.model_fields_set - _FLAG_FIELDS):
        value = getattr(cfg, name)
        dumped = value.model_dump(mode="json") if hasattr(value, "model_dump") else value
        text = dumped if isinstance(dumped, str) else json.dumps(dumped, default=str, separators=(",", ":"))
        words.append(f"{name}={text}")
    return shlex.join(words)


def run_benchmark(component: Component[Any], cfg: BenchmarkConfig) -> BenchmarkResult:
    """Run a registered benchmark, then write its ``results.md`` and ``results.json`` once.

    The resolved config goes to ``run_dir/config.yaml`` first. The benchmark runs with
    ``cfg.threads`` torch threads (None: as they are), and the result records the threads and load
    it ran with (:attr:`BenchmarkResult.conditions`).

    Raises:
        TypeError: the benchmark returned something other than a :class:`BenchmarkResult`.
    """
    from accord.utils.timing import machine_state, torch_threads  # torch: only when a benchmark runs

    save_resolved(cfg, cfg.run_dir)
    started = time.perf_counter()
    with torch_threads(cfg.threads):
        result = component.obj(cfg)
        conditions = machine_state()
    if not isinstance(result, BenchmarkResult):
        raise TypeError(f"benchmark {component.qualname} returned {type(result).__name__}, "
                        "expected accord.benchmarking.BenchmarkResult")
    result = dataclasses.replace(result, command=_command(component, cfg), wall_time_s=time.perf_counter() - started,
                                 conditions=conditions)
    _write(result, cfg.run_dir)
    return result


# --- the pipeline protocol -----------------------------------------------------------------------


@dataclass(frozen=True)
class Group:
    """One group of downstream runs (a column of bars): a label fraction, a protocol, ...

    Attributes:
        label: the value in the group column of tables, plot and rows (JSON: a number or a string).
        options: whatever the plugin's ``downstream`` needs for this group (e.g. a protocol's trainer).
    """

    label: float | int | str
    options: Any = None


@dataclass(frozen=True)
class DownstreamRun:
    """One downstream run the protocol asks the plugin for.

    Attributes:
        data: the (checked) dataset root.
        run_dir: a directory of its own, ``RUN_DIR/downstream/<group>/<init>_seed<seed>``.
        group: the group it belongs to.
        init: the initialisation's name (one of :attr:`PipelineSpec.inits`).
        checkpoint: the pretraining checkpoint for the pretrained initialisation; None for the others.
        seed: the run's seed (pass it as the sub-task's ``seed``).
    """

    data: Path
    run_dir: Path
    group: Group
    init: str
    checkpoint: Path | None
    seed: int


@dataclass(frozen=True)
class PipelineSpec:
    """What a plugin's pipeline benchmark is made of; :func:`run_pipeline` does the rest.

    Run pretraining and downstream sub-tasks through :func:`accord.runs.run_task`, with the seed
    they are given as the task config's ``seed``.

    Attributes:
        title: what is compared, e.g. ``"medssl: Alice vs random initialisation"``.
        dataset: the registered dataset (``"plugin.name"``) whose ``synth`` writes sample data when
            no ``data`` is given and whose ``check`` must pass before anything runs.
        pretrain: ``pretrain(data, run_dir, seed) -> checkpoint``.
        downstream: ``downstream(run) -> row | [row, ...]``; a row is a JSON-serialisable dict with the
            ``metric`` (a fraction, e.g. 0.42) and anything else worth keeping. The runner adds the
            group label, ``init`` and ``seed`` unless the row sets them (a row may name another
            group, e.g. the same run scored with test-time voting).
        groups: ``groups(data)``: the downstream groups for that dataset, in table order.
        metric: the row key compared, e.g. ``"dice"``.
        metric_title: how tables name it, e.g. ``"test Dice (%)"``.
        synth_options: keyword arguments of the dataset's ``synth`` (sizes of the sample, its seed).
        group: the name of the group column, e.g. ``"label_fraction"``.
        inits: initialisations compared, in table order.
        pretrained_init: the one that starts from the pretraining checkpoint; the others start
            from random weights.
        seed_independent_pretraining: pretrain once (with the benchmark's ``seed``) and start every
            seed's downstream runs from it, where pretraining per seed would cost too much; the
            result says so in a note.
        per_class_key: a row key holding ``{class: score or None}``; adds a per-class mean ± std table.
        per_class_title: that table's title.
        paper: the published numbers.
        notes: sentences printed under the tables.
        scale: display multiplier of ``metric`` and per-class scores (100: percent).
    """

    title: str
    dataset: str
    pretrain: Callable[[Path, Path, int], Path]
    downstream: Callable[[DownstreamRun], dict[str, Any] | list[dict[str, Any]]]
    groups: Callable[[Path], Sequence[Group]]
    metric: str
    metric_title: str
    synth_options: Mapping[str, Any] = field(default_factory=dict)
    group: str = "label_fraction"
    inits: tuple[str, ...] = ("random", "pretrained")
    pretrained_init: str = "pretrained"
    seed_independent_pretraining: bool = False
    per_class_key: str | None = None
    per_class_title: str = "Per-class scores (%), mean ± std over seeds"
    paper: ResultTable | None = None
    notes: tuple[str, ...] = ()
    scale: float = 100.0


def _checked_data(cfg: BenchmarkConfig, spec: PipelineSpec) -> Path:
    """``cfg.data``, or sample data written by the dataset's ``synth``; either must pass its ``check``.

    Raises:
        ValueError: the check found problems (one line each, naming the file).
    """
    from accord.plugins import get_host

    dataset = get_host().datasets.get(spec.dataset)
    data = cfg.data
    if data is None:
        data = Path(dataset.extra["synth"](cfg.run_dir / "data", **spec.synth_options))
    problems = dataset.extra["check"](data)
    if problems:
        raise ValueError(f"{data}: not a valid {dataset.qualname} dataset ({len(problems)} problem(s)):\n"
                         + "\n".join(map(str, problems)))
    return data


def _folder(label: float | int | str) -> str:
    """A directory name for a group label ("fine-tuning 25%" -> "fine-tuning_25")."""
    return re.sub(r"[^\w.-]+", "_", str(label)).strip("_") or "group"


def run_pipeline(cfg: BenchmarkConfig, spec: PipelineSpec) -> BenchmarkResult:
    """The pipeline protocol: data, pretraining, downstream runs over groups x inits x seeds, tables.

    1. ``cfg.data`` or sample data from the dataset's ``synth`` (under ``run_dir/data``), then its
       ``check``; a dataset with problems is refused before anything trains.
    2. Pretraining per seed (``run_dir/pretrain/seed<s>``), or once with ``cfg.seed``
       (``run_dir/pretrain``) when the spec says it is seed-independent.
    3. For every group, initialisation and seed (``cfg.run_seeds()``) one ``spec.downstream`` run.
    4. Mean ± std of ``spec.metric`` per (group, init) as the headline table and a bar chart with
       error bars (``run_dir/results.png``); per-class mean ± std when the spec names a key.

    Returns:
        The result; :func:`run_benchmark` writes it.

    Raises:
        ValueError: the dataset check failed (every problem listed).
    """
    data = _checked_data(cfg, spec)
    seeds = cfg.run_seeds()
    if spec.seed_independent_pretraining:
        shared = spec.pretrain(data, cfg.run_dir / "pretrain", cfg.seed)
        checkpoints = {seed: shared for seed in seeds}
    else:
        checkpoints = {seed: spec.pretrain(data, cfg.run_dir / "pretrain" / f"seed{seed}", seed) for seed in seeds}
    rows: list[dict[str, Any]] = []
    for group in spec.groups(data):
        for init in spec.inits:
            for seed in seeds:
                run_dir = cfg.run_dir / "downstream" / _folder(group.label) / f"{init}_seed{seed}"
                run = DownstreamRun(data=data, run_dir=run_dir, group=group, init=init, seed=seed,
                                    checkpoint=checkpoints[seed] if init == spec.pretrained_init else None)
                produced = spec.downstream(run)
                for row in produced if isinstance(produced, list) else [produced]:
                    rows.append({spec.group: group.label, "init": init, "seed": seed, **row})
    where = "generated sample data" if cfg.data is None else str(cfg.data)
    title = f"{spec.title} ({where}{', quick' if cfg.quick else ''})"
    summary = _summary(rows, spec)
    headline = ResultTable(
        f"{spec.metric_title[:1].upper()}{spec.metric_title[1:]}, mean ± std over seeds",
        [spec.group, "init", f"{spec.metric} (mean ± std)", "seeds"],
        [[row[spec.group], row["init"], f"{row['mean']:.2f} ± {row['std']:.2f}", row["n"]] for row in summary])
    tables = [headline] + ([_per_class_table(rows, spec)] if spec.per_class_key else [])
    plot = bar_chart(summary, cfg.run_dir / "results.png", group=spec.group, series="init",
                     ylabel=spec.metric_title, title=title)
    notes = list(spec.notes)
    if spec.seed_independent_pretraining:
        notes.append(f"Pretrained once (seed {cfg.seed}); every seed's downstream runs start from that checkpoint.")
    return BenchmarkResult(title=title, tables=tables, rows=rows, plots=[plot], paper=spec.paper, notes=notes)


def _runs_by_bar(rows: list[dict[str, Any]], spec: PipelineSpec) -> dict[tuple[Any, str], list[dict[str, Any]]]:
    """Rows per (group, init): groups in first-seen order, within a group the spec's init order."""
    bars: dict[tuple[Any, str], list[dict[str, Any]]] = {}
    for row in rows:
        bars.setdefault((row[spec.group], row["init"]), []).append(row)
    groups = list(dict.fromkeys(group for group, _ in bars))
    inits = list(dict.fromkeys([*spec.inits, *(init for _, init in bars)]))
    return dict(sorted(bars.items(), key=lambda bar: (groups.index(bar[0][0]), inits.index(bar[0][1]))))


def _summary(rows: list[dict[str, Any]], spec: PipelineSpec) -> list[dict[str, Any]]:
    """Per (group, init): mean and std of the scaled metric over seeds, and how many runs."""
    summary = []
    for (group, init), runs in _runs_by_bar(rows, spec).items():
        mean, std = mean_std([float(run[spec.metric]) * spec.scale for run in runs])
        summary.append({spec.group: group, "init": init, "mean": mean, "std": std, "n": len(runs)})
    return summary


def _per_class_table(rows: list[dict[str, Any]], spec: PipelineSpec) -> ResultTable:
    """Per (group, init): mean ± std over seeds of each class's score (classes scored in no run: n/a)."""
    key = spec.per_class_key
    classes = list(dict.fromkeys(name for row in rows for name in row[key]))
    lines = []
    for (group, init), runs in _runs_by_bar(rows, spec).items():
        cells = [format_mean_std([run[key][name] for run in runs if run[key].get(name) is not None], spec.scale)
                 for name in classes]
        lines.append([group, init, *cells])
    return ResultTable(spec.per_class_title, [spec.group, "init", *classes], lines)
