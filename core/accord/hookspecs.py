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
* models: ``register(name, factory, *, description="")``; ``factory(**options) -> nn.Module``.
* datasets: ``register(name, *, synth, check, description="")`` where ``synth(out_dir, **options)``
  writes a small sample dataset in the exact on-disk format, and ``check(root) -> list[Problem]``
  validates a user's dataset (see :class:`accord.registry.Problem`).
* losses / matchers: ``register(name, cls, *, description="")`` with an ``nn.Module`` / matcher
  class.
* config schemas: ``register(name, model)`` with a pydantic model class (``extra="forbid"``).
* exporters: ``register(format, export, *, description="")`` where
  ``export(checkpoint_path, out_path) -> Path`` writes weights in a foreign format.

Hooks are called with keyword arguments only. A hook implementation may accept a subset of the
spec's arguments (pluggy semantics).
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
    """Register runnable tasks (``pretrain``, ``finetune``, ``evaluate``, ``benchmark``, ...).

    Args:
        register: ``register(name, run, *, config, description="")``. ``run(config)`` receives a
            validated instance of ``config`` (a :class:`accord.config.RunConfig` subclass) and
            returns a JSON-serialisable dict of results. ``accord run CONFIG`` dispatches on the
            config's ``plugin`` and ``task`` keys; ``accord benchmark PLUGIN`` runs the plugin's
            ``benchmark`` task.

    .. versionadded:: 0.1
    """


@hookspec
def register_models(register: Callable[..., None]) -> None:
    """Register model factories.

    Args:
        register: ``register(name, factory, *, description="")``; ``factory(**options)`` returns an
            ``nn.Module``.

    .. versionadded:: 0.1
    """


@hookspec
def register_datasets(register: Callable[..., None]) -> None:
    """Register on-disk dataset formats with a checker and a sample generator.

    Args:
        register: ``register(name, *, synth, check, description="")``. ``synth(out_dir)`` writes a
            small sample dataset in the exact real on-disk format and returns its root;
            ``check(root)`` returns a list of :class:`accord.registry.Problem` (empty when valid).
            ``accord data synth PLUGIN OUT`` and ``accord data check PLUGIN DIR`` use them.

    .. versionadded:: 0.1
    """


@hookspec
def register_losses(register: Callable[..., None]) -> None:
    """Register loss modules.

    Args:
        register: ``register(name, cls, *, description="")`` with an ``nn.Module`` subclass.

    .. versionadded:: 0.1
    """


@hookspec
def register_matchers(register: Callable[..., None]) -> None:
    """Register dense-correspondence matchers.

    Args:
        register: ``register(name, cls, *, description="")`` with a class whose instances map two
            views' features and geometry to index pairs and weights.

    .. versionadded:: 0.1
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


def hook_names() -> list[str]:
    """Names of every hook defined in this module, in definition order."""
    return [name for name, obj in globals().items() if callable(obj) and hasattr(obj, "accord_spec")]


__all__ = ["PROJECT", "hookimpl", "hookspec", "hook_names"]

