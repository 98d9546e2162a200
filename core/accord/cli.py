"""The ``accord`` command line (typer). ``accord --help`` lists the commands; each has examples."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, List, Optional

import typer
from rich.console import Console
from rich.table import Table

from accord.config import BenchmarkConfig, ConfigError, load_config, save_resolved, validate_config
from accord.plugins import get_host
from accord.registry import ComponentNotFoundError, PluginNotInstalledError

app = typer.Typer(
    help="accord: contrastive and dense-contrastive pretraining with domain plugins.",
    no_args_is_help=True,
    rich_markup_mode=None,
    pretty_exceptions_enable=False,
)
data_app = typer.Typer(help="Generate sample datasets and validate datasets on disk.", no_args_is_help=True)
app.add_typer(data_app, name="data")

console = Console()
err_console = Console(stderr=True)


def _fail(lines: list[str] | str, code: int = 2) -> None:
    for line in [lines] if isinstance(lines, str) else lines:
        err_console.print(f"[red]error:[/red] {line}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


def _resolve(kind: str, ref: str) -> Any:
    try:
        return get_host().registry(kind).get(ref)
    except (PluginNotInstalledError, ComponentNotFoundError) as exc:
        _fail(str(exc))


def _require_plugin(plugin: str) -> None:
    try:
        get_host().require_plugin(plugin)
    except PluginNotInstalledError as exc:
        _fail(str(exc))


@app.command("plugins")
def plugins_command(
    as_json: bool = typer.Option(False, "--json", help="print JSON for scripts"),
    hook: Optional[str] = typer.Option(None, "--hook", help="only plugins implementing this hook"),
) -> None:
    """List installed plugins with version, domain, tasks and hooks.

    Examples:

        accord plugins

        accord plugins --json

        ACCORD_LOAD_PLUGINS=medssl accord plugins --hook register_tasks
    """
    rows = get_host().describe()
    if hook:
        rows = [r for r in rows if hook in r["hooks"]]
    if as_json:
        typer.echo(json.dumps(rows, indent=2))
        return
    table = Table(title="accord plugins")
    for col in ("name", "version", "domain", "tasks", "components", "hooks"):
        table.add_column(col)
    for r in rows:
        comps = ", ".join(f"{len(v)} {_plural(k, len(v))}" for k, v in r["components"].items())
        hooks = ", ".join(h.removeprefix("register_") for h in r["hooks"])
        table.add_row(r["name"], r["version"], r["domain"], ", ".join(r["tasks"]), comps, hooks)
    console.print(table)


def _plural(word: str, count: int) -> str:
    return word if count == 1 else word + ("es" if word.endswith("s") else "s")


@app.command("run")
def run_command(
    config: Path = typer.Argument(..., help="YAML run config (configs/<plugin>/*.yaml)"),
    overrides: List[str] = typer.Argument(None, help="dotted key=value overrides"),
) -> None:
    """Run the task a config names (plugin + task), after validating the whole config.

    Examples:

        accord run configs/core/pretrain.yaml

        accord run configs/core/pretrain.yaml trainer.max_steps=50 trainer.lr=3e-4 run_dir=runs/x
    """
    try:
        cfg = load_config(config, overrides or [])
    except ConfigError as exc:
        _fail(exc.lines)
    task = _resolve("task", f"{cfg.plugin}.{cfg.task}")
    save_resolved(cfg, cfg.run_dir)
    result = _call_task(task, cfg)
    typer.echo(json.dumps(result, indent=2, default=str))


def _call_task(task: Any, cfg: Any) -> dict[str, Any]:
    try:
        return task.obj(cfg)
    except ConfigError as exc:
        _fail(exc.lines)
    except (FileNotFoundError, ValueError) as exc:
        # Data and input errors from tasks already name the file/field; no traceback needed.
        _fail(str(exc))
    raise AssertionError("unreachable")


def _dataset_component(plugin: str, name: Optional[str]) -> Any:
    _require_plugin(plugin)
    datasets = get_host().datasets.by_plugin(plugin)
    if name:
        return _resolve("dataset", f"{plugin}.{name}")
    if not datasets:
        _fail(f"plugin {plugin!r} registers no dataset format")
    if len(datasets) > 1:
        _fail(f"plugin {plugin!r} has several dataset formats; pick one with --dataset: "
              + ", ".join(d.name for d in datasets))
    return datasets[0]


@data_app.command("synth")
def data_synth(
    plugin: str = typer.Argument(..., help="plugin whose sample dataset to write"),
    out_dir: Path = typer.Argument(..., help="output directory"),
    dataset: Optional[str] = typer.Option(None, "--dataset", help="dataset format, if the plugin has several"),
) -> None:
    """Write a small sample dataset in the plugin's exact on-disk format.

    Examples:

        accord data synth core data/toy

        accord data synth medssl data/msd_phantoms
    """
    comp = _dataset_component(plugin, dataset)
    root = comp.extra["synth"](out_dir)
    typer.echo(f"wrote {comp.qualname} sample dataset to {root}")


@data_app.command("check")
def data_check(
    plugin: str = typer.Argument(..., help="plugin whose format to check against"),
    root: Path = typer.Argument(..., help="dataset root directory"),
    dataset: Optional[str] = typer.Option(None, "--dataset", help="dataset format, if the plugin has several"),
) -> None:
    """Validate a dataset on disk: one line per problem, exit code 1 if any.

    Examples:

        accord data check core data/toy

        accord data check medssl /data/Task09_Spleen
    """
    comp = _dataset_component(plugin, dataset)
    problems = comp.extra["check"](root)
    for problem in problems:
        typer.echo(str(problem))
    if problems:
        err_console.print(f"{len(problems)} problem(s) in {root}", highlight=False)
        raise typer.Exit(1)
    typer.echo(f"{root}: OK ({comp.qualname})")


@app.command("benchmark", context_settings={"ignore_unknown_options": True})
def benchmark_command(
    plugin: str = typer.Argument(..., help="plugin to benchmark (e.g. engine, core, medssl)"),
    data: Optional[Path] = typer.Option(None, "--data", help="dataset root (default: generated sample data)"),
    quick: bool = typer.Option(False, "--quick", help="a few-minute version for demos"),
    out: Optional[Path] = typer.Option(None, "--out", help="output directory (default runs/benchmark-PLUGIN)"),
    options: List[str] = typer.Argument(
        None, help="extra options for the benchmark config: dotted key=value, or --key value / --key=value"
    ),
) -> None:
    """Run a plugin's benchmark task and print its results table.

    Examples:

        accord benchmark engine

        accord benchmark core --quick

        accord benchmark medssl --method alice --data /data/Task09_Spleen

        accord benchmark medssl --quick alice_steps=300 'seeds=[0,1,2]'
    """
    try:
        overrides = flags_as_overrides(options or [])
    except ValueError as exc:
        _fail(str(exc))
    result = run_benchmark(plugin, data=data, quick=quick, out=out, options=overrides)
    typer.echo(result.get("markdown", json.dumps(result, indent=2, default=str)))


def flags_as_overrides(items: list[str]) -> list[str]:
    """Benchmark options as ``key=value`` overrides: ``--alice-steps 300`` and ``--method=alice``
    become ``alice_steps=300`` and ``method=alice``; ``key=value`` items pass unchanged.

    Raises:
        ValueError: a ``--key`` without a value.
    """
    overrides: list[str] = []
    pending: str | None = None
    for item in items:
        if pending is not None:
            overrides.append(f"{pending}={item}")
            pending = None
        elif item.startswith("--"):
            key, has_value, value = item[2:].partition("=")
            key = key.replace("-", "_")
            if has_value:
                overrides.append(f"{key}={value}")
            else:
                pending = key
        else:
            overrides.append(item)
    if pending is not None:
        raise ValueError(f"accord benchmark: option --{pending.replace('_', '-')} needs a value")
    return overrides


def run_benchmark(
    plugin: str, data: Path | None, quick: bool, out: Path | None, options: list[str]
) -> dict[str, Any]:
    """Validate a benchmark config built from CLI options and run the plugin's benchmark task."""
    from accord.config import apply_overrides

    _require_plugin(plugin)
    task = _resolve("task", f"{plugin}.benchmark")
    raw: dict[str, Any] = {
        "plugin": plugin,
        "task": "benchmark",
        "run_dir": str(out or Path("runs") / f"benchmark-{plugin}"),
        "quick": quick,
    }
    if data is not None:
        raw["data"] = str(data)
    model = task.extra["config"]
    try:
        cfg = validate_config(model, apply_overrides(raw, options), source="accord benchmark")
    except ConfigError as exc:
        _fail(exc.lines)
    save_resolved(cfg, cfg.run_dir)
    return _call_task(task, cfg)


@app.command("export")
def export_command(
    checkpoint: Path = typer.Argument(..., help="training checkpoint (.pt) written by accord"),
    format: str = typer.Option(..., "--format", help="export format (see accord plugins: exporters)"),
    out: Path = typer.Option(..., "--out", help="output file"),
) -> None:
    """Export a checkpoint's weights to another framework's format.

    Examples:

        accord export runs/x/checkpoints/step_00000100.pt --format safetensors --out model.safetensors

        accord export runs/alice/checkpoints/step_00001000.pt --format monai --out swinunetr.pt
    """
    if not checkpoint.is_file():
        _fail(f"{checkpoint}: checkpoint file not found")
    exporter = _resolve("exporter", format)
    try:
        written = exporter.obj(checkpoint, out)
    except (ValueError, KeyError) as exc:
        _fail(f"{checkpoint}: {exc}")
    typer.echo(f"wrote {written}")


@app.command("schema")
def schema_command(
    ref: Optional[str] = typer.Argument(None, help="'plugin.task' or a config schema name; default all"),
) -> None:
    """Print JSON Schema of task configs and registered config schemas.

    Examples:

        accord schema core.pretrain

        accord schema > accord-schema.json
    """
    host = get_host()
    models = {f"task {t.qualname}": t.extra["config"] for t in host.tasks}
    models.update({f"schema {s.qualname}": s.obj for s in host.config_schemas})
    if ref:
        models = {k: v for k, v in models.items() if k.split(" ", 1)[1] == ref}
        if not models:
            _fail(f"no task or config schema named {ref!r}")
    typer.echo(json.dumps({k: v.model_json_schema() for k, v in models.items()}, indent=2))


@app.command("demo")
def demo_command(
    plugin: List[str] = typer.Option(None, "--plugin", help="plugins to demo (repeatable); default: all installed"),
    out: Path = typer.Option(Path("runs/demo"), "--out", help="output directory"),
) -> None:
    """Run each plugin's quick benchmark on generated data and write OUT/summary.md.

    Examples:

        accord demo

        accord demo --plugin medssl --out runs/demo-medssl
    """
    from accord.demo import run_demo

    host = get_host()
    requested = [p for p in (plugin or []) if p]
    for name in requested:
        _require_plugin(name)
    # The core pipeline always runs (it shows the engine end to end in seconds); the engine
    # micro-benchmark measures kernels, not a pipeline, so the demo leaves it out.
    installed = [r["name"] for r in host.describe() if r["name"] != "engine"]
    selected = list(dict.fromkeys(["core", *(requested or installed)]))
    without = [p for p in selected if p not in [t.plugin for t in host.tasks if t.name == "benchmark"]]
    summary = run_demo([p for p in selected if p not in without], out, without_pipeline=without)
    typer.echo(f"wrote {summary}")


def main() -> None:
    """Console-script entry point: loads plugin commands, then runs the app."""
    get_host().add_commands(app)
    app()


if __name__ == "__main__":
    sys.exit(main())
