"""Component registries filled by plugin ``register_*`` hooks.

Each registered component remembers which plugin registered it; components are addressed as
``"<plugin>.<name>"`` or, while unambiguous, by the bare ``"<name>"``.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from typing import Any, Generic, Iterator, TypeVar

T = TypeVar("T")


class PluginNotInstalledError(LookupError):
    """A config or command referred to a plugin that is not installed (or was filtered out)."""


class ComponentNotFoundError(LookupError):
    """A component name did not resolve to exactly one registered component."""


@dataclass(frozen=True)
class Problem:
    """One problem found by a dataset checker.

    Attributes:
        path: the file, table or field the problem is about.
        message: what is wrong and what was expected.
    """

    path: str
    message: str

    def __str__(self) -> str:
        return f"{self.path}: {self.message}"


@dataclass(frozen=True)
class Component(Generic[T]):
    """A registered component.

    Attributes:
        kind: registry kind (``"task"``, ``"model"``, ...).
        plugin: name of the plugin that registered it.
        name: the plugin-local name.
        obj: the registered object (callable, class, ...).
        description: one line for listings.
        extra: kind-specific keyword arguments given at registration (e.g. a task's ``config``).
    """

    kind: str
    plugin: str
    name: str
    obj: T
    description: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def qualname(self) -> str:
        return f"{self.plugin}.{self.name}"


def install_hint(plugin: str) -> str:
    """The command that installs a first-party plugin distribution."""
    return f"pip install accord-{plugin}  (from a checkout: pip install -e plugins/{plugin})"


class ComponentRegistry(Generic[T]):
    """Components of one kind, keyed by ``"<plugin>.<name>"``.

    Args:
        kind: the registry kind, used in error messages.
        installed_plugins: names of the loaded plugins, used to tell "plugin missing" from
            "component missing".
    """

    def __init__(self, kind: str, installed_plugins: list[str]) -> None:
        self.kind = kind
        self.installed_plugins = installed_plugins
        self._items: dict[str, Component[T]] = {}

    def add(self, component: Component[T]) -> None:
        if component.qualname in self._items:
            raise ValueError(
                f"{self.kind} {component.qualname!r} is registered twice by plugin {component.plugin!r}"
            )
        self._items[component.qualname] = component

    def __iter__(self) -> Iterator[Component[T]]:
        return iter(self._items.values())

    def __len__(self) -> int:
        return len(self._items)

    def names(self) -> list[str]:
        return list(self._items)

    def by_plugin(self, plugin: str) -> list[Component[T]]:
        return [c for c in self._items.values() if c.plugin == plugin]

    def get(self, ref: str) -> Component[T]:
        """Resolve ``"<plugin>.<name>"`` or an unambiguous bare ``"<name>"``.

        Raises:
            PluginNotInstalledError: ``ref`` names a plugin that is not loaded.
            ComponentNotFoundError: no (or more than one) component matches.
        """
        if ref in self._items:
            return self._items[ref]
        plugin, dot, name = ref.partition(".")
        if dot:
            if plugin not in self.installed_plugins:
                raise PluginNotInstalledError(
                    f"{self.kind} {ref!r} needs plugin {plugin!r}, which is not installed. "
                    f"Installed plugins: {', '.join(self.installed_plugins) or '(none)'}. "
                    f"Install it with: {install_hint(plugin)}"
                )
            candidates = [c.name for c in self.by_plugin(plugin)]
            raise ComponentNotFoundError(
                f"plugin {plugin!r} has no {self.kind} {name!r}"
                + _suggest(name, candidates)
                + f"; its {self.kind}s: {', '.join(candidates) or '(none)'}"
            )
        matches = [c for c in self._items.values() if c.name == ref]
        if len(matches) == 1:
            return matches[0]
        if len(matches) > 1:
            raise ComponentNotFoundError(
                f"{self.kind} {ref!r} is ambiguous; use one of: "
                + ", ".join(c.qualname for c in matches)
            )
        raise ComponentNotFoundError(
            f"no {self.kind} named {ref!r}" + _suggest(ref, self.names() + [c.name for c in self])
            + f"; registered: {', '.join(self.names()) or '(none)'}"
        )


def _suggest(word: str, candidates: list[str]) -> str:
    close = difflib.get_close_matches(word, candidates, n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""
