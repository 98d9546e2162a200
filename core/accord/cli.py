"""The ``accord`` command line (typer). ``accord --help`` lists the commands; each has examples.

User errors (:class:`accord.errors.UserError`, and the data errors tasks raise as ``ValueError`` /
``FileNotFoundError``) are printed as one ``error:`` line and exit 2; anything else is a bug and
keeps its traceback. ``accord --debug COMMAND`` shows the traceback for user errors too.
"""

from __future__ import annotations

import contextlib
import json
import logging
import sys
import warnings
from functools import partial
from pathlib import Path
from typing import Any, Callable, Iterator, List, NoReturn, Optional, TypeVar

import typer
from rich.console import Console
from rich.table import Table

from accord.config import ConfigError, load_config
from accord.errors import UserError
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


#: Set by ``accord --debug`` for one invocation: user errors are raised with their traceback.
_debug = False


# Options given before the command. No docstring: typer would show it as the help of `accord`.
@app.callback()
def _options(
    context: typer.Context,
    debug: bool = typer.Option(False, "--debug", help="show the traceback of every error, user errors included"),
) -> None:
    _set_debug(debug)
    # Scoped to this invocation, so it never leaks into the next one in the same process (tests).
    context.call_on_close(partial(_set_debug, False))


def _set_debug(value: bool) -> None:
    """Turn ``--debug`` behaviour on or off."""
    global _debug
    _debug = value


@contextlib.contextmanager
def user_errors(*also: type[BaseException]) -> Iterator[None]:
    """For plugin commands (``register_commands``): report a :class:`UserError` (and the ``also``
    types) raised inside as one ``error:`` line and exit 2, as the core commands do; ``accord
    --debug`` shows its traceback."""
    try:
        yield
    except (UserError, *also) as exc:
        _user_error(exc)


def _fail(lines: list[str] | str, code: int = 2) -> NoReturn:
    for line in [lines] if isinstance(lines, str) else lines:
        err_console.print(f"[red]error:[/red] {line}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


def _user_error(exc: BaseException, lines: list[str] | str | None = None) -> NoReturn:
    """Report an exception being handled as one line each of ``lines`` (default its message), exit 2;
    under ``--debug`` re-raise it with its traceback instead. Call only inside ``except``."""
    if _debug:
        raise exc
    _fail(lines if lines is not None else getattr(exc, "lines", None) or str(exc))


def _resolve(kind: str, ref: str) -> Any:
    try:
        return get_host().registry(kind).get(ref)
    except (PluginNotInstalledError, ComponentNotFoundError) as exc:
        _user_error(exc)


def _require_plugin(plugin: str) -> None:
    try:
        get_host().require_plugin(plugin)
    except PluginNotInstalledError as exc:
        _user_error(exc)


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
        # Names, not counts: `accord export --format` and `accord benchmark` take these names.
        comps = "\n".join(f"{_plural(k, len(v))}: {', '.join(v)}" for k, v in r["components"].items())
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
        _user_error(exc)
    from accord.runs import run_task  # imports torch: not needed by the other commands

    _resolve("task", f"{cfg.plugin}.{cfg.task}")
    result = _call_task(run_task, cfg)
    typer.echo(json.dumps(result, indent=2, default=str))


T = TypeVar("T")


def _call_task(run: Callable[[Any], T], cfg: Any) -> T:
    """``run(cfg)`` with user errors reported as one line each, without a traceback."""
    try:
        return run(cfg)
    except (UserError, FileNotFoundError, ValueError) as exc:
        # Data and input errors from tasks already name the file/field; no traceback needed.
        _user_error(exc)


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
    out_dir: Path = typer.Argument(..., help="output directory: new or empty (else see --overwrite)"),
    dataset: Optional[str] = typer.Option(None, "--dataset", help="dataset format, if the plugin has several"),
    overwrite: bool = typer.Option(
        False, "--overwrite", help="write into a non-empty out_dir, replacing files of the same name (others stay)"
    ),
    options: List[str] = typer.Argument(
        None, help="the generator's options as key=value (e.g. num_train=20); see the plugin's docs"
    ),
) -> None:
    """Write a small sample dataset in the plugin's exact on-disk format.

    Refuses an out_dir that is a file, or a directory that already holds files unless --overwrite:
    the sample would silently replace a dataset's index files (dataset.json, tables).

    Examples:

        accord data synth core data/toy

        accord data synth medssl data/msd_phantoms num_train=20
    """
    comp = _dataset_component(plugin, dataset)
    if out_dir.exists() and not out_dir.is_dir():
        _fail(f"{out_dir}: exists and is not a directory; the sample dataset needs a new or empty directory")
    if not overwrite and out_dir.is_dir() and any(out_dir.iterdir()):
        _fail(f"{out_dir}: directory is not empty; choose a new or empty one, or pass --overwrite to write into it")
    kwargs = _plugin_options(options, f"accord data synth {plugin}")
    try:
        root = comp.extra["synth"](out_dir, **kwargs)
    except OSError as exc:  # unwritable place, a file where a folder goes, disk full: the user's to fix
        _user_error(exc, f"{exc.filename or out_dir}: cannot write the sample dataset ({exc.strerror or exc})")
    except (UserError, ValueError) as exc:
        _user_error(exc)
    except TypeError as exc:  # an option the plugin's generator does not take
        _user_error(exc, f"accord data synth {plugin}: {exc}")
    typer.echo(f"wrote {comp.qualname} sample dataset to {root}")


def _plugin_options(options: list[str] | None, source: str) -> dict[str, Any]:
    """``key=value`` arguments as keyword arguments (values parsed as YAML)."""
    from accord.config import apply_overrides

    try:
        return apply_overrides({}, options or [], source=source)
    except ConfigError as exc:
        _user_error(exc)


@data_app.command("check")
def data_check(
    plugin: str = typer.Argument(..., help="plugin whose format to check against"),
    root: Path = typer.Argument(..., help="dataset root directory"),
    dataset: Optional[str] = typer.Option(None, "--dataset", help="dataset format, if the plugin has several"),
    options: List[str] = typer.Argument(
        None, help="what the data must serve, as key=value for the plugin's check (e.g. version=v1.0-trainval)"
    ),
) -> None:
    """Validate a dataset on disk: one line per problem, exit code 1 if any.

    Examples:

        accord data check core data/toy

        accord data check medssl /data/Task09_Spleen

        accord data check superflow /data/nuscenes version=v1.0-trainval 'splits=[train, val]'
    """
    comp = _dataset_component(plugin, dataset)
    kwargs = _plugin_options(options, "accord data check")
    try:
        problems = comp.extra["check"](root, **kwargs)
    except UserError as exc:
        _user_error(exc)
    except TypeError as exc:  # an option the plugin's check does not take
        _user_error(exc, f"accord data check {plugin}: {exc}")
    for problem in problems:
        typer.echo(str(problem))
    if problems:
        err_console.print(f"{len(problems)} problem(s) in {root}", highlight=False)
        raise typer.Exit(1)
    typer.echo(f"{root}: OK ({comp.qualname})")


@data_app.command("convert")
def data_convert(
    plugin: str = typer.Argument(..., help="plugin whose format to convert"),
    source: Path = typer.Argument(..., help="the dataset as distributed (e.g. an MS-CXR root)"),
    out_dir: Path = typer.Argument(..., help="output directory for the files training reads"),
    dataset: Optional[str] = typer.Option(None, "--dataset", help="dataset format, if the plugin has several"),
    options: List[str] = typer.Argument(None, help="the converter's options as key=value (e.g. images=/data/jpg)"),
) -> None:
    """Convert a dataset as distributed into the files a plugin trains on; refuses data with problems.

    Examples:

        accord data convert medrpg /data/ms-cxr data/mscxr images=/data/mimic-cxr-jpg

        accord data synth medrpg data/synth && accord data convert medrpg data/synth data/synth-jsonl
    """
    comp = _dataset_component(plugin, dataset)
    convert = comp.extra.get("convert")
    if convert is None:
        _fail(f"{comp.qualname} has no converter: its training reads the data as distributed")
    kwargs = _plugin_options(options, f"accord data convert {plugin}")
    try:
        summary = convert(source, out_dir, **kwargs)
    except OSError as exc:
        _user_error(exc, f"{exc.filename or out_dir}: cannot write the converted dataset ({exc.strerror or exc})")
    except (UserError, ValueError) as exc:
        _user_error(exc)
    except TypeError as exc:  # an option the plugin's converter does not take
        _user_error(exc, f"accord data convert {plugin}: {exc}")
    typer.echo(summary)


@app.command("benchmark", context_settings={"ignore_unknown_options": True})
def benchmark_command(
    plugin: str = typer.Argument(..., help="plugin to benchmark (e.g. core, medssl, superflow, engine)"),
    data: Optional[Path] = typer.Option(None, "--data", help="dataset root (default: generated sample data)"),
    quick: bool = typer.Option(False, "--quick", help="a few-minute version for demos"),
    speed: bool = typer.Option(
        False, "--speed", help="a speed benchmark, named as the first argument; without a name, list them"
    ),
    out: Optional[Path] = typer.Option(
        None, "--out", help="output directory (default runs/benchmark-PLUGIN, speed: runs/benchmark-PLUGIN-NAME)"
    ),
    options: List[str] = typer.Argument(
        None,
        help="[NAME] (needed only where a plugin has several benchmarks of the kind), then options for the "
        "benchmark config: dotted key=value, or --key value / --key=value",
    ),
) -> None:
    """Run a plugin's pipeline benchmark (or a speed benchmark) and print its result tables.

    The pipeline benchmark compares the plugin's pretraining with random initialisation on a
    downstream task; --speed runs a throughput or memory measurement. Results go to OUT/results.md
    and OUT/results.json, with the command line that reproduces them.

    Examples:

        accord benchmark core --quick

        accord benchmark medssl --method alice --data /data/Task09_Spleen

        accord benchmark medssl --quick alice_steps=300 'seeds=[0,1,2]'

        accord benchmark medssl --speed

        accord benchmark engine --speed tiled_infonce --quick
    """
    from accord.benchmarking import benchmark_config, benchmarks_of, find_benchmark, run_benchmark

    items = list(options or [])
    # A leading word that is neither a flag nor key=value names the benchmark.
    name = items.pop(0) if items and not items[0].startswith("-") and "=" not in items[0] else None
    kind = "speed" if speed else "pipeline"
    try:
        if speed and name is None:
            _list_speed_benchmarks(plugin, benchmarks_of(plugin, "speed"))
            return
        component = find_benchmark(plugin, name, kind)
        cfg = benchmark_config(component, data=data, quick=quick, out=out, options=flags_as_overrides(items))
    except ConfigError as exc:
        _user_error(exc)
    except (PluginNotInstalledError, ComponentNotFoundError, ValueError) as exc:
        _user_error(exc)
    result = _call_task(partial(run_benchmark, component), cfg)
    typer.echo(result.markdown())


def _list_speed_benchmarks(plugin: str, components: list[Any]) -> None:
    if not components:
        typer.echo(f"plugin {plugin!r} registers no speed benchmark")
        return
    table = Table(title=f"speed benchmarks of {plugin}: accord benchmark {plugin} --speed NAME [--quick]")
    table.add_column("name")
    table.add_column("description")
    for component in components:
        table.add_row(component.name, component.description)
    console.print(table)


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
    if out.is_dir():
        _fail(f"{out}: is a directory; --out takes the name of the file to write")
    exporter = _resolve("exporter", format)
    try:
        written = exporter.obj(checkpoint, out)
    except OSError as exc:  # unwritable directory, a file where a folder goes, disk full: the user's to fix
        _user_error(exc, f"{exc.filename or out}: cannot write the export ({exc.strerror or exc})")
    except (UserError, ValueError, KeyError) as exc:
        message = str(exc)
        _user_error(exc, message if message.startswith(str(checkpoint)) else f"{checkpoint}: {message}")
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
    threads: Optional[int] = typer.Option(
        None, "--threads", min=1, help="torch threads of every benchmark (default: torch's); 1 is often faster "
        "when other jobs share the cores"),
) -> None:
    """Run each plugin's quick pipeline benchmark on generated data and write OUT/summary.md.

    Examples:

        accord demo

        accord demo --plugin medssl --out runs/demo-medssl --threads 1
    """
    from accord.demo import run_demo

    requested = [p for p in (plugin or []) if p]
    for name in requested:
        _require_plugin(name)
    # The core pipeline always runs (it shows the engine end to end in seconds); the engine plugin
    # has speed benchmarks only (kernels, not a pipeline), so the demo leaves it out.
    installed = [name for name in get_host().plugin_names() if name != "engine"]
    selected = list(dict.fromkeys(["core", *(requested or installed)]))
    summary = _call_task(partial(run_demo, selected, threads=threads), out)
    typer.echo(f"wrote {summary}")


def main() -> None:
    """Console-script entry point: loads plugin commands, then runs the app."""
    import pluggy

    try:
        host = get_host()
    except pluggy.PluginValidationError as exc:
        # A plugin written for another accord version: its message says which hook and what to do.
        err_console.print(f"[red]error:[/red] {exc}", highlight=False, soft_wrap=True)
        raise SystemExit(2) from None
    host.add_commands(app)
    _show_accord_logs()
    app()


def _show_accord_logs() -> None:
    """Print accord's and its plugins' INFO lines (the phases of a run: resuming, caching, probing)
    and every library's warnings on stderr; other libraries' INFO chatter stays hidden."""
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(lambda record: record.levelno >= logging.WARNING or record.name.startswith("accord"))
    handler.setFormatter(_LevelPrefixFormatter())
    logging.basicConfig(level=logging.INFO, handlers=[handler])
    # MONAI warns at every DICOM-capable reader's creation that its optional GPU decoder is missing;
    # on a CPU install that is expected and says nothing about the run.
    logging.getLogger("monai.data.nvimgcodec_pydicom_plugin").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", message="NvImgCodecPydicomReader: nvImageCodec decoder plugin", category=UserWarning)


class _LevelPrefixFormatter(logging.Formatter):
    """``message`` for INFO, ``warning: message`` (``error: ...``) above it."""

    def format(self, record: logging.LogRecord) -> str:
        message = super().format(record)
        return message if record.levelno <= logging.INFO else f"{record.levelname.lower()}: {message}"


if __name__ == "__main__":
    sys.exit(main())
