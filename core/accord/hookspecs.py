"""The accord hook specifications: the one place that defines what a plugin can contribute.

A plugin is a module (or object) with functions decorated by :data:`accord.hookimpl` whose names
match the specs below. Plugins are found through the ``accord`` entry-point group
(``[project.entry-points.accord]`` in the plugin's ``pyproject.toml``); the core's own built-ins are
registered through the same manager (see :mod:`accord.plugins`).

Every component hook is *register-callback* style (as in ``simonw/llm``): the hook receives a
``register`` callable and calls it once per component. The core attributes each registration to the
plugin that made it, so ``accord plugins`` can show who provides what, and components are addressed
as ``"<plugin>.<name>"`` (a bare ``"<name>"`` works while it is unambiguous).

The signatures of the ``register`` callables are:

* tasks: ``register(name, run, *, config, description="")`` where ``run(config) -> dict`` and
  ``config`` is a pydantic model class (subclass of :class:`accord.config.RunConfig`).
* models: ``register(name, factory, *, description="")``; ``factory(run_config, **model_options)
  -> nn.Module`` rebuilds a trained model (see :func:`accord.runs.load_run`).
* datasets: ``register(name, *, synth, check, convert=None, description="")`` where
  ``synth(out_dir, **options)`` writes a small sample dataset in the exact on-disk format,
  ``check(root, **options) -> list[Problem]`` validates a user's dataset (see
  :class:`accord.registry.Problem`) and the optional ``convert(source, out_dir, **options) -> str``
  turns the dataset as distributed into the files training reads, returning a one-line summary.
* benchmarks: ``register(name, run, *, config, kind="pipeline", default=False, description="")`` where
  ``run(config) -> BenchmarkResult`` (:mod:`accord.benchmarking`), ``config`` subclasses
  :class:`accord.config.BenchmarkConfig` and ``kind`` is ``"pipeline"`` or ``"speed"``.
* config schemas: ``register(name, model)`` with a pydantic model class (``extra="forbid"``).
* exporters: ``register(format, export, *, description="")`` where
  ``export(checkpoint_path, out_path) -> Path`` writes weights in a foreign format.

Hooks are called with keyword arguments only. A hook implementation may accept a subset of the
spec's arguments (pluggy semantics).

Registries exist only for what the platform looks up by name: tasks (``accord run``), models (a
checkpoint names the factory that built it, so ``load_run`` can rebuild the model), datasets,
config schemas and exporters. Losses and matchers are not registered: a method's losses are fixed by
its code, not chosen by config, so plugins import them (``from accord.losses import InfoNCELoss``).
The hooks that used to register them are listed in :data:`REMOVED_HOOKS`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable

import pluggy

if TYPE_CHECKING:  # keep this module import-cheap
    import typer

PROJECT = "accord"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


@hookspec
def plugin_info() -> dict[str, str]:
    """Describe the plugin for ``accord plugins``.

    Returns:
        A dict with at least ``domain`` (e.g. ``"medical imaging"``) and ``description``. Called
        once per plugin; the result is attributed to the implementing plugin.

    .. versionadded:: 0.1
    """


@hookspec
def register_tasks(register: Callable[..., None]) -> None:
    """Register runnable tasks (``pretrain``, ``finetune``, ``evaluate``, ...).

    Args:
        register: ``register(name, run, *, config, description="", methods=None)``. ``run(config)``
            receives a validated instance of ``config`` (a :class:`accord.config.RunConfig`
            subclass) and returns a JSON-serialisable dict of results. ``accord run CONFIG``
            dispatches on the config's ``plugin`` and ``task`` keys (through
            :func:`accord.runs.run_task`, as benchmarks run their sub-tasks). ``methods`` maps
            values of the config's ``method`` key to other tasks of the plugin that run them
            (``{"gemini": "gemini_pretrain"}``: ``task: pretrain`` with ``method: gemini`` is
            validated and run as ``gemini_pretrain``, without the ``method`` key). Benchmarks are
            not tasks: see :func:`register_benchmarks`.

    .. versionadded:: 0.1
    """


@hookspec
def register_models(register: Callable[..., None]) -> None:
    """Register the model factories that rebuild trained models from their run config.

    Every checkpoint names the factory that built its model (``Trainer.for_run(cfg,
    model_factory="<plugin>.<name>")``), and :func:`accord.runs.load_run` calls it to rebuild the
    model from the checkpoint alone, then loads the weights.

    Args:
        register: ``register(name, factory, *, description="")``; ``factory(run_config,
            **model_options)`` returns the ``nn.Module`` a task trains (architecture only, no
            weights loaded), from the task's validated config and the ``model_options`` the task
            passed to ``Trainer.for_run``.

    .. versionadded:: 0.1
    """


@hookspec
def register_datasets(register: Callable[..., None]) -> None:
    """Register on-disk dataset formats with a checker and a sample generator.

    Args:
        register: ``register(name, *, synth, check, convert=None, description="")``.
            ``synth(out_dir, **options)`` writes a small sample dataset in the exact real on-disk
            format and returns its root (options: ``accord data synth PLUGIN OUT key=value``, e.g.
            a case count); ``check(root, **options)`` returns a list of
            :class:`accord.registry.Problem` (empty when valid); ``options`` (from ``accord data
            check PLUGIN DIR key=value``) name what the data must serve, e.g. a dataset version, and
            the checker may take none. ``convert(source, out_dir, **options) -> str``, for formats
            that training reads only after a conversion (``accord data convert PLUGIN SRC OUT
            key=value``), writes the converted files, refuses data with problems (a
            :class:`accord.errors.UserError` listing them) and returns a one-line summary.

    .. versionadded:: 0.1
    """


@hookspec
def register_benchmarks(register: Callable[..., None]) -> None:
    """Register benchmarks: ``accord benchmark PLUGIN [NAME]`` and ``accord benchmark PLUGIN --speed NAME``.

    Args:
        register: ``register(name, run, *, config, kind="pipeline", default=False, description="")``.
            ``run(config)`` receives a validated instance of ``config`` (a
            :class:`accord.config.BenchmarkConfig` subclass: ``data``, ``quick``, ``seeds`` plus the
            benchmark's own options) and returns an :class:`accord.benchmarking.BenchmarkResult`
            (tables, plots, raw rows, paper numbers). The platform times it, records the command
            line that reproduces it and writes ``results.md`` and ``results.json`` to the config's
            ``run_dir`` (:func:`accord.benchmarking.run_benchmark`).

            ``kind="pipeline"``: the plugin's end-to-end comparison (pretrained vs other
            initialisations on a downstream task), usually
            :func:`accord.benchmarking.run_pipeline` on a plugin's
            :class:`~accord.benchmarking.PipelineSpec`; ``accord benchmark PLUGIN`` runs it (of
            several, the one registered with ``default=True``; the others by name) and ``accord
            demo`` runs the ``quick`` version of each. ``kind="speed"``: a measurement of
            throughput, memory or a component's quality, run by ``accord benchmark PLUGIN --speed
            NAME`` (``--speed`` alone lists them).

    .. versionadded:: 0.2
    """


@hookspec
def register_config_schemas(register: Callable[..., None]) -> None:
    """Register reusable pydantic config schemas (method options, data options, ...).

    Args:
        register: ``register(name, model)`` with a pydantic model class that forbids extra keys.
            ``accord schema`` prints the JSON schema of every registered model.

    .. versionadded:: 0.1
    """


@hookspec
def register_exporters(register: Callable[..., None]) -> None:
    """Register checkpoint exporters for ``accord export CKPT --format FORMAT``.

    Args:
        register: ``register(format, export, *, description="")`` where
            ``export(checkpoint_path, out_path)`` writes the weights and returns the written path.

    .. versionadded:: 0.1
    """


@hookspec
def register_commands(cli: "typer.Typer") -> None:
    """Add sub-commands to the ``accord`` command line.

    Args:
        cli: the root :class:`typer.Typer` application.

    .. versionadded:: 0.1
    """


#: Hooks that no longer exist -> what a plugin that still implements one should do instead. The
#: plugin host names them at load time rather than letting pluggy report a bare "unknown hook".
REMOVED_HOOKS: dict[str, str] = {
    "register_losses": "losses are no longer looked up by name; import them where the model is "
    "built (from accord.losses import InfoNCELoss)",
    "register_matchers": "matchers are no longer looked up by name; import them where the model is "
    "built (from accord.matchers import CropOverlapMatcher)",
}


def hook_names() -> list[str]:
    """Names of every hook defined in this module, in definition order."""
    return [name for name, obj in globals().items() if callable(obj) and hasattr(obj, "accord_spec")]


__all__ = ["PROJECT", "REMOVED_HOOKS", "hookimpl", "hookspec", "hook_names"]

