"""Plugin discovery and the typed facade over the pluggy manager.

Discovery order: external plugins from the ``accord`` entry-point group, then the core built-ins
(:data:`DEFAULT_PLUGINS`) through the same manager, then a hook check: a hook accord removed is named
with what to do instead (:data:`accord.hookspecs.REMOVED_HOOKS`), and ``check_pending()`` makes a
misspelt hook name fail loudly.

Environment variables:

* ``ACCORD_LOAD_PLUGINS=medssl,superflow`` loads only those external plugins (an empty string loads
  none). Built-ins always load.
* ``ACCORD_DISABLE_PLUGINS=mutdet`` blocks the named plugins.
* ``ACCORD_TRACE_PLUGINS=1`` prints every hook call to stderr.

Core code never calls ``pm.hook.*`` directly; it goes through :class:`PluginHost`.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import os
import sys
from typing import Any, Callable

import pluggy

from accord import hookspecs
from accord.registry import Component, ComponentRegistry, PluginNotInstalledError, install_hint

ENV_LOAD = "ACCORD_LOAD_PLUGINS"
ENV_DISABLE = "ACCORD_DISABLE_PLUGINS"
ENV_TRACE = "ACCORD_TRACE_PLUGINS"

#: Built-in plugins: (plugin name, module).
DEFAULT_PLUGINS: tuple[tuple[str, str], ...] = (
    ("engine", "accord.builtin.engine"),
    ("core", "accord.builtin.toy"),
)

#: hook name -> registry kind.
COMPONENT_HOOKS: dict[str, str] = {
    "register_tasks": "task",
    "register_models": "model",
    "register_datasets": "dataset",
    "register_benchmarks": "benchmark",
    "register_config_schemas": "config schema",
    "register_exporters": "exporter",
}


def _env_list(name: str) -> list[str] | None:
    value = os.environ.get(name)
    if value is None:
        return None
    return [item.strip() for item in value.split(",") if item.strip()]


class PluginHost:
    """Loads plugins and exposes their contributions as typed registries.

    Args:
        load_entrypoints: discover external plugins through the ``accord`` entry-point group.
    """

    def __init__(self, load_entrypoints: bool = True) -> None:
        self.pm = pluggy.PluginManager(hookspecs.PROJECT)
        self._dists: dict[str, importlib.metadata.Distribution] = {}
        self._registries: dict[str, ComponentRegistry[Any]] | None = None
        self.pm.add_hookspecs(hookspecs)
        for name in _env_list(ENV_DISABLE) or []:
            self.pm.set_blocked(name)
        if load_entrypoints:
            self._load_entrypoints()
        for name, module in DEFAULT_PLUGINS:
            if not self.pm.is_blocked(name):
                self.pm.register(importlib.import_module(module), name=name)
        self._check_hooks()
        if os.environ.get(ENV_TRACE):
            self.pm.trace.root.setwriter(sys.stderr.write)
            self.pm.enable_tracing()

    def _check_hooks(self) -> None:
        """Reject hook implementations that match no spec, naming removed hooks explicitly.

        Raises:
            pluggy.PluginValidationError: a plugin implements a hook from
                :data:`accord.hookspecs.REMOVED_HOOKS` (the message says what to do instead), or a
                hook that never existed (pluggy's ``check_pending``).
        """
        for hook_name, instead in hookspecs.REMOVED_HOOKS.items():
            caller = getattr(self.pm.hook, hook_name, None)
            for impl in caller.get_hookimpls() if caller else []:
                raise pluggy.PluginValidationError(
                    impl.plugin,
                    f"plugin {impl.plugin_name!r} implements {hook_name}, which accord removed: {instead}. "
                    f"Delete {hook_name} from the plugin, or run without it: "
                    f"{ENV_DISABLE}={impl.plugin_name}",
                )
        self.pm.check_pending()

    def _load_entrypoints(self) -> None:
        only = _env_list(ENV_LOAD)
        for dist in importlib.metadata.distributions():
            for ep in dist.entry_points:
                if ep.group != hookspecs.PROJECT:
                    continue
                if only is not None and ep.name not in only:
                    continue
                if self.pm.is_blocked(ep.name) or self.pm.has_plugin(ep.name):
                    continue
                self.pm.register(ep.load(), name=ep.name)
                self._dists[ep.name] = dist

    # -- plugins ---------------------------------------------------------------------------
    def plugin_names(self) -> list[str]:
        return [name for name, plugin in self.pm.list_name_plugin() if plugin is not None]

    def require_plugin(self, name: str) -> None:
        """Raise :class:`PluginNotInstalledError` naming the installed plugins and the install command."""
        if name not in self.plugin_names():
            raise PluginNotInstalledError(
                f"plugin {name!r} is not installed. Installed plugins: "
                f"{', '.join(self.plugin_names())}. Install it with: {install_hint(name)}"
            )

    def plugin_version(self, name: str) -> str:
        if name in self._dists:
            return self._dists[name].version
        from accord import __version__

        return __version__

    def plugin_info(self, name: str) -> dict[str, str]:
        plugin = self.pm.get_plugin(name)
        info_impl = getattr(plugin, "plugin_info", None)
        info = dict(info_impl()) if callable(info_impl) else {}
        info.setdefault("domain", "")
        info.setdefault("description", "")
        return info

    def describe(self) -> list[dict[str, Any]]:
        """One JSON-serialisable dict per loaded plugin (``accord plugins --json``)."""
        rows = []
        for name in self.plugin_names():
            plugin = self.pm.get_plugin(name)
            callers = self.pm.get_hookcallers(plugin) or []
            rows.append(
                {
                    "name": name,
                    "version": self.plugin_version(name),
                    "builtin": name in dict(DEFAULT_PLUGINS),
                    **self.plugin_info(name),
                    "hooks": sorted(caller.name for caller in callers),
                    "tasks": [c.name for c in self.tasks.by_plugin(name)],
                    "components": {
                        kind: [c.name for c in self.registry(kind).by_plugin(name)]
                        for kind in COMPONENT_HOOKS.values()
                        if kind != "task" and self.registry(kind).by_plugin(name)
                    },
                }
            )
        return rows

    # -- component registries --------------------------------------------------------------
    def _collect(self) -> dict[str, ComponentRegistry[Any]]:
        installed = self.plugin_names()
        registries: dict[str, ComponentRegistry[Any]] = {}
        for hook_name, kind in COMPONENT_HOOKS.items():
            registry: ComponentRegistry[Any] = ComponentRegistry(kind, installed)
            for plugin_name, caller in self._callers_per_plugin(hook_name):
                caller(register=_registrar(registry, kind, plugin_name))
            registries[kind] = registry
        return registries

    def _callers_per_plugin(self, hook_name: str) -> list[tuple[str, pluggy.HookCaller]]:
        """One pluggy hook caller per plugin implementing ``hook_name``, calling only that plugin.

        Calling through pluggy (not ``impl.function``) keeps ``ACCORD_TRACE_PLUGINS`` tracing every call;
        one caller per plugin lets each call get a ``register`` bound to the plugin it registers for.
        """
        hookimpls = getattr(self.pm.hook, hook_name).get_hookimpls()
        owners = {impl.plugin_name: impl.plugin for impl in hookimpls}
        plugins = self.pm.get_plugins()
        return [
            (name, self.pm.subset_hook_caller(hook_name, remove_plugins=plugins - {plugin}))
            for name, plugin in owners.items()
        ]

    def registry(self, kind: str) -> ComponentRegistry[Any]:
        if self._registries is None:
            self._registries = self._collect()
        return self._registries[kind]

    @property
    def tasks(self) -> ComponentRegistry[Callable[..., dict[str, Any]]]:
        return self.registry("task")

    @property
    def models(self) -> ComponentRegistry[Callable[..., Any]]:
        return self.registry("model")

    @property
    def datasets(self) -> ComponentRegistry[None]:
        return self.registry("dataset")

    @property
    def benchmarks(self) -> ComponentRegistry[Callable[..., Any]]:
        """Pipeline and speed benchmarks (:mod:`accord.benchmarking`); ``extra`` holds ``config`` and ``kind``."""
        return self.registry("benchmark")

    @property
    def config_schemas(self) -> ComponentRegistry[type]:
        return self.registry("config schema")

    @property
    def exporters(self) -> ComponentRegistry[Callable[..., Any]]:
        return self.registry("exporter")

    def add_commands(self, cli: Any) -> None:
        self.pm.hook.register_commands(cli=cli)


def _registrar(registry: ComponentRegistry[Any], kind: str, plugin: str) -> Callable[..., None]:
    """The ``register`` callable handed to one plugin's implementation of one hook."""

    def register(name: str, obj: Any = None, *, description: str = "", **extra: Any) -> None:
        if kind == "task" and "config" not in extra:
            raise TypeError(f"plugin {plugin!r}: task {name!r} registered without config=<model>")
        if kind == "task" and not isinstance(extra.get("methods", {}), dict):
            raise TypeError(f"plugin {plugin!r}: task {name!r}: methods= must map method names to task names")
        if kind == "dataset" and not {"synth", "check"} <= extra.keys():
            raise TypeError(f"plugin {plugin!r}: dataset {name!r} needs synth= and check=")
        registry.add(Component(kind, plugin, name, obj, description, extra))

    # ACCORD_TRACE_PLUGINS prints hook arguments; this name shows which plugin each call is for.
    register.__qualname__ = f"register[{kind} of {plugin}]"
    return register


_HOST: PluginHost | None = None


def get_host() -> PluginHost:
    """The process-wide :class:`PluginHost`, created on first use."""
    global _HOST
    if _HOST is None:
        _HOST = PluginHost()
    return _HOST


def reset_host() -> None:
    """Forget the cached host so the next :func:`get_host` rediscovers plugins (tests)."""
    global _HOST
    _HOST = None


def component(kind: str, ref: str) -> Component[Any]:
    """Shorthand for ``get_host().registry(kind).get(ref)``."""
    return get_host().registry(kind).get(ref)
